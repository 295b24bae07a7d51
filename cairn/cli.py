"""The `cairn` command: one table from command name to a typed function; `--help` is the function's docstring.

User mistakes exit with code 2 and a one-line reason on stderr, never a traceback. The environment is read here
and nowhere deeper."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cairn.errors import CairnError, UserError


def init_model(out_dir: str, shape: str = "tiny", arch: str = "llama", seed: int = 0, corpus: str | None = None,
               dtype: str = "float32", teacher: str | None = None, layers: int | None = None, select: str = "even",
               width_from: str | None = None) -> int:
    """Write a randomly initialised model in Hugging Face layout (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json with a chat template, generation_config.json). The byte-level BPE tokenizer is trained
    on --corpus (a text file, or JSONL with a "text" field) or on a small text cairn ships. With --from TEACHER
    --layers N: a student that keeps N of the teacher's layers (--select even, or importance: the N that turn the
    hidden state most on --corpus); with --width-from TEACHER --layers N: random weights of the teacher's width,
    its tokenizer and chat template."""
    from cairn.models.init import init_model as run

    texts = None
    if corpus is not None:
        texts = _read_corpus(Path(corpus))
    if teacher is not None or width_from is not None:
        return _student(out_dir, teacher, width_from, layers, select, texts, seed)
    if layers is not None:
        raise UserError("--layers needs --from TEACHER or --width-from TEACHER", param="layers")
    t0 = time.perf_counter()
    cfg = run(out_dir, shape=shape, arch=arch, seed=seed, corpus=texts, dtype=dtype)
    print(f"wrote {arch} {shape} ({cfg.param_count() / 1e6:.1f}M parameters, {cfg.num_layers} layers, "
          f"vocab {cfg.vocab_size}) to {out_dir} in {time.perf_counter() - t0:.1f}s")
    return 0


def _student(out_dir: str, teacher: str | None, width_from: str | None, layers: int | None, select: str,
             texts: list[str] | None, seed: int) -> int:
    from cairn.models.corpus import shipped_corpus
    from cairn.models.student import make_student

    if teacher is not None and width_from is not None:
        raise UserError("give --from (copy the teacher's layers) or --width-from (random weights), not both",
                        param="width_from")
    if layers is None:
        raise UserError("--layers N is required with --from / --width-from", param="layers")
    src = _model(teacher or width_from)
    if select == "importance" and texts is None:
        texts = shipped_corpus(400)
    t0 = time.perf_counter()
    cfg, kept = make_student(src, out_dir, layers, select, texts, random_init=width_from is not None, seed=seed)
    what = f"layers {kept} of" if kept else "random weights in the shape of"
    print(f"wrote a {cfg.num_layers}-layer student ({cfg.param_count() / 1e6:.1f}M parameters; {what} "
          f"{teacher or width_from}) to {out_dir} in {time.perf_counter() - t0:.1f}s")
    return 0


def _read_corpus(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"corpus file {path} does not exist")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{i}: expected a JSON object with a \"text\" field") from None
        lines = texts
    texts = [t for t in lines if t.strip()]
    if not texts:
        raise UserError(f"corpus file {path} holds no text")
    return texts


def tokenizer_train(corpus: list[str], vocab_size: int, out: str) -> int:
    """Train a byte-level BPE tokenizer on text files (or .jsonl with a "text" field) and write tokenizer.json
    and tokenizer_config.json (with a ChatML chat template) in Hugging Face layout to --out."""
    from cairn.models.tokenizer import train_bpe, write_tokenizer_files

    if vocab_size < 300:
        raise UserError(f"--vocab-size must be at least 300 (256 bytes + special tokens + merges), got {vocab_size}")
    texts = [t for path in corpus for t in _read_corpus(Path(path))]
    tok = train_bpe(texts, vocab_size)
    write_tokenizer_files(tok, Path(out), model_max_length=2048)
    print(f"trained a {tok.get_vocab_size()}-token byte-level BPE on {len(texts)} documents from "
          f"{len(corpus)} file(s); wrote {out}/tokenizer.json")
    return 0


def train(config: str | None = None, pool: str | None = None, token: str | None = None, **options) -> int:
    """Train a model: pretrain on raw text, supervised fine-tuning on chat or alpaca JSONL, DPO on comparisons, or
    distill a teacher (--teacher, or --teacher-logits from `cairn synth --save-logits`); full fine-tuning, LoRA,
    prompt or prefix tuning. Options come from CONFIG.yaml (keys as in the README) and flags, flags winning.
    Writes an HF checkpoint to --out (plus adapter/ under LoRA), resumable checkpoints, metrics.jsonl and loss.png.
    --pool ADDRESS --workers N (or a `distributed:` section in the config) trains on N pool devices with DiLoCo (or
    --sync every-step)."""
    from cairn.train.config import TrainConfig

    if options.pop("no_progress", None):
        options["progress"] = False
    cfg = TrainConfig.build(config, pool=pool, **options)
    cfg = dataclasses.replace(cfg, model=_model(cfg.model))  # a .gguf starting model: imported once
    if cfg.teacher is not None:
        cfg = dataclasses.replace(cfg, teacher=_model(cfg.teacher))
    if cfg.model and _quantized(cfg.model) and not cfg.lora:
        raise UserError(f"{cfg.model} is a quantized checkpoint: train LoRA adapters on it (lora: true; its weights "
                        f"stay frozen), or train the unquantized model", param="model")
    pool = cfg.pool
    if pool is None:
        if cfg.workers:
            raise UserError("--workers needs --pool ADDRESS (the pool to train on)", param="workers")
        from cairn.train.loop import train as run

        run(cfg)
        return 0
    connect = _pool().connect

    connect(pool, _pool_token(token))
    PoolTrainer = _pool("cairn.train.distributed").PoolTrainer

    PoolTrainer(cfg, threads=cfg.threads).run()
    return 0


def _cache_root() -> Path:
    """$CAIRN_CACHE, or the default cache root (~/.cache/cairn)."""
    import os

    from cairn.models.gguf import CACHE_ROOT

    return Path(os.environ["CAIRN_CACHE"]) if os.environ.get("CAIRN_CACHE") else CACHE_ROOT


def _model(path: str, quantized: bool = False) -> str:
    """A model directory for PATH: a directory as is, a .gguf file imported once into the cache
    ($CAIRN_CACHE/gguf/, default ~/.cache/cairn/gguf/). quantized (the commands that run a model): its
    Q4_0/Q4_1/Q8_0 matrices stay quantized; the commands that transform weights get them dequantized."""
    from cairn.models.gguf import resolve_model

    return str(resolve_model(path, _cache_root(), progress=sys.stderr.isatty(), quantized=quantized))


def _quantized(model_dir: str | Path) -> bool:
    """Whether a model directory holds a quantized checkpoint (config.json's quantization_config)."""
    path = Path(model_dir) / "config.json"
    try:
        return path.is_file() and bool(json.loads(path.read_text()).get("quantization_config"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False  # the loader reports a bad config.json


def gguf_import(gguf_file: str, out_dir: str, dtype: str = "float32", quantized: bool = False) -> int:
    """Import a GGUF file (llama.cpp's format; llama/SmolLM/Mistral and qwen2; F32, F16, BF16, Q4_0-Q8_0 and
    Q2_K-Q6_K weights, dequantized) as a Hugging Face checkpoint in OUT_DIR: config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json with the chat template, generation_config.json. --quantized keeps
    Q4_0/Q4_1 matrices as int4 (the same values) and Q8_0 ones as int8 (re-rounded per row). OUT_DIR must not
    exist or be empty; a failed import leaves nothing there. Commands that take MODEL_DIR also take a .gguf
    directly (generate, chat, serve and eval run it quantized)."""
    from cairn.models.gguf import import_gguf

    t0 = time.perf_counter()
    m = import_gguf(gguf_file, out_dir, dtype=dtype, progress=sys.stderr.isatty(), quantized=quantized)
    types = ", ".join(f"{n} {k}" for k, n in m.provenance["tensor_types"].items())
    how = dtype if m.quant is None else f"{m.quant.describe()} ({dtype} elsewhere)"
    if quantized and m.quant is None:
        how += " (dequantized: cairn keeps only Q4_0, Q4_1 and Q8_0 layers quantized)"
    print(f"imported {m.cfg.arch} ({m.cfg.param_count() / 1e6:.1f}M parameters, {m.cfg.num_layers} layers, "
          f"vocab {m.cfg.vocab_size}; tensors {types}) from {gguf_file} to {out_dir} as {how} in "
          f"{time.perf_counter() - t0:.1f}s")
    return 0


def evaluate(model_dir: str | None = None, perplexity: list[str] | None = None, choice: list[str] | None = None,
             generate_files: list[str] | None = None, window: int | None = None, stride: int | None = None,
             fewshot: int = 0, chat_template: bool = False, max_tokens: int = 64, out: str | None = None,
             compare: list[str] | None = None, max_context: int | None = None, device: str = "cpu",
             dtype: str | None = None, threads: int | None = None, pool: str | None = None, token: str | None = None,
             wire_dtype: str = "fp32", adapter: str | None = None) -> int:
    """Evaluate MODEL: --perplexity FILE (text, or JSONL "text"; sliding --window/--stride; also bits per byte),
    --choice FILE.jsonl ({"question"|"context", "choices", "answer"}: acc and acc_norm by log-likelihood, as
    lm-evaluation-harness scores them; --fewshot N takes the first N items as examples, --chat-template on or off),
    --generate FILE.jsonl ({"prompt"|"messages", "answer"}: greedy answers, exact match and contains). Prints a
    table and writes JSON (--out, default eval-NAME.json); the result names the model's path, weight hash and dtype.
    --compare A.json B.json ... prints results side by side with differences (no model needed)."""
    from cairn.eval import commands as ev

    if compare:
        if model_dir is not None:
            raise UserError("--compare takes result files only; leave out MODEL")
        print(ev.format_compare([ev.load_results(p) for p in compare]))
        return 0
    if model_dir is None:
        raise UserError("give a MODEL to evaluate (or --compare A.json B.json ...)")
    config = _engine_config(device, dtype, threads, max_context=max_context, max_seqs=16, adapter=adapter)
    with _load_llm(model_dir, config, pool, token, wire_dtype) as llm:
        result = ev.evaluate(llm, perplexity or (), choice or (), generate_files or (), window, stride, fewshot,
                             chat_template, max_tokens, show=sys.stderr.isatty())
    out = out or f"eval-{Path(result['model']['path']).name}.json"
    ev.save(result, out)
    print(ev.format_table([result]))
    print(f"wrote {out}")
    return 0


def synth(teacher: str, out: str, seeds: str | None = None, from_docs: str | None = None, self_instruct: bool = False,
          per_source: int = 1, count: int = 100, temperature: float = 0.7, top_p: float = 0.95, max_tokens: int = 256,
          instruction_tokens: int = 64, seed: int = 0, batch: int = 64, min_chars: int = 8, max_chars: int = 4000,
          judge_min: int | None = None, save_logits: int = 0, system: str | None = None, max_concurrency: int = 16,
          device: str = "cpu", dtype: str | None = None, threads: int | None = None, pool: str | None = None,
          token: str | None = None, wire_dtype: str = "fp32", replicas: int = 0) -> int:
    """A teacher writes instruction data to OUT (chat JSONL for `cairn train --recipe sft|distill`): questions about
    the topics in --seeds FILE (or its JSONL "instruction"s answered as given), questions grounded in the passages
    of --from-docs DIR, or --self-instruct (the teacher writes the user turn itself, --count examples). Exact and
    near-duplicate instructions, empty, truncated and refusing answers and out-of-range lengths are dropped;
    --judge-min N keeps only answers the teacher rates N or more (1-5). Rerun the same command to resume.
    --save-logits K also keeps the teacher's top-K logprobs per token in OUT.logits/ (for --teacher-logits).
    --pool ADDRESS runs the teacher pipelined over the pool; with --replicas N, N whole copies on N devices."""
    from cairn.data.commands import mode_of, synthesize
    from cairn.data.synth import SynthConfig

    mode = mode_of(seeds, from_docs, self_instruct)
    for name, value, low in (("per-source", per_source, 1), ("count", count, 1), ("max-tokens", max_tokens, 1),
                             ("instruction-tokens", instruction_tokens, 1), ("batch", batch, 1),
                             ("save-logits", save_logits, 0), ("min-chars", min_chars, 0), ("replicas", replicas, 0)):
        if value < low:
            raise UserError(f"--{name} must be at least {low}, got {value}", param=name.replace("-", "_"))
    if judge_min is not None and not 1 <= judge_min <= 5:
        raise UserError(f"--judge-min must be 1-5, got {judge_min}", param="judge_min")
    if save_logits and pool is not None:
        raise UserError("--save-logits needs the teacher in this process; leave out --pool", param="save_logits")
    cfg = SynthConfig(mode, per_source, count, temperature, top_p, max_tokens, instruction_tokens, seed, batch,
                      min_chars, max_chars, judge_min=judge_min, save_logits=save_logits, system=system)
    config = _engine_config(device, dtype, threads, max_seqs=max_concurrency)
    if replicas:
        if pool is None:
            raise UserError("--replicas N places N copies of the teacher on pool devices: give --pool ADDRESS",
                            param="replicas")
        llms = _replicas(teacher, config, pool, token, replicas)
        try:
            synthesize(llms, cfg, out, teacher, seeds, from_docs, show=sys.stderr.isatty())
        finally:
            for llm in llms:
                llm.close()
        return 0
    with _load_llm(teacher, config, pool, token, wire_dtype) as llm:
        synthesize(llm, cfg, out, teacher, seeds, from_docs, show=sys.stderr.isatty())
    return 0


def _replicas(model_dir: str, config, pool: str, token: str | None, n: int) -> list:
    """n copies of a model, each whole on its own pool device (the first n devices of the pool)."""
    model_dir = _model(model_dir, quantized=True)  # a .gguf resolved once, not per copy
    _pool().connect(pool, _pool_token(token))
    devices = _pool("cairn.pool.service").pool_devices()
    if n > len(devices):
        raise UserError(f"--replicas {n}: the pool has {len(devices)} device(s)", param="replicas")
    llms = []
    try:
        for i, dev in enumerate(devices[:n]):
            llms.append(_load_llm(model_dir, config, pool, token, name=f"{Path(model_dir).name}-replica{i}",
                                  nodes={dev.node_id}))
    except BaseException:
        for llm in llms:
            llm.close()
        raise
    return llms


def gguf_export(model_dir: str, out_file: str, qtype: str = "f16") -> int:
    """Export a model as one GGUF file for llama.cpp: its tensor names and metadata, the tokenizer (byte-level BPE
    with merges and pre-tokenizer, or SentencePiece-style) and chat template. --type q8_0/q4_0/q4_1/q5_0/q5_1
    quantizes every matrix ("pure"; rows not divisible by the block stay f16), norms stay f32."""
    from cairn.models.gguf import export_gguf

    t0 = time.perf_counter()
    model_dir = _model(model_dir)
    if _quantized(model_dir):  # llama.cpp gets the weights the quantized checkpoint stands for
        import tempfile

        from cairn.models.quantize import dequantize_checkpoint

        with tempfile.TemporaryDirectory(prefix="cairn-export-") as tmp:
            dequantize_checkpoint(model_dir, Path(tmp) / "model")
            s = export_gguf(Path(tmp) / "model", out_file, qtype=qtype, progress=sys.stderr.isatty())
    else:
        s = export_gguf(model_dir, out_file, qtype=qtype, progress=sys.stderr.isatty())
    types = ", ".join(f"{n} {k}" for k, n in s["tensor_types"].items())
    print(f"wrote {out_file} ({s['arch']}, {qtype}: tensors {types}; {s['bytes'] / 2**20:.1f} MiB) in "
          f"{time.perf_counter() - t0:.1f}s")
    return 0


def quantize(model_dir: str, out_dir: str, bits: int, group_size: int | None = None, method: str = "rtn",
             keep: str = "", symmetric: bool = False, scale_dtype: str | None = None, calibration: str | None = None,
             samples: int = 32) -> int:
    """Quantize MODEL's matrices to int8 (one scale per output row) or int4 (--group-size 32/64/128 columns per
    scale, asymmetric unless --symmetric) and write a checkpoint to OUT_DIR (must not exist or be empty) that
    generate, chat, serve, eval and the pool run with torch's int8/int4 kernels. --method rtn rounds to nearest;
    awq and gptq calibrate on --calibration text (default: a built-in sample). --keep "lm_head,embed" leaves
    matrices unquantized (a tied head is the embedding). The method and its parameters go into config.json."""
    from cairn.models.quantize import quantize_checkpoint
    from cairn.quant.weights import QuantFormat

    if bits == 4 and group_size is None:
        group_size = 32
    fmt = QuantFormat(bits, group_size, symmetric, scale_dtype or ("float32" if bits == 8 else "bfloat16"))
    if Path(out_dir).exists() and (not Path(out_dir).is_dir() or any(Path(out_dir).iterdir())):
        raise UserError(f"{out_dir} already exists and is not an empty directory; choose a new one")
    s = quantize_checkpoint(_model(model_dir), out_dir, fmt, method=method, keep=keep, calibration=calibration,
                            samples=samples, progress=sys.stderr.isatty())
    kept = f"; kept {', '.join(s['kept'])}" if s["kept"] else ""
    print(f"wrote {out_dir}: {s['quantized']} matrices {method} int{bits}"
          f"{f' g{group_size}' if bits == 4 else ''}{kept}; {s['bytes_before'] / 2**20:.1f} MiB -> "
          f"{s['bytes_after'] / 2**20:.1f} MiB ({s['bits_per_weight']:.2f} bits per weight) in {s['seconds']:.1f}s")
    return 0


def lora_merge(base: str, adapter: str, out: str, dtype: str | None = None) -> int:
    """Fold a LoRA adapter (PEFT layout: adapter_config.json + adapter_model.safetensors) into its base model and
    write a full Hugging Face checkpoint to --out."""
    from cairn.train.lora import merge_to_checkpoint

    cfg = merge_to_checkpoint(_model(base), adapter, out, dtype=dtype)
    print(f"merged {adapter} into {base} ({cfg.num_layers} layers); wrote {out}")
    return 0


def _engine_config(device: str, dtype: str | None, threads: int | None, max_context: int | None = None, max_seqs: int = 4,
                   kv_memory: str | None = None, prefix_cache: bool = True, draft: str | None = None,
                   adapter: str | None = None):
    from cairn.config import EngineConfig

    return EngineConfig(device=device, dtype=dtype, threads=threads, max_context=max_context, max_seqs=max_seqs,
                        kv_memory=_kv_bytes(kv_memory), prefix_caching=prefix_cache, draft=_draft(draft),
                        adapter=adapter)


def _draft(draft: str | None) -> str | None:
    """--draft: 'ngram', or a draft model (a .gguf imported once, quantized as the file is)."""
    return draft if draft in (None, "ngram") else _model(draft, quantized=True)


def _kv_bytes(kv_memory: str | None) -> int | None:
    """--kv-memory SIZE ('512MiB', '2GiB', '1e9') as bytes."""
    if kv_memory is None:
        return None
    from cairn.pool.devices import parse_bytes

    try:
        return parse_bytes(kv_memory)
    except UserError as e:
        raise UserError(f"--kv-memory: {e}", param="kv_memory") from None


def _sampling(max_tokens, temperature, top_p, top_k, seed, stop, repetition_penalty=1.0, logprobs=None, ignore_eos=False):
    from cairn.config import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                          stop=tuple(stop or ()), repetition_penalty=repetition_penalty, logprobs=logprobs,
                          ignore_eos=ignore_eos)


def _load_llm(model_dir: str, config, pool: str | None = None, token: str | None = None, wire_dtype: str = "fp32",
              name: str | None = None, nodes: set[str] | None = None):
    """A local LLM, or one whose model is placed across the pool at `pool` (on `nodes` only, when given)."""
    from cairn.engine.api import LLM, resolve_dtype

    model_dir = _model(model_dir, quantized=True)
    if pool is None:
        return LLM(model_dir, config)
    from cairn.config import ModelConfig

    _pool().connect(pool, _pool_token(token))  # before anything imports ray: ray fixes its auth mode at import
    PipelineRunner = _pool("cairn.pool.ray_backend").PipelineRunner
    cfg = ModelConfig.from_hf_dir(model_dir)
    max_context = min(cfg.max_position_embeddings, config.max_context or 4096)
    runner = PipelineRunner(model_dir, cfg, max_seqs=config.max_seqs, max_context=max_context,
                            dtype=resolve_dtype(cfg, config), max_batch_tokens=config.max_batch_tokens,
                            wire=wire_dtype, threads=config.threads, name=name, nodes=nodes,
                            kv_memory=config.kv_memory, block_size=config.block_size)
    return LLM(model_dir, config, runner=runner)


def generate(model_dir: str, prompt: str, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int | None = None, stop: list[str] | None = None, repetition_penalty: float = 1.0,
             ignore_eos: bool = False, json_out: bool = False, device: str = "cpu", dtype: str | None = None,
             threads: int | None = None, pool: str | None = None, token: str | None = None,
             wire_dtype: str = "fp32", kv_memory: str | None = None, prefix_cache: bool = True,
             draft: str | None = None, adapter: str | None = None) -> int:
    """Print the model's continuation of --prompt, streamed as it is generated (greedy unless --temperature > 0).
    --json prints one object instead: tokens, text, finish reason and timing. --pool ADDRESS runs the model across
    the pool's devices."""
    params = _sampling(max_tokens, temperature, top_p, top_k, seed, stop, repetition_penalty, ignore_eos=ignore_eos)
    config = _engine_config(device, dtype, threads, max_seqs=1, kv_memory=kv_memory, prefix_cache=prefix_cache,
                            draft=draft, adapter=adapter)
    with _load_llm(model_dir, config, pool, token, wire_dtype) as llm:
        t0 = time.perf_counter()
        handle = llm.submit(prompt, params)
        tokens, text, first, finish = [], [], None, None
        for ev in handle:
            if ev.token_id is not None:
                tokens.append(ev.token_id)
                first = first or time.perf_counter()
            text.append(ev.text)
            finish = ev.finish_reason
            if not json_out and ev.text:
                print(ev.text, end="", flush=True)
        total = time.perf_counter() - t0
        if json_out:
            decode_time = total - ((first or t0) - t0)
            print(json.dumps({
                "prompt": prompt, "prompt_tokens": handle.prompt_tokens, "tokens": tokens, "text": "".join(text),
                "finish_reason": finish, "load_s": round(llm.load_time, 4), "time_to_first_token_s": round((first or t0) - t0, 4),
                "total_s": round(total, 4),
                "decode_tokens_per_s": round((len(tokens) - 1) / decode_time, 2) if len(tokens) > 1 and decode_time > 0 else None,
            }))
        else:
            print()
    return 0


def chat(model_dir: str, system: str | None = None, max_tokens: int = 256, temperature: float = 0.7,
         top_p: float = 0.95, seed: int | None = None, device: str = "cpu", dtype: str | None = None,
         threads: int | None = None, kv_memory: str | None = None, prefix_cache: bool = True,
         draft: str | None = None, adapter: str | None = None) -> int:
    """Chat with the model using its checkpoint's chat template: multi-turn, replies stream to the terminal.
    Type a message and press Enter; Ctrl-D (end of input) quits. Each turn reuses the cached blocks of the
    conversation so far (unless --no-prefix-cache)."""
    from cairn.engine.api import LLM

    params = _sampling(max_tokens, temperature, top_p, 0, seed, None)
    config = _engine_config(device, dtype, threads, max_seqs=1, kv_memory=kv_memory, prefix_cache=prefix_cache,
                            draft=draft, adapter=adapter)
    with LLM(_model(model_dir, quantized=True), config) as llm:
        if not llm.tokenizer.chat_template:
            raise UserError(f"{model_dir} has no chat template (tokenizer_config.json: chat_template); use generate")
        messages = [{"role": "system", "content": system}] if system else []
        interactive = sys.stdin.isatty()
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                print()
                return 0
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            ids = llm.render_chat(messages)
            room = llm.engine.max_context - len(ids)
            if room <= 0:
                raise UserError("the conversation no longer fits the model's context; start a new chat")
            print("assistant> ", end="", flush=True)
            handle = llm.submit(ids, _with_max(params, min(params.max_tokens, room)))
            reply = []
            try:
                for ev in handle:
                    reply.append(ev.text)
                    print(ev.text, end="", flush=True)
            except KeyboardInterrupt:
                handle.cancel()
            print()
            messages.append({"role": "assistant", "content": "".join(reply)})


def _with_max(params, max_tokens):
    from dataclasses import replace

    return replace(params, max_tokens=max_tokens)


def serve(model_dirs: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_concurrency: int = 16, max_queue: int = 256, max_context: int | None = None,
          served_name: list[str] | None = None, device: str = "cpu", dtype: str | None = None,
          threads: int | None = None, pool: str | None = None, token: str | None = None,
          wire_dtype: str = "fp32", max_body_bytes: int = 4 * 1024 * 1024, log_level: str = "info",
          log_json: bool = False, kv_memory: str | None = None, prefix_cache: bool = True,
          draft: str | None = None, adapter: str | None = None, router: list[str] | None = None) -> int:
    """Serve local models over an OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions
    (streaming too), /health, /metrics and /openapi.json. --api-key (or CAIRN_API_KEY) makes /v1 require
    'Bearer KEY'. --max-concurrency sequences decode together per model; beyond --max-queue waiting requests, 429;
    bodies over --max-body-bytes, 413. Each request is logged (--log-level, --log-json for JSON lines).
    --pool ADDRESS places each model across the pool's devices (token: --token or $CAIRN_POOL_TOKEN) and keeps
    serving when a device disappears. The KV cache grows in blocks as sequences do, up to --kv-memory (default:
    what the device has left after the weights); when it is full, new requests wait and running ones may be
    preempted and resumed. Requests that share a prompt prefix share its cached blocks (--no-prefix-cache: off).
    --draft ngram decodes greedy requests speculatively by prompt lookup (same output, fewer steps).
    --router ROUTER (a YAML file or `cairn router train`'s directory) adds its name (default `auto`): requests to it
    are answered by the model the router picks (rules, learned or cascade), named in the response's `model` field
    and x-cairn-model header; /metrics counts requests, tokens and seconds per route."""
    import os

    import uvicorn

    from cairn.config import EngineConfig
    from cairn.serve.app import create_app
    from cairn.serve.observe import configure_logging

    if max_body_bytes < 1:
        raise UserError(f"--max-body-bytes must be at least 1, got {max_body_bytes}")
    configure_logging(log_level, log_json)
    names = served_name or _default_names(model_dirs)
    if len(names) != len(model_dirs):
        raise UserError(f"--served-name given {len(names)} times for {len(model_dirs)} models; give one per model")
    if len(set(names)) != len(names):
        raise UserError(f"served model names must differ, got {names}; use --served-name")
    from cairn.config import ModelConfig

    from cairn.route import config as rc
    from cairn.serve.routed import check_specs

    specs = [rc.load(r) for r in router or ()]
    model_dirs = [_model(d, quantized=True) for d in model_dirs]  # .gguf files: imported once into the cache
    configs = {n: ModelConfig.from_hf_dir(d) for n, d in zip(names, model_dirs)}  # fail before binding the port
    check_specs(specs, names, configs.__getitem__)
    if pool is not None and any(spec.type == "learned" for spec in specs):
        raise UserError("a learned router reads its small model's hidden states in this process, which --pool does "
                        "not offer: serve without --pool, or route with a cascade or rules router", param="router")
    config = EngineConfig(device=device, dtype=dtype, threads=threads, max_seqs=max_concurrency,
                          max_queue=max_queue, max_context=max_context, kv_memory=_kv_bytes(kv_memory),
                          prefix_caching=prefix_cache, draft=_draft(draft), adapter=adapter)

    if pool is not None:
        connect = _pool().connect

        connect(pool, _pool_token(token))  # a wrong token fails here, before the port is bound

    def load():
        return {n: _load_llm(d, config, pool, token, wire_dtype, n) for n, d in zip(names, model_dirs)}

    app = create_app(loader=load, routers=specs, api_key=api_key or os.environ.get("CAIRN_API_KEY") or None,
                     max_body_bytes=max_body_bytes)
    served = names + [n for spec in specs for n in spec.names()]
    print(f"cairn: serving {', '.join(served)} on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="debug" if log_level == "debug" else "warning", access_log=False)
    return 0


def _default_names(paths: list[str]) -> list[str]:
    """The names models are served under by default: a directory's name, a file's name without its suffix."""
    return [Path(p).resolve().stem if Path(p).is_file() else Path(p).resolve().name for p in paths]


@contextlib.contextmanager
def _router_llms(models: list[str], names: list[str] | None, judge: str | None, threads: int | None, device: str,
                 dtype: str | None, max_concurrency: int):
    """The small and the large model (and the judge, or None) loaded, the names a router calls the two by (default:
    their directory names); all closed afterwards."""
    if len(models) != 2:
        raise UserError(f"--models takes two models, SMALL then LARGE; got {len(models)}", param="models")
    names = names or _default_names(models)
    if len(names) != 2 or names[0] == names[1]:
        raise UserError(f"--names takes two different names, one per model; got {names}", param="names")
    config = _engine_config(device, dtype, threads, max_seqs=max_concurrency)
    with contextlib.ExitStack() as stack:
        small, large = (stack.enter_context(_load_llm(m, config)) for m in models)
        judge_llm = None if judge is None else stack.enter_context(_load_llm(judge, config))
        yield small, large, (names[0], names[1]), judge_llm


def router_train(data: str, models: list[str], out: str, names: list[str] | None = None, judge: str | None = None,
                 metric: str = "contains", max_tokens: int = 32, share: float | None = None,
                 max_concurrency: int = 16, device: str = "cpu", dtype: str | None = None,
                 threads: int | None = None) -> int:
    """Train a learned router for --models SMALL LARGE on --data FILE.jsonl (each line a `prompt` or `messages`, and
    an `answer` both models are scored on, `scores` per model name, a preference `winner`, or nothing with --judge
    MODEL): a classifier of the small model's hidden states predicts whether its answer is good enough. Writes
    OUT/router.yaml and OUT/classifier.safetensors, for `cairn serve SMALL LARGE --router OUT`. --names: the served
    names of the two models (default: their directory names); --share S sets the threshold that sends S of the
    training prompts to the large model (default threshold 0.5)."""
    from cairn.route import commands as rcmd

    items = rcmd.read_items(data)
    with _router_llms(models, names, judge, threads, device, dtype, max_concurrency) as (small, large, pair, jd):
        report = rcmd.train(small, large, items, pair, out, jd, metric, max_tokens, share, show=sys.stderr.isatty())
    print(f"router written to {out}: threshold {report['threshold']:.3f}; {report['items']} items, small good enough "
          f"on {report['small_good']}; cross-validated AUC {report['cv_auc']:.3f} (L2 {report['l2']})")
    return 0


def router_calibrate(router: str, data: str, model: str, share: float, out: str | None = None,
                     max_tokens: int = 32, max_concurrency: int = 16, device: str = "cpu", dtype: str | None = None,
                     threads: int | None = None) -> int:
    """Set ROUTER's threshold so that --share of the prompts in --data go to the large model; --model is the
    router's small (first) model. Writes the router back (or to --out)."""
    from cairn.route import commands as rcmd
    from cairn.route import config as rc

    spec = rc.load(router)
    items = rcmd.read_items(data)
    with _load_llm(model, _engine_config(device, dtype, threads, max_seqs=max_concurrency)) as small:
        r = rcmd.calibrate(spec, small, items, share, out, max_tokens, show=sys.stderr.isatty())
    print(f"threshold {r['threshold']:.4f} sends {r['share_large']:.1%} of {len(items)} prompts to the large model "
          f"(target {share:.0%}); written to {r['router']}")
    return 0


def router_eval(routers: list[str], data: str, models: list[str], names: list[str] | None = None,
                judge: str | None = None, metric: str = "contains", max_tokens: int = 32, cost_items: int = 16,
                out: str | None = None, png: str | None = None, max_concurrency: int = 16, device: str = "cpu",
                dtype: str | None = None, threads: int | None = None) -> int:
    """Draw each ROUTER's cost-quality curve on --data (held-out items, as for `router train`) for --models SMALL
    LARGE: quality against the share of requests sent to the large model, beside random routing and each model
    alone. Prints the performance gap recovered at 20/50/80%% large-model calls, the least share and cost reaching
    95%% of the large model's quality, the margin over random routing and the router's own cost; writes --out JSON
    and --png (default router-eval.json / .png). Costs are seconds per request, one request at a time, over the
    first --cost-items items."""
    from cairn.fsutil import atomic_write_json
    from cairn.route import commands as rcmd
    from cairn.route import config as rc

    specs = [rc.load(r) for r in routers]
    items = rcmd.read_items(data)
    with _router_llms(models, names, judge, threads, device, dtype, max_concurrency) as (small, large, pair, jd):
        result = rcmd.evaluate(specs, small, large, items, pair, jd, metric, max_tokens, cost_items,
                               show=sys.stderr.isatty())
    out = out or "router-eval.json"
    png = png or str(Path(out).with_suffix(".png"))
    atomic_write_json(out, result)
    rcmd.plot(result, png)
    print(rcmd.format_report(result))
    print(f"wrote {out} and {png}")
    return 0


def merge(recipe: str, out: str, seed: int | None = None, shard_mib: int = 1024) -> int:
    """Merge models as a mergekit YAML recipe says (merge_method linear, slerp, task_arithmetic, ties, dare_linear,
    dare_ties, breadcrumbs, breadcrumbs_ties, model_stock or passthrough; `models:` or `slices:`; parameters as
    scalars, layer gradients or name filters) into a Hugging Face checkpoint at --out, tensor by tensor (memory: one
    shard of --shard-mib plus a few input tensors). Keys or methods cairn does not know are refused by name. --seed
    fixes the random drops of dare_*; an interrupted merge rerun with the same recipe and --out keeps the shards
    already written. A `model:` may be a .gguf file (imported once, dequantized) or BASE+ADAPTER (mergekit's LoRA
    syntax: a PEFT LoRA adapter folded into BASE once, cached under $CAIRN_CACHE/lora/)."""
    from cairn.merge.commands import merge_recipe

    return merge_recipe(recipe, out, seed, shard_mib, progress=sys.stderr.isatty(), resolve=_merge_input)


def merge_search(recipe: str, out: str, budget: int, choice: list[str] | None = None,
                 generate_files: list[str] | None = None, perplexity: list[str] | None = None,
                 population: int | None = None, seed: int = 0, bounds: list[str] | None = None,
                 skip_layers: bool = False, threads: int | None = None, pool: str | None = None,
                 token: str | None = None) -> int:
    """`cairn merge search CONFIG.yaml`: search a mergekit recipe's numbers for the merge that scores best
    (evolutionary model merging with CMA-ES): every weight, density, t, lambda, gamma and epsilon the recipe writes
    (each entry of a layer gradient too) within bounds (weight 0:1, density 0.05:1, t 0:1, lambda 0:2, gamma and
    epsilon 0:0.2; --bounds NAME=LOW:HIGH changes one); a passthrough recipe of `slices:` instead searches which
    model each stacked layer comes from (--skip-layers: and which to drop). Each of --budget candidates is merged,
    scored by the `cairn eval` tasks given (--choice acc, --generate exact match, --perplexity -ln perplexity; their
    mean) and deleted. Writes OUT/best.yaml (for `cairn merge` and mergekit), OUT/best/, OUT/search.png and
    OUT/search.jsonl; rerun to resume (or to continue with a larger --budget). --pool ADDRESS scores each
    generation's candidates in parallel, one per pool device, each worker merging by itself (models and eval files
    at the same paths on every machine)."""
    from cairn.merge.commands import search_recipe

    return search_recipe(recipe, out, budget, choice, generate_files, perplexity, population, seed, threads, pool,
                         _pool_token(token) if pool else None, bounds, skip_layers, progress=sys.stderr.isatty())


def _merge_input(ref: str) -> str:
    """A merge input as a checkpoint directory: a directory as is, a .gguf imported (dequantized), BASE+ADAPTER
    (a LoRA adapter directory) folded into its base once and cached by the content of both."""
    import hashlib

    if Path(ref).is_dir() or ("+" not in ref and not ref.endswith(".gguf")):
        return ref
    if "+" not in ref:
        return _model(ref)
    base, adapter = ref.rsplit("+", 1)
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"{ref}: {adapter} is not a LoRA adapter directory (adapter_config.json)", param="model")
    base_dir = _model(base)
    digest = hashlib.sha256(str(Path(base_dir).resolve()).encode())
    for f in sorted(Path(adapter).glob("adapter_*")):
        digest.update(f.name.encode() + f.read_bytes())
    out = _cache_root() / "lora" / digest.hexdigest()[:16]
    if not (out / "config.json").is_file():  # folded into a scratch directory, renamed when whole
        import shutil
        import tempfile

        from cairn.train.lora import merge_to_checkpoint

        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=out.parent))
        try:
            merge_to_checkpoint(base_dir, adapter, scratch / "m")
            shutil.rmtree(out, ignore_errors=True)
            (scratch / "m").rename(out)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return str(out)


