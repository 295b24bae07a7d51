"""LoRA: only adapters train, the adapter is PEFT's layout (PEFT itself is the oracle), merging is exact."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cairn.cli import main
from cairn.config import ModelConfig
from cairn.models.checkpoint import load_stage
from cairn.models.llama import full_forward
from cairn.train import lora
from cairn.train.config import LORA_TARGETS, TrainConfig
from cairn.train.loop import Trainer, prepare, train

from .conftest import FACTS, chat, write_jsonl


@pytest.fixture(scope="module")
def lora_run(base_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    data = write_jsonl(tmp / "sft.jsonl", [chat(q, a) for q, a in FACTS])
    cfg = TrainConfig.build(recipe="sft", model=str(base_model), data=[str(data)], out=str(tmp / "out"),
                            batch_size=4, max_steps=20, lr=5e-3, lora_rank=4, lora_alpha=8,
                            lora_targets=list(LORA_TARGETS), eval_fraction=0, progress=False)
    train(cfg, log=lambda _: None)
    return cfg, tmp / "out"


def ids(n=2, t=12):
    return torch.randint(3, 300, (n, t), generator=torch.Generator().manual_seed(5))


def test_only_adapter_parameters_train(base_model, lora_run):
    cfg, out = lora_run
    trainer = Trainer(*_prepared(cfg))
    assert trainer.params and all(".lora_A." in n or ".lora_B." in n for n in trainer.params)
    base, merged = load_file(str(base_model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert base.keys() == merged.keys()
    for name, t in base.items():
        targeted = any(f".{m}." in name for m in LORA_TARGETS)
        assert torch.equal(t, merged[name]) != targeted, name


def _prepared(cfg):
    cfg, model_cfg, _, data, total = prepare(cfg)
    return cfg, model_cfg, data, total


def test_merged_checkpoint_equals_base_plus_adapter(base_model, lora_run):
    _, out = lora_run
    cfg = ModelConfig.from_hf_dir(base_model)
    stage = load_stage(base_model, cfg)
    wrapped = lora.attach(stage, lora.LoraSpec(4, 8.0, 0.0, LORA_TARGETS))
    adapter_cfg, tensors = lora.read_adapter(out / "adapter")
    lora.load_adapter_state(wrapped, stage, tensors)
    with torch.no_grad():
        with_adapter = full_forward(stage.eval(), ids())
        merged = full_forward(load_stage(out, cfg), ids())
        lora.set_enabled(wrapped, False)
        plain = full_forward(stage, ids())
    assert (with_adapter - plain).abs().max() > 1e-2  # the adapter learned something
    torch.testing.assert_close(merged, with_adapter, atol=1e-4, rtol=0)


def test_peft_loads_the_adapter_and_gives_the_same_logits(base_model, lora_run):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    _, out = lora_run
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_model, torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, out / "adapter").eval()
    with torch.no_grad():
        theirs = model(ids()).logits
        ours = full_forward(load_stage(out, ModelConfig.from_hf_dir(out)), ids())
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_cli_merge_matches_the_trainer_merge(lora_run, base_model, tmp_path):
    _, out = lora_run
    assert main(["lora", "merge", str(base_model), str(out / "adapter"), "--out", str(tmp_path / "m")]) == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "m" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "m" / "tokenizer.json").is_file()


def test_merge_formula_by_hand():
    W = torch.randn(6, 4)
    A, B = torch.randn(2, 4), torch.randn(6, 2)
    key = "base_model.model.model.layers.0.mlp.down_proj"
    merged = lora.merge_state({"model.layers.0.mlp.down_proj.weight": W},
                              {f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B}, {"r": 2, "lora_alpha": 6})
    torch.testing.assert_close(merged["model.layers.0.mlp.down_proj.weight"], W + 3.0 * B @ A)


def test_merge_refuses_bad_adapters(base_model, tmp_path, capsys):
    assert main(["lora", "merge", str(base_model), str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "use_dora": true}')
    assert main(["lora", "merge", str(base_model), str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "DoRA" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# ----- QLoRA: adapters on a frozen quantized base


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_passes_the_dequantized_gradient_to_its_input(bits):
    """A quantized base layer is frozen but differentiable in its input: grad_x = grad_y W with W the weights the
    kernel multiplies by (bf16 activations: within 2% of the largest gradient)."""
    from cairn.quant.layers import QuantLinear
    from cairn.quant.weights import QuantFormat, dequantize, quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g) * 0.1
    qw = quantize(w, QuantFormat(bits, 32 if bits == 4 else None))
    layer = QuantLinear(qw, None, "cpu")
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    upstream = torch.randn(5, 96, generator=g)
    (layer(x) * upstream).sum().backward()
    want = upstream @ dequantize(qw)
    assert (x.grad - want).abs().max() < 0.02 * want.abs().max()


@pytest.mark.parametrize("args", [["--bits", "8"], ["--bits", "4", "--group-size", "32", "--keep", "down_proj"]],
                         ids=["int8", "int4"])
def test_qlora_trains_adapters_on_a_quantized_base_and_merges_into_its_weights(base_model, tmp_path, args):
    """`cairn train` with lora on a quantized checkpoint: the base stays frozen and quantized, the adapters learn,
    and the merged checkpoint is the base's dequantized weights plus the adapters (float, loadable anywhere)."""
    from cairn.models.checkpoint import read_tensors, weight_map
    from cairn.models.quantize import dequantize_checkpoint

    q, twin = tmp_path / "q", tmp_path / "twin"
    assert main(["quantize", str(base_model), str(q), *args]) == 0
    dequantize_checkpoint(q, twin)
    data = write_jsonl(tmp_path / "sft.jsonl", [chat(qq, a) for qq, a in FACTS])
    losses = {}
    for name, model in {"qlora": q, "float twin": twin}.items():  # the oracle: LoRA on the same weights in float
        cfg = TrainConfig.build(recipe="sft", model=str(model), data=[str(data)], out=str(tmp_path / name),
                                batch_size=4, max_steps=20, lr=5e-3, lora_rank=4, lora_alpha=8,
                                lora_targets=list(LORA_TARGETS), eval_fraction=0, progress=False)
        train(cfg, log=lambda _: None)
        losses[name] = [json.loads(line)["loss"] for line in
                        (tmp_path / name / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses["qlora"][-1] < 0.95 * losses["qlora"][0]  # it learns (6.21 -> 5.72 here)
    # as LoRA on the twin does, step by step (the kernels' bf16 activations: ~1e-4 apart here)
    assert losses["qlora"] == pytest.approx(losses["float twin"], rel=0.01)
    out = tmp_path / "qlora"
    assert not ModelConfig.from_hf_dir(out).raw.get("quantization_config")
    adapter_cfg, adapter = lora.read_adapter(out / "adapter")
    want = lora.merge_state(read_tensors(twin, list(weight_map(twin))), adapter, adapter_cfg)
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)


def test_training_a_quantized_base_without_lora_exits_2(base_model, tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", str(base_model), str(q), "--bits", "8"]) == 0
    data = write_jsonl(tmp_path / "sft.jsonl", [chat(qq, a) for qq, a in FACTS])
    code = main(["train", "--recipe", "sft", "--model", str(q), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "lora" in err and len(err.strip().splitlines()) == 1
