"""A run's output directory, shared by one-process and pool training: the resume decision, metrics.jsonl,
train_config.json, checkpoints, the loss plot and the final export."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from cairn.errors import UserError
from cairn.fsutil import atomic_write, atomic_write_json
from cairn.train import state
from cairn.train.config import TrainConfig


class RunDir:
    """`out/`: checkpoints/step-N/, metrics.jsonl (one JSON line per step or round, and per evaluation),
    train_config.json, loss.png, and the exported model."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.ckpts = self.out / "checkpoints"
        self.metrics = self.out / "metrics.jsonl"
        self._file = None

    def resume_point(self) -> Path | None:
        """The checkpoint to resume from (None: start afresh). Refuses to overwrite a run's checkpoints unless
        cfg.resume says to continue it. Checked before any compute."""
        latest = state.latest(self.ckpts)
        if latest is not None and not self.cfg.resume:
            raise UserError(f"{self.out} already holds checkpoints of a run; pass --resume to continue it or choose "
                            "another --out")
        if latest is None and self.cfg.resume:
            self.log(f"nothing to resume in {self.ckpts}; starting from the beginning")
        return latest

    def resume(self, trainer, latest: Path | None) -> tuple[dict, dict[str, torch.Tensor]]:
        """Load `latest` into `trainer` (its step, weights, optimizer) and drop the metric lines written after it;
        with no checkpoint, clear the metrics of an earlier run. Returns the checkpoint's extra state."""
        if latest is None:
            self.metrics.unlink(missing_ok=True)
            return {}, {}
        extra, tensors = state.load(latest, trainer)
        state.truncate_metrics(self.metrics, trainer.step_count)
        return extra, tensors

    def __enter__(self) -> RunDir:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "train_config.json", self.cfg.to_dict())
        self._file = self.metrics.open("a")
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def record(self, line: dict) -> None:
        """One metrics line, flushed at once (a crash loses nothing already recorded)."""
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def save(self, trainer, extra: dict | None = None, extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
        path = state.save(self.ckpts, trainer, self.cfg.keep_checkpoints, extra, extra_tensors)
        self.plot()
        return path

    def plot(self) -> None:
        plot_losses(self.metrics, self.out / "loss.png")

    def finish(self, trainer, metadata: dict, extra: dict | None = None,
               extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
        """The last checkpoint, the exported model (with `metadata` in its safetensors header) and the plot."""
        state.save(self.ckpts, trainer, self.cfg.keep_checkpoints, extra, extra_tensors)
        trainer.export(self.out, {"cairn_train": json.dumps(metadata)})
        self.plot()


def plot_losses(metrics_path: Path, png: Path) -> None:
    """Train and eval loss against step, as a PNG beside the metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = [], []
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            m = json.loads(line)
            if "loss" in m:
                train.append((m["step"], m["loss"]))
            if "eval_loss" in m:
                evals.append((m["step"], m["eval_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)