def _pool(module: str = "cairn.pool.control"):
    """Import a module that needs the `pool` extra (Ray): without it, a one-line install hint (exit 2), never a
    ModuleNotFoundError traceback. Every pool command and --pool option comes through here."""
    import importlib
    import importlib.util

    hint = UserError("this needs the pool extra (Ray), which is not installed here: pip install 'cairn[pool]'")
    if importlib.util.find_spec("ray") is None:
        raise hint
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] == "ray":
            raise hint from None
        raise


def _pool_paths():
    import os

    PoolPaths = _pool().PoolPaths

    return PoolPaths(Path(os.environ.get("CAIRN_HOME") or Path.home() / ".cairn") / "pool")


def _pool_token(token: str | None) -> str | None:
    import os

    return token or os.environ.get("CAIRN_POOL_TOKEN") or None


def pool_start(port: int = 6380, host: str = "127.0.0.1", device: str | None = "cpu", memory: str | None = None,
               no_device: bool = False, num_cpus: int | None = None, show_token: bool = False) -> int:
    """Start a pool head (a Ray head with token authentication on) on this machine, offering its device too unless
    --no-device. Prints the address and where the join token is kept (mode 0600); `cairn pool token` (or
    --show-token) prints it."""
    control = _pool()

    paths = _pool_paths()
    state = control.start(paths, host, port, None if no_device else device, memory, num_cpus)
    print(f"pool started at {state['address']}")
    print(f"join token: in {paths.token} (print it with: cairn pool token)")
    if show_token:
        print(f"token: {paths.token.read_text().strip()}")
    print(f"join with: CAIRN_POOL_TOKEN=... cairn pool join {state['address']}")
    return 0


