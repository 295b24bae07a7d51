"""The Llama family (Llama 2/3, Mistral, Qwen2) as stages over a LayerRange.

embed (first stage) -> blocks[start:end] -> norm + head (last stage). Attention is computed by a context object the
caller passes in, so the same blocks serve a plain causal forward (training, reference) and the engine's packed,
KV-cached batches. q/k/v and gate/up projections are stored fused (one matmul each); checkpoint.py maps them
to and from the Hugging Face names.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cairn.config import ModelConfig, rope_inv_freq
from cairn.types import LayerRange

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Half precision: normalise in fp32, scale in the weight dtype (as the reference implementation does).
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def rotary_tables(cfg: ModelConfig, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for positions [0, length): (length, head_dim) each, float32.

    rope(x) = x * cos + swap_halves(x) * sin_signed, where sin_signed = [-sin, sin] (the rotate-half form)."""
    inv = torch.tensor(rope_inv_freq(cfg), dtype=torch.float32, device=device)  # (hd/2,)
    pos = torch.arange(length, dtype=torch.float32, device=device)
    freqs = torch.outer(pos, inv)  # (length, hd/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x: (..., H, hd); cos/sin: broadcastable (..., 1, hd)."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.roll(x, half, dims=-1), sin_signed)


class AttentionContext(Protocol):
    """Where keys/values live and which positions each query may see."""

    cos: torch.Tensor  # (..., 1, hd) for the tokens of this forward
    sin: torch.Tensor

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (..., nh, hd), k/v: (..., nkv, hd) for this forward's tokens -> (..., nh * hd)."""
        ...


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        lead = x.shape[:-1]  # (B, T) or (N,)
        qkv = self.qkv_proj(x)  # (..., (nh + 2 nkv) hd)
        qk = qkv[..., : (self.nh + self.nkv) * self.hd].unflatten(-1, (self.nh + self.nkv, self.hd))
        qk = apply_rope(qk, ctx.cos.to(qk.dtype), ctx.sin.to(qk.dtype))  # (..., nh + nkv, hd)
        q, k = qk.split([self.nh, self.nkv], dim=-2)  # (..., nh, hd), (..., nkv, hd)
        v = qkv[..., (self.nh + self.nkv) * self.hd :].view(*lead, self.nkv, self.hd)  # (..., nkv, hd)
        return self.o_proj(ctx.attend(self.layer, q, k, v))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (..., ffn) each
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaStage(nn.Module):
    """Blocks [start, end) of a model, plus the embedding if start == 0 and norm + head if end == num_layers.

    forward takes token ids (first stage) or hidden states, returns hidden states or, on the last stage, logits
    for the rows selected by `logits_rows` (all rows when None)."""

    def __init__(self, cfg: ModelConfig, layers: LayerRange):
        super().__init__()
        if layers.end > cfg.num_layers:
            raise ValueError(f"stage {layers} goes past the model's {cfg.num_layers} layers")
        self.cfg, self.range = cfg, layers
        self.is_first, self.is_last = layers.start == 0, layers.end == cfg.num_layers
        # no default init (callers load or initialise every weight): normal_ on the meta device costs ~1 s once
        empty = torch.empty(cfg.vocab_size, cfg.hidden_size) if self.is_first else None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=empty) if self.is_first else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if self.is_last else None
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if self.is_last else None
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings and self.is_first and self.is_last and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.embed_tokens.weight  # (a quantized stage shares its quantized weight instead)

    def forward(
        self, x: torch.Tensor, ctx: AttentionContext, logits_rows: torch.Tensor | slice | None = None
    ) -> torch.Tensor:
        if self.is_first:
            virtual = getattr(self, "virtual", None)  # a prompt- or prefix-tuning adapter (models/virtual.py)
            x, ctx = virtual.enter(self.embed_tokens, x, ctx) if virtual is not None else (self.embed_tokens(x), ctx)
        for block in self.layers:
            x = block(x, ctx)
        if not self.is_last:
            return x
        if logits_rows is not None:
            x = x[logits_rows]
        return self.lm_head(self.norm(x)).float()  # (..., V)


class CausalContext:
    """Attention over whole sequences in one forward, no cache: (B, T) batches for training and reference.

    `valid` (B, T) marks real tokens when sequences are padded; padded keys are never attended to."""

    def __init__(self, cfg: ModelConfig, batch: int, length: int, device, valid: torch.Tensor | None = None):
        cos, sin = rotary_tables(cfg, length, device)
        self.cos, self.sin = cos[:, None, :], sin[:, None, :]  # (T, 1, hd)
        self.mask = None
        idx = torch.arange(length, device=device)
        if valid is not None or cfg.sliding_window is not None:
            allowed = idx[None, :] <= idx[:, None]  # (T, T) causal
            if cfg.sliding_window is not None:
                allowed = allowed & (idx[None, :] > idx[:, None] - cfg.sliding_window)
            allowed = allowed.expand(batch, length, length)  # (B, T, T)
            if valid is not None:
                # A padded query row keeps its own diagonal so no row is empty (its output is ignored).
                allowed = allowed & (valid[:, None, :] | torch.eye(length, dtype=torch.bool, device=device))
            self.mask = allowed[:, None]  # (B, 1, T, T)
            if valid is not None:
                # Positions count real tokens only, so left padding does not shift RoPE.
                pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
                self.cos, self.sin = cos[pos][:, :, None, :], sin[pos][:, :, None, :]  # (B, T, 1, hd)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, T = q.shape[:2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        if self.mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hd)


def full_forward(stage: LlamaStage, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, V) of a whole model on token ids (B, T), no cache."""
    ctx = CausalContext(stage.cfg, ids.shape[0], ids.shape[1], ids.device, valid)
    return stage(ids, ctx)
