"""Lossy tensor compression for what crosses the network: fp32 (exact), bf16, or int8 with one fp32 scale per
row. The pool's stage-to-stage activations (rows are tokens) and DiLoCo's deltas (rows are weight rows) use it."""

from __future__ import annotations

from typing import Literal

import torch

WireDType = Literal["fp32", "bf16", "int8"]
WIRE_DTYPES: tuple[str, ...] = ("fp32", "bf16", "int8")

Payload = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""A tensor (fp32, bf16), or (int8 values, fp32 scales) for int8."""


def encode(x: torch.Tensor, dtype: WireDType) -> Payload:
    """x (N, D) -> payload. int8: q = round(x / s), s = max|x| / 127 per row."""
    if dtype == "fp32":
        return x.float()
    if dtype == "bf16":
        return x.to(torch.bfloat16)
    if dtype != "int8":
        raise ValueError(f"compression must be one of {WIRE_DTYPES}, got {dtype!r}")
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-12)  # (N, 1)
    q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)  # (N, D)
    return q, scale


def decode(payload: Payload, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(payload, tuple):
        q, scale = payload
        return (q.float() * scale).to(dtype)
    return payload.to(dtype)


def nbytes(payload: Payload) -> int:
    if isinstance(payload, tuple):
        return sum(t.numel() * t.element_size() for t in payload)
    return payload.numel() * payload.element_size()


def encode_rows(t: torch.Tensor, dtype: WireDType) -> Payload:
    """Any tensor as rows over its last dimension (a vector is one row), then `encode`."""
    return encode(t.reshape(-1, t.shape[-1]) if t.ndim > 1 else t.reshape(1, -1), dtype)
