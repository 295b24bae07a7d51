"""Choosing tokens: pure functions over logits. Filters work on one row; `choose` composes them for a step's rows.

`choose` is the one place tokens are picked: the local runner calls it in-process, a pool's last stage calls it on
its node (so only token ids cross the network). Its randomness is a pure function of (request seed, position of
the token being generated), never a generator's state, so a replayed or re-placed step draws the same tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from cairn.engine.speculate import accept_greedy

NEG_INF = float("-inf")
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class RowSampling:
    """How to choose the next token of one row (one request's step): its filters, its seed and the position of the
    token being generated, and the token history its penalties need (empty when it has none)."""

    temperature: float = 0.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    """The request's seed: with `position`, it fixes the random draw."""
    position: int = 0
    """Index of the token being chosen in its sequence (prompt + output so far)."""
    seen: tuple[int, ...] = ()
    """Prompt + output token ids; only when repetition_penalty != 1."""
    generated: tuple[int, ...] = ()
    """Output token ids; only when a presence or frequency penalty is set."""
    logprobs: int | None = None
    """Return the chosen token's logprob and this many alternatives."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before everything else (OpenAI's logit_bias)."""
    draft: tuple[int, ...] = ()
    """Speculative decoding (rows without logprobs): tokens proposed after the chunk's last real token, which end
    the chunk. Its last len(draft) + 1 positions get logits; the choice keeps the drafts the model would have
    chosen itself and adds its own next token (Choice.then); see `verify`."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits, nothing else asked: such rows are chosen together in one call."""
        return (self.greedy and self.logprobs is None and self.repetition_penalty == 1.0
                and not self.presence_penalty and not self.frequency_penalty and not self.logit_bias
                and not self.draft)

    @property
    def logit_rows(self) -> int:
        """Positions at the end of the chunk whose logits this row needs."""
        return 1 + len(self.draft)


GREEDY = RowSampling()
"""The row of a plain greedy request (shared: a step's greedy rows serialise as one object)."""


@dataclass(frozen=True)
class Choice:
    """The token chosen for one row, with its logprob and the top alternatives when they were asked for."""

    token_id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()
    then: tuple[int, ...] = ()
    """Speculative decoding: the tokens chosen after token_id in the same step (the accepted drafts but the first,
    and the model's own token after them)."""


def apply_penalties(
    logits: torch.Tensor,
    seen: torch.Tensor,
    generated: torch.Tensor,
    repetition: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
) -> torch.Tensor:
    """logits (V,); seen: token ids of prompt + output (repetition penalty, as in CTRL / HF);
    generated: output token ids (presence and frequency penalties, as in OpenAI's API). Returns a new row."""
    out = logits.clone()
    if repetition != 1.0 and seen.numel():
        ids = seen.unique()
        vals = out[ids]
        out[ids] = torch.where(vals > 0, vals / repetition, vals * repetition)
    if (presence or frequency) and generated.numel():
        counts = torch.bincount(generated, minlength=out.numel()).to(out.dtype)  # (V,)
        out -= frequency * counts + presence * (counts > 0).to(out.dtype)
    return out


def apply_logit_bias(logits: torch.Tensor, bias: Sequence[tuple[int, float]]) -> torch.Tensor:
    """logits (V,) plus bias[token] for each (token, bias) pair; a new row."""
    if not bias:
        return logits
    ids = torch.tensor([t for t, _ in bias], dtype=torch.long)
    return logits.index_add(0, ids, torch.tensor([b for _, b in bias], dtype=logits.dtype))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature in (0.0, 1.0) else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties at the k-th value kept too); k <= 0 keeps all."""
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to at least p (always >= 1 token)."""
    if p >= 1.0:
        return logits
    # The nucleus is nearly always among the few most likely tokens: look for it in the top k (a partial sort),
    # widening k until the top k's mass reaches p, instead of sorting the whole vocabulary (40% of a 16-sequence
    # decode step of a 49k-token model at top_p 0.95). The kept set is the one a full sort gives.
    V = logits.numel()
    total = torch.logsumexp(logits.float(), -1)
    k = min(V, 256)
    while True:
        top, order = torch.topk(logits, k)  # descending
        probs = (top.float() - total).exp()
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        if k == V or float(before[-1] + probs[-1]) >= p:
            break
        k = min(V, 8 * k)
    keep = order[before < p]
    return torch.full_like(logits, NEG_INF).index_copy_(0, keep, logits[keep])


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(), NEG_INF)


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that scatters nearby inputs."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def uniform(seed: int, position: int) -> float:
    """A number in [0, 1) that depends only on (seed, position): the random draw for that token of that request."""
    return (_mix64(_mix64(seed & _MASK64) ^ (position & _MASK64)) >> 11) * 2.0**-53


def draw(logits: torch.Tensor, u: float) -> int:
    """The token at quantile u of softmax(logits) (inverse CDF); never a token of probability 0."""
    probs = logits.double().softmax(-1)  # (V,)
    cdf = probs.cumsum(-1)
    i = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64), right=True))
    if i >= probs.numel() or probs[i] == 0:  # u * total rounded onto the end of the CDF
        i = int(probs.nonzero()[-1])
    return i


