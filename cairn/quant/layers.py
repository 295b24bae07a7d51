"""Quantized linear and embedding modules, packed for their device's kernel at construction (inference only).

    CPU   int8: torch._weight_int8pack_mm (int8 rows, one scale per row)
          int4: torch._convert_weight_to_int4pack_for_cpu + torch._weight_int4pack_mm_for_cpu
    CUDA  int8: torch._weight_int8pack_mm where the build has it
          int4: torch._convert_weight_to_int4pack + torch._weight_int4pack_mm (tinygemm, bf16)
    else: the weight dequantized once into the activation dtype, then F.linear (correct everywhere, not small).

Both int kernels compute w = (c - 8) * s + z per group (int4) or q * s per row (int8), the formulas of weights.py.
On CPU they are vectorised for bf16 activations only (fp32 is ~10x slower than a dense fp32 matmul), so the matmul
takes its input rounded to bf16 (llama.cpp rounds activations to 8 bits for its quantized matmuls) and returns the
caller's dtype; `act_dtype=torch.float32` runs the same kernels in fp32 (reference mode for tests). Every kernel is
checked once per (device, format, shape) against the dequantized matmul; one that errs or disagrees is replaced
by the dequantized fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cairn.quant.weights import QuantizedWeight, dequantize, dequantize_rows, unpack_int4

_CHECKED: dict[tuple, bool] = {}


def kernel_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """Activation dtype the quantized kernels run in for a model computing in `dtype`."""
    if device.type == "cpu":
        return torch.bfloat16
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


class QuantLinear(nn.Module):
    """y = x W^T + b with W an int8 or int4 QuantizedWeight, in the device kernel's layout. `act_dtype` (the dtype
    the kernel multiplies in) may be changed after construction; the scale tables follow it."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device | str,
                 act_dtype: torch.dtype | None = None, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        device = torch.device(device)
        self.out_features, self.in_features = qw.shape
        self.bits, self.group_size = qw.bits, qw.group_size
        self.act_dtype = act_dtype or kernel_dtype(device, compute_dtype)
        self.device, self.compute_dtype = device, compute_dtype
        self.bias = None if bias is None else bias.detach().to(device)
        self.weight_bytes = qw.nbytes()
        self._tables: dict[torch.dtype, torch.Tensor] = {}
        key = (device.type, qw.bits, qw.group_size, qw.symmetric, self.act_dtype, *qw.shape)
        ok = _CHECKED.get(key)  # None: the first layer of its kind, checked below
        if ok is not False:
            try:
                self._pack(qw, device)
            except (RuntimeError, NotImplementedError, AttributeError):
                ok = False
            if ok is None:
                ok = self._agrees(qw, device)
            _CHECKED[key] = ok
        if not ok:
            self.kind = "dequantized"
            self.w = dequantize(_to(qw, device), self.act_dtype)  # (N, K)

    def _pack(self, qw: QuantizedWeight, device: torch.device) -> None:
        N, K = qw.shape
        if qw.bits == 8 and device.type in ("cpu", "cuda"):
            self.w = _aligned(qw.qweight.to(device))  # (N, K) int8
            self.scales = qw.scales.to(device)  # (N,), as stored
            self.kind = "int8"
        elif qw.bits == 4 and device.type == "cpu":
            pad = -N % 16  # the CPU kernel packs rows in blocks of 16: pad with zero rows, drop their outputs
            codes = unpack_int4(qw.qweight).to(torch.int32)  # (N, K)
            scales, zeros = qw.scales, _zeros(qw)
            if pad:
                codes = torch.cat([codes, codes.new_full((pad, K), 8)], 0)
                scales, zeros = (torch.cat([t, t.new_zeros(pad, t.shape[1])], 0) for t in (scales, zeros))
            self.w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            self.scales = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # (K / g, N + pad, 2)
            self.mm = torch.ops.aten._weight_int4pack_mm_for_cpu
            self.kind = "int4"
        elif qw.bits == 4 and device.type == "cuda":
            if N % 8:
                raise RuntimeError("tinygemm needs rows in multiples of 8")
            tiles = next((t for t in (8, 4, 2) if K % (t * 16) == 0), None)
            if tiles is None:
                raise RuntimeError("tinygemm needs columns in multiples of 32")
            packed = qw.qweight.to(device)
            packed = (packed << 4) | (packed >> 4)  # tinygemm's input has column 2i in the high nibble
            self.w = torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), tiles)
            self.scales = torch.stack([qw.scales, _zeros(qw)], dim=-1).transpose(0, 1).contiguous().to(device)
            self.mm = torch.ops.aten._weight_int4pack_mm
            self.kind = "int4"
        else:
            raise NotImplementedError(f"no int{qw.bits} kernel for {device.type}")

    def _table(self) -> torch.Tensor:
        """The scales (int8: (N,)) or scales and zero points (int4: (K / g, N, 2)) in the activation dtype."""
        t = self._tables.get(self.act_dtype)
        if t is None:
            t = self._tables[self.act_dtype] = _aligned(self.scales.to(self.act_dtype).contiguous())
        return t

    def _agrees(self, qw: QuantizedWeight, device: torch.device) -> bool:
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(3, self.in_features, generator=gen).to(device, self.act_dtype)
        want = F.linear(probe.float(), dequantize(_to(qw, device)))
        try:
            got = self._matmul(probe).float()
        except (RuntimeError, NotImplementedError):
            return False
        tol = 1e-4 if self.act_dtype == torch.float32 else 3e-2
        return bool(torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) in act_dtype -> (M, N) in act_dtype, without bias."""
        if self.kind == "int8":
            return torch._weight_int8pack_mm(x, self.w, self._table())
        if self.kind == "int4":
            return self.mm(x, self.w, self.group_size, self._table())[:, : self.out_features]
        return F.linear(x, self.w.to(self.act_dtype))

    def weight_t(self) -> torch.Tensor:
        """W^T (K, N) in act_dtype as the kernel multiplies by it: the kernel applied to the identity."""
        eye = torch.eye(self.in_features, dtype=self.act_dtype, device=self.device)
        return self._matmul(eye)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # (M, K)
        if torch.is_grad_enabled() and x2.requires_grad:  # QLoRA: gradients flow to the input, W stays frozen
            y = _QuantMatmul.apply(x2, self)
        else:
            y = self._matmul(self._kernel_input(x2))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)  # (..., N)

    def _kernel_input(self, x2: torch.Tensor) -> torch.Tensor:
        # the kernels read their input as a dense row-major matrix (a strided view would be read wrongly)
        xa = x2.to(self.act_dtype) if x2.dtype != self.act_dtype else x2
        return xa if xa.is_contiguous() else xa.contiguous()

    def extra_repr(self) -> str:
        fmt = f"int{self.bits}" + (f" g{self.group_size}" if self.group_size else "")
        return f"in={self.in_features}, out={self.out_features}, {fmt}, kernel={self.kind}, act={self.act_dtype}"


class _QuantMatmul(torch.autograd.Function):
    """x W^T with a frozen quantized W, differentiable in x (the kernels have no backward): grad_x = grad_y W,
    with W read back through the kernel itself (weight_t), so both directions use the same weights."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer, ctx.dtype = layer, x.dtype
        return layer._matmul(layer._kernel_input(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        wt = ctx.layer.weight_t()  # (K, N)
        return (grad.to(wt.dtype) @ wt.T).to(ctx.dtype), None


class QuantEmbedding(nn.Module):
    """Rows of a quantized matrix, dequantized on lookup (the embedding; with a tied head, the same tensor)."""

    def __init__(self, qw: QuantizedWeight, device: torch.device | str, dtype: torch.dtype):
        super().__init__()
        qw = _to(qw, torch.device(device))
        zeros = None if qw.zeros is None else _aligned(qw.zeros)
        self.qw = QuantizedWeight(qw.bits, qw.group_size, _aligned(qw.qweight), _aligned(qw.scales), zeros)
        self.num_embeddings, self.embedding_dim = qw.shape
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(self.qw, ids, self.dtype)  # (..., D)

    def extra_repr(self) -> str:
        g = f" g{self.qw.group_size}" if self.qw.group_size else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.qw.bits}{g}"


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t in a fresh allocation (64-byte aligned) unless it already is one: torch's int8 CPU kernel reads its
    weight with aligned vector loads and crashes on a tensor that starts mid-buffer, as safetensors' often do."""
    if t.data_ptr() % 64 == 0 and t.is_contiguous():
        return t
    return torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)


def _to(qw: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    zeros = None if qw.zeros is None else qw.zeros.to(device)
    return QuantizedWeight(qw.bits, qw.group_size, qw.qweight.to(device), qw.scales.to(device), zeros)


def _zeros(qw: QuantizedWeight) -> torch.Tensor:
    return torch.zeros_like(qw.scales) if qw.zeros is None else qw.zeros
