"""TrainConfig: one frozen dataclass read from YAML and/or CLI flags. No torch import here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cairn.errors import UserError

RECIPES = ("pretrain", "sft", "dpo")
# the keys a config file may also group under `distributed:` (training across the pool)
DISTRIBUTED = ("pool", "workers", "sync", "inner_steps", "outer_lr", "outer_momentum", "round_slack", "delta_dtype")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; the YAML keys are these field names."""

    recipe: str
    """'pretrain' (raw text, packed), 'sft' (chat / alpaca JSONL, loss on assistant tokens) or 'dpo' (comparisons)."""
    model: str
    """Starting checkpoint (HF layout): a fresh `cairn init-model` or a trained model."""
    data: tuple[str, ...]
    """Training files: .txt / .jsonl for pretrain, .jsonl for sft and dpo."""
    out: str
    """Output directory: final HF checkpoint, adapter/ (LoRA), checkpoints/, metrics.jsonl, loss.png."""
    eval_data: tuple[str, ...] = ()
    """Held-out files; when empty, eval_fraction of the training examples are held out instead."""
    eval_fraction: float = 0.05
    """Share of examples held out for eval when eval_data is empty (0 disables eval)."""
    seq_len: int = 512
    """Tokens per training sequence (capped at the model's context)."""
    batch_size: int = 8
    """Sequences per micro-batch (for dpo: pairs)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 0
    """Optimizer steps; 0 means derive from epochs."""
    epochs: float = 1.0
    """Passes over the training set when max_steps is 0."""
    lr: float = 3e-4
    """Peak learning rate."""
    schedule: str = "cosine"
    """'cosine', 'linear' or 'constant' after warmup."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine and linear)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to norms and biases)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    precision: str = "auto"
    """'auto' (bf16 autocast on CUDA that supports it, else fp32), 'bf16' or 'fp32'."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""
    threads: int | None = None
    """CPU threads for torch."""
    seed: int = 0
    """Seeds initialisation of adapters, data order and dropout."""
    eval_every: int = 0
    """Eval every N steps (0: only at the end)."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept (older ones are deleted)."""
    log_every: int = 1
    """Write a metrics line every N steps."""
    resume: bool = False
    """Continue from the latest checkpoint in out/checkpoints (exactly: same weights as an uninterrupted run)."""
    lora_rank: int = 0
    """LoRA rank; 0 means full fine-tuning."""
    lora_alpha: float = 16.0
    """LoRA scale numerator (scale = alpha / rank)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input."""
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Projections that get adapters (HF names)."""
    lora_merge: bool = True
    """Also write the merged full checkpoint to out/ (the adapter always goes to out/adapter)."""
    dpo_beta: float = 0.1
    """DPO temperature on the log-ratio margin."""
    too_long: str = "truncate"
    """Sequences longer than seq_len: 'truncate' (with a warning) or 'refuse'."""
    skip_bad_lines: bool = False
    """Skip malformed JSONL lines (counted) instead of stopping."""
    progress: bool = True
    """Show a progress bar."""
    pool: str | None = None
    """Address of the pool to train on (`cairn pool start` prints it); with workers."""
    workers: int = 0
    """Pool devices to train on (needs pool); 0 trains in this process."""
    sync: str = "diloco"
    """With workers: 'diloco' (H local steps, then one averaged update) or 'every-step' (synchronous DP)."""
    inner_steps: int = 100
    """DiLoCo H: inner AdamW steps per worker between outer updates (max_steps counts inner steps)."""
    outer_lr: float = 0.7
    """DiLoCo outer Nesterov SGD learning rate."""
    outer_momentum: float = 0.9
    """DiLoCo outer momentum."""
    round_slack: float = 1.05
    """DiLoCo: when the first worker has taken its H steps, the others may go on for (its time) x (this - 1),
    then stop where they are, with fewer steps; a slower device never holds the round. 0: everyone takes H."""
    delta_dtype: str = "fp32"
    """How pseudo-gradients go up and (DiLoCo) the global weights' change comes down: fp32, bf16 or int8 (per-row
    scales)."""

    def __post_init__(self) -> None:
        def bad(field: str, why: str):
            raise UserError(f"{field}: {why}", param=field)

        if self.recipe not in RECIPES:
            bad("recipe", f"must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if not self.data:
            bad("data", "give at least one training file")
        for name in ("seq_len", "batch_size", "grad_accum", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                bad(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "lora_rank", "weight_decay",
                     "clip_grad", "lora_dropout"):
            if getattr(self, name) < 0:
                bad(name, f"must not be negative, got {getattr(self, name)}")
        if not 0 <= self.eval_fraction < 1:
            bad("eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        if self.max_steps == 0 and self.epochs <= 0:
            bad("epochs", "must be positive when max_steps is 0")
        if self.lr <= 0:
            bad("lr", f"must be positive, got {self.lr}")
        if self.schedule not in ("cosine", "linear", "constant"):
            bad("schedule", f"must be cosine, linear or constant, got {self.schedule!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            bad("precision", f"must be auto, bf16 or fp32, got {self.precision!r}")
        if self.too_long not in ("truncate", "refuse"):
            bad("too_long", f"must be truncate or refuse, got {self.too_long!r}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown:
            bad("lora_targets", f"unknown module {unknown[0]!r}; choose from {', '.join(LORA_TARGETS)}")
        if self.lora_rank and not self.lora_targets:
            bad("lora_targets", "LoRA needs at least one target module")
        if self.sync not in ("diloco", "every-step"):
            bad("sync", f"must be diloco or every-step, got {self.sync!r}")
        if self.delta_dtype not in ("fp32", "bf16", "int8"):
            bad("delta_dtype", f"must be fp32, bf16 or int8, got {self.delta_dtype!r}")
        if self.pool is not None and (not isinstance(self.pool, str) or ":" not in self.pool):
            bad("pool", f"must be the pool's HOST:PORT address, got {self.pool!r}")
        if self.workers < 0 or self.inner_steps < 1:
            bad("workers" if self.workers < 0 else "inner_steps", "must be positive")
        if self.dpo_beta <= 0:
            bad("dpo_beta", f"must be positive, got {self.dpo_beta}")

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    @classmethod
    def build(cls, file: str | Path | None = None, **overrides: Any) -> TrainConfig:
        """Values from a YAML file, then overrides (CLI flags; None means 'not given'), then defaults."""
        values: dict[str, Any] = {}
        if file is not None:
            values = _read_yaml(Path(file))
            values.update(_distributed(values.pop("distributed", None), values))
        values.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise UserError(f"unknown training option {unknown[0]!r} (known: {', '.join(names)})", param=unknown[0])
        for key in ("recipe", "model", "data", "out"):
            if key not in values:
                raise UserError(f"{key} is required (in the config file or as --{key.replace('_', '-')})", param=key)
        for key in ("data", "eval_data", "lora_targets", "adam_betas"):
            if key in values:
                v = values[key]
                values[key] = tuple(v) if isinstance(v, (list, tuple)) else (v,)
        values["adam_betas"] = tuple(float(b) for b in values.get("adam_betas", (0.9, 0.95)))
        for key, v in values.items():
            want = names[key].type
            if want in ("int", "float") and not isinstance(v, (int, float)) or isinstance(v, bool) and want != "bool":
                raise UserError(f"{key}: expected a number, got {v!r}", param=key)
            if want == "float":
                values[key] = float(v)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _distributed(section: Any, top: dict[str, Any]) -> dict[str, Any]:
    """The `distributed:` mapping of a config file (pool, workers, sync, inner_steps, ...), checked."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise UserError(f"distributed: must be a mapping of {', '.join(DISTRIBUTED)}", param="distributed")
    for key in section:
        if key not in DISTRIBUTED:
            raise UserError(f"unknown distributed option {key!r} (known: {', '.join(DISTRIBUTED)})", param=key)
        if key in top:
            raise UserError(f"{key} is given both at the top level and under distributed:", param=key)
    return section


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a mapping of option: value")
    return values
