"""The pool on Ray: stage actors pinned to nodes, the PipelineRunner that drives them, and failover.

This is the only module that imports `ray`. Each pool node declares its one device through Ray custom resources
(the device marker, its memory budget and measured speeds), so Ray's own node table is the registry; placement
reads it, actors are pinned with node affinity, and a node that dies or leaves simply disappears from it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cairn.config import ModelConfig
from cairn.engine.runner import Chunk, StageExecutor
from cairn.models.checkpoint import build_stage, load_stage, read_tensors, stage_tensor_names
from cairn.models.llama import TORCH_DTYPES
from cairn.pool import wire as wirefmt
from cairn.pool.partition import DeviceSpec, ModelShape, Placement, PlacementError, partition
from cairn.types import LayerRange

log = logging.getLogger("cairn.pool")

RES_DEVICE = "cairn_device"  # 1 on every node that offers a device to cairn
RES_MEMORY_MB = "cairn_memory_mb"  # memory budget
RES_BANDWIDTH_MBS = "cairn_bandwidth_mbs"  # measured read bandwidth, MB/s
RES_MFLOPS = "cairn_mflops"  # measured fp32 matmul throughput, MFLOP/s
RES_CUDA = "cairn_cuda"  # 1 when the device is a GPU
NAMESPACE = "cairn"
# Stage processes: OpenMP threads sleep when idle instead of spinning, so a stage that has finished its part of a
# step does not steal the cores of the next stage when several stages share a machine.
STAGE_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def device_resources(memory: int, bandwidth: float, flops: float, cuda: bool) -> dict[str, float]:
    """Custom resources a joining node declares (Ray stores quantities with 4 decimals, so whole units)."""
    res = {RES_DEVICE: 1, RES_MEMORY_MB: max(1, memory // 10**6), RES_BANDWIDTH_MBS: max(1, int(bandwidth / 1e6)),
           RES_MFLOPS: max(1, int(flops / 1e6))}
    if cuda:
        res[RES_CUDA] = 1
    return res


@dataclass(frozen=True)
class PoolDevice:
    node_id: str
    address: str
    spec: DeviceSpec
    cuda: bool


def pool_devices(exclude: set[str] = frozenset()) -> list[PoolDevice]:
    """Alive nodes that offer a device, from Ray's node table."""
    out = []
    for n in ray.nodes():
        res = n.get("Resources", {})
        if not n.get("Alive") or RES_DEVICE not in res or n["NodeID"] in exclude:
            continue
        spec = DeviceSpec(id=n["NodeID"][:12], memory=int(res[RES_MEMORY_MB]) * 10**6,
                          bandwidth=float(res[RES_BANDWIDTH_MBS]) * 1e6, flops=float(res[RES_MFLOPS]) * 1e6)
        out.append(PoolDevice(n["NodeID"], n.get("NodeManagerAddress", ""), spec, RES_CUDA in res))
    return out


