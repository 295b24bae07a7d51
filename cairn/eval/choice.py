"""Multiple choice by log-likelihood, scored as lm-evaluation-harness defines it.

Each choice is a continuation of the question (after a space, or as the assistant's reply under a chat template).
Its log-likelihood is the sum of its tokens' logprobs, where a pair is tokenized as the harness does: trailing
spaces of the context move to the continuation, the whole text is encoded, and the continuation's tokens are what
follows the context's own encoding. acc: the most likely choice is the answer; acc_norm: the same with each
log-likelihood divided by the choice's length in characters (the harness's definition); acc_bytes: divided by its
length in UTF-8 bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cairn.eval.data import ChoiceItem


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the front of the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def encode_pair(context: str, continuation: str, encode: Callable[[str], list[int]],
                prefix: int) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens); an empty context becomes the one prefix token."""
    context, continuation = split_pair(context, continuation)
    whole = encode(context + continuation)
    ctx = encode(context)
    cont = whole[len(ctx):]
    return (ctx or [prefix]), cont


def plain_context(item: ChoiceItem, shots: list[ChoiceItem]) -> str:
    """Few-shot examples as `question answer`, blank-line separated, then the question."""
    parts = [f"{s.text} {s.choices[s.answer]}" for s in shots]
    return "\n\n".join([*parts, item.text])


def chat_messages(item: ChoiceItem, shots: list[ChoiceItem]) -> list[dict]:
    """Few-shot examples as earlier turns, then the question as the user's turn."""
    msgs = []
    for s in shots:
        msgs += [{"role": "user", "content": s.text}, {"role": "assistant", "content": s.choices[s.answer]}]
    return [*msgs, {"role": "user", "content": item.text}]


@dataclass
class ChoiceResult:
    loglikelihoods: list[list[float]]
    answers: list[int]
    lengths: list[list[int]]
    """Each choice's length in characters."""
    byte_lengths: list[list[int]] | None = None
    """Each choice's length in UTF-8 bytes (None: the same as characters)."""

    @staticmethod
    def _argmax(xs: list[float]) -> int:
        return max(range(len(xs)), key=lambda i: xs[i])

    def predictions(self, per: list[list[int]] | None = None) -> list[int]:
        """The chosen index of each item: by log-likelihood, or by log-likelihood per unit of `per`."""
        if per is None:
            return [self._argmax(lls) for lls in self.loglikelihoods]
        return [self._argmax([ll / max(n, 1) for ll, n in zip(lls, ns)]) for lls, ns in zip(self.loglikelihoods, per)]

    def as_dict(self) -> dict:
        n = len(self.answers)

        def accuracy(per):
            return sum(p == a for p, a in zip(self.predictions(per), self.answers)) / n

        return {"acc": accuracy(None), "acc_norm": accuracy(self.lengths),
                "acc_bytes": accuracy(self.byte_lengths or self.lengths), "items": n}


def multiple_choice(items: list[ChoiceItem], requests: Callable[[ChoiceItem], list[tuple[list[int], list[int]]]],
                    score_many: Callable[[list[list[int]], list[int]], list[tuple[list[float], list[bool]]]],
                    progress: Callable[[int], None] = lambda n: None, batch_tokens: int = 2048) -> ChoiceResult:
    """Log-likelihood of every choice of every item; `requests(item)` gives each choice's (context, continuation)
    tokens. Pairs are scored longest first in batches of about `batch_tokens` padded tokens (`score_many` scores
    several sequences at once, each from a start position)."""
    pairs = [(i, j, ctx + cont, len(ctx)) for i, item in enumerate(items) for j, (ctx, cont) in
             enumerate(requests(item))]
    lls = [[0.0] * len(item.choices) for item in items]
    left = [len(item.choices) for item in items]
    order = sorted(pairs, key=lambda p: -len(p[2]))
    k = 0
    while k < len(order):
        width = len(order[k][2])
        batch = order[k : k + max(1, batch_tokens // width)]
        k += len(batch)
        for (i, j, _, _), (logprobs, _) in zip(batch, score_many([p[2] for p in batch], [p[3] for p in batch])):
            lls[i][j] = sum(logprobs)
            left[i] -= 1
            if left[i] == 0:
                progress(1)
    lengths = [[len(c) for c in it.choices] for it in items]
    byte_lengths = [[len(c.encode("utf-8")) for c in it.choices] for it in items]
    return ChoiceResult(lls, [it.answer for it in items], lengths, byte_lengths)
