"""Continuous batching over a Runner.

Each step packs every decoding sequence's next token plus prompt chunks of new sequences (up to a token budget)
into one forward; finished or cancelled sequences give back their KV slot at once and waiting ones take it.
The runner chooses the tokens (sampling runs where the logits are); the engine tells it how, per row. A runner
that keeps `depth` > 1 steps in flight (a pipeline) gets the running sequences split into that many groups, each
stepped while the others are still in the pipeline.
The engine is single-threaded and knows nothing of where the model runs; `LLM` (api.py) drives it from a thread.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cairn.config import SamplingParams
from cairn.engine.detok import TextStream
from cairn.engine.runner import Chunk, Runner
from cairn.engine.sampling import GREEDY, Choice, RowSampling
from cairn.errors import CairnError, ContextLengthError, UserError
from cairn.models.tokenizer import Tokenizer
from cairn.types import FinishReason


class QueueFullError(CairnError):
    """More requests are waiting than the engine accepts; retry later."""


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Event:
    """What one step produced for one request: a token (or none, when it ends without one) and the new text."""

    request_id: str
    token_id: int | None
    text: str
    logprob: TokenLogprob | None = None
    finish_reason: FinishReason | None = None
    error: Exception | None = None
    """Why the request failed (finish_reason "error"): a typed error, e.g. CapacityError when the devices that
    held the model are gone, EngineClosedError at shutdown; anything else is a bug or a device failure."""


@dataclass
class Completion:
    """A finished request."""

    request_id: str
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprob]
    time_to_first_token: float | None
    total_time: float


@dataclass(eq=False)
class Sequence:
    id: str
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    sink: Callable[[Event], None]
    stream: TextStream
    seed: int
    """Fixes the random draws (with each token's position); drawn at random when the request gives none."""
    stop_ids: frozenset[int]
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    computed: int = 0  # tokens whose keys/values are in the cache
    in_flight: bool = False  # part of a step submitted and not yet collected

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def row(self) -> RowSampling:
        """How the runner is to choose this sequence's next token."""
        p = self.params
        if (p.greedy and p.logprobs is None and p.repetition_penalty == 1.0 and not p.presence_penalty
                and not p.frequency_penalty and not p.logit_bias):
            return GREEDY
        return RowSampling(
            temperature=0.0 if p.greedy else p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
            repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty, seed=self.seed, position=len(self.prompt) + len(self.output),
            seen=tuple(self.tokens) if p.repetition_penalty != 1.0 else (),
            generated=tuple(self.output) if p.presence_penalty or p.frequency_penalty else (),
            logprobs=p.logprobs, logit_bias=p.logit_bias,
        )


@dataclass(frozen=True)
class _Step:
    """A step submitted to the runner: its handle, and the sequences of its chunks, in chunk order."""

    handle: Any
    seqs: tuple[Sequence, ...]
    chunks: tuple[Chunk, ...]


class Engine:
    """Scheduler + sampler. Not thread-safe: one thread calls add/cancel/step."""

    def __init__(self, runner: Runner, tokenizer: Tokenizer, eos_ids: tuple[int, ...], max_batch_tokens: int = 256,
                 max_queue: int = 1024, vocab_size: int | None = None):
        self.runner, self.tokenizer = runner, tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.max_batch_tokens = max(1, max_batch_tokens)
        self.max_queue = max_queue
        self.vocab_size = vocab_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # hold a slot: prefilling or decoding
        self.free_slots = list(range(runner.max_seqs))
        self.in_flight: deque[_Step] = deque()
        self._ids = itertools.count()

    @property
    def max_context(self) -> int:
        return self.runner.max_context

    def check(self, prompt: list[int], params: SamplingParams) -> int:
        """Validate a request; return its effective max_tokens. Raises UserError subclasses."""
        if not prompt:
            raise UserError("the prompt is empty: give at least one token", param="prompt")
        if self.vocab_size is not None and (min(prompt) < 0 or max(prompt) >= self.vocab_size):
            raise UserError(f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
        if self.vocab_size is not None and any(t >= self.vocab_size for t, _ in params.logit_bias):
            raise UserError(f"logit_bias token ids must be in [0, {self.vocab_size})", param="logit_bias")
        n, ctx = len(prompt), self.max_context
        if n >= ctx:
            raise ContextLengthError(
                f"the prompt has {n} tokens but the context holds {ctx}, which leaves no room to generate",
                param="prompt",
            )
        if params.max_tokens is None:
            return ctx - n
        if n + params.max_tokens > ctx:
            raise ContextLengthError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} exceeds the "
                f"context of {ctx} tokens; lower max_tokens to at most {ctx - n}",
                param="max_tokens",
            )
        return params.max_tokens

    def add(self, prompt: list[int], params: SamplingParams, sink: Callable[[Event], None],
            request_id: str | None = None) -> str:
        max_tokens = self.check(prompt, params)
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"{len(self.waiting)} requests are already waiting (max_queue); retry later")
        rid = request_id or f"req-{next(self._ids)}"
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        self.waiting.append(Sequence(rid, list(prompt), params, max_tokens, sink, TextStream(self.tokenizer, params.stop),
                                     seed, stop_ids))
        return rid

    def cancel(self, request_id: str) -> bool:
        for seq in list(self.waiting) + self.running:
            if seq.id == request_id:
                self._finish(seq, "cancelled")
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.in_flight)

    def step(self) -> None:
        """Admit waiting sequences into free slots, keep up to `runner.depth` steps in flight, collect the oldest
        and emit its tokens. With depth 1: one packed forward over every running sequence per call."""
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop(0)
            self.running.append(seq)
        while len(self.in_flight) < max(1, self.runner.depth):
            step = self._submit()
            if step is None:
                break
            self.in_flight.append(step)
        if self.in_flight:
            self._complete(self.in_flight.popleft())

    def _submit(self) -> _Step | None:
        """Schedule the sequences not in flight (at most 1/depth of the running ones) into one step and submit it."""
        group = -(-len(self.running) // max(1, self.runner.depth))  # ceil: sequences per step
        ready = [s for s in self.running if not s.in_flight]
        decode = sorted((s for s in ready if s.computed == len(s.tokens) - 1 and s.output), key=lambda s: s.slot)
        decode = decode[:group]
        budget = self.max_batch_tokens - len(decode)
        chunks = [Chunk(s.slot, s.computed, (s.tokens[-1],)) for s in decode]
        scheduled = list(decode)
        for s in ready:
            if s.output or budget <= 0 or len(scheduled) >= group:
                continue
            n = min(budget, len(s.prompt) - s.computed)
            chunks.append(Chunk(s.slot, s.computed, tuple(s.prompt[s.computed : s.computed + n])))
            scheduled.append(s)
            budget -= n
        if not chunks:
            return None
        # a token is due after a chunk that reaches the end of what the sequence has (decode, or the prompt's end)
        rows = [s.row() if c.start + len(c.tokens) == len(s.tokens) else None for s, c in zip(scheduled, chunks)]
        handle = self.runner.submit(chunks, rows)
        for s in scheduled:
            s.in_flight = True
        return _Step(handle, tuple(scheduled), tuple(chunks))

    def _complete(self, step: _Step) -> None:
        try:
            choices = self.runner.collect(step.handle)
        finally:
            for seq in step.seqs:
                seq.in_flight = False
        for seq, chunk, choice in zip(step.seqs, step.chunks, choices):
            if seq not in self.running:  # finished (cancelled) while in flight: its slot can go now
                self._free_slot(seq)
                continue
            seq.computed += len(chunk.tokens)
            if choice is not None:  # prompt done (or decode step): a new token is due
                self._emit_token(seq, choice)

    def _emit_token(self, seq: Sequence, choice: Choice) -> None:
        token = choice.token_id
        lp = None
        if seq.params.logprobs is not None:
            lp = TokenLogprob(token, choice.logprob, choice.top)
        seq.output.append(token)
        finish: FinishReason | None = None
        if token in seq.stop_ids:
            text, finish = "", "stop"
        else:
            text = seq.stream.push(token)
            if seq.stream.stopped:
                finish = "stop"
        if finish is None and (len(seq.output) >= seq.max_tokens or len(seq.tokens) >= self.max_context):
            finish = "length"
        if finish is not None:
            text += seq.stream.finish()
            self._release(seq)
        seq.sink(Event(seq.id, token, text, lp, finish))

    def _finish(self, seq: Sequence, reason: FinishReason, error: Exception | None = None) -> None:
        self._release(seq)
        seq.sink(Event(seq.id, None, "", None, reason, error))

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not seq.in_flight:  # else the slot goes when its step is collected (a new sequence must not share it)
            self._free_slot(seq)

    def _free_slot(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.runner.free(seq.slot)
            self.free_slots.append(seq.slot)
            self.free_slots.sort()
            seq.slot = None

    def fail_all(self, error: Exception) -> None:
        """End every request with `error` (the runner failed beyond recovery); steps in flight are dropped."""
        for step in self.in_flight:
            for seq in step.seqs:
                seq.in_flight = False
        self.in_flight.clear()
        for seq in list(self.waiting) + self.running:
            self._finish(seq, "error", error)
