"""Prompt tuning and prefix tuning: adapters in PEFT's layout that PEFT loads to the same logits, trained by
`cairn train`, and served by cairn's engine without merging (greedy tokens and scores against PEFT's model)."""

import json

import pytest
import torch

from cairn.cli import main
from cairn.config import EngineConfig, ModelConfig, SamplingParams
from cairn.engine.api import LLM
from cairn.models.checkpoint import load_stage
from cairn.models.llama import full_forward
from cairn.models.virtual import VirtualTokens, load_adapter, save_adapter

from .conftest import FACTS, chat, grammar_sentences, write_jsonl


@pytest.fixture(scope="module")
def lm(base_model, tmp_path_factory):
    """The tiny base model after some pretraining (a random model ignores its context, so no prompt can steer
    it): text of the tests' grammar and the facts' words."""
    tmp = tmp_path_factory.mktemp("pt-base")
    text = write_jsonl(tmp / "t.jsonl", [{"text": t} for t in grammar_sentences(300, 1)]
                       + [{"text": f"{q} {a}"} for q, a in FACTS] * 10)
    assert main(["train", "--recipe", "pretrain", "--model", str(base_model), "--data", str(text), "--out",
                 str(tmp / "lm"), "--seq-len", "64", "--batch-size", "8", "--max-steps", "80", "--lr", "3e-3",
                 "--no-progress", "--eval-fraction", "0"]) == 0
    return tmp / "lm"


def peft_model(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()


def cairn_logits(base, adapter, ids: list[int]) -> torch.Tensor:
    cfg = ModelConfig.from_hf_dir(base)
    stage = load_stage(base, cfg)
    stage.virtual = load_adapter(adapter, cfg)
    with torch.no_grad():
        return full_forward(stage, torch.tensor([stage.virtual.ids + ids]))[0, stage.virtual.n :]


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_adapter_layout_is_pefts(base_model, tmp_path, kind):
    cfg = ModelConfig.from_hf_dir(base_model)
    assert cfg.num_kv_heads < cfg.num_heads  # grouped-query attention: PEFT's prefix layout differs there
    vt = VirtualTokens(cfg, kind, 5)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in vt.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    save_adapter(tmp_path / "a", vt, cfg, str(base_model))
    ids = [3, 17, 40, 5, 9, 12, 30]
    with torch.no_grad():
        ref = peft_model(base_model, tmp_path / "a")(input_ids=torch.tensor([ids])).logits[0, -len(ids) :]
    assert torch.allclose(cairn_logits(base_model, tmp_path / "a", ids), ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_trained_adapter_is_served_unmerged_like_peft_runs_it(lm, tmp_path, kind):
    base_model = lm
    data = write_jsonl(tmp_path / "facts.jsonl", [chat(q, a) for q, a in FACTS] * 4)
    out = tmp_path / "out"
    flag = ["--prompt-tuning", "6", "--prompt-init-text", "Answer the question", "--lr", "0.01"] \
        if kind == "prompt" else ["--prefix-tuning", "6", "--lr", "0.1"]
    code = main(["train", "--recipe", "sft", "--model", str(base_model), "--data", str(data), "--out", str(out),
                 "--seq-len", "64", "--batch-size", "8", "--max-steps", "40", "--no-progress",
                 "--eval-fraction", "0", *flag])
    assert code == 0
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.25, losses  # the adapter learns (the base stays frozen)
    adapter = out / "adapter"
    meta = json.loads((adapter / "adapter_config.json").read_text())
    assert meta["peft_type"] == {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}[kind]
    assert not (out / "model.safetensors").exists()
    pm = peft_model(base_model, adapter)
    with LLM(base_model, EngineConfig(adapter=str(adapter), max_seqs=4)) as llm:
        prompt = llm.render_chat([{"role": "user", "content": FACTS[0][0]}])
        # greedy decoding: cairn's engine (paged KV, virtual tokens as a cached prefix) against PEFT's forward
        seq = list(prompt)
        for _ in range(8):
            with torch.no_grad():
                seq.append(int(pm(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        first = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
        assert first.token_ids == seq[len(prompt) :]
        again = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
        assert again.token_ids == first.token_ids and again.cached_tokens >= 6  # the virtual prefix is reused
        assert first.prompt_tokens == len(prompt)
        with torch.no_grad():
            ref = torch.log_softmax(pm(input_ids=torch.tensor([seq])).logits[0, -len(seq) : -1], -1)  # real rows
        logprobs, _ = llm.score(seq)
        want = ref.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(logprobs), want, atol=1e-4)
        with pytest.raises(Exception, match="must be in"):
            llm.submit([llm.virtual[0]], SamplingParams(max_tokens=1))
    assert main(["generate", str(base_model), "--prompt", "Where does Anna", "--max-tokens", "4", "--adapter",
                 str(adapter)]) == 0


def test_adapter_errors(base_model, tmp_path, capsys):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert main(["generate", str(base_model), "--prompt", "x", "--adapter", str(tmp_path / "lora")]) == 2
    assert "cairn lora merge" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "d.jsonl", [chat(q, a) for q, a in FACTS])
    assert main(["train", "--recipe", "sft", "--model", str(base_model), "--data", str(data), "--out",
                 str(tmp_path / "o"), "--prompt-tuning", "4", "--lora-rank", "4", "--max-steps", "1"]) == 2
