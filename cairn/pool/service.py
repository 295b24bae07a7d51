"""The pool as a service to the rest of cairn: which devices it has, an object of any class started on a chosen
device, large objects shared once, calls whose results are awaited as they come, and a board of what runs where.

Each pool node declares its one device through Ray custom resources (the device marker, its memory budget and
measured speeds), so Ray's own node table is the registry. Callers (training, fleet jobs) build on this module
without importing ray; a remote object that dies surfaces as `WorkerLostError`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cairn.errors import WorkerLostError
from cairn.pool.partition import DeviceSpec

log = logging.getLogger("cairn.pool")

RES_DEVICE = "cairn_device"  # 1 on every node that offers a device to cairn
RES_MEMORY_MB = "cairn_memory_mb"  # memory budget
RES_BANDWIDTH_MBS = "cairn_bandwidth_mbs"  # measured read bandwidth, MB/s
RES_MFLOPS = "cairn_mflops"  # measured fp32 matmul throughput, MFLOP/s
RES_CUDA = "cairn_cuda"  # 1 when the device is a GPU
NAMESPACE = "cairn"
# Worker processes: OpenMP threads sleep when idle instead of spinning, so a process that has finished its part
# of a step does not steal the cores of another one on the same machine.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


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


def pool_devices(exclude: Iterable[str] = ()) -> list[PoolDevice]:
    """Alive nodes that offer a device, from Ray's node table (nodes in `exclude` left out)."""
    exclude = set(exclude)
    out = []
    for n in ray.nodes():
        res = n.get("Resources", {})
        if not n.get("Alive") or RES_DEVICE not in res or n["NodeID"] in exclude:
            continue
        spec = DeviceSpec(id=n["NodeID"][:12], memory=int(res[RES_MEMORY_MB]) * 10**6,
                          bandwidth=float(res[RES_BANDWIDTH_MBS]) * 1e6, flops=float(res[RES_MFLOPS]) * 1e6)
        out.append(PoolDevice(n["NodeID"], n.get("NodeManagerAddress", ""), spec, RES_CUDA in res))
    return out


# --- objects on devices ------------------------------------------------------------------------------------------

Pending = Any
"""The future result of one call (opaque to callers): pass it to `wait` or `get`."""
Shared = Any
"""A large object put once into the pool's object store: pass it as an argument to `start` or `Remote.call`."""


@functools.cache
def _remote_class(cls: type, concurrency: int):
    return ray.remote(num_cpus=0, max_restarts=0, max_concurrency=concurrency)(cls)


class Remote:
    """An object of a caller's class living in its own process on one pool device."""

    def __init__(self, actor, device: PoolDevice):
        self.actor, self.device = actor, device

    def call(self, method: str, *args) -> Pending:
        """Call a method; returns at once. Shared objects among `args` arrive as the objects themselves."""
        return getattr(self.actor, method).remote(*args)

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)


def start(cls: type, device: PoolDevice, *args, concurrency: int = 1, **kwargs) -> Remote:
    """Construct `cls(*args, **kwargs)` in a new process on `device` (its GPU reserved when it has one). With
    concurrency > 1 that many calls may run at once on threads (e.g. a long call and a control call)."""
    actor = _remote_class(cls, concurrency).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(device.node_id, soft=False),
        num_gpus=1 if device.cuda else 0, runtime_env={"env_vars": WORKER_ENV}).remote(*args, **kwargs)
    return Remote(actor, device)


def share(obj: Any) -> Shared:
    """Put `obj` into the object store once; every object it is passed to reads the same copy."""
    return ray.put(obj)


def get(pending: Pending, timeout: float | None = None) -> Any:
    """The result of a call; WorkerLostError when its process died, TimeoutError after `timeout` seconds."""
    try:
        return ray.get(pending, timeout=timeout)
    except GetTimeoutError:
        raise TimeoutError(f"no result after {timeout} s") from None
    except RayError as e:
        raise WorkerLostError(f"a pool worker was lost: {type(e).__name__}") from e


def wait(pending: dict[Hashable, Pending], timeout: float | None) -> list[tuple[Hashable, Any]]:
    """Results of the calls that are done (at least one, unless `timeout` seconds pass first), by key. A call
    whose worker died gives a WorkerLostError as its result instead of raising."""
    if not pending:
        return []
    ready, _ = ray.wait(list(pending.values()), num_returns=1, timeout=timeout)
    out = []
    for ref in ready:
        key = next(k for k, r in pending.items() if r == ref)
        try:
            out.append((key, ray.get(ref)))
        except RayError as e:
            out.append((key, WorkerLostError(f"a pool worker was lost: {type(e).__name__}")))
    return out


# --- the board: what runs where ------------------------------------------------------------------------------------

@ray.remote(num_cpus=0)
class PlacementBoard:
    """Which layers of which served model, and which training workers, run on which node (`cairn pool status`)."""

    def __init__(self):
        self.boards: dict[str, list[dict]] = {}

    def put(self, key: str, entries: list[dict]) -> None:
        self.boards[key] = entries

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


def publish(key: str, entries: list[dict] | None) -> None:
    """Best effort (None unpublishes): status display must never break serving or training."""
    try:
        board = _board()
        ray.get(board.put.remote(key, entries) if entries is not None else board.drop.remote(key), timeout=10)
    except (RayError, GetTimeoutError) as e:
        log.warning("could not publish placement: %s", e)
