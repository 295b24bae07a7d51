"""mergekit's YAML recipe format, parsed into a frozen Recipe (no torch here).

A recipe names a merge method, the inputs (`models`, or `slices` of layer ranges) and parameters. A parameter
value is a scalar, a gradient (a list spread evenly over the layers of a slice and interpolated linearly, as
mergekit does), or a list of `{filter, value}` conditionals (the first entry whose filter is a substring of the
tensor name wins; an entry without a filter matches every tensor). Settings are looked up from the most specific
place to the least: the input's own `parameters`, the slice's, then the recipe's top-level `parameters`.

mergekit silently ignores keys and parameters it does not know; cairn refuses them, naming them, because a typo
there (`desnity:`) would otherwise merge something other than what was asked for."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from cairn.errors import UserError

Scalar = bool | int | float | str
"""One parameter value as written in YAML."""

REQUIRED = object()
"""Marks a parameter that has no default: the recipe must set it."""

DTYPES = ("float32", "float16", "bfloat16", "float64")
"""Names accepted for `dtype` and `out_dtype`."""


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a merge method reads."""

    name: str
    """The key in a `parameters:` block."""
    kind: str
    """"float", "bool" or "optional_float" (a float that may be left unset)."""
    scope: str
    """"shared" (one value per output tensor), "input" (one per input) or "non_base" (one per non-base input)."""
    default: Any = REQUIRED
    """The value when no `parameters:` block sets it (REQUIRED: the recipe must set it)."""


@dataclass(frozen=True)
class MethodSpec:
    """What a merge method needs from a recipe: its parameters and how many inputs, with or without a base."""

    name: str
    """The `merge_method:` value."""
    params: tuple[ParamSpec, ...]
    """The parameters it reads."""
    needs_base: bool
    """True when `base_model` is required (the inputs are read as deltas from it)."""
    min_inputs: int = 1
    """Fewest inputs per output tensor, the base included."""
    max_inputs: int | None = None
    """Most inputs per output tensor, the base included (None: no limit)."""
    sparsify: str | None = None
    """How deltas are trimmed: "magnitude", "random" or "magnitude_outliers" (None: not trimmed)."""
    consensus: bool = False
    """True when a sign is elected per element and only deltas agreeing with it are summed (TIES)."""
    random: bool = False
    """True when the result depends on a random seed."""

    def param(self, name: str) -> ParamSpec | None:
        """The spec of parameter `name`, or None when the method has no such parameter."""
        return next((p for p in self.params if p.name == name), None)


def _task_arithmetic_family(name: str, normalize: bool, rescale: bool, sparsify: str | None,
                            consensus: bool) -> MethodSpec:
    """A method of mergekit's generalized task arithmetic: deltas from the base, trimmed, elected, summed."""
    params = [ParamSpec("int8_mask", "bool", "shared", False), ParamSpec("normalize", "bool", "shared", normalize),
              ParamSpec("rescale", "bool", "shared", rescale), ParamSpec("lambda", "float", "shared", 1.0),
              ParamSpec("weight", "float", "non_base"), ParamSpec("density", "float", "non_base", 1.0)]
    if sparsify == "magnitude_outliers":
        params.append(ParamSpec("gamma", "float", "non_base", 0.01))
    return MethodSpec(name, tuple(params), needs_base=True, sparsify=sparsify, consensus=consensus,
                      random=sparsify == "random")


METHODS: Mapping[str, MethodSpec] = MappingProxyType({m.name: m for m in (
    MethodSpec("linear", (ParamSpec("weight", "float", "input"), ParamSpec("normalize", "bool", "shared", True)),
               needs_base=False),
    MethodSpec("slerp", (ParamSpec("t", "float", "shared"),), needs_base=True, min_inputs=2, max_inputs=2),
    _task_arithmetic_family("task_arithmetic", False, False, None, False),
    _task_arithmetic_family("ties", True, False, "magnitude", True),
    _task_arithmetic_family("dare_linear", False, True, "random", False),
    _task_arithmetic_family("dare_ties", False, True, "random", True),
    _task_arithmetic_family("breadcrumbs", False, False, "magnitude_outliers", False),
    _task_arithmetic_family("breadcrumbs_ties", False, False, "magnitude_outliers", True),
    MethodSpec("model_stock", (ParamSpec("filter_wise", "bool", "shared", False),), needs_base=True, min_inputs=3),
    MethodSpec("passthrough", (ParamSpec("scale", "optional_float", "input", None),), needs_base=False,
               max_inputs=1),
)})
"""Every merge method cairn implements, by name (formulas in cairn/merge/methods.py)."""


