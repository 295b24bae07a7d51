"""Speculative decoding with a draft model (`--draft MODEL_DIR`): a smaller model with the same tokenizer proposes
the next k tokens greedily, the target verifies them in one forward (engine.py, sampling.verify), so the output is
the target's own.

The draft has its own runner and KV cache (one slot per sequence, at most the engine's max_seqs). Each sequence
remembers which tokens the draft's cache holds; a proposal first feeds the tokens it lacks (the prompt at first,
then the tokens the target emitted), then steps k - 1 more times on its own guesses. Rejected guesses stay in the
cache until the next proposal overwrites them. With no slot free, a sequence proposes nothing (plain decoding).

Measure first: SmolLM2-135M's output head alone is ~21% of a step's weight bytes, so a draft must share that cost
for every token it proposes (benchmarks/self_draft.py does the arithmetic for early-exit drafts).
"""

from __future__ import annotations

from pathlib import Path

from cairn.config import EngineConfig, ModelConfig
from cairn.engine.runner import Chunk, LocalRunner
from cairn.engine.sampling import GREEDY
from cairn.errors import UserError
from cairn.models.tokenizer import Tokenizer, vocab_mismatch


class ModelDrafter:
    """A draft model's runner and slots; `sequence(prompt)` gives the proposer of one request."""

    def __init__(self, runner: LocalRunner, path: str, cost: float):
        self.runner, self.path = runner, path
        self.free = list(range(runner.max_seqs))
        self.break_even = max(0.25, min(1.0, cost))
        """A one-token proposal costing `cost` of a step pays when accepted more often than that."""

    def sequence(self, prompt: list[int]) -> DraftSequence:
        return DraftSequence(self, prompt)


class DraftSequence:
    """One request's view of the draft model: extend with the tokens the target emits, propose k more."""

    def __init__(self, drafter: ModelDrafter, tokens: list[int]):
        self.drafter = drafter
        self.tokens = list(tokens)
        self.slot: int | None = None
        self.cached: list[int] = []  # the tokens whose keys/values the draft's cache holds, in order

    def extend(self, tokens) -> None:
        self.tokens.extend(tokens)

    def propose(self, k: int) -> list[int]:
        if k <= 0 or len(self.tokens) + k > self.drafter.runner.max_context:
            return []
        if self.slot is None:
            if not self.drafter.free:
                return []
            self.slot = self.drafter.free.pop(0)
        n = 0  # how much of what the cache holds is still this sequence's history
        for a, b in zip(self.cached, self.tokens):
            if a != b:
                break
            n += 1
        n = min(n, len(self.tokens) - 1)  # at least the last token is fed, to get the next one
        run = self.drafter.runner
        out = [run.submit([Chunk(self.slot, n, tuple(self.tokens[n:]))], [GREEDY])[0].token_id]
        for i in range(1, k):
            out.append(run.submit([Chunk(self.slot, len(self.tokens) + i - 1, (out[-1],))], [GREEDY])[0].token_id)
        self.cached = self.tokens + out[:-1]
        return out

    def close(self) -> None:
        if self.slot is not None:
            self.drafter.runner.free(self.slot)
            self.drafter.free.append(self.slot)
            self.slot = None


def check_same_tokenizer(target: Tokenizer, draft: Tokenizer, draft_path: str | Path) -> None:
    """A draft proposes token ids: they mean the same only with the same vocabulary (a clear error otherwise)."""
    why = vocab_mismatch(target, draft)
    if why is not None:
        raise UserError(f"--draft {draft_path}: its tokenizer differs from the model's ({why}); a draft model must "
                        "share the model's tokenizer", param="draft")


def load_drafter(path: str | Path, target: Tokenizer, target_params: int, max_context: int,
                 config: EngineConfig) -> ModelDrafter:
    """The draft model at `path` (an HF checkpoint directory, quantized or not), checked to share the target's
    tokenizer, with a KV slot for each of the engine's sequences. Its cost per proposed token is taken as its
    share of the model's parameters (decoding at small batches reads every weight once per step)."""
    from cairn.engine.api import resolve_dtype
    from cairn.models.checkpoint import load_stage
    from cairn.models.device import torch_device

    cfg = ModelConfig.from_hf_dir(path)
    check_same_tokenizer(target, Tokenizer.from_dir(path), path)
    stage = load_stage(path, cfg, dtype=resolve_dtype(cfg, config), device=torch_device(config.device))
    runner = LocalRunner([stage], config.max_seqs, min(max_context, cfg.max_position_embeddings))
    return ModelDrafter(runner, str(path), cfg.param_count() / target_params)
