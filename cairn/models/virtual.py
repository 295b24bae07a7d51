"""Prompt tuning and prefix tuning: N learned virtual tokens in front of every sequence, the base model unchanged.

Both are served the same way: the virtual tokens get ids V .. V + N - 1 just past the vocabulary, and every prompt
starts with them, so they take positions 0 .. N - 1 (the real tokens start at N, as under PEFT), flow through the
engine's paging and prefix cache like any prompt tokens (computed once, then reused by every request), and never
reach the tokenizer. What the ids mean:
  prompt tuning  their input embeddings are the learned vectors (N, D);
  prefix tuning  at every layer their keys and values are the learned ones (L, N, nkv, hd), used as they are (no
                 rotary embedding, as PEFT passes them to transformers as past keys/values); what the model
                 computes at those positions is replaced and goes nowhere else.
Adapters are saved and read in PEFT's layout (adapter_config.json + adapter_model.safetensors with
"prompt_embeddings"), so PEFT loads what cairn trains and cairn serves what PEFT trains."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cairn.config import ModelConfig
from cairn.errors import ModelLoadError, UserError

PEFT_TYPES = {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}


class VirtualTokens(nn.Module):
    """The learned part of a prompt- or prefix-tuning adapter, and how it enters a forward pass."""

    def __init__(self, cfg: ModelConfig, kind: str, n: int):
        super().__init__()
        if kind not in PEFT_TYPES:
            raise ValueError(f"unknown virtual-token kind {kind!r}")
        if n < 1:
            raise UserError(f"an adapter needs at least one virtual token, got {n}", param="num_virtual_tokens")
        self.kind, self.n, self.first = kind, n, cfg.vocab_size
        if kind == "prompt":
            self.embeddings = nn.Parameter(torch.zeros(n, cfg.hidden_size))  # (N, D)
        else:
            self.keys = nn.Parameter(torch.zeros(cfg.num_layers, n, cfg.num_kv_heads, cfg.head_dim))  # (L, N, nkv, hd)
            self.values = nn.Parameter(torch.zeros(cfg.num_layers, n, cfg.num_kv_heads, cfg.head_dim))

    @property
    def ids(self) -> list[int]:
        return list(range(self.first, self.first + self.n))

    def enter(self, embed: nn.Embedding, ids: torch.Tensor, ctx):
        """Embeddings of `ids` (virtual ones included) and the attention context to use (for prefix tuning one
        that puts the learned keys and values at the virtual positions)."""
        virtual = ids >= self.first  # (...,)
        x = embed(torch.where(virtual, 0, ids))  # (..., D)
        slot = (ids - self.first).clamp(0, self.n - 1)
        if self.kind == "prompt":
            return torch.where(virtual[..., None], self.embeddings[slot].to(x.dtype), x), ctx
        return x, _PrefixContext(ctx, virtual, slot, self.keys, self.values)


class _PrefixContext:
    """An attention context whose keys and values at virtual positions are the adapter's, layer by layer."""

    def __init__(self, inner, virtual: torch.Tensor, slot: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        self.inner, self.virtual, self.slot, self.keys, self.values = inner, virtual, slot, keys, values
        self.cos, self.sin = inner.cos, inner.sin

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        at = self.virtual[..., None, None]  # (..., 1, 1)
        k = torch.where(at, self.keys[layer][self.slot].to(k.dtype), k)  # (..., nkv, hd)
        v = torch.where(at, self.values[layer][self.slot].to(v.dtype), v)
        return self.inner.attend(layer, q, k, v)


# --- PEFT's layout ---------------------------------------------------------------------------------------------


def peft_config(vt: VirtualTokens, cfg: ModelConfig, base: str, init_text: str | None = None) -> dict:
    """adapter_config.json as PEFT writes it for a causal LM (prefix tuning of a GQA model: token_dim is
    nkv x hd and num_attention_heads nkv, as PEFT sets them)."""
    out = {"peft_type": PEFT_TYPES[vt.kind], "task_type": "CAUSAL_LM", "num_virtual_tokens": vt.n,
           "num_transformer_submodules": 1, "num_layers": cfg.num_layers, "base_model_name_or_path": base,
           "inference_mode": True, "revision": None}
    if vt.kind == "prompt":
        out.update(token_dim=cfg.hidden_size, num_attention_heads=cfg.num_heads, tokenizer_name_or_path=base,
                   prompt_tuning_init="TEXT" if init_text else "RANDOM", prompt_tuning_init_text=init_text)
    else:
        kv = cfg.num_kv_heads * cfg.head_dim
        out.update(token_dim=kv, num_attention_heads=cfg.num_kv_heads, encoder_hidden_size=kv,
                   prefix_projection=False)
    return out


def to_peft(vt: VirtualTokens) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors: "prompt_embeddings", (N, D) for prompt tuning; for prefix tuning (N, L * 2 * nkv
    * hd), which PEFT views as (N, L * 2, nkv, hd) with layer l's keys at 2l and values at 2l + 1."""
    if vt.kind == "prompt":
        return {"prompt_embeddings": vt.embeddings.detach().float().cpu().contiguous()}
    kv = torch.stack([vt.keys, vt.values], 1)  # (L, 2, N, nkv, hd)
    flat = kv.flatten(0, 1).permute(1, 0, 2, 3)  # (N, L * 2, nkv, hd)
    return {"prompt_embeddings": flat.reshape(vt.n, -1).detach().float().cpu().contiguous()}


def save_adapter(out: str | Path, vt: VirtualTokens, cfg: ModelConfig, base: str, init_text: str | None = None) -> None:
    from safetensors.torch import save_file

    from cairn.fsutil import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_peft(vt), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(out / "adapter_config.json", peft_config(vt, cfg, base, init_text))


def load_adapter(path: str | Path, cfg: ModelConfig) -> VirtualTokens:
    """A PEFT prompt- or prefix-tuning adapter directory for a model of config `cfg`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        meta = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} is not an adapter directory (adapter_config.json: {e})") from None
    kind = {v: k for k, v in PEFT_TYPES.items()}.get(meta.get("peft_type"))
    if kind is None:
        lora = meta.get("peft_type") == "LORA"
        hint = " (merge LoRA adapters into the model with `cairn lora merge`)" if lora else ""
        raise ModelLoadError(f"{path}: cairn serves prompt- and prefix-tuning adapters, not {meta.get('peft_type')}"
                             + hint)
    if meta.get("num_transformer_submodules", 1) != 1 or meta.get("prefix_projection"):
        raise ModelLoadError(f"{path}: only decoder-only adapters without a prefix projection can be served")
    vt = VirtualTokens(cfg, kind, int(meta["num_virtual_tokens"]))
    try:
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
            flat = f.get_tensor("prompt_embeddings").float()
    except (OSError, SafetensorError) as e:
        raise ModelLoadError(f"{path}/adapter_model.safetensors is missing or damaged ({e})") from None
    with torch.no_grad():
        if kind == "prompt":
            if tuple(flat.shape) != tuple(vt.embeddings.shape):
                raise ModelLoadError(f"{path}: prompt embeddings {tuple(flat.shape)} do not fit this model "
                                     f"({vt.n} x {cfg.hidden_size})")
            vt.embeddings.copy_(flat)
        else:
            L, nkv, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
            if tuple(flat.shape) != (vt.n, L * 2 * nkv * hd):
                raise ModelLoadError(f"{path}: prefix {tuple(flat.shape)} does not fit this model ({vt.n} x "
                                     f"{L} layers x 2 x {nkv} kv heads x {hd})")
            kv = flat.view(vt.n, L, 2, nkv, hd).permute(1, 2, 0, 3, 4)  # (L, 2, N, nkv, hd)
            vt.keys.copy_(kv[:, 0])
            vt.values.copy_(kv[:, 1])
    return vt.requires_grad_(False)
