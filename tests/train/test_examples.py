"""The example configs in examples/train parse and run (a couple of steps each, on the tests' tiny model)."""

from pathlib import Path

import pytest

from cairn.train.config import TrainConfig
from cairn.train.loop import train

from .conftest import grammar_sentences, write_jsonl

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("recipe", ["pretrain", "sft", "dpo"])
def test_example_config_runs(base_model, tmp_path, recipe):
    path = EXAMPLES / "train" / f"{recipe}.yaml"
    cfg = TrainConfig.build(path)
    assert cfg.recipe == recipe
    if recipe == "pretrain":  # the demo writes its corpus first; here the test makes one
        data = [str(write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in grammar_sentences(200, 0)]))]
    else:
        data = [str(EXAMPLES.parent / p) for p in cfg.data]
    result = train(TrainConfig.build(path, model=str(base_model), data=data, out=str(tmp_path / "out"),
                                     max_steps=2, seq_len=64, progress=False), log=lambda _: None)
    assert result.steps == 2 and (tmp_path / "out" / "model.safetensors").is_file()
