"""Greedy answers scored by exact match and by "contains", after normalising case, spaces and end punctuation."""

from __future__ import annotations

import re
import string


def normalise(text: str) -> str:
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(string.punctuation + " ")


def exact_match(output: str, answers: list[str]) -> bool:
    return normalise(output) in {normalise(a) for a in answers}


def contains(output: str, answers: list[str]) -> bool:
    out = normalise(output)
    return any(normalise(a) in out for a in answers if normalise(a))
