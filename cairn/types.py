"""Small shared value types: the one LayerRange used everywhere."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DType = Literal["float32", "bfloat16", "float16"]
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True, order=True)
class LayerRange:
    """Half-open range [start, end) of decoder blocks held by one stage."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"LayerRange needs 0 <= start <= end, got [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        return iter(range(self.start, self.end))

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.start <= layer < self.end

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"
