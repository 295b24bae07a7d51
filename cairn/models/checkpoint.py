"""Hugging Face checkpoint layout: safetensors weights (single or sharded), key mapping to cairn's fused modules.

Two pure steps, each way: HF names <-> cairn names (fuse/unfuse q,k,v and gate,up), then tensors <-> modules.
Only safetensors are read; a missing, truncated or corrupt file is named with the tensor that needed it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cairn.config import ModelConfig
from cairn.errors import ModelLoadError
from cairn.fsutil import atomic_write, atomic_write_json
from cairn.models import quantized
from cairn.models.llama import TORCH_DTYPES, LlamaStage
from cairn.types import LayerRange

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_map(model_dir: Path) -> dict[str, str]:
    """HF tensor name -> file name holding it."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({e})") from None
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
            raise ModelLoadError(f"{model_dir} holds only pickle weights (.bin/.pt); cairn loads safetensors only")
        raise ModelLoadError(f"{single} is missing (and there is no {INDEX_FILE})")
    with _open(single) as f:
        return {k: SINGLE_FILE for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)


def _open(path: Path):
    if not path.is_file():
        raise ModelLoadError(f"weight file {path} is missing")
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise ModelLoadError(f"weight file {path} is corrupt or truncated: {e}") from None


def _hf_names(cfg: ModelConfig, layers: LayerRange, first: bool, last: bool) -> dict[str, list[str]]:
    """cairn stage tensor name -> the HF tensor names concatenated (dim 0) to make it."""
    out: dict[str, list[str]] = {}
    if first:
        out["embed_tokens.weight"] = ["model.embed_tokens.weight"]
    for i in layers:
        j, p = i - layers.start, f"model.layers.{i}."
        out[f"layers.{j}.input_layernorm.weight"] = [p + "input_layernorm.weight"]
        out[f"layers.{j}.post_attention_layernorm.weight"] = [p + "post_attention_layernorm.weight"]
        out[f"layers.{j}.self_attn.qkv_proj.weight"] = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
        out[f"layers.{j}.self_attn.o_proj.weight"] = [p + "self_attn.o_proj.weight"]
        out[f"layers.{j}.mlp.gate_up_proj.weight"] = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        out[f"layers.{j}.mlp.down_proj.weight"] = [p + "mlp.down_proj.weight"]
        if cfg.qkv_bias:
            out[f"layers.{j}.self_attn.qkv_proj.bias"] = [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
        if cfg.o_bias:
            out[f"layers.{j}.self_attn.o_proj.bias"] = [p + "self_attn.o_proj.bias"]
        if cfg.mlp_bias:
            out[f"layers.{j}.mlp.gate_up_proj.bias"] = [p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"]
            out[f"layers.{j}.mlp.down_proj.bias"] = [p + "mlp.down_proj.bias"]
    if last:
        out["norm.weight"] = ["model.norm.weight"]
        tied = cfg.tie_word_embeddings
        if not (tied and first):
            out["lm_head.weight"] = ["model.embed_tokens.weight" if tied else "lm_head.weight"]
    return out


def stage_tensor_names(cfg: ModelConfig, layers: LayerRange) -> list[str]:
    """HF tensor names a stage over `layers` needs (what to ship to a pool node that has no copy); a quantized
    checkpoint's matrices are named by their stored parts (X.qweight, X.scales, X.zeros)."""
    names = _hf_names(cfg, layers, layers.start == 0, layers.end == cfg.num_layers)
    return quantized.disk_names(cfg, list(dict.fromkeys(n for srcs in names.values() for n in srcs)))


def read_tensors(model_dir: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read the named HF tensors from a checkpoint directory (only the files that hold them are opened)."""
    model_dir = Path(model_dir)
    files = weight_map(model_dir)
    by_file: dict[str, list[str]] = {}
    for n in names:
        if n not in files:
            raise ModelLoadError(f"tensor {n!r} is missing from the checkpoint in {model_dir}")
        by_file.setdefault(files[n], []).append(n)
    out: dict[str, torch.Tensor] = {}
    for fname, wanted in by_file.items():
        with _open(model_dir / fname) as f:
            for n in wanted:
                try:
                    out[n] = f.get_tensor(n)
                except (SafetensorError, KeyError) as e:
                    raise ModelLoadError(f"tensor {n!r} in {model_dir / fname} cannot be read: {e}") from None
    return out


def build_stage(
    cfg: ModelConfig,
    layers: LayerRange,
    tensors: dict[str, torch.Tensor],
    *,
    dtype: str | None = None,
    device: str | torch.device = "cpu",
    source: str = "the checkpoint",
) -> LlamaStage:
    """Build the stage for `layers` from HF-named tensors (fusing q/k/v and gate/up). The matrices of a quantized
    checkpoint become quantized modules packed for `device` (cairn/models/quantized.py)."""
    torch_dtype = TORCH_DTYPES[dtype or cfg.dtype]
    with torch.device("meta"):
        stage = LlamaStage(cfg, layers)
    expected = {k: tuple(v.shape) for k, v in stage.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    qc, qweights = quantized.quant_config(cfg), {}
    for name, sources in _hf_names(cfg, layers, stage.is_first, stage.is_last).items():
        if quantized.is_quantized(qc, sources[0]):
            qweights[name] = quantized.gather(qc, sources, tensors, source)
            if qweights[name].shape != expected[name]:
                raise ModelLoadError(f"tensor {sources[0]!r} holds a quantized {qweights[name].shape} matrix, which "
                                     f"does not match config.json (fused {name} expects {expected[name]})")
            continue
        missing = [src for src in sources if src not in tensors]
        if missing:
            raise ModelLoadError(f"tensor {missing[0]!r} is missing from {source}")
        parts = [tensors[src] for src in sources]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        if tuple(t.shape) != expected[name]:
            raise ModelLoadError(
                f"tensor {sources[0]!r} has shape {tuple(parts[0].shape)}, which does not match config.json "
                f"(fused {name} expects {expected[name]})"
            )
        state[name] = t.to(device=device, dtype=torch_dtype)
    stage.load_state_dict(state, strict=False, assign=True)
    stage.tie_weights()
    if qweights:
        quantized.install(stage, qweights, device, torch_dtype)
    missing = [n for n, p in stage.named_parameters() if p.is_meta]
    if missing:
        raise ModelLoadError(f"{source} gave no value for {missing[:3]}")
    return stage.eval().requires_grad_(False)


def load_stage(
    model_dir: str | Path,
    cfg: ModelConfig,
    layers: LayerRange | None = None,
    *,
    dtype: str | None = None,
    device: str | torch.device = "cpu",
) -> LlamaStage:
    """Build the stage for `layers` (whole model by default) with only its tensors read from disk."""
    layers = layers or LayerRange(0, cfg.num_layers)
    tensors = read_tensors(model_dir, stage_tensor_names(cfg, layers))
    return build_stage(cfg, layers, tensors, dtype=dtype, device=device, source=f"the checkpoint in {model_dir}")


def to_hf_state_dict(stage: LlamaStage) -> dict[str, torch.Tensor]:
    """cairn stage tensors -> HF names (split fused tensors). Layer numbers are the model's, not the stage's."""
    cfg, r = stage.cfg, stage.range
    sd = stage.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, sources in _hf_names(cfg, r, stage.is_first, stage.is_last).items():
        if name == "lm_head.weight" and sources == ["model.embed_tokens.weight"]:
            continue  # tied: the head is the embedding
        t = sd[name]
        if len(sources) == 1:
            out[sources[0]] = t
            continue
        sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size] if "qkv" in name else [cfg.intermediate_size] * 2
        for src, part in zip(sources, t.split(sizes, 0)):
            out[src] = part
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def save_checkpoint(
    stage: LlamaStage, out_dir: str | Path, *, max_shard_bytes: int = 2 * 1024**3, metadata: dict | None = None
) -> None:
    """Write a whole-model stage as an HF checkpoint (config.json + safetensors, sharded above max_shard_bytes).

    Each file is written under a temporary name and renamed, so a crash never leaves a half-written file."""
    if not (stage.is_first and stage.is_last):
        raise ValueError("save_checkpoint needs the whole model, not a partial stage")
    out_dir = Path(out_dir)
    tensors = {k: v.detach().contiguous().cpu() for k, v in to_hf_state_dict(stage).items()}
    dtype = {v: k for k, v in TORCH_DTYPES.items()}[stage.embed_tokens.weight.dtype]
    write_tensors(tensors, out_dir, max_shard_bytes=max_shard_bytes, metadata=metadata)
    atomic_write_json(out_dir / "config.json", stage.cfg.with_dtype(dtype).to_hf_dict())


def write_tensors(tensors: dict[str, torch.Tensor], out_dir: str | Path, *, max_shard_bytes: int = 2 * 1024**3,
                  metadata: dict | None = None) -> None:
    """HF-named tensors as model.safetensors (sharded with an index above max_shard_bytes), each file written
    under a temporary name and renamed; stale shards of an earlier save are removed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    stale = [out_dir / SINGLE_FILE, out_dir / INDEX_FILE, *out_dir.glob("model-*-of-*.safetensors")]
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for p in stale:
        if p.name not in names:
            p.unlink(missing_ok=True)
    for fname, shard in zip(names, shards):
        atomic_write(out_dir / fname, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata=meta))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {n: f for f, s in zip(names, shards) for n in s},
        }
        atomic_write_json(out_dir / INDEX_FILE, index)


SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja")


def copy_side_files(src: str | Path, dst: str | Path, names: tuple[str, ...] = SIDE_FILES) -> None:
    """Copy the tokenizer and generation files that travel with a checkpoint's weights (`names`, those present)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if src.resolve() == dst.resolve():
        return
    for name in names:
        if (src / name).is_file():
            atomic_write(dst / name, lambda tmp, name=name: shutil.copyfile(src / name, tmp))
