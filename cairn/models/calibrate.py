"""Calibrated quantization: the model is run on a small text sample and the integers are chosen with its
activations in view. Two methods, each a transformation of the float state dict into a quantized one:

- awq (activation-aware scaling, after Lin et al. 2023): for each group of matrices that read the same input
  (q/k/v after the attention norm, gate/up after the MLP norm, down after up), input channels that carry large
  activations are scaled up before rounding, s = mean|x|^a / norm, with the inverse folded into the op that feeds
  them (the norm's weight, up_proj's rows), so the float model computes the same function. `a` is searched on a
  grid for the least output error ||x W^T - (x/s) Q(W s)^T||^2 of the quantized group. o_proj is scaled through
  v_proj only when every query head has its own value head (no grouped-query attention). Then round to nearest.
- gptq (error-compensating rounding, after Frantar et al. 2022): columns are rounded one at a time and the rounding
  error of each is spread over the columns not yet rounded, weighted by the inverse of H = X^T X (the input's
  second moment over the calibration tokens, dampened by 1% of its mean diagonal). Groups take their scale and
  zero point from the weights as updated when the group is reached. Blocks are quantized in order, each seeing the
  outputs of the blocks already quantized; the head (the embedding, when tied) last, on the final norm's output.

Calibration text: --calibration FILE (text, or JSONL with "text"), default the English text cairn ships
(cairn/models/corpus.py), cut into `samples` sequences of `seq_len` tokens. Never the evaluation text.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from cairn.config import ModelConfig
from cairn.errors import UserError
from cairn.models import quantized
from cairn.models.checkpoint import _hf_names, build_stage, read_tensors, stage_tensor_names, to_hf_state_dict
from cairn.models.llama import CausalContext, LlamaStage
from cairn.models.quantized import QuantConfig
from cairn.quant.weights import (
    SCALE_DTYPES,
    QuantFormat,
    QuantizedWeight,
    dequantize,
    fake_quantize,
    int4_params,
    pack_int4,
    quantize,
)
from cairn.types import LayerRange

SEQ_LEN = 256
AWQ_GRID = 20
AWQ_TOKENS = 512
"""Calibration rows the AWQ search evaluates its output error on (all rows enter the activation means)."""
GPTQ_DAMP = 0.01
GPTQ_BLOCK = 128


def calibration_ids(model_dir: Path, calibration: str | None, samples: int, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """(samples, seq_len) token ids: the calibration text tokenized as one stream (documents separated by the end
    of sequence token), cut into evenly spaced windows."""
    from cairn.models.tokenizer import Tokenizer

    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}", param="samples")
    if calibration is None:
        from cairn.models.corpus import shipped_corpus

        docs = shipped_corpus()
    else:
        docs = _read_docs(Path(calibration))
    tok = Tokenizer.from_dir(model_dir)
    sep = tok.token_id(tok.eos_token) if tok.eos_token is not None else None
    stream: list[int] = []
    for d in docs:
        stream.extend(tok.encode(d))
        if sep is not None:
            stream.append(sep)
    if len(stream) < seq_len:
        raise UserError(f"the calibration text has {len(stream)} tokens; it needs at least {seq_len}",
                        param="calibration")
    n = min(samples, len(stream) // seq_len)
    step = (len(stream) - seq_len) // max(n - 1, 1)
    return torch.tensor([stream[i * step : i * step + seq_len] for i in range(n)])  # (S, T)


def _read_docs(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"calibration file {path} does not exist", param="calibration")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return [text]
    docs = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                docs.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{i}: expected a JSON object with a \"text\" field") from None
    return docs


# ----- GPTQ: one matrix


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, fmt: QuantFormat, damp: float = GPTQ_DAMP,
                  block: int = GPTQ_BLOCK) -> QuantizedWeight:
    """Quantize w (N, K) column by column, compensating each column's rounding error on the columns after it
    through the inverse Hessian of h (K, K) = sum of x x^T over the calibration inputs."""
    W = w.detach().clone().float()
    N, K = W.shape
    H = h.detach().clone().double()
    dead = torch.diag(H) == 0  # inputs that never fire: their columns cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()  # upper Cholesky of H^-1
    sdt = SCALE_DTYPES[fmt.scale_dtype]
    g = fmt.group_size or K
    codes = torch.empty(N, K, dtype=torch.int16)
    if fmt.bits == 8:
        scales = (W.abs().amax(dim=1) / 127).to(sdt)  # (N,) from the whole row, before any update
        s, z = scales.float().clamp(min=torch.finfo(torch.float32).tiny), None
        zeros = None
    else:
        scales = torch.empty(N, K // g, dtype=sdt)
        zeros = None if fmt.symmetric else torch.empty(N, K // g, dtype=sdt)
        s = z = None  # set at each group's first column
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1), Hinv[i1:i2, i1:i2]
        with _one_thread(N * (i2 - i1) < 1 << 20):  # ~15 small ops per column: threads only add overhead
            _gptq_columns(W, W1, Err1, Hinv1, i1, fmt, g, sdt, codes, scales, zeros, s, z)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if fmt.bits == 8:
        return QuantizedWeight(8, None, codes.to(torch.int8), scales)
    return QuantizedWeight(4, g, pack_int4(codes.to(torch.uint8)), scales, zeros)


class _one_thread:
    """torch on one thread inside the block (restored after), when `on`."""

    def __init__(self, on: bool):
        self.on, self.saved = on, torch.get_num_threads()

    def __enter__(self):
        if self.on:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def _gptq_columns(W, W1, Err1, Hinv1, i1, fmt, g, sdt, codes, scales, zeros, s, z) -> None:
    """The columns of one block, in order: round, record, push the error onto the block's later columns. Blocks
    start on a group boundary (the block width is a multiple of every group size)."""
    lo, hi = (-127, 127) if fmt.bits == 8 else (0, 15)
    mid = 0 if fmt.bits == 8 else 8
    for i in range(W1.shape[1]):
        col = i1 + i
        if fmt.bits == 4 and col % g == 0:  # a new group: its parameters from the weights as they are now
            sc, zc = int4_params(_group(W1, W, i, i1, g), g, fmt.symmetric, sdt)
            scales[:, col // g] = sc[:, 0]
            if zeros is not None:
                zeros[:, col // g] = zc[:, 0]
            s = sc.float()[:, 0]
            z = torch.zeros_like(s) if zc is None else zc.float()[:, 0]
            flat = s == 0  # a constant group: every value is the zero point
            s = torch.where(flat, torch.ones_like(s), s)
        x = W1[:, i]
        c = torch.round((x - z) / s if z is not None else x / s).add_(mid).clamp_(lo, hi)
        q = (c - mid).mul_(s)
        if z is not None:
            q = torch.where(flat, z, q.add_(z))
        codes[:, col] = c.to(torch.int16)
        err = (x - q).div_(Hinv1[i, i])
        W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
        Err1[:, i] = err


def _group(W1: torch.Tensor, W: torch.Tensor, i: int, i1: int, g: int) -> torch.Tensor:
    """The current weights of the group starting at block column i (inside the block, or reaching past it)."""
    inside = W1[:, i : i + g]
    if inside.shape[1] == g:
        return inside
    return torch.cat([inside, W[:, i1 + W1.shape[1] : i1 + i + g]], 1)


# ----- AWQ: one group of matrices


def awq_scales(x: torch.Tensor, weights: list[torch.Tensor], fmt: QuantFormat, grid: int = AWQ_GRID,
               rows: int = AWQ_TOKENS) -> tuple[torch.Tensor, float]:
    """Per-input-channel scales s (K,) for matrices that read x (n, K), and the exponent chosen."""
    mean = x.abs().mean(dim=0)  # (K,)
    sub = x[torch.linspace(0, x.shape[0] - 1, min(rows, x.shape[0])).long()]  # (n', K)
    with _one_thread(sum(w.numel() for w in weights) < 1 << 20):  # small matrices: threads only add overhead
        return _awq_search(mean, sub, weights, fmt, grid)


def _awq_search(mean: torch.Tensor, sub: torch.Tensor, weights: list[torch.Tensor], fmt: QuantFormat,
                grid: int) -> tuple[torch.Tensor, float]:
    refs = [sub @ w.T for w in weights]
    best, best_s, best_a = float("inf"), torch.ones_like(mean), 0.0
    for j in range(grid):
        a = j / grid
        s = mean.pow(a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for w, ref in zip(weights, refs):
            wq = fake_quantize(w * s, fmt)  # (N, K): Q(W s)
            loss += float(((sub / s) @ wq.T - ref).pow(2).mean())
        if loss < best:
            best, best_s, best_a = loss, s, a
    return best_s, best_a


# ----- the model


class _Inputs:
    """Forward pre-hooks that collect what a block's linear layers read: x^T x sums (gptq) or the rows (awq)."""

    def __init__(self, block: nn.Module, keep_rows: bool):
        self.keep_rows = keep_rows
        self.h: dict[str, torch.Tensor] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            mod = block.get_submodule(name)
            if isinstance(mod, nn.Linear):
                self.handles.append(mod.register_forward_pre_hook(lambda m, args, n=name: self._take(n, args[0])))

    def _take(self, name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, K)
        if self.keep_rows:
            self.rows.setdefault(name, []).append(x)
        else:
            self.h[name] = self.h.get(name, 0) + x.T @ x

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def calibrated_tensors(model_dir: Path, cfg: ModelConfig, qc: QuantConfig, calibration: str | None, samples: int,
                       progress: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Step one of a calibrated `cairn quantize`: the stored tensors of the quantized checkpoint (and details of
    the calibration for its config)."""
    ids = calibration_ids(model_dir, calibration, samples)
    names = stage_tensor_names(cfg, LayerRange(0, cfg.num_layers))
    tensors = read_tensors(model_dir, names)
    float_dtypes = {n: t.dtype for n, t in tensors.items()}
    stage = build_stage(cfg, LayerRange(0, cfg.num_layers), tensors, dtype="float32")
    del tensors
    fused_sources = _hf_names(cfg, LayerRange(0, cfg.num_layers), True, True)
    qweights: dict[str, QuantizedWeight] = {}  # HF name -> gptq result
    S, T = ids.shape
    ctx = CausalContext(cfg, S, T, "cpu")
    chosen: list[float] = []
    with torch.no_grad():
        x = stage.embed_tokens(ids)  # (S, T, D)
        for i, block in enumerate(tqdm(stage.layers, desc=f"calibrating ({qc.method})", unit="layer",
                                       disable=not progress)):
            hooks = _Inputs(block, keep_rows=qc.method == "awq")
            out = block(x, ctx)
            hooks.close()
            if qc.method == "awq":  # scaling keeps the block's function: its output stays the next input
                chosen += _awq_block(cfg, block, hooks.rows, i, qc)
                x = out
                continue
            for name, h in hooks.h.items():
                sources = fused_sources[f"layers.{i}.{name}.weight"]
                if quantized.is_quantized(qc, sources[0]):
                    mod = block.get_submodule(name)
                    qw = gptq_quantize(mod.weight, h, qc.fmt)
                    mod.weight.copy_(dequantize(qw))  # later blocks see this block quantized
                    qweights.update(_split_rows(cfg, sources, qw))
            x = block(x, ctx)
        if qc.method == "gptq":
            _gptq_head(cfg, stage, x, qc, qweights)
    state = to_hf_state_dict(stage)
    stored: dict[str, torch.Tensor] = {}
    for n in names:
        if n in qweights:
            stored.update(quantized.to_tensors(n, qweights[n]))
        elif quantized.is_quantized(qc, n):
            stored.update(quantized.to_tensors(n, quantize(state[n].float(), qc.fmt, n)))
        else:
            stored[n] = state[n].detach().to(float_dtypes[n]).contiguous()
    details = {"calibration": "built-in" if calibration is None else Path(calibration).name, "samples": S,
               "seq_len": T}
    if qc.method == "awq":
        details["awq_grid"] = AWQ_GRID
        details["awq_mean_exponent"] = round(sum(chosen) / max(len(chosen), 1), 3)
    else:
        details["gptq_damp"] = GPTQ_DAMP
    return stored, details


def _split_rows(cfg: ModelConfig, sources: list[str], qw: QuantizedWeight) -> dict[str, QuantizedWeight]:
    """A fused QuantizedWeight back into its HF matrices (rows q, k, v or gate, up)."""
    if len(sources) == 1:
        return {sources[0]: qw}
    sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size] if len(sources) == 3 else [cfg.intermediate_size] * 2
    parts = zip(qw.qweight.split(sizes), qw.scales.split(sizes),
                qw.zeros.split(sizes) if qw.zeros is not None else [None] * len(sizes))
    return {n: QuantizedWeight(qw.bits, qw.group_size, q, s, z) for n, (q, s, z) in zip(sources, parts)}


def _awq_block(cfg: ModelConfig, block: nn.Module, rows: dict[str, list[torch.Tensor]], i: int,
               qc: QuantConfig) -> list[float]:
    """Scale block i's groups in place (the float function unchanged); returns the exponents chosen."""
    prefix = f"model.layers.{i}."
    attn, mlp = block.self_attn, block.mlp
    f = cfg.intermediate_size
    chosen = []

    def quantized_(*names: str) -> bool:
        return all(quantized.is_quantized(qc, prefix + n + ".weight") for n in names)

    def x_of(name: str) -> torch.Tensor:
        return torch.cat(rows[name], 0)

    if quantized_("self_attn.q_proj") and "self_attn.qkv_proj" in rows:
        s, a = awq_scales(x_of("self_attn.qkv_proj"), [attn.qkv_proj.weight], qc.fmt)
        block.input_layernorm.weight.div_(s)
        attn.qkv_proj.weight.mul_(s)
        chosen.append(a)
    if quantized_("mlp.gate_proj") and "mlp.gate_up_proj" in rows:
        s, a = awq_scales(x_of("mlp.gate_up_proj"), [mlp.gate_up_proj.weight], qc.fmt)
        block.post_attention_layernorm.weight.div_(s)
        mlp.gate_up_proj.weight.mul_(s)
        chosen.append(a)
    if quantized_("mlp.down_proj") and "mlp.down_proj" in rows and not (cfg.mlp_bias):
        s, a = awq_scales(x_of("mlp.down_proj"), [mlp.down_proj.weight], qc.fmt)
        mlp.gate_up_proj.weight[f:].div_(s[:, None])  # up's rows feed down's columns
        mlp.down_proj.weight.mul_(s)
        chosen.append(a)
    if (quantized_("self_attn.o_proj") and "self_attn.o_proj" in rows and cfg.num_heads == cfg.num_kv_heads
            and not cfg.qkv_bias):
        s, a = awq_scales(x_of("self_attn.o_proj"), [attn.o_proj.weight], qc.fmt)
        attn.qkv_proj.weight[cfg.q_size + cfg.kv_size :].div_(s[:, None])  # v's rows feed o's columns
        attn.o_proj.weight.mul_(s)
        chosen.append(a)
    return chosen


def _gptq_head(cfg: ModelConfig, stage: LlamaStage, x: torch.Tensor, qc: QuantConfig,
               qweights: dict[str, QuantizedWeight]) -> None:
    """GPTQ on the head (the embedding when tied), reading the final norm's output."""
    name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    if not quantized.is_quantized(qc, name):
        return
    h = stage.norm(x).reshape(-1, cfg.hidden_size).float()  # (tokens, D)
    qweights[name] = gptq_quantize(stage.lm_head.weight, h.T @ h, qc.fmt)
