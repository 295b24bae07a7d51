"""Resumable training checkpoints: trainable weights, optimizer, schedule, position and RNG, in safetensors + JSON.

Each checkpoint is written into `step-N.tmp/` and renamed to `step-N/` only when complete, so a crash mid-write
never damages the last good one; resuming picks the newest complete directory."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cairn.errors import ModelLoadError
from cairn.fsutil import atomic_write_text

_NAME = "step-"


def _complete(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a `.tmp` directory is one whose writing never finished)."""
    return sorted(p for p in ckpt_dir.glob(f"{_NAME}*") if p.is_dir() and not p.name.endswith(".tmp"))


def latest(ckpt_dir: Path) -> Path | None:
    done = _complete(ckpt_dir)
    return done[-1] if done else None


def save(ckpt_dir: Path, trainer, keep: int, extra: dict | None = None,
         extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint of `trainer`; `extra` (JSON) and `extra_tensors` carry a caller's own state (the pool
    trainer's round, byte counts and outer-optimizer momentum)."""
    final = ckpt_dir / f"{_NAME}{trainer.step_count:08d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().contiguous().cpu() for n, p in trainer.params.items()}, str(tmp / "trainable.safetensors"))
    opt = trainer.optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    scalars: dict[str, dict] = {}
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {
        "step": trainer.step_count,
        "tokens": trainer.tokens,
        "param_names": list(trainer.params),
        "param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": {k: v for k, v in trainer.scheduler.state_dict().items() if k != "lr_lambdas"},
        "config": trainer.cfg.to_dict(),
    }
    if extra is not None:
        meta["extra"] = extra
    if extra_tensors:
        save_file({k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()}, str(tmp / "extra.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _complete(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, trainer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore a trainer to the moment `save` was called; returns the caller's `extra` and `extra_tensors`."""
    try:
        meta = json.loads((path / "trainer_state.json").read_text())
        weights = load_file(str(path / "trainable.safetensors"))
        tensors = load_file(str(path / "optimizer.safetensors"))
        extra_file = path / "extra.safetensors"
        extra_tensors = load_file(str(extra_file)) if extra_file.is_file() else {}
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise ModelLoadError(f"checkpoint {path} is damaged ({e}); delete it to resume from the one before") from None
    if meta["param_names"] != list(trainer.params):
        raise ModelLoadError(f"checkpoint {path} was written by a run with different trainable parameters "
                             "(LoRA settings or model changed); resume with the same configuration")
    with torch.no_grad():
        for n, p in trainer.params.items():
            p.copy_(weights[n])
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for idx, sc in meta["optimizer_scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    trainer.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched = trainer.scheduler.state_dict()
    sched.update(meta["scheduler"])
    trainer.scheduler.load_state_dict(sched)
    trainer.step_count, trainer.tokens = meta["step"], meta["tokens"]
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return meta.get("extra", {}), extra_tensors


def truncate_metrics(metrics_path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint a run resumes from."""
    if not metrics_path.is_file():
        return
    keep = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_text(metrics_path, "".join(line + "\n" for line in keep))
