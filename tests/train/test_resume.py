"""Checkpoints: an interrupted run resumed from its last checkpoint ends with the same weights, bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cairn.train import state
from cairn.train.config import TrainConfig
from cairn.train.loop import train

from .conftest import FACTS, chat, grammar_sentences, write_jsonl


class Interrupt(Exception):
    pass


def _weights(out):
    name = "adapter/adapter_model.safetensors" if (out / "adapter").is_dir() else "model.safetensors"
    return load_file(str(out / name))


RUNS = {
    "pretrain-full": dict(recipe="pretrain", seq_len=32, batch_size=4, grad_accum=2, weight_decay=0.1),
    "sft-lora-dropout": dict(recipe="sft", batch_size=3, lora_rank=4, lora_dropout=0.2, lora_merge=False),
    "dpo-full": dict(recipe="dpo", batch_size=2),
}


@pytest.mark.parametrize("run", RUNS)
def test_resume_is_bit_exact(base_model, tmp_path, run):
    pretrain = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in grammar_sentences(80, 3)])
    sft = write_jsonl(tmp_path / "s.jsonl", [chat(q, a) for q, a in FACTS])
    dpo = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "chosen": a, "rejected": "no."} for q, a in FACTS])
    data = {"pretrain": pretrain, "sft": sft, "dpo": dpo}[RUNS[run]["recipe"]]

    def config(out, resume=False):
        return TrainConfig.build(model=str(base_model), data=[str(data)], out=str(tmp_path / out), max_steps=7,
                                 lr=3e-3, warmup_steps=2, save_every=2, eval_every=3, seed=4, resume=resume,
                                 progress=False, **RUNS[run])

    train(config("straight"), log=lambda _: None)

    def stop_at_5(m):
        if m["step"] == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config("broken"), on_step=stop_at_5, log=lambda _: None)
    assert state.latest(tmp_path / "broken" / "checkpoints").name == "step-00000004"
    logs, steps = [], []
    train(config("broken", resume=True), on_step=lambda m: steps.append(m["step"]), log=logs.append)
    assert any("resumed" in line and "step 4" in line for line in logs) and steps == [5, 6, 7]

    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "broken")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(x) for x in (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [m["step"] for m in straight]
    assert [m.get("loss") for m in metrics] == [m.get("loss") for m in straight]


def test_half_written_checkpoint_is_ignored(base_model, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in grammar_sentences(40, 3)])
    cfg = TrainConfig.build(recipe="pretrain", model=str(base_model), data=[str(data)], out=str(tmp_path / "o"),
                            max_steps=2, seq_len=32, batch_size=4, save_every=1, progress=False)
    train(cfg, log=lambda _: None)
    ckpts = tmp_path / "o" / "checkpoints"
    (ckpts / "step-00000009.tmp").mkdir()  # a crash while writing step 9
    assert state.latest(ckpts).name == "step-00000002"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000001", "step-00000002", "step-00000009.tmp"]


def test_seek_continues_the_schedule_where_a_run_is(base_model, tmp_path):
    """What a pool worker that joins mid-run does: the learning rate it uses at step k is that of an uninterrupted
    run at step k."""
    from cairn.train.loop import Trainer, prepare

    data = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in grammar_sentences(80, 3)])
    cfg = TrainConfig.build(recipe="pretrain", model=str(base_model), data=[str(data)], out=str(tmp_path / "o"),
                            seq_len=32, batch_size=4, max_steps=12, warmup_steps=3, lr=1e-3, progress=False)
    cfg, model_cfg, _, ds, total = prepare(cfg)
    walked, jumped = Trainer(cfg, model_cfg, ds, total), Trainer(cfg, model_cfg, ds, total)
    lrs = [walked.step()["lr"] for _ in range(7)]
    jumped.seek(5)
    assert jumped.step()["lr"] == pytest.approx(lrs[5]) and jumped.step()["lr"] == pytest.approx(lrs[6])
    assert jumped.step_count == walked.step_count == 7
