"""`cairn merge` with GGUF files and LoRA adapters (mergekit's BASE+ADAPTER) as inputs: the same tensors as merging
the directories that `cairn import` and `cairn lora merge` make of them."""

import pytest
import torch
from safetensors.torch import load_file

from cairn.cli import main


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    """A PEFT LoRA adapter on the tiny model with non-zero B (so folding it in changes the weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_gguf_and_lora_inputs_merge_like_their_directories(tiny_model, model_factory, adapter, tmp_path,
                                                         monkeypatch):
    monkeypatch.setenv("CAIRN_CACHE", str(tmp_path / "cache"))
    other = model_factory("llama-untied")
    gguf = tmp_path / "other.gguf"
    assert main(["export", str(other), str(gguf), "--type", "f32"]) == 0
    assert main(["import", str(gguf), str(tmp_path / "imported")]) == 0
    assert main(["lora", "merge", str(tiny_model), str(adapter), "--out", str(tmp_path / "folded")]) == 0
    recipe = "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n" \
             "  - model: {b}\n    parameters: {{weight: 0.7}}\ndtype: float32\n"
    (tmp_path / "refs.yaml").write_text(recipe.format(a=f"{tiny_model}+{adapter}", b=gguf))
    (tmp_path / "dirs.yaml").write_text(recipe.format(a=tmp_path / "folded", b=tmp_path / "imported"))
    assert main(["merge", str(tmp_path / "refs.yaml"), "--out", str(tmp_path / "m1")]) == 0
    assert main(["merge", str(tmp_path / "dirs.yaml"), "--out", str(tmp_path / "m2")]) == 0
    a, b = tensors(tmp_path / "m1"), tensors(tmp_path / "m2")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(tensors(tmp_path / "folded")[q], tensors(tiny_model)[q])  # the adapter counted
    assert len(list((tmp_path / "cache" / "lora").iterdir())) == 1  # folded once, cached


def test_bad_lora_reference_exits_2(tiny_model, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_model}+{tmp_path}\n"
                                     f"    parameters: {{weight: 1.0}}\n")
    assert main(["merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a LoRA adapter directory" in capsys.readouterr().err


def test_values_read_by_position_equal_safetensors_and_truncation_is_caught(tiny_model, tmp_path):
    """The merge reads each tensor's bytes by position (not through the memory map): the same values as safetensors'
    own reader, in every dtype, and a file cut short is an error naming the tensor."""
    import shutil

    from safetensors.torch import save_file

    from cairn.errors import CairnError
    from cairn.merge.inputs import Reader, open_checkpoint

    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    ref = tensors(d)
    mixed = {k: (v.to(torch.bfloat16) if i % 3 == 0 else v.half() if i % 3 == 1 else v)
             for i, (k, v) in enumerate(sorted(ref.items()))}
    for f in d.glob("*.safetensors"):
        f.unlink()
    save_file(mixed, str(d / "model.safetensors"))
    ckpt = open_checkpoint(str(d))
    with Reader() as r:
        for k, v in mixed.items():
            got = r.read(ckpt, k)
            assert got.dtype == v.dtype and torch.equal(got, v), k
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) - 100])
    with Reader() as r, pytest.raises(CairnError, match="truncated|corrupt"):  # the tensor at the end is cut
        for k in mixed:
            r.read(open_checkpoint(str(d)), k)
