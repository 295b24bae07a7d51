"""Incremental detokenisation with stop strings: text arrives as tokens do, never split inside a UTF-8 character,
and text that could be the start of a stop string is held back until it is known not to be."""

from __future__ import annotations

from cairn.models.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # decoded so far, stop string excluded
        self.emitted = 0  # characters of self.text already handed out
        self._prefix = 0  # ids[_prefix:_read] decode to the last stable tail
        self._read = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the new text that is safe to show (may be empty). Sets .stopped on a stop string;
        tokens pushed after that add nothing."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prev = self.tok.decode(self.ids[self._prefix : self._read])
        new = self.tok.decode(self.ids[self._prefix :])
        if len(new) <= len(prev) or new.endswith("\ufffd"):
            return ""  # incomplete UTF-8 sequence or a token with no text: wait
        delta = new[len(prev) :]
        self._prefix, self._read = self._read, len(self.ids)
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += delta
        for s in self.stop:
            idx = self.text.find(s, start)
            if idx >= 0:
                self.text = self.text[:idx]
                self.stopped = True
        return self._take(final=self.stopped)

    def finish(self) -> str:
        """Everything not yet handed out (called when generation ends)."""
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            end -= self._held_back()
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
