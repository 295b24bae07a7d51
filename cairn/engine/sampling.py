"""Sampling filters: pure functions over a logits row. The engine composes them per request."""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def apply_penalties(
    logits: torch.Tensor,
    seen: torch.Tensor,
    generated: torch.Tensor,
    repetition: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
) -> torch.Tensor:
    """logits (V,); seen: token ids of prompt + output (repetition penalty, as in CTRL / HF);
    generated: output token ids (presence and frequency penalties, as in OpenAI's API). Returns a new row."""
    out = logits.clone()
    if repetition != 1.0 and seen.numel():
        ids = seen.unique()
        vals = out[ids]
        out[ids] = torch.where(vals > 0, vals / repetition, vals * repetition)
    if (presence or frequency) and generated.numel():
        counts = torch.bincount(generated, minlength=out.numel()).to(out.dtype)  # (V,)
        out -= frequency * counts + presence * (counts > 0).to(out.dtype)
    return out


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature in (0.0, 1.0) else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties at the k-th value kept too); k <= 0 keeps all."""
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to at least p (always >= 1 token)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly above each token
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(), NEG_INF)


def sample(logits: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token from softmax(logits) with the request's own generator."""
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob) pairs of a log-softmax row."""
    if k <= 0:
        return []
    vals, ids = torch.topk(logprobs, k)
    return list(zip(ids.tolist(), vals.tolist()))
