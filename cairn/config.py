"""Frozen configuration dataclasses. No torch import here: configs are plain data, read once, passed down."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cairn.errors import ModelLoadError, UnsupportedModelError, UserError
from cairn.types import DType

SUPPORTED_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_DTYPES = {"float32", "bfloat16", "float16"}


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling as HF configs spell it (rope_scaling / rope_parameters)."""

    kind: str = "default"
    """'default', 'linear' or 'llama3'."""
    factor: float = 1.0
    """Context extension factor."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths longer than original_max / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths shorter than original_max / high_freq_factor are left alone."""
    original_max_position_embeddings: int = 8192
    """llama3: the context the base frequencies were trained for."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder, read from a Hugging Face config.json."""

    arch: str
    """Model family: 'llama', 'mistral' or 'qwen2' (HF model_type)."""
    vocab_size: int
    """Rows of the embedding matrix."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the gated MLP."""
    num_layers: int
    """Number of decoder blocks."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention when fewer than num_heads)."""
    head_dim: int
    """Width of one head."""
    max_position_embeddings: int
    """Longest context the model was built for."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside RMSNorm."""
    rope_theta: float = 10000.0
    """Rotary base."""
    rope_scaling: RopeScaling | None = None
    """Rotary scaling, None for plain RoPE."""
    tie_word_embeddings: bool = False
    """Head shares the embedding matrix."""
    qkv_bias: bool = False
    """Bias on q/k/v projections (Qwen2 always; Llama with attention_bias)."""
    o_bias: bool = False
    """Bias on the output projection (Llama attention_bias)."""
    mlp_bias: bool = False
    """Bias on MLP projections (Llama mlp_bias)."""
    sliding_window: int | None = None
    """Attend to at most this many previous positions (Mistral; Qwen2 when use_sliding_window)."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token id."""
    eos_token_ids: tuple[int, ...] = ()
    """Token ids that end generation."""
    dtype: DType = "float32"
    """Dtype the weights are stored in."""
    raw: dict = field(default_factory=dict, compare=False, repr=False)
    """The config.json as read, so saving keeps keys cairn does not interpret."""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def param_count(self) -> int:
        """Number of parameters (embedding counted once when tied)."""
        d, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        per_layer = d * (self.q_size + 2 * self.kv_size) + self.q_size * d + 3 * d * f + 2 * d
        per_layer += (self.q_size + 2 * self.kv_size) * self.qkv_bias + d * self.o_bias + (2 * f + d) * self.mlp_bias
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + L * per_layer + d + head

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        arch = cfg.get("model_type")
        if arch not in SUPPORTED_ARCHS:
            names = cfg.get("architectures") or [arch]
            raise UnsupportedModelError(
                f"unsupported architecture {names[0]!r} (model_type {arch!r}); cairn runs "
                f"{', '.join(SUPPORTED_ARCHS.values())}"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {act!r}: Llama-family models use 'silu'")
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            head_dim = cfg.get("head_dim") or hidden // heads
            rope_params = cfg.get("rope_parameters") or {}
            theta = float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
            sliding = cfg.get("sliding_window")
            if arch == "qwen2" and not cfg.get("use_sliding_window", False):
                sliding = None
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
            if dtype not in _DTYPES:
                raise UnsupportedModelError(f"unsupported weight dtype {dtype!r}; use one of {sorted(_DTYPES)}")
            return cls(
                arch=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if arch == "qwen2" else 1e-5)),
                rope_theta=theta,
                rope_scaling=_parse_rope_scaling(cfg.get("rope_scaling") or rope_params),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
                o_bias=arch == "llama" and bool(cfg.get("attention_bias", False)),
                mlp_bias=arch == "llama" and bool(cfg.get("mlp_bias", False)),
                sliding_window=int(sliding) if sliding else None,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                dtype=dtype,
                raw=dict(cfg),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"config.json is missing or has a bad value for {e}") from None

    @classmethod
    def from_hf_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise ModelLoadError(f"model directory {str(model_dir)!r} does not exist")
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing: a model directory needs a Hugging Face config.json")
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{path} must hold a JSON object")
        return cls.from_hf_dict(cfg)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents in the classic HF spelling, keeping any keys cairn did not interpret."""
        out = {k: v for k, v in self.raw.items() if k not in ("rope_parameters", "dtype")}
        out.update(
            architectures=[SUPPORTED_ARCHS[self.arch]],
            model_type=self.arch,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=_rope_scaling_dict(self.rope_scaling),
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            torch_dtype=self.dtype,
        )
        if self.arch == "llama":
            out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.arch == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.arch == "qwen2":
            out["use_sliding_window"] = self.sliding_window is not None
            out["sliding_window"] = self.sliding_window
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            out["eos_token_id"] = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        return out

    def with_dtype(self, dtype: DType) -> "ModelConfig":
        return replace(self, dtype=dtype)


def _parse_rope_scaling(d: dict | None) -> RopeScaling | None:
    if not d:
        return None
    kind = d.get("rope_type") or d.get("type") or "default"
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise UnsupportedModelError(f"unsupported rope scaling {kind!r}; cairn implements 'linear' and 'llama3'")
    return RopeScaling(
        kind=kind,
        factor=float(d.get("factor", 1.0)),
        low_freq_factor=float(d.get("low_freq_factor", 1.0)),
        high_freq_factor=float(d.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
    )


def _rope_scaling_dict(r: RopeScaling | None) -> dict | None:
    if r is None:
        return None
    if r.kind == "linear":
        return {"rope_type": "linear", "factor": r.factor}
    return {
        "rope_type": "llama3",
        "factor": r.factor,
        "low_freq_factor": r.low_freq_factor,
        "high_freq_factor": r.high_freq_factor,
        "original_max_position_embeddings": r.original_max_position_embeddings,
    }


def rope_inv_freq(cfg: ModelConfig) -> list[float]:
    """Per-pair rotary frequencies after scaling (pure; float64 here, cast by the caller)."""
    hd = cfg.head_dim
    inv = [1.0 / (cfg.rope_theta ** (i / hd)) for i in range(0, hd, 2)]
    r = cfg.rope_scaling
    if r is None:
        return inv
    if r.kind == "linear":
        return [f / r.factor for f in inv]
    low_wavelen = r.original_max_position_embeddings / r.low_freq_factor
    high_wavelen = r.original_max_position_embeddings / r.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / r.factor)
        else:
            smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor) / (
                r.high_freq_factor - r.low_freq_factor
            )
            out.append((1 - smooth) * f / r.factor + smooth * f)
    return out


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_tokens: int | None = 128
    """Most tokens to generate; None fills the context."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top one."""
    seed: int | None = None
    """Same seed, same prompt, same output."""
    repetition_penalty: float = 1.0
    """Divide positive (multiply negative) logits of tokens already seen (prompt and output)."""
    presence_penalty: float = 0.0
    """Subtract from logits of tokens already generated."""
    frequency_penalty: float = 0.0
    """Subtract count x this from logits of generated tokens."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; not included in the text."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation, besides the model's end-of-sequence tokens."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens."""
    logprobs: int | None = None
    """Return the chosen token's logprob, plus this many top alternatives."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias in [-100, 100]) pairs added to the model's logits before any penalty, filter or choice."""

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (self.temperature >= 0 and math.isfinite(self.temperature), "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 disables it)"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            (all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias), "logit_bias",
             "must map token ids >= 0 to biases in [-100, 100]"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise UserError(f"{name} {why}, got {getattr(self, name)!r}", param=name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model: device, precision, memory for the KV cache, batching limits."""

    device: str = "cpu"
    """'cpu', 'cuda' or 'cuda:N'."""
    dtype: DType | None = None
    """Compute dtype; None keeps the checkpoint's (fp16 becomes fp32 on CPU)."""
    max_seqs: int = 16
    """Sequences decoded together (KV-cache slots)."""
    max_context: int | None = None
    """Longest sequence (prompt + output); None uses the model's max_position_embeddings, capped at 4096."""
    max_batch_tokens: int = 256
    """Tokens processed in one step; long prompts are prefilled in chunks of at most this."""
    threads: int | None = None
    """torch CPU threads; None leaves torch's default."""
    max_queue: int = 1024
    """Requests allowed to wait for a slot before submit refuses more."""
    kv_memory: int | None = None
    """Bytes for the KV cache (all layers); None: what the device has left after the weights (on CPU, half of the
    available memory), at most what max_seqs sequences of max_context positions need. On CPU only the blocks in use
    are backed by memory."""
    block_size: int = 16
    """Positions per KV-cache block."""
    prefix_caching: bool = True
    """Keep the blocks of computed prompt prefixes and reuse them for later requests that start the same way."""
    draft: str | None = None
    """Speculative decoding: 'ngram' proposes the tokens that followed the latest earlier occurrence of the last few
    tokens (prompt lookup); a model directory proposes with that (smaller) model, which must share the tokenizer.
    The model verifies the proposals in one forward and keeps its own choices, so the output is unchanged.
    None: off."""
    draft_max: int = 8
    """Most tokens proposed at once (the number adapts to how often proposals are accepted)."""
    adapter: str | None = None
    """A prompt- or prefix-tuning adapter directory (PEFT layout) served as it is, without merging: its virtual
    tokens go in front of every prompt (computed once, then reused from the prefix cache)."""
