"""Placement: split a model's layers into contiguous stages over devices. A pure function over explicit inputs.

Every stage must fit its device's memory budget (weights + the KV blocks budgeted for its layers + activation
workspace); among feasible splits we minimise the slowest stage's time per decode step, estimated
from each device's measured memory bandwidth and matmul throughput. Devices that would get no layer are left out.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from cairn.config import ModelConfig
from cairn.errors import CapacityError
from cairn.types import LayerRange

GiB = 1024**3


@dataclass(frozen=True)
class DeviceSpec:
    """One device offered to the pool."""

    id: str
    """Unique name, e.g. 'node-a/cpu' or 'node-b/cuda:0'."""
    memory: int
    """Bytes the device may use for this model."""
    bandwidth: float
    """Measured memory read bandwidth, bytes/s."""
    flops: float
    """Measured matmul throughput, FLOP/s."""


@dataclass(frozen=True)
class ModelShape:
    """What placement needs to know about a model, per layer and for the ends."""

    num_layers: int
    layer_bytes: int
    """Weights of one block."""
    kv_bytes_per_layer: int
    """KV cache of one block (layer) that a stage must hold: the KV positions budgeted (see from_config)."""
    embed_bytes: int
    """Embedding matrix (first stage)."""
    head_bytes: int
    """Final norm + LM head (last stage; a tied head needs its own copy of the embedding)."""
    act_bytes: int
    """Activation workspace a stage needs (largest step batch)."""
    layer_flops: float
    """FLOPs of one block per decode step (2 x params x tokens in the step)."""
    head_flops: float

    @classmethod
    def from_config(cls, cfg: ModelConfig, dtype_bytes: int, max_context: int, max_seqs: int,
                    max_batch_tokens: int = 256, stored: dict[str, int] | None = None,
                    kv_tokens: int | None = None) -> "ModelShape":
        """`stored`: bytes of one block, the embedding and the head as a quantized checkpoint holds them
        ({"layer", "embed", "head"}); None: parameters x dtype_bytes. `kv_tokens`: KV positions to budget, all
        sequences together (a paged cache: e.g. one whole context, or what --kv-memory holds); None: max_seqs x
        max_context (every sequence a whole context)."""
        d, f = cfg.hidden_size, cfg.intermediate_size
        layer_params = d * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * d + 3 * d * f + 2 * d
        kv = 2 * cfg.kv_size * (max_context * max_seqs if kv_tokens is None else kv_tokens) * dtype_bytes
        embed = cfg.vocab_size * d * dtype_bytes
        # workspace: the widest intermediate (qkv, gate/up, logits) for the largest step, fp32
        act = max_batch_tokens * max(2 * f, cfg.q_size + 2 * cfg.kv_size, d) * 4 * 3 + max_seqs * cfg.vocab_size * 4
        sizes = stored or {"layer": layer_params * dtype_bytes, "embed": embed, "head": embed + d * dtype_bytes}
        return cls(cfg.num_layers, sizes["layer"], kv, sizes["embed"], sizes["head"], act,
                   2.0 * layer_params * max_seqs, 2.0 * cfg.vocab_size * d * max_seqs)


@dataclass(frozen=True)
class Stage:
    device: str
    layers: LayerRange
    memory: int
    """Bytes this stage needs on its device."""
    time: float
    """Estimated seconds per decode step."""


@dataclass(frozen=True)
class Placement:
    stages: tuple[Stage, ...]

    @property
    def bottleneck(self) -> float:
        return max(s.time for s in self.stages)

    def describe(self) -> str:
        return ", ".join(f"{s.device}: layers {s.layers} ({s.memory / GiB:.2f} GiB, {s.time * 1e3:.1f} ms)"
                         for s in self.stages)


class PlacementError(CapacityError):
    """The pool cannot hold the model."""


def kv_blocks(shape: ModelShape, placement: Placement, memory: dict[str, int], block_layer_bytes: int,
              cap: int) -> int:
    """KV blocks every stage can hold (block ids are shared by all stages, each holding its layers' part): what
    each stage's device (`memory`, by device id) has left after its weights and workspace, over its layers' share
    of a block (`block_layer_bytes` per layer), the least over the stages, at most `cap`. Placement has already
    set aside shape.kv_bytes_per_layer per layer, so this is at least that many positions' worth."""
    n = cap
    for st in placement.stages:
        layers = len(st.layers)
        spare = memory[st.device] - st.memory + layers * shape.kv_bytes_per_layer
        n = min(n, spare // (layers * block_layer_bytes))
    return max(0, n)


def _stage_cost(shape: ModelShape, dev: DeviceSpec, layers: LayerRange) -> tuple[int, float]:
    first, last = layers.start == 0, layers.end == shape.num_layers
    n = len(layers)
    mem = n * (shape.layer_bytes + shape.kv_bytes_per_layer) + shape.act_bytes
    read = n * shape.layer_bytes + (shape.head_bytes if last else 0)
    flops = n * shape.layer_flops + (shape.head_flops if last else 0)
    mem += (shape.embed_bytes if first else 0) + (shape.head_bytes if last else 0)
    return mem, read / dev.bandwidth + flops / dev.flops


def _greedy(shape: ModelShape, order: list[DeviceSpec], limit: float) -> list[Stage] | None:
    """Give each device in turn as many layers as fit its memory and the time limit; None if layers remain."""
    stages, start = [], 0
    for dev in order:
        if start == shape.num_layers:
            break
        end = start
        while end < shape.num_layers:
            mem, t = _stage_cost(shape, dev, LayerRange(start, end + 1))
            if mem > dev.memory or t > limit:
                break
            end += 1
        if end > start:
            mem, t = _stage_cost(shape, dev, LayerRange(start, end))
            stages.append(Stage(dev.id, LayerRange(start, end), mem, t))
            start = end
    return stages if start == shape.num_layers else None


def _orders(devices: list[DeviceSpec]):
    if len(devices) <= 5:
        yield from (list(p) for p in itertools.permutations(devices))
        return
    yield sorted(devices, key=lambda d: -d.bandwidth)
    yield sorted(devices, key=lambda d: -d.memory)
    yield list(devices)


def partition(shape: ModelShape, devices: list[DeviceSpec]) -> Placement:
    """The feasible contiguous split with the smallest bottleneck stage time (fewest stages on ties).

    Raises PlacementError, with needed vs available bytes, when no split fits."""
    if not devices:
        raise PlacementError("the pool has no devices")
    if len({d.id for d in devices}) != len(devices):
        raise PlacementError("device ids must be unique")
    best: list[Stage] | None = None
    for order in _orders(devices):
        if _greedy(shape, order, float("inf")) is None:
            continue  # memory alone rules this order out
        lo, hi = 0.0, max(_stage_cost(shape, d, LayerRange(0, shape.num_layers))[1] for d in order)
        found = _greedy(shape, order, hi)
        if found is None:  # the whole model on one device is slower than some split: widen the bound
            hi = sum(_stage_cost(shape, d, LayerRange(0, shape.num_layers))[1] for d in order)
            found = _greedy(shape, order, hi)
        for _ in range(50):
            mid = (lo + hi) / 2
            trial = _greedy(shape, order, mid)
            if trial is None:
                lo = mid
            else:
                hi, found = mid, trial
        key = (max(s.time for s in found), len(found))
        if best is None or key < (max(s.time for s in best), len(best)):
            best = found
    if best is None:
        need = shape.num_layers * (shape.layer_bytes + shape.kv_bytes_per_layer) + shape.embed_bytes + \
            shape.head_bytes + shape.act_bytes
        have = sum(d.memory for d in devices)
        biggest = max(d.memory for d in devices)
        raise PlacementError(
            f"the pool cannot hold the model: it needs at least {need / GiB:.2f} GiB (weights + KV cache + "
            f"workspace) and the {len(devices)} device(s) offer {have / GiB:.2f} GiB in all, the largest "
            f"{biggest / GiB:.2f} GiB; add devices, raise --memory budgets, or lower --kv-memory or --max-context"
        )
    return Placement(tuple(best))
