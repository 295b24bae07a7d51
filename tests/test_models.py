"""The model runtime against transformers' own implementation, loaded from the same directory."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cairn.config import EngineConfig, ModelConfig, SamplingParams
from cairn.engine.api import LLM
from cairn.engine.runner import Chunk
from cairn.errors import ModelLoadError, UnsupportedModelError
from cairn.models.checkpoint import load_stage, save_checkpoint
from cairn.models.llama import full_forward
from tests.conftest import VARIANTS


@pytest.fixture
def hf_model():
    """The oracle: transformers' own model loaded from a directory (only the tests that compare need it)."""
    transformers = pytest.importorskip("transformers")

    def load(path, dtype=torch.float32):
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    return load


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(model_factory, variant, hf_model):
    path = model_factory(variant)
    cfg = ModelConfig.from_hf_dir(path)
    stage = load_stage(path, cfg)
    ref = hf_model(path)
    ids = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = full_forward(stage, ids), ref(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", ["llama", "mistral-window", "qwen2", "llama3-rope"])
def test_cached_engine_path_matches_transformers(model_factory, variant, hf_model):
    """Prefill in chunks, then decode token by token through the KV cache: every logit row equals the reference."""
    path = model_factory(variant)
    llm = LLM(path, EngineConfig(max_seqs=2, max_context=128))
    try:
        ids = torch.randint(0, llm.model_config.vocab_size, (30,), generator=torch.Generator().manual_seed(1)).tolist()
        with torch.no_grad():
            ref = hf_model(path)(torch.tensor([ids])).logits[0]  # (T, V)
        runner = llm.runner
        rows = [runner.forward([Chunk(1, 0, tuple(ids[:7]))])[0], runner.forward([Chunk(1, 7, tuple(ids[7:20]))])[0]]
        for t in range(20, 30):
            rows.append(runner.forward([Chunk(1, t, (ids[t],))])[0])
        want = torch.stack([ref[6], ref[19], *ref[20:30]])
        assert (torch.stack(rows) - want).abs().max().item() < 1e-4
    finally:
        llm.close()


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral-window"])
def test_greedy_generation_identical_to_transformers(model_factory, variant, hf_model):
    path = model_factory(variant)
    prompt = "The engineer builds a wooden boat"
    with LLM(path) as llm:
        ours = llm.submit(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)).result()
        ids = torch.tensor([llm.encode_prompt(prompt)])
    ref = hf_model(path)
    out = ref.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.token_ids == out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("penalty", [1.3, 5.0])
def test_repetition_penalty_identical_to_transformers(model_factory, hf_model, penalty):
    """transformers' repetition penalty (CTRL's, over prompt and output) is the oracle for ours."""
    path = model_factory("llama")
    with LLM(path) as llm:
        ids = llm.encode_prompt("The engineer builds a wooden boat")
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=penalty)
        ours = llm.submit(ids, params).result().token_ids
        plain = llm.submit(ids, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)).result().token_ids
    out = hf_model(path).generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                  repetition_penalty=penalty, eos_token_id=None, pad_token_id=0)
    assert ours == out[0, len(ids):].tolist()
    assert ours != plain  # the penalty acted


def test_bf16_close_to_transformers_bf16(model_factory, hf_model):
    path = model_factory("llama")
    cfg = ModelConfig.from_hf_dir(path)
    stage = load_stage(path, cfg, dtype="bfloat16")
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = full_forward(stage, ids), hf_model(path, torch.bfloat16)(ids).logits.float()
    fp32 = full_forward(load_stage(path, cfg), ids)
    assert (ours - theirs).abs().max().item() < 0.1
    assert (ours - fp32).abs().max().item() < 0.1


def test_round_trip_is_exact(model_factory, tmp_path):
    src = model_factory("qwen2")
    cfg = ModelConfig.from_hf_dir(src)
    save_checkpoint(load_stage(src, cfg), tmp_path)
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_sharded_checkpoint_loads_in_cairn_and_transformers(model_factory, tmp_path, hf_model):
    src = model_factory("llama-untied")
    cfg = ModelConfig.from_hf_dir(src)
    save_checkpoint(load_stage(src, cfg), tmp_path, max_shard_bytes=100_000)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (tmp_path / f).write_bytes((src / f).read_bytes())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = full_forward(load_stage(tmp_path, cfg), ids)
        theirs = hf_model(tmp_path)(ids).logits
        orig = full_forward(load_stage(src, cfg), ids)
    assert torch.equal(ours, orig)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_partial_stages_compose_to_whole_model(model_factory):
    from cairn.models.llama import CausalContext
    from cairn.types import LayerRange

    path = model_factory("llama")
    cfg = ModelConfig.from_hf_dir(path)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    ctx = CausalContext(cfg, 2, 12, "cpu")
    first, second = load_stage(path, cfg, LayerRange(0, 1)), load_stage(path, cfg, LayerRange(1, cfg.num_layers))
    assert first.lm_head is None and second.embed_tokens is None
    with torch.no_grad():
        assert torch.allclose(second(first(ids, ctx), ctx), full_forward(load_stage(path, cfg), ids))


# ----- bad checkpoints: each a clear ModelLoadError naming what is wrong


def _copy(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(tmp_path)


def test_corrupt_weight_file_is_named(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors.*(corrupt|truncated)"):
        LLM(d)


def test_missing_weight_file_and_tensor_are_named(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path)
    from safetensors.torch import save_file

    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.down_proj.weight"):
        LLM(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors is missing"):
        LLM(d)
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        LLM(d)


def test_unsupported_architecture_is_named(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLM(d)
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], rope_scaling={"rope_type": "yarn", "factor": 4})
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        LLM(d)


def test_shape_mismatch_is_named(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="gate_proj.weight.*shape"):
        LLM(d)


# ----- random initialisation and the device helper


@pytest.mark.parametrize("variant", ["qwen2", "llama-bias"])
def test_init_model_biases_are_zero_unless_asked(tmp_path, variant):
    from cairn.models.init import init_model

    arch, overrides = VARIANTS[variant]
    init_model(tmp_path / "zero", arch=arch, seed=0, corpus=["a tiny corpus, a tiny corpus"] * 50, **overrides)
    tensors = load_file(tmp_path / "zero" / "model.safetensors")
    biases = {k: t for k, t in tensors.items() if k.endswith(".bias")}
    assert biases and all(torch.count_nonzero(t) == 0 for t in biases.values())
    assert all(torch.equal(t, torch.ones_like(t)) for k, t in tensors.items() if k.endswith("norm.weight"))
    weights = [t for k, t in tensors.items() if k.endswith("proj.weight")]
    assert all(0.01 < t.std().item() < 0.03 for t in weights)  # N(0, 0.02)
    init_model(tmp_path / "rand", arch=arch, seed=0, corpus=["a tiny corpus, a tiny corpus"] * 50, bias_std=0.1,
               **overrides)
    rand = load_file(tmp_path / "rand" / "model.safetensors")
    assert all(0.05 < rand[k].std().item() < 0.2 for k in biases)


def test_device_names_are_checked(monkeypatch):
    from cairn.errors import UserError
    from cairn.models.device import torch_device

    assert torch_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "", "meta"):
        with pytest.raises(UserError, match="device"):
            torch_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no usable CUDA device") as e:
        torch_device("cuda:0")
    assert e.value.param == "device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert torch_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UserError, match="2 CUDA device"):
        torch_device("cuda:2")
