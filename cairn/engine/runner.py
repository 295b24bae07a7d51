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
from cairn.engine.fast import pack_linears
from cairn.engine.sampling import Choice, RowSampling, choose, target_logprobs
from cairn.models.llama import CausalContext, LlamaStage, rotary_tables


@dataclass(frozen=True)
class Chunk:
    """New tokens of one sequence: they sit at positions [start, start + len(tokens)) of cache slot `slot`."""

    slot: int
    start: int
    tokens: tuple[int, ...]


class Runner(Protocol):
    """Runs the model on a step's chunks. Single-token chunks come first, in ascending slot order."""

    max_seqs: int
    max_context: int
    depth: int
    """How many steps may be in flight at once (submitted, not yet collected); steps in flight at the same time
    never share a slot."""

    def submit(self, chunks: list[Chunk], rows: list[RowSampling | None]) -> Any:
        """Start a step: run the chunks and choose a token for each chunk whose row is not None. Returns a handle
        for `collect`."""
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
    """Keys and values of layers [range) for `max_seqs` slots of `max_context` positions each.

    Zero-filled: a masked-out position still enters attention as 0 x value, so it must never hold NaN garbage.
    (Stale values from a slot's previous sequence are finite and masked, which is harmless.)"""

    def __init__(self, cfg: ModelConfig, stage: LlamaStage, max_seqs: int, max_context: int, dtype, device):
        shape = (max_seqs, cfg.num_kv_heads, max_context, cfg.head_dim)
        self.first_layer = stage.range.start
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in stage.range]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in stage.range]


class PackedContext:
    """Attention for one packed step: writes the step's keys/values into the cache, then attends per group."""

    def __init__(self, cache: KVCache, chunks: list[Chunk], cos: torch.Tensor, sin: torch.Tensor, window: int | None):
        device = cos.device
        self.cache = cache
        positions, slots = [], []
        for c in chunks:
            positions.extend(range(c.start, c.start + len(c.tokens)))
            slots.extend([c.slot] * len(c.tokens))
        self.pos = torch.tensor(positions, device=device)  # (N,)
        self.slot = torch.tensor(slots, device=device)  # (N,)
        self.cos, self.sin = cos[self.pos][:, None, :], sin[self.pos][:, None, :]  # (N, 1, hd)
        # Decode group: the leading single-token chunks, attended in one batched call.
        n_dec = 0
        while n_dec < len(chunks) and len(chunks[n_dec].tokens) == 1:
            n_dec += 1
        self.n_dec = n_dec
        self.dec_slots: slice | torch.Tensor | None = None
        self.dec_mask = None
        if n_dec:
            dslots = [c.slot for c in chunks[:n_dec]]
            ends = torch.tensor([c.start for c in chunks[:n_dec]], device=device)  # (B,) last position
            self.dec_len = int(ends.max()) + 1
            contiguous = dslots == list(range(dslots[0], dslots[0] + n_dec))
            self.dec_slots = slice(dslots[0], dslots[0] + n_dec) if contiguous else self.slot[:n_dec]
            key = torch.arange(self.dec_len, device=device)[None, :]  # (1, S)
            if bool((ends != ends[0]).any()) or window is not None:
                allowed = key <= ends[:, None]  # (B, S)
                if window is not None:
                    allowed &= key > ends[:, None] - window
                self.dec_mask = allowed[:, None, None, :]  # (B, 1, 1, S)
        # Prefill chunks: one attention call each, over the cache up to the chunk's end.
        self.prefills = []
        offset = n_dec
        for c in chunks[n_dec:]:
            T, end = len(c.tokens), c.start + len(c.tokens)
            mask = None
            if c.start > 0 or window is not None:
                q_pos = torch.arange(c.start, end, device=device)[:, None]  # (T, 1)
                key = torch.arange(end, device=device)[None, :]  # (1, end)
                mask = key <= q_pos
                if window is not None:
                    mask &= key > q_pos - window
            self.prefills.append((offset, offset + T, c.slot, end, mask))
            offset += T

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (N, nh, hd), k/v (N, nkv, hd) -> (N, nh * hd)."""
        kc, vc = self.cache.k[layer - self.cache.first_layer], self.cache.v[layer - self.cache.first_layer]
        kc[self.slot, :, self.pos] = k  # cache (slots, nkv, ctx, hd) <- (N, nkv, hd)
        vc[self.slot, :, self.pos] = v
        outs = []
        if self.n_dec:
            qd = q[: self.n_dec].unsqueeze(2)  # (B, nh, 1, hd)
            kd = kc[self.dec_slots, :, : self.dec_len]  # (B, nkv, S, hd)
            vd = vc[self.dec_slots, :, : self.dec_len]
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self.dec_mask, enable_gqa=True)
            outs.append(o.view(self.n_dec, -1))  # (B, nh * hd)
        for a, b, slot, end, mask in self.prefills:
            qp = q[a:b].transpose(0, 1).unsqueeze(0)  # (1, nh, T, hd)
            kp, vp = kc[slot : slot + 1, :, :end], vc[slot : slot + 1, :, :end]  # (1, nkv, end, hd)
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            outs.append(o[0].transpose(0, 1).reshape(b - a, -1))  # (T, nh * hd)
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


class StageExecutor:
    """One stage with its KV cache and rotary tables: runs that stage's part of a packed step. Both runners are
    made of these: LocalRunner chains them in this process, a pool stage actor holds one."""

    def __init__(self, stage: LlamaStage, max_seqs: int, max_context: int, fast: bool = True):
        w = next(stage.parameters())
        self.device, self.dtype = w.device, w.dtype
        if fast:
            pack_linears(stage)
        self.stage, self.cfg = stage, stage.cfg
        self.cache = KVCache(self.cfg, stage, max_seqs, max_context, self.dtype, self.device)
        self.cos, self.sin = rotary_tables(self.cfg, max_context, self.device)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], x: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (N, D) after this stage, or logits (len(chunks), V) of each chunk's last token on the
        last stage. The first stage takes its input from the chunks' tokens."""
        if self.stage.is_first:
            x = torch.tensor([t for c in chunks for t in c.tokens], device=self.device)  # (N,)
        ctx = PackedContext(self.cache, chunks, self.cos, self.sin, self.cfg.sliding_window)
        rows = torch.tensor(list(_last_rows(chunks)), device=self.device) if self.stage.is_last else None
        return self.stage(x, ctx, logits_rows=rows)


class LocalRunner:
    """All stages in this process (the default: one machine, no services)."""

    def __init__(self, stages: list[LlamaStage], max_seqs: int, max_context: int, fast: bool = True):
        self.executors = [StageExecutor(s, max_seqs, max_context, fast) for s in stages]
        self.stages = stages
        self.max_seqs, self.max_context = max_seqs, max_context
        self.depth = 1

    def submit(self, chunks: list[Chunk], rows: list[RowSampling | None]) -> list[Choice | None]:
        """Runs the step at once; the handle is its result."""
        return choose(self.forward(chunks), rows)

    def collect(self, handle: list[Choice | None]) -> list[Choice | None]:
        return handle

    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        x = None
        for ex in self.executors:
            x = ex.run(chunks, x)
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


def _last_rows(chunks: list[Chunk]):
    n = 0
    for c in chunks:
        n += len(c.tokens)
        yield n - 1
