"""Speculative decoding by prompt lookup (`--draft ngram`) against the model alone, batch 1, greedy, in one process
(SmolLM2-135M-Instruct by default).

copy: tasks that answer from, quote or edit a given passage (the answer repeats spans of the prompt);
chat: open-ended questions (little to copy). For each: tokens/s of the target alone and with drafts of at most k
tokens (k adapts below that), the ratio, the fraction of proposed tokens accepted, and whether the output is
identical (it must be).

    python benchmarks/speculative.py [MODEL_DIR] [--max-tokens 128] [--k 2,4,8] [--threads 2] [--repeat 2]
                                     [--early-exit 24 27] [--draft-models DIR ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from cairn.config import EngineConfig, SamplingParams
from cairn.engine.api import LLM

PASSAGE = ("The river Wend rises in the hills above Marrow and runs for forty miles to the sea. In the old town the "
           "water turned three mills, and the stone bridge that crosses it was built in 1642 by the masons of the "
           "guild. Every spring the meadows below the bridge flood, and the ferry that carries carts to the eastern "
           "bank stops running until the water falls. The lighthouse at the river mouth was lit for the first time "
           "in 1811.")

COPY = [
    f"Repeat the following text exactly, word for word:\n\n{PASSAGE}",
    f"Here is a passage:\n\n{PASSAGE}\n\nCopy the sentence about the bridge from the passage, then the sentence "
    "about the ferry.",
    f"Rewrite this passage, replacing 'river' by 'stream' and changing nothing else:\n\n{PASSAGE}",
    f"Read the passage and answer by quoting it.\n\n{PASSAGE}\n\nWhat happens every spring?",
]
CHAT = ["Tell me a short story about a dragon who learns to cook.", "What are three benefits of regular exercise?",
        "Explain how a rainbow forms.", "Write a friendly email inviting a colleague to lunch."]


def run(llm: LLM, prompts: list[str], max_tokens: int, repeat: int):
    """Best-of-`repeat` seconds per prompt (one request at a time), the outputs, and the draft counters' change."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    ids = [llm.render_chat([{"role": "user", "content": p}]) for p in prompts]
    before = llm.kv_stats()
    outs, seconds, tokens = [], 0.0, 0
    for x in ids:
        best, out = float("inf"), None
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = llm.submit(x, params).result()
            best = min(best, time.perf_counter() - t0)
        outs.append(out.token_ids)
        seconds += best
        tokens += len(out.token_ids)
    after = llm.kv_stats()
    proposed = after["draft_proposed"] - before["draft_proposed"]
    accepted = after["draft_accepted"] - before["draft_accepted"]
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "outputs": outs,
            "acceptance": accepted / proposed if proposed else None, "proposed": proposed / repeat,
            "accepted": accepted / repeat}


def early_exit(model: str, n: int, tmp: Path) -> Path:
    """A checkpoint of the model's first n layers, final norm and head (the same files, config cut to n layers)."""
    out = tmp / f"first-{n}"
    out.mkdir()
    for f in Path(model).iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((Path(model) / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": n}))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=None)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", default="2,4,8", help="largest draft lengths to try")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--draft-models", nargs="*", default=[], help="draft model directories to try (--draft DIR)")
    ap.add_argument("--early-exit", type=int, nargs="*", default=[],
                    help="also try the model's own first N layers + head as a draft model (a checkpoint made here)")
    a = ap.parse_args()
    model = a.model_dir
    if model is None:
        from cairn.models.gguf import resolve_model, smollm2_path

        model = str(resolve_model(smollm2_path()))
    ks = [int(k) for k in a.k.split(",")]
    drafts = [("ngram", k, f"--draft ngram, k <= {k}") for k in ks]
    tmp = Path(tempfile.mkdtemp(prefix="cairn-spec-"))
    for n in a.early_exit:
        drafts.append((str(early_exit(model, n, tmp)), 4, f"--draft (first {n} layers + head), k <= 4"))
    drafts += [(d, 4, f"--draft {d}, k <= 4") for d in a.draft_models]
    print(f"{platform.machine()}, {a.threads} threads, {a.dtype or 'checkpoint dtype'}, batch 1, greedy, "
          f"{a.max_tokens} tokens; model {model}")
    results = {}
    for name, prompts in (("copy", COPY), ("chat", CHAT)):
        base_cfg = EngineConfig(max_seqs=1, threads=a.threads, dtype=a.dtype, max_context=2048)
        with LLM(model, base_cfg) as llm:
            run(llm, prompts[:1], 8, 1)  # warm-up
            base = run(llm, prompts, a.max_tokens, a.repeat)
        rows = {}
        for draft, k, label in drafts:
            with LLM(model, EngineConfig(max_seqs=1, threads=a.threads, dtype=a.dtype, max_context=2048,
                                         draft=draft, draft_max=k)) as llm:
                run(llm, prompts[:1], 8, 1)
                rows[label] = run(llm, prompts, a.max_tokens, a.repeat)
        print(f"{name}: alone {base['tokens_per_s']:.1f} tok/s ({base['tokens']} tokens)")
        for label, r in rows.items():
            acc = "n/a" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
            print(f"  {label}: {r['tokens_per_s']:.1f} tok/s = {r['tokens_per_s'] / base['tokens_per_s']:.2f}x; "
                  f"accepted {acc} of {r['proposed']:.0f} proposed; identical output: {r['outputs'] == base['outputs']}")
        results[name] = {"alone": {k: v for k, v in base.items() if k != "outputs"},
                         "draft": {k: {kk: vv for kk, vv in r.items() if kk != "outputs"} | {
                             "ratio": r["tokens_per_s"] / base["tokens_per_s"],
                             "identical": r["outputs"] == base["outputs"]} for k, r in rows.items()}}
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