def pool_token() -> int:
    """Print the join token of the pool started on this machine."""
    path = _pool_paths().token
    if not path.is_file():
        raise UserError(f"no pool was started from this machine ({path} is missing); cairn pool start first")
    print(path.read_text().strip())
    return 0


def pool_join(address: str, token: str | None = None, host: str = "127.0.0.1", device: str = "cpu",
              memory: str | None = None, num_cpus: int | None = None) -> int:
    """Join the pool at ADDRESS as a node offering one device with a memory budget (e.g. --memory 6GiB). The device
    is measured (matmul throughput, memory bandwidth) and declared; a wrong or missing token is refused."""
    control = _pool()

    state = control.join(_pool_paths(), address, _pool_token(token) or "", host, device, memory, num_cpus)
    print(f"joined {address} as {state['name']}: {device}, budget {state['memory'] / 2**30:.2f} GiB, "
          f"{state['bandwidth'] / 1e9:.1f} GB/s, {state['flops'] / 1e9:.1f} GFLOP/s")
    return 0


def _format_text(stage: dict) -> str:
    """' as int4 g32 asym rtn, float32 elsewhere' for a served stage, '' when not known."""
    return f" as {stage['format']}" if "format" in stage else ""


def _kv_blocks_text(stage: dict) -> str:
    """' (KV 1.2 GiB: 300/4096 blocks used, 20 cached, 3776 free)' for a served stage, '' when not known."""
    if "blocks_total" not in stage:
        return ""
    size = f"KV {stage['kv_bytes'] / 2**30:.2f} GiB: " if "kv_bytes" in stage else ""
    if "blocks_used" not in stage:
        return f" ({size}{stage['blocks_total']} blocks)"
    return (f" ({size}{stage['blocks_used']}/{stage['blocks_total']} blocks used, {stage['blocks_cached']} cached, "
            f"{stage['blocks_free']} free)")


