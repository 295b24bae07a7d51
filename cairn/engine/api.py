"""The Python API: load a model directory once, submit many requests from any thread, stream tokens back.

    llm = LLM("path/to/model")
    for event in llm.submit("Once upon a time", SamplingParams(max_tokens=32)):
        print(event.text, end="")
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from cairn.config import EngineConfig, ModelConfig, SamplingParams
from cairn.engine.blocks import blocks_for
from cairn.engine.engine import Completion, Engine, Event, QueueFullError, TokenLogprob
from cairn.engine.runner import LocalRunner, Runner
from cairn.engine.sampling import target_logprobs, top_logprobs
from cairn.errors import CairnError, EngineClosedError, GenerationError, UserError
from cairn.models.checkpoint import load_stage
from cairn.models.device import torch_device
from cairn.models.llama import TORCH_DTYPES
from cairn.models.tokenizer import Tokenizer

__all__ = ["LLM", "RequestHandle", "QueueFullError", "load_generation_eos"]


class RequestHandle:
    """One submitted request: iterate for events (blocking), `async for` in an event loop, or `result()`."""

    def __init__(self, llm: "LLM", prompt_tokens: int):
        self.llm = llm
        self.id = ""
        self.prompt_tokens = prompt_tokens
        self._q: queue.Queue[Event] = queue.Queue()
        self._aq: asyncio.Queue[Event] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._finished = threading.Event()  # set with the last event (plain queue delivery)
        self.done = False
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.cached_tokens = 0
        """Prompt tokens served from the prefix cache (known once the request has been admitted)."""

    def _deliver(self, ev: Event) -> None:  # engine thread
        if self.first_token_at is None and ev.token_id is not None:
            self.first_token_at = time.perf_counter()
        self.cached_tokens = ev.cached_tokens
        with self._lock:
            if self._loop is None:
                self._q.put(ev)
                if ev.finish_reason is not None:
                    self._finished.set()
                return
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, ev)
            except RuntimeError:  # the reader's event loop has closed: nobody will read this, drop it
                pass

    def __iter__(self) -> Iterator[Event]:
        return self._events(None)

    def _events(self, timeout: float | None) -> Iterator[Event]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            try:
                ev = self._q.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s") from None
            self.done = ev.finish_reason is not None
            yield ev

    async def __aiter__(self):
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
                self._aq = asyncio.Queue()
                while not self._q.empty():  # events that arrived before we switched to async delivery
                    self._aq.put_nowait(self._q.get_nowait())
        while not self.done:
            ev = await self._aq.get()
            self.done = ev.finish_reason is not None
            yield ev

    def cancel(self) -> None:
        """Stop generating and free the request's slot."""
        if not self.done:
            self.llm._cancel(self.id)

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request finishes (TimeoutError after `timeout` seconds); return everything it produced.
        Wakes once, at the end, not at every token: many threads each waiting for a result (cairn synth keeps
        dozens of requests in flight) would otherwise take the interpreter from the engine thread at every step."""
        if self._loop is None and not self.done:
            if not self._finished.wait(timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
            events = []
            while not self.done:
                ev = self._q.get_nowait()
                self.done = ev.finish_reason is not None
                events.append(ev)
            return _collect(self, events)
        return _collect(self, list(self._events(timeout)))


def _collect(h: RequestHandle, events: list[Event]) -> Completion:
    tokens = [e.token_id for e in events if e.token_id is not None]
    last = events[-1]
    if last.error is not None:
        if isinstance(last.error, CairnError):
            raise last.error
        raise GenerationError(f"request {h.id} failed: {type(last.error).__name__}: {last.error}") from last.error
    return Completion(
        request_id=h.id,
        prompt_tokens=h.prompt_tokens,
        token_ids=tokens,
        text="".join(e.text for e in events),
        finish_reason=last.finish_reason,
        logprobs=[e.logprob for e in events if e.logprob is not None],
        time_to_first_token=None if h.first_token_at is None else h.first_token_at - h.started,
        total_time=time.perf_counter() - h.started,
        cached_tokens=last.cached_tokens,
    )


def load_generation_eos(model_dir: Path, cfg: ModelConfig) -> tuple[int, ...]:
    """End-of-sequence ids: config.json's plus generation_config.json's."""
    ids = list(cfg.eos_token_ids)
    path = model_dir / "generation_config.json"
    if path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None
        ids += eos if isinstance(eos, list) else ([] if eos is None else [eos])
    return tuple(dict.fromkeys(int(i) for i in ids))


def kv_blocks(cfg: ModelConfig, config: EngineConfig, dtype: str, max_context: int, free_bytes: int | None) -> int:
    """KV blocks for a local runner: --kv-memory's worth, or by default what the device has free (`free_bytes`,
    None when unknown) capped at max_seqs sequences of max_context positions. A UserError when the memory given
    holds no block."""
    bs = config.block_size
    if bs < 1:
        raise UserError(f"block_size must be at least 1, got {bs}", param="block_size")
    per_block = 2 * cfg.num_layers * cfg.kv_size * bs * torch.finfo(TORCH_DTYPES[dtype]).bits // 8
    if config.kv_memory is not None:
        if config.kv_memory < per_block:
            raise UserError(f"kv_memory of {config.kv_memory} bytes holds no KV block ({per_block} bytes for "
                            f"{bs} positions of this model); give at least that", param="kv_memory")
        return config.kv_memory // per_block
    cap = config.max_seqs * blocks_for(max_context, bs)
    if free_bytes is None:
        return cap
    return max(blocks_for(max_context, bs), min(cap, free_bytes // per_block))  # at least one whole context


def free_memory(device: torch.device) -> int | None:
    """Bytes the KV cache may take by default: 90% of a GPU's free memory, half of a machine's available memory on
    CPU (where blocks are backed only once used); None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.9)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return None


