"""Quantized checkpoints: which tensors are quantized, their names on disk, and the modules they become.

A quantized checkpoint is a Hugging Face directory whose config.json carries

    "quantization_config": {"quant_method": "cairn", "method": "rtn", "bits": 4, "group_size": 64,
                            "symmetric": false, "scale_dtype": "bfloat16", "keep": ["lm_head"],
                            "not_quantized": ["model.embed_tokens.weight"]}

Every matrix (q/k/v/o/gate/up/down projections, the embedding, an untied head) not listed in `not_quantized` is
stored as three tensors in place of `X.weight`: `X.qweight` (int8 (N, K), or uint8 (N, K/2) holding int4 codes),
`X.scales` and, for asymmetric int4, `X.zeros` (formats: cairn/quant/weights.py). Norms, biases and kept matrices
stay as they were. A tied head is the embedding: keeping either keeps the one shared tensor.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn

from cairn.config import ModelConfig
from cairn.errors import ModelLoadError, UnsupportedModelError, UserError
from cairn.quant.layers import QuantEmbedding, QuantLinear
from cairn.quant.weights import QuantFormat, QuantFormatError, QuantizedWeight, concat_rows

QUANT_METHOD = "cairn"
METHODS = ("rtn", "awq", "gptq")
"""Round to nearest; activation-aware scaling (AWQ-style); error-compensating rounding (GPTQ-style)."""
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Matrices cairn runs as one (concatenated rows): they are kept or quantized together."""
ALIASES = {"embed": "embed_tokens", "head": "lm_head"}


@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's quantization: the format, the method that chose the integers, what stayed in floating point."""

    fmt: QuantFormat
    """Bits, group size, symmetry, scale dtype."""
    method: str
    """'rtn', 'awq' or 'gptq'."""
    keep: tuple[str, ...] = ()
    """--keep as given (names or name parts of matrices left unquantized)."""
    not_quantized: tuple[str, ...] = ()
    """HF names of the matrices left in floating point (keep resolved, fused groups completed)."""
    details: tuple[tuple[str, object], ...] = ()
    """Method parameters (calibration text, samples, ...), recorded for provenance."""
    overrides: tuple[tuple[str, QuantFormat], ...] = ()
    """HF names of matrices stored in another format than `fmt` (a GGUF's Q8_0 embedding beside Q4_1 layers)."""

    def fmt_of(self, hf_name: str) -> QuantFormat:
        """The format matrix `hf_name` is stored in."""
        return dict(self.overrides).get(hf_name, self.fmt)

    def to_dict(self) -> dict:
        out = {"quant_method": QUANT_METHOD, "method": self.method, **_fmt_dict(self.fmt), "keep": list(self.keep),
               "not_quantized": list(self.not_quantized), **dict(self.details)}
        if self.overrides:
            out["overrides"] = {n: _fmt_dict(f) for n, f in self.overrides}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        method = d.get("quant_method")
        if method != QUANT_METHOD:
            raise UnsupportedModelError(f"the checkpoint is quantized with {method!r}, which cairn does not load; "
                                        f"cairn loads its own quantized checkpoints (cairn quantize) and "
                                        f"unquantized ones")
        try:
            overrides = tuple((str(n), _fmt_from(f)) for n, f in (d.get("overrides") or {}).items())
            known = {"quant_method", "method", "bits", "group_size", "symmetric", "scale_dtype", "keep",
                     "not_quantized", "overrides"}
            return cls(_fmt_from(d), str(d["method"]), tuple(d.get("keep") or ()),
                       tuple(d.get("not_quantized") or ()), tuple((k, v) for k, v in d.items() if k not in known),
                       overrides)
        except (KeyError, TypeError, ValueError, AttributeError, QuantFormatError) as e:
            raise ModelLoadError(f"config.json has a bad quantization_config ({e})") from None

    def describe(self) -> str:
        g = f" g{self.fmt.group_size}" if self.fmt.group_size else ""
        sym = "" if self.fmt.bits == 8 else (" sym" if self.fmt.symmetric else " asym")
        more = f" (+{len(self.overrides)} int8)" if any(f.bits == 8 for _, f in self.overrides) else ""
        return f"int{self.fmt.bits}{g}{sym} {self.method}{more}"


