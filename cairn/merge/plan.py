"""From a recipe and the inputs' headers to a plan: every output tensor, which input tensors it is merged from and
with which parameters, its shape and dtype; the output config.json; where the tokenizer comes from. Reads configs,
tokenizers and safetensors headers only, never weights.

As in mergekit, a `models:` recipe is one slice over all layers of every model (the base added when it is not
listed); output layer j of a slice is merged from layer start + j of each source; gradients are evaluated at
t = j / (n - 1) across a slice of n layers (t = 1 for a one-layer slice, t = 0 for tensors outside the layers);
embeddings come from the first slice's sources, the final norm and head from the last slice's."""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from cairn.errors import UserError
from cairn.merge.inputs import LAYER, Checkpoint, Reader, open_checkpoint
from cairn.merge.recipe import REQUIRED, MethodSpec, ParamSpec, Recipe, Setting, Slice, Source, same_model
from cairn.merge.vocab import VocabAlignment, build_alignment, check_same_tokenizer, vocab

HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"
"""A tied model has no head tensor: its embedding serves (mergekit's tied_names)."""

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}


@dataclass(frozen=True)
class InputTensor:
    """One input of an output tensor."""

    model: Path
    """The checkpoint directory it is read from."""
    name: str
    """Its name in that checkpoint."""
    params: Mapping[str, Any]
    """This input's parameters resolved for this tensor (weight, density, ...)."""


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor."""

    name: str
    """Its name in the output."""
    inputs: tuple[InputTensor, ...]
    """What it is merged from, in recipe order."""
    base_index: int | None
    """Which input is the base model (None: none is); methods without a base ignore it, vocabulary alignment
    still prefers its rows."""
    shared: Mapping[str, Any]
    """The method's shared parameters resolved for this tensor (t, normalize, lambda, ...)."""
    vocab: bool
    """True for vocabulary-indexed tensors (embeddings, head): rows are token ids."""
    shape: tuple[int, ...]
    """Its shape."""
    dtype: torch.dtype
    """The dtype it is written in."""

    @property
    def nbytes(self) -> int:
        """Its size on disk."""
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge writes, decided before any weight is read."""

    recipe: Recipe
    """What was asked for."""
    checkpoints: Mapping[Path, Checkpoint]
    """Every input, by directory."""
    tensors: tuple[TensorPlan, ...]
    """The output tensors, in output order."""
    config: Mapping[str, Any]
    """The output's config.json."""
    tokenizer_dir: Path
    """The model whose tokenizer files the output gets."""
    alignment: VocabAlignment | None
    """Row permutations of vocabulary-indexed tensors (None: all inputs share the tokenizer)."""
    input_dtype: torch.dtype | None
    """Inputs are cast to this before merging (the recipe's dtype)."""


def plan_merge(recipe: Recipe, reader: Reader) -> MergePlan:
    """Plan `recipe`: open every input's config and tensor index, check they fit together, resolve parameters."""
    ckpts = _open_all(recipe)
    slices = _normalized_slices(recipe, ckpts)
    donor = _donor(recipe, slices)
    align, tok_dir = _tokenizer(recipe, slices, ckpts, donor)
    entries = _tensor_entries(slices, ckpts)
    tensors = tuple(_tensor_plan(recipe, ckpts, reader, align, *e) for e in entries)
    config = _out_config(recipe, slices, ckpts, donor, tensors, align)
    return MergePlan(recipe, MappingProxyType(ckpts), tensors, MappingProxyType(config), tok_dir, align,
                     _dtype(recipe.dtype))


def _dtype(name: str | None) -> torch.dtype | None:
    return getattr(torch, name) if name else None


def _key(model: str) -> Path:
    return Path(os.path.normpath(Path(model).expanduser())).resolve()


def _open_all(recipe: Recipe) -> dict[Path, Checkpoint]:
    names = [s.model for s in recipe.models] + [s.model for sl in recipe.slices for s in sl.sources]
    names += [m for m in (recipe.base_model, *(sl.base_model for sl in recipe.slices)) if m]
    out: dict[Path, Checkpoint] = {}
    for name in names:
        if _key(name) not in out:
            out[_key(name)] = open_checkpoint(name)
    return out


def _normalized_slices(recipe: Recipe, ckpts: Mapping[Path, Checkpoint]) -> tuple[Slice, ...]:
    """The recipe as slices (a `models:` recipe is one slice over every layer), checked against the method."""
    if recipe.models:
        sources = list(recipe.models)
        if recipe.base_model and not any(same_model(s.model, recipe.base_model) for s in sources):
            sources.append(Source(recipe.base_model, None, MappingProxyType({})))
        counts = {s.model: len(ckpts[_key(s.model)].layers) for s in sources}
        if len(set(counts.values())) > 1:
            raise UserError(f"the models have different numbers of layers ({counts}); merge them with `slices:` "
                            "giving equal layer ranges", param="models")
        n = next(iter(counts.values()))
        slices = (Slice(tuple(Source(s.model, (0, n), s.parameters) for s in sources), None, MappingProxyType({})),)
    else:
        slices = recipe.slices
    for i, sl in enumerate(slices):
        _check_slice(recipe, sl, ckpts, f"slices[{i}]" if recipe.slices else "models")
    return slices