@dataclass(frozen=True)
class Conditional:
    """One entry of a parameter setting."""

    value: Scalar | tuple[Scalar, ...]
    """A scalar, or a gradient: values spread evenly over a slice's layers, interpolated linearly between."""
    filter: str | None = None
    """Applies to tensors whose name contains this substring; None (or "*") applies to every tensor."""

    def matches(self, tensor_name: str) -> bool:
        """True when this entry applies to `tensor_name`."""
        return self.filter is None or self.filter == "*" or self.filter in tensor_name


@dataclass(frozen=True)
class Setting:
    """A parameter's value as the recipe gives it: entries tried in order, the first that matches wins."""

    entries: tuple[Conditional, ...]
    """A scalar or gradient is one entry without a filter."""

    def resolve(self, tensor_name: str, t: float) -> Scalar | None:
        """The value for `tensor_name` at relative layer position t in [0, 1]; None when no entry matches."""
        for entry in self.entries:
            if entry.matches(tensor_name):
                return interpolate(entry.value, t)
        return None


def interpolate(value: Scalar | tuple[Scalar, ...], t: float) -> Scalar:
    """A gradient's value at t in [0, 1]: numbers are interpolated linearly between the two nearest points,
    booleans and strings are taken from the point at or below t (mergekit's rule); a scalar is itself."""
    if not isinstance(value, tuple):
        return value
    scaled = t * (len(value) - 1)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return value[int(scaled)]
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


@dataclass(frozen=True)
class Source:
    """One input: a whole model (under `models:`) or a layer range of one (under a slice's `sources:`)."""

    model: str
    """Directory of a Hugging Face safetensors checkpoint (config.json + *.safetensors)."""
    layer_range: tuple[int, int] | None
    """Half-open [start, end) of its layers (None: all of them, the `models:` form)."""
    parameters: Mapping[str, Setting]
    """Settings for tensors read from this input (highest precedence)."""


@dataclass(frozen=True)
class Slice:
    """A run of output layers, each merged from the same-offset layer of every source."""

    sources: tuple[Source, ...]
    """The inputs; all have the same number of layers."""
    base_model: str | None
    """Overrides the recipe's base_model for this slice."""
    parameters: Mapping[str, Setting]
    """Settings for this slice's tensors (between the sources' and the recipe's in precedence)."""


@dataclass(frozen=True)
class Recipe:
    """A parsed mergekit recipe."""

    merge_method: str
    """A key of METHODS."""
    models: tuple[Source, ...]
    """Whole models to merge (empty when `slices` is used)."""
    slices: tuple[Slice, ...]
    """Layer slices to build the output from (empty when `models` is used)."""
    base_model: str | None
    """The model deltas are taken from (task arithmetic family, slerp, model_stock); also donates config.json."""
    parameters: Mapping[str, Setting]
    """Top-level settings (lowest precedence)."""
    dtype: str | None
    """Inputs are cast to this before merging (None: each tensor's inputs keep a common promoted dtype)."""
    out_dtype: str | None
    """The merged tensors are written in this dtype (None: the input dtype)."""
    tokenizer_source: str | None
    """"base" or a model directory whose tokenizer the output gets, vocabulary-indexed tensors aligned to it."""
    text: str
    """The YAML as given (recorded in the output's metadata)."""

    @property
    def method(self) -> MethodSpec:
        """The merge method's spec."""
        return METHODS[self.merge_method]


TOP_KEYS = ("merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer")
UNSUPPORTED = {
    "modules": "multi-module merges are not implemented; use `models:` or `slices:`",
    "chat_template": "copy or edit chat_template.jinja / tokenizer_config.json in the output instead",
    "residual_weight": "mergekit does not use it either; remove it",
}


def with_inputs(recipe: Recipe, resolve: Callable[[str], str]) -> Recipe:
    """The recipe reading every model from resolve(reference) instead (e.g. a .gguf imported into a directory, a
    `base+adapter` folded into one); its text, recorded in the output, stays as written."""
    def src(s: Source) -> Source:
        return replace(s, model=resolve(s.model))

    def opt(m: str | None) -> str | None:
        return None if m is None else resolve(m)

    tok = recipe.tokenizer_source
    return replace(recipe, models=tuple(src(s) for s in recipe.models),
                   slices=tuple(replace(sl, sources=tuple(src(s) for s in sl.sources), base_model=opt(sl.base_model))
                                for sl in recipe.slices),
                   base_model=opt(recipe.base_model),
                   tokenizer_source=tok if tok in (None, "base", "union") else resolve(tok))


