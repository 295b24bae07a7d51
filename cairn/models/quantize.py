"""`cairn quantize`: a checkpoint's matrices to int8 or int4, written as a new checkpoint the normal loader runs.

Two steps, as every transformation: (1) a state-dict transformation (HF-named float tensors -> stored quantized
tensors; the method chooses the integers), (2) the checkpoint writer; loading is build_stage's. Everything that can
be wrong with the request (format, a width that does not divide, a checkpoint already quantized, an unknown method,
an output directory in use) is checked before anything is written, and the output appears by one rename.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from cairn.config import ModelConfig
from cairn.errors import UserError
from cairn.fsutil import atomic_write_json
from cairn.models import quantized
from cairn.models.checkpoint import copy_side_files, read_tensors, stage_tensor_names, weight_map, write_tensors
from cairn.models.llama import TORCH_DTYPES
from cairn.quant.weights import QuantFormat, dequantize, quantize
from cairn.types import LayerRange


def tensor_shapes(model_dir: Path, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of the named tensors from the safetensors headers (no tensor data is read)."""
    files = weight_map(model_dir)
    shapes = {}
    for n in names:
        with safe_open(str(model_dir / files[n]), framework="pt") as f:
            shapes[n] = tuple(f.get_slice(n).get_shape())
    return shapes


def plan(model_dir: Path, cfg: ModelConfig, fmt: QuantFormat, method: str, keep: str) -> quantized.QuantConfig:
    """The QuantConfig a request resolves to, after checking every matrix it quantizes can take the format."""
    if method not in quantized.METHODS:
        raise UserError(f"unknown --method {method!r}; choose one of {', '.join(quantized.METHODS)}", param="method")
    if cfg.raw.get("quantization_config"):
        qc = cfg.raw["quantization_config"]
        what = quantized.QuantConfig.from_dict(qc).describe() if qc.get("quant_method") == "cairn" else qc
        raise UserError(f"{model_dir} is already quantized ({what}); quantize the unquantized model instead")
    names = stage_tensor_names(cfg, LayerRange(0, cfg.num_layers))
    matrices = [n for n in names if quantized.is_matrix(n)]
    kept = quantized.resolve_keep(cfg, keep, matrices)
    shapes = tensor_shapes(model_dir, [n for n in matrices if n not in kept])
    for n, shape in shapes.items():
        fmt.check_shape(n, shape)
    tokens = tuple(t.strip() for t in keep.split(",") if t.strip())
    return quantized.QuantConfig(fmt, method, tokens, kept)


