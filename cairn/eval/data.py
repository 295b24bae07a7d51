"""Reading evaluation files: texts for perplexity, multiple-choice and generation items, each line checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cairn.errors import UserError


class ChoiceItem(BaseModel):
    """One multiple-choice question: `question` (or `context`), its `choices`, the index of the right one."""

    model_config = ConfigDict(extra="ignore")
    question: str | None = None
    context: str | None = None
    choices: list[str] = Field(min_length=2)
    answer: int = Field(ge=0)

    @model_validator(mode="after")
    def _check(self) -> ChoiceItem:
        if (self.question is None) == (self.context is None):
            raise ValueError("give exactly one of question or context")
        if self.answer >= len(self.choices):
            raise ValueError(f"answer {self.answer} is not an index into {len(self.choices)} choices")
        return self

    @property
    def text(self) -> str:
        return self.question if self.question is not None else self.context


class GenerateItem(BaseModel):
    """One generation item: a `prompt` (text) or chat `messages`, and the `answer` (or several acceptable ones)."""

    model_config = ConfigDict(extra="ignore")
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    answer: str | list[str]

    @model_validator(mode="after")
    def _check(self) -> GenerateItem:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    @property
    def answers(self) -> list[str]:
        return [self.answer] if isinstance(self.answer, str) else list(self.answer)


def _jsonl(path: Path) -> list[tuple[int, Any]]:
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    if not out:
        raise UserError(f"{path} holds no items")
    return out


def _items(path: Path, schema):
    items = []
    for i, obj in _jsonl(path):
        try:
            items.append(schema.model_validate(obj))
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            where = ".".join(str(x) for x in err["loc"])
            raise UserError(f"{path}:{i}: {where + ': ' if where else ''}{err['msg']}") from None
    return items


def read_choice(path: str | Path) -> list[ChoiceItem]:
    return _items(Path(path), ChoiceItem)


def read_generate(path: str | Path) -> list[GenerateItem]:
    return _items(Path(path), GenerateItem)


def read_texts(path: str | Path) -> list[str]:
    """Documents for perplexity: a text file is one document; JSONL gives one per line's `text`."""
    path = Path(path)
    if path.suffix == ".jsonl":
        texts = []
        for i, obj in _jsonl(path):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise UserError(f"{path}:{i}: expected a JSON object with a \"text\" string")
            texts.append(obj["text"])
    elif path.is_file():
        texts = [path.read_text(encoding="utf-8")]
    else:
        raise UserError(f"{path} does not exist")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"{path} holds no text")
    return texts
