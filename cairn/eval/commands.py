"""`cairn eval`: run tasks against one model (local or on the pool), print a table, write JSON; compare results."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cairn.errors import UserError
from cairn.eval import choice, data, generate, perplexity
from cairn.fsutil import atomic_write_json


def model_identity(llm) -> dict:
    """What makes a result unambiguous: where the model is, a hash of its weights' content, how it ran."""
    files = sorted(Path(llm.model_dir).glob("*.safetensors"))
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
    cfg = json.loads((Path(llm.model_dir) / "config.json").read_text())
    identity = {"path": str(Path(llm.model_dir).resolve()), "sha256": digest.hexdigest(), "dtype": llm.dtype,
                "quantization": cfg.get("quantization_config", {}).get("quant_method", "none"),
                "architecture": (cfg.get("architectures") or ["?"])[0]}
    source = _imported_from(files)
    if source:  # weights dequantized from a GGUF: say from which types
        identity["imported_from"] = source
    return identity


def _imported_from(files: list[Path]) -> dict | None:
    from safetensors import safe_open

    for f in files:
        with safe_open(f, "pt") as st:
            meta = (st.metadata() or {}).get("cairn_import")
        if meta:
            m = json.loads(meta)
            return {"format": m.get("format"), "file": m.get("file"), "tensor_types": m.get("tensor_types")}
    return None


def prefix_token(llm) -> int:
    """The token that precedes a text with no context: BOS, else EOS (as lm-evaluation-harness chooses)."""
    tok = llm.tokenizer
    for name in (tok.bos_token, tok.eos_token):
        if name is not None:
            return tok.token_id(name)
    cfg = llm.model_config
    if cfg.bos_token_id is not None:
        return cfg.bos_token_id
    if cfg.eos_token_ids:
        return cfg.eos_token_ids[0]
    raise UserError(f"{llm.model_dir} defines neither a BOS nor an EOS token to start a text with")


def _bar(total: int, unit: str, label: str, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=label, disable=not show, dynamic_ncols=True, file=sys.stderr)


def run_perplexity(llm, path: str, window: int, stride: int, show: bool) -> dict:
    texts = data.read_texts(path)
    encode = llm.tokenizer.encode
    total = sum(len(encode(t)) for t in texts)
    t0 = time.perf_counter()
    with _bar(total, "tok", f"perplexity {Path(path).name}", show) as bar:
        r = perplexity.perplexity(texts, encode, prefix_token(llm), llm.score, window, stride, bar.update)
    secs = time.perf_counter() - t0
    return {"task": "perplexity", "file": str(path), "window": window, "stride": stride, **r.as_dict(),
            "seconds": secs, "tokens_per_s": r.tokens / secs}


def _choice_requests(llm, use_chat: bool, shots: list, max_len: int) -> Callable:
    encode, prefix = llm.tokenizer.encode, prefix_token(llm)

    def requests(item):
        if use_chat:
            context = llm.tokenizer.apply_chat_template(choice.chat_messages(item, shots), add_generation_prompt=True)
            conts = item.choices
        else:
            context = choice.plain_context(item, shots)
            conts = [" " + c for c in item.choices]
        pairs = [choice.encode_pair(context, c, encode, prefix) for c in conts]
        # keep the last max_len tokens of a pair that does not fit, as the harness does
        return [(ctx[-(max_len - len(cont)):], cont) if len(ctx) + len(cont) > max_len else (ctx, cont)
                for ctx, cont in pairs]

    return requests


def run_choice(llm, path: str, fewshot: int, use_chat: bool, show: bool) -> dict:
    items = data.read_choice(path)
    shots, items = items[:fewshot], items[fewshot:]
    if not items:
        raise UserError(f"{path}: --fewshot {fewshot} leaves no item to evaluate")
    t0 = time.perf_counter()
    with _bar(len(items), "item", f"choice {Path(path).name}", show) as bar:
        r = choice.multiple_choice(items, _choice_requests(llm, use_chat, shots, llm.engine.max_context),
                                   llm.score_many, bar.update)
    secs = time.perf_counter() - t0
    return {"task": "choice", "file": str(path), "fewshot": fewshot, "chat": use_chat, **r.as_dict(),
            "seconds": secs, "items_per_s": len(items) / secs, "loglikelihoods": r.loglikelihoods}


