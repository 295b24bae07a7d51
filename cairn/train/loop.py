"""The training loop shared by every recipe: a Trainer that owns model, optimizer and schedule and takes one
optimizer step at a time, and `train()` that runs it end to end (checks, progress, metrics, checkpoints, export).

Every piece of a step is a function of (config, step number, saved state), so a run resumed from a checkpoint
takes exactly the steps an uninterrupted run would: same batches, same learning rates, same dropout masks."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cairn.config import ModelConfig
from cairn.errors import UserError
from cairn.models.checkpoint import build_stage, copy_side_files, load_stage, save_checkpoint
from cairn.models.device import torch_device
from cairn.models.llama import TORCH_DTYPES, full_forward
from cairn.models.tokenizer import Tokenizer
from cairn.models.virtual import VirtualTokens, save_adapter
from cairn.train import lora
from cairn.train.config import TrainConfig
from cairn.train.data import Batch, Datasets, batches_per_epoch, build_datasets, collate, micro_batch_indices
from cairn.train.distill import distill_loss_sum
from cairn.train.losses import dpo_terms, lm_loss_sum, sequence_logprobs
from cairn.train.teacher import TeacherSignal, check_teacher, prompt_of, student_samples
from cairn.train.rundir import RunDir
from cairn.types import LayerRange


def lr_factor(step: int, cfg: TrainConfig, total: int) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based): linear warmup, then cosine/linear/constant
    decay to min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total - cfg.warmup_steps - 1)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1 - t
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def init_virtual(model, cfg: TrainConfig, tok: Tokenizer) -> VirtualTokens:
    """A fresh prompt- or prefix-tuning adapter: prompt embeddings from the text's token embeddings (repeated to
    fill) or, like prefix keys and values, small random values drawn with the run's seed."""
    kind, n = cfg.virtual
    vt = VirtualTokens(model.cfg, kind, n).to(next(model.parameters()).device)
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        if kind == "prompt" and cfg.prompt_init_text:
            ids = tok.encode(cfg.prompt_init_text) or [0]
            vt.embeddings.copy_(model.embed_tokens.weight[[ids[i % len(ids)] for i in range(n)]].float())
        else:
            for p in vt.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return vt.requires_grad_(True)


