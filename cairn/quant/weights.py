"""Quantized weight formats: int8 with one scale per output row, int4 in groups along the input dimension.

Pure functions over torch tensors, device-neutral (the kernels' layouts are made at load, in layers.py):

    int8  (rows N, cols K):  w ~= q * s[n]                       q int8 in [-127, 127], s = max|w[n]| / 127
    int4, group g along K:   w ~= (c - 8) * s[n, j] + z[n, j]     c in [0, 15] for columns j*g .. j*g + g - 1
      symmetric:   z = 0 and s = (the group's value of largest magnitude) / -8, so that value is exactly c = 0
                   (llama.cpp's Q4_0 rule: 16 levels, the extreme one on the side that needs it)
      asymmetric:  s = (max - min) / 15 and z = min + 8 s, so min and max are c = 0 and c = 15 (Q4_1's grid,
                   with the zero point at the middle code as torch's int4 kernels and torchao take it)

int4 codes are stored two per byte, column 2i in the low nibble and 2i + 1 in the high one: (N, K / 2) uint8.
Scales (and zero points) are stored in `scale_dtype` and the codes are rounded against the stored (rounded)
values, so dequantize() gives exactly the weights a kernel with those scales multiplies by.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cairn.errors import UserError

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QuantFormatError(UserError):
    """A quantization format or a tensor shape that cannot be quantized as asked."""

    code = "invalid_quantization"


@dataclass(frozen=True)
class QuantFormat:
    """How a matrix is quantized."""

    bits: int
    """8 (one scale per output row) or 4 (groups along the input dimension)."""
    group_size: int | None = None
    """int4: columns sharing a scale (32, 64 or 128); None for int8."""
    symmetric: bool = False
    """int4: no zero point (codes centred on 8). int8 is always symmetric (set to True)."""
    scale_dtype: str = "float32"
    """Stored dtype of scales and zero points: float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise QuantFormatError(f"--bits must be 8 or 4, got {self.bits}", param="bits")
        if self.bits == 8 and self.group_size is not None:
            raise QuantFormatError("int8 keeps one scale per output row (torch's int8 kernel); --group-size is for "
                                   "--bits 4", param="group_size")
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise QuantFormatError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))} for int4, got "
                                   f"{self.group_size}", param="group_size")
        if self.bits == 8:
            object.__setattr__(self, "symmetric", True)  # int8 has no zero point
        if self.scale_dtype not in SCALE_DTYPES:
            raise QuantFormatError(f"scale dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}",
                                   param="scale_dtype")

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise QuantFormatError unless a (rows, cols) matrix can take this format."""
        if len(shape) != 2:
            raise QuantFormatError(f"{name} has shape {tuple(shape)}; only matrices can be quantized")
        if self.bits == 4 and shape[1] % self.group_size:
            fits = [g for g in GROUP_SIZES if shape[1] % g == 0]
            hint = (f"use --group-size {' or '.join(map(str, fits))}" if fits else
                    "no int4 group size divides it; keep it unquantized with --keep")
            raise QuantFormatError(f"{name} has {shape[1]} input columns, which do not divide into groups of "
                                   f"{self.group_size}; {hint}")

    def bits_per_weight(self) -> float:
        """Stored bits per weight of a matrix with many columns, scales and zero points included."""
        if self.bits == 8:
            return 8.0
        per_group = (1 if self.symmetric else 2) * torch.finfo(SCALE_DTYPES[self.scale_dtype]).bits
        return 4 + per_group / self.group_size

    def stored_bytes(self, rows: int, cols: int) -> int:
        """Bytes a (rows, cols) matrix takes stored in this format."""
        sbytes = torch.finfo(SCALE_DTYPES[self.scale_dtype]).bits // 8
        if self.bits == 8:
            return rows * cols + rows * sbytes
        groups = rows * (cols // self.group_size)
        return rows * cols // 2 + groups * sbytes * (1 if self.symmetric else 2)


@dataclass(frozen=True)
class QuantizedWeight:
    """A (rows, cols) matrix in a QuantFormat: int8 values or packed int4 codes, scales, zero points."""

    bits: int
    group_size: int | None
    qweight: torch.Tensor
    """int8 (N, K), or uint8 (N, K / 2) holding two int4 codes per byte."""
    scales: torch.Tensor
    """(N,) for int8; (N, K / group_size) for int4."""
    zeros: torch.Tensor | None = None
    """(N, K / group_size) zero points (the value of code 8) for asymmetric int4; None otherwise."""

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.qweight.shape
        return rows, cols * (2 if self.bits == 4 else 1)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)


def quantize(w: torch.Tensor, fmt: QuantFormat, name: str = "the tensor") -> QuantizedWeight:
    """Round-to-nearest quantization of a (rows, cols) matrix."""
    fmt.check_shape(name, tuple(w.shape))
    sdt = SCALE_DTYPES[fmt.scale_dtype]
    if fmt.bits == 8:
        return quantize_int8(w, sdt)
    scales, zeros = int4_params(w, fmt.group_size, fmt.symmetric, sdt)
    return QuantizedWeight(4, fmt.group_size, pack_int4(int4_codes(w, scales, zeros)), scales, zeros)


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """q = round(w / s) in [-127, 127], s = max|w| / 127 per row (a zero row gets s = 0, q = 0)."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).to(scale_dtype)  # (N,)
    s = scales.float().clamp(min=torch.finfo(torch.float32).tiny)[:, None]  # (N, 1)
    q = torch.round(w / s).clamp(-127, 127).to(torch.int8)  # (N, K)
    return QuantizedWeight(8, None, q, scales)


