"""Merging SmolLM2-135M-Instruct fine-tunes: time and peak memory of `cairn merge` against mergekit's `mergekit-yaml`
on the same recipes, each run in its own process (peak resident memory from the kernel, wait4's ru_maxrss), and
the largest difference between their output tensors.

The inputs: SmolLM2 as shipped, imported to fp32 (the base), and two short full fine-tunes of it made here (`cairn
train --recipe sft`, 8 steps each on the two halves of examples/data/sft.jsonl, different seeds and learning rates).

    flock /tmp/cairn-bench.lock python benchmarks/merge.py [--methods linear,ties,...] [--repeats 2]
        [--work DIR] [--out docs/bench/merge.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SFT = ROOT / "examples" / "data" / "sft.jsonl"

def recipe(method: str, base: str, a: str, b: str) -> dict:
    """The benchmark's recipe for `method` over the base and the two fine-tunes."""
    def m(path, **params):
        return {"model": path, **({"parameters": params} if params else {})}

    pair = {"linear": [m(a, weight=0.6), m(b, weight=0.4)], "slerp": [m(a), m(b)],
            "task_arithmetic": [m(a, weight=0.7), m(b, weight=0.5)],
            "ties": [m(a, weight=0.6, density=0.5), m(b, weight=0.4, density=0.5)],
            "dare_ties": [m(a, weight=0.6, density=0.5), m(b, weight=0.4, density=0.5)],
            "model_stock": [m(a), m(b)]}
    if method == "passthrough":
        return {"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 20]}]}, {"sources": [{"model": b, "layer_range": [10, 30]}]}]}
    out = {"merge_method": method, "models": pair[method], "dtype": "float32"}
    if method != "linear":
        out["base_model"] = a if method == "slerp" else base
    if method == "slerp":
        out["parameters"] = {"t": [0, 0.5, 1]}
    if method == "ties":
        out["parameters"] = {"normalize": True}
    return out


METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "model_stock", "passthrough")
RANDOM = {"dare_ties"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


LAUNCH = ("import os, subprocess, sys, time\n"
          "t0 = time.perf_counter()\n"
          "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
          "_, status, usage = os.wait4(p.pid, 0)\n"
          "print(time.perf_counter() - t0, usage.ru_maxrss, os.waitstatus_to_exitcode(status))\n")
"""Runs a command and reports its seconds, peak resident KiB and exit code. A child's ru_maxrss starts from its
parent's resident size at fork (it survives exec), so commands are forked from this small fresh process, never
from the benchmark's own (which holds the outputs it compares)."""


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident MiB of one command in its own process."""
    r = subprocess.run([sys.executable, "-c", LAUNCH, *cmd], capture_output=True, text=True)
    secs, kib, code = r.stdout.split()
    if r.returncode != 0 or int(code) != 0:
        sys.exit(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")
    return float(secs), int(kib) / 1024  # Linux: KiB


def fine_tunes(work: Path) -> tuple[str, str, str]:
    from cairn.models.gguf import resolve_model, smollm2_path

    base = str(resolve_model(smollm2_path(), work / "cache"))
    lines = SFT.read_text().splitlines()
    made = []
    for name, part, seed, lr in (("ft-a", lines[::2], 0, 1e-4), ("ft-b", lines[1::2], 1, 2e-4)):
        out = work / name
        if not (out / "model.safetensors").exists():
            data = work / f"{name}.jsonl"
            data.write_text("\n".join(part) + "\n")
            log(f"fine-tune {name}: 8 SFT steps on {len(part)} records")
            subprocess.run([sys.executable, "-m", "cairn", "train", "--recipe", "sft", "--model", base, "--data",
                            str(data), "--out", str(out), "--max-steps", "8", "--batch-size", "2", "--seq-len", "256",
                            "--lr", str(lr), "--seed", str(seed), "--eval-fraction", "0", "--threads", "2"],
                           check=True, stdout=subprocess.DEVNULL)
        made.append(str(out))
    return base, made[0], made[1]


def tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=2, help="runs per tool and method (the fastest is kept)")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "cairn" / "bench-merge"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "merge.json"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    base, ft_a, ft_b = fine_tunes(work)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "methods": {}}
    print(f"{'method':<17}{'cairn s':>9}{'mergekit s':>12}{'time':>8}{'cairn MiB':>11}{'mergekit MiB':>14}{'memory':>8}"
          f"{'max |diff|':>12}")
    for method in a.methods.split(","):
        import yaml

        path = work / f"{method}.yaml"
        path.write_text(yaml.safe_dump(recipe(method, base, ft_a, ft_b), sort_keys=False))
        best = {}
        for tool in ("cairn", "mergekit"):
            out = work / f"out-{tool}-{method}"
            cmd = ([sys.executable, "-m", "cairn", "merge", str(path), "--out", str(out), "--seed", "1"]
                   if tool == "cairn" else
                   [str(Path(sys.executable).parent / "mergekit-yaml"), str(path), str(out), "--random-seed", "1",
                    "--no-write-model-card", "--quiet"])
            runs = []
            for _ in range(a.repeats):
                subprocess.run(["rm", "-rf", str(out)], check=True)
                runs.append(run(cmd))
            best[tool] = (min(r[0] for r in runs), min(r[1] for r in runs))
        diff = None
        if method not in RANDOM:
            ours, theirs = tensors(work / f"out-cairn-{method}"), tensors(work / f"out-mergekit-{method}")
            diff = max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in theirs)
        (cs, cm), (ms, mm) = best["cairn"], best["mergekit"]
        results["methods"][method] = {"cairn_seconds": cs, "mergekit_seconds": ms, "cairn_peak_mib": cm,
                                      "mergekit_peak_mib": mm, "time_ratio": cs / ms, "memory_ratio": cm / mm,
                                      "max_abs_diff": diff}
        print(f"{method:<17}{cs:>9.2f}{ms:>12.2f}{cs / ms:>7.2f}x{cm:>11.0f}{mm:>14.0f}{cm / mm:>7.2f}x"
              f"{'random' if diff is None else f'{diff:.1e}':>12}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
