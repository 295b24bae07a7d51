"""Serving over the pool: stage actors pinned to nodes, the PipelineRunner that drives them, and failover.

Placement reads the devices from the pool service (Ray's node table), actors are pinned with node affinity, and a
node that dies or leaves simply disappears from it.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cairn.config import ModelConfig
from cairn.engine.blocks import NO_BLOCK, BlockStats, blocks_for
from cairn.engine.runner import BLOCK_SIZE, Chunk, StageExecutor
from cairn.engine.sampling import Choice, RowSampling, choose, decode_choices, encode_choices, target_logprobs
from cairn.models.checkpoint import build_stage, load_stage, read_tensors, stage_tensor_names
from cairn.models.llama import TORCH_DTYPES, CausalContext
from cairn.models.quantized import quant_config, stored_bytes
from cairn.pool.partition import ModelShape, Placement, PlacementError, kv_blocks, partition
from cairn.pool.service import WORKER_ENV, PoolDevice, pool_devices, publish
from cairn.quant import compress as wirefmt
from cairn.types import LayerRange

log = logging.getLogger("cairn.pool")

Want = Literal["tokens", "logits", "none"]
"""What the last stage sends back: chosen token ids (a step), logits (inspection), nothing (a replay)."""


@ray.remote(num_cpus=0, max_restarts=0)
class StageActor:
    """Blocks [start, end) of a model on one pool node, with their KV cache."""

    def __init__(self, cfg_dict: dict, start: int, end: int, tensors: dict | None, model_dir: str, device: str,
                 dtype: str, max_seqs: int, max_context: int, wire: str, threads: int | None,
                 num_blocks: int | None = None, block_size: int = BLOCK_SIZE):
        if threads:
            torch.set_num_threads(threads)
        cfg = ModelConfig.from_hf_dict(cfg_dict)
        layers = LayerRange(start, end)
        if tensors is None:
            stage = load_stage(model_dir, cfg, layers, dtype=dtype, device=device)
        else:
            stage = build_stage(cfg, layers, tensors, dtype=dtype, device=device, source="the shipped weights")
        self.ex = StageExecutor(stage, max_seqs, max_context, num_blocks=num_blocks, block_size=block_size)
        self.wire = wire
        self.bytes_out = 0  # activations sent to the next stage
        self.bytes_back = 0  # replies (chosen tokens) sent back to the driver, as pickled
        self.busy_s = 0.0  # seconds spent computing (decode, layers, sampling, encode), not waiting
        self.next = None

    def set_next(self, handle) -> None:
        """The actor of the following stage: activations go to it directly, never through the driver."""
        self.next = handle

    def ready(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()

    def forward(self, chunks: list[Chunk], x, rows: list[RowSampling | None] | None, want: Want):
        """Run this stage's part of a step and pass it on; the last stage chooses the tokens (`rows`, one per chunk)
        and returns what `want` says, which every stage returns in turn."""
        t0 = time.perf_counter()
        if x is not None:
            x = wirefmt.decode(x, self.ex.dtype).to(self.ex.device)  # (N, D)
        out = self.ex.run(chunks, x, rows)
        if self.ex.stage.is_last:
            if want == "logits":
                out = out.cpu()  # (n_chunks, V) float32
            elif want == "none":
                out = None
            else:
                out = encode_choices(choose(out, rows))
                self.bytes_back += len(pickle.dumps(out))
            self.busy_s += time.perf_counter() - t0
            return out
        payload = wirefmt.encode(out.cpu(), self.wire)
        self.bytes_out += wirefmt.nbytes(payload)
        self.busy_s += time.perf_counter() - t0
        # Wait here for the rest of the pipeline: the (small) reply comes back stage by stage, so the driver makes
        # one call per step, and a dead successor surfaces as an error of this call.
        return ray.get(self.next.forward.remote(chunks, payload, rows, want))

    @torch.inference_mode()
    def score(self, tokens: list[int], x):
        """A cache-free forward of one whole sequence (evaluation): this stage's part, then the next stage's; the
        last stage returns each next token's logprob and whether it was the greedy choice, never the logits."""
        stage = self.ex.stage
        if stage.is_first:
            x = torch.tensor([tokens], device=self.ex.device)  # (1, T)
        else:
            x = wirefmt.decode(x, self.ex.dtype).to(self.ex.device)[None]  # (1, T, D)
        out = stage(x, CausalContext(stage.cfg, 1, len(tokens), self.ex.device))
        if stage.is_last:
            return target_logprobs(out[0], tokens)
        payload = wirefmt.encode(out[0].cpu(), self.wire)  # (T, D)
        self.bytes_out += wirefmt.nbytes(payload)
        return ray.get(self.next.score.remote(tokens, payload))

    def stats(self) -> dict:
        return {"bytes_out": self.bytes_out, "bytes_back": self.bytes_back, "busy_s": self.busy_s}


