"""The search space of a merge recipe: which numbers of a mergekit YAML recipe an evolutionary search may change,
and the map between a gene vector (each gene in [0, 1]) and a recipe. Pure: reads model configs only to learn layer
counts, never weights.

Parameter space (every method but passthrough): each number the recipe writes for a searchable parameter is one
dimension, wherever it is written (a model's, a slice's, a source's or the top-level `parameters:`). A gradient
`weight: [0, 0.5, 1]` is one dimension per entry; a `[{filter, value}, ...]` list one per number in its values.
Parameters the recipe leaves to their defaults are not searched: write one (its value is the starting point) to
search it. A gene g maps linearly onto the parameter's bounds, value = low + g * (high - low), rounded to
DECIMALS places so that the written recipe reproduces the merged model exactly. Default bounds (DEFAULT_BOUNDS):
weight [0, 1], density [0.05, 1], t [0, 1], lambda [0, 2], gamma [0, 0.2], epsilon [0, 0.2]; a recipe value
outside them widens them to include it, and `bounds` overrides them by parameter name (e.g. weight (-1, 2)).

Data flow space (passthrough recipes with `slices:`, i.e. layer stacking): the starting recipe's output layers are
slots, slot k reading layer l_k of some model. For each slot, one gene chooses which model layer l_k is read from,
among the models named anywhere in the recipe's slices that have a layer l_k: the choices split [0, 1] into equal
parts, in order of first appearance in the recipe (gene g picks choice floor(g * n)). With `skip_layers`, a second
gene per slot keeps the slot when >= 0.5 and drops it otherwise (at least one slot is always kept: the one whose
gene is highest). Layer order and indices stay those of the starting recipe; consecutive slots that read
consecutive layers of one model from the same original slice are written as one slice."""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import yaml

from cairn.errors import UserError
from cairn.merge.recipe import METHODS, Recipe, load_recipe, parse_recipe

DEFAULT_BOUNDS: Mapping[str, tuple[float, float]] = MappingProxyType({
    "weight": (0.0, 1.0), "density": (0.05, 1.0), "t": (0.0, 1.0), "lambda": (0.0, 2.0), "gamma": (0.0, 0.2),
    "epsilon": (0.0, 0.2)})
"""Search bounds of each searchable parameter (epsilon is mergekit's della parameter, for recipes that have it)."""

DECIMALS = 6
"""Decimal places parameter values are rounded to (in the merge and in the written recipe alike)."""

KEEP, DROP = 0.75, 0.25
"""The genes that stand for a kept and a dropped layer slot."""

Path_ = tuple[str | int, ...]
"""A place in the YAML document: keys and list indices from the top."""


@dataclass(frozen=True)
class Dim:
    """One dimension of the search space (one gene)."""

    name: str
    """How it is shown and recorded: its place in the recipe (`models[1].parameters.weight[2]`) or
    `slots[k].model` / `slots[k].keep` in the data flow space."""
    kind: str
    """"value" (a number of the recipe), "source" (which model a layer slot reads) or "keep" (whether it is kept)."""
    path: Path_ = ()
    """Where a "value" is written in the YAML document (empty for data flow genes)."""
    low: float = 0.0
    """The value gene 0 stands for ("value" dims)."""
    high: float = 1.0
    """The value gene 1 stands for ("value" dims)."""
    choices: tuple[str, ...] = ()
    """The models a "source" gene chooses among, in order."""
    slot: int = -1
    """The layer slot a data flow gene belongs to."""


@dataclass(frozen=True)
class Slot:
    """One output layer of the starting passthrough recipe."""

    layer: int
    """The layer index it reads in its source model (kept whichever model is chosen)."""
    model: str
    """The model it reads in the starting recipe."""
    slice_index: int
    """The slice of the starting recipe it belongs to (that slice's other settings are kept)."""