def _fmt_dict(fmt: QuantFormat) -> dict:
    return {"bits": fmt.bits, "group_size": fmt.group_size, "symmetric": fmt.symmetric,
            "scale_dtype": fmt.scale_dtype}


def _fmt_from(d: dict) -> QuantFormat:
    return QuantFormat(int(d["bits"]), d.get("group_size"), bool(d.get("symmetric", False)),
                       str(d.get("scale_dtype", "float32")))


def quant_config(cfg: ModelConfig) -> QuantConfig | None:
    """The checkpoint's quantization (from config.json), None for an unquantized model."""
    d = cfg.raw.get("quantization_config")
    if not d:
        return None
    if not isinstance(d, dict):
        raise ModelLoadError("config.json's quantization_config must be an object")
    return QuantConfig.from_dict(d)


def is_matrix(hf_name: str) -> bool:
    """A weight that quantization applies to: a projection, the embedding or the head."""
    base, _, kind = hf_name.rpartition(".")
    return kind == "weight" and (base in ("model.embed_tokens", "lm_head") or base.rpartition(".")[2] in PROJECTIONS)


def is_quantized(qc: QuantConfig | None, hf_name: str) -> bool:
    return qc is not None and is_matrix(hf_name) and hf_name not in qc.not_quantized


def component_names(qc: QuantConfig, hf_name: str) -> list[str]:
    """The stored tensors of a quantized matrix X.weight: X.qweight, X.scales (, X.zeros)."""
    base = hf_name.removesuffix(".weight")
    return [f"{base}.qweight", f"{base}.scales"] + ([] if qc.fmt_of(hf_name).symmetric else [f"{base}.zeros"])


def disk_names(cfg: ModelConfig, hf_names: list[str]) -> list[str]:
    """HF tensor names as stored in the checkpoint (a quantized matrix becomes its components)."""
    qc = quant_config(cfg)
    if qc is None:
        return hf_names
    out: list[str] = []
    for n in hf_names:
        out.extend(component_names(qc, n) if is_quantized(qc, n) else [n])
    return out