def resolve_dtype(cfg: ModelConfig, config: EngineConfig) -> str:
    dtype = config.dtype or cfg.dtype
    if dtype == "float16" and config.device == "cpu" and config.dtype is None:
        dtype = "float32"  # fp16 matmuls are slow on CPU; run fp16 checkpoints in fp32 unless asked
    return dtype


class LLM:
    """A loaded model and its engine thread."""

    def __init__(self, model_dir: str | Path, config: EngineConfig = EngineConfig(), runner: Runner | None = None):
        self.model_dir = Path(model_dir)
        self.config = config
        t0 = time.perf_counter()
        self.model_config = ModelConfig.from_hf_dir(self.model_dir)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.dtype = resolve_dtype(self.model_config, config)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._submit_lock = threading.Lock()
        self._pending = 0  # submitted, not yet taken by the engine thread
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._closed = False
        # Every torch call of this model runs on the engine thread: loading, steps, scoring. With OpenMP, each
        # thread that computes gets its own team of workers, and once a process has more of them than cores, GNU
        # OpenMP's workers sleep between parallel regions instead of spinning: on 2 cores that made a decode step
        # ~11 ms slower (37 vs 62 tokens/s for SmolLM2 int4) when the caller's thread had computed too.
        ready: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(runner, ready), name="cairn-engine", daemon=True)
        self._thread.start()
        ready.result()  # re-raises what loading raised
        self.load_time = time.perf_counter() - t0

    def _start(self, runner: Runner | None) -> None:
        """Load the model (unless a runner is given) and make the engine; on the engine thread."""
        config, cfg = self.config, self.model_config
        if config.threads:
            torch.set_num_threads(config.threads)
        max_context = min(cfg.max_position_embeddings, config.max_context or 4096)
        self.virtual: list[int] = []  # the adapter's virtual token ids, in front of every prompt
        if runner is None:
            device = torch_device(config.device)
            stage = load_stage(self.model_dir, cfg, dtype=self.dtype, device=device)
            if config.adapter is not None:
                from cairn.models.virtual import load_adapter

                stage.virtual = load_adapter(config.adapter, cfg).to(device, TORCH_DTYPES[self.dtype])
                self.virtual = stage.virtual.ids
            blocks = kv_blocks(cfg, config, self.dtype, max_context, free_memory(device))
            runner = LocalRunner([stage], config.max_seqs, max_context, num_blocks=blocks,
                                 block_size=config.block_size)
        if runner is not None and config.adapter is not None and not self.virtual:
            raise UserError("prompt- and prefix-tuning adapters are served by one process, not across a pool",
                            param="adapter")
        self.runner = runner
        draft = config.draft
        if draft not in (None, "ngram"):  # a draft model's directory
            from cairn.engine.draft_model import load_drafter

            draft = load_drafter(draft, self.tokenizer, cfg.param_count(), max_context, config)
        self.engine = Engine(runner, self.tokenizer, load_generation_eos(self.model_dir, cfg),
                             config.max_batch_tokens, config.max_queue, cfg.vocab_size + len(self.virtual),
                             prefix_caching=config.prefix_caching, window=cfg.sliding_window,
                             draft=draft, draft_max=config.draft_max)

    def _on_engine_thread(self, fn: Callable, *args) -> Any:
        """fn(*args) run by the engine thread between steps (the caller waits): runner calls never compute on the
        caller's thread (see __init__)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        if self._closed:
            raise EngineClosedError("the engine was shut down")
        done: Future = Future()
        self._inbox.put(("call", fn, args, done))
        self._wake.set()
        return done.result()

    # ----- requests
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(prompt)

    def render_chat(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text)

    def _with_virtual(self, ids: list[int]) -> list[int]:
        """An adapter's virtual tokens, then the caller's ids (which must be real tokens)."""
        if not self.virtual:
            return ids
        if ids and max(ids) >= self.virtual[0]:
            raise UserError(f"prompt token ids must be in [0, {self.virtual[0]})", param="prompt")
        return self.virtual + ids

    def submit(self, prompt: str | list[int], params: SamplingParams = SamplingParams()) -> RequestHandle:
        """Queue a request and return at once; raises UserError (e.g. ContextLengthError) if it cannot run and
        QueueFullError when max_queue requests are already waiting. Never waits for the engine thread."""
        if self._closed:
            raise EngineClosedError("this LLM is closed")
        own = self.encode_prompt(prompt)
        ids = self._with_virtual(own)
        self.engine.check(ids, params)
        with self._submit_lock:
            if self._pending + len(self.engine.waiting) >= self.config.max_queue:
                raise QueueFullError(f"{self.config.max_queue} requests are already waiting; retry later")
            self._pending += 1
            handle = RequestHandle(self, len(own))
            handle.id = f"req-{next(self._ids)}"
        self._inbox.put(("add", ids, params, handle))
        self._wake.set()
        return handle

    def prompt_logprobs(self, ids: list[int], top: int = 0) -> list[TokenLogprob | None]:
        """The model's logprob of each prompt token given the ones before it (None for the first), with `top`
        alternatives each: what an echoed prompt reports. One cache-free forward, beside the engine's steps; a
        runner without `prompt_logits` (a pool) cannot do it."""
        def entries(logits):
            logsm = torch.log_softmax(logits[:-1].float(), -1)  # (T - 1, V): row i predicts ids[i + 1]
            return [None] + [TokenLogprob(t, float(logsm[i, t]), tuple(top_logprobs(logsm[i], top)))
                             for i, t in enumerate(ids[1:])]

        return self._prompt_logits(ids, entries, UserError(
            "prompt logprobs (echo with logprobs) are not available for a model served by a pool", param="echo"))

    def prompt_top(self, ids: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's top-k token ids (int32) and logprobs after each of ids[:-1]: (n - 1, k) each, row i for the
        token after ids[:i + 1] (what a distillation cache keeps). On the engine thread; local runners only."""
        def top_k(logits):
            values, top = torch.log_softmax(logits[:-1].float(), -1).topk(k, -1)
            return top.to(torch.int32), values

        return self._prompt_logits(ids, top_k, UserError(
            "the teacher's top-k logits need the model in this process, not served by a pool", param="save_logits"))

    def prompt_features(self, ids: list[int], layers: int | None = None) -> torch.Tensor:
        """What a learned router reads of a prompt: the mean and the last of the model's hidden states over `ids`
        after its first `layers` blocks (None: all, normalised), no adapter; (2H,) float32. One cache-free forward
        (of those blocks only) on the engine thread; local only."""
        hidden = getattr(self.runner, "prompt_hidden", None)
        if hidden is None:
            raise UserError("a learned router reads the small model's hidden states: serve that model in this "
                            "process, not on a pool", param="router")
        self.engine.check(ids, SamplingParams(max_tokens=None))

        def pool(h):  # (T, H)
            return torch.cat([h.mean(0), h[-1]]).cpu()

        return self._on_engine_thread(lambda: pool(hidden(ids, layers)))

    def _prompt_logits(self, ids: list[int], then: Callable[[torch.Tensor], Any], unavailable: UserError | None,
                       check: bool = True) -> Any:
        """then(logits) for the (len(ids), V) logits after each of ids, row i following ids[: i + 1] (an adapter's
        virtual tokens go in front, their rows are dropped): one cache-free forward beside the engine's steps, and
        `then`, on the engine thread. Runners without `prompt_logits` (a pool) raise `unavailable`."""
        score = getattr(self.runner, "prompt_logits", None)
        if score is None:
            raise unavailable
        full, n = self._with_virtual(ids), len(self.virtual)
        if check:
            self.engine.check(full, SamplingParams(max_tokens=None))
        return self._on_engine_thread(lambda: then(score(full)[n:]))

    def score(self, ids: list[int]) -> tuple[list[float], list[bool]]:
        """The logprob of each of ids[1:] given the ones before it, and whether it was the greedy choice: what
        evaluation (perplexity, multiple choice) needs. At most the context length; local or pool alike."""
        if len(ids) < 2:
            raise UserError("scoring needs at least two tokens", param="prompt")
        if len(ids) + len(self.virtual) > self.engine.max_context:
            raise UserError(f"{len(ids)} tokens do not fit the context of {self.engine.max_context}", param="prompt")
        if self.virtual:  # the adapter's tokens in front (a local runner: adapters are not served by a pool)
            return self._prompt_logits(ids, lambda logits: target_logprobs(logits, ids), None, check=False)
        return self._on_engine_thread(self.runner.score, ids)

    def score_many(self, seqs: list[list[int]], starts: list[int]) -> list[tuple[list[float], list[bool]]]:
        """`score` of several sequences, keeping each one's entries for tokens [start:] (start >= 1): batched in
        one forward where the runner can (local), one sequence at a time otherwise (pool)."""
        for seq, start in zip(seqs, starts):
            if not 1 <= start < len(seq):
                raise UserError(f"a scored span must start within the sequence after its first token, got {start} "
                                f"of {len(seq)}", param="prompt")
            if len(seq) + len(self.virtual) > self.engine.max_context:
                raise UserError(f"{len(seq)} tokens do not fit the context of {self.engine.max_context}",
                                param="prompt")
        if self.virtual:  # the adapter's tokens in front; the scored spans stay where they were in each sequence
            seqs, starts = [self._with_virtual(x) for x in seqs], [s + len(self.virtual) for s in starts]
        many = getattr(self.runner, "score_many", None)
        if many is not None:
            return self._on_engine_thread(many, seqs, starts)
        return [tuple(x[start - 1 :] for x in self._on_engine_thread(self.runner.score, seq))
                for seq, start in zip(seqs, starts)]

    def chat(self, messages: list[dict], params: SamplingParams = SamplingParams()) -> RequestHandle:
        return self.submit(self.render_chat(messages), params)

    def generate(self, prompts: list[str | list[int]], params: SamplingParams = SamplingParams()) -> list[Completion]:
        """Submit all prompts at once (they batch together) and wait for every result."""
        handles = [self.submit(p, params) for p in prompts]
        return [h.result() for h in handles]

    def _cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))
        self._wake.set()

    # ----- state for metrics and health
    def stats(self) -> dict:
        return {"waiting": len(self.engine.waiting) + self._pending, "running": len(self.engine.running)}

    def kv_stats(self) -> dict:
        """KV-cache blocks (total, used, cached prefixes nobody uses now, free), their size, preemptions so far, and
        prompt tokens admitted / served from the prefix cache. Read from any thread (a snapshot, not atomic)."""
        e = self.engine
        st = e.blocks.stats()
        out = {"blocks_total": st.total, "blocks_used": st.used, "blocks_cached": st.cached, "blocks_free": st.free,
               "block_size": e.blocks.block_size, "preemptions": e.preemptions, "prompt_tokens": e.prompt_tokens,
               "cached_prompt_tokens": e.cached_tokens, "draft_proposed": e.draft_proposed,
               "draft_accepted": e.draft_accepted}
        kv_bytes = getattr(self.runner, "kv_bytes", None)
        if kv_bytes is not None:
            out["block_bytes"], out["bytes_touched"] = kv_bytes()
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.runner.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- engine thread
    def _run(self, runner: Runner | None, ready: Future) -> None:
        try:
            self._start(runner)
        except BaseException as e:  # noqa: BLE001 - handed to the constructor, which raises it
            ready.set_exception(e)
            return
        ready.set_result(None)
        self._loop()

    def _loop(self) -> None:
        while not self._closed:
            self._drain_inbox()
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as e:  # a device failure beyond recovery, or a bug: fail the requests, keep the thread
                self.engine.fail_all(e)
        self._drain_inbox()
        self.engine.fail_all(EngineClosedError("the engine was shut down"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, ids, params, handle = msg
                with self._submit_lock:
                    self._pending -= 1
                try:
                    self.engine.add(ids, params, handle._deliver, handle.id)
                except Exception as e:  # checked at submit already; anything left ends the request with an error
                    handle._deliver(Event(handle.id, None, "", None, "error", e))
            elif msg[0] == "cancel":
                self.engine.cancel(msg[1])
            elif msg[0] == "call":
                _, fn, args, done = msg
                try:
                    done.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - raised in the caller
                    done.set_exception(e)