def choose_row(logits: torch.Tensor, row: RowSampling) -> Choice:
    """The next token for one row of logits (V,): logit bias, penalties, then greedy or temperature + filters +
    draw. Logprobs are those of the model (raw logits), as OpenAI reports them."""
    x = apply_logit_bias(logits, row.logit_bias)
    if row.repetition_penalty != 1.0 or row.presence_penalty or row.frequency_penalty:
        x = apply_penalties(x, torch.tensor(row.seen, dtype=torch.long), torch.tensor(row.generated, dtype=torch.long),
                            row.repetition_penalty, row.presence_penalty, row.frequency_penalty)
    if row.greedy:
        token = int(torch.argmax(x))
    else:
        x = top_p_filter(top_k_filter(min_p_filter(apply_temperature(x, row.temperature), row.min_p), row.top_k),
                         row.top_p)
        token = draw(x, uniform(row.seed, row.position))
    if row.logprobs is None:
        return Choice(token)
    logsm = torch.log_softmax(logits.float(), -1)  # (V,)
    return Choice(token, float(logsm[token]), tuple(top_logprobs(logsm, row.logprobs)))


def verify(logits: torch.Tensor, row: RowSampling) -> Choice:
    """Speculative decoding: logits (len(draft) + 1, V) after the chunk's last real token and after each draft
    token. Each position's token is chosen exactly as a plain step would choose it there (same filters, penalties
    over the history with the drafts before it, same random draw for that position), and drafts are kept while
    they equal those choices: the output is token for token the plain output, so its distribution is the model's.
    (A drawn token equals a draft d with probability p(d): the standard acceptance rule for a one-token proposal.)"""
    if row.plain_greedy or (row.greedy and not row.logit_bias and row.repetition_penalty == 1.0
                            and not row.presence_penalty and not row.frequency_penalty):
        emitted = accept_greedy(row.draft, logits.argmax(-1).tolist())
        return Choice(emitted[0], then=tuple(emitted[1:]))
    emitted = []
    for i in range(len(row.draft) + 1):
        before = row.draft[:i]
        at = replace(row, draft=(), position=row.position + i, seen=row.seen + before if row.seen else (),
                     generated=row.generated + before if row.presence_penalty or row.frequency_penalty else ())
        emitted.append(choose_row(logits[i], at).token_id)
        if i == len(row.draft) or emitted[-1] != row.draft[i]:
            break
    return Choice(emitted[0], then=tuple(emitted[1:]))


def logit_counts(rows: Sequence[RowSampling | None] | None, n: int) -> list[int]:
    """Logit rows each of n chunks needs at its end: 1, or 1 + its draft's length."""
    return [1] * n if rows is None else [1 if r is None else r.logit_rows for r in rows]


def choose(logits: torch.Tensor, rows: Sequence[RowSampling | None]) -> list[Choice | None]:
    """One choice per sampling row; None where the row is None (no token is due, e.g. mid-prompt). `logits` has
    each row's `logit_rows` rows in turn (one, or one per verified draft token + 1). Plain greedy rows are chosen
    with one batched argmax; drafted rows keep the drafts their argmaxes agree with (speculate.accept_greedy)."""
    counts = logit_counts(rows, len(rows))
    if sum(counts) != logits.shape[0]:
        raise ValueError(f"{len(rows)} sampling rows for {logits.shape[0]} rows of logits (they need {sum(counts)})")
    logits = logits.cpu()
    ends = list(itertools.accumulate(counts))  # row i's (last) logits are at ends[i] - 1
    out: list[Choice | None] = [None] * len(rows)
    plain = [i for i, r in enumerate(rows) if r is not None and r.plain_greedy]
    if plain:
        for i, t in zip(plain, logits[[ends[i] - 1 for i in plain]].argmax(-1).tolist()):
            out[i] = Choice(t)
    for i, r in enumerate(rows):
        if r is not None and r.draft:
            out[i] = verify(logits[ends[i] - counts[i] : ends[i]], r)
        elif r is not None and not r.plain_greedy:
            out[i] = choose_row(logits[ends[i] - 1], r)
    return out


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob) pairs of a log-softmax row."""
    if k <= 0:
        return []
    vals, ids = torch.topk(logprobs, k)
    return list(zip(ids.tolist(), vals.tolist()))


ChoiceReply = tuple  # (ids, {row: (logprob, top)}) or (ids, {row: (logprob, top)}, {row: then})


def encode_choices(choices: list[Choice | None]) -> ChoiceReply:
    """A step's choices made small for the wire: one token id per row (-1 where none was due), plus the logprobs
    of the rows that asked for them, by row, and (only when a row verified drafts) the tokens chosen after the
    first, by row. Token ids only, never logits."""
    ids = [-1 if c is None else c.token_id for c in choices]
    extra = {i: (c.logprob, c.top) for i, c in enumerate(choices) if c is not None and c.logprob is not None}
    then = {i: c.then for i, c in enumerate(choices) if c is not None and c.then}
    return (ids, extra, then) if then else (ids, extra)


def decode_choices(reply: ChoiceReply) -> list[Choice | None]:
    ids, extra, then = reply if len(reply) == 3 else (*reply, {})
    return [None if t < 0 else Choice(t, *extra.get(i, (None, ())), then=then.get(i, ())) for i, t in enumerate(ids)]


def target_logprobs(logits: torch.Tensor, tokens: list[int]) -> tuple[list[float], list[bool]]:
    """How likely a model found a token sequence: from logits (T, V) where row i follows tokens[: i + 1], the
    logprob of each next token tokens[i + 1] and whether it was the most likely one (T - 1 entries each)."""
    logsm = torch.log_softmax(logits[:-1].float(), -1)  # (T - 1, V)
    target = torch.tensor(tokens[1:], device=logsm.device)[:, None]  # (T - 1, 1)
    chosen = logsm.gather(-1, target)[:, 0]  # (T - 1,)
    greedy = chosen >= logsm.max(-1).values
    return chosen.tolist(), greedy.tolist()
