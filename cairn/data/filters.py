"""Rules that drop a synthetic example, as pure functions: each returns the reason to drop, or None to keep."""

from __future__ import annotations

import re

# the openings of a refusal or a disclaimer instead of an answer (lower case, after normalising apostrophes)
REFUSALS = (
    "i'm sorry", "i am sorry", "sorry, but", "i apologize", "i apologise", "i cannot", "i can't", "i can not",
    "i'm unable", "i am unable", "i'm not able", "i am not able", "as an ai", "as a language model",
    "i'm just an ai", "i do not have the ability", "i don't have the ability", "i won't", "i will not",
)
_QUOTED = re.compile(r"[\"\u201c]([^\"\u201d\n]{8,}\?)[\"\u201d]")
_LABEL = re.compile(r"^\s*(?:question|instruction|task|q|user)\s*\d*\s*[:.)-]\s*", re.IGNORECASE)


def clean_instruction(text: str) -> str:
    """A teacher-written instruction as a user would type it: a quoted question inside the reply ('A student might
    ask: "...?"'), else a line labelled 'Question:', else the first paragraph; without label or quotes."""
    text = text.strip()
    if m := _QUOTED.search(text):
        return m.group(1).strip()
    for line in text.splitlines():
        if _LABEL.match(line):
            return _LABEL.sub("", line).strip()
    para = text.split("\n\n")[0].strip()
    if len(para) >= 2 and para[0] == para[-1] and para[0] in "\"'":
        para = para[1:-1].strip()
    return para


def instruction_problem(text: str, min_chars: int, max_chars: int) -> str | None:
    if not text.strip():
        return "empty instruction"
    if len(text) < min_chars:
        return "instruction too short"
    if len(text) > max_chars:
        return "instruction too long"
    return None


def is_refusal(text: str) -> bool:
    head = text.strip().lower().replace("\u2019", "'")[:200]
    return any(head.startswith(r) or f". {r}" in head[:80] for r in REFUSALS)


def answer_problem(text: str, finish_reason: str | None, min_chars: int, max_chars: int) -> str | None:
    """Why an answer is not worth training on: empty, cut off by the token limit, a refusal, too short or long."""
    if not text.strip():
        return "empty answer"
    if finish_reason == "length":
        return "truncated answer"
    if is_refusal(text):
        return "refusal"
    if len(text.strip()) < min_chars:
        return "answer too short"
    if len(text) > max_chars:
        return "answer too long"
    return None
