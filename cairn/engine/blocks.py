"""KV-cache blocks: which fixed-size block of the cache holds which positions of which sequence. Pure Python.

The cache is a pool of `num_blocks` blocks of `block_size` positions each (every layer of every stage holds the
same block ids). A sequence owns a block table: block i of the table holds its positions [i * bs, (i + 1) * bs).
Blocks are taken as a sequence grows and given back when it ends, so `max_context` is a cap, not a reservation.

Prefix caching: a full block whose keys and values are computed gets a digest of every token up to its end (a hash
chain over the blocks). When its sequence ends, the block keeps its contents and digest, unreferenced, in an LRU
list; a later sequence whose tokens start the same way takes those blocks instead of recomputing them (reference
counted: several sequences may share one). A block is evicted (its digest forgotten) only when a fresh one is
needed and none is free.

Sliding-window models give back the blocks that fall wholly out of the window (`drop_before`); their table entries
become NO_BLOCK.

The engine owns one allocator; the runner only sees the tables that go with each chunk.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

NO_BLOCK = -1
"""Table entry of a block given back (outside a sliding window): nothing may read or write it."""


def blocks_for(n_tokens: int, block_size: int) -> int:
    """Blocks that hold n_tokens positions."""
    return -(-n_tokens // block_size)


def chain_digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Digest of a full block given the digest of everything before it (b"" for the first block): equal digests
    mean equal token prefixes (sha256, so a collision is not a practical concern)."""
    h = hashlib.sha256(parent)
    h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in tokens))
    return h.digest()[:16]


@dataclass(frozen=True)
class BlockStats:
    """How the pool's blocks are used right now."""

    total: int
    used: int
    """Referenced by at least one running sequence."""
    cached: int
    """Holding a prefix nobody uses now (reusable, evicted when space is needed)."""
    free: int
    """Empty."""


