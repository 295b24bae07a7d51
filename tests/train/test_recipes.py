"""Training recipes learn: pretraining beats a unigram model, SFT answers questions, DPO prefers chosen answers."""

import json
import math
from collections import Counter

from cairn.cli import main
from cairn.models.tokenizer import Tokenizer
from cairn.train.config import TrainConfig
from cairn.train.loop import train

from .conftest import FACTS, chat, grammar_sentences, write_jsonl


def unigram_loss(tok: Tokenizer, train_texts: list[str], eval_texts: list[str]) -> float:
    """Cross-entropy (nats/token) of an add-one unigram model fit on the training text, on the eval text."""
    counts = Counter(t for s in train_texts for t in tok.encode(s))
    total, vocab = sum(counts.values()), tok.vocab_size
    ids = [t for s in eval_texts for t in tok.encode(s)]
    return -sum(math.log((counts[t] + 1) / (total + vocab)) for t in ids) / len(ids)


def test_pretrain_beats_unigram_baseline(base_model, tmp_path):
    train_texts, eval_texts = grammar_sentences(600, 1), grammar_sentences(60, 2)
    write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in train_texts])
    write_jsonl(tmp_path / "eval.jsonl", [{"text": t} for t in eval_texts])
    cfg = TrainConfig.build(recipe="pretrain", model=str(base_model), data=[str(tmp_path / "train.jsonl")],
                            eval_data=[str(tmp_path / "eval.jsonl")], out=str(tmp_path / "out"), seq_len=64,
                            batch_size=8, max_steps=100, lr=3e-3, warmup_steps=10, eval_every=50, progress=False)
    result = train(cfg, log=lambda _: None)
    baseline = unigram_loss(Tokenizer.from_dir(base_model), train_texts, eval_texts)
    assert result.eval["eval_loss"] < 0.5 * baseline, (result.eval, baseline)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "eval_loss" in m] == [50, 100]
    assert (tmp_path / "out" / "loss.png").stat().st_size > 1000


def test_sft_answers_held_in_questions_through_generate(base_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", [chat(q, a) for q, a in FACTS])
    code = main(["train", "--recipe", "sft", "--model", str(base_model), "--data", str(data), "--out",
                 str(tmp_path / "sft"), "--batch-size", "8", "--max-steps", "150", "--lr", "3e-3", "--warmup-steps",
                 "10", "--eval-fraction", "0", "--no-progress"])
    assert code == 0
    tok = Tokenizer.from_dir(tmp_path / "sft")
    for q, a in FACTS:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        capsys.readouterr()
        assert main(["generate", str(tmp_path / "sft"), "--prompt", prompt, "--max-tokens", "16", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["text"].strip() == a and out["finish_reason"] == "stop", (q, out["text"])


def test_dpo_raises_chosen_margin_on_held_out_pairs(base_model, tmp_path):
    def pairs(names):
        return [{"prompt": f"Can you help {n} with the map?", "chosen": "yes, gladly.", "rejected": "no. I refuse."}
                for n in names]

    train_names = ["Anna", "Bruno", "Clara", "David", "Emma", "Felix", "Greta", "Hugo"]
    write_jsonl(tmp_path / "train.jsonl", pairs(train_names))
    write_jsonl(tmp_path / "eval.jsonl", pairs(["Ida", "Jonas", "Karl", "Lena"]))
    cfg = TrainConfig.build(recipe="dpo", model=str(base_model), data=[str(tmp_path / "train.jsonl")],
                            eval_data=[str(tmp_path / "eval.jsonl")], out=str(tmp_path / "dpo"), batch_size=4,
                            max_steps=60, lr=2e-3, dpo_beta=0.1, lora_rank=8, lora_alpha=16,
                            lora_targets=["q_proj", "v_proj", "o_proj", "down_proj"], progress=False)
    result = train(cfg, log=lambda _: None)
    lines = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["reward_margin"] == 0.0  # LoRA starts at the base model, which is the reference
    # Before training every margin is 0 and the DPO loss is log 2; after, held-out pairs prefer the chosen answer.
    assert result.eval["eval_reward_margin"] > 0.5 and result.eval["eval_reward_accuracy"] == 1.0, result.eval
    assert result.eval["eval_loss"] < 0.6 * math.log(2)