def _check_slice(recipe: Recipe, sl: Slice, ckpts: Mapping[Path, Checkpoint], where: str) -> None:
    method, base = recipe.method, sl.base_model or recipe.base_model
    keys = [_key(s.model) for s in sl.sources]
    if len(set(keys)) != len(keys):
        raise UserError(f"{where}: a model is listed twice among the inputs of one merge", param="models")
    for s in sl.sources:
        n = len(ckpts[_key(s.model)].layers)
        if s.layer_range[1] > n:
            raise UserError(f"{where}: layer_range {list(s.layer_range)} of {s.model} goes past its {n} layers",
                            param="layer_range")
    has_base = base is not None and any(same_model(s.model, base) for s in sl.sources)
    if method.needs_base and not has_base:
        what = f"base_model {base} is not among its inputs" if base else "it has no base_model"
        raise UserError(f"{where}: merge_method {method.name} needs a base model, but {what}", param="base_model")
    count = len(sl.sources)
    if count < method.min_inputs or (method.max_inputs is not None and count > method.max_inputs):
        limit = (f"exactly {method.min_inputs}" if method.min_inputs == method.max_inputs else
                 f"at most {method.max_inputs}" if method.max_inputs is not None else f"at least {method.min_inputs}")
        raise UserError(f"{where}: merge_method {method.name} takes {limit} input models (base included), got {count}"
                        f"{' (the base_model counts as an input)' if base else ''}", param="models")


def _donor(recipe: Recipe, slices: tuple[Slice, ...]) -> Path:
    """The model whose config.json the output starts from: the base, else the first input."""
    return _key(recipe.base_model or slices[0].sources[0].model)


def _tokenizer(recipe: Recipe, slices: tuple[Slice, ...], ckpts: Mapping[Path, Checkpoint], donor: Path
               ) -> tuple[VocabAlignment | None, Path]:
    """Check the inputs share a tokenizer (no tokenizer_source), or align them to the chosen one."""
    inputs = list(dict.fromkeys(_key(s.model) for sl in slices for s in sl.sources))
    if recipe.tokenizer_source is None:
        check_same_tokenizer(inputs)
        return None, donor
    target = donor if recipe.tokenizer_source == "base" else _key(recipe.tokenizer_source)
    if not target.is_dir():
        raise UserError(f"tokenizer_source {recipe.tokenizer_source} is not a directory; give `base` or the path of "
                        "a model directory holding tokenizer.json", param="tokenizer_source")
    size = ckpts[target].config.get("vocab_size") if recipe.tokenizer_source == "base" else None
    target_vocab = vocab(target, size)
    input_vocabs = {m: vocab(m, ckpts[m].config.get("vocab_size")) for m in inputs}
    return build_alignment(target_vocab, input_vocabs), target


def _tensor_entries(slices: tuple[Slice, ...], ckpts: Mapping[Path, Checkpoint]) -> list[tuple]:
    """(output name, slice, [input name per source], t) for every output tensor, in output order."""
    first, last = slices[0], slices[-1]
    pre = [n for n in _others(first, ckpts) if "embed" in n]
    post = [n for n in _others(last, ckpts) if "embed" not in n]
    out = [(n, first, _other_inputs(first, ckpts, n), 0.0) for n in pre]
    index = 0
    for sl in slices:
        n_layers = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for j in range(n_layers):
            t = j / (n_layers - 1) if n_layers > 1 else 1.0
            per_source = [ckpts[_key(s.model)].layers[s.layer_range[0] + j] for s in sl.sources]
            for rest in sorted(set().union(*per_source)):
                names = []
                for s, layer in zip(sl.sources, per_source):
                    if rest not in layer:
                        raise UserError(f"tensor {rest!r} of layer {s.layer_range[0] + j} is missing from {s.model} "
                                        "but present in another input; the models' architectures differ",
                                        param="models")
                    names.append(layer[rest])
                out.append((f"{LAYER.match(names[0])['prefix']}.{index}.{rest}", sl, names, t))
            index += 1
    out += [(n, last, _other_inputs(last, ckpts, n), 0.0) for n in post]
    return out


def _others(sl: Slice, ckpts: Mapping[Path, Checkpoint]) -> list[str]:
    """Names of the tensors outside the layers that any source of the slice has."""
    return sorted(set().union(*(ckpts[_key(s.model)].others for s in sl.sources)))


