"""Training data: read files, check every record before any compute, tokenize into examples, batch.

An Example is a token sequence plus a target mask: inputs are ids[:-1], and position t is trained to predict
ids[t + 1] when mask[t + 1] is set. Pretraining packs documents (EOS between them) into fixed-length blocks; SFT
renders conversations with the checkpoint's chat template and marks only assistant tokens; DPO pairs a chosen
and a rejected continuation of the same prompt."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cairn.errors import UserError
from cairn.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class Example:
    ids: list[int]
    """Tokens, inputs and targets together."""
    mask: list[bool]
    """mask[t]: ids[t] is a target (predicted from ids[:t])."""
    key: str | None = None
    """The record's "id" (what a teacher cache is keyed by), when it has one."""
    where: str = ""
    """file:line of the record, for messages."""


@dataclass(frozen=True)
class Pair:
    chosen: Example
    rejected: Example


@dataclass
class DataStats:
    records: int = 0
    bad_lines: int = 0
    truncated: int = 0
    dropped: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class Datasets:
    train: list
    eval: list
    stats: DataStats


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor
    """(B, T) token ids, right-padded with 0."""
    labels: torch.Tensor
    """(B, T) next-token targets, -100 where nothing is predicted."""
    tokens: int
    """Real (non-pad) input tokens."""


class _Skip(Exception):
    """A record that is malformed: skipped with --skip-bad-lines, fatal otherwise."""


def read_records(paths: tuple[str, ...], skip_bad: bool, stats: DataStats, allow_text: bool) -> list[tuple[str, dict]]:
    """(file:line, record) for every JSONL line; a .txt file (pretrain) is one record {"text": whole file}."""
    out: list[tuple[str, dict]] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise UserError(f"data file {path} does not exist")
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix not in (".jsonl", ".json"):
            if not allow_text:
                raise UserError(f"{path}: this recipe reads JSONL files (one JSON object per line)")
            if text.strip():
                out.append((str(path), {"text": text}))
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                _bad(where, f"malformed JSON ({e})", skip_bad, stats)
                continue
            out.append((where, rec))
    return out


def _bad(where: str, why: str, skip_bad: bool, stats: DataStats) -> None:
    if not skip_bad:
        raise UserError(f"{where}: {why} (fix the line or pass --skip-bad-lines)")
    stats.bad_lines += 1


def document_separator(tok: Tokenizer, eos_ids: tuple[int, ...]) -> int:
    """The token put between packed documents: an end-of-text token if the vocabulary has one."""
    for name in ("<|endoftext|>", "</s>", "<|end_of_text|>"):
        if (i := tok.token_id(name)) is not None:
            return i
    if (i := tok.token_id(tok.eos_token)) is not None:
        return i
    if eos_ids:
        return eos_ids[0]
    raise UserError("the tokenizer has no end-of-text token to separate documents")


# --- pretrain ---------------------------------------------------------------------------------------------------


def pretrain_examples(records: list[tuple[str, dict]], tok: Tokenizer, sep: int, seq_len: int,
                      skip_bad: bool, stats: DataStats) -> list[Example]:
    """Documents -> one token stream (separator after each) -> blocks of seq_len + 1 tokens overlapping by one."""
    stream: list[int] = []
    for where, rec in records:
        text = rec.get("text")
        if not isinstance(text, str):
            _bad(where, 'expected a "text" string field', skip_bad, stats)
            continue
        if text.strip():
            stream.extend(tok.encode(text))
            stream.append(sep)
            stats.records += 1
    blocks = [stream[i : i + seq_len + 1] for i in range(0, max(len(stream) - 1, 0), seq_len)]
    return [Example(b, [False] + [True] * (len(b) - 1)) for b in blocks if len(b) >= 2]


# --- sft / dpo ----------------------------------------------------------------------------------------------------


