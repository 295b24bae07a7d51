"""Lossy tensor compression for what crosses the network: the pool's stage-to-stage activations (rows are tokens)
and DiLoCo's deltas (rows are weight rows; a vector is one row).

Formats (`WIRE_DTYPES`):
- fp32: exact. bf16: 2 bytes a value. Both carry non-finite values as they are.
- int8 and int4 (`BLOCK_FORMATS`), made for real activations, whose few outlier channels (SmolLM2's residual
  stream reaches 24917 in one channel where a typical value is near 1) ruin one scale per row. Each row:
  1. outliers: its k largest |x| are sent apart, exactly (fp32 value + column index), and zeroed; k is one per
     128 columns (int8) or 64 (int4), so bytes per value are the same at any width (576 columns: 4 or 9);
  2. the rest is cut into blocks of 32 columns (the last one zero-padded) and each block is rotated,
     y = H x / 32 with H the 32 x 32 Sylvester Hadamard matrix (entries +-1; H H = 32 I): a block's few large
     values are spread over all its entries, so one scale fits the block;
  3. each rotated block gets one bf16 scale s = max|y| / L, rounded up so that no code exceeds L, and codes
     round(y / s) in [-L, L]: int8 L = 127; int4 L = 7, two codes a byte (code + 8, even column in the low nibble).
  Decoding: y = code * s, x = H y, then the outliers are put back. Decoding is elementwise arithmetic and
  butterflies of additions (no matrix product), so every machine rebuilds the same bits from a payload (DiLoCo's
  broadcast relies on that). These two refuse non-finite input.
  On SmolLM2 over 3 stages (benchmarks/pipeline.py) the rotation cut the int8 wire's logit error by ~40% and the
  outliers by ~8x; int8 with one scale per row moved logits by up to 5.3 and changed 12% of argmax tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cairn.quant.weights import pack_int4, unpack_int4

WireDType = Literal["fp32", "bf16", "int8", "int4"]
WIRE_DTYPES: tuple[str, ...] = ("fp32", "bf16", "int8", "int4")


@dataclass(frozen=True)
class BlockFormat:
    """A block-quantized format (the module docstring has the formulas)."""

    bits: int
    """8 or 4: codes in [-L, L], L = 2 ** (bits - 1) - 1."""
    block: int
    """Columns per scale and per Hadamard rotation: a power of two."""
    outlier_every: int
    """One outlier (a largest |x| of the row, sent apart exactly) per this many columns; 0: none."""

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.block < 2 or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two of at least 2, got {self.block}")
        if self.outlier_every < 0:
            raise ValueError(f"outlier_every must not be negative, got {self.outlier_every}")

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def outliers(self, width: int) -> int:
        """How many values of a row of `width` are sent apart."""
        return width // self.outlier_every if self.outlier_every else 0


BLOCK_FORMATS: dict[str, BlockFormat] = {"int8": BlockFormat(8, 32, 128), "int4": BlockFormat(4, 32, 64)}


@dataclass(frozen=True)
class Blocks:
    """An (N, width) tensor in a `BlockFormat`: what int8 / int4 send."""

    fmt: BlockFormat
    width: int
    codes: torch.Tensor
    """(N, nb * block) int8, or for 4 bits (N, nb * block / 2) uint8; nb = ceil(width / block)."""
    scales: torch.Tensor
    """(N, nb) bf16."""
    index: torch.Tensor
    """(N, k) int16 (int32 for widths over 32767): the outliers' columns."""
    values: torch.Tensor
    """(N, k) fp32: the outliers' values."""


Payload = torch.Tensor | Blocks
"""A tensor (fp32, bf16), or Blocks (int8, int4)."""


def encode(x: torch.Tensor, dtype: WireDType) -> Payload:
    """x (N, D) -> payload in format `dtype`."""
    if dtype == "fp32":
        return x.float()
    if dtype == "bf16":
        return x.to(torch.bfloat16)
    if dtype not in BLOCK_FORMATS:
        raise ValueError(f"compression must be one of {WIRE_DTYPES}, got {dtype!r}")
    return encode_blocks(x, BLOCK_FORMATS[dtype])


def decode(payload: Payload, dtype: torch.dtype) -> torch.Tensor:
    """payload -> (N, D) tensor of `dtype`."""
    if isinstance(payload, Blocks):
        return decode_blocks(payload).to(dtype)
    return payload.to(dtype)


