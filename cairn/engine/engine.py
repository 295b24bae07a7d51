"""Continuous batching over a Runner.

Each step packs every decoding sequence's next token plus prompt chunks of new sequences (up to a token budget)
into one forward; finished or cancelled sequences give back their slot and KV blocks at once and waiting ones take
them. A sequence gets KV blocks as it grows (blocks.py); a waiting one is admitted when a slot and the blocks for
its prompt are free (sharing the cached blocks of a prompt prefix computed before). When a running sequence needs a
block and none is left, newer sequences are preempted (their blocks given back; they wait, then recompute what
they had, which the prefix cache often still holds) and resumed later with the same output.
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
from dataclasses import dataclass, field, replace
from typing import Any

from cairn.config import SamplingParams
from cairn.engine.blocks import BlockAllocator, BlockStats, blocks_for, preemption_victims
from cairn.engine.detok import TextStream
from cairn.engine.runner import BLOCK_SIZE, Chunk, Runner
from cairn.engine.sampling import GREEDY, Choice, RowSampling
from cairn.engine.speculate import DraftState, NgramIndex, adapt
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
    cached_tokens: int = 0
    """Prompt tokens whose keys and values came from the prefix cache instead of being computed."""


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
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""


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
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache when first admitted
    proposer: Any = None  # speculative decoding: an NgramIndex (prompt lookup) or a draft model's DraftSequence
    draft: DraftState = DraftState()

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
    drafted: tuple[int, ...]
    """Draft tokens at the end of each chunk (0: none)."""


def _ngram_proposer(prompt: list[int]) -> NgramIndex:
    index = NgramIndex()
    index.extend(prompt)
    return index


class Engine:
    """Scheduler + sampler. Not thread-safe: one thread calls add/cancel/step."""

    def __init__(self, runner: Runner, tokenizer: Tokenizer, eos_ids: tuple[int, ...], max_batch_tokens: int = 256,
                 max_queue: int = 1024, vocab_size: int | None = None, prefix_caching: bool = True,
                 window: int | None = None, draft: Any = None, draft_max: int = 8):
        """draft: None, 'ngram' (prompt lookup), or a drafter with `sequence(prompt)` (draft_model.ModelDrafter)."""
        if draft == "ngram":
            self._proposer: Callable | None = _ngram_proposer
        elif draft is None or callable(getattr(draft, "sequence", None)):
            self._proposer = None if draft is None else draft.sequence
        else:
            raise UserError(f"unknown draft {draft!r}: 'ngram' (prompt lookup) or a draft model", param="draft")
        self.runner, self.tokenizer = runner, tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.max_batch_tokens = max(1, max_batch_tokens)
        self.max_queue = max_queue
        self.vocab_size = vocab_size
        self.window = window  # sliding window: blocks wholly behind it are given back
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # hold a slot and blocks: prefilling or decoding; in admission order
        self.free_slots = list(range(runner.max_seqs))
        self.in_flight: deque[_Step] = deque()
        self._ids = itertools.count()
        bs = getattr(runner, "block_size", BLOCK_SIZE)
        num_blocks = getattr(runner, "num_blocks", None) or runner.max_seqs * blocks_for(runner.max_context, bs)
        self.blocks = BlockAllocator(num_blocks, bs, caching=prefix_caching)
        self._resets = getattr(runner, "resets", 0)
        self.preemptions = 0
        self.cached_tokens = 0  # prompt tokens served from the prefix cache, over all requests
        self.prompt_tokens = 0  # prompt tokens admitted, over all requests
        self.draft_max = max(1, draft_max)
        self.break_even = getattr(draft, "break_even", 0.25)  # acceptance below which drafting does not pay
        # Prompt lookup adapts per sequence (some copy, some do not). A draft model's pay-off is mostly a property of
        # the model pair: one state for all sequences, starting cautiously (k = 1), so a new request does not
        # relearn that drafting does not pay.
        self.shared_draft = None if self.break_even <= 0.25 else DraftState(1, min(1.0, self.break_even + 0.05))
        self.draft_proposed = self.draft_accepted = 0  # speculative tokens, over all requests

    @property
    def max_context(self) -> int:
        """Longest sequence: the runner's context, or what the whole KV pool holds if that is less."""
        return min(self.runner.max_context, self.blocks.num_blocks * self.blocks.block_size)

    def kv_stats(self) -> BlockStats:
        return self.blocks.stats()

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
        seq = Sequence(rid, list(prompt), params, max_tokens, sink, TextStream(self.tokenizer, params.stop), seed,
                       stop_ids)
        if self._proposer is not None and params.logprobs is None:  # a draft's tokens carry no logprobs
            seq.proposer = self._proposer(seq.prompt)
        self.waiting.append(seq)
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
        self._admit()
        while len(self.in_flight) < max(1, self.runner.depth):
            step = self._submit()
            if step is None:
                break
            self.in_flight.append(step)
        if self.in_flight:
            self._complete(self.in_flight.popleft())

    def _admit(self) -> None:
        """Waiting sequences (oldest first) take a slot and the blocks for their tokens, sharing the cached blocks
        of their longest cached prefix; one that does not fit yet waits, and so do those behind it."""
        bs = self.blocks.block_size
        while self.waiting and self.free_slots:
            seq = self.waiting[0]
            tokens = seq.tokens
            prefix = self.blocks.match(tokens, (len(tokens) - 1) // bs)  # at least one token left to compute
            # a block of headroom per running sequence, so that admitting does not force a preemption at once
            if not self.blocks.admit(seq, prefix, len(tokens), reserve=len(self.running)):
                break
            self.waiting.popleft()
            seq.slot = self.free_slots.pop(0)
            seq.computed = len(prefix) * bs
            if seq.cached_tokens is None:  # first admission (not a resumption after preemption)
                seq.cached_tokens = min(seq.computed, len(seq.prompt))
                self.cached_tokens += seq.cached_tokens
                self.prompt_tokens += len(seq.prompt)
            self.running.append(seq)

    def _grow(self, seq: Sequence, n_tokens: int, busy: set) -> bool:
        """Blocks for n_tokens positions of `seq`, preempting newer sequences (or `seq` itself) when none are left;
        False when `seq` cannot run this step. Sequences in `busy` (in flight or scheduled) are not preempted."""
        while not self.blocks.grow(seq, n_tokens):
            need = blocks_for(n_tokens, self.blocks.block_size) - len(self.blocks.table(seq))
            running = [(s, self.blocks.reclaimable(s), s not in busy) for s in self.running]
            victims = preemption_victims(need, self.blocks.available, running, seq)
            if not victims:
                return False
            for v in victims:
                self._preempt(v)
            if seq not in self.running:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Give back `seq`'s slot and blocks and put it first in line; it recomputes its tokens when readmitted."""
        self.running.remove(seq)
        self._free_slot(seq)
        seq.computed = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _submit(self) -> _Step | None:
        """Schedule the sequences not in flight (at most 1/depth of the running ones) into one step and submit it."""
        group = -(-len(self.running) // max(1, self.runner.depth))  # ceil: sequences per step
        busy = {s for s in self.running if s.in_flight}
        decode = sorted((s for s in self.running if s not in busy and s.output and s.computed == len(s.tokens) - 1),
                        key=lambda s: s.slot)[:group]
        budget = self.max_batch_tokens - len(decode)
        drafts: dict[Sequence, tuple[int, ...]] = {}
        for s in sorted(decode, key=self.running.index):  # oldest first: they may preempt newer ones for a block
            if s not in self.running:
                continue
            d = self._propose(s, budget, len(decode))
            if d and self.blocks.grow(s, s.computed + 1 + len(d)):
                drafts[s] = d
                budget -= len(d)
            elif not self._grow(s, s.computed + 1, busy):
                busy.add(s)  # waits for a block (or was preempted)
        decode = [s for s in decode if s in self.running and s not in busy]
        busy.update(decode)
        decode.sort(key=lambda s: s in drafts)  # single-token chunks first, then those with a draft
        chunks = [Chunk(s.slot, s.computed, (s.tokens[-1], *drafts.get(s, ())), tuple(self.blocks.table(s)))
                  for s in decode]
        rows = [replace(s.row(), draft=drafts[s]) if s in drafts else s.row() for s in decode]
        scheduled = list(decode)
        for s in self.running:
            if s in busy or budget <= 0 or len(scheduled) >= group:
                continue
            tokens = s.tokens
            if s.output and s.computed == len(tokens) - 1:
                continue  # decoding, but not in this step's group
            n = min(budget, len(tokens) - s.computed)
            chunks.append(Chunk(s.slot, s.computed, tuple(tokens[s.computed : s.computed + n]),
                                tuple(self.blocks.table(s))))
            # a token is due after a chunk that reaches the end of what the sequence has
            rows.append(s.row() if s.computed + n == len(tokens) else None)
            scheduled.append(s)
            budget -= n
        if not chunks:
            return None
        handle = self.runner.submit(chunks, rows)
        for s in scheduled:
            s.in_flight = True
        return _Step(handle, tuple(scheduled), tuple(chunks), tuple(len(drafts.get(s, ())) for s in scheduled))

    def _propose(self, seq: Sequence, budget: int, decoding: int) -> tuple[int, ...]:
        """Draft tokens for a decoding sequence (speculative decoding), within the step's token budget, its
        max_tokens and the context, and only while blocks are plentiful (a draft never causes a preemption)."""
        state = self.shared_draft or seq.draft
        if seq.proposer is None or state.pause:
            return ()
        room = min(seq.max_tokens - len(seq.output), self.max_context - len(seq.tokens), budget + 1) - 1
        d = seq.proposer.propose(min(state.k, room))
        if blocks_for(seq.computed + 1 + len(d), self.blocks.block_size) - len(self.blocks.table(seq)) + decoding \
                > self.blocks.available:
            return ()
        return tuple(d)

    def _complete(self, step: _Step) -> None:
        try:
            choices = self.runner.collect(step.handle)
        finally:
            for seq in step.seqs:
                seq.in_flight = False
        resets = getattr(self.runner, "resets", 0)
        if resets != self._resets:  # the runner rebuilt only the blocks live sequences hold
            self._resets = resets
            self.blocks.forget_cache()
        for seq, chunk, choice, drafted in zip(step.seqs, step.chunks, choices, step.drafted):
            if seq not in self.running:  # finished (cancelled) while in flight: its slot can go now
                self._free_slot(seq)
                continue
            then = choice.then if choice is not None else ()
            seq.computed += len(chunk.tokens) - drafted + len(then)  # the last token and the accepted drafts
            self.blocks.commit(seq, seq.tokens, seq.computed)
            if self.window is not None:  # keys at positions <= computed - window are never attended to again
                self.blocks.drop_before(seq, seq.computed - self.window + 1)
            if seq.proposer is not None and seq.output:  # a decode step: adapt the draft length
                state = adapt(self.shared_draft or seq.draft, drafted, len(then), self.draft_max, self.break_even)
                if self.shared_draft is None:
                    seq.draft = state
                else:
                    self.shared_draft = state
                self.draft_proposed += drafted
                self.draft_accepted += len(then)
            if choice is not None:  # prompt done (or decode step): a new token is due (more after a draft)
                self._emit_token(seq, choice)
                for token in then:
                    if seq not in self.running:
                        break
                    self._emit_token(seq, Choice(token))
        observe = getattr(self.runner, "observe_blocks", None)  # a pool shows block usage in `cairn pool status`
        if observe is not None:
            observe(self.blocks.stats())

    def _emit_token(self, seq: Sequence, choice: Choice) -> None:
        token = choice.token_id
        lp = None
        if seq.params.logprobs is not None:
            lp = TokenLogprob(token, choice.logprob, choice.top)
        seq.output.append(token)
        if seq.proposer is not None:
            seq.proposer.extend((token,))
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
        seq.sink(Event(seq.id, token, text, lp, finish, cached_tokens=seq.cached_tokens or 0))

    def _finish(self, seq: Sequence, reason: FinishReason, error: Exception | None = None) -> None:
        self._release(seq)
        seq.sink(Event(seq.id, None, "", None, reason, error, cached_tokens=seq.cached_tokens or 0))

    def _release(self, seq: Sequence) -> None:
        close = getattr(seq.proposer, "close", None)  # a draft model's slot
        if close is not None:
            close()
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not seq.in_flight:  # else the slot goes when its step is collected (a new sequence must not share it)
            self._free_slot(seq)

    def _free_slot(self, seq: Sequence) -> None:
        self.blocks.release(seq)
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
