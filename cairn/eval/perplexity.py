"""Perplexity with a sliding window, and bits per byte (comparable across tokenizers).

Each document is prefixed with one token (BOS, or EOS when the model has none) so that its first token is scored
too. Windows of at most `window` tokens start every `stride` (< window) tokens; a window scores only the tokens
that no earlier window scored, each given up to `window - 1` tokens before it (the recipe of transformers'
perplexity guide; a stride below the window keeps every scored token's context inside its window). Perplexity = exp(total NLL / scored tokens); bits per byte = total NLL / ln 2 / UTF-8 bytes of the text.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    first_target: int
    """Tokens [first_target, end) are scored, each given the tokens [begin, its position)."""


def windows(n: int, window: int, stride: int) -> list[Window]:
    """Windows over n tokens (token 0 is the prefix and is never a target)."""
    if window < 2 or not 1 <= stride < window:
        raise ValueError(f"need window >= 2 and 1 <= stride < window, got window {window}, stride {stride}")
    out, scored = [], 1
    begin = 0
    while scored < n:
        end = min(begin + window, n)
        out.append(Window(begin, end, scored))
        scored = end
        begin += stride
    return out


@dataclass
class PerplexityResult:
    nll: float
    tokens: int
    bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte, "nll": self.nll,
                "tokens": self.tokens, "bytes": self.bytes}


def perplexity(texts: list[str], encode: Callable[[str], list[int]], prefix: int,
               score: Callable[[list[int]], tuple[list[float], list[bool]]], window: int, stride: int,
               progress: Callable[[int], None] = lambda n: None) -> PerplexityResult:
    """NLL of every text's tokens through `score` (next-token logprobs of a token list), window by window."""
    nll, count, nbytes = 0.0, 0, 0
    for text in texts:
        ids = [prefix, *encode(text)]
        for w in windows(len(ids), window, stride):
            logprobs, _ = score(ids[w.begin : w.end])  # entry j scores ids[w.begin + j + 1]
            targets = logprobs[w.first_target - w.begin - 1 :]
            nll -= sum(targets)
            count += len(targets)
            progress(len(targets))
        nbytes += len(text.encode("utf-8"))
    return PerplexityResult(nll, count, nbytes)
