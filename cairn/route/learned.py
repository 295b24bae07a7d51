"""The learned router's classifier: P(the small model's answer is good enough | the prompt), read from the small
model's own hidden states (LLM.prompt_features: the mean and the last of its hidden states over the prompt after
the first half of its blocks), so routing needs no embedding model and costs a prompt forward through half of the
small model.

A logistic regression on standardised features, fitted by L-BFGS; its L2 strength is chosen by k-fold
cross-validated AUC, then it is refitted on every item. Saved as safetensors beside router.yaml."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from cairn.errors import UserError
from cairn.route.config import CLASSIFIER_FILE

L2_GRID = (1e-3, 1e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0, 100.0)
FEATURE_DEPTH = 0.5
"""The share of the small model's blocks whose output the classifier reads (their cost is the router's)."""


def feature_layers(num_layers: int) -> int:
    return max(1, round(num_layers * FEATURE_DEPTH))


@dataclass
class Classifier:
    weight: torch.Tensor
    """(D,) on standardised features."""
    bias: torch.Tensor
    """() the logit's offset."""
    mean: torch.Tensor
    """(D,) feature means of the training items."""
    std: torch.Tensor
    """(D,) feature standard deviations (at least 1e-6)."""
    layers: int | None = None
    """Features are the hidden states after this many of the small model's blocks (None: all, normalised)."""

    def logit(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) logits for (N, D) features (or () for (D,))."""
        return ((features.float() - self.mean) / self.std) @ self.weight + self.bias

    def prob(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(features))

    def save(self, path: str | Path, metadata: dict[str, str]) -> None:
        from safetensors.torch import save_file

        from cairn.fsutil import atomic_write

        tensors = {"weight": self.weight, "bias": self.bias.reshape(1), "mean": self.mean, "std": self.std}
        if self.layers is not None:
            metadata = {**metadata, "feature_layers": str(self.layers)}
        atomic_write(path, lambda tmp: save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(tmp),
                                                metadata))

    @classmethod
    def load(cls, path: str | Path) -> tuple[Classifier, dict[str, str]]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                t = {k: f.get_tensor(k) for k in f.keys()}
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: not a readable classifier ({e})", param="router") from None
        if set(t) != {"weight", "bias", "mean", "std"} or not (t["weight"].shape == t["mean"].shape == t["std"].shape):
            raise UserError(f"{path}: not a classifier written by `cairn router train`", param="router")
        layers = meta.get("feature_layers")
        if layers is not None and not layers.isdigit():
            raise UserError(f"{path}: feature_layers {layers!r} is not a block count", param="router")
        return cls(t["weight"], t["bias"][0], t["mean"], t["std"], None if layers is None else int(layers)), meta


def load_for(router_dir: str | Path, small_name: str, cfg) -> Classifier:
    """A learned router's classifier (router_dir/classifier.safetensors), checked against the ModelConfig `cfg` of
    the small model `small_name` that will feed it: as wide as its hidden states, no deeper than its blocks."""
    clf, _ = Classifier.load(Path(router_dir) / CLASSIFIER_FILE)
    want = 2 * cfg.hidden_size
    if clf.weight.shape[0] != want or (clf.layers or 0) > cfg.num_layers:
        raise UserError(f"router {router_dir} was trained on a small model with {clf.weight.shape[0] // 2}-wide "
                        f"hidden states (read after {clf.layers or 'all'} blocks), but {small_name} has "
                        f"{want // 2}-wide ones and {cfg.num_layers} blocks: a router file for other models; "
                        "retrain it with `cairn router train`", param="router")
    return clf


def _fit(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 100) -> Classifier:
    """Logistic regression of y (N,) in {0, 1} on x (N, D), L2 penalty l2 * |w|^2 / 2 on standardised features."""
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    prior = y.double().mean().clamp(1e-3, 1 - 1e-3)
    b = torch.log(prior / (1 - prior)).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.double()) + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return Classifier(w.detach().float(), b.detach().float(), mean.float(), std.float())


def log_loss(p: torch.Tensor, y: torch.Tensor) -> float:
    p = p.double().clamp(1e-6, 1 - 1e-6)
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def auc(scores: list[float], labels: list[int]) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative (ties half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def train(features: torch.Tensor, labels: list[int], folds: int = 5, seed: int = 0,
          grid: tuple[float, ...] = L2_GRID) -> tuple[Classifier, dict]:
    """The classifier with the L2 strength whose out-of-fold predictions rank best (cross-validated AUC: a
    router's curve depends only on how it ranks prompts; ties go to the lower log loss), refitted on all items,
    and a report (the chosen strength, each strength's cross-validated AUC and log loss)."""
    y = torch.tensor(labels, dtype=torch.float64)
    n = len(labels)
    if n < 2 * folds or len(set(labels)) < 2:
        raise UserError(f"training a router needs at least {2 * folds} items with both outcomes (the small model "
                        f"good enough on some, not on others); got {n} items, {sum(labels)} where it was",
                        param="data")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fold_of = torch.empty(n, dtype=torch.long)
    fold_of[order] = torch.arange(n) % folds
    losses, aucs = {}, {}
    for l2 in grid:
        p = torch.empty(n, dtype=torch.float64)
        for k in range(folds):
            held = fold_of == k
            p[held] = _fit(features[~held], y[~held], l2).prob(features[held]).double()
        losses[l2], aucs[l2] = log_loss(p, y), auc(p.tolist(), labels)
    best = max(grid, key=lambda v: (aucs[v], -losses[v]))
    report = {"l2": best, "cv_auc": aucs[best], "cv_auc_by_l2": {str(k): v for k, v in aucs.items()},
              "cv_log_loss": {str(k): v for k, v in losses.items()}, "items": n, "small_good": int(sum(labels))}
    return _fit(features, y, best), report
