"""Knowledge-distillation losses as pure functions of student logits and the teacher's distribution.

The teacher comes dense (its logits over the whole vocabulary, computed online) or sparse (its top-K logprobs per
position, read from the cache `cairn synth --save-logits K` writes). At temperature T both distributions are
softmax(logits / T); a sparse teacher is renormalised over its K tokens (mass outside them is taken as zero).
  forward KL   KL(p || q) = sum p (log p - log q)       p: teacher, q: student ("mean-seeking", torchtune's KD)
  reverse KL   KL(q || p) = sum q (log q - log p)       ("mode-seeking", MiniLLM / GKD)
  jsd          beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (GKD's generalised JSD)
Against a sparse teacher, forward KL uses the student's full softmax (gathered at the teacher's K tokens); reverse
KL and JSD, whose sums run over the student's support, use the student renormalised over the same K tokens (the
teacher has no probability elsewhere). Every divergence is multiplied by T^2 so its gradient keeps its size as T
changes (Hinton et al.), then summed over target positions like the cross-entropy it is mixed with:
  loss = alpha * CE + (1 - alpha) * KD;  alpha = 1 is plain SFT, bit for bit (the KD term is not computed)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from cairn.train.losses import lm_loss_sum

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


@dataclass(frozen=True)
class SparseTeacher:
    """The teacher's top-K per position: ids (N, K) and their logprobs (N, K) at temperature 1."""

    ids: torch.Tensor
    logprobs: torch.Tensor


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_v a (log a - log b) per row, with 0 log 0 = 0: (N,)."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: Divergence, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between teacher log-probs log_p and student log-probs log_q (same support): (N,)."""
    if kind == "forward_kl":
        return _kl(log_p, log_q)
    if kind == "reverse_kl":
        return _kl(log_q, log_p)
    if kind == "jsd":
        if beta <= 0.0:
            return _kl(log_q, log_p)  # the limits of the mixture: JSD(0) = reverse KL, JSD(1) = forward KL
        if beta >= 1.0:
            return _kl(log_p, log_q)
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    raise ValueError(f"unknown divergence {kind!r}")


def kd_loss_sum(student: torch.Tensor, teacher: torch.Tensor | SparseTeacher, labels: torch.Tensor,
                kind: Divergence = "forward_kl", temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Summed T^2-scaled divergence over target positions (labels != -100). student (B, T, V) logits; teacher
    (B, T, V) logits, or a SparseTeacher with (B, T, K) ids and logprobs; labels (B, T)."""
    mask = labels != -100
    s = student[mask].float() / temperature  # (N, V)
    if isinstance(teacher, SparseTeacher):
        ids = teacher.ids[mask].long()  # (N, K)
        log_p = torch.log_softmax(teacher.logprobs[mask].float() / temperature, -1)
        log_q_full = torch.log_softmax(s, -1)
        if kind == "forward_kl":
            log_q = log_q_full.gather(-1, ids)  # the student's own mass, outside the K tokens too
        else:
            log_q = torch.log_softmax(s.gather(-1, ids), -1)  # renormalised over the teacher's K tokens
    else:
        log_p = torch.log_softmax(teacher[mask].float() / temperature, -1)
        log_q = torch.log_softmax(s, -1)
    return divergence(log_p, log_q, kind, beta).sum() * temperature**2


def distill_loss_sum(student: torch.Tensor, teacher: torch.Tensor | SparseTeacher | None, labels: torch.Tensor,
                     alpha: float, kind: Divergence = "forward_kl", temperature: float = 1.0,
                     beta: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha * summed cross-entropy + (1 - alpha) * summed KD, and both parts (summed, detached) for metrics."""
    ce = lm_loss_sum(student, labels)
    if alpha >= 1.0 or teacher is None:
        return ce, {"ce": ce.item()}
    kd = kd_loss_sum(student, teacher, labels, kind, temperature, beta)
    return alpha * ce + (1 - alpha) * kd, {"ce": ce.item(), "kd": kd.item()}


def top_k(logits: torch.Tensor, k: int) -> SparseTeacher:
    """A dense teacher's top-K (logprobs at temperature 1): what the offline cache keeps. logits (..., V)."""
    logp = torch.log_softmax(logits.float(), -1)
    values, ids = logp.topk(min(k, logp.shape[-1]), -1)
    return SparseTeacher(ids.to(torch.int32), values)
