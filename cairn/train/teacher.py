"""Where the distill recipe's teacher signal comes from: the teacher model in this process (online) or the top-K
cache `cairn synth --save-logits K` wrote (offline); and on-policy batches, whose targets the student writes."""

from __future__ import annotations

from pathlib import Path

import torch

from cairn.config import ModelConfig
from cairn.errors import UserError
from cairn.models.checkpoint import load_stage
from cairn.models.llama import full_forward
from cairn.models.tokenizer import Tokenizer, vocab_mismatch
from cairn.train.data import Batch, Example
from cairn.train.distill import SparseTeacher
from cairn.train.teacher_cache import TeacherCache, sparse_batch


def check_teacher(cfg, student_tok: Tokenizer, examples: list) -> None:
    """Before any compute: the teacher shares the student's tokenizer, or the cache holds every example."""
    if cfg.teacher is not None:
        if not Path(cfg.teacher).is_dir():
            raise UserError(f"teacher {cfg.teacher} is not a checkpoint directory", param="teacher")
        why = vocab_mismatch(student_tok, Tokenizer.from_dir(cfg.teacher))
        if why is not None:
            raise UserError(f"the teacher {cfg.teacher} has another tokenizer than the student {cfg.model} ({why}); "
                            "distillation compares distributions over the same token ids", param="teacher")
    if cfg.teacher_logits is not None:
        cache = TeacherCache(cfg.teacher_logits)
        for ex in examples:
            cache.lookup(ex.key, ex.ids, ex.where)


class TeacherSignal:
    """The teacher's distribution for a batch: dense logits (online) or a SparseTeacher (cache)."""

    def __init__(self, cfg, device: torch.device, autocast: torch.dtype | None):
        self.device, self.autocast = device, autocast
        self.model = self.cache = None
        if cfg.teacher is not None:
            self.model = load_stage(cfg.teacher, ModelConfig.from_hf_dir(cfg.teacher), dtype="float32", device=device)
            self.model.eval().requires_grad_(False)
        else:
            self.cache = TeacherCache(cfg.teacher_logits)

    @torch.no_grad()
    def for_batch(self, batch: Batch, examples: list[Example], vocab: int) -> torch.Tensor | SparseTeacher:
        if self.cache is not None:
            tops = [self.cache.lookup(e.key, e.ids, e.where) for e in examples]
            sp = sparse_batch(tops, batch.inputs.shape[1])
            return SparseTeacher(sp.ids.to(self.device), sp.logprobs.to(self.device))
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            logits = full_forward(self.model, batch.inputs.to(self.device))
        return _match_vocab(logits, vocab)


def _match_vocab(teacher: torch.Tensor, vocab: int) -> torch.Tensor:
    """Teacher logits over the student's rows: embeddings padded to different sizes differ only in rows no token
    uses (the tokenizers are the same), which get -inf (no probability) when the teacher lacks them."""
    V = teacher.shape[-1]
    if V == vocab:
        return teacher
    if V > vocab:
        return teacher[..., :vocab]
    pad = teacher.new_full((*teacher.shape[:-1], vocab - V), float("-inf"))
    return torch.cat([teacher, pad], -1)


def prompt_of(ex: Example) -> list[int]:
    """The tokens before an example's first target (a chat record's prompt); for packed text, its first half."""
    first = next((t for t, m in enumerate(ex.mask) if m), len(ex.ids))
    return ex.ids[:first] if first >= 1 else ex.ids[: max(1, len(ex.ids) // 2)]


@torch.no_grad()
def student_samples(model, prompts: list[list[int]], max_tokens: int, eos: tuple[int, ...], max_len: int,
                    generator: torch.Generator, device: torch.device) -> list[Example]:
    """The student writes up to max_tokens after each prompt (temperature 1, seeded), without a KV cache: short
    continuations of a batch of prompts, one full forward per token. Targets are the written tokens."""
    was_training = model.training
    model.eval()
    try:
        seqs = [list(p[: max_len - 1]) for p in prompts]
        starts = [len(s) for s in seqs]
        done = [False] * len(seqs)
        for _ in range(max_tokens):
            live = [i for i, d in enumerate(done) if not d and len(seqs[i]) < max_len]
            if not live:
                break
            T = max(len(seqs[i]) for i in live)
            ids = torch.zeros(len(live), T, dtype=torch.long)
            for r, i in enumerate(live):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            logits = full_forward(model, ids.to(device)).float()  # (B, T, V)
            last = torch.tensor([len(seqs[i]) - 1 for i in live], device=device)
            probs = torch.softmax(logits[torch.arange(len(live), device=device), last], -1).cpu()
            picked = torch.multinomial(probs, 1, generator=generator).squeeze(-1).tolist()
            for i, t in zip(live, picked):
                seqs[i].append(t)
                done[i] = t in eos
    finally:
        model.train(was_training)
    return [Example(s, [False] * n + [True] * (len(s) - n)) for s, n in zip(seqs, starts) if len(s) > n]