def int4_params(w: torch.Tensor, group_size: int, symmetric: bool,
                scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest scales and zero points (N, K / g), in scale_dtype, from each group's range."""
    rows, cols = w.shape
    wg = w.float().reshape(rows, cols // group_size, group_size)  # (N, G, g)
    if symmetric:
        idx = wg.abs().argmax(dim=-1, keepdim=True)  # (N, G, 1)
        return (wg.gather(-1, idx)[..., 0] / -8).to(scale_dtype), None
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # (N, G)
    scales = ((hi - lo) / 15).to(scale_dtype)
    return scales, (lo + 8 * scales.float()).to(scale_dtype)


def int4_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """Codes c = clamp(round((w - z) / s) + 8, 0, 15) (N, K) uint8 for given per-group scales and zero points."""
    rows, cols = w.shape
    groups = scales.shape[1]
    wg = w.float().reshape(rows, groups, cols // groups)  # (N, G, g)
    s = scales.float()[..., None]  # (N, G, 1)
    s = torch.where(s == 0, torch.ones_like(s), s)  # a constant group: every code is 8 (the zero point)
    if zeros is not None:
        wg = wg - zeros.float()[..., None]
    return (torch.round(wg / s) + 8).clamp(0, 15).to(torch.uint8).reshape(rows, cols)


def int4_values(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(c - 8) * s + z for codes (N, K) and per-group scales/zero points (N, K / g)."""
    rows, cols = codes.shape
    groups = scales.shape[1]
    c = codes.reshape(rows, groups, cols // groups).float() - 8  # (N, G, g)
    w = c * scales.float()[..., None]
    if zeros is not None:
        w = w + zeros.float()[..., None]
    return w.reshape(rows, cols).to(dtype)


def fake_quantize(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """dequantize(quantize(w, fmt)) without packing the codes (what calibration searches evaluate)."""
    fmt.check_shape("the tensor", tuple(w.shape))
    sdt = SCALE_DTYPES[fmt.scale_dtype]
    if fmt.bits == 8:
        return dequantize(quantize_int8(w, sdt))
    scales, zeros = int4_params(w, fmt.group_size, fmt.symmetric, sdt)
    return int4_values(int4_codes(w, scales, zeros), scales, zeros)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (rows, cols) matrix a QuantizedWeight stands for."""
    if qw.bits == 8:
        return (qw.qweight.float() * qw.scales.float()[:, None]).to(dtype)
    return int4_values(unpack_int4(qw.qweight), qw.scales, qw.zeros, dtype)


def dequantize_rows(qw: QuantizedWeight, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `rows` (any shape of indices) of the matrix: an embedding lookup without expanding the whole table."""
    flat = rows.reshape(-1)
    zeros = None if qw.zeros is None else qw.zeros[flat]
    part = QuantizedWeight(qw.bits, qw.group_size, qw.qweight[flat], qw.scales[flat], zeros)
    return dequantize(part, dtype).reshape(*rows.shape, qw.shape[1])


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K / 2) uint8: column 2i in the low nibble, 2i + 1 in the high one."""
    if codes.shape[-1] % 2:
        raise QuantFormatError(f"int4 packing needs an even number of columns, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K / 2) uint8 -> (N, K) codes in [0, 15]."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Matrices stacked along the output rows (fused q/k/v, gate/up): every row keeps its own scales."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if any(p.bits != first.bits or p.group_size != first.group_size or p.symmetric != first.symmetric
           or p.shape[1] != first.shape[1] for p in parts):
        raise QuantFormatError("fused matrices must share one quantization format and width")
    zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts], 0)
    return QuantizedWeight(first.bits, first.group_size, torch.cat([p.qweight for p in parts], 0),
                           torch.cat([p.scales for p in parts], 0), zeros)