@ray.remote(num_cpus=0, max_restarts=0)
class StageActor:
    """Blocks [start, end) of a model on one pool node, with their KV cache."""

    def __init__(self, cfg_dict: dict, start: int, end: int, tensors: dict | None, model_dir: str, device: str,
                 dtype: str, max_seqs: int, max_context: int, wire: str, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        cfg = ModelConfig.from_hf_dict(cfg_dict)
        layers = LayerRange(start, end)
        if tensors is None:
            stage = load_stage(model_dir, cfg, layers, dtype=dtype, device=device)
        else:
            stage = build_stage(cfg, layers, tensors, dtype=dtype, device=device, source="the shipped weights")
        self.ex = StageExecutor(stage, max_seqs, max_context)
        self.wire = wire
        self.bytes_out = 0
        self.next = None

    def set_next(self, handle) -> None:
        """The actor of the following stage: activations go to it directly, never through the driver."""
        self.next = handle

    def ready(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        import os

        return os.getpid()

    def forward(self, chunks: list[Chunk], x):
        if x is not None:
            x = wirefmt.decode(x, self.ex.dtype).to(self.ex.device)  # (N, D)
        out = self.ex.run(chunks, x)
        if self.ex.stage.is_last:
            return out.cpu()  # (n_chunks, V) float32
        payload = wirefmt.encode(out.cpu(), self.wire)
        self.bytes_out += wirefmt.nbytes(payload)
        return self.next.forward.remote(chunks, payload)  # a ref to the rest of the pipeline's result

    def stats(self) -> dict:
        return {"bytes_out": self.bytes_out}


@ray.remote(num_cpus=0)
class PlacementBoard:
    """Which layers of which served model run on which node, for `cairn pool status`."""

    def __init__(self):
        self.boards: dict[str, list[dict]] = {}

    def put(self, key: str, stages: list[dict]) -> None:
        self.boards[key] = stages

    def drop(self, key: str) -> None:
        self.boards.pop(key, None)

    def get(self) -> dict:
        return dict(self.boards)


def _board():
    return PlacementBoard.options(name="cairn-placements", namespace=NAMESPACE, get_if_exists=True,
                                  lifetime="detached").remote()


def placements() -> dict[str, list[dict]]:
    try:
        return ray.get(_board().get.remote(), timeout=10)
    except (RayError, GetTimeoutError):
        return {}


def _publish(key: str, stages: list[dict] | None) -> None:
    """Best effort: status display must never break serving."""
    try:
        board = _board()
        ray.get(board.put.remote(key, stages) if stages is not None else board.drop.remote(key), timeout=10)
    except (RayError, GetTimeoutError) as e:
        log.warning("could not publish placement: %s", e)


@dataclass
class PipelineStats:
    steps: int = 0
    recoveries: list[float] = field(default_factory=list)
    """Seconds each recovery took (detection to first completed step)."""
    placements: list[str] = field(default_factory=list)


class PipelineRunner:
    """Runner over stage actors on pool nodes. Keeps each live slot's token history so that when a stage dies it
    can re-place the model over the surviving devices, rebuild every KV cache by replaying the histories, and
    finish the step as if nothing happened."""

    def __init__(self, model_dir: str | Path, cfg: ModelConfig, *, max_seqs: int, max_context: int, dtype: str,
                 max_batch_tokens: int = 256, wire: str = "fp32", weights: str = "auto", threads: int | None = None,
                 step_timeout: float = 60.0, load_timeout: float = 300.0, max_recoveries: int = 3,
                 name: str | None = None, nodes: set[str] | None = None):
        if wire not in wirefmt.WIRE_DTYPES:
            raise ValueError(f"wire dtype must be one of {wirefmt.WIRE_DTYPES}, got {wire!r}")
        if weights not in ("auto", "ship", "local"):
            raise ValueError(f"weights must be auto, ship or local, got {weights!r}")
        self.model_dir, self.cfg = str(model_dir), cfg
        self.name = name or Path(model_dir).name
        self.max_seqs, self.max_context, self.dtype = max_seqs, max_context, dtype
        self.max_batch_tokens, self.wire, self.weights, self.threads = max_batch_tokens, wire, weights, threads
        self.step_timeout, self.load_timeout, self.max_recoveries = step_timeout, load_timeout, max_recoveries
        self.shape = ModelShape.from_config(cfg, torch.finfo(TORCH_DTYPES[dtype]).bits // 8, max_context, max_seqs,
                                            max_batch_tokens)
        self.history: dict[int, list[int]] = {}  # slot -> tokens whose keys/values the stages hold
        self.banned: set[str] = set()  # node ids whose actors died
        self.nodes = nodes  # restrict placement to these node ids (None: every device in the pool)
        self.actors: list = []
        self.actor_nodes: list[str] = []
        self.placement: Placement | None = None
        self.stats = PipelineStats()
        self._place_and_load()

    # ----- placement
    def plan(self) -> tuple[Placement, dict[str, PoolDevice]]:
        devices = {d.spec.id: d for d in pool_devices(self.banned)
                   if self.nodes is None or d.node_id in self.nodes}
        return partition(self.shape, [d.spec for d in devices.values()]), devices

    def _place_and_load(self) -> None:
        self._kill_actors()
        placement, devices = self.plan()  # PlacementError before anything loads
        actors = []
        for st in placement.stages:
            dev = devices[st.device]
            tensors = None
            if self.weights == "ship" or (self.weights == "auto" and not _has_local_copy(dev, self.model_dir)):
                names = stage_tensor_names(self.cfg, st.layers)
                tensors = ray.put(read_tensors(self.model_dir, names))
            opts = dict(scheduling_strategy=NodeAffinitySchedulingStrategy(dev.node_id, soft=False),
                        num_gpus=1 if dev.cuda else 0, runtime_env={"env_vars": STAGE_ENV})
            actors.append(StageActor.options(**opts).remote(
                self.cfg.to_hf_dict(), st.layers.start, st.layers.end, tensors, self.model_dir,
                "cuda" if dev.cuda else "cpu", self.dtype, self.max_seqs, self.max_context, self.wire, self.threads))
        self.actors = actors
        self.actor_nodes = ray.get([a.ready.remote() for a in actors], timeout=self.load_timeout)
        ray.get([a.set_next.remote(b) for a, b in zip(actors, actors[1:])], timeout=self.load_timeout)
        self.placement = placement
        self.stats.placements.append(placement.describe())
        _publish(self.name, [{"node_id": n, "start": st.layers.start, "end": st.layers.end}
                             for n, st in zip(self.actor_nodes, placement.stages)])
        log.info("placed %s", placement.describe())

    def _kill_actors(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    # ----- Runner protocol
    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        committed = {c.slot: c.start for c in chunks}
        if not self.actors:  # capacity was lost earlier: try again now (raises PlacementError if still short)
            self._place_and_load()
            self._replay(exclude=committed)
        failures = 0
        while True:
            try:
                out = self._run(chunks)
                break
            except (RayActorError, GetTimeoutError, RayError) as e:
                failures += 1
                if failures > self.max_recoveries:
                    raise
                t0 = time.perf_counter()
                log.warning("stage failed (%s); re-placing over the surviving devices", type(e).__name__)
                self._ban_dead()
                try:
                    self._place_and_load()
                except PlacementError:
                    self._kill_actors()
                    raise
                self._replay(exclude=committed)
                self.stats.recoveries.append(time.perf_counter() - t0)
        for c in chunks:
            self.history[c.slot] = self.history.get(c.slot, [])[: c.start] + list(c.tokens)
        self.stats.steps += 1
        return out

    def _run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Send the step to the first stage; each stage forwards to the next; unwrap the last stage's logits."""
        deadline = time.monotonic() + self.step_timeout
        out = self.actors[0].forward.remote(chunks, None)
        while isinstance(out, ray.ObjectRef):
            out = ray.get(out, timeout=max(0.1, deadline - time.monotonic()))
        return out

    def _replay(self, exclude: dict[int, int]) -> None:
        """Rebuild every live slot's KV cache from its token history, up to where the current step starts."""
        pending = []
        for slot, tokens in self.history.items():
            upto = exclude.get(slot, len(tokens))
            for s in range(0, upto, self.max_batch_tokens):
                pending.append(Chunk(slot, s, tuple(tokens[s : min(upto, s + self.max_batch_tokens)])))
        # one chunk per slot per forward keeps each call's positions contiguous per slot
        while pending:
            batch, seen, rest = [], set(), []
            for c in pending:
                (rest if c.slot in seen else batch).append(c)
                seen.add(c.slot)
            self._run(sorted(batch, key=lambda c: (len(c.tokens) != 1, c.slot)))
            pending = rest

    def _ban_dead(self) -> None:
        """Ban the nodes of actors that no longer answer (dead, or hung in the failed step)."""
        for actor, node in zip(self.actors, self.actor_nodes):
            try:
                ray.get(actor.ready.remote(), timeout=5)
            except (RayError, GetTimeoutError):
                self.banned.add(node)

    def free(self, slot: int) -> None:
        self.history.pop(slot, None)

    def wire_bytes(self) -> int:
        """Activation bytes the stages have sent to their successors."""
        return sum(st["bytes_out"] for st in ray.get([a.stats.remote() for a in self.actors[:-1]], timeout=10))

    def close(self) -> None:
        self._kill_actors()
        _publish(self.name, None)


def _has_local_copy(dev: PoolDevice, model_dir: str) -> bool:
    """Whether the node can read the model itself (same path, same checkpoint). Asked of the node by a tiny task."""
    probe = _probe_path.options(scheduling_strategy=NodeAffinitySchedulingStrategy(dev.node_id, soft=False))
    try:
        return bool(ray.get(probe.remote(model_dir), timeout=30))
    except (RayError, GetTimeoutError):
        return False


@ray.remote(num_cpus=0)
def _probe_path(model_dir: str) -> bool:
    p = Path(model_dir)
    return (p / "config.json").is_file() and (
        (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file())
