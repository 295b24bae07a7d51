"""Run a merge tensor by tensor: read the few input tensors an output tensor needs, merge them, add the result to
the current shard, write each shard when full. Memory holds one shard of outputs plus one tensor's inputs, never a
whole model. Each shard records the recipe, method and seed in its metadata ("cairn_merge"); a rerun into the same
directory keeps the shards already written for the same recipe and seed, so an interrupted merge resumes."""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cairn.errors import UserError
from cairn.fsutil import atomic_write, atomic_write_json
from cairn.merge import methods
from cairn.merge.inputs import Reader
from cairn.merge.plan import MergePlan, TensorPlan, plan_merge
from cairn.merge.recipe import Recipe, load_recipe
from cairn.merge.vocab import COPIED_FILES, align_rows
from cairn.models.checkpoint import INDEX_FILE, SINGLE_FILE, copy_side_files

METADATA_KEY = "cairn_merge"
"""The safetensors metadata key holding {"method", "recipe" (YAML text), "seed"}."""

DEFAULT_SHARD_BYTES = 1 << 30
"""Shards are cut before they pass this size (1 GiB)."""


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote."""

    out_dir: Path
    """The output checkpoint directory."""
    method: str
    """The merge method."""
    tensors: int
    """Tensors written."""
    layers: int
    """Layers of the output model."""
    shards: int
    """safetensors files written or kept."""
    resumed_shards: int
    """Shards kept from an earlier, interrupted run of the same recipe."""
    seed: int | None
    """The seed of the random drops (dare methods; None for deterministic methods)."""
    seconds: float
    """Wall time."""


def merge(recipe: Recipe | str | Path, out_dir: str | Path, seed: int | None = None, progress: bool = False,
          shard_bytes: int = DEFAULT_SHARD_BYTES) -> MergeResult:
    """Merge the models of a mergekit recipe (a Recipe, or the path of its YAML file) into a Hugging Face
    checkpoint in out_dir: safetensors shards (with model.safetensors.index.json when several), config.json and
    the tokenizer files. seed: for the random drops of dare_* (None: a fresh seed, or the one an interrupted run
    into out_dir recorded)."""
    start = time.perf_counter()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    out_dir = Path(out_dir)
    if shard_bytes <= 0:
        raise UserError(f"shard size must be positive, got {shard_bytes}", param="shard_bytes")
    with Reader() as reader:
        plan = plan_merge(recipe, reader)
        if out_dir.resolve() in plan.checkpoints or out_dir.resolve() == plan.tokenizer_dir:
            raise UserError(f"output directory {out_dir} is one of the merge's inputs; choose another --out",
                            param="out")
        if recipe.method.random:
            seed = seed if seed is not None else _previous_seed(out_dir, recipe)
            seed = seed if seed is not None else secrets.randbits(63)
        else:
            seed = None
        meta = {"format": "pt", METADATA_KEY: json.dumps({"method": recipe.merge_method, "recipe": recipe.text,
                                                          "seed": seed})}
        shards = _shards(plan.tensors, shard_bytes)
        names = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale(out_dir, names)
        kept = _write_shards(plan, reader, shards, names, out_dir, meta, seed, progress)
    if len(shards) > 1:
        atomic_write_json(out_dir / INDEX_FILE, {
            "metadata": {"total_size": sum(tp.nbytes for tp in plan.tensors)},
            "weight_map": {tp.name: name for name, shard in zip(names, shards) for tp in shard},
        })
    atomic_write_json(out_dir / "config.json", dict(plan.config))
    copy_side_files(plan.tokenizer_dir, out_dir, COPIED_FILES)
    return MergeResult(out_dir, recipe.merge_method, len(plan.tensors), int(plan.config["num_hidden_layers"]),
                       len(shards), kept, seed, time.perf_counter() - start)


def merge_tensor(plan: MergePlan, tp: TensorPlan, reader: Reader, seed: int | None = None) -> torch.Tensor:
    """Read the inputs of one output tensor and merge them: cast to the recipe's dtype (else to the inputs' common
    promoted dtype), align vocabulary rows, apply the method, cast to the output dtype."""
    xs = [reader.read(plan.checkpoints[x.model], x.name) for x in tp.inputs]
    if not xs[0].is_floating_point():
        if any(not torch.equal(xs[0], x) for x in xs[1:]):
            raise UserError(f"non-floating tensor {tp.name!r} differs across the inputs and cannot be merged",
                            param="models")
        return xs[0].contiguous()
    dtype = plan.input_dtype or functools.reduce(torch.promote_types, [x.dtype for x in xs])
    xs = [x.to(dtype) for x in xs]
    if tp.vocab and plan.alignment is not None:
        xs = align_rows(xs, [plan.alignment.rows[x.model] for x in tp.inputs], tp.base_index)
    method = plan.recipe.method
    gen = torch.Generator().manual_seed(tensor_seed(seed, tp.name)) if method.random else None
    out = methods.apply(method, xs, tp.base_index, tp.shared, [x.params for x in tp.inputs], gen)
    return out.to(tp.dtype).contiguous()


def tensor_seed(seed: int | None, name: str) -> int:
    """The seed of one tensor's random drops: derived from the merge seed and the tensor name, so a tensor's
    result does not depend on the order tensors are merged in (and a resumed merge matches an uninterrupted one)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _shards(tensors: tuple[TensorPlan, ...], shard_bytes: int) -> list[list[TensorPlan]]:
    """Output tensors cut into consecutive shards of at most shard_bytes (a larger tensor gets a shard alone)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for tp in tensors:
        if shards[-1] and size + tp.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tp)
        size += tp.nbytes
    return shards


def _write_shards(plan: MergePlan, reader: Reader, shards: list[list[TensorPlan]], names: list[str], out_dir: Path,
                  meta: dict[str, str], seed: int | None, progress: bool) -> int:
    """Merge and write every shard not already written by an earlier run with the same metadata; returns how many
    were kept."""
    from tqdm import tqdm

    kept = 0
    with tqdm(total=len(plan.tensors), disable=not progress, unit="tensor", file=sys.stderr,
              desc=f"merge ({plan.recipe.merge_method})") as bar:
        for name, shard in zip(names, shards):
            path = out_dir / name
            if _already_written(path, meta, [tp.name for tp in shard]):
                kept += 1
                bar.update(len(shard))
                continue
            out: dict[str, torch.Tensor] = {}
            for tp in shard:
                out[tp.name] = merge_tensor(plan, tp, reader, seed)
                bar.update(1)
            atomic_write(path, lambda tmp, out=out: save_file(out, str(tmp), metadata=meta))
            del out
    return kept


def _already_written(path: Path, meta: dict[str, str], names: list[str]) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}) == meta and set(f.keys()) == set(names)
    except SafetensorError:
        return False


def _previous_seed(out_dir: Path, recipe: Recipe) -> int | None:
    """The seed an earlier (interrupted) run of the same recipe into out_dir used, if any."""
    for path in sorted(out_dir.glob("model*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
        except (SafetensorError, json.JSONDecodeError):
            continue
        if info.get("recipe") == recipe.text and info.get("method") == recipe.merge_method:
            return info.get("seed")
    return None


def _remove_stale(out_dir: Path, names: list[str]) -> None:
    """Remove weight files of an earlier merge with another shard layout (they would be read with the new ones)."""
    stale = [out_dir / SINGLE_FILE, out_dir / INDEX_FILE, *out_dir.glob("model-*-of-*.safetensors")]
    for p in stale:
        if p.name not in names:
            p.unlink(missing_ok=True)