def pool_status(address: str | None = None, token: str | None = None, json_out: bool = False) -> int:
    """Every node and device of the pool: kind, memory budget, measured speed, health, and which layers of which
    model it runs."""
    import json as _json

    control = _pool()

    paths = _pool_paths()
    if address is None:
        if not paths.head.is_file():
            raise UserError("give the pool --address (no pool was started from this machine)")
        address = _json.loads(paths.head.read_text())["address"]
    token = _pool_token(token) or (paths.token.read_text().strip() if paths.token.is_file() else None)
    control.connect(address, token)
    st = control.status()
    if json_out:
        print(_json.dumps(st, indent=2))
        return 0
    print(f"pool {address}: {sum(n['alive'] for n in st['nodes'])} node(s) alive")
    for n in st["nodes"]:
        d = n["device"]
        dev = "no device" if d is None else (f"{d['kind']}, {d['memory_bytes'] / 2**30:.2f} GiB, "
                                             f"{d['bandwidth_gbs']:.1f} GB/s, {d['gflops']:.1f} GFLOP/s")
        run = "; ".join([f"{r['model']} layers {r['layers']}{_format_text(r)}{_kv_blocks_text(r)}"
                         for r in n["running"]]
                        + [f"training worker {t['worker']} of {t['run']} ({t['recipe']}, {t['sync']}, round "
                           f"{t['round']}/{t['rounds']}, {t.get('tokens_per_s', 0):.0f} tok/s)"
                           for t in n["training"]]) or "idle"
        print(f"  {n['node_id'][:12]} {n['address']} {'head ' if n['is_head'] else ''}"
              f"{'alive' if n['alive'] else 'DEAD'}: {dev}; {run}")
    return 0


