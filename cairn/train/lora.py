"""LoRA: low-rank adapters on the projections of a LlamaStage, saved in the layout PEFT loads, merged by formula.

cairn fuses q/k/v into qkv_proj and gate/up into gate_up_proj; an adapter on q_proj adds its low-rank update to
the q rows of the fused output. Adapter tensors are named as PEFT names them on a transformers Llama model:
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   (rank, in)
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   (out, rank)
Merging is a pure function on HF-named state dicts: W <- W + (alpha / rank) * B @ A."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cairn.config import ModelConfig
from cairn.errors import ModelLoadError
from cairn.fsutil import atomic_write, atomic_write_json
from cairn.models.llama import LlamaStage

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _parts(cfg: ModelConfig) -> dict[str, tuple[str, str, int, int]]:
    """HF target name -> (block submodule, cairn linear, first output row, end row) inside that linear."""
    q, kv, f = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {
        "q_proj": ("self_attn", "qkv_proj", 0, q),
        "k_proj": ("self_attn", "qkv_proj", q, q + kv),
        "v_proj": ("self_attn", "qkv_proj", q + kv, q + 2 * kv),
        "o_proj": ("self_attn", "o_proj", 0, cfg.hidden_size),
        "gate_proj": ("mlp", "gate_up_proj", 0, f),
        "up_proj": ("mlp", "gate_up_proj", f, 2 * f),
        "down_proj": ("mlp", "down_proj", 0, cfg.hidden_size),
    }


class LoraLinear(nn.Module):
    """A frozen linear plus low-rank updates on row ranges of its output (one per HF target it fuses)."""

    def __init__(self, base: nn.Linear, rows: dict[str, tuple[int, int]], spec: LoraSpec):
        super().__init__()
        self.base, self.rows, self.scale, self.enabled = base, rows, spec.scale, True
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.lora_A = nn.ModuleDict({n: nn.Linear(base.in_features, spec.rank, bias=False) for n in rows})
        self.lora_B = nn.ModuleDict({n: nn.Linear(spec.rank, b - a, bias=False) for n, (a, b) in rows.items()})
        for n in rows:  # as PEFT initialises: A random, B zero, so training starts from the base model
            nn.init.kaiming_uniform_(self.lora_A[n].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[n].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if not self.enabled:
            return y
        xd = self.dropout(x)
        for n, (a, b) in self.rows.items():
            y[..., a:b] += self.lora_B[n](self.lora_A[n](xd)) * self.scale  # (..., b - a)
        return y


def attach(stage: LlamaStage, spec: LoraSpec) -> dict[str, LoraLinear]:
    """Freeze the stage and wrap the targeted linears; returns {'layers.{i}.self_attn.qkv_proj': LoraLinear}."""
    stage.requires_grad_(False)
    parts = _parts(stage.cfg)
    wrapped: dict[str, LoraLinear] = {}
    for j, block in enumerate(stage.layers):
        by_linear: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}
        for t in spec.targets:
            sub, lin, a, b = parts[t]
            by_linear.setdefault((sub, lin), {})[t] = (a, b)
        for (sub, lin), rows in by_linear.items():
            parent = getattr(block, sub)
            base = getattr(parent, lin)
            if isinstance(base, nn.Linear):
                device, dtype = base.weight.device, base.weight.dtype
            else:  # a frozen quantized base (QLoRA): adapters in the model's compute dtype
                device, dtype = base.device, base.compute_dtype
            lora = LoraLinear(base, rows, spec).to(device=device, dtype=dtype)
            setattr(parent, lin, lora)
            wrapped[f"layers.{j}.{sub}.{lin}"] = lora
    return wrapped


def set_enabled(wrapped: dict[str, LoraLinear], enabled: bool) -> None:
    for m in wrapped.values():
        m.enabled = enabled


def adapter_state(stage: LlamaStage, wrapped: dict[str, LoraLinear]) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors (layer numbers are the model's)."""
    out = {}
    for path, m in wrapped.items():
        j = int(path.split(".")[1])
        i = stage.range.start + j
        sub = path.split(".")[2]
        for n in m.rows:
            key = f"{_PREFIX}model.layers.{i}.{sub}.{n}"
            out[f"{key}.lora_A.weight"] = m.lora_A[n].weight.detach().contiguous().cpu()
            out[f"{key}.lora_B.weight"] = m.lora_B[n].weight.detach().contiguous().cpu()
    return out


