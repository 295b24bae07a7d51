"""Pipeline over local Ray nodes vs one process: throughput, bytes on the wire, output drift, recovery time.

    python benchmarks/pipeline.py MODEL_DIR [--threads 2] [--tokens 64] [--streams 16] [--reps 3]

Runs in a loopback-only network namespace (re-executes itself under `unshare -n` when it is not in one), with a
Ray head and 3 device nodes on 127.0.0.1. All nodes share this machine's cores, so splitting cannot add compute:
what this measures is the cost of the pipeline (hops, serialisation, replay) against the single-process engine.
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

PROMPT = "The engineer builds a wooden boat near the river"


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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--depth", type=int, default=None,
                    help="steps (micro-batches) in flight; default: 1 when all stages share a machine, as here")
    ap.add_argument("--reps", type=int, default=3, help="paired single-process/pipeline runs per configuration")
    ap.add_argument("--stage-threads", type=int, default=None, help="torch threads per stage (default: --threads)")
    a = ap.parse_args()
    ensure_isolated()
    with local_pool(3) as (_, nodes):
        measure(a, nodes)


def measure(a, nodes) -> None:
    import ray
    import torch

    from cairn.config import EngineConfig, ModelConfig, SamplingParams
    from cairn.engine.api import LLM
    from cairn.engine.runner import Chunk
    from cairn.pool.ray_backend import PipelineRunner

    torch.set_num_threads(a.threads)
    cfg = ModelConfig.from_hf_dir(a.model_dir)
    ecfg = EngineConfig(max_seqs=a.streams, max_context=a.max_context, threads=a.threads)
    local = LLM(a.model_dir, ecfg)
    warm_up(local)
    *_, ref1 = timed_generate(local, 1, a.tokens)
    *_, ref16 = timed_generate(local, a.streams, a.tokens)
    ids = torch.randint(3, cfg.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    ref_logits = local.runner.forward([Chunk(0, 0, tuple(ids))])
    print(f"model {a.model_dir}: {cfg.param_count() / 1e6:.0f}M params, fp32, {a.threads} threads; "
          f"{a.tokens} tokens at 1 stream, {a.streams} x {a.tokens} at {a.streams} streams")
    print(f"pipeline: {a.depth or 'auto'} steps in flight, {a.stage_threads or a.threads} threads per stage; each "
          f"pipeline run is paired with a single-process run just before it ({a.reps} pairs, medians), since the "
          "speed of a shared machine drifts\n")
    print(f"{'nodes':>5} {'wire':>5} {'1 stream':>9} {'single':>7} {'ratio':>6} {f'{a.streams} streams':>11} "
          f"{'single':>7} {'ratio':>6} {'wire B/token':>12} {'reply B/token':>13} {'greedy same':>11} "
          f"{'max |dlogit|':>12}  mean step ms: wall = stage compute + hops/waiting")
    wire_bytes, ratios16 = {}, {}
    for n_nodes, wire in [(1, "fp32"), (2, "fp32"), (3, "fp32"), (3, "bf16"), (3, "int8")]:
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
              f"{drift:>12.2e}  {wall_ms:.1f} = {' + '.join(f'{b:.1f}' for b in busy)} + {wall_ms - sum(busy):.1f}")
    local.close()
    print(f"\ntarget >= 0.8x single-process throughput at {a.streams} streams over 3 nodes (fp32 wire): "
          f"{ratios16[(3, 'fp32')]:.2f}x")
    if wire_bytes[(3, "int8")]:
        print(f"int8 wire sends {wire_bytes[(3, 'fp32')] / wire_bytes[(3, 'int8')]:.2f}x fewer bytes than fp32 "
              f"(bf16: {wire_bytes[(3, 'fp32')] / wire_bytes[(3, 'bf16')]:.2f}x); target >= 3.5x")

    # recovery: kill a stage's process while 16 streams decode
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