def _messages(where: str, value, what: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _Skip(f'"{what}" must be a non-empty list of messages')
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _Skip(f'every message in "{what}" needs string "role" and "content"')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def sft_messages(rec: dict, where: str) -> list[dict]:
    """Chat records ({"messages": [...]}) or alpaca records (instruction / input / output)."""
    if "messages" in rec:
        msgs = _messages(where, rec["messages"], "messages")
    elif "instruction" in rec and "output" in rec:
        if not all(isinstance(rec.get(k, ""), str) for k in ("instruction", "input", "output", "system")):
            raise _Skip("instruction, input and output must be strings")
        prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]
        if rec.get("system"):
            msgs.insert(0, {"role": "system", "content": rec["system"]})
    else:
        raise _Skip('expected "messages" (chat) or "instruction" and "output" (alpaca)')
    if not any(m["role"] == "assistant" for m in msgs):
        raise _Skip("no assistant message to learn from")
    return msgs


def render_masked(tok: Tokenizer, msgs: list[dict], first_target: int = 0) -> Example:
    """Render a conversation with the chat template; targets are the tokens of assistant messages at index
    >= first_target (their content and end-of-turn marker), located through character offsets."""
    full = tok.apply_chat_template(msgs, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or i < first_target:
            continue
        before = tok.apply_chat_template(msgs[:i], add_generation_prompt=True) if i else ""
        upto = tok.apply_chat_template(msgs[: i + 1], add_generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise UserError("the chat template does not render conversations as growing prefixes, so assistant "
                            "tokens cannot be located; use a template where each turn appends to the text")
        spans.append((len(before), len(upto)))
    ids, offsets = tok.encode_with_offsets(full)
    mask = [any(a <= start < b for a, b in spans) for start, _ in offsets]
    return Example(ids, mask)


def _fit(ex: Example, seq_len: int, where: str, too_long: str, stats: DataStats) -> Example | None:
    """Truncate (or refuse) sequences longer than seq_len + 1 tokens; None when no target is left."""
    if len(ex.ids) > seq_len + 1:
        if too_long == "refuse":
            raise UserError(f"{where}: {len(ex.ids) - 1} tokens is longer than seq_len {seq_len} "
                            "(raise seq_len or set too_long: truncate)")
        ex = Example(ex.ids[: seq_len + 1], ex.mask[: seq_len + 1], ex.key, ex.where)
        stats.truncated += 1
    if not any(ex.mask[1:]):
        stats.dropped += 1
        return None
    return ex


def sft_examples(records, tok: Tokenizer, seq_len: int, too_long: str, skip_bad: bool,
                 stats: DataStats) -> list[Example]:
    out = []
    for where, rec in records:
        try:
            msgs = sft_messages(rec, where)
        except _Skip as e:
            _bad(where, str(e), skip_bad, stats)
            continue
        stats.records += 1
        ex = _fit(render_masked(tok, msgs), seq_len, where, too_long, stats)
        if ex is not None:
            key = rec.get("id")
            out.append(Example(ex.ids, ex.mask, key if isinstance(key, str) else None, where))
    return out


def _response(value, what: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    msgs = _messages("", value, what)
    if msgs[-1]["role"] != "assistant":
        raise _Skip(f'"{what}" must end with an assistant message')
    return msgs


def dpo_pairs(records, tok: Tokenizer, seq_len: int, too_long: str, skip_bad: bool, stats: DataStats) -> list[Pair]:
    out = []
    for where, rec in records:
        try:
            if isinstance(rec.get("prompt"), str):
                prompt = [{"role": "user", "content": rec["prompt"]}]
            elif "messages" in rec:
                prompt = _messages(where, rec["messages"], "messages")
            else:
                raise _Skip('expected a "prompt" string or a "messages" list')
            if "chosen" not in rec or "rejected" not in rec:
                raise _Skip('expected "chosen" and "rejected"')
            chosen, rejected = _response(rec["chosen"], "chosen"), _response(rec["rejected"], "rejected")
        except _Skip as e:
            _bad(where, str(e), skip_bad, stats)
            continue
        stats.records += 1
        c = _fit(render_masked(tok, prompt + chosen, len(prompt)), seq_len, where, too_long, stats)
        r = _fit(render_masked(tok, prompt + rejected, len(prompt)), seq_len, where, too_long, stats)
        if c is not None and r is not None:
            out.append(Pair(c, r))
    return out


def is_text(paths: tuple[str, ...], records: list[tuple[str, dict]]) -> bool:
    """distill reads text (.txt files, or JSONL whose records are all {"text": ...}) like pretrain and chat or
    alpaca JSONL like sft."""
    if all(Path(p).suffix not in (".jsonl", ".json") for p in paths):
        return True
    return bool(records) and all("text" in r and "messages" not in r and "instruction" not in r for _, r in records)


# --- assembly -----------------------------------------------------------------------------------------------------


def build_datasets(cfg, tok: Tokenizer, eos_ids: tuple[int, ...]) -> Datasets:
    """Read, validate and tokenize the train (and eval) data of a TrainConfig; errors before any compute."""
    stats = DataStats()

    def load(paths: tuple[str, ...]) -> list:
        records = read_records(paths, cfg.skip_bad_lines, stats, allow_text=cfg.recipe in ("pretrain", "distill"))
        text = cfg.recipe == "pretrain" or (cfg.recipe == "distill" and is_text(paths, records))
        if text:
            if cfg.recipe == "distill" and cfg.teacher_logits is not None:
                raise UserError("a teacher cache covers the chat records `cairn synth` wrote; distil from text with "
                                "the teacher itself (teacher)", param="teacher_logits")
            return pretrain_examples(records, tok, document_separator(tok, eos_ids), cfg.seq_len,
                                     cfg.skip_bad_lines, stats)
        if not tok.chat_template:
            raise UserError(f"{cfg.model} has no chat template (tokenizer_config.json: chat_template), which "
                            f"{cfg.recipe} needs to render conversations")
        fn = dpo_pairs if cfg.recipe == "dpo" else sft_examples
        return fn(records, tok, cfg.seq_len, cfg.too_long, cfg.skip_bad_lines, stats)

    train = load(cfg.data)
    if not train:
        raise UserError(f"no training examples in {', '.join(cfg.data)} (empty files, or every record was "
                        "skipped or had nothing to learn)")
    if cfg.eval_data:
        held = load(cfg.eval_data)
        if not held:
            raise UserError(f"no eval examples in {', '.join(cfg.eval_data)}")
    elif cfg.eval_fraction > 0 and len(train) >= 2:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + 7919)).tolist()
        n_eval = min(max(1, math.ceil(cfg.eval_fraction * len(train))), len(train) - 1)
        keep = set(order[n_eval:])
        held = [train[i] for i in sorted(order[:n_eval])]
        train = [train[i] for i in range(len(train)) if i in keep]
    else:
        held = []
    if stats.truncated:
        stats.warnings.append(f"{stats.truncated} sequence(s) longer than seq_len {cfg.seq_len} were truncated")
    if stats.dropped:
        stats.warnings.append(f"{stats.dropped} record(s) had no target tokens left after truncation and were dropped")
    if stats.bad_lines:
        stats.warnings.append(f"{stats.bad_lines} malformed line(s) skipped")
    return Datasets(train, held, stats)


def collate(examples: list[Example]) -> Batch:
    """Right-pad to the longest sequence; causal attention never lets a real token see the padding after it."""
    T = max(len(e.ids) for e in examples) - 1
    inputs = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    tokens = 0
    for b, e in enumerate(examples):
        n = len(e.ids) - 1
        ids = torch.tensor(e.ids)
        inputs[b, :n] = ids[:-1]
        target = torch.tensor(e.mask[1:])
        labels[b, :n] = torch.where(target, ids[1:], -100)
        tokens += n
    return Batch(inputs, labels, tokens)


def micro_batch_indices(n: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Example indices of global micro-batch `index`: a fresh seeded permutation each epoch, last partial batch
    dropped (unless the set is smaller than one batch). A pure function of its inputs, so resuming is exact."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(index, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    return perm[pos * batch_size : (pos + 1) * batch_size]


def batches_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)