def load_adapter_state(wrapped: dict[str, LoraLinear], stage: LlamaStage, tensors: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-named adapter tensors into attached adapters (what adapter_state wrote)."""
    expected = adapter_state(stage, wrapped)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ModelLoadError(f"adapter tensor {missing[0]!r} is missing")
    with torch.no_grad():
        for path, m in wrapped.items():
            i = stage.range.start + int(path.split(".")[1])
            sub = path.split(".")[2]
            for n in m.rows:
                key = f"{_PREFIX}model.layers.{i}.{sub}.{n}"
                m.lora_A[n].weight.copy_(tensors[f"{key}.lora_A.weight"])
                m.lora_B[n].weight.copy_(tensors[f"{key}.lora_B.weight"])


def save_adapter(out_dir: Path, tensors: dict[str, torch.Tensor], spec: LoraSpec, base_model: str) -> None:
    """adapter_config.json + adapter_model.safetensors, as PEFT writes them for a LoRA on a causal LM."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(out_dir / ADAPTER_CONFIG, {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model),
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    })


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and tensors of a PEFT LoRA adapter; refuses variants whose merge differs (DoRA,
    per-module ranks) rather than merging them wrongly."""
    adapter_dir = Path(adapter_dir)
    cfg_path, w_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise ModelLoadError(f"{cfg_path} is missing: not a PEFT adapter directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from None
    if cfg.get("peft_type") != "LORA":
        raise ModelLoadError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ModelLoadError(f"{cfg_path}: DoRA and per-module rank/alpha patterns are not supported")
    if not w_path.is_file():
        raise ModelLoadError(f"{w_path} is missing (cairn reads safetensors adapters only)")
    try:
        tensors = load_file(str(w_path))
    except SafetensorError as e:
        raise ModelLoadError(f"{w_path} is corrupt or truncated: {e}") from None
    return cfg, tensors


def merge_state(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], adapter_cfg: dict) -> dict[str, torch.Tensor]:
    """HF base tensors + PEFT adapter tensors -> merged HF tensors (a new dict; the base is not modified).
    W' = W + s * B @ A with s = alpha / r (alpha / sqrt(r) under rsLoRA), computed in float32."""
    r = int(adapter_cfg["r"])
    alpha = float(adapter_cfg.get("lora_alpha", r))
    scale = alpha / math.sqrt(r) if adapter_cfg.get("use_rslora") else alpha / r
    merged = dict(base)
    for key, a_weight in adapter.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        target = module.removeprefix(_PREFIX)
        w_name = target + ".weight"
        b_key = module + ".lora_B.weight"
        if w_name not in base:
            raise ModelLoadError(f"the adapter targets {target!r}, which the base checkpoint does not have")
        if b_key not in adapter:
            raise ModelLoadError(f"adapter tensor {b_key!r} is missing")
        A, B, W = a_weight.float(), adapter[b_key].float(), base[w_name]
        if B.shape[0] != W.shape[0] or A.shape[1] != W.shape[1] or A.shape[0] != B.shape[1]:
            raise ModelLoadError(f"adapter shapes for {target!r} ({tuple(B.shape)} x {tuple(A.shape)}) do not fit "
                                 f"the base weight {tuple(W.shape)}")
        merged[w_name] = (W.float() + scale * (B @ A)).to(W.dtype)
    return merged


def merge_to_checkpoint(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                        metadata: dict | None = None, dtype: str | None = None) -> ModelConfig:
    """Fold a PEFT LoRA adapter into its base checkpoint and write the result as a full HF checkpoint
    (tokenizer and generation files copied from the base). The method and its parameters go into the
    safetensors metadata."""
    from cairn.models.checkpoint import build_stage, copy_side_files, read_tensors, save_checkpoint, weight_map
    from cairn.types import LayerRange

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    cfg = ModelConfig.from_hf_dir(base_dir)
    if cfg.raw.get("quantization_config"):  # a QLoRA base: merged into the weights it stands for, written in float
        import tempfile

        from cairn.models.quantize import dequantize_checkpoint

        with tempfile.TemporaryDirectory(prefix="cairn-merge-") as tmp:
            dequantize_checkpoint(base_dir, Path(tmp) / "base", dtype=dtype or "float32")
            info = {**(metadata or {}), "cairn_base_quantization": json.dumps(cfg.raw["quantization_config"])}
            merge_to_checkpoint(Path(tmp) / "base", adapter_dir, out_dir, info, dtype)
        return ModelConfig.from_hf_dir(out_dir)
    adapter_cfg, adapter = read_adapter(adapter_dir)
    merged = merge_state(read_tensors(base_dir, list(weight_map(base_dir))), adapter, adapter_cfg)
    stage = build_stage(cfg, LayerRange(0, cfg.num_layers), merged, dtype=dtype,
                        source=f"{base_dir} merged with {adapter_dir}")
    info = {"method": "lora", "r": adapter_cfg["r"], "alpha": adapter_cfg.get("lora_alpha"),
            "targets": adapter_cfg.get("target_modules"), "adapter": str(adapter_dir)}
    save_checkpoint(stage, out_dir, metadata={**(metadata or {}), "cairn_merge": json.dumps(info)})
    copy_side_files(base_dir, out_dir)
    return cfg
