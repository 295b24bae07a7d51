"""Training across the pool: DiLoCo (or synchronous data parallelism as the baseline), workers on pool devices.

One TrainWorker per pool device holds a Trainer (model, inner AdamW, its own data order). The driver holds the
global model and the outer optimizer. Per round it ships the global weights once (to workers that already hold the
last round's, only their change, compressed like the pseudo-gradients), each worker takes up to H inner steps and
returns its compressed pseudo-gradient and token count, and the driver applies the token-weighted average with
Nesterov momentum. A round ends shortly after the first worker is done: slower ones are asked to stop where they
are, so they count for fewer tokens instead of holding the others. A worker that dies is dropped at that round; a
device that joins gets a worker that starts from the current global weights and schedule position next round.

The pool is reached only through its generic service (start an object on a device, share weights, wait for
results); checkpoints, resume, metrics and export are the one-process trainer's own (RunDir).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from cairn.errors import CapacityError, UserError, WorkerLostError
from cairn.models.checkpoint import read_tensors, stage_tensor_names
from cairn.pool import service
from cairn.train import diloco
from cairn.train.config import TrainConfig
from cairn.train.loop import Trainer, prepare
from cairn.train.rundir import RunDir
from cairn.types import LayerRange

HOLD_TIMEOUT_S = 120.0
"""How long an infinitely slow worker (slowdown=inf) waits to be told to stop before it gives up waiting."""


class TrainWorker:
    """One worker (runs on a pool device): a Trainer over the shipped weights and data, with its own data order
    (seed + index). `slowdown` > 1 makes it a deliberately slower device (tests and benchmarks of heterogeneity):
    each step takes that many times as long; `inf` means it takes one step per round and then waits until the
    driver asks it to stop (a straggler whose step count does not depend on timing)."""

    def __init__(self, cfg: TrainConfig, index: int, model_cfg, data, tensors, total_steps: int,
                 start_step: int = 0, slowdown: float = 1.0, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        device = cfg.device if torch.cuda.is_available() or not cfg.device.startswith("cuda") else "cpu"
        cfg = replace(cfg, seed=cfg.seed + 1009 * (index + 1), device=device)
        self.trainer = Trainer(cfg, model_cfg, data, total_steps, tensors=tensors)
        self.trainer.seek(start_step)  # a worker that joins mid-run picks up the schedule where the run is
        self.slowdown = slowdown
        self.stop_round = -1  # the newest round the driver has asked to stop
        self.stopped = threading.Event()  # set by stop(); what an infinitely slow worker waits for
        self.lock = threading.Lock()  # stop() arrives on another thread than run_round()
        self.held: dict[str, torch.Tensor] = {}  # the global weights of the round in progress (fp32, on the CPU)

    def pid(self) -> int:
        return os.getpid()

    def _load(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.trainer.params.items():
                p.copy_(weights[k])

    def _throttle(self, seconds: float) -> None:
        if math.isinf(self.slowdown):
            self.stopped.wait(HOLD_TIMEOUT_S)
        elif self.slowdown > 1.0:
            time.sleep(seconds * (self.slowdown - 1.0))

    def stop(self, round_: int) -> None:
        """End round `round_` after the step in progress (the first worker has finished; don't hold the round)."""
        with self.lock:
            self.stop_round = max(self.stop_round, round_)
            self.stopped.set()

    def run_round(self, round_: int, weights: dict | None, update: dict | None, max_steps: int, dtype: str) -> dict:
        """Inner steps from the global weights until max_steps or stop(round_); returns the pseudo-gradient. The
        driver sends either the global `weights` or, when this worker holds the previous round's, their `update`."""
        self.held = ({k: v.float().clone() for k, v in weights.items()} if update is None
                     else diloco.apply_update(self.held, update))
        self._load(self.held)
        with self.lock:
            if self.stop_round < round_:  # (a stop for this round may come before the round itself)
                self.stopped.clear()
        start = self.held
        t0 = time.perf_counter()
        steps, tokens, loss = 0, 0, 0.0
        while steps < max_steps and (steps == 0 or self.stop_round < round_):
            s0 = time.perf_counter()
            m = self.trainer.step()
            steps, tokens, loss = steps + 1, tokens + m["step_tokens"], loss + m["loss"]
            if steps < max_steps:
                self._throttle(time.perf_counter() - s0)
        end = {k: p.detach().cpu() for k, p in self.trainer.params.items()}
        payload = diloco.compress(diloco.pseudo_gradient(start, end), dtype)
        secs = time.perf_counter() - t0
        return {"payload": payload, "tokens": tokens, "steps": steps, "loss": loss / steps, "step_s": secs / steps}

    def gradient(self, weights: dict, step: int, dtype: str) -> dict:
        """Synchronous baseline: the gradient of one step's batches at the given weights."""
        self._load(weights)
        m = self.trainer.backward(step)
        grad = {k: p.grad.detach() for k, p in self.trainer.params.items()}
        return {"payload": diloco.compress(grad, dtype), "tokens": m["step_tokens"], "loss": m["loss"]}


class PoolTrainer:
    """The driver: global model + outer optimizer, workers on pool devices, rounds, metrics, checkpoints."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print,
                 slowdown: dict[int, float] | None = None, threads: int | None = None):
        if cfg.workers < 1:
            raise UserError("--pool training needs --workers N (at least 1)", param="workers")
        self.log, self.slowdown, self.threads = log, slowdown or {}, threads
        cfg, self.model_cfg, _, self.data, self.total = prepare(cfg)
        self.cfg = cfg
        self.run_dir = RunDir(cfg, log)
        self.rounds = self.total if cfg.sync == "every-step" else math.ceil(self.total / cfg.inner_steps)
        self.globl = Trainer(cfg, self.model_cfg, self.data, self.total)
        self.outer = diloco.OuterOptimizer(cfg.outer_lr, cfg.outer_momentum)
        # DiLoCo with compressed deltas also sends the global weights' change down compressed (fp32: the weights)
        self.broadcast = diloco.Broadcast(cfg.delta_dtype) if cfg.delta_dtype != "fp32" else None
        self.update: dict | None = None  # the change from the previous round's global weights to this round's
        self.holders: set[str] = set()  # nodes whose workers hold the previous round's global weights
        names = stage_tensor_names(self.model_cfg, LayerRange(0, self.model_cfg.num_layers))
        self.data_ref = service.share(self.data)
        self.tensors_ref = service.share(read_tensors(cfg.model, names))
        self.workers: dict[str, tuple[service.Remote, int]] = {}  # node id -> (worker, index)
        self.next_index = 0
        self.speeds: dict[str, dict] = {}  # node id -> last round's steps, tokens and tokens/s (for pool status)
        self.bytes_up = self.bytes_down = 0
        self.round = 0
        self.tokens = 0
        self.elapsed = 0.0  # training seconds before this process (a resumed run)
        self.key = f"train:{Path(cfg.out).resolve()}"

    # --- membership ----------------------------------------------------------------------------------------

    def _fill(self) -> None:
        """Start workers on unused alive devices until cfg.workers are running."""
        started: dict[str, object] = {}
        for dev in service.pool_devices(exclude=self.workers):
            if len(self.workers) >= self.cfg.workers:
                break
            index = self.next_index
            self.next_index += 1
            start = self.round * self.cfg.inner_steps if self.cfg.sync == "diloco" else self.round
            # two threads: a round runs while stop() arrives
            worker = service.start(TrainWorker, dev, self.cfg, index, self.model_cfg, self.data_ref, self.tensors_ref,
                                   self.total, min(start, self.total), self.slowdown.get(index, 1.0), self.threads,
                                   concurrency=2)
            self.workers[dev.node_id] = (worker, index)
            started[dev.node_id] = worker.call("pid")
            if self.round:
                self.log(f"round {self.round}: worker {index} joined on node {dev.node_id[:12]}")
        # New workers are ready (model built) before the round starts, so round timing measures training only.
        self._gather(started, timeout=600)
        if not self.workers:
            raise CapacityError("the pool has no device to train on")

    def _drop(self, node: str, why: str) -> None:
        worker, index = self.workers.pop(node)
        self.speeds.pop(node, None)
        self.holders.discard(node)  # a worker started on this node later has to get the full weights
        self.log(f"round {self.round}: worker {index} dropped ({why})")
        worker.kill()

    def _gather(self, calls: dict[str, object], timeout: float | None, slack: float = 0.0) -> dict[str, dict]:
        """Results by node, in worker order; a worker that dies is dropped, and so is one that misses the deadline
        (`timeout` seconds). With slack (DiLoCo), once the first result is in after e seconds the others may run until
        e x slack, are then asked to stop after their current step, and must answer within max(60 s, 2e)."""
        results: dict[str, dict] = {}
        pending = dict(calls)
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        stop_at, stopped = None, False
        while pending:
            wake = min((t for t in (deadline, stop_at) if t is not None), default=None)
            left = None if wake is None else max(0.0, wake - time.monotonic())
            done = service.wait(pending, left)
            now = time.monotonic()
            for node, result in done:
                del pending[node]
                if isinstance(result, WorkerLostError):
                    self._drop(node, str(result))
                    continue
                results[node] = result
                if slack > 0 and stop_at is None and not stopped:
                    stop_at = t0 + (now - t0) * slack
            if done:
                continue
            if stop_at is not None and now >= stop_at:
                for node in pending:
                    self.workers[node][0].call("stop", self.round)
                stop_at, stopped = None, True
                deadline = now + max(60.0, 2 * (now - t0))
            elif deadline is not None and now >= deadline:
                for node in list(pending):
                    self._drop(node, "timed out")
                break
        # in worker order, not arrival order: float sums then don't depend on timing, so runs are reproducible
        return dict(sorted(results.items(), key=lambda kv: self.workers[kv[0]][1]))

    # --- rounds --------------------------------------------------------------------------------------------

    def _weights(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().cpu().clone() for k, p in self.globl.params.items()}

    def _shapes(self) -> dict[str, torch.Size]:
        return {k: p.shape for k, p in self.globl.params.items()}

    def _exchange(self, call, timeout: float | None, slack: float = 0.0) -> tuple[dict, dict[str, dict], dict]:
        """Ship the global weights once (to workers holding the previous round's, only `self.update` when there is
        one), run `call(worker, weights, update)` on every worker (one of the two is None), and return the weights,
        the results by node, and the token-weighted average of their decompressed payloads (+ loss, tokens)."""
        weights = self._weights()
        gets_update = set(self.workers) & self.holders if self.update is not None else set()
        n_full = len(self.workers) - len(gets_update)
        weights_ref = service.share(weights) if n_full else None
        update_ref = service.share(self.update) if gets_update else None
        self.bytes_down += n_full * sum(t.numel() * t.element_size() for t in weights.values())
        if gets_update:
            self.bytes_down += len(gets_update) * diloco.payload_bytes(self.update)
        t0 = time.perf_counter()
        results = self._gather({node: call(w, *((None, update_ref) if node in gets_update else (weights_ref, None)))
                                for node, (w, _) in self.workers.items()}, timeout, slack)
        if not results:
            raise CapacityError(f"every worker failed in round {self.round}")
        secs = time.perf_counter() - t0
        for node, r in results.items():
            self.speeds[node] = {"tokens": r["tokens"], "tokens_per_s": r["tokens"] / max(secs, 1e-9)}
        tokens = [r["tokens"] for r in results.values()]
        self.bytes_up += sum(diloco.payload_bytes(r["payload"]) for r in results.values())
        avg = diloco.weighted_average([diloco.decompress(r["payload"], self._shapes()) for r in results.values()],
                                      tokens)
        summary = {"loss": sum(r["loss"] * r["tokens"] for r in results.values()) / sum(tokens),
                   "step_tokens": sum(tokens), "workers": len(results)}
        return weights, results, {"avg": avg, **summary}

    def diloco_round(self) -> dict:
        weights, results, m = self._exchange(
            lambda w, full, upd: w.call("run_round", self.round, full, upd, self.cfg.inner_steps, self.cfg.delta_dtype),
            None, self.cfg.round_slack)
        new = self.outer.step(weights, m.pop("avg"))
        if self.broadcast is not None:  # the workers that took part will rebuild `new` from the compressed change
            self.update, new = self.broadcast.step(weights, new)
            self.holders = set(results)
        with torch.no_grad():
            for k, p in self.globl.params.items():
                p.copy_(new[k])
        m["inner_steps"] = {self.workers[n][1]: r["steps"] for n, r in results.items() if n in self.workers}
        return m

    def sync_round(self) -> dict:
        _, _, m = self._exchange(lambda w, full, _: w.call("gradient", full, self.round, self.cfg.delta_dtype), 600)
        avg = m.pop("avg")
        for k, p in self.globl.params.items():
            p.grad = avg[k].to(p.dtype)
        self.globl.apply()
        return m

    # --- checkpoints and status ----------------------------------------------------------------------------

    def _state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """What a checkpoint holds besides the global model: round, tokens, byte counts, and the outer momentum
        (DiLoCo) or AdamW state (sync, in the trainer's own optimizer) and the broadcast's rounding residual."""
        self.globl.step_count, self.globl.tokens = self.round, self.tokens
        extra = {"round": self.round, "tokens": self.tokens, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                 "next_index": self.next_index, "elapsed_s": self.elapsed, "sync": self.cfg.sync}
        residual = self.broadcast.residual if self.broadcast is not None else {}
        tensors = ({f"outer.{k}": v for k, v in self.outer.buffers.items()}
                   | {f"residual.{k}": v for k, v in residual.items()})
        return extra, tensors

    def _resume(self) -> None:
        latest = self.run_dir.resume_point()
        extra, tensors = self.run_dir.resume(self.globl, latest)
        if latest is None:
            return
        if extra.get("sync") != self.cfg.sync:
            raise UserError(f"{latest} was written by a --sync {extra.get('sync')} run; resume it with the same mode")
        self.round, self.tokens = extra["round"], extra["tokens"]
        self.bytes_up, self.bytes_down = extra["bytes_up"], extra["bytes_down"]
        self.next_index, self.elapsed = extra["next_index"], extra["elapsed_s"]
        self.outer.buffers = {k.removeprefix("outer."): v for k, v in tensors.items() if k.startswith("outer.")}
        if self.broadcast is not None:  # every worker starts afresh from the full weights; the rounding carried on
            self.broadcast.residual = {k.removeprefix("residual."): v for k, v in tensors.items()
                                       if k.startswith("residual.")}
        self.log(f"resumed from {latest} (round {self.round} of {self.rounds})")

    def _publish(self, finished: bool = False) -> None:
        """What `cairn pool status` shows: each worker's node, last round's tokens/s, and the run's progress."""
        if finished:
            service.publish(self.key, None)
            return
        service.publish(self.key, [{"node_id": node, "worker": index, "round": self.round, "rounds": self.rounds,
                                    "recipe": self.cfg.recipe, "sync": self.cfg.sync, **self.speeds.get(node, {})}
                                   for node, (_, index) in self.workers.items()])

    def _evaluate(self) -> dict:
        """Held-out metrics of the global model, logged with the bytes communicated so far (loss vs bytes)."""
        ev = self.globl.evaluate()
        if ev:
            self.run_dir.record({"step": self.round, **ev, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down})
        return ev

    def run(self, on_round: Callable[[dict], None] | None = None) -> dict:
        run = self.run_dir
        self._resume()
        ev: dict = {}
        with run:
            self._fill()
            self.log(f"{self.cfg.recipe} on {len(self.workers)} pool worker(s), {self.cfg.sync}: {self.rounds} rounds"
                     + (f" of up to {self.cfg.inner_steps} inner steps" if self.cfg.sync == "diloco" else ""))
            t0 = time.perf_counter() - self.elapsed
            try:
                while self.round < self.rounds:
                    self._fill()
                    self._publish()
                    m = self.diloco_round() if self.cfg.sync == "diloco" else self.sync_round()
                    self.round += 1
                    self.tokens += m["step_tokens"]
                    self.elapsed = time.perf_counter() - t0
                    m.update(step=self.round, tokens=self.tokens, bytes_up=self.bytes_up, bytes_down=self.bytes_down,
                             elapsed_s=self.elapsed)
                    run.record(m)
                    last = self.round == self.rounds
                    if self.cfg.eval_every and self.round % self.cfg.eval_every == 0 and not last:
                        ev = self._evaluate()
                    if self.cfg.save_every and self.round % self.cfg.save_every == 0 and not last:
                        run.save(self.globl, *self._state())
                    if on_round is not None:
                        on_round(m)
                ev = self._evaluate()
            finally:
                for worker, _ in self.workers.values():
                    worker.kill()
                self._publish(finished=True)
        run.finish(self.globl, {"recipe": self.cfg.recipe, "sync": self.cfg.sync, "rounds": self.round,
                                "tokens": self.tokens}, *self._state())
        secs = time.perf_counter() - t0
        self.log(f"done: {self.round} rounds, {self.tokens} tokens, {self.bytes_up / 1e6:.2f} MB sent up, "
                 f"{secs:.1f}s" + "".join(f", {k} {v:.4f}" for k, v in ev.items()))
        return {"rounds": self.round, "tokens": self.tokens, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "seconds": secs, **ev}