def load_recipe(path: str | Path) -> Recipe:
    """Read and parse a mergekit YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"merge recipe {path} not found; give the path of a mergekit YAML file", param="recipe")
    return parse_recipe(path.read_text(encoding="utf-8"))


def parse_recipe(text: str) -> Recipe:
    """Parse mergekit YAML text into a Recipe; unknown keys, methods or parameters raise UserError naming them."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"merge recipe is not valid YAML: {e}", param="recipe") from None
    if not isinstance(doc, dict):
        raise UserError("merge recipe must be a YAML mapping with merge_method and models or slices", param="recipe")
    _check_keys(doc, TOP_KEYS, "the recipe")
    method = _method(doc.get("merge_method"))
    base = _model_name(doc["base_model"], "base_model") if doc.get("base_model") is not None else None
    if ("models" in doc) == ("slices" in doc):
        raise UserError("a merge recipe needs exactly one of `models:` or `slices:`", param="recipe")
    if "models" in doc:
        models, slices = _models(doc["models"], method, base), ()
    else:
        models, slices = (), _slices(doc["slices"], method, base)
    return Recipe(
        merge_method=method.name, models=models, slices=slices, base_model=base,
        parameters=_parameters(doc.get("parameters"), method, "parameters", "global"),
        dtype=_dtype(doc.get("dtype"), "dtype"), out_dtype=_dtype(doc.get("out_dtype"), "out_dtype"),
        tokenizer_source=_tokenizer_source(doc), text=text,
    )


def _check_keys(d: Mapping, allowed: tuple[str, ...], where: str) -> None:
    for key in d:
        if key in UNSUPPORTED:
            raise UserError(f"{where}: mergekit key {key!r} is not supported by cairn merge ({UNSUPPORTED[key]})",
                            param=str(key))
        if key not in allowed:
            raise UserError(f"{where}: unknown key {key!r}; known keys are {', '.join(allowed)}", param=str(key))


def _method(name: Any) -> MethodSpec:
    if name is None:
        raise UserError(f"the recipe has no merge_method; choose one of {', '.join(METHODS)}", param="merge_method")
    if name not in METHODS:
        raise UserError(f"unknown merge_method {name!r}; cairn implements {', '.join(METHODS)}",
                        param="merge_method")
    return METHODS[name]


def _model_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where} must be the path of a model directory, got {value!r}", param=where)
    return value


def same_model(a: str | None, b: str | None) -> bool:
    """True when two model references in a recipe name the same directory."""
    return a is not None and b is not None and os.path.normpath(a) == os.path.normpath(b)


def _models(items: Any, method: MethodSpec, base: str | None) -> tuple[Source, ...]:
    if not isinstance(items, list) or not items:
        raise UserError("`models:` must be a non-empty list of {model: path, parameters: {...}}", param="models")
    out = []
    for i, item in enumerate(items):
        where = f"models[{i}]"
        item = {"model": item} if isinstance(item, str) else item
        if not isinstance(item, dict):
            raise UserError(f"{where} must be a mapping with a `model:` key", param="models")
        _check_keys(item, ("model", "parameters"), where)
        model = _model_name(item.get("model"), f"{where}.model")
        scope = "base" if method.needs_base and same_model(model, base) else "input"
        out.append(Source(model, None, _parameters(item.get("parameters"), method, f"{where}.parameters", scope)))
    return tuple(out)


def _slices(items: Any, method: MethodSpec, base: str | None) -> tuple[Slice, ...]:
    if not isinstance(items, list) or not items:
        raise UserError("`slices:` must be a non-empty list of {sources: [...]}", param="slices")
    out = []
    for i, item in enumerate(items):
        where = f"slices[{i}]"
        if not isinstance(item, dict):
            raise UserError(f"{where} must be a mapping with a `sources:` key", param="slices")
        _check_keys(item, ("sources", "base_model", "parameters"), where)
        slice_base = _model_name(item["base_model"], f"{where}.base_model") if item.get("base_model") else base
        sources = item.get("sources")
        if not isinstance(sources, list) or not sources:
            raise UserError(f"{where}.sources must be a non-empty list of {{model, layer_range}}", param="slices")
        srcs = tuple(_source(s, method, slice_base, f"{where}.sources[{j}]") for j, s in enumerate(sources))
        lengths = {s.layer_range[1] - s.layer_range[0] for s in srcs}
        if len(lengths) > 1:
            raise UserError(f"{where}: all sources of a slice need the same number of layers, got "
                            f"{[s.layer_range for s in srcs]}", param="slices")
        override = slice_base if item.get("base_model") else None
        out.append(Slice(srcs, override, _parameters(item.get("parameters"), method, f"{where}.parameters", "global")))
    return tuple(out)