def pool_leave(name: str | None = None) -> int:
    """Take the node(s) this machine joined out of the pool."""
    control = _pool()

    gone = control.leave(_pool_paths(), name)
    print(f"left: {', '.join(gone) if gone else 'no node was joined from this machine'}")
    return 0


def pool_stop() -> int:
    """Stop the pool head started on this machine (and any node it joined)."""
    control = _pool()

    print("pool stopped" if control.stop(_pool_paths()) else "no pool head was running from this machine")
    return 0


@dataclass(frozen=True)
class Arg:
    flags: tuple[str, ...]
    kwargs: dict


def arg(*flags: str, **kwargs) -> Arg:
    return Arg(flags, kwargs)


_POOL = [
    arg("--pool", default=None, metavar="ADDRESS", help="run across the pool at ADDRESS (cairn pool start)"),
    arg("--token", default=None, help="the pool's token (default: $CAIRN_POOL_TOKEN)"),
    arg("--wire-dtype", choices=["fp32", "bf16", "int8", "int4"], default="fp32",
        help="activations between stages: fp32 (exact), bf16 (2x fewer bytes), int8 (3.6x: blocks of 32 with their "
             "own scale, outliers sent apart), int4 (6.2x, for slow links: perplexity +0.1-1%%, some answers change)"),
]