def quantize_tensors(tensors: dict[str, torch.Tensor], qc: quantized.QuantConfig) -> dict[str, torch.Tensor]:
    """Round-to-nearest: HF-named float tensors -> the stored tensors of a quantized checkpoint."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if quantized.is_quantized(qc, name):
            out.update(quantized.to_tensors(name, quantize(t.float(), qc.fmt, name)))
        else:
            out[name] = t
    return out


def quantize_checkpoint(model_dir: str | Path, out_dir: str | Path, fmt: QuantFormat, method: str = "rtn",
                        keep: str = "", calibration: str | None = None, samples: int = 32,
                        progress: bool = False) -> dict:
    """Quantize the checkpoint in model_dir into out_dir (which must not exist or be empty). Returns a summary:
    the config written, bytes before and after, bits per weight, seconds."""
    t0 = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not an empty directory; choose a new one")
    cfg = ModelConfig.from_hf_dir(model_dir)
    qc = plan(model_dir, cfg, fmt, method, keep)
    names = stage_tensor_names(cfg, LayerRange(0, cfg.num_layers))
    if method == "rtn":
        if calibration is not None:
            raise UserError("--calibration is for the calibrated methods (awq, gptq); rtn needs no text",
                            param="calibration")
        stored: dict[str, torch.Tensor] = {}
        for n in tqdm(names, desc="quantizing", unit="tensor", disable=not progress):
            stored.update(quantize_tensors(read_tensors(model_dir, [n]), qc))
    else:
        from cairn.models.calibrate import calibrated_tensors

        stored, details = calibrated_tensors(model_dir, cfg, qc, calibration, samples, progress)
        qc = quantized.QuantConfig(qc.fmt, qc.method, qc.keep, qc.not_quantized, tuple(details.items()))
    before = sum(numel * size for numel, size in _header_sizes(model_dir, names))
    _write(model_dir, out_dir, cfg, stored, qc)
    after = sum(t.numel() * t.element_size() for t in stored.values())
    return {"config": qc.to_dict(), "bytes_before": before, "bytes_after": after,
            "bits_per_weight": 8 * after / cfg.param_count(), "kept": list(qc.not_quantized),
            "quantized": sum(quantized.is_quantized(qc, n) for n in names), "seconds": time.perf_counter() - t0}


def _header_sizes(model_dir: Path, names: list[str]):
    """(elements, bytes per element) of each named tensor, from the safetensors headers."""
    files = weight_map(model_dir)
    for n in names:
        with safe_open(str(model_dir / files[n]), framework="pt") as f:
            sl = f.get_slice(n)
            yield math.prod(sl.get_shape()), _ELEMENT_BYTES.get(sl.get_dtype(), 4)


_ELEMENT_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1}


def _write(model_dir: Path, out_dir: Path, cfg: ModelConfig, stored: dict[str, torch.Tensor],
           qc: quantized.QuantConfig | None) -> None:
    """Write a checkpoint directory next to out_dir and rename it into place (nothing half-written is left)."""
    meta = _source_metadata(model_dir)
    config = cfg.to_hf_dict()
    config.pop("quantization_config", None)
    if qc is not None:
        config["quantization_config"] = qc.to_dict()
        meta["cairn_quantization"] = json.dumps(qc.to_dict())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.writing-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        write_tensors({k: v.contiguous() for k, v in stored.items()}, tmp, metadata=meta)
        atomic_write_json(tmp / "config.json", config)
        copy_side_files(model_dir, tmp)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked before): replaced by the finished directory
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _source_metadata(model_dir: Path) -> dict[str, str]:
    """Provenance the source carried (e.g. the GGUF it was imported from), kept on the derived checkpoint."""
    files = sorted(set(weight_map(model_dir).values()))
    with safe_open(str(model_dir / files[0]), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return {k: v for k, v in meta.items() if k.startswith("cairn_") and k != "cairn_quantization"}


def dequantize_checkpoint(model_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
                          progress: bool = False) -> ModelConfig:
    """A quantized checkpoint as an ordinary float one holding the dequantized weights (its "twin": same numbers,
    no quantized kernels), in the checkpoint's dtype unless `dtype` is given."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not an empty directory; choose a new one")
    cfg = ModelConfig.from_hf_dir(model_dir)
    qc = quantized.quant_config(cfg)
    if qc is None:
        raise UserError(f"{model_dir} is not quantized (config.json has no quantization_config)")
    dtype = dtype or cfg.dtype
    plain = ModelConfig.from_hf_dict({k: v for k, v in cfg.to_hf_dict().items() if k != "quantization_config"})
    out: dict[str, torch.Tensor] = {}
    for n in tqdm(stage_tensor_names(plain, LayerRange(0, cfg.num_layers)), desc="dequantizing", unit="tensor",
                  disable=not progress):
        if quantized.is_quantized(qc, n):
            parts = read_tensors(model_dir, quantized.component_names(qc, n))
            out[n] = dequantize(quantized.from_tensors(qc, n, parts, str(model_dir)), TORCH_DTYPES[dtype])
        else:
            out[n] = read_tensors(model_dir, [n])[n]
    _write(model_dir, out_dir, plain.with_dtype(dtype), out, None)
    return plain
