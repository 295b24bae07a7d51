"""The Runner seam: the engine hands a step's batch of sequence chunks to a runner and gets the next tokens back.

A step batch packs every sequence's new tokens into one row of N tokens: decoding sequences contribute one token,
prefilling ones a chunk of their prompt. Linear layers see all N tokens at once (one weight read per step); only
attention is grouped per sequence. With the chunks go one `RowSampling` per chunk (None when no token is due yet):
the runner chooses the tokens where the logits are (`cairn.engine.sampling.choose`) and returns only them.
LocalRunner holds every stage in this process; a pipeline runner (pool) holds them on other machines behind the
same methods, and may keep several steps (on disjoint sequences) in flight so that its stages work concurrently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from cairn.config import ModelConfig
from cairn.engine.blocks import blocks_for
from cairn.engine.fast import pack_linears
from cairn.engine.sampling import Choice, RowSampling, choose, logit_counts, target_logprobs
from cairn.models.llama import CausalContext, LlamaStage, rotary_tables


BLOCK_SIZE = 16
"""Positions per KV block (the default)."""


@dataclass(frozen=True)
class Chunk:
    """New tokens of one sequence: they sit at positions [start, start + len(tokens)) of the sequence in cache
    slot `slot`, whose keys and values live in the KV blocks `blocks` (its block table: block i holds positions
    [i * block_size, (i + 1) * block_size); NO_BLOCK for blocks given back outside a sliding window).

    Without a table (None) the slot uses a fixed range of blocks counted down from the top of the pool, as if each
    slot had a whole context to itself: for inspection and tests, not beside an engine that hands out blocks."""

    slot: int
    start: int
    tokens: tuple[int, ...]
    blocks: tuple[int, ...] | None = None


class Runner(Protocol):
    """Runs the model on a step's chunks. Single-token chunks come first, in ascending slot order."""

    max_seqs: int
    max_context: int
    num_blocks: int
    """KV blocks in the pool (the engine hands them out; the chunks carry the tables)."""
    block_size: int
    """Positions per KV block."""
    resets: int
    """How many times the runner lost the contents of its blocks and rebuilt only those of live slots (a pool
    re-placed after a failure): blocks nobody held at that moment hold nothing any more."""
    depth: int
    """How many steps may be in flight at once (submitted, not yet collected); steps in flight at the same time
    never share a slot."""

    def submit(self, chunks: list[Chunk], rows: list[RowSampling | None]) -> Any:
        """Start a step: run the chunks and choose a token for each chunk whose row is not None (a row with a
        draft verifies the chunk's last len(draft) tokens: see sampling.verify). Returns a handle for `collect`."""
        ...

    def observe_blocks(self, blocks: Any) -> None:
        """Optional: the engine's KV block usage (blocks.BlockStats) after each step, for a runner to show."""
        ...

    def collect(self, handle: Any) -> list[Choice | None]:
        """The choices of a submitted step (one per chunk), waiting for it. Steps are collected in submission order."""
        ...

    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits (len(chunks), V), float32, for the last token of each chunk (inspection and tests; not a step
        the engine takes)."""
        ...

    def free(self, slot: int) -> None:
        """The sequence in `slot` ended: its history need not be kept."""
        ...

    def score(self, tokens: list[int]) -> tuple[list[float], list[bool]]:
        """Logprob of each of tokens[1:] given the ones before it and whether it was the most likely token, from
        one cache-free forward (evaluation). Uses no slot, so it may run beside the engine's steps."""
        ...

    def close(self) -> None: ...


