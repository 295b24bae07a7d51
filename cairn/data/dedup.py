"""Exact and near-duplicate detection: the signatures are pure functions of the text; the index remembers what it
has seen. Near duplicates are found with MinHash over word n-grams and locality-sensitive hashing (datasketch):
FineWeb's setting is 5-grams, 14 bands of 8 rows (112 permutations), which flags pairs above ~75% Jaccard
similarity; short texts such as instructions use shorter n-grams."""

from __future__ import annotations

import hashlib
import re
import unicodedata

_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Lower case, NFKC, punctuation dropped, whitespace collapsed: what 'the same text' compares."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def exact_key(text: str) -> str:
    """The signature of exact duplicates (after `normalise`)."""
    return hashlib.sha1(normalise(text).encode()).hexdigest()


def shingles(text: str, n: int) -> set[str]:
    """Word n-grams of the normalised text (the whole text when it has fewer than n words)."""
    words = normalise(text).split()
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of two texts' n-gram sets (what MinHash estimates)."""
    sa, sb = shingles(a, n), shingles(b, n)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


class DedupIndex:
    """Texts seen so far; `add` keeps a text only if it is neither an exact nor a near duplicate of one kept."""

    def __init__(self, ngram: int = 5, bands: int = 14, rows: int = 8, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        self.ngram, self.seed, self.num_perm = ngram, seed, bands * rows
        self._minhash = MinHash
        self.lsh = MinHashLSH(num_perm=self.num_perm, params=(bands, rows))
        self.exact: dict[str, str] = {}
        self.count = 0

    def signature(self, text: str):
        m = self._minhash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch([s.encode() for s in shingles(text, self.ngram)])
        return m

    def duplicate_of(self, text: str) -> tuple[str, str] | None:
        """('exact' | 'near', the kept key it duplicates) or None."""
        key = exact_key(text)
        if key in self.exact:
            return "exact", self.exact[key]
        near = self.lsh.query(self.signature(text))
        return ("near", near[0]) if near else None

    def add(self, text: str, key: str | None = None) -> tuple[str, str] | None:
        """Keep `text` under `key` unless it duplicates a kept one; returns what `duplicate_of` said."""
        dup = self.duplicate_of(text)
        if dup is None:
            key = key if key is not None else f"#{self.count}"
            self.exact[exact_key(text)] = key
            self.lsh.insert(key, self.signature(text))
            self.count += 1
        return dup
