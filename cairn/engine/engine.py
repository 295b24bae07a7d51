"""Continuous batching over a Runner.

Each step packs every decoding sequence's next token plus prompt chunks of new sequences (up to a token budget)
into one forward; finished or cancelled sequences give back their KV slot at once and waiting ones take it.
The engine is single-threaded and knows nothing of where the model runs; `LLM` (api.py) drives it from a thread.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cairn.config import SamplingParams
from cairn.engine.detok import TextStream
from cairn.engine.runner import Chunk, Runner
from cairn.engine.sampling import (
    apply_penalties,
    apply_temperature,
    min_p_filter,
    sample,
    top_k_filter,
    top_logprobs,
    top_p_filter,
)
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
    error: str | None = None
    error_status: int | None = None
    """HTTP status that fits the error (503 when capacity is gone, 500 otherwise)."""


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
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    computed: int = 0  # tokens whose keys/values are in the cache
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


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
        gen = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            gen = torch.Generator().manual_seed(seed % (1 << 63))
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        self.waiting.append(Sequence(rid, list(prompt), params, max_tokens, sink, TextStream(self.tokenizer, params.stop),
                                     gen, stop_ids))
        return rid

    def cancel(self, request_id: str) -> bool:
        for seq in list(self.waiting) + self.running:
            if seq.id == request_id:
                self._finish(seq, "cancelled")
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> None:
        """Admit waiting sequences into free slots, run one packed forward, sample, emit events."""
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop(0)
            self.running.append(seq)
        if not self.running:
            return
        decode = sorted((s for s in self.running if s.computed == len(s.tokens) - 1 and s.output), key=lambda s: s.slot)
        budget = self.max_batch_tokens - len(decode)
        chunks = [Chunk(s.slot, s.computed, (s.tokens[-1],)) for s in decode]
        scheduled = list(decode)
        for s in self.running:
            if s.output or budget <= 0:
                continue
            n = min(budget, len(s.prompt) - s.computed)
            chunks.append(Chunk(s.slot, s.computed, tuple(s.prompt[s.computed : s.computed + n])))
            scheduled.append(s)
            budget -= n
        logits = self.runner.forward(chunks).cpu()  # (len(chunks), V); sampling runs on the CPU
        for seq, chunk, row in zip(scheduled, chunks, logits):
            seq.computed += len(chunk.tokens)
            if seq.computed == len(seq.tokens):  # prompt done (or decode step): a new token is due
                self._emit_token(seq, row)

    def _emit_token(self, seq: Sequence, row: torch.Tensor) -> None:
        p = seq.params
        if self.vocab_size is not None and row.numel() > self.vocab_size:
            row = row[: self.vocab_size]
        logits = row
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            logits = apply_penalties(
                row, torch.tensor(seq.tokens), torch.tensor(seq.output, dtype=torch.long),
                p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
            )
        if p.greedy:
            token = int(torch.argmax(logits))
        else:
            filtered = top_p_filter(top_k_filter(min_p_filter(apply_temperature(logits, p.temperature), p.min_p), p.top_k), p.top_p)
            token = sample(filtered, seq.generator)
        lp = None
        if p.logprobs is not None:
            logsm = torch.log_softmax(row.float(), -1)
            lp = TokenLogprob(token, float(logsm[token]), tuple(top_logprobs(logsm, p.logprobs)))
        seq.output.append(token)
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
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

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None, status: int | None = None) -> None:
        self._release(seq)
        seq.sink(Event(seq.id, None, "", None, reason, error, status))

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            self.runner.free(seq.slot)
            self.free_slots.append(seq.slot)
            self.free_slots.sort()
            seq.slot = None

    def fail_all(self, message: str, status: int = 500) -> None:
        """End every request with an error (the runner failed beyond recovery)."""
        for seq in list(self.waiting) + self.running:
            self._finish(seq, "error", message, status)
