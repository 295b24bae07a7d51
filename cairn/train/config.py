"""TrainConfig: one frozen dataclass read from YAML and/or CLI flags, its types checked by pydantic (user input
arrives here). No torch import here."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import ConfigDict

from cairn.errors import UserError

# the keys a config file may also group under `distributed:` (training across the pool)
DISTRIBUTED = ("pool", "workers", "sync", "inner_steps", "outer_lr", "outer_momentum", "round_slack", "delta_dtype")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pydantic.dataclasses.dataclass(frozen=True, config=ConfigDict(strict=True, allow_inf_nan=False))
class TrainConfig:
    """Everything a training run needs; the YAML keys are these field names. Each value must have its field's type
    (strict: no 1.5 for an int, no 5 for a path; an int is a valid float); `build` turns a wrong one into a one-line
    UserError naming key, value and what was expected."""

    recipe: Literal["pretrain", "sft", "dpo", "distill"]
    """'pretrain' (raw text, packed), 'sft' (chat / alpaca JSONL, loss on assistant tokens), 'dpo' (comparisons) or
    'distill' (chat JSONL or text, learning from a teacher's token distributions)."""
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
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
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
    precision: Literal["auto", "bf16", "fp32"] = "auto"
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
    prompt_tuning: int = 0
    """Prompt tuning: train this many virtual input embeddings in front of every sequence (base frozen; 0: off)."""
    prefix_tuning: int = 0
    """Prefix tuning: train this many virtual positions' keys and values at every layer (base frozen; 0: off)."""
    prompt_init_text: str | None = None
    """Prompt tuning: start the virtual embeddings from this text's token embeddings (PEFT's TEXT init)."""
    dpo_beta: float = 0.1
    """DPO temperature on the log-ratio margin."""
    teacher: str | None = None
    """distill: the teacher checkpoint, run in this process for its logits (must share the student's tokenizer)."""
    teacher_logits: str | None = None
    """distill: instead of a teacher, the top-K cache `cairn synth --save-logits K` wrote for the data."""
    distill_alpha: float = 0.5
    """distill: loss = alpha x cross-entropy + (1 - alpha) x KD (1 is plain SFT)."""
    distill_temperature: float = 1.0
    """distill: softmax temperature of both distributions (the KD term is scaled by T^2)."""
    distill_loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """distill: the divergence, KL(teacher || student), KL(student || teacher) or the generalised JSD."""
    distill_beta: float = 0.5
    """distill: the JSD's mixture weight beta (0 is reverse KL, 1 forward KL)."""
    on_policy: float = 0.0
    """distill: share of micro-batches whose targets the student writes itself (sampled from the prompts of the
    data), scored by the teacher with the KD loss only (GKD's lambda); needs `teacher`."""
    on_policy_tokens: int = 64
    """distill: tokens the student writes per prompt on an on-policy micro-batch."""
    too_long: Literal["truncate", "refuse"] = "truncate"
    """Sequences longer than seq_len: 'truncate' (with a warning) or 'refuse'."""
    skip_bad_lines: bool = False
    """Skip malformed JSONL lines (counted) instead of stopping."""
    progress: bool = True
    """Show a progress bar."""
    pool: str | None = None
    """Address of the pool to train on (`cairn pool start` prints it); with workers."""
    workers: int = 0
    """Pool devices to train on (needs pool); 0 trains in this process."""
    sync: Literal["diloco", "every-step"] = "diloco"
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
    delta_dtype: Literal["fp32", "bf16", "int8", "int4"] = "fp32"
    """How pseudo-gradients go up and (DiLoCo) the global weights' change comes down: fp32, bf16, int8 or int4
    (blocks of 32 values with their own scale, each row's largest values sent apart; cairn/quant/compress.py)."""

    def __post_init__(self) -> None:
        def bad(field: str, why: str):
            raise UserError(f"{field}: {why}", param=field)

        if not self.data:
            bad("data", "give at least one training file, got none")
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
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown:
            bad("lora_targets", f"unknown module {unknown[0]!r}; choose from {', '.join(LORA_TARGETS)}")
        if sum(bool(x) for x in (self.lora_rank, self.prompt_tuning, self.prefix_tuning)) > 1:
            bad("lora_rank", "choose one parameter-efficient method: lora_rank, prompt_tuning or prefix_tuning")
        for name in ("prompt_tuning", "prefix_tuning"):
            if getattr(self, name) < 0:
                bad(name, f"must not be negative, got {getattr(self, name)}")
        if self.prompt_init_text is not None and not self.prompt_tuning:
            bad("prompt_init_text", "is the starting point of prompt tuning; set prompt_tuning too")
        if (self.prompt_tuning or self.prefix_tuning) and self.recipe == "dpo":
            bad("recipe", "prompt and prefix tuning train sft, pretrain and distill runs, not dpo")
        if self.lora_rank and not self.lora_targets:
            bad("lora_targets", "LoRA needs at least one target module")
        if self.pool is not None and ":" not in self.pool:
            bad("pool", f"must be the pool's HOST:PORT address, got {self.pool!r}")
        if self.workers < 0:
            bad("workers", f"must not be negative, got {self.workers}")
        if self.inner_steps < 1:
            bad("inner_steps", f"must be at least 1, got {self.inner_steps}")
        if self.threads is not None and self.threads < 1:
            bad("threads", f"must be at least 1, got {self.threads}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            bad("adam_betas", f"must be two numbers in [0, 1), got {list(self.adam_betas)}")
        for name in ("lora_alpha", "outer_lr"):
            if getattr(self, name) <= 0:
                bad(name, f"must be positive, got {getattr(self, name)}")
        for name in ("min_lr_ratio", "outer_momentum"):
            if not 0 <= getattr(self, name) <= 1:
                bad(name, f"must be in [0, 1], got {getattr(self, name)}")
        if self.round_slack != 0 and self.round_slack < 1:
            bad("round_slack", f"must be 0 (off) or at least 1, got {self.round_slack}")
        if self.lora_dropout >= 1:
            bad("lora_dropout", f"must be below 1, got {self.lora_dropout}")
        if self.dpo_beta <= 0:
            bad("dpo_beta", f"must be positive, got {self.dpo_beta}")
        if self.recipe == "distill":
            if (self.teacher is None) == (self.teacher_logits is None):
                bad("teacher", "distill needs a teacher checkpoint (teacher) or a teacher cache (teacher_logits), "
                               "exactly one of them")
            if self.on_policy and self.teacher is None:
                bad("on_policy", "on-policy distillation needs the teacher itself (teacher), not a cache")
            if self.on_policy and (self.prompt_tuning or self.prefix_tuning):
                bad("on_policy", "on-policy samples are drawn without prompt or prefix adapters; train those off-policy")
        elif self.teacher is not None or self.teacher_logits is not None:
            bad("teacher", f"a teacher is only used by the distill recipe, not {self.recipe}")
        for name in ("distill_alpha", "distill_beta", "on_policy"):
            if not 0 <= getattr(self, name) <= 1:
                bad(name, f"must be in [0, 1], got {getattr(self, name)}")
        if self.distill_temperature <= 0:
            bad("distill_temperature", f"must be positive, got {self.distill_temperature}")
        if self.on_policy_tokens < 1:
            bad("on_policy_tokens", f"must be at least 1, got {self.on_policy_tokens}")

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def virtual(self) -> tuple[str, int] | None:
        """('prompt' | 'prefix', virtual tokens) when training a prompt- or prefix-tuning adapter."""
        if self.prompt_tuning:
            return "prompt", self.prompt_tuning
        if self.prefix_tuning:
            return "prefix", self.prefix_tuning
        return None

    @classmethod
    def build(cls, file: str | Path | None = None, **overrides: Any) -> TrainConfig:
        """Values from a YAML file, then overrides (CLI flags; None means 'not given'), then defaults."""
        values: dict[str, Any] = {}
        if file is not None:
            values = _read_yaml(Path(file))
            values.update(_distributed(values.pop("distributed", None), values))
        values.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(names), key=str)
        if unknown:
            raise UserError(f"unknown training option {unknown[0]!r} (known: {', '.join(names)})",
                            param=str(unknown[0]))
        for key in ("recipe", "model", "data", "out"):
            if key not in values:
                raise UserError(f"{key} is required (in the config file or as --{key.replace('_', '-')})", param=key)
        given = dict(values)
        hints = typing.get_type_hints(cls)
        for key, v in values.items():
            want = hints[key]
            if key in ("model", "out", "data", "eval_data", "teacher", "teacher_logits"):  # from Python, a Path is as good as a str
                v = values[key] = [_fspath(x) for x in v] if isinstance(v, (list, tuple)) else _fspath(v)
            if typing.get_origin(want) is tuple and isinstance(v, list):
                values[key] = tuple(v)
            elif key in ("data", "eval_data", "lora_targets") and isinstance(v, str):
                values[key] = (v,)  # one file (or module) may be given without a list
            elif want is float and isinstance(v, str):
                values[key] = _yaml_number(v)
        try:
            return cls(**values)
        except pydantic.ValidationError as e:
            key = str(e.errors()[0]["loc"][0])
            shown = repr(given[key])
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise UserError(f"{key}: expected {_expected(key, hints[key])}, got {shown}", param=key) from None

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _fspath(v: Any) -> Any:
    return os.fspath(v) if isinstance(v, os.PathLike) else v


def _yaml_number(text: str) -> float | str:
    """YAML 1.1 (PyYAML) reads `1e-3` (no dot) as a string: such a string is the number it spells; any other
    string stays a string, for validation to refuse."""
    try:
        x = float(text)
    except ValueError:
        return text
    return x if math.isfinite(x) else text


def _expected(key: str, want: Any) -> str:
    """What a field accepts, in words (for the one-line error)."""
    if key == "pool":
        return "the pool's HOST:PORT address"
    if key == "adam_betas":
        return "two numbers [beta1, beta2]"
    origin, args = typing.get_origin(want), typing.get_args(want)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _expected(key, a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple:
        return f"a list of {_expected(key, args[0]).removeprefix('a ')}s"
    return {str: "a string", int: "a whole number", float: "a finite number", bool: "true or false"}[want]


def _distributed(section: Any, top: dict[str, Any]) -> dict[str, Any]:
    """The `distributed:` mapping of a config file (pool, workers, sync, inner_steps, ...), checked."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise UserError(f"distributed: must be a mapping of {', '.join(DISTRIBUTED)}, got {section!r}",
                        param="distributed")
    for key in section:
        if key not in DISTRIBUTED:
            raise UserError(f"unknown distributed option {key!r} (known: {', '.join(DISTRIBUTED)})", param=key)
        if key in top:
            raise UserError(f"{key} is given both at the top level and under distributed:", param=key)
    return section


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise UserError(f"{path}:{key_node.start_mark.line + 1}: {key!r} is given twice", param=str(key))
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        values = yaml.load(path.read_text(), Loader=Loader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a mapping of option: value")
    return values
