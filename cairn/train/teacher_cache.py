"""The offline teacher cache: for each synthetic record, its token ids and the teacher's top-K logprobs at every
position, so a student can be distilled later without the teacher in memory.

A cache is a directory of safetensors shards (written whole, then renamed into place, so a killed writer leaves no
partial shard). Each record `key` has three tensors: `key/ids` (n,) int32, the record as the trainer renders it;
`key/top_ids` (n - 1, K) int32 and `key/top_logprobs` (n - 1, K) float16, where row i is the teacher's top-K for the
token after ids[:i + 1]. Shard metadata says the teacher and K. A key written twice (a resumed run redoing a
record) is read from its newest shard."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cairn.errors import UserError
from cairn.train.distill import SparseTeacher


def write_shard(cache_dir: str | Path, entries: dict[str, tuple[list[int], SparseTeacher]],
                teacher: str) -> Path | None:
    """One shard with `entries` (key -> (ids, top-K of positions 0..n-2)); None when there is nothing to write."""
    if not entries:
        return None
    d = Path(cache_dir)
    d.mkdir(parents=True, exist_ok=True)
    k = {t.ids.shape[-1] for _, t in entries.values()}
    if len(k) != 1:
        raise ValueError(f"one shard holds one K, got {sorted(k)}")
    tensors = {}
    for key, (ids, top) in entries.items():
        if top.ids.shape[0] != len(ids) - 1:
            raise ValueError(f"{key}: {top.ids.shape[0]} rows of top-K for {len(ids)} tokens (want n - 1)")
        tensors[f"{key}/ids"] = torch.tensor(ids, dtype=torch.int32)
        tensors[f"{key}/top_ids"] = top.ids.to(torch.int32).contiguous()
        tensors[f"{key}/top_logprobs"] = top.logprobs.to(torch.float16).contiguous()
    n = len(list(d.glob("shard-*.safetensors")))
    while (path := d / f"shard-{n:06d}.safetensors").exists():
        n += 1
    tmp = d / f".{path.name}.tmp"
    save_file(tensors, str(tmp), metadata={"teacher": teacher, "k": str(k.pop()), "format": "cairn-teacher-topk-1"})
    os.replace(tmp, path)
    return path


class TeacherCache:
    """Every record of a cache directory, in memory (a few tens of MB for thousands of records at K = 20)."""

    def __init__(self, cache_dir: str | Path):
        d = Path(cache_dir)
        shards = sorted(d.glob("shard-*.safetensors"))
        if not d.is_dir() or not shards:
            raise UserError(f"{d} is not a teacher cache (no shard-*.safetensors; `cairn synth --save-logits K` "
                            "writes one beside its output)", param="teacher_logits")
        self.path, self.k, self.teacher = d, None, None
        self.records: dict[str, tuple[list[int], SparseTeacher]] = {}
        for shard in shards:
            try:
                with safe_open(str(shard), framework="pt") as f:
                    meta = f.metadata() or {}
                    if meta.get("format") != "cairn-teacher-topk-1":
                        raise UserError(f"{shard} is not a cairn teacher-cache shard", param="teacher_logits")
                    k = int(meta["k"])
                    if self.k is not None and k != self.k:
                        raise UserError(f"{d}: shards with different K ({self.k} and {k}); write one cache per K",
                                        param="teacher_logits")
                    self.k, self.teacher = k, meta.get("teacher")
                    keys = {name.rsplit("/", 1)[0] for name in f.keys()}
                    for key in keys:
                        self.records[key] = (f.get_tensor(f"{key}/ids").tolist(),
                                             SparseTeacher(f.get_tensor(f"{key}/top_ids"),
                                                           f.get_tensor(f"{key}/top_logprobs")))
            except (OSError, ValueError, KeyError, SafetensorError) as e:
                raise UserError(f"{shard} is damaged or not a safetensors file ({e})", param="teacher_logits") from None

    def __len__(self) -> int:
        return len(self.records)

    def lookup(self, key: str | None, ids: list[int], where: str) -> SparseTeacher:
        """The teacher's top-K for a training sequence: the cached record must be this sequence (or begin with it,
        when the trainer truncated it); rows 0..len(ids)-2."""
        if key is None or key not in self.records:
            raise UserError(f"{where}: record {key!r} is not in the teacher cache {self.path} (a record needs the "
                            '"id" that `cairn synth` wrote, and the cache written with it)', param="teacher_logits")
        cached, top = self.records[key]
        if cached[: len(ids)] != ids:
            raise UserError(f"{where}: record {key!r} renders to other tokens than the cache holds: the cache was "
                            "written with another tokenizer or chat template than the student's",
                            param="teacher_logits")
        n = len(ids) - 1
        return SparseTeacher(top.ids[:n], top.logprobs[:n].float())


def sparse_batch(tops: list[SparseTeacher], T: int) -> SparseTeacher:
    """Per-example top-K rows, right-padded to (B, T, K) like `collate` pads the tokens (padding rows are never
    targets)."""
    K = tops[0].ids.shape[-1]
    ids = torch.zeros(len(tops), T, K, dtype=torch.int32)
    logprobs = torch.zeros(len(tops), T, K)
    for b, t in enumerate(tops):
        ids[b, : t.ids.shape[0]] = t.ids
        logprobs[b, : t.ids.shape[0]] = t.logprobs
    return SparseTeacher(ids, logprobs)