class Trainer:
    """Model, optimizer and schedule of one run; `step(i)` takes optimizer step i on its micro-batches."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, data: Datasets, total_steps: int,
                 tensors: dict[str, torch.Tensor] | None = None):
        """`tensors` (HF names) replace reading cfg.model from disk: how pool workers get the weights."""
        self.cfg, self.model_cfg, self.data, self.total = cfg, model_cfg, data, total_steps
        self.device = torch_device(cfg.device)
        self.autocast = resolve_precision(cfg.precision, self.device)
        torch.manual_seed(cfg.seed)
        if tensors is None:
            self.model = load_stage(cfg.model, model_cfg, dtype="float32", device=self.device)
        else:
            self.model = build_stage(model_cfg, LayerRange(0, model_cfg.num_layers), tensors, dtype="float32",
                                     device=self.device, source="the shipped weights")
        self.adapters: dict[str, lora.LoraLinear] = {}
        self.reference = None
        self.virtual = None
        if cfg.lora:
            self.adapters = lora.attach(self.model, self.lora_spec)
        elif cfg.virtual is not None:
            self.model.requires_grad_(False)
            self.virtual = self.model.virtual = init_virtual(self.model, cfg, Tokenizer.from_dir(cfg.model))
        else:
            if cfg.recipe == "dpo":
                self.reference = copy.deepcopy(self.model).eval()  # frozen
            self.model.requires_grad_(True)
        self.model.train()
        self.teacher = TeacherSignal(cfg, self.device, self.autocast) if cfg.recipe == "distill" else None
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        decay = [p for p in self.params.values() if p.ndim >= 2]
        no_decay = [p for p in self.params.values() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.adam_betas, eps=1e-8,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg, total_steps))
        self.step_count = 0
        self.tokens = 0

    @property
    def lora_spec(self) -> lora.LoraSpec:
        c = self.cfg
        return lora.LoraSpec(c.lora_rank, c.lora_alpha, c.lora_dropout, tuple(c.lora_targets))

    # --- one step --------------------------------------------------------------------------------------------

    def _micro_batches(self, step: int) -> list[list]:
        n, B, ga = len(self.data.train), self.cfg.batch_size, self.cfg.grad_accum
        return [[self.data.train[i] for i in micro_batch_indices(n, B, self.cfg.seed, step * ga + m)]
                for m in range(ga)]

    def _forward(self, batch: Batch) -> torch.Tensor:
        ids = batch.inputs.to(self.device)
        n = self.virtual.n if self.virtual is not None else 0
        if n:  # every sequence starts with the adapter's virtual tokens; their outputs predict nothing
            ids = torch.cat([torch.tensor(self.virtual.ids, device=self.device).expand(len(ids), n), ids], 1)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return full_forward(self.model, ids)[:, n:]

    def _dpo_logps(self, pairs: list) -> tuple[Batch, torch.Tensor, torch.Tensor]:
        """Policy and reference log-probabilities of [chosen..., rejected...] responses."""
        batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs])
        labels = batch.labels.to(self.device)
        policy = sequence_logprobs(self._forward(batch), labels)
        with torch.no_grad():
            if self.reference is not None:
                ids = batch.inputs.to(self.device)
                with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                    ref_logits = full_forward(self.reference, ids)
            else:  # LoRA: the base model is the reference
                lora.set_enabled(self.adapters, False)
                try:
                    ref_logits = self._forward(batch)
                finally:
                    lora.set_enabled(self.adapters, True)
            reference = sequence_logprobs(ref_logits, labels)
        return batch, policy, reference

    def backward(self, step: int | None = None) -> dict:
        """Forward and backward over one optimizer step's micro-batches (gradients left in .grad)."""
        micro = self._micro_batches(self.step_count if step is None else step)
        self.optimizer.zero_grad(set_to_none=True)
        out: dict = {}
        tokens = 0
        if self.cfg.recipe == "dpo":
            n_pairs = sum(len(m) for m in micro)
            terms: list[dict] = []
            for pairs in micro:
                batch, policy, ref = self._dpo_logps(pairs)
                k = len(pairs)
                t = dpo_terms(policy[:k], policy[k:], ref[:k], ref[k:], self.cfg.dpo_beta)
                (t["loss"].sum() / n_pairs).backward()
                terms.append(t)
                tokens += batch.tokens
            cat = {k: torch.cat([t[k] for t in terms]) for k in terms[0]}
            out.update(loss=cat["loss"].mean().item(), reward_margin=cat["margin"].mean().item(),
                       reward_accuracy=(cat["margin"] > 0).float().mean().item(),
                       chosen_reward=cat["chosen_reward"].mean().item(),
                       rejected_reward=cat["rejected_reward"].mean().item())
        elif self.cfg.recipe == "distill":
            out.update(self._distill_backward(micro))
            tokens = out.pop("tokens")
        else:
            batches = [collate(m) for m in micro]
            n_targets = sum(int((b.labels != -100).sum()) for b in batches)
            total = 0.0
            for b in batches:
                loss = lm_loss_sum(self._forward(b), b.labels.to(self.device)) / max(n_targets, 1)
                loss.backward()
                total += loss.item()
                tokens += b.tokens
            out["loss"] = total
        out["step_tokens"] = tokens
        return out

    def _on_policy(self, step: int, m: int) -> bool:
        """Whether micro-batch m of step `step` is on-policy: a seeded draw, so a resumed run draws the same."""
        if not self.cfg.on_policy:
            return False
        g = torch.Generator().manual_seed(self.cfg.seed * 1000003 + step * self.cfg.grad_accum + m)
        return torch.rand((), generator=g).item() < self.cfg.on_policy

    def _distill_backward(self, micro: list[list]) -> dict:
        """alpha x CE + (1 - alpha) x KD on the data's targets; on an on-policy micro-batch, KD alone on the tokens
        the student wrote from the data's prompts."""
        c, step = self.cfg, self.step_count
        examples = []
        for m, exs in enumerate(micro):
            if self._on_policy(step, m):
                g = torch.Generator().manual_seed(c.seed * 7919 + step * c.grad_accum + m)
                exs = student_samples(self.model, [prompt_of(e) for e in exs], c.on_policy_tokens,
                                      self.model_cfg.eos_token_ids, c.seq_len + 1, g, self.device) or exs
                examples.append((exs, 0.0))
            else:
                examples.append((exs, c.distill_alpha))
        batches = [(collate(exs), exs, alpha) for exs, alpha in examples]
        n_targets = max(1, sum(int((b.labels != -100).sum()) for b, _, _ in batches))
        total, parts, tokens = 0.0, {"ce": 0.0, "kd": 0.0}, 0
        for b, exs, alpha in batches:
            labels = b.labels.to(self.device)
            teacher = self.teacher.for_batch(b, exs, self.model_cfg.vocab_size) if alpha < 1 else None
            loss, p = distill_loss_sum(self._forward(b), teacher, labels, alpha, c.distill_loss,
                                       c.distill_temperature, c.distill_beta)
            (loss / n_targets).backward()
            total += loss.item() / n_targets
            for k, v in p.items():
                parts[k] += v / n_targets
            tokens += b.tokens
        return {"loss": total, **parts, "tokens": tokens}

    def apply(self) -> dict:
        """Clip the gradients in .grad and take the optimizer and schedule step."""
        max_norm = self.cfg.clip_grad if self.cfg.clip_grad > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), max_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        return {"lr": lr, "grad_norm": float(grad_norm), "step": self.step_count}

    def seek(self, step: int) -> None:
        """Continue from optimizer step `step` of the schedule and data order (a pool worker that joins mid-run
        or restarts after a resume); optimizer moments start fresh."""
        self.step_count = step
        self.scheduler.last_epoch = step
        lrs = [base * lr_factor(step, self.cfg, self.total) for base in self.scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs

    def step(self) -> dict:
        """Take the next optimizer step; returns its metrics."""
        t0 = time.perf_counter()
        out = self.backward()
        out.update(self.apply())
        self.tokens += out["step_tokens"]
        dt = time.perf_counter() - t0
        out.update(tokens=self.tokens, tokens_per_s=out["step_tokens"] / dt if dt > 0 else 0.0)
        return out

    # --- eval ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss (and for dpo: reward margin and accuracy), in eval mode."""
        if not self.data.eval:
            return {}
        self.model.eval()
        try:
            B, ev = self.cfg.batch_size, self.data.eval
            if self.cfg.recipe == "dpo":
                losses, margins = [], []
                for i in range(0, len(ev), B):
                    pairs = ev[i : i + B]
                    _, policy, ref = self._dpo_logps(pairs)
                    t = dpo_terms(policy[: len(pairs)], policy[len(pairs):], ref[: len(pairs)], ref[len(pairs):],
                                  self.cfg.dpo_beta)
                    losses.append(t["loss"])
                    margins.append(t["margin"])
                m = torch.cat(margins)
                return {"eval_loss": torch.cat(losses).mean().item(), "eval_reward_margin": m.mean().item(),
                        "eval_reward_accuracy": (m > 0).float().mean().item()}
            total, kd, count = 0.0, 0.0, 0
            for i in range(0, len(ev), B):
                b = collate(ev[i : i + B])
                logits, labels = self._forward(b), b.labels.to(self.device)
                total += lm_loss_sum(logits, labels).item()
                if self.teacher is not None:
                    teacher = self.teacher.for_batch(b, ev[i : i + B], self.model_cfg.vocab_size)
                    kd += distill_loss_sum(logits, teacher, labels, 0.0, self.cfg.distill_loss,
                                           self.cfg.distill_temperature, self.cfg.distill_beta)[1]["kd"]
                count += int((b.labels != -100).sum())
            out = {"eval_loss": total / max(count, 1)}
            if self.teacher is not None:
                out["eval_kd"] = kd / max(count, 1)
            return out
        finally:
            self.model.train()

    # --- output ----------------------------------------------------------------------------------------------

    def export(self, out: Path, metadata: dict) -> None:
        """The final HF checkpoint in `out` (merged under LoRA, with the adapter in out/adapter); a prompt- or
        prefix-tuning adapter alone in out/adapter (served as it is: `--adapter`)."""
        if self.virtual is not None:
            adapter_dir = out / "adapter"
            save_adapter(adapter_dir, self.virtual, self.model_cfg, str(self.cfg.model), self.cfg.prompt_init_text)
            copy_side_files(Path(self.cfg.model), adapter_dir)
            return
        if self.adapters:
            adapter_dir = out / "adapter"
            lora.save_adapter(adapter_dir, lora.adapter_state(self.model, self.adapters), self.lora_spec, self.cfg.model)
            copy_side_files(Path(self.cfg.model), adapter_dir)
            if self.cfg.lora_merge:
                lora.merge_to_checkpoint(self.cfg.model, adapter_dir, out, metadata)
            return
        stage = copy.deepcopy(self.model).to(TORCH_DTYPES[self.model_cfg.dtype]).cpu()
        save_checkpoint(stage, out, metadata=metadata)
        copy_side_files(Path(self.cfg.model), out)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    train_loss: float
    eval: dict
    out: Path
    warnings: list[str]


def prepare(cfg: TrainConfig) -> tuple[TrainConfig, ModelConfig, Tokenizer, Datasets, int]:
    """Every check that can fail on user input, before any compute: model, tokenizer, data, steps."""
    model_cfg = ModelConfig.from_hf_dir(cfg.model)
    tok = Tokenizer.from_dir(cfg.model)
    if tok.vocab_size > model_cfg.vocab_size:
        raise UserError(f"the tokenizer in {cfg.model} has {tok.vocab_size} tokens but the model's embedding has "
                        f"{model_cfg.vocab_size} rows; they must come from the same checkpoint")
    if cfg.seq_len > model_cfg.max_position_embeddings:
        cfg = replace(cfg, seq_len=model_cfg.max_position_embeddings)
    torch_device(cfg.device)
    data = build_datasets(cfg, tok, model_cfg.eos_token_ids)
    if cfg.recipe == "distill":
        check_teacher(cfg, tok, data.train + data.eval)
    per_epoch = batches_per_epoch(len(data.train), cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    return cfg, model_cfg, tok, data, total


def train(cfg: TrainConfig, on_step: Callable[[dict], None] | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Run a recipe end to end; see TrainConfig for every option. `on_step` sees each step's metrics."""
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg, model_cfg, _, data, total = prepare(cfg)
    run = RunDir(cfg, log)
    latest = run.resume_point()
    for w in data.stats.warnings:
        log(f"warning: {w}")
    trainer = Trainer(cfg, model_cfg, data, total)
    run.resume(trainer, latest)
    if latest is not None:
        log(f"resumed from {latest} (step {trainer.step_count} of {total})")
    log(f"{cfg.recipe}: {len(data.train)} train / {len(data.eval)} eval examples, {total} steps of "
        f"{cfg.batch_size}x{cfg.grad_accum} at seq_len {cfg.seq_len}, "
        f"{sum(p.numel() for p in trainer.params.values()) / 1e6:.2f}M trainable parameters"
        f"{f' (LoRA r={cfg.lora_rank})' if cfg.lora else ''}")
    t0 = time.perf_counter()
    last: dict = {"loss": float("nan")}
    ev: dict = {}
    bar = tqdm(total=total, initial=trainer.step_count, disable=not cfg.progress, unit="step", dynamic_ncols=True)
    with run:
        while trainer.step_count < total:
            last = trainer.step()
            s = last["step"]
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            if s % cfg.log_every == 0 or s == total:
                run.record(last)
            if cfg.eval_every and s % cfg.eval_every == 0 and s < total:
                ev = trainer.evaluate()
                if ev:
                    run.record({"step": s, **ev})
                    bar.write(f"step {s}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
            if cfg.save_every and s % cfg.save_every == 0 and s < total:
                run.save(trainer)
            if on_step is not None:
                on_step(last)
        ev = trainer.evaluate()
        if ev:
            run.record({"step": trainer.step_count, **ev})
    bar.close()
    run.finish(trainer, {"recipe": cfg.recipe, "steps": trainer.step_count, "tokens": trainer.tokens,
                         "base": str(cfg.model)})
    secs = time.perf_counter() - t0
    result = TrainResult(trainer.step_count, trainer.tokens, secs, last["loss"], ev, run.out, data.stats.warnings)
    log(f"done: {result.steps} steps, {result.tokens} tokens in {secs:.1f}s, train loss {result.train_loss:.4f}"
        + "".join(f", {k} {v:.4f}" for k, v in ev.items()) + f"; wrote {run.out}")
    return result
