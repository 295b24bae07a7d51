"""Write a randomly initialised model in Hugging Face layout: how tests and demos get models with no download."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from cairn.config import SUPPORTED_ARCHS, ModelConfig
from cairn.errors import UserError
from cairn.fsutil import atomic_write_json
from cairn.models.checkpoint import save_checkpoint
from cairn.models.corpus import shipped_corpus
from cairn.models.llama import TORCH_DTYPES, LlamaStage
from cairn.models.tokenizer import EOS, IM_END, train_bpe, write_tokenizer_files
from cairn.types import LayerRange

# name: (hidden, layers, heads, kv_heads, ffn, vocab, context, tied)
SHAPES = {
    "tiny": (64, 2, 4, 2, 176, 512, 512, True),
    "small": (256, 4, 8, 4, 688, 2048, 1024, False),
    "smollm-135m": (576, 30, 9, 3, 1536, 8192, 2048, True),
}


def shape_config(shape: str, arch: str = "llama", **overrides) -> ModelConfig:
    """The ModelConfig of a named shape (token ids filled in once the tokenizer exists)."""
    if shape not in SHAPES:
        raise UserError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}", param="shape")
    if arch not in SUPPORTED_ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(SUPPORTED_ARCHS)}", param="arch")
    d, n_layers, nh, nkv, ffn, vocab, ctx, tied = SHAPES[shape]
    cfg = ModelConfig(
        arch=arch, vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_layers=n_layers, num_heads=nh,
        num_kv_heads=nkv, head_dim=d // nh, max_position_embeddings=ctx, tie_word_embeddings=tied,
        qkv_bias=arch == "qwen2", rms_norm_eps=1e-6 if arch == "qwen2" else 1e-5,
        sliding_window=ctx if arch == "mistral" else None,
    )
    return replace(cfg, **overrides)


def random_stage(cfg: ModelConfig, seed: int, init_std: float = 0.02, bias_std: float = 0.0) -> LlamaStage:
    """A whole-model stage with N(0, init_std) weights, unit norms and zero biases (N(0, bias_std) when bias_std
    is given: tests use that so a bias that is loaded wrongly changes the logits)."""
    gen = torch.Generator().manual_seed(seed)
    stage = LlamaStage(cfg, LayerRange(0, cfg.num_layers))
    with torch.no_grad():
        for name, p in stage.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                if bias_std:
                    p.normal_(0.0, bias_std, generator=gen)
                else:
                    p.zero_()
            else:
                p.normal_(0.0, init_std, generator=gen)
    return stage.to(TORCH_DTYPES[cfg.dtype])


def init_model(
    out_dir: str | Path,
    shape: str = "tiny",
    arch: str = "llama",
    seed: int = 0,
    corpus: list[str] | None = None,
    dtype: str = "float32",
    init_std: float = 0.02,
    bias_std: float = 0.0,
    **overrides,
) -> ModelConfig:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json to out_dir (weights as in
    `random_stage`: biases zero unless bias_std is given)."""
    out_dir = Path(out_dir)
    if dtype not in TORCH_DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(TORCH_DTYPES)}", param="dtype")
    cfg = shape_config(shape, arch, dtype=dtype, **overrides)
    tok = train_bpe(corpus if corpus is not None else shipped_corpus(), cfg.vocab_size)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise UserError(f"tokenizer has {tok.get_vocab_size()} tokens, more than the model's {cfg.vocab_size}")
    eos_ids = (tok.token_to_id(IM_END), tok.token_to_id(EOS))
    cfg = replace(cfg, bos_token_id=None, eos_token_ids=eos_ids)
    stage = random_stage(cfg, seed, init_std, bias_std)
    save_checkpoint(stage, out_dir, metadata={"cairn_init": json.dumps({"shape": shape, "seed": seed})})
    write_tokenizer_files(tok, out_dir, cfg.max_position_embeddings)
    atomic_write_json(out_dir / "generation_config.json", {"eos_token_id": list(eos_ids), "do_sample": False})
    return cfg
