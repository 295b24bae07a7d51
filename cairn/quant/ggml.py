"""llama.cpp's 32-value block formats Q4_0, Q4_1 and Q8_0, read as cairn's quantized weights without expanding them.

A GGUF tensor of these types is, per row, a run of blocks of 32 consecutive values (ggml's layout):

    Q4_0  18 bytes: d (fp16), 16 bytes of codes q in [0, 15]       value = (q - 8) d
    Q4_1  20 bytes: d (fp16), m (fp16), 16 bytes of codes           value = q d + m
    Q8_0  34 bytes: d (fp16), 32 int8 q                             value = q d

A block's byte i holds value i in its low nibble and value i + 16 in its high nibble (Q4_0, Q4_1). In cairn's int4
format (weights.py: value = (c - 8) s + z per group) Q4_0 is group 32 symmetric with s = d, and Q4_1 is group 32
asymmetric with s = d, z = m + 8 d (computed in fp32; exact for all but extreme exponent gaps). Q8_0 keeps one
scale per 32 values, where torch's int8 kernel takes one per row: it is re-rounded to int8 per row (its effect on
perplexity is measured in benchmarks/quantize.py).
"""

from __future__ import annotations

import numpy as np
import torch

from cairn.quant.weights import QuantizedWeight, pack_int4, quantize_int8

BLOCK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def _blocks(raw: np.ndarray, kind: str) -> np.ndarray:
    """(rows, row_bytes) uint8 -> (rows, blocks, block_bytes)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    size = BLOCK_BYTES[kind]
    if raw.ndim != 2 or raw.shape[1] % size:
        raise ValueError(f"{kind} rows must be whole blocks of {size} bytes, got shape {raw.shape}")
    return raw.reshape(raw.shape[0], raw.shape[1] // size, size)


def _fp16(b: np.ndarray) -> torch.Tensor:
    """(..., 2) uint8 -> (...) fp32 from little-endian fp16."""
    return torch.from_numpy(np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float32))


def _nibbles(qs: np.ndarray) -> torch.Tensor:
    """(rows, blocks, 16) bytes -> (rows, blocks * 32) codes: value i low nibble of byte i, i + 16 high nibble."""
    q = torch.from_numpy(np.ascontiguousarray(qs))
    return torch.cat([q & 0x0F, q >> 4], dim=-1).reshape(q.shape[0], -1)


def q4_0(raw: np.ndarray) -> QuantizedWeight:
    """A Q4_0 tensor (rows, row_bytes) as int4 group 32 symmetric with fp32 scales: the same values."""
    b = _blocks(raw, "Q4_0")
    return QuantizedWeight(4, BLOCK, pack_int4(_nibbles(b[..., 2:])), _fp16(b[..., 0:2]), None)


def q4_1(raw: np.ndarray) -> QuantizedWeight:
    """A Q4_1 tensor as int4 group 32 asymmetric with fp32 scales and zero points (z = m + 8 d)."""
    b = _blocks(raw, "Q4_1")
    d, m = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])
    return QuantizedWeight(4, BLOCK, pack_int4(_nibbles(b[..., 4:])), d, m + 8 * d)


def q8_0_values(raw: np.ndarray) -> torch.Tensor:
    """A Q8_0 tensor's values (rows, cols) in fp32 (exact: int8 times an fp16 scale)."""
    b = _blocks(raw, "Q8_0")
    q = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(np.float32))  # (rows, blocks, 32)
    return (q * _fp16(b[..., 0:2])[..., None]).reshape(b.shape[0], -1)


def q8_0(raw: np.ndarray) -> QuantizedWeight:
    """A Q8_0 tensor re-rounded to int8 with one fp32 scale per row (torch's int8 kernel's layout)."""
    return quantize_int8(q8_0_values(raw))


def read(raw: np.ndarray, kind: str) -> QuantizedWeight:
    """The QuantizedWeight of a GGUF tensor of type `kind` (Q4_0, Q4_1 or Q8_0)."""
    return {"Q4_0": q4_0, "Q4_1": q4_1, "Q8_0": q8_0}[kind](raw)