def to_tensors(hf_name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """A QuantizedWeight as the stored tensors named after its matrix."""
    base = hf_name.removesuffix(".weight")
    out = {f"{base}.qweight": qw.qweight, f"{base}.scales": qw.scales}
    if qw.zeros is not None:
        out[f"{base}.zeros"] = qw.zeros
    return out


def from_tensors(qc: QuantConfig, hf_name: str, tensors: dict[str, torch.Tensor], source: str) -> QuantizedWeight:
    """The QuantizedWeight of matrix `hf_name` from its stored tensors, checked for shape and dtype."""
    names = component_names(qc, hf_name)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ModelLoadError(f"tensor {missing[0]!r} is missing from {source}")
    q, s = tensors[names[0]], tensors[names[1]]
    z = tensors[names[2]] if len(names) == 3 else None
    fmt = qc.fmt_of(hf_name)
    want = torch.int8 if fmt.bits == 8 else torch.uint8
    rows = q.shape[0] if q.ndim == 2 else -1
    cols = q.shape[-1] * (2 if fmt.bits == 4 else 1)
    groups = 1 if fmt.bits == 8 else cols // fmt.group_size
    sshape = (rows,) if fmt.bits == 8 else (rows, groups)
    if q.dtype != want or q.ndim != 2 or tuple(s.shape) != sshape or (z is not None and z.shape != s.shape):
        raise ModelLoadError(f"the stored tensors of {hf_name!r} in {source} do not hold int{fmt.bits} weights "
                             f"as config.json's quantization_config describes (qweight {q.dtype} "
                             f"{tuple(q.shape)}, scales {tuple(s.shape)})")
    return QuantizedWeight(fmt.bits, fmt.group_size, q, s, z)


def gather(qc: QuantConfig, sources: list[str], tensors: dict[str, torch.Tensor], source: str) -> QuantizedWeight:
    """One fused QuantizedWeight from the HF matrices `sources` (rows concatenated, as build_stage fuses)."""
    return concat_rows([from_tensors(qc, n, tensors, source) for n in sources])


def install(stage: nn.Module, qweights: dict[str, QuantizedWeight], device: torch.device | str,
            dtype: torch.dtype) -> None:
    """Swap the stage's modules named by `qweights` (cairn names, 'layers.0.self_attn.qkv_proj.weight') for
    quantized ones packed for `device`; a tied head on a whole-model stage shares the embedding's weight."""
    for name, qw in qweights.items():
        parent_name, _, attr = name.removesuffix(".weight").rpartition(".")
        parent = stage.get_submodule(parent_name) if parent_name else stage
        old = getattr(parent, attr)
        if isinstance(old, nn.Embedding):
            new: nn.Module = QuantEmbedding(qw, device, dtype)
        else:
            bias = None if old.bias is None or old.bias.is_meta else old.bias
            new = QuantLinear(qw, bias, device, compute_dtype=dtype)
        setattr(parent, attr, new)
    tied = stage.cfg.tie_word_embeddings and stage.embed_tokens is not None and stage.lm_head is not None
    if tied and "embed_tokens.weight" in qweights:  # int8: the head's kernel reads the embedding's own tensors
        stage.lm_head = QuantLinear(stage.embed_tokens.qw, None, device, compute_dtype=dtype)
    _release_freed_memory()


def _release_freed_memory() -> None:
    """Packing leaves freed buffers (the stored tensors, unpacked codes) in the C heap, where they would stay
    resident: hand them back to the system (glibc's malloc_trim; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resolve_keep(cfg: ModelConfig, keep: str | list[str] | tuple[str, ...], matrices: list[str]) -> tuple[str, ...]:
    """HF names of the matrices --keep leaves unquantized. A token names whole dot-separated parts of a name
    ('lm_head', 'embed', 'down_proj', 'layers.0', 'mlp'); with a tied head 'lm_head' is the embedding. Fused
    groups (q/k/v, gate/up) are kept whole. A token that matches nothing is an error."""
    tokens = [t.strip() for t in (keep.split(",") if isinstance(keep, str) else keep) if t.strip()]
    kept: set[str] = set()
    for token in tokens:
        t = ALIASES.get(token, token)
        if t == "lm_head" and cfg.tie_word_embeddings:
            t = "embed_tokens"  # a tied head is the embedding
        hits = [n for n in matrices if f".{t}." in f".{n}"]
        if not hits:
            raise UserError(f"--keep {token!r} matches no matrix of the model (try lm_head, embed, q_proj, mlp, "
                            f"layers.N)", param="keep")
        kept.update(hits)
    for n in list(kept):
        base, _, kind = n.rpartition(".")
        prefix, _, proj = base.rpartition(".")
        for group in FUSED:
            if proj in group:
                kept.update(f"{prefix}.{p}.{kind}" for p in group if f"{prefix}.{p}.{kind}" in matrices)
    return tuple(n for n in matrices if n in kept)


def stored_bytes(cfg: ModelConfig, dtype_bytes: int) -> dict[str, int] | None:
    """Bytes of one block's weights (averaged over blocks), the embedding and the head as the quantized checkpoint
    holds them in memory (unquantized tensors at dtype_bytes); None for an unquantized model."""
    qc = quant_config(cfg)
    if qc is None:
        return None
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {"q_proj": (cfg.q_size, d), "k_proj": (cfg.kv_size, d), "v_proj": (cfg.kv_size, d),
              "o_proj": (d, cfg.q_size), "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}

    def size(name: str, rows: int, cols: int) -> int:
        return qc.fmt_of(name).stored_bytes(rows, cols) if is_quantized(qc, name) else rows * cols * dtype_bytes

    layers = sum(size(f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}.weight", *shapes[p])
                 for i in range(cfg.num_layers) for p in PROJECTIONS)
    embed = size("model.embed_tokens.weight", cfg.vocab_size, d)
    head = embed if cfg.tie_word_embeddings else size("lm_head.weight", cfg.vocab_size, d)
    return {"layer": -(-layers // cfg.num_layers) + 2 * d * dtype_bytes, "embed": embed, "head": head + d * dtype_bytes}