def run_generate(llm, path: str, max_tokens: int, use_chat: bool, show: bool) -> dict:
    from cairn.config import SamplingParams

    items = data.read_generate(path)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    prompts = [llm.render_chat(it.messages) if it.messages is not None
               else llm.render_chat([{"role": "user", "content": it.prompt}]) if use_chat
               else llm.encode_prompt(it.prompt) for it in items]
    t0 = time.perf_counter()
    handles = [llm.submit(p, params) for p in prompts]  # all at once: the engine batches them
    outputs = []
    with _bar(len(items), "item", f"generate {Path(path).name}", show) as bar:
        for h in handles:
            outputs.append(h.result().text)
            bar.update(1)
    secs = time.perf_counter() - t0
    em = [generate.exact_match(o, it.answers) for o, it in zip(outputs, items)]
    co = [generate.contains(o, it.answers) for o, it in zip(outputs, items)]
    return {"task": "generate", "file": str(path), "chat": use_chat, "exact_match": sum(em) / len(items),
            "contains": sum(co) / len(items), "items": len(items), "seconds": secs,
            "outputs": [{"output": o, "exact_match": e, "contains": c} for o, e, c in zip(outputs, em, co)]}


HEADLINE = {"perplexity": ("perplexity", "bits_per_byte"), "choice": ("acc", "acc_norm"),
            "generate": ("exact_match", "contains")}


def _label(r: dict) -> str:
    return f"{r['task']} {Path(r['file']).name}"


def format_table(results: list[dict]) -> str:
    """One line per model and task with its headline metrics."""
    lines = []
    for res in results:
        m = res["model"]
        src = m.get("imported_from")
        origin = f", from {src['file']} ({', '.join(f'{n} {t}' for t, n in src['tensor_types'].items())})" if src else ""
        lines.append(f"{Path(m['path']).name} ({m['dtype']}, {m['quantization']}, sha256 {m['sha256'][:12]}{origin})")
        for r in res["tasks"]:
            a, b = HEADLINE[r["task"]]
            lines.append(f"  {_label(r):<40} {a} {r[a]:.4f}  {b} {r[b]:.4f}  ({r.get('tokens', r.get('items'))} "
                         f"{'tokens' if r['task'] == 'perplexity' else 'items'}, {r['seconds']:.1f}s)")
    return "\n".join(lines)


def format_compare(results: list[dict]) -> str:
    """Each task's headline metrics for every model side by side, with the difference from the first."""
    names = [f"{Path(r['model']['path']).name}@{r['model']['sha256'][:8]}" for r in results]
    tasks: dict[str, dict] = {}
    for i, res in enumerate(results):
        for r in res["tasks"]:
            tasks.setdefault(_label(r), {})[i] = r
    width = max(18, *(len(n) for n in names))
    lines = [f"{'task / metric':<44}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for label, by_model in tasks.items():
        task = next(iter(by_model.values()))["task"]
        for metric in HEADLINE[task]:
            cells = []
            base = by_model.get(0, {}).get(metric)
            for i in range(len(results)):
                v = by_model.get(i, {}).get(metric)
                if v is None:
                    cells.append("-")
                elif i == 0 or base is None:
                    cells.append(f"{v:.4f}")
                else:
                    cells.append(f"{v:.4f} ({v - base:+.4f})")
            lines.append(f"{label + ' / ' + metric:<44}" + "".join(f"{c:>{width + 2}}" for c in cells))
    return "\n".join(lines)


def load_results(path: str) -> dict:
    try:
        res = json.loads(Path(path).read_text())
        res["model"]["path"], res["tasks"]  # noqa: B018 (shape check)
        return res
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a result file of cairn eval") from None


def evaluate(llm, perplexity_files=(), choice_files=(), generate_files=(), window: int | None = None,
             stride: int | None = None, fewshot: int = 0, chat: bool = False, max_tokens: int = 64,
             show: bool = False) -> dict:
    """Every task on one loaded LLM; the result names the model unambiguously."""
    if not (perplexity_files or choice_files or generate_files):
        raise UserError("give at least one task: --perplexity FILE, --choice FILE or --generate FILE")
    window = window or min(2048, llm.engine.max_context)
    if window > llm.engine.max_context:
        raise UserError(f"--window {window} exceeds the context of {llm.engine.max_context} tokens")
    if window < 2:
        raise UserError(f"--window must be at least 2 tokens, got {window}")
    stride = stride or window // 2
    if not 1 <= stride < window:
        raise UserError(f"--stride must be at least 1 and below the window ({window}), got {stride}")
    tasks = [run_perplexity(llm, f, window, stride, show) for f in perplexity_files]
    tasks += [run_choice(llm, f, fewshot, chat, show) for f in choice_files]
    tasks += [run_generate(llm, f, max_tokens, chat, show) for f in generate_files]
    return {"model": model_identity(llm), "tasks": tasks}


def save(result: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
