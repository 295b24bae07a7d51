"""Independent jobs on the pool's devices: `fn(item)` for every item, one job at a time per device, results in
the order of the items. For work whose items do not depend on each other (the candidates of one generation of a
merge search, the shards of a data job); callers pass `DeviceMap` (or `pool_map`) where a plain `map` would do and
never import ray.

Connect first (`cairn.pool.control.connect(address, token)`). `fn` and the items travel by pickle (cloudpickle for
`fn`, so a closure or a frozen dataclass with `__call__` will do); `fn` is put into the object store once per call.
Paths inside items must exist on every pool machine (or name shared storage). An exception `fn` raises is raised
again here, with its type kept when it pickles (a UserError stays a UserError); a device whose process dies is
dropped and its job retried on another; WorkerLostError when no device is left."""

from __future__ import annotations

import pickle
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from cairn.errors import WorkerLostError
from cairn.pool import service
from cairn.pool.service import PoolDevice, Remote


class _Worker:
    """Lives on one pool device and runs the jobs it is given (one at a time)."""

    def run(self, fn: Callable[[Any], Any], item: Any) -> tuple[bool, Any]:
        """(True, fn(item)), or (False, the exception) when fn raised."""
        try:
            return True, fn(item)
        except Exception as e:  # noqa: BLE001 - handed back to the caller, who raises it again
            return False, _portable(e)


def _portable(e: Exception) -> Exception:
    """The exception itself when it survives pickling, else a RuntimeError carrying its type, text and traceback."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any failure to pickle means: send text instead
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        return RuntimeError(f"{type(e).__name__} on a pool device: {e}\n{text}")


class DeviceMap:
    """A map over the pool's devices: `DeviceMap()(fn, items)` yields fn(item) for every item, in order, each
    as soon as it and every earlier one are done. One worker process per device is started on first use and kept
    for later calls (a GPU device's worker holds its GPU); `close()` (or leaving a `with` block) ends them."""

    def __init__(self, devices: list[PoolDevice] | None = None):
        """devices: where to run (None: every device of the pool when first called)."""
        self.devices = devices
        self.workers: list[Remote] = []

    def __enter__(self) -> DeviceMap:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def size(self) -> int:
        """How many jobs run at once (the devices used)."""
        self._start()
        return len(self.workers)

    def _start(self) -> None:
        if self.workers:
            return
        devices = self.devices if self.devices is not None else service.pool_devices()
        if not devices:
            raise WorkerLostError("the pool has no device to run jobs on; join a node with `cairn pool join`")
        self.workers = [service.start(_Worker, dev) for dev in devices]

    def __call__(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        items = list(items)
        if not items:
            return
        self._start()
        fn_ref = service.share(fn)
        todo = deque(range(len(items)))
        free = list(self.workers)
        pending: dict[int, Any] = {}
        busy: dict[int, Remote] = {}
        done: dict[int, Any] = {}
        next_out = 0
        while next_out < len(items):
            while todo and free:
                i, worker = todo.popleft(), free.pop()
                pending[i], busy[i] = worker.call("run", fn_ref, items[i]), worker
            if not pending:
                raise WorkerLostError(f"every pool device running jobs was lost; {len(todo)} job(s) not done")
            for i, value in service.wait(pending, timeout=None):
                del pending[i]
                worker = busy.pop(i)
                if isinstance(value, WorkerLostError):
                    self._drop(worker)
                    todo.appendleft(i)
                    continue
                free.append(worker)
                ok, payload = value
                if not ok:
                    raise payload
                done[i] = payload
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1

    def _drop(self, worker: Remote) -> None:
        self.workers = [w for w in self.workers if w is not worker]
        try:
            worker.kill()
        except Exception:  # noqa: BLE001 - it is already gone; nothing more to end
            pass

    def close(self) -> None:
        """End the worker processes (jobs still running on them are abandoned)."""
        workers, self.workers = self.workers, []
        for w in workers:
            self._drop(w)


def pool_map(fn: Callable[[Any], Any], items: Iterable[Any], devices: list[PoolDevice] | None = None) -> list[Any]:
    """[fn(item) for item in items], run on the pool's devices (one job per device at a time); see DeviceMap."""
    with DeviceMap(devices) as run:
        return list(run(fn, items))
