"""How sure a model is of an answer it generated, from the answer alone: higher is surer for every signal.

- mean_logprob: the mean of the answer's token logprobs (the geometric-mean token probability, in log space).
- min_logprob: its least likely token: one unsure token is enough to doubt a short factual answer.
- entropy: minus the mean entropy of the next-token distributions along the answer. The engine reports the top-k
  alternatives of each token, so each distribution is the top k plus everything else as one outcome: a lower bound
  of the true entropy (exact when the top k hold all the mass).
- agreement: the share of extra sampled answers that say the same as the answer (after normalising case, spacing
  and punctuation), as self-consistency measures it.

An empty answer has no evidence for it: every signal gives it -inf, so a cascade escalates it.
"""

from __future__ import annotations

import math
import re

SIGNALS = ("mean_logprob", "min_logprob", "entropy", "agreement")


def mean_logprob(logprobs: list[float]) -> float:
    return sum(logprobs) / len(logprobs) if logprobs else -math.inf


def min_logprob(logprobs: list[float]) -> float:
    return min(logprobs) if logprobs else -math.inf


def top_entropy(top: list[float]) -> float:
    """Entropy (nats) of a distribution known by its top-k logprobs, the remaining mass counted as one outcome."""
    probs = [math.exp(x) for x in top]
    rest = max(0.0, 1.0 - sum(probs))
    return -sum(p * math.log(p) for p in probs + [rest] if p > 0)


def neg_entropy(tops: list[list[float]]) -> float:
    """Minus the mean top-k entropy over the answer's tokens."""
    return -sum(top_entropy(t) for t in tops) / len(tops) if tops else -math.inf


def normalise_answer(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def agreement(answer: str, samples: list[str]) -> float:
    """The share of `samples` equal to `answer` once normalised (1.0 with no samples to disagree)."""
    key = normalise_answer(answer)
    if not key:
        return -math.inf
    if not samples:
        return 1.0
    return sum(normalise_answer(s) == key for s in samples) / len(samples)


def confidence(signal: str, logprobs: list[float], tops: list[list[float]], answer: str = "",
               samples: list[str] | None = None) -> float:
    """The named signal of one answer: its tokens' logprobs, each token's top-k logprobs, its text, and the texts
    of extra samples (agreement only)."""
    if signal == "mean_logprob":
        return mean_logprob(logprobs)
    if signal == "min_logprob":
        return min_logprob(logprobs)
    if signal == "entropy":
        return neg_entropy(tops)
    if signal == "agreement":
        return agreement(answer, samples or [])
    raise ValueError(f"unknown confidence signal {signal!r}; one of {', '.join(SIGNALS)}")
