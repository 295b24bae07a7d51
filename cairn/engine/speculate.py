"""Speculative decoding by prompt lookup (`--draft ngram`): pure functions, no model.

A greedy sequence proposes the k tokens that followed the latest earlier occurrence of its last n tokens (in its
prompt or output); the target model verifies all of them in one forward of k + 1 positions and keeps the longest
prefix it would have chosen itself, plus its own next token. The output is the target's greedy output, token for
token; a step costs about one decode step where decoding reads the weights once per step (small batches), so every
accepted token is a step saved. k adapts to how often proposals are accepted, and drafting pauses when they are not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class NgramIndex:
    """Where each n-gram (min_n <= n <= max_n) of a growing token list last occurred with a continuation after it.

    `extend` as tokens are appended (amortised O(max_n) per token); `propose` looks the current suffix up."""

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> index just after its latest indexed occurrence

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            end = len(self.tokens)  # the n-grams ending just before `t` now have a continuation: t
            for n in range(self.min_n, self.max_n + 1):
                if end >= n:
                    self._last[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(t)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix (max_n down to min_n)
        that occurred before; [] when none did."""
        if k <= 0:
            return []
        toks = self.tokens
        for n in range(min(self.max_n, len(toks)), self.min_n - 1, -1):
            start = self._last.get(tuple(toks[len(toks) - n :]))
            if start is not None:
                return toks[start : start + k]
        return []


def accept_greedy(draft: Sequence[int], greedy: Sequence[int]) -> list[int]:
    """Tokens a greedy target emits after verifying `draft`: greedy[i] is its choice after the draft's first i
    tokens (len(draft) + 1 of them). Keeps the drafts it agrees with, then its own next token."""
    out = []
    for d, g in zip(draft, greedy):
        out.append(g)
        if d != g:
            return out
    out.append(greedy[len(draft)])
    return out


@dataclass(frozen=True)
class DraftState:
    """How many tokens a sequence proposes next, from how its proposals have fared."""

    k: int = 4
    """Tokens to propose at the next step."""
    rate: float = 1.0
    """Moving average of the fraction of proposed tokens accepted."""
    pause: int = 0
    """Steps to decode without proposing (after a run of poor acceptance)."""
    backoff: int = 8
    """The next pause's length: doubled each time proposing is paused again soon after a pause (up to 256)."""


MAX_BACKOFF = 256


def adapt(state: DraftState, proposed: int, accepted: int, k_max: int, break_even: float = 0.25) -> DraftState:
    """The state after a step that proposed `proposed` tokens and had `accepted` of them accepted (proposed 0: a
    plain decode step). All accepted: propose more (up to k_max); under half: fewer. When the average acceptance
    falls below `break_even` (the rate at which a one-token proposal pays for itself: ~0 cost for prompt lookup,
    where 1/4 keeps batches lean; a draft model's cost relative to the model's), pause and start again from k = 1;
    a pause that follows a pause lasts twice as long, so a draft that never pays costs less and less."""
    if proposed == 0:
        return DraftState(state.k, state.rate, max(0, state.pause - 1), state.backoff)
    rate = 0.7 * state.rate + 0.3 * accepted / proposed
    if rate < break_even:
        # resume just above the threshold: one accepted proposal keeps drafting, one rejected pauses again
        resume = max(0.5, min(1.0, (break_even - 0.3) / 0.7 + 0.01))
        return DraftState(1, resume, state.backoff, min(MAX_BACKOFF, 2 * state.backoff))
    if accepted == proposed:
        k = min(k_max, state.k + max(1, state.k // 2))
    elif 2 * accepted < proposed:
        k = max(1, state.k // 2)
    else:
        k = state.k
    return DraftState(k, rate, 0, 8 if rate >= break_even + 0.1 else state.backoff)
