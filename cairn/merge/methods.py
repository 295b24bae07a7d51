"""Merge formulas: pure functions over torch tensors, one per method, matching mergekit 0.1.5 formula for formula.

Each function takes the input tensors of one output tensor (same shape and dtype) and returns the merged tensor in
that dtype. As in mergekit, linear and slerp compute in float32 (float64 for float64 inputs); the others compute in
the inputs' dtype (a recipe's `dtype: bfloat16` merges in bfloat16). `apply` dispatches a method by name with
parameters already resolved for that tensor.

The task-arithmetic family works on deltas d_i = m_i - base: each is trimmed ("sparsified"), scaled by its weight,
optionally filtered by a sign election, summed, optionally divided by the sum of the weights that contributed, and
scaled by lambda. Rescaling after trimming (`rescale: true`) restores each delta's L1 norm, as mergekit 0.1.5 does
(for DARE's random drop this equals the 1/density rescale in expectation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cairn.errors import UserError
from cairn.merge.recipe import MethodSpec

Tensor = torch.Tensor


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The working precision of linear and slerp: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear(tensors: Sequence[Tensor], weights: Sequence[float], normalize: bool = True) -> Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when normalize (computed in float32 or float64)."""
    work = _wide(tensors[0].dtype)
    w = torch.tensor(list(weights), dtype=work)
    total = w.sum()
    if normalize and total == 0:
        raise UserError(f"linear merge weights {list(weights)} sum to 0 with normalize: true; change the weights or "
                        "set normalize: false", param="weight")
    result = torch.zeros_like(tensors[0], dtype=work)
    for x, wi in zip(tensors, w):
        result.addcmul_(x, wi)
    if normalize:
        result.div_(total)
    return result.to(tensors[0].dtype)


