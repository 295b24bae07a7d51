"""Students made from a teacher: keep N of its layers (evenly spaced, or the N that change the hidden state most),
or a fresh random model of its width and tokenizer. Two steps like every transformation: choose and copy tensors,
then write a checkpoint the normal loader reads; the choice goes into its metadata."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from cairn.config import ModelConfig
from cairn.errors import UserError
from cairn.models.checkpoint import copy_side_files, load_stage, save_checkpoint
from cairn.models.init import random_stage
from cairn.models.llama import TORCH_DTYPES, CausalContext, LlamaStage
from cairn.models.tokenizer import Tokenizer
from cairn.types import LayerRange


def evenly_spaced(total: int, keep: int) -> list[int]:
    """`keep` of `total` layer indices spread evenly, the first and the last always among them."""
    if not 1 <= keep <= total:
        raise UserError(f"--layers must be between 1 and the teacher's {total} layers, got {keep}", param="layers")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def most_important(influence: list[float], keep: int) -> list[int]:
    """The `keep` layers with the largest influence, in model order (ties to the earlier layer)."""
    if not 1 <= keep <= len(influence):
        raise UserError(f"--layers must be between 1 and the teacher's {len(influence)} layers, got {keep}",
                        param="layers")
    order = sorted(range(len(influence)), key=lambda i: (-influence[i], i))
    return sorted(order[:keep])


@torch.no_grad()
def block_influence(stage: LlamaStage, sequences: list[list[int]]) -> list[float]:
    """Per layer, 1 - the mean cosine similarity between a token's hidden state before and after the layer (the
    'block influence' of layer-pruning work): a layer that barely turns the hidden state matters least."""
    total = torch.zeros(len(stage.layers), dtype=torch.float64)
    count = 0
    for ids in sequences:
        x = stage.embed_tokens(torch.tensor([ids]))  # (1, T, D)
        ctx = CausalContext(stage.cfg, 1, len(ids), x.device)
        for i, block in enumerate(stage.layers):
            y = block(x, ctx)
            total[i] += (1 - torch.cosine_similarity(x.float(), y.float(), dim=-1)).sum().double()
            x = y
        count += len(ids)
    return (total / max(count, 1)).tolist()


def _keep(teacher: LlamaStage, cfg: ModelConfig, layers: list[int]) -> LlamaStage:
    """A stage with the teacher's embedding, final norm and head and copies of the chosen blocks."""
    student = LlamaStage(cfg, LayerRange(0, len(layers)))
    student.embed_tokens.load_state_dict(teacher.embed_tokens.state_dict())
    student.norm.load_state_dict(teacher.norm.state_dict())
    if not cfg.tie_word_embeddings:
        student.lm_head.load_state_dict(teacher.lm_head.state_dict())
    for new, old in enumerate(layers):
        student.layers[new].load_state_dict(teacher.layers[old].state_dict())
    student.tie_weights()
    return student


def make_student(teacher_dir: str | Path, out_dir: str | Path, layers: int, select: str = "even",
                 texts: list[str] | None = None, random_init: bool = False,
                 seed: int = 0) -> tuple[ModelConfig, list[int]]:
    """Write a student of `layers` layers to out_dir: the teacher's layers chosen by `select` ('even', or
    'importance' measured on `texts`), or (random_init) random weights of the teacher's shape; the teacher's
    tokenizer, chat template and generation settings either way. Returns its config and the kept layers."""
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    tcfg = ModelConfig.from_hf_dir(teacher_dir)
    if tcfg.raw.get("quantization_config"):
        raise UserError(f"{teacher_dir} is quantized; make the student from the unquantized teacher", param="from")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} is not empty; choose a new directory", param="out_dir")
    cfg = replace(tcfg, num_layers=layers, raw={**tcfg.raw, "num_hidden_layers": layers})
    if random_init:
        kept: list[int] = []
        evenly_spaced(tcfg.num_layers, layers)  # the same bounds check
        stage = random_stage(cfg, seed)
        how = {"teacher": str(teacher_dir), "init": "random", "seed": seed}
    else:
        teacher = load_stage(teacher_dir, tcfg, dtype="float32")
        if select == "even":
            kept = evenly_spaced(tcfg.num_layers, layers)
            how = {"teacher": str(teacher_dir), "layers": kept, "select": "even"}
        elif select == "importance":
            if not texts:
                raise UserError("--select importance needs text to measure on (--corpus)", param="corpus")
            tok = Tokenizer.from_dir(teacher_dir)
            seqs = [ids[:512] for ids in (tok.encode(t) for t in texts) if len(ids) >= 2]
            influence = block_influence(teacher, seqs)
            kept = most_important(influence, layers)
            how = {"teacher": str(teacher_dir), "layers": kept, "select": "importance",
                   "influence": [round(x, 6) for x in influence]}
        else:
            raise UserError(f"--select must be even or importance, got {select!r}", param="select")
        stage = _keep(teacher, cfg, kept)
    save_checkpoint(stage.to(TORCH_DTYPES[cfg.dtype]), out_dir,
                    metadata={"cairn_student": json.dumps(how)})
    copy_side_files(teacher_dir, out_dir)
    return cfg, kept
