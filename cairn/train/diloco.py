"""DiLoCo's outer loop as pure functions: pseudo-gradients, token-weighted averaging, compression, Nesterov.

Each worker starts a round from the global weights, takes up to H inner AdamW steps on its own data, and sends
back its pseudo-gradient (start - end). The driver averages them, weighting each by the tokens its worker
processed (so a slow worker that managed fewer steps counts for less), and applies the average with an outer
Nesterov-momentum SGD step. Only deltas cross the network, once per round each way: workers send their
pseudo-gradients up; the driver sends the change of the global weights down (`Broadcast`), compressed like the
pseudo-gradients, so that every worker rebuilds the same global weights bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cairn.quant import compress as cq

Delta = dict[str, torch.Tensor]


def pseudo_gradient(start: Delta, end: Delta) -> Delta:
    """start - end per tensor: the direction the inner steps moved, signed like a gradient."""
    return {k: (start[k].float() - end[k].float()) for k in start}


def compress(delta: Delta, dtype: cq.WireDType) -> dict:
    """What a worker sends: each tensor as rows over its last dimension (vectors are one row) in `dtype` (fp32, bf16,
    int8, int4: see cairn/quant/compress.py)."""
    return {k: cq.encode_rows(v, dtype) for k, v in delta.items()}


def decompress(payload: dict, shapes: dict[str, torch.Size]) -> Delta:
    return {k: cq.decode(p, torch.float32).reshape(shapes[k]) for k, p in payload.items()}


def payload_bytes(payload: dict) -> int:
    return sum(cq.nbytes(p) for p in payload.values())


def weighted_average(deltas: list[Delta], weights: list[float]) -> Delta:
    """sum_i w_i * d_i / sum_i w_i (weights: tokens processed)."""
    if not deltas:
        raise ValueError("no deltas to average")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    out = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in deltas[0].items()}
    for d, w in zip(deltas, weights):
        for k in out:
            out[k].add_(d[k].float(), alpha=w / total)
    return out


def apply_update(held: Delta, payload: dict) -> Delta:
    """The global weights a receiver holding `held` (fp32) has after `payload`: held + decoded payload. The driver
    computes its own copy with this same function, so both sides agree bit for bit."""
    return {k: held[k] + cq.decode(p, torch.float32).reshape(held[k].shape) for k, p in payload.items()}


@dataclass
class Broadcast:
    """Sends the global weights' change of each round compressed, with error feedback: what rounding leaves out
    of one round's change is added to the next one's, so the weights workers hold never drift from the exact
    outer-optimizer trajectory by more than one round's rounding."""

    dtype: cq.WireDType
    residual: Delta = field(default_factory=dict)

    def step(self, held: Delta, new: Delta) -> tuple[dict, Delta]:
        """(payload, the weights every receiver holds after it) for moving from `held` towards `new`."""
        change = {k: new[k].float() - held[k] + self.residual.get(k, 0.0) for k in new}
        payload = compress(change, self.dtype)
        after = apply_update(held, payload)
        self.residual = {k: change[k] - (after[k] - held[k]) for k in change}
        return payload, after


@dataclass
class OuterOptimizer:
    """SGD with Nesterov momentum on the global weights: buf = mu * buf + g; w -= lr * (g + mu * buf)."""

    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True
    buffers: Delta = field(default_factory=dict)

    def step(self, weights: Delta, grad: Delta) -> Delta:
        out = {}
        for k, w in weights.items():
            g = grad[k].float()
            buf = self.buffers.get(k)
            buf = g.clone() if buf is None else buf.mul_(self.momentum).add_(g)
            self.buffers[k] = buf
            update = g + self.momentum * buf if self.nesterov else buf
            out[k] = (w.float() - self.lr * update).to(w.dtype)
        return out
