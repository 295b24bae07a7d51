"""The judge: a model rates an answer to an instruction from 1 to 5. One module for every judging need (synthetic
data filtering, the web page's judge). The rating is the model's most likely digit as the first token of its reply
(a logit bias of +100 on the tokens '1'..'5' confines the greedy choice to them), so every answer gets a rating in
one batched step; a tokenizer without single-digit tokens falls back to reading the first digit of a short reply."""

from __future__ import annotations

import re

from cairn.config import SamplingParams

RATING_PROMPT = (
    "Rate how well the response answers the instruction, from 1 (useless, wrong or off-topic) to 5 (correct, "
    "helpful and complete). Reply with one digit.\n\n"
    "Instruction:\n{instruction}\n\nResponse:\n{answer}\n\nRating (1-5):"
)
_DIGIT = re.compile(r"[1-5]")


def rating_messages(instruction: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": RATING_PROMPT.format(instruction=instruction, answer=answer)}]


def parse_rating(text: str) -> int | None:
    """The first digit 1-5 in a reply, or None."""
    m = _DIGIT.search(text)
    return int(m.group()) if m else None


def digit_bias(tokenizer) -> tuple[tuple[int, float], ...] | None:
    """Logit bias that confines the next token to '1'..'5', or None when they are not single tokens."""
    ids = [tokenizer.token_id(str(d)) for d in range(1, 6)]
    if any(i is None for i in ids):
        return None
    return tuple((i, 100.0) for i in ids)


def rate(llm, pairs: list[tuple[str, str]]) -> list[int | None]:
    """A 1-5 rating for each (instruction, answer), all requests submitted at once (they batch in the engine)."""
    bias = digit_bias(llm.tokenizer)
    params = (SamplingParams(max_tokens=1, temperature=0.0, logit_bias=bias) if bias is not None
              else SamplingParams(max_tokens=8, temperature=0.0))
    done = llm.generate([llm.render_chat(rating_messages(i, a)) for i, a in pairs], params)
    return [parse_rating(c.text) for c in done]