def slerp(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation from v0 (t=0) to v1 (t=1) along the great circle through their directions (the
    tensors flattened), on the unnormalized tensors; linear interpolation when |cos| > dot_threshold (nearly
    colinear or opposite). A norm <= eps counts as 1. Computed in float32 (float64 for float64 inputs)."""
    work = _wide(v0.dtype)
    a, b = v0.reshape(-1).to(work), v1.reshape(-1).to(work)  # (n,)
    if a.numel() == 0:
        return v0.clone()
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > eps, norm_b, torch.ones_like(norm_b))
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    t = torch.tensor(t, dtype=work)  # t rounded to the working precision, as mergekit does
    if dot.abs() > dot_threshold:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    coef_a = torch.sin((1 - t) * theta) / sin_theta
    coef_b = torch.sin(t * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(v0.shape).to(v0.dtype)


def rescale_l1(delta: Tensor, masked: Tensor, eps: float = 1e-7) -> Tensor:
    """masked scaled so its L1 norm equals delta's (unchanged when either norm is below eps)."""
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude_prune(delta: Tensor, density: float, rescale: bool = False) -> Tensor:
    """Keep the max(1, int(density * n)) largest-magnitude elements, zero the rest (TIES trimming)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    keep = torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]  # ties broken as mergekit's
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[keep] = 1
    masked = delta * mask.reshape(delta.shape)
    return rescale_l1(delta, masked) if rescale else masked


def random_prune(delta: Tensor, density: float, rescale: bool = True, generator: torch.Generator | None = None
                 ) -> Tensor:
    """Keep each element independently with probability density (DARE's drop-and-rescale)."""
    if density >= 1:
        return delta
    probs = torch.full(delta.shape, float(density), dtype=torch.float32, device=delta.device)
    mask = torch.bernoulli(probs, generator=generator).to(delta.dtype)
    masked = delta * mask
    return rescale_l1(delta, masked) if rescale else masked


def outlier_prune(delta: Tensor, density: float, gamma: float, rescale: bool = False) -> Tensor:
    """Model Breadcrumbs: drop the int(gamma * n) largest-magnitude elements and the smallest beyond them, keeping
    int(density * n) (the outlier cut shrinks when density leaves no room for it)."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep_n = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - keep_n - n_top)
    order = torch.sort(delta.abs().reshape(-1).float()).indices  # ascending magnitude
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[n_bottom:n_bottom + keep_n]] = 1
    masked = delta * mask.reshape(delta.shape)
    return rescale_l1(delta, masked) if rescale else masked


def sign_consensus(deltas: Tensor) -> Tensor:
    """TIES sign election over stacked weighted deltas (N, ...): True where a delta's sign equals the sign of the
    elementwise sum (a zero sum elects +)."""
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return deltas.sign() == majority


def task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    densities: Sequence[float] | None = None,
    gammas: Sequence[float] | None = None,
    sparsify: str | None = None,
    consensus: bool = False,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """mergekit's generalized task arithmetic: base + lambda * combine_i(w_i * trim(m_i - base)).

    sparsify: None, "magnitude" (TIES), "random" (DARE, uses generator) or "magnitude_outliers" (Breadcrumbs, uses
    gammas). consensus: keep only weighted deltas whose sign matches the elected sign. normalize: divide by the
    sum of the weights that contributed at each element (all of them without consensus)."""
    if not tensors:
        return base
    densities = densities if densities is not None else [1.0] * len(tensors)
    deltas = base.new_empty((len(tensors), *base.shape))  # (N, *shape)
    for i, x in enumerate(tensors):
        delta = x - base
        if sparsify == "magnitude":
            delta = magnitude_prune(delta, densities[i], rescale)
        elif sparsify == "random":
            delta = random_prune(delta, densities[i], rescale, generator)
        elif sparsify == "magnitude_outliers":
            delta = outlier_prune(delta, densities[i], gammas[i] if gammas is not None else 0.01, rescale)
        elif sparsify is not None:
            raise ValueError(f"unknown sparsification {sparsify!r}")
        deltas[i] = delta
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
    w = w.reshape(-1, *([1] * base.dim()))  # (N, 1, ..., 1)
    deltas.mul_(w)
    if consensus:
        mask = sign_consensus(deltas)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


def ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float], *,
         normalize: bool = True, rescale: bool = False, lambda_: float = 1.0) -> Tensor:
    """TIES: trim each delta to its top-density magnitudes, elect a sign per element by the sum of weighted
    deltas, average the agreeing ones (weights of the agreeing deltas as divisor when normalize)."""
    return task_arithmetic(base, tensors, weights, densities=densities, sparsify="magnitude", consensus=True,
                           normalize=normalize, rescale=rescale, lambda_=lambda_)


def dare_linear(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
                generator: torch.Generator | None = None, *, normalize: bool = False, rescale: bool = True,
                lambda_: float = 1.0) -> Tensor:
    """DARE: drop each delta element with probability 1 - density (rescaled), then task arithmetic."""
    return task_arithmetic(base, tensors, weights, densities=densities, sparsify="random", normalize=normalize,
                           rescale=rescale, lambda_=lambda_, generator=generator)


def dare_ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
              generator: torch.Generator | None = None, *, normalize: bool = False, rescale: bool = True,
              lambda_: float = 1.0) -> Tensor:
    """DARE's random drop followed by TIES' sign election."""
    return task_arithmetic(base, tensors, weights, densities=densities, sparsify="random", consensus=True,
                           normalize=normalize, rescale=rescale, lambda_=lambda_, generator=generator)


def breadcrumbs(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
                gammas: Sequence[float], *, consensus: bool = False, normalize: bool = False, rescale: bool = False,
                lambda_: float = 1.0) -> Tensor:
    """Model Breadcrumbs: drop each delta's largest gamma fraction and smallest beyond density, then task
    arithmetic (with TIES' sign election when consensus: breadcrumbs_ties)."""
    return task_arithmetic(base, tensors, weights, densities=densities, gammas=gammas,
                           sparsify="magnitude_outliers", consensus=consensus, normalize=normalize,
                           rescale=rescale, lambda_=lambda_)


def model_stock(base: Tensor, tensors: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock: t * mean(m_i) + (1 - t) * base with t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine
    of the deltas m_i - base (per row when filter_wise; the base where 1 + (N - 1) cos is ~0)."""
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base  # (rows, cols)
        ws = [x.unsqueeze(0) if x.dim() == 1 else x for x in tensors]
    else:
        w0, ws = base.reshape(-1), [x.reshape(-1) for x in tensors]  # (n,)
    offsets = [x - w0 for x in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)  # (rows, 1) or (1,)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / safe)
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


def passthrough(tensor: Tensor, scale: float | None = None) -> Tensor:
    """The single input, multiplied by scale when given."""
    return tensor if scale is None else tensor * scale


def apply(method: MethodSpec, tensors: Sequence[Tensor], base_index: int | None, shared: Mapping[str, Any],
          per_input: Sequence[Mapping[str, Any]], generator: torch.Generator | None = None) -> Tensor:
    """Merge the inputs of one output tensor with `method`; shared and per-input (same order as tensors)
    parameters already resolved for this tensor. base_index: which input is the base (None without one; linear
    and passthrough ignore it)."""
    name = method.name
    if name == "linear":
        return linear(tensors, [p["weight"] for p in per_input], shared["normalize"])
    if name == "passthrough":
        return passthrough(tensors[0], per_input[0]["scale"])
    if base_index is None:
        raise ValueError(f"{name} needs a base input")
    base = tensors[base_index]
    others = [x for i, x in enumerate(tensors) if i != base_index]
    params = [p for i, p in enumerate(per_input) if i != base_index]
    if name == "slerp":
        return slerp(shared["t"], base, others[0])
    if name == "model_stock":
        return model_stock(base, others, shared["filter_wise"])
    return task_arithmetic(
        base, others, [p["weight"] for p in params], densities=[p["density"] for p in params],
        gammas=[p["gamma"] for p in params] if method.sparsify == "magnitude_outliers" else None,
        sparsify=method.sparsify, consensus=method.consensus, normalize=shared["normalize"],
        rescale=shared["rescale"], lambda_=shared["lambda"], generator=generator,
    )