@dataclass
class PipelineStats:
    steps: int = 0
    recoveries: list[float] = field(default_factory=list)
    """Seconds each recovery took (detection to first completed step)."""
    placements: list[str] = field(default_factory=list)


@dataclass
class PipelineStep:
    """A step in the pipeline: what was sent, and the ref its reply will come through (renewed if it is resent)."""

    chunks: list[Chunk]
    rows: list[RowSampling | None]
    ref: object


class PipelineRunner:
    """Runner over stage actors on pool nodes. Keeps `depth` steps in flight (on disjoint slots), so one stage
    works on a step while another works on the next. Keeps each live slot's token history and block table (and
    which tokens each block holds, so a slot that starts on cached prefix blocks knows its history) so that when a
    stage dies it can re-place the model over the surviving devices, rebuild every live block by replaying the
    histories, resend the steps in flight and finish them as if nothing happened (token draws depend only on each
    request's seed and position, so a resent step chooses the same tokens). Cached blocks no live slot holds are
    lost then (`resets` tells the engine).

    KV blocks: each stage holds its layers' part of the same `num_blocks` blocks. Placement budgets
    `kv_memory` bytes of them (all layers), or by default one whole context; with no kv_memory the pool then takes
    what the tightest stage's device has left, at most max_seqs whole contexts. A re-placement after a failure
    needs room for the same number of blocks."""

    def __init__(self, model_dir: str | Path, cfg: ModelConfig, *, max_seqs: int, max_context: int, dtype: str,
                 max_batch_tokens: int = 256, wire: str = "fp32", weights: str = "auto", threads: int | None = None,
                 step_timeout: float = 60.0, load_timeout: float = 300.0, max_recoveries: int = 3,
                 name: str | None = None, nodes: set[str] | None = None, depth: int | None = None,
                 kv_memory: int | None = None, block_size: int = BLOCK_SIZE):
        if wire not in wirefmt.WIRE_DTYPES:
            raise ValueError(f"wire dtype must be one of {wirefmt.WIRE_DTYPES}, got {wire!r}")
        if depth is not None and depth < 1:
            raise ValueError(f"depth (steps in flight) must be at least 1, got {depth}")
        if weights not in ("auto", "ship", "local"):
            raise ValueError(f"weights must be auto, ship or local, got {weights!r}")
        self.model_dir, self.cfg = str(model_dir), cfg
        self.name = name or Path(model_dir).name
        self.max_seqs, self.max_context, self.dtype = max_seqs, max_context, dtype
        self.max_batch_tokens, self.wire, self.weights, self.threads = max_batch_tokens, wire, weights, threads
        self.step_timeout, self.load_timeout, self.max_recoveries = step_timeout, load_timeout, max_recoveries
        self.fixed_depth = depth  # None: chosen at each placement (see _auto_depth)
        self.depth = depth or 1
        self.in_flight: deque[PipelineStep] = deque()
        elt = torch.finfo(TORCH_DTYPES[dtype]).bits // 8
        self.block_size = block_size
        self.block_layer_bytes = 2 * cfg.kv_size * block_size * elt  # one block of one layer
        self.num_blocks: int | None = None  # fixed at the first placement
        if kv_memory is not None:
            self.num_blocks = kv_memory // (self.block_layer_bytes * cfg.num_layers)
            if self.num_blocks < 1:
                raise ValueError(f"kv_memory of {kv_memory} bytes holds no KV block "
                                 f"({self.block_layer_bytes * cfg.num_layers} bytes)")
        kv_tokens = (self.num_blocks or blocks_for(max_context, block_size)) * block_size
        self.shape = ModelShape.from_config(cfg, elt, max_context, max_seqs, max_batch_tokens,
                                            stored=stored_bytes(cfg, elt),  # a quantized model by its stored bytes
                                            kv_tokens=kv_tokens)
        qc = quant_config(cfg)
        self.weight_format = dtype if qc is None else f"{qc.describe()}, {dtype} elsewhere"
        """How the stages hold the weights, for `cairn pool status`."""
        self.resets = 0  # re-placements: each loses the blocks no live slot holds
        self.history: dict[int, list[int]] = {}  # slot -> tokens whose keys/values the stages hold
        self.tables: dict[int, tuple[int, ...] | None] = {}  # slot -> its block table (None: the slot's fixed blocks)
        self.block_tokens: dict[int, list[int]] = {}  # block -> the tokens whose keys/values it holds
        self._published = (0.0, None)  # when and what block usage was last published
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
        if self.placement is not None:  # the blocks of the old actors are gone; replay rebuilds the live ones
            self.resets += 1
        placement, devices = self.plan()  # PlacementError before anything loads
        if self.num_blocks is None:  # what the tightest stage has left, at most every slot a whole context
            cap = self.max_seqs * blocks_for(self.max_context, self.block_size)
            self.num_blocks = kv_blocks(self.shape, placement, {k: d.spec.memory for k, d in devices.items()},
                                        self.block_layer_bytes, cap)
            # from now on every placement must hold that many blocks
            self.shape = replace(self.shape, kv_bytes_per_layer=self.num_blocks * self.block_layer_bytes)
        self.depth = self.fixed_depth or _auto_depth([devices[st.device] for st in placement.stages])
        actors = []
        for st in placement.stages:
            dev = devices[st.device]
            tensors = None
            if self.weights == "ship" or (self.weights == "auto" and not _has_local_copy(dev, self.model_dir)):
                names = stage_tensor_names(self.cfg, st.layers)
                tensors = ray.put(read_tensors(self.model_dir, names))
            # one call per step in flight (each waits for its successors) + one for control calls (ready, stats)
            opts = dict(scheduling_strategy=NodeAffinitySchedulingStrategy(dev.node_id, soft=False),
                        num_gpus=1 if dev.cuda else 0, runtime_env={"env_vars": WORKER_ENV},
                        max_concurrency=self.depth + 1)
            actors.append(StageActor.options(**opts).remote(
                self.cfg.to_hf_dict(), st.layers.start, st.layers.end, tensors, self.model_dir,
                "cuda" if dev.cuda else "cpu", self.dtype, self.max_seqs, self.max_context, self.wire, self.threads,
                self.num_blocks, self.block_size))
        self.actors = actors
        self.actor_nodes = ray.get([a.ready.remote() for a in actors], timeout=self.load_timeout)
        ray.get([a.set_next.remote(b) for a, b in zip(actors, actors[1:])], timeout=self.load_timeout)
        self.placement = placement
        self.stats.placements.append(placement.describe())
        self._publish(None)
        log.info("placed %s (%d KV blocks of %d positions)", placement.describe(), self.num_blocks, self.block_size)

    def _publish(self, blocks: BlockStats | None) -> None:
        """Put the placement (and KV block usage, when known) on the pool's board for `cairn pool status`."""
        kv = {"blocks_total": self.num_blocks}
        if blocks is not None:
            kv.update(blocks_used=blocks.used, blocks_cached=blocks.cached, blocks_free=blocks.free)
        publish(self.name, [{"node_id": n, "start": st.layers.start, "end": st.layers.end,
                             "format": self.weight_format,
                             "kv_bytes": self.num_blocks * self.block_layer_bytes * len(st.layers), **kv}
                            for n, st in zip(self.actor_nodes, self.placement.stages)])

    def observe_blocks(self, blocks: BlockStats) -> None:
        """The engine's block usage after a step: published at most every 2 s, when it changed."""
        when, last = self._published
        now = time.monotonic()
        if blocks != last and now - when >= 2.0 and self.actors:
            self._published = (now, blocks)
            self._publish(blocks)

    def _kill_actors(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    # ----- Runner protocol
    def submit(self, chunks: list[Chunk], rows: list[RowSampling | None]) -> PipelineStep:
        self._adopt(chunks)
        if not self.actors:  # capacity was lost earlier: try again now (raises PlacementError if still short)
            self._place_and_load()
            self._replay(exclude=self._uncommitted(chunks))
        step = PipelineStep(chunks, rows, self._send(chunks, rows, "tokens"))
        self.in_flight.append(step)
        return step

    def collect(self, step: PipelineStep) -> list[Choice | None]:
        if not self.in_flight or step is not self.in_flight[0]:
            raise RuntimeError("pipeline steps must be collected in the order they were submitted")
        reply = self._reliably(lambda: step.ref)
        self.in_flight.popleft()
        choices = decode_choices(reply)
        self._commit(step.chunks, [None if r is None or not r.draft or c is None else 1 + len(c.then)
                                   for r, c in zip(step.rows, choices)])
        return choices

    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits of each chunk's last token, from the last stage (with failover; not while steps are in flight)."""
        if self.in_flight:
            raise RuntimeError("forward() while pipeline steps are in flight: collect them first")
        self._adopt(chunks)
        if not self.actors:
            self._place_and_load()
            self._replay(exclude=self._uncommitted(chunks))
        out = self._reliably(lambda: self._send(chunks, None, "logits"), extra=chunks)
        self._commit(chunks)
        return out

    def score(self, tokens: list[int]) -> tuple[list[float], list[bool]]:
        """Next-token logprobs and greedy flags of one sequence, through the stages without touching any cache."""
        if not self.actors:
            self._place_and_load()
            self._replay(exclude=self._uncommitted([]))
        return self._wait(self.actors[0].score.remote(tokens, None))

    def _reliably(self, ref: Callable[[], object], extra: list[Chunk] = ()):
        """Wait for the reply `ref()` names; when a stage fails, recover (resending what was in flight) and wait
        again, at most max_recoveries times."""
        for attempt in range(self.max_recoveries + 1):
            try:
                return self._wait(ref())
            except (RayActorError, GetTimeoutError, RayError) as e:
                if attempt == self.max_recoveries:
                    self.in_flight.clear()
                    raise
                self._recover(e, extra)

    def _recover(self, error: Exception, extra: list[Chunk] = ()) -> None:
        """A stage failed: re-place over the surviving devices, replay histories, resend the steps in flight."""
        t0 = time.perf_counter()
        log.warning("stage failed (%s); re-placing over the surviving devices", type(error).__name__)
        self._ban_dead()
        try:
            self._place_and_load()
        except PlacementError:
            self._kill_actors()
            self.in_flight.clear()
            raise
        self._replay(exclude=self._uncommitted(list(extra)))
        for st in self.in_flight:
            st.ref = self._send(st.chunks, st.rows, "tokens")
        self.stats.recoveries.append(time.perf_counter() - t0)

    def _uncommitted(self, chunks: list[Chunk]) -> dict[int, int]:
        """slot -> the position its uncommitted work starts at (steps in flight and `chunks`): replay stops there."""
        out = {c.slot: c.start for st in self.in_flight for c in st.chunks}
        out.update({c.slot: c.start for c in chunks})
        return out

    def _adopt(self, chunks: list[Chunk]) -> None:
        """A slot's first chunk may start past 0 on cached prefix blocks another slot wrote: take its history from
        what those blocks hold, so that a replay rebuilds them too."""
        bs = self.block_size
        for c in chunks:
            known = self.history.get(c.slot, [])
            if c.start > len(known) and c.blocks is not None:
                held = [t for b in c.blocks[: blocks_for(c.start, bs)] for t in self.block_tokens.get(b, [])]
                if len(held) < c.start:
                    raise RuntimeError(f"slot {c.slot} starts at {c.start} on blocks that hold only {len(held)} "
                                       "known tokens")
                self.history[c.slot] = held[: c.start]
                self.tables[c.slot] = c.blocks

    def _commit(self, chunks: list[Chunk], kept: list[int | None] | None = None) -> None:
        """The chunks' tokens are now in the stages' blocks; `kept`: for a chunk that verified a draft, how many of
        its tokens were accepted (the keys/values of the rest are stale and will be overwritten)."""
        bs = self.block_size
        for c, keep in zip(chunks, kept or [None] * len(chunks)):
            tokens = list(c.tokens) if keep is None else list(c.tokens[:keep])
            self.history[c.slot] = self.history.get(c.slot, [])[: c.start] + tokens
            self.tables[c.slot] = c.blocks
            if c.blocks is None:
                continue
            for p in range(c.start - c.start % bs, c.start + len(tokens), bs):  # the blocks the chunk wrote to
                b = c.blocks[p // bs]
                if b != NO_BLOCK:
                    self.block_tokens[b] = self.history[c.slot][p : p + bs]
        self.stats.steps += 1

    def _send(self, chunks: list[Chunk], rows: list[RowSampling | None] | None, want: Want):
        """Send a step to the first stage; each stage forwards to the next. Returns the ref of the reply."""
        return self.actors[0].forward.remote(chunks, None, rows, want)

    def _wait(self, ref):
        return ray.get(ref, timeout=self.step_timeout)

    def _replay(self, exclude: dict[int, int]) -> None:
        """Rebuild every live slot's KV cache from its token history, up to where the current step starts."""
        pending = []
        for slot, tokens in self.history.items():
            upto, table = exclude.get(slot, len(tokens)), self.tables.get(slot)
            # blocks given back behind a sliding window cannot hold keys for a later chunk: one chunk then
            step = upto if table is not None and NO_BLOCK in table else self.max_batch_tokens
            for s in range(0, upto, max(1, step)):
                pending.append(Chunk(slot, s, tuple(tokens[s : min(upto, s + step)]), table))
        # one chunk per slot per forward keeps each call's positions contiguous per slot
        while pending:
            batch, seen, rest = [], set(), []
            for c in pending:
                (rest if c.slot in seen else batch).append(c)
                seen.add(c.slot)
            self._wait(self._send(sorted(batch, key=lambda c: (len(c.tokens) != 1, c.slot)), None, "none"))
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
        self.tables.pop(slot, None)

    def wire_bytes(self) -> int:
        """Activation bytes the stages have sent to their successors."""
        return sum(st["bytes_out"] for st in ray.get([a.stats.remote() for a in self.actors[:-1]], timeout=10))

    def busy_seconds(self) -> list[float]:
        """Seconds each stage has spent computing so far (the rest of a step's wall time is hops and waiting)."""
        return [st["busy_s"] for st in ray.get([a.stats.remote() for a in self.actors], timeout=10)]

    def reply_bytes(self) -> int:
        """Bytes (pickled) of the chosen tokens the last stage has sent back for steps."""
        return ray.get(self.actors[-1].stats.remote(), timeout=10)["bytes_back"]

    def close(self) -> None:
        self._kill_actors()
        publish(self.name, None)


def _auto_depth(stage_devices: list[PoolDevice]) -> int:
    """Steps to keep in flight: one per stage when the stages are on different machines (each works on its own
    micro-batch while the others work on theirs); 1 when they all share one machine, where concurrent stages cannot
    add compute and smaller batches would only read the weights more often."""
    if len({d.address for d in stage_devices}) <= 1:
        return 1
    return len(stage_devices)


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