class BlockAllocator:
    """Block tables, reference counts, a free list, and the prefix cache (digest -> block, LRU of unused ones).

    Sequences are named by any hashable key. Operations that cannot get all the blocks they need change nothing
    and return False/None, so the caller decides: wait, or preempt someone (see `preemption_victims`)."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one position, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        self._free = list(range(num_blocks))  # a heap: the lowest ids first keeps the touched part of memory small
        self._ref = [0] * num_blocks
        self._digest: dict[int, bytes] = {}  # block -> digest of the prefix it completes
        self._by_digest: dict[bytes, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, least recently used first
        self._tables: dict[Hashable, list[int]] = {}
        self._chain: dict[Hashable, tuple[int, bytes]] = {}  # seq -> (blocks digested so far, last digest)

    # ----- reading
    def table(self, seq: Hashable) -> list[int]:
        return self._tables.get(seq, [])

    @property
    def available(self) -> int:
        """Blocks that can be handed out now (free, or cached and unused)."""
        return len(self._free) + len(self._lru)

    def stats(self) -> BlockStats:
        free, cached = len(self._free), len(self._lru)
        return BlockStats(self.num_blocks, self.num_blocks - free - cached, cached, free)

    def reclaimable(self, seq: Hashable) -> int:
        """Blocks that would become available if `seq` gave its table back (those nobody else holds)."""
        return sum(1 for b in self.table(seq) if b != NO_BLOCK and self._ref[b] == 1)

    def match(self, tokens: Sequence[int], max_blocks: int) -> list[int]:
        """Cached blocks holding the longest run of full blocks that starts `tokens` (at most max_blocks)."""
        if not self.caching:
            return []
        out, parent, bs = [], b"", self.block_size
        for i in range(min(max_blocks, len(tokens) // bs)):
            parent = chain_digest(parent, tokens[i * bs : (i + 1) * bs])
            block = self._by_digest.get(parent)
            if block is None:
                break
            out.append(block)
        return out

    # ----- taking and giving back
    def admit(self, seq: Hashable, prefix: list[int], n_tokens: int, reserve: int = 0) -> bool:
        """Give `seq` a table for n_tokens positions: the cached `prefix` blocks (from `match`) shared, fresh blocks
        for the rest. Only if at least `reserve` blocks stay available afterwards; else nothing changes."""
        if seq in self._tables:
            raise ValueError(f"sequence {seq!r} already has a block table")
        fresh = blocks_for(n_tokens, self.block_size) - len(prefix)
        idle = sum(1 for b in prefix if self._ref[b] == 0)  # cached blocks this admission takes out of the LRU
        if fresh + idle + reserve > self.available:
            return False
        for b in prefix:
            self._take_cached(b)
        self._tables[seq] = list(prefix)
        if prefix:
            self._chain[seq] = (len(prefix), self._digest[prefix[-1]])
        self._tables[seq].extend(self._fresh() for _ in range(fresh))
        return True

    def grow(self, seq: Hashable, n_tokens: int) -> bool:
        """Extend `seq`'s table to hold n_tokens positions; False (and no change) if the blocks are not there."""
        table = self._tables[seq]
        more = blocks_for(n_tokens, self.block_size) - len(table)
        if more > self.available:
            return False
        table.extend(self._fresh() for _ in range(max(0, more)))
        return True

    def release(self, seq: Hashable) -> None:
        """`seq` ended or was preempted: its blocks go back. A cached block keeps its contents for a later match;
        the last block of a table is put up for eviction first (a prefix's head is worth more than its tail)."""
        table = self._tables.pop(seq, None)
        self._chain.pop(seq, None)
        for b in reversed(table or []):
            if b != NO_BLOCK:
                self._unref(b)

    def drop_before(self, seq: Hashable, position: int) -> int:
        """Give back the blocks of `seq` that hold only positions < position (out of a sliding window for good).
        Returns how many went."""
        table, n = self._tables.get(seq, []), 0
        for i in range(min(len(table), position // self.block_size)):
            if table[i] != NO_BLOCK:
                self._unref(table[i])
                table[i] = NO_BLOCK
                n += 1
        return n

    def commit(self, seq: Hashable, tokens: Sequence[int], computed: int) -> None:
        """Positions [0, computed) of `seq` (whose tokens are `tokens`) now hold their keys and values: register
        its full blocks in the prefix cache. A block whose prefix is already cached elsewhere stays private."""
        if not self.caching or seq not in self._tables:
            return
        done, parent = self._chain.get(seq, (0, b""))
        table, bs = self._tables[seq], self.block_size
        for i in range(done, min(computed // bs, len(table))):
            parent = chain_digest(parent, tokens[i * bs : (i + 1) * bs])
            b = table[i]
            if b != NO_BLOCK and b not in self._digest and parent not in self._by_digest:
                self._digest[b], self._by_digest[parent] = parent, b
            done = i + 1
        self._chain[seq] = (done, parent)

    def forget_cache(self) -> int:
        """The runner lost the contents of every block nobody holds (a pool re-placed its stages): forget the
        cached ones. Returns how many were forgotten."""
        n = len(self._lru)
        for b in list(self._lru):
            self._forget(b)
            heapq.heappush(self._free, b)
        self._lru.clear()
        return n

    # ----- internals
    def _fresh(self) -> int:
        if self._free:
            b = heapq.heappop(self._free)
        else:  # evict the least recently used cached block
            b, _ = self._lru.popitem(last=False)
            self._forget(b)
        self._ref[b] = 1
        return b

    def _take_cached(self, b: int) -> None:
        if self._ref[b] == 0:
            del self._lru[b]
        self._ref[b] += 1

    def _unref(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] == 0:
            if b in self._digest:
                self._lru[b] = None
                self._lru.move_to_end(b)
            else:
                heapq.heappush(self._free, b)

    def _forget(self, b: int) -> None:
        digest = self._digest.pop(b, None)
        if digest is not None:
            del self._by_digest[digest]


def preemption_victims(need: int, available: int, running: Sequence[tuple[Hashable, int, bool]],
                       requester: Hashable) -> list:
    """Whom to preempt so that `requester` can have `need` blocks when `available` are free now.

    `running` lists (key, blocks it would give back, may be preempted now) in admission order, `requester` among
    them. Sequences admitted after the requester go first, newest first; when they are not enough, the requester
    itself (it waits and resumes later). An older sequence is never preempted for a newer one, so the oldest always
    makes progress and every sequence finishes. Returns the victims in the order to preempt them (possibly none;
    the requester last when it is one); when the list lacks the requester, `need` blocks are then available."""
    victims = []
    for key, gives, eligible in reversed(running):
        if available >= need:
            return victims
        if key == requester:
            return victims + [key]
        if eligible:
            victims.append(key)
            available += gives
    return victims + [requester] if available < need else victims