def _other_inputs(sl: Slice, ckpts: Mapping[Path, Checkpoint], name: str) -> list[str]:
    """The name to read `name` from in each source: itself, or the embedding for a tied model's head."""
    names = []
    for s in sl.sources:
        ck = ckpts[_key(s.model)]
        if name in ck.files:
            names.append(name)
        elif name == HEAD and ck.tied and EMBED in ck.files:
            names.append(EMBED)
        else:
            raise UserError(f"tensor {name!r} is missing from {s.model} but present in another input; the models' "
                            "architectures differ", param="models")
    return names


def _tensor_plan(recipe: Recipe, ckpts: Mapping[Path, Checkpoint], reader: Reader, align: VocabAlignment | None,
                 name: str, sl: Slice, input_names: list[str], t: float) -> TensorPlan:
    method = recipe.method
    base = sl.base_model or recipe.base_model
    base_index = next((i for i, s in enumerate(sl.sources) if same_model(s.model, base)), None)
    shared = {p.name: _resolve(p, (sl.parameters, recipe.parameters), name, t, method, None)
              for p in method.params if p.scope == "shared"}
    inputs = []
    for i, (s, in_name) in enumerate(zip(sl.sources, input_names)):
        params = {p.name: _resolve(p, (s.parameters, sl.parameters, recipe.parameters), in_name, t, method, s.model)
                  for p in method.params if p.scope == "input" or (p.scope == "non_base" and i != base_index)}
        inputs.append(InputTensor(_key(s.model), in_name, MappingProxyType(params)))
    is_vocab = name.endswith("embed_tokens.weight") or name == HEAD
    shapes = [reader.shape(ckpts[x.model], x.name) for x in inputs]
    if align is not None and is_vocab:
        shapes = [(align.size, *s[1:]) for s in shapes]
    if len(set(shapes)) > 1:
        listing = ", ".join(f"{x.model} {list(s)}" for x, s in zip(inputs, shapes))
        hint = " (set tokenizer_source to align vocabularies)" if is_vocab else ""
        raise UserError(f"tensor {name!r} has different shapes across the inputs: {listing}{hint}", param="models")
    dtypes = [reader.dtype(ckpts[x.model], x.name) for x in inputs]
    if not dtypes[0].is_floating_point:
        dtype = dtypes[0]  # an integer buffer is copied, never merged
    elif recipe.out_dtype or recipe.dtype:
        dtype = _dtype(recipe.out_dtype or recipe.dtype)
    else:
        dtype = functools.reduce(torch.promote_types, dtypes)
    return TensorPlan(name, tuple(inputs), base_index, MappingProxyType(shared), is_vocab, shapes[0], dtype)


def _resolve(p: ParamSpec, scopes: tuple[Mapping[str, Setting], ...], tensor: str, t: float, method: MethodSpec,
             model: str | None) -> Any:
    """A parameter's value for one tensor: the first scope whose setting matches it, else the default."""
    for scope in scopes:
        if p.name in scope:
            value = scope[p.name].resolve(tensor, t)
            if value is not None:
                return value
    if p.default is REQUIRED:
        who = f" of {model}" if model else ""
        raise UserError(f"merge_method {method.name} needs parameter {p.name!r}{who} for tensor {tensor!r}; set it "
                        "in that model's `parameters:` or the top-level `parameters:`", param=p.name)
    return p.default


def _out_config(recipe: Recipe, slices: tuple[Slice, ...], ckpts: Mapping[Path, Checkpoint], donor: Path,
                tensors: tuple[TensorPlan, ...], align: VocabAlignment | None) -> dict:
    """The donor's config.json with the layer count (and per-layer lists), dtype, vocabulary size and tying of the
    output."""
    cfg = copy.deepcopy(dict(ckpts[donor].config))
    layer_sources = [(s0, s0.layer_range[0] + j) for sl in slices for s0 in sl.sources[:1]
                     for j in range(s0.layer_range[1] - s0.layer_range[0])]
    cfg["num_hidden_layers"] = len(layer_sources)
    per_layer = [ckpts[_key(s.model)].config.get("layer_types") for s, _ in layer_sources]
    if all(isinstance(types, list) for types in per_layer) and per_layer:  # e.g. sliding / full attention per layer
        cfg["layer_types"] = [types[i] for types, (_, i) in zip(per_layer, layer_sources)]
    floats = [tp.dtype for tp in tensors if tp.dtype.is_floating_point]
    if floats:
        cfg["dtype" if "dtype" in cfg and "torch_dtype" not in cfg else "torch_dtype"] = DTYPE_NAMES[floats[0]]
    if align is not None:
        cfg["vocab_size"] = align.size
    if any(tp.name == HEAD for tp in tensors):
        cfg["tie_word_embeddings"] = False
    return cfg
