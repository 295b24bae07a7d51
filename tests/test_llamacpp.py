"""llama.cpp (llama-cpp-python, built from source by the test command) as the oracle of GGUF files: cairn's f32
and f16 exports give the same greedy tokens in llama.cpp as in cairn, every quantized export loads and runs, the
real model's tokenizer agrees, and K-quant files made by llama.cpp's own quantizer import into cairn."""

import ctypes

import llama_cpp
import numpy as np
import pytest

from cairn.cli import main
from cairn.config import EngineConfig, SamplingParams
from cairn.engine.api import LLM
from cairn.models import gguf as G
from cairn.models.init import init_model

PROMPT = "The engineer builds a wooden boat near the river"


def load(path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_threads=2, n_ctx=256, verbose=False, **kw)


def llama_cpp_greedy(model, ids: list[int], n: int) -> list[int]:
    out = []
    for t in model.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(t)
        if len(out) == n:
            break
    return out


def cairn_greedy(model_dir, ids: list[int], n: int) -> list[int]:
    with LLM(model_dir, EngineConfig(max_seqs=1, max_context=256)) as llm:
        return llm.submit(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)).result().token_ids


def export(src, file, qtype):
    assert main(["export", str(src), str(file), "--type", qtype]) == 0
    return file


def reimport(file, out):
    assert main(["import", str(file), str(out)]) == 0
    return out


@pytest.mark.parametrize("variant", ["llama", "llama-untied", "qwen2", "llama-bias"])
def test_f32_export_greedy_tokens_equal_cairn(model_factory, tmp_path, variant):
    src = model_factory(variant)
    file = export(src, tmp_path / "m.gguf", "f32")
    with LLM(src, EngineConfig(max_seqs=1)) as llm:
        ids = llm.encode_prompt(PROMPT)
    assert llama_cpp_greedy(load(file), ids, 24) == cairn_greedy(src, ids, 24)


def test_f16_export_greedy_tokens_equal_cairn_on_the_same_weights(model_factory, tmp_path):
    file = export(model_factory("llama"), tmp_path / "m.gguf", "f16")
    back = reimport(file, tmp_path / "back")  # the f16 weights llama.cpp runs, in cairn
    with LLM(back, EngineConfig(max_seqs=1)) as llm:
        ids = llm.encode_prompt(PROMPT)
    assert llama_cpp_greedy(load(file), ids, 24) == cairn_greedy(back, ids, 24)


def test_real_model_f16_export_and_tokenizer_agree_with_llama_cpp(smollm2_dir, tmp_path):
    file = export(smollm2_dir, tmp_path / "smol-f16.gguf", "f16")
    back = reimport(file, tmp_path / "back")
    model = load(file)
    with LLM(back, EngineConfig(max_seqs=1)) as llm:
        chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
        for text in [PROMPT, "  Ünïcödé, 数字 1234567 and emoji 🙂\n\n", chat]:
            assert model.tokenize(text.encode(), add_bos=False, special=True) == llm.tokenizer.encode(text), text
        ids = llm.tokenizer.encode(chat)
    got, want = llama_cpp_greedy(model, ids, 16), cairn_greedy(back, ids, 16)
    assert got == want, (got, want)


def llama_cpp_logprobs(file, ids: list[int]) -> np.ndarray:
    """llama.cpp's logprob of each of ids[1:] given the ones before it."""
    model = load(file, logits_all=True)
    model.reset()
    model.eval(ids)
    logits = np.asarray(model.scores[: len(ids)])  # (T, V)
    top = logits.max(-1, keepdims=True)
    logsm = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return logsm[np.arange(len(ids) - 1), ids[1:]]


def cairn_logprobs(model_dir, ids: list[int]) -> np.ndarray:
    with LLM(model_dir, EngineConfig(max_seqs=1)) as llm:
        return np.array(llm.score(ids)[0])


def assert_same_model(file, back, src, ids):
    """llama.cpp on `file` agrees with cairn on `back` (the same quantized weights, dequantized exactly) within
    what llama.cpp's own activation rounding (q8 blocks for quantized dot products) explains, and much more closely
    than with the unquantized source: the file holds the weights cairn read from it, in the right places."""
    got, same, orig = llama_cpp_logprobs(file, ids), cairn_logprobs(back, ids), cairn_logprobs(src, ids)
    err, quant_err = np.abs(got - same).mean(), np.abs(same - orig).mean()
    print("llama.cpp vs cairn", err, np.abs(got - same).max(), "quantization", quant_err)
    assert err < 0.1 and np.abs(got - same).max() < 0.5, (err, got, same)
    return err, quant_err


@pytest.mark.parametrize("qtype", ["bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_every_quantized_export_runs_in_llama_cpp_as_in_cairn(model_factory, tmp_path, qtype):
    src = model_factory("llama", shape="small")  # 256-wide rows: every matrix is quantized
    file = export(src, tmp_path / f"m-{qtype}.gguf", qtype)
    back = reimport(file, tmp_path / "back")
    with LLM(src, EngineConfig(max_seqs=1)) as llm:
        ids = llm.encode_prompt(PROMPT * 2)
    err, quant_err = assert_same_model(file, back, src, ids)
    if qtype.startswith("q4"):  # 4-bit rounding moves the model more than llama.cpp's arithmetic does
        assert err < 0.5 * quant_err, (err, quant_err)


@pytest.mark.parametrize("ftype, name", [(llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q4_K"),
                                         (llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K, "Q6_K"),
                                         (llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M, "Q3_K")])
def test_k_quants_from_llama_cpp_import_into_cairn(tmp_path, ftype, name):
    src = tmp_path / "src"
    init_model(src, shape="small", seed=3, init_std=0.1, intermediate_size=512)  # widths multiples of 256
    f32 = export(src, tmp_path / "m-f32.gguf", "f32")
    kq = tmp_path / f"m-{name}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(kq).encode(), ctypes.byref(params)) == 0
    types = {t.tensor_type.name for t in G.gguf.GGUFReader(kq).tensors}
    assert name in types, types
    back = reimport(kq, tmp_path / "back")
    with LLM(back, EngineConfig(max_seqs=1)) as llm:
        ids = llm.encode_prompt(PROMPT * 2)
    err, quant_err = assert_same_model(kq, back, src, ids)
    assert err < 0.5 * quant_err, (err, quant_err)
