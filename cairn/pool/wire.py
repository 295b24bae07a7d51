"""What crosses the network in a pipeline: activations between stages (fp32 (exact), bf16, or int8 with one fp32
scale per token), and the chosen tokens the last stage sends back."""

from __future__ import annotations

from typing import Literal

import torch

from cairn.engine.sampling import Choice

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


def encode_choices(choices: list[Choice | None]) -> tuple[list[int], dict[int, tuple[float, tuple]]]:
    """What the last stage sends back per step: one token id per row (-1 where none was due), plus the logprobs of
    the rows that asked for them, by row. Token ids only, never logits."""
    ids = [-1 if c is None else c.token_id for c in choices]
    extra = {i: (c.logprob, c.top) for i, c in enumerate(choices) if c is not None and c.logprob is not None}
    return ids, extra


def decode_choices(reply: tuple[list[int], dict[int, tuple[float, tuple]]]) -> list[Choice | None]:
    ids, extra = reply
    return [None if t < 0 else Choice(t, *extra[i]) if i in extra else Choice(t) for i, t in enumerate(ids)]