def _source(item: Any, method: MethodSpec, base: str | None, where: str) -> Source:
    if not isinstance(item, dict):
        raise UserError(f"{where} must be a mapping with `model:` and `layer_range:`", param="slices")
    _check_keys(item, ("model", "layer_range", "parameters"), where)
    model = _model_name(item.get("model"), f"{where}.model")
    lr = item.get("layer_range")
    if (not isinstance(lr, list) or len(lr) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
            or not 0 <= lr[0] < lr[1]):
        raise UserError(f"{where}.layer_range must be [start, end) with 0 <= start < end, got {lr!r}",
                        param="layer_range")
    scope = "base" if method.needs_base and same_model(model, base) else "input"
    return Source(model, (lr[0], lr[1]), _parameters(item.get("parameters"), method, f"{where}.parameters", scope))


def _parameters(block: Any, method: MethodSpec, where: str, scope: str) -> Mapping[str, Setting]:
    """Validate a `parameters:` block. scope: "global" (any parameter), "input" (per-input parameters only) or
    "base" (an input that is the base: only parameters that apply to the base)."""
    if block is None:
        return MappingProxyType({})
    if not isinstance(block, dict):
        raise UserError(f"{where} must be a mapping of parameter name to value", param="parameters")
    out = {}
    for name, value in block.items():
        spec = method.param(name)
        if spec is None:
            known = ", ".join(p.name for p in method.params) or "none"
            raise UserError(f"{where}: unknown parameter {name!r} for merge_method {method.name} (it takes: {known})",
                            param=str(name))
        if scope != "global" and spec.scope == "shared":
            raise UserError(f"{where}: {name!r} applies to the whole merge, not to one input; move it to the "
                            f"top-level or slice `parameters:`", param=str(name))
        if scope == "base" and spec.scope == "non_base":
            raise UserError(f"{where}: {name!r} has no effect on the base model in {method.name} (only the other "
                            f"models' deltas from it are weighted and trimmed); remove it", param=str(name))
        out[name] = _setting(value, spec, f"{where}.{name}")
    return MappingProxyType(out)


def _setting(value: Any, spec: ParamSpec, where: str) -> Setting:
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        entries = []
        for i, cond in enumerate(value):
            _check_keys(cond, ("filter", "value"), f"{where}[{i}]")
            if "value" not in cond:
                raise UserError(f"{where}[{i}] has no `value:`", param=spec.name)
            flt = cond.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise UserError(f"{where}[{i}].filter must be a string (a substring of tensor names), got {flt!r}",
                                param=spec.name)
            entries.append(Conditional(_value(cond["value"], spec, f"{where}[{i}].value"), flt))
        return Setting(tuple(entries))
    return Setting((Conditional(_value(value, spec, where)),))


def _value(value: Any, spec: ParamSpec, where: str) -> Scalar | tuple[Scalar, ...]:
    if isinstance(value, list):
        if not value:
            raise UserError(f"{where} is an empty list; give a value or a gradient of values", param=spec.name)
        return tuple(_scalar(v, spec, f"{where}[{i}]") for i, v in enumerate(value))
    return _scalar(value, spec, where)


def _scalar(value: Any, spec: ParamSpec, where: str) -> Scalar:
    """Check one value against the parameter's kind; numbers in strings ("1e-3": YAML 1.1 reads it as a string)
    become floats, as mergekit's validation does."""
    if spec.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise UserError(f"{where} must be true or false, got {value!r}", param=spec.name)
    if value is None and spec.kind == "optional_float":
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise UserError(f"{where} must be a number, got {value!r}", param=spec.name) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where} must be a finite number, got {value!r}", param=spec.name)
    return float(value)


def _dtype(value: Any, where: str) -> str | None:
    if value is None:
        return None
    name = value[len("torch."):] if isinstance(value, str) and value.startswith("torch.") else value
    if name not in DTYPES:
        raise UserError(f"{where} {value!r} is not one of {', '.join(DTYPES)}", param=where)
    return name


def _tokenizer_source(doc: Mapping) -> str | None:
    if "tokenizer" in doc and "tokenizer_source" in doc:
        raise UserError("give either `tokenizer:` or `tokenizer_source:`, not both", param="tokenizer")
    source = doc.get("tokenizer_source")
    if "tokenizer" in doc:
        block = doc["tokenizer"]
        if not isinstance(block, dict):
            raise UserError("`tokenizer:` must be a mapping with `source:`", param="tokenizer")
        for key in block:
            if key != "source":
                raise UserError(f"tokenizer: key {key!r} is not supported by cairn merge (only `source:` is)",
                                param="tokenizer")
        source = block.get("source", "union")
    if source is None:
        return None
    if source == "union":
        raise UserError("tokenizer source `union` is not supported by cairn merge; use `base` or the path of the "
                        "model whose tokenizer the merge should keep", param="tokenizer_source")
    return _model_name(source, "tokenizer_source")