def nbytes(payload: Payload) -> int:
    """Bytes of the payload's tensors (what a link carries, less a few bytes of framing)."""
    if isinstance(payload, Blocks):
        return sum(t.numel() * t.element_size() for t in (payload.codes, payload.scales, payload.index,
                                                          payload.values))
    return payload.numel() * payload.element_size()


def row_bytes(dtype: WireDType, width: int) -> int:
    """Bytes one row of `width` values takes in format `dtype` (= nbytes of an encoded row)."""
    if dtype == "fp32":
        return 4 * width
    if dtype == "bf16":
        return 2 * width
    if dtype not in BLOCK_FORMATS:
        raise ValueError(f"compression must be one of {WIRE_DTYPES}, got {dtype!r}")
    fmt = BLOCK_FORMATS[dtype]
    nb = -(-width // fmt.block)
    k = fmt.outliers(width)
    return nb * fmt.block * fmt.bits // 8 + 2 * nb + k * (_index_dtype(width).itemsize + 4)


def encode_rows(t: torch.Tensor, dtype: WireDType) -> Payload:
    """Any tensor as rows over its last dimension (a vector is one row), then `encode`."""
    return encode(t.reshape(-1, t.shape[-1]) if t.ndim > 1 else t.reshape(1, -1), dtype)


def encode_blocks(x: torch.Tensor, fmt: BlockFormat) -> Blocks:
    """x (N, D), finite -> Blocks (outliers apart, Hadamard-rotated blocks, one bf16 scale per block)."""
    if x.ndim != 2:
        raise ValueError(f"block encoding takes (rows, columns), got shape {tuple(x.shape)}")
    x = x.detach().float()
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"cannot encode non-finite values (first at row {bad[0]}, column {bad[1]}): use fp32 or "
                         "bf16 to carry them, or find where they come from")
    n, d = x.shape
    k = fmt.outliers(d)
    index = x.abs().topk(k, dim=-1).indices  # (N, k)
    values = x.gather(-1, index)  # (N, k)
    rest = x.scatter(-1, index, 0.0)
    nb = -(-d // fmt.block)
    rest = torch.nn.functional.pad(rest, (0, nb * fmt.block - d)).view(n, nb, fmt.block)  # (N, nb, B)
    y = hadamard(rest * (1.0 / fmt.block))  # (N, nb, B): H x / B, never above max|x|
    scales = _bf16_at_least(y.abs().amax(-1) / fmt.levels)  # (N, nb) bf16
    s = scales.float()[..., None]  # (N, nb, 1)
    codes = torch.where(s > 0, torch.round(y / torch.where(s > 0, s, 1.0)), 0.0).clamp(-fmt.levels, fmt.levels)
    codes = codes.to(torch.int8).view(n, nb * fmt.block)  # (N, nb * B)
    if fmt.bits == 4:
        codes = pack_int4((codes + 8).to(torch.uint8))  # (N, nb * B / 2): codes + 8 in [1, 15], two a byte
    return Blocks(fmt, d, codes, scales, index.to(_index_dtype(d)), values)


def decode_blocks(p: Blocks) -> torch.Tensor:
    """Blocks -> (N, D) float32."""
    fmt, codes = p.fmt, p.codes
    n, nb = p.scales.shape
    if fmt.bits == 4:
        codes = unpack_int4(codes).to(torch.int8) - 8  # (N, nb * B)
    y = codes.float().view(n, nb, fmt.block) * p.scales.float()[..., None]  # (N, nb, B)
    x = hadamard(y).view(n, nb * fmt.block)[:, : p.width]  # (N, D)
    return x.scatter(-1, p.index.long(), p.values)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """H x over the last dimension (a power of two, n): H is the n x n Sylvester Hadamard matrix
    (H_1 = [1], H_2m = [[H_m, H_m], [H_m, -H_m]]), applied by log2(n) rounds of butterflies (a + b, a - b)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)  # (..., n / 2h, 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x


def _bf16_at_least(s: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 >= s, for finite s >= 0 (float32): keep the top 16 bits, rounding up."""
    bits = s.float().contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & -0x10000).view(torch.float32).to(torch.bfloat16)


def _index_dtype(width: int) -> torch.dtype:
    return torch.int16 if width <= 2**15 else torch.int32