class KVCache:
    """Keys and values of layers [range) in a pool of `num_blocks` blocks of `block_size` positions:
    (num_blocks, block_size, nkv, hd) per layer, shared by every sequence through its block table.

    On CPU the pool is allocated empty, and the OS backs a page only when it is first written, so the memory held
    grows with the blocks in use (up to the high-water mark), not with the pool's size. A block is zero-filled the
    first time a step uses it: a masked-out position still enters attention as 0 x value, so it must never hold NaN
    garbage (stale values from a block's earlier sequence are finite and masked, which is harmless)."""

    def __init__(self, cfg: ModelConfig, stage: LlamaStage, num_blocks: int, block_size: int, max_context: int,
                 dtype, device):
        device = torch.device(device)
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        make = torch.empty if device.type == "cpu" else torch.zeros
        self.first_layer = stage.range.start
        self.k = [make(shape, dtype=dtype, device=device) for _ in stage.range]
        self.v = [make(shape, dtype=dtype, device=device) for _ in stage.range]
        self.num_blocks, self.block_size, self.max_context = num_blocks, block_size, max_context
        self.clean = torch.full((num_blocks,), device.type != "cpu", dtype=torch.bool)  # zero-filled or written
        self.block_bytes = 2 * len(self.k) * block_size * cfg.num_kv_heads * cfg.head_dim * self.k[0].element_size() \
            if self.k else 0
        """Bytes one block takes over this stage's layers (keys and values)."""

    def touched_blocks(self) -> int:
        """Blocks that have been used at least once (on CPU, what the OS has had to back)."""
        return int(self.clean.sum())

    def prepare(self, blocks: set[int]) -> None:
        """Zero-fill the blocks among `blocks` that were never used."""
        ids = torch.tensor(sorted(blocks), dtype=torch.long)
        new = ids[~self.clean[ids]] if len(ids) else ids
        if len(new):
            dev = new.to(self.k[0].device) if self.k else new
            for t in self.k + self.v:
                t[dev] = 0
            self.clean[new] = True

    def dense_table(self, slot: int, n_blocks: int) -> tuple[int, ...]:
        """The fixed blocks of `slot` for a chunk without a table: slot s owns a whole context's worth, counted
        down from the top of the pool."""
        per_slot = -(-self.max_context // self.block_size)
        if (slot + 1) * per_slot > self.num_blocks or n_blocks > per_slot:
            raise ValueError(f"slot {slot} has no fixed blocks in a pool of {self.num_blocks}: give the chunk a "
                             "block table")
        return tuple(self.num_blocks - 1 - (slot * per_slot + i) for i in range(n_blocks))


class PackedContext:
    """Attention for one packed step: writes the step's keys/values into their blocks, then attends per group.

    Decoding sequences (the leading single-token chunks) attend together: their blocks are gathered into one
    (B, nkv, S, hd) batch. A prefill chunk attends to its own fresh keys/values plus those of earlier positions
    gathered from its blocks (only the window's, for a sliding-window model)."""

    def __init__(self, cache: KVCache, chunks: list[Chunk], cos: torch.Tensor, sin: torch.Tensor, window: int | None):
        device = cos.device
        self.cache, bs = cache, cache.block_size
        tables = [c.blocks if c.blocks is not None else cache.dense_table(c.slot, -(-(c.start + len(c.tokens)) // bs))
                  for c in chunks]
        positions, where = [], []
        for c, t in zip(chunks, tables):
            for p in range(c.start, c.start + len(c.tokens)):
                positions.append(p)
                where.append(t[p // bs] * bs + p % bs if t[p // bs] >= 0 else -1)
        # a step reads only blocks written before or in this step: zero-fill those it writes for the first time
        cache.prepare({w // bs for w in where if w >= 0})
        self.pos = torch.tensor(positions, device=device)  # (N,)
        self.cos, self.sin = cos[self.pos][:, None, :], sin[self.pos][:, None, :]  # (N, 1, hd)
        keep = [i for i, w in enumerate(where) if w >= 0]  # a replay may pass positions outside the window
        self.write_rows = None if len(keep) == len(where) else torch.tensor(keep, dtype=torch.long, device=device)
        self.write_at = torch.tensor([w for w in where if w >= 0], dtype=torch.long, device=device)  # (N',)
        # Decode group: the leading single-token chunks, attended in one batched call.
        n_dec = 0
        while n_dec < len(chunks) and len(chunks[n_dec].tokens) == 1:
            n_dec += 1
        self.n_dec = n_dec
        if n_dec:
            ends = [c.start for c in chunks[:n_dec]]  # each one's query position
            lo = min(max(0, e - window + 1) for e in ends) // bs if window is not None else 0  # first block needed
            hi = max(ends) // bs + 1
            rows = []
            for e, t in zip(ends, tables):
                own = t[e // bs]  # a real block (finite values) for entries this sequence does not have
                rows.append([t[j] if j <= e // bs and t[j] >= 0 else own for j in range(lo, hi)])
            self.dec_blocks = torch.tensor(rows, dtype=torch.long, device=device).flatten()  # (B * nb,)
            self.dec_first = lo * bs  # position of the first gathered key
            self.dec_len = max(ends) + 1 - lo * bs  # S
            self.dec_mask = None
            if len(set(ends)) > 1 or window is not None:
                key = self.dec_first + torch.arange(self.dec_len, device=device)[None, :]  # (1, S)
                end = torch.tensor(ends, device=device)[:, None]  # (B, 1)
                allowed = key <= end  # (B, S)
                if window is not None:
                    allowed &= key > end - window
                self.dec_mask = allowed[:, None, None, :]  # (B, 1, 1, S)
        # Prefill chunks: one attention call each, over their past (from the blocks) and their own new keys.
        self.prefills = []
        offset = n_dec
        for c, t in zip(chunks[n_dec:], tables[n_dec:]):
            T, end = len(c.tokens), c.start + len(c.tokens)
            first = (max(0, c.start - window + 1) if window is not None else 0) // bs * bs  # first past key kept
            past = None
            if c.start > 0:
                past = torch.tensor(t[first // bs : -(-c.start // bs)], dtype=torch.long, device=device)
            mask = None
            if c.start > 0 or window is not None:
                q_pos = torch.arange(c.start, end, device=device)[:, None]  # (T, 1)
                key = torch.arange(first if past is not None else c.start, end, device=device)[None, :]  # (1, K)
                mask = key <= q_pos
                if window is not None:
                    mask &= key > q_pos - window
            self.prefills.append((offset, offset + T, past, c.start - first, mask))
            offset += T

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (N, nh, hd), k/v (N, nkv, hd) -> (N, nh * hd)."""
        kc, vc = self.cache.k[layer - self.cache.first_layer], self.cache.v[layer - self.cache.first_layer]
        nkv, hd = kc.shape[2], kc.shape[3]
        kw, vw = (k, v) if self.write_rows is None else (k[self.write_rows], v[self.write_rows])
        kc.view(-1, nkv, hd).index_copy_(0, self.write_at, kw)  # pool (blocks * bs, nkv, hd) <- (N', nkv, hd)
        vc.view(-1, nkv, hd).index_copy_(0, self.write_at, vw)
        kb, vb = kc.view(kc.shape[0], -1), vc.view(vc.shape[0], -1)  # (blocks, bs * nkv * hd): a row per block
        outs = []
        if self.n_dec:
            B, S = self.n_dec, self.dec_len
            qd = q[:B].unsqueeze(2)  # (B, nh, 1, hd)
            kd = kb.index_select(0, self.dec_blocks).view(B, -1, nkv, hd)[:, :S].transpose(1, 2)  # (B, nkv, S, hd)
            vd = vb.index_select(0, self.dec_blocks).view(B, -1, nkv, hd)[:, :S].transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self.dec_mask, enable_gqa=True)
            outs.append(o.view(B, -1))  # (B, nh * hd)
        for a, b, past, n_past, mask in self.prefills:
            kp, vp = k[a:b], v[a:b]  # (T, nkv, hd)
            if past is not None:
                kp = torch.cat([kb.index_select(0, past).view(-1, nkv, hd)[:n_past], kp])  # (P + T, nkv, hd)
                vp = torch.cat([vb.index_select(0, past).view(-1, nkv, hd)[:n_past], vp])
            qp = q[a:b].transpose(0, 1).unsqueeze(0)  # (1, nh, T, hd)
            kp, vp = kp.transpose(0, 1).unsqueeze(0), vp.transpose(0, 1).unsqueeze(0)  # (1, nkv, P + T, hd)
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            outs.append(o[0].transpose(0, 1).reshape(b - a, -1))  # (T, nh * hd)
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


class StageExecutor:
    """One stage with its KV cache and rotary tables: runs that stage's part of a packed step. Both runners are
    made of these: LocalRunner chains them in this process, a pool stage actor holds one."""

    def __init__(self, stage: LlamaStage, max_seqs: int, max_context: int, fast: bool = True,
                 num_blocks: int | None = None, block_size: int = BLOCK_SIZE):
        w = next(stage.parameters())
        self.device, self.dtype = w.device, w.dtype
        if fast:
            pack_linears(stage)
        self.stage, self.cfg = stage, stage.cfg
        if num_blocks is None:  # every slot a whole context (allocated lazily on CPU)
            num_blocks = max_seqs * blocks_for(max_context, block_size)
        self.cache = KVCache(self.cfg, stage, num_blocks, block_size, max_context, self.dtype, self.device)
        self.cos, self.sin = rotary_tables(self.cfg, max_context, self.device)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], x: torch.Tensor | None = None,
            rows: list[RowSampling | None] | None = None) -> torch.Tensor:
        """Hidden states (N, D) after this stage, or on the last stage logits of each chunk's last token, (or of its
        last 1 + len(draft) tokens when its sampling row verifies a draft): (sum of those, V). The first stage
        takes its input from the chunks' tokens."""
        if self.stage.is_first:
            x = torch.tensor([t for c in chunks for t in c.tokens], device=self.device)  # (N,)
        ctx = PackedContext(self.cache, chunks, self.cos, self.sin, self.cfg.sliding_window)
        last = None
        if self.stage.is_last:
            last = torch.tensor(list(_last_rows(chunks, logit_counts(rows, len(chunks)))), device=self.device)
        return self.stage(x, ctx, logits_rows=last)


class LocalRunner:
    """All stages in this process (the default: one machine, no services)."""

    def __init__(self, stages: list[LlamaStage], max_seqs: int, max_context: int, fast: bool = True,
                 num_blocks: int | None = None, block_size: int = BLOCK_SIZE):
        if num_blocks is None:
            num_blocks = max_seqs * blocks_for(max_context, block_size)
        self.executors = [StageExecutor(s, max_seqs, max_context, fast, num_blocks, block_size) for s in stages]
        self.stages = stages
        self.max_seqs, self.max_context = max_seqs, max_context
        self.num_blocks, self.block_size = num_blocks, block_size
        self.resets = 0  # this runner never loses its blocks
        self.depth = 1

    def kv_bytes(self) -> tuple[int, int]:
        """(bytes of one block over all layers, bytes of the blocks used so far): what the KV cache holds."""
        per_block = sum(ex.cache.block_bytes for ex in self.executors)
        return per_block, max((ex.cache.touched_blocks() for ex in self.executors), default=0) * per_block

    def submit(self, chunks: list[Chunk], rows: list[RowSampling | None]) -> list[Choice | None]:
        """Runs the step at once; the handle is its result."""
        return choose(self._run(chunks, rows), rows)

    def collect(self, handle: list[Choice | None]) -> list[Choice | None]:
        return handle

    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        return self._run(chunks)

    def _run(self, chunks: list[Chunk], rows: list[RowSampling | None] | None = None) -> torch.Tensor:
        """The chunks through every stage: the last stage's logits (StageExecutor.run)."""
        x = None
        for ex in self.executors:
            x = ex.run(chunks, x, rows)
        return x

    @torch.inference_mode()
    def prompt_logits(self, tokens: list[int]) -> torch.Tensor:
        """Logits (T, V) after each of `tokens`, in one cache-free forward: it uses no slot, so it may run beside
        the engine's steps (prompt logprobs for an echoed prompt). Pool runners do not offer it."""
        first = self.stages[0]
        device = next(first.parameters()).device
        x = torch.tensor([tokens], device=device)  # (1, T)
        ctx = CausalContext(first.cfg, 1, len(tokens), device)
        for stage in self.stages:
            x = stage(x, ctx)
        return x[0]  # (T, V)

    @torch.inference_mode()
    def prompt_hidden(self, tokens: list[int], layers: int | None = None) -> torch.Tensor:
        """Hidden states (T, H) after each of `tokens`, in one cache-free forward like prompt_logits: after the
        first `layers` blocks, or (None) the last stage's normalised ones (the head's input). No adapter."""
        first = self.stages[0]
        device = next(first.parameters()).device
        x = first.embed_tokens(torch.tensor([tokens], device=device))  # (1, T, H)
        ctx = CausalContext(first.cfg, 1, len(tokens), device)
        done = 0
        for stage in self.stages:
            for block in stage.layers:
                if layers is not None and done >= layers:
                    return x[0].float()
                x = block(x, ctx)
                done += 1
        return x[0].float() if layers is not None else self.stages[-1].norm(x)[0].float()  # (T, H)

    def score(self, tokens: list[int]) -> tuple[list[float], list[bool]]:
        """Logprob of each of tokens[1:] given the ones before it, and whether it was the greedy choice."""
        return target_logprobs(self.prompt_logits(tokens), tokens)

    @torch.inference_mode()
    def score_many(self, seqs: list[list[int]], starts: list[int]) -> list[tuple[list[float], list[bool]]]:
        """For each sequence, the logprobs (and greedy flags) of its tokens [start:] (start >= 1), all in one
        cache-free forward: sequences padded on the right to a multiple of 16 tokens (causal attention keeps the
        padding out of every real position), the head applied only to the rows that predict a scored token."""
        first = self.stages[0]
        device = next(first.parameters()).device
        B, T = len(seqs), -(-max(len(s) for s in seqs) // 16) * 16  # few distinct shapes: kernels stay warm
        ids = torch.zeros(B, T, dtype=torch.long)
        rows = torch.zeros(B, T, dtype=torch.bool)  # rows whose logits predict a scored token
        targets = []
        for i, (seq, start) in enumerate(zip(seqs, starts)):
            ids[i, : len(seq)] = torch.tensor(seq)
            rows[i, start - 1 : len(seq) - 1] = True
            targets += seq[start:]
        x, ctx = ids.to(device), CausalContext(first.cfg, B, T, device)
        for stage in self.stages[:-1]:
            x = stage(x, ctx)
        logits = self.stages[-1](x, ctx, logits_rows=rows.to(device))  # (K, V), row-major over (B, T)
        logsm = torch.log_softmax(logits.float(), -1)
        target = torch.tensor(targets, device=device)[:, None]  # (K, 1)
        chosen = logsm.gather(-1, target)[:, 0]  # (K,)
        greedy = (chosen >= logsm.max(-1).values).tolist()
        chosen = chosen.tolist()
        out, k = [], 0
        for seq, start in zip(seqs, starts):
            n = len(seq) - start
            out.append((chosen[k : k + n], greedy[k : k + n]))
            k += n
        return out

    def free(self, slot: int) -> None:
        pass

    def close(self) -> None:
        self.executors = []


def _last_rows(chunks: list[Chunk], counts: list[int]):
    n = 0
    for c, k in zip(chunks, counts):
        n += len(c.tokens)
        yield from range(n - k, n)