@dataclass(frozen=True)
class SearchSpace:
    """The genes of a recipe and how they are turned back into one."""

    text: str
    """The starting recipe's YAML."""
    dims: tuple[Dim, ...]
    """One per gene, in gene order."""
    slots: tuple[Slot, ...]
    """The output layers of the starting recipe (data flow space only; empty otherwise)."""
    start: tuple[float, ...]
    """The genes of the starting recipe."""

    def params(self, genes: Sequence[float]) -> dict[str, Any]:
        """The value each gene stands for, by dim name: a number, a model path or whether a slot is kept."""
        out: dict[str, Any] = {}
        for d, g in zip(self.dims, _clip(genes, len(self.dims))):
            if d.kind == "value":
                out[d.name] = round(float(d.low + g * (d.high - d.low)), DECIMALS)
            elif d.kind == "source":
                out[d.name] = d.choices[min(len(d.choices) - 1, int(g * len(d.choices)))]
            else:
                out[d.name] = bool(g >= 0.5)
        return out

    def genes(self, params: Mapping[str, Any]) -> np.ndarray:
        """Genes that stand for `params` (the inverse of `params`; categorical genes at the middle of their part)."""
        out = []
        for d in self.dims:
            v = params[d.name]
            if d.kind == "value":
                out.append((float(v) - d.low) / (d.high - d.low))
            elif d.kind == "source":
                out.append((d.choices.index(v) + 0.5) / len(d.choices))
            else:
                out.append(KEEP if v else DROP)
        return np.clip(np.array(out, dtype=float), 0.0, 1.0)

    def document(self, genes: Sequence[float]) -> dict:
        """The recipe the genes stand for, as a YAML document (a new dict)."""
        doc = yaml.safe_load(self.text)
        params = self.params(genes)
        for d in self.dims:
            if d.kind == "value":
                _set(doc, d.path, params[d.name])
        if self.slots:
            doc["slices"] = _dataflow_slices(doc["slices"], self, genes, params)
        return doc

    def recipe_text(self, genes: Sequence[float]) -> str:
        """The recipe the genes stand for, as mergekit YAML."""
        return yaml.safe_dump(self.document(genes), sort_keys=False)

    def recipe(self, genes: Sequence[float]) -> Recipe:
        """The recipe the genes stand for, parsed."""
        return parse_recipe(self.recipe_text(genes))


def search_space(recipe: Recipe | str | Path, bounds: Mapping[str, tuple[float, float]] | None = None,
                 skip_layers: bool = False) -> SearchSpace:
    """The search space of a recipe (a Recipe or the path of its YAML); UserError when it has nothing to search."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    limits = _bounds(bounds)
    doc = yaml.safe_load(recipe.text)
    if recipe.merge_method == "passthrough" and recipe.slices:
        dims, slots = _dataflow_dims(recipe, skip_layers)
        start = tuple(KEEP if d.kind == "keep" else (d.choices.index(slots[d.slot].model) + 0.5) / len(d.choices)
                      for d in dims)
    else:
        if skip_layers:
            raise UserError("skip_layers searches which layers a passthrough recipe with `slices:` stacks; this "
                            f"recipe merges with {recipe.merge_method}: leave skip_layers off", param="skip_layers")
        found = [(path, name, value) for path, name, value in _numbers_of(doc) if name in limits]
        dims = tuple(_value_dim(path, name, value, limits[name]) for path, name, value in found)
        slots = ()
        start = tuple((v - d.low) / (d.high - d.low) for d, (_, _, v) in zip(dims, found))
    if not dims:
        raise UserError(f"the {recipe.merge_method} recipe has no number to search: write the parameters to search "
                        f"({', '.join(limits)}) in it with their starting values, or stack layers of two or more "
                        "models with a passthrough recipe of `slices:`", param="recipe")
    return SearchSpace(recipe.text, dims, slots, start)


def _bounds(bounds: Mapping[str, tuple[float, float]] | None) -> dict[str, tuple[float, float]]:
    known = {p.name for m in METHODS.values() for p in m.params if p.kind != "bool"} | set(DEFAULT_BOUNDS)
    out = dict(DEFAULT_BOUNDS)
    for name, pair in (bounds or {}).items():
        if name not in known:
            raise UserError(f"bounds for unknown parameter {name!r}; searchable parameters are "
                            f"{', '.join(sorted(known))}", param="bounds")
        low, high = (float(x) for x in pair)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise UserError(f"bounds of {name} must be two finite numbers low < high, got {tuple(pair)}",
                            param="bounds")
        out[name] = (low, high)
    return out


def _numbers_of(doc: Mapping) -> list[tuple[Path_, str, float]]:
    """(place, parameter name, value) of every number in the recipe's `parameters:` blocks, in recipe order."""
    blocks: list[Path_] = []
    for i, item in enumerate(doc.get("models") or []):
        if isinstance(item, dict) and isinstance(item.get("parameters"), dict):
            blocks.append(("models", i, "parameters"))
    for i, sl in enumerate(doc.get("slices") or []):
        if isinstance(sl.get("parameters"), dict):
            blocks.append(("slices", i, "parameters"))
        for j, src in enumerate(sl.get("sources") or []):
            if isinstance(src.get("parameters"), dict):
                blocks.append(("slices", i, "sources", j, "parameters"))
    if isinstance(doc.get("parameters"), dict):
        blocks.append(("parameters",))
    out = []
    for block in blocks:
        for name, value in _get(doc, block).items():
            out += [(path, name, v) for path, v in _numbers(value, (*block, name))]
    return out