_KV = [
    arg("--kv-memory", default=None, metavar="SIZE",
        help="memory for the KV cache, e.g. 512MiB (default: what the device has left after the weights, at most "
             "max-concurrency whole contexts; on CPU half the available memory, backed only as blocks fill)"),
    arg("--no-prefix-cache", dest="prefix_cache", action="store_false",
        help="compute every prompt in full instead of reusing the cached blocks of an earlier identical prefix"),
    arg("--draft", default=None, metavar="ngram|MODEL_DIR",
        help="speculative decoding: ngram proposes the tokens that followed the last few tokens where they occurred "
             "before (prompt lookup); MODEL_DIR (or .gguf) proposes with a smaller model sharing the tokenizer; the "
             "model verifies the proposals in one forward, same output"),
]

_ADAPTER = [
    arg("--adapter", default=None, metavar="DIR",
        help="a prompt- or prefix-tuning adapter (PEFT layout, e.g. `cairn train --prompt-tuning N`'s out/adapter), "
             "served without merging"),
]

_ROUTER = [
    arg("--names", nargs=2, default=None, metavar=("SMALL_NAME", "LARGE_NAME"),
        help="the names the models are served under (default: their directory names)"),
    arg("--judge", default=None, metavar="MODEL", help="rate both answers 1-5 where an item has no answer or scores"),
    arg("--metric", choices=["contains", "exact_match"], default="contains", help="scoring items with an `answer`"),
    arg("--max-tokens", type=int, default=32, help="most tokens per answer"),
    arg("--max-concurrency", type=int, default=16, help="answers generated together"),
]

