"""Activation compression between pipeline stages: fp32 (exact), bf16, or int8 with one fp32 scale per token."""

from __future__ import annotations

from typing import Literal

import torch

WireDType = Literal["fp32", "bf16", "int8"]
WIRE_DTYPES = ("fp32", "bf16", "int8")


def encode(x: torch.Tensor, wire: WireDType):
    """x (N, D) -> payload. int8: q = round(x / s), s = max|x| / 127 per row (token)."""
    if wire == "fp32":
        return x.float()
    if wire == "bf16":
        return x.to(torch.bfloat16)
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-12)  # (N, 1)
    q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)  # (N, D)
    return q, scale


def decode(payload, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(payload, tuple):
        q, scale = payload
        return (q.float() * scale).to(dtype)
    return payload.to(dtype)


def nbytes(payload) -> int:
    if isinstance(payload, tuple):
        return sum(t.numel() * t.element_size() for t in payload)
    return payload.numel() * payload.element_size()