def _numbers(value: Any, path: Path_) -> list[tuple[Path_, float]]:
    """The numbers inside one parameter setting (a scalar, a gradient, conditionals), with their places."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [(path, float(value))]
    if isinstance(value, str):
        try:
            return [(path, float(value))]
        except ValueError:
            return []
    if isinstance(value, dict):
        return _numbers(value["value"], (*path, "value")) if "value" in value else []
    if isinstance(value, list):
        return [found for i, v in enumerate(value) for found in _numbers(v, (*path, i))]
    return []


def _value_dim(path: Path_, name: str, value: float, bounds: tuple[float, float]) -> Dim:
    low, high = min(bounds[0], value), max(bounds[1], value)
    return Dim(_path_name(path), "value", path, low, high)


def _path_name(path: Path_) -> str:
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


def _get(doc: Any, path: Path_) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def _set(doc: Any, path: Path_, value: Any) -> None:
    _get(doc, path[:-1])[path[-1]] = value


def _clip(genes: Sequence[float], n: int) -> np.ndarray:
    g = np.asarray(genes, dtype=float)
    if g.shape != (n,):
        raise ValueError(f"expected {n} genes, got shape {g.shape}")
    return np.clip(g, 0.0, 1.0)


def _dataflow_dims(recipe: Recipe, skip_layers: bool) -> tuple[tuple[Dim, ...], tuple[Slot, ...]]:
    """A source gene for every slot that more than one model could fill, and a keep gene per slot (skip_layers)."""
    from cairn.merge.inputs import open_checkpoint

    canonical: dict[str, str] = {}  # each model as first spelled, in recipe order
    for sl in recipe.slices:
        for src in sl.sources:
            canonical.setdefault(os.path.normpath(src.model), src.model)
    models = list(canonical.values())
    layers = {m: len(open_checkpoint(m).layers) for m in models}
    slots = tuple(Slot(layer, canonical[os.path.normpath(src.model)], i) for i, sl in enumerate(recipe.slices)
                  for src in sl.sources[:1] for layer in range(*src.layer_range))
    for slot in slots:
        if layers[slot.model] <= slot.layer:
            raise UserError(f"layer {slot.layer} of {slot.model} is named in the recipe's slices but the model has "
                            f"{layers[slot.model]} layers; fix its layer_range", param="layer_range")
    dims = []
    for k, slot in enumerate(slots):
        choices = tuple(m for m in models if layers[m] > slot.layer)
        if len(choices) > 1:
            dims.append(Dim(f"slots[{k}].model", "source", choices=choices, slot=k))
        if skip_layers:
            dims.append(Dim(f"slots[{k}].keep", "keep", slot=k))
    return tuple(dims), slots


def _dataflow_slices(original: list, space: SearchSpace, genes: Sequence[float], params: Mapping[str, Any]
                     ) -> list[dict]:
    """The output slices of a data flow candidate: each kept slot reads its layer from the chosen model."""
    keep = [True] * len(space.slots)
    model = [s.model for s in space.slots]
    keep_genes = {}
    for d, g in zip(space.dims, _clip(genes, len(space.dims))):
        if d.kind == "source":
            model[d.slot] = params[d.name]
        elif d.kind == "keep":
            keep[d.slot], keep_genes[d.slot] = params[d.name], g
    if not any(keep):
        keep[max(keep_genes, key=lambda k: keep_genes[k])] = True
    out: list[dict] = []
    last: tuple | None = None
    for k, slot in enumerate(space.slots):
        if not keep[k]:
            last = None
            continue
        if last is not None and last == (model[k], slot.layer, slot.slice_index):
            out[-1]["sources"][0]["layer_range"][1] = slot.layer + 1
        else:
            sl = copy.deepcopy(original[slot.slice_index])
            sl["sources"][0]["model"] = model[k]
            sl["sources"][0]["layer_range"] = [slot.layer, slot.layer + 1]
            out.append(sl)
        last = (model[k], slot.layer + 1, slot.slice_index)
    return out


def describe(space: SearchSpace) -> str:
    """One line per gene: its name and range (or choices), for logs and --help examples."""
    lines = []
    for d in space.dims:
        if d.kind == "value":
            lines.append(f"{d.name}: [{d.low:g}, {d.high:g}]")
        elif d.kind == "source":
            lines.append(f"{d.name}: one of {json.dumps(list(d.choices))}")
        else:
            lines.append(f"{d.name}: kept or dropped")
    return "\n".join(lines)
