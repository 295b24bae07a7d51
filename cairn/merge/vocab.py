"""Tokenizers of a merge: check the inputs agree, or align vocabulary-indexed tensors to one chosen tokenizer.

Without `tokenizer_source`, every input must carry the same tokenizer (row i of every embedding means the same
token). With it, the output keeps that tokenizer, and each input's embedding / head rows are permuted to its
vocabulary before merging (mergekit's rule for a token an input lacks: the base model's row when the base has it,
the one row when only one input has it, else the mean of the inputs that have it; zeros when none has it)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cairn.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
"""Files whose content defines what a token id means (compared across inputs)."""

COPIED_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
"""Files copied from the tokenizer donor into the merged model."""


def _fingerprint(model_dir: Path) -> tuple:
    """What makes two tokenizers the same: tokenizer.json's content (parsed, so formatting does not matter) and
    tokenizer.model's bytes."""
    out = []
    for name in TOKENIZER_FILES:
        p = model_dir / name
        if not p.is_file():
            out.append(None)
        elif name.endswith(".json"):
            try:
                out.append(json.dumps(json.loads(p.read_text(encoding="utf-8")), sort_keys=True))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{p} is not valid JSON ({e}); fix or re-download the tokenizer") from None
        else:
            out.append(p.read_bytes())
    return tuple(out)


def check_same_tokenizer(model_dirs: Sequence[Path]) -> None:
    """Refuse inputs whose tokenizers differ: their embedding rows would mean different tokens."""
    first = _fingerprint(model_dirs[0])
    for other in model_dirs[1:]:
        if _fingerprint(other) != first:
            raise UserError(
                f"the tokenizers of {model_dirs[0]} and {other} differ (tokenizer.json / tokenizer.model), so row i of "
                "their embeddings is not the same token; set `tokenizer_source: base` (or the path of the model "
                "whose tokenizer to keep) to align the embeddings to one vocabulary", param="tokenizer_source")


def vocab(model_dir: Path, vocab_size: int | None = None) -> dict[str, int]:
    """token -> id of a model's tokenizer.json (added tokens included); ids >= vocab_size (tokens with no
    embedding row) left out."""
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path} is missing; aligning vocabularies (tokenizer_source) needs a tokenizer.json in "
                        "every input", param="tokenizer_source")
    try:
        v = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception for a bad file)
        raise UserError(f"{path} cannot be read as a tokenizer ({e})", param="tokenizer_source") from None
    return {tok: i for tok, i in v.items() if vocab_size is None or i < vocab_size}


@dataclass(frozen=True)
class VocabAlignment:
    """Where each row of the output's vocabulary-indexed tensors comes from, per input model."""

    size: int
    """Rows of the output (the chosen tokenizer's vocabulary size)."""
    rows: Mapping[Path, tuple[int, ...]]
    """Per input model: for each output token id, its row in that model (-1: the model lacks the token)."""


def build_alignment(target: Mapping[str, int], inputs: Mapping[Path, Mapping[str, int]]) -> VocabAlignment:
    """The alignment of each input's vocabulary to `target` (token -> output id)."""
    size = len(target)
    if any(i >= size or i < 0 for i in target.values()):
        raise UserError(f"the chosen tokenizer's ids are not 0..{size - 1} without gaps; cairn cannot align to it",
                        param="tokenizer_source")
    rows = {}
    for model, v in inputs.items():
        r = [-1] * size
        for tok, i in target.items():
            r[i] = v.get(tok, -1)
        rows[model] = tuple(r)
    return VocabAlignment(size, rows)


def align_rows(tensors: Sequence[torch.Tensor], rows: Sequence[Sequence[int]], base_index: int | None
               ) -> list[torch.Tensor]:
    """Permute each input's rows (dim 0) to the output vocabulary; rows[i][t] is input i's row for output token t
    (-1: missing, filled by mergekit's rule: the base's row, else the only input's row, else the mean, else 0)."""
    index = torch.tensor([list(r) for r in rows], dtype=torch.long)  # (M, V) source row per output token
    present = index >= 0  # (M, V)
    out = [x[index[i].clamp(min=0)] for i, x in enumerate(tensors)]  # each (V, *rest)
    for tok in torch.nonzero(~present.all(dim=0)).flatten().tolist():
        have = [i for i in range(len(tensors)) if present[i, tok]]
        if not have:
            fill = torch.zeros_like(out[0][tok])
        elif len(have) == 1:
            fill = out[have[0]][tok]
        elif base_index is not None and base_index in have:
            fill = out[base_index][tok]
        else:
            fill = sum(out[i][tok] for i in have) / len(have)
        for i in range(len(tensors)):
            if not present[i, tok]:
                out[i][tok] = fill
    return out
