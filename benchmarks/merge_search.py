"""Evolutionary merge search on two task fine-tunes of SmolLM2-135M-Instruct, in one run:

1. Two tasks from examples/route/tasks.jsonl: WORDS (opposites, plurals, colours, animal sounds) and SUMS (addition,
   subtraction, multiplication), each split by a hash of the question into train / validation / test thirds.
2. Two full fine-tunes of SmolLM2 (`cairn train --recipe sft`), one per task, on its train third with the bare
   answer as the reply.
3. `cairn merge search` of a task_arithmetic recipe over the two (weights and densities searched, starting at
   0.5), scored on the validation thirds of both tasks (the mean exact match); then every model is scored on the
   test thirds, which the search never saw: each parent, the plain 50/50 linear merge and the searched merge.

    flock /tmp/cairn-bench.lock python benchmarks/merge_search.py [--budget 16] [--steps 30] [--threads 2]
        [--work DIR] [--out docs/bench/merge_search.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = {"words": {"opposite", "plural", "colour", "animal-sound"},
         "sums": {"addition", "subtraction", "multiplication"}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cairn(*args) -> None:
    subprocess.run([sys.executable, "-m", "cairn", *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def split(work: Path) -> dict[str, dict[str, Path]]:
    """Per task: train / val / test JSONL files (eval items; train as chat records with the bare answer)."""
    out: dict[str, dict[str, Path]] = {}
    rows = [json.loads(x) for x in (ROOT / "examples" / "route" / "tasks.jsonl").read_text().splitlines()]
    for task, kinds in TASKS.items():
        parts: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
        for r in rows:
            if r["kind"] in kinds:
                part = ("train", "val", "test")[zlib.crc32(r["messages"][0]["content"].encode()) % 3]
                parts[part].append(r)
        out[task] = {}
        for part, items in parts.items():
            path = work / f"{task}-{part}.jsonl"
            if part == "train":
                lines = [{"messages": r["messages"] + [{"role": "assistant", "content": r["answer"][0]}]}
                         for r in items]
            else:
                lines = [{"messages": r["messages"], "answer": r["answer"]} for r in items]
            path.write_text("".join(json.dumps(x) + "\n" for x in lines))
            out[task][part] = path
    return out


def score(model: str, files: list[Path], threads: int) -> dict[str, float]:
    """Exact match of a model on each file (greedy, 16 tokens)."""
    from cairn.config import EngineConfig
    from cairn.engine.api import LLM
    from cairn.eval.commands import run_generate

    with LLM(model, EngineConfig(max_seqs=16, threads=threads)) as llm:
        return {f.stem: run_generate(llm, str(f), 16, False, False)["exact_match"] for f in files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "cairn" / "bench-merge-search"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "merge_search.json"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    from cairn.models.gguf import resolve_model, smollm2_path

    base = str(resolve_model(smollm2_path(), work / "cache"))
    files = split(work)
    tunes = {}
    for task in TASKS:
        out = work / f"ft-{task}"
        if not (out / "model.safetensors").exists():
            log(f"fine-tune on {task}: {a.steps} SFT steps")
            cairn("train", "--recipe", "sft", "--model", base, "--data", files[task]["train"], "--out", out,
                  "--max-steps", a.steps, "--batch-size", 4, "--seq-len", 96, "--lr", 3e-5, "--eval-fraction", 0,
                  "--threads", a.threads, "--seed", 0)
        tunes[task] = str(out)
    recipe = work / "start.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                      + "".join(f"  - model: {tunes[t]}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                                for t in TASKS) + "dtype: float32\n")
    plain = work / "linear.yaml"
    plain.write_text("merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {tunes[t]}\n    parameters: {{weight: 0.5}}\n" for t in TASKS) + "dtype: float32\n")
    if not (work / "linear" / "config.json").exists():
        cairn("merge", plain, "--out", work / "linear")
    log(f"search: budget {a.budget}, scored on the validation thirds")
    t0 = time.perf_counter()
    cairn("merge", "search", recipe, "--out", work / "search", "--budget", a.budget, "--generate",
          files["words"]["val"], files["sums"]["val"], "--threads", a.threads)
    search_seconds = time.perf_counter() - t0
    tests = [files[t]["test"] for t in TASKS]
    models = {"base": base, **{f"fine-tune {t}": tunes[t] for t in TASKS}, "linear 50/50": str(work / "linear"),
              "searched": str(work / "search" / "best")}
    results = {"search_seconds": search_seconds, "budget": a.budget, "steps": a.steps,
               "best_recipe": (work / "search" / "best.yaml").read_text(),
               "items": {t: {p: len(f.read_text().splitlines()) for p, f in files[t].items()} for t in TASKS},
               "test": {}}
    print(f"{'model':<20}" + "".join(f"{t:>10}" for t in TASKS) + f"{'mean':>10}")
    for name, path in models.items():
        s = score(path, tests, a.threads)
        mean = sum(s.values()) / len(s)
        results["test"][name] = {**s, "mean": mean}
        print(f"{name:<20}" + "".join(f"{s[f'{t}-test']:>10.3f}" for t in TASKS) + f"{mean:>10.3f}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    log(f"search took {search_seconds / 60:.1f} min; wrote {a.out}")


if __name__ == "__main__":
    main()