_RUNTIME = [
    arg("--device", default="cpu", help="cpu, cuda or cuda:N"),
    arg("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="compute dtype (default: checkpoint's)"),
    arg("--threads", type=int, default=None, help="CPU threads for torch"),
]

COMMANDS: dict[str, tuple[Callable[..., int], list[Arg]]] = {
    "init-model": (init_model, [
        arg("out_dir"),
        arg("--shape", default="tiny", choices=["tiny", "small", "smollm-135m"]),
        arg("--arch", default="llama", choices=["llama", "qwen2", "mistral"]),
        arg("--seed", type=int, default=0),
        arg("--corpus", default=None, help="text file (or .jsonl with a text field) to train the tokenizer on"),
        arg("--dtype", default="float32", choices=["float32", "bfloat16", "float16"]),
        arg("--from", dest="teacher", default=None, metavar="TEACHER", help="keep --layers of this model's layers"),
        arg("--layers", type=int, default=None, help="student layers (with --from or --width-from)"),
        arg("--select", choices=["even", "importance"], default="even",
            help="which teacher layers: evenly spaced, or the most influential on --corpus"),
        arg("--width-from", default=None, metavar="TEACHER", help="random student of this model's width"),
    ]),
    "tokenizer train": (tokenizer_train, [
        arg("corpus", nargs="+", metavar="CORPUS"),
        arg("--vocab-size", type=int, required=True),
        arg("--out", required=True),
    ]),
    "generate": (generate, [
        arg("model_dir"),
        arg("--prompt", required=True),
        arg("--max-tokens", type=int, default=128),
        arg("--temperature", type=float, default=0.0),
        arg("--top-p", type=float, default=1.0),
        arg("--top-k", type=int, default=0),
        arg("--seed", type=int, default=None),
        arg("--stop", action="append", default=None, help="stop string (repeatable)"),
        arg("--repetition-penalty", type=float, default=1.0),
        arg("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens"),
        arg("--json", dest="json_out", action="store_true", help="print tokens, text, finish reason and timing as JSON"),
        *_RUNTIME,
        *_KV,
        *_POOL,
        *_ADAPTER,
    ]),
    "chat": (chat, [
        arg("model_dir"),
        arg("--system", default=None, help="system message"),
        arg("--max-tokens", type=int, default=256),
        arg("--temperature", type=float, default=0.7),
        arg("--top-p", type=float, default=0.95),
        arg("--seed", type=int, default=None),
        *_RUNTIME,
        *_KV,
        *_ADAPTER,
    ]),
    "serve": (serve, [
        arg("model_dirs", nargs="+", metavar="MODEL_DIR"),
        arg("--host", default="127.0.0.1"),
        arg("--port", type=int, default=8000),
        arg("--api-key", default=None, help="require this bearer key on /v1 (default: $CAIRN_API_KEY)"),
        arg("--max-concurrency", type=int, default=16, help="sequences decoded together per model"),
        arg("--max-queue", type=int, default=256, help="waiting requests allowed before 429"),
        arg("--max-context", type=int, default=None, help="cap on prompt + output tokens"),
        arg("--served-name", action="append", default=None, help="name clients use (one per model)"),
        arg("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger request bodies get 413"),
        arg("--log-level", choices=["debug", "info", "warning", "error"], default="info",
            help="requests are logged at info, failures at warning/error"),
        arg("--log-json", action="store_true", help="log JSON lines instead of text"),
        arg("--router", action="append", default=None, metavar="ROUTER",
            help="a router file or directory: its name (default auto) routes between the served models"),
        *_RUNTIME,
        *_KV,
        *_POOL,
        *_ADAPTER,
    ]),
    "router train": (router_train, [
        arg("--data", required=True, metavar="FILE.jsonl"),
        arg("--models", nargs=2, required=True, metavar=("SMALL", "LARGE")),
        arg("--out", required=True, metavar="DIR"),
        *_ROUTER,
        arg("--share", type=float, default=None, help="threshold sending this share of the prompts to LARGE"),
        *_RUNTIME,
    ]),
    "router calibrate": (router_calibrate, [
        arg("router", metavar="ROUTER"),
        arg("--data", required=True, metavar="FILE.jsonl"),
        arg("--model", required=True, metavar="SMALL", help="the router's small (first) model"),
        arg("--share", type=float, required=True, help="target share of prompts sent to the large model"),
        arg("--out", default=None, help="write the calibrated router here instead of over ROUTER"),
        arg("--max-tokens", type=int, default=32, help="a cascade's answers: most tokens"),
        arg("--max-concurrency", type=int, default=16),
        *_RUNTIME,
    ]),
    "router eval": (router_eval, [
        arg("routers", nargs="+", metavar="ROUTER"),
        arg("--data", required=True, metavar="FILE.jsonl"),
        arg("--models", nargs=2, required=True, metavar=("SMALL", "LARGE")),
        *_ROUTER,
        arg("--cost-items", type=int, default=16, help="requests timed one at a time per model"),
        arg("--out", default=None, help="result JSON (default router-eval.json)"),
        arg("--png", default=None, help="the curve (default: beside --out)"),
        *_RUNTIME,
    ]),
    "train": (train, [
        arg("config", nargs="?", default=None, metavar="CONFIG.yaml"),
        arg("--recipe", choices=["pretrain", "sft", "dpo", "distill"], default=None),
        arg("--teacher", default=None, help="distill: teacher checkpoint (or .gguf), same tokenizer as --model"),
        arg("--teacher-logits", default=None, metavar="DIR", help="distill: a `cairn synth --save-logits` cache"),
        arg("--distill-loss", choices=["forward_kl", "reverse_kl", "jsd"], default=None),
        arg("--model", default=None, help="starting checkpoint (HF layout)"),
        arg("--data", nargs="+", default=None, help="training files (.txt/.jsonl)"),
        arg("--eval-data", nargs="+", default=None, help="held-out files (default: hold out --eval-fraction)"),
        arg("--out", default=None, help="output directory"),
        *[arg(f"--{name}", type=kind, default=None) for name, kind in [
            ("eval-fraction", float), ("seq-len", int), ("batch-size", int), ("grad-accum", int),
            ("max-steps", int), ("epochs", float), ("lr", float), ("warmup-steps", int), ("min-lr-ratio", float),
            ("weight-decay", float), ("clip-grad", float), ("threads", int), ("seed", int), ("eval-every", int),
            ("save-every", int), ("keep-checkpoints", int), ("log-every", int), ("lora-rank", int),
            ("lora-alpha", float), ("lora-dropout", float), ("dpo-beta", float), ("distill-alpha", float),
            ("distill-temperature", float), ("distill-beta", float), ("on-policy", float),
            ("on-policy-tokens", int), ("prompt-tuning", int), ("prefix-tuning", int)]],
        arg("--prompt-init-text", default=None, help="prompt tuning: start from this text's embeddings"),
        arg("--schedule", choices=["cosine", "linear", "constant"], default=None),
        arg("--precision", choices=["auto", "bf16", "fp32"], default=None),
        arg("--device", default=None, help="cpu, cuda or cuda:N"),
        arg("--lora-targets", nargs="+", default=None, help="q_proj k_proj v_proj o_proj gate_proj up_proj down_proj"),
        arg("--too-long", choices=["truncate", "refuse"], default=None),
        arg("--skip-bad-lines", action="store_const", const=True, default=None),
        arg("--resume", action="store_const", const=True, default=None, help="continue from the latest checkpoint"),
        arg("--no-progress", action="store_true", help="no progress bar"),
        arg("--pool", default=None, metavar="ADDRESS", help="train on the pool at ADDRESS (with --workers)"),
        arg("--token", default=None, help="the pool's token (default: $CAIRN_POOL_TOKEN)"),
        arg("--workers", type=int, default=None, help="pool devices to train on"),
        arg("--sync", choices=["diloco", "every-step"], default=None, help="DiLoCo rounds or synchronous DP"),
        *[arg(f"--{name}", type=kind, default=None) for name, kind in [
            ("inner-steps", int), ("outer-lr", float), ("outer-momentum", float), ("round-slack", float)]],
        arg("--delta-dtype", choices=["fp32", "bf16", "int8", "int4"], default=None,
            help="pseudo-gradients up and global-weight changes down"),
    ]),
    "eval": (evaluate, [
        arg("model_dir", nargs="?", default=None, metavar="MODEL"),
        arg("--perplexity", action="append", default=None, metavar="FILE", help="text or JSONL; repeatable"),
        arg("--choice", action="append", default=None, metavar="FILE", help="multiple-choice JSONL; repeatable"),
        arg("--generate", dest="generate_files", action="append", default=None, metavar="FILE",
            help="generation JSONL; repeatable"),
        arg("--window", type=int, default=None, help="perplexity window in tokens (default min(2048, context))"),
        arg("--stride", type=int, default=None, help="perplexity stride (default window / 2)"),
        arg("--fewshot", type=int, default=0, help="choice: the first N items become examples"),
        arg("--chat-template", action="store_true", help="choice/generate: wrap questions in the chat template"),
        arg("--max-tokens", type=int, default=64, help="generate: answer length"),
        arg("--max-context", type=int, default=None, help="context to allocate (default min(model's, 4096))"),
        arg("--out", default=None, help="JSON results (default eval-NAME.json)"),
        arg("--compare", nargs="+", default=None, metavar="RESULT", help="print result files side by side"),
        *_RUNTIME,
        *_POOL,
        *_ADAPTER,
    ]),
    "synth": (synth, [
        arg("teacher", metavar="TEACHER", help="the model that writes the data (directory or .gguf)"),
        arg("--out", required=True, help="output chat JSONL (appended to when resuming)"),
        arg("--seeds", default=None, metavar="FILE", help="topics (text lines) or JSONL instruction/topic records"),
        arg("--from-docs", default=None, metavar="DIR", help=".txt/.md files whose passages ground the questions"),
        arg("--self-instruct", action="store_true", help="the teacher invents the instructions (Magpie)"),
        arg("--per-source", type=int, default=1, help="questions per seed topic or passage"),
        arg("--count", type=int, default=100, help="--self-instruct: ask until this many are kept"),
        arg("--temperature", type=float, default=0.7),
        arg("--top-p", type=float, default=0.95),
        arg("--max-tokens", type=int, default=256, help="longest answer; longer ones are dropped as truncated"),
        arg("--instruction-tokens", type=int, default=64, help="longest teacher-written instruction"),
        arg("--seed", type=int, default=0),
        arg("--batch", type=int, default=64, help="tasks in flight at once"),
        arg("--min-chars", type=int, default=8),
        arg("--max-chars", type=int, default=4000),
        arg("--judge-min", type=int, default=None, help="keep answers the teacher rates at least this (1-5)"),
        arg("--save-logits", type=int, default=0, metavar="K", help="keep the teacher's top-K logprobs per token"),
        arg("--system", default=None, help="system message for the answers"),
        arg("--max-concurrency", type=int, default=16, help="sequences decoded together (per copy)"),
        arg("--replicas", type=int, default=0, help="with --pool: N copies of the teacher, each on one device"),
        *_RUNTIME,
        *_POOL,
    ]),
    "merge": (merge, [
        arg("recipe", metavar="CONFIG.yaml", help="a mergekit recipe"),
        arg("--out", required=True, metavar="DIR"),
        arg("--seed", type=int, default=None, help="the random drops of dare_* (mergekit's --random-seed)"),
        arg("--shard-mib", type=int, default=1024, help="largest output shard"),
    ]),
    "merge-search": (merge_search, [
        arg("recipe", metavar="CONFIG.yaml", help="a mergekit recipe: its numbers are the starting point"),
        arg("--out", required=True, metavar="DIR"),
        arg("--budget", type=int, required=True, help="candidates to merge and score"),
        arg("--choice", nargs="+", default=None, metavar="FILE.jsonl", help="multiple-choice tasks (acc)"),
        arg("--generate", dest="generate_files", nargs="+", default=None, metavar="FILE.jsonl",
            help="generation tasks (exact match)"),
        arg("--perplexity", nargs="+", default=None, metavar="FILE", help="texts (-ln perplexity)"),
        arg("--population", type=int, default=None, help="candidates per generation"),
        arg("--seed", type=int, default=0),
        arg("--bounds", nargs="+", default=None, metavar="NAME=LOW:HIGH", help="e.g. weight=-1:2"),
        arg("--skip-layers", action="store_true", help="layer stacking: also search which layers to drop"),
        arg("--threads", type=int, default=None),
        arg("--pool", default=None, metavar="ADDRESS", help="score each generation on the pool's devices"),
        arg("--token", default=None, help="the pool's token (default: $CAIRN_POOL_TOKEN)"),
    ]),
    "import": (gguf_import, [
        arg("gguf_file", metavar="MODEL.gguf"),
        arg("out_dir", metavar="OUT_DIR"),
        arg("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weights as stored"),
        arg("--quantized", action="store_true",
            help="keep Q4_0/Q4_1 matrices as int4 and Q8_0 ones as int8 instead of expanding them"),
    ]),
    "export": (gguf_export, [
        arg("model_dir", metavar="MODEL_DIR"),
        arg("out_file", metavar="OUT.gguf"),
        arg("--type", dest="qtype", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"],
            default="f16", help="weight type (quantized types: every matrix, norms stay f32)"),
    ]),
    "quantize": (quantize, [
        arg("model_dir", metavar="MODEL"),
        arg("out_dir", metavar="OUT_DIR"),
        arg("--bits", type=int, required=True, choices=[8, 4]),
        arg("--group-size", type=int, default=None, help="int4: columns per scale, 32, 64 or 128 (default 32)"),
        arg("--method", default="rtn", help="rtn (round to nearest), awq or gptq (calibrated)"),
        arg("--keep", default="", help='matrices left unquantized, e.g. "lm_head,embed" or "down_proj"'),
        arg("--symmetric", action="store_true", help="int4 without zero points"),
        arg("--scale-dtype", choices=["float32", "bfloat16", "float16"], default=None,
            help="stored scales (default: float32 for int8, bfloat16 for int4)"),
        arg("--calibration", default=None, metavar="FILE", help="awq/gptq: text or JSONL to calibrate on"),
        arg("--samples", type=int, default=32, help="awq/gptq: calibration sequences of 256 tokens"),
    ]),
    "lora merge": (lora_merge, [
        arg("base"),
        arg("adapter"),
        arg("--out", required=True),
        arg("--dtype", choices=["float32", "bfloat16", "float16"], default=None),
    ]),
    "pool start": (pool_start, [
        arg("--port", type=int, default=6380),
        arg("--host", default="127.0.0.1", help="address this node binds to and announces"),
        arg("--device", default="cpu", help="device the head offers (cpu, cuda:0)"),
        arg("--memory", default=None, help="memory budget for that device, e.g. 6GiB (default: 80%% of free)"),
        arg("--no-device", action="store_true", help="the head coordinates only"),
        arg("--num-cpus", type=int, default=None),
        arg("--show-token", action="store_true", help="also print the join token (else: cairn pool token)"),
    ]),
    "pool token": (pool_token, []),
    "pool join": (pool_join, [
        arg("address"),
        arg("--token", default=None, help="the pool's token (default: $CAIRN_POOL_TOKEN)"),
        arg("--host", default="127.0.0.1", help="address this node binds to and announces"),
        arg("--device", default="cpu"),
        arg("--memory", default=None, help="memory budget, e.g. 6GiB (default: 80%% of free)"),
        arg("--num-cpus", type=int, default=None),
    ]),
    "pool status": (pool_status, [
        arg("--address", default=None),
        arg("--token", default=None),
        arg("--json", dest="json_out", action="store_true"),
    ]),
    "pool leave": (pool_leave, [arg("--name", default=None, help="one node (as printed by join)")]),
    "pool stop": (pool_stop, []),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cairn", description="Build, adapt and serve language models on the hardware you own.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (fn, args) in COMMANDS.items():
        doc = (fn.__doc__ or "").strip()
        where = sub
        if " " in name:  # two-word commands: cairn pool start
            group, name = name.split(" ", 1)
            if group not in groups:
                groups[group] = sub.add_parser(group, help=f"{group} commands").add_subparsers(
                    dest="subcommand", required=True, parser_class=_Parser)
            where = groups[group]
        p = where.add_parser(name, help=doc.split(". ")[0], description=doc)
        for a in args:
            p.add_argument(*a.flags, **a.kwargs)
        p.set_defaults(_fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["merge", "search"]:  # `cairn merge search ...`: `merge` itself takes a recipe path
        argv = ["merge-search", *argv[2:]]
    ns = vars(build_parser().parse_args(argv))
    fn = ns.pop("_fn")
    ns.pop("command")
    ns.pop("subcommand", None)
    try:
        return fn(**ns)
    except UserError as e:
        print(f"cairn: error: {e}", file=sys.stderr)
        return 2
    except CairnError as e:
        print(f"cairn: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
