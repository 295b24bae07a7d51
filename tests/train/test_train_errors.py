"""Bad input to `cairn train` is a one-line error (exit 2) before any compute, and nothing is written."""

import json
import shutil

import pytest

from cairn.cli import main
from cairn.train.config import TrainConfig

from .conftest import FACTS, chat, write_jsonl


def run(capsys, *args):
    capsys.readouterr()
    code = main(["train", *map(str, args), "--no-progress"])
    return code, capsys.readouterr()


@pytest.fixture
def sft_file(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", [chat(q, a) for q, a in FACTS])


def test_malformed_jsonl_line_is_named_or_skipped(base_model, tmp_path, capsys, sft_file):
    bad = tmp_path / "bad.jsonl"
    lines = sft_file.read_text().splitlines()
    bad.write_text("\n".join([lines[0], '{"messages": [', lines[1], '{"messages": "hi"}']) + "\n")
    out = tmp_path / "out"
    code, io = run(capsys, "--recipe", "sft", "--model", base_model, "--data", bad, "--out", out, "--max-steps", 1)
    assert code == 2 and f"{bad}:2: malformed JSON" in io.err and len(io.err.strip().splitlines()) == 1
    assert not out.exists()
    code, io = run(capsys, "--recipe", "sft", "--model", base_model, "--data", bad, "--out", out, "--max-steps", 1,
                   "--skip-bad-lines", "--eval-fraction", 0)
    assert code == 0 and "2 malformed line(s) skipped" in io.out
    assert (out / "model.safetensors").is_file()


def test_empty_dataset(base_model, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, io = run(capsys, "--recipe", "pretrain", "--model", base_model, "--data", empty, "--out", tmp_path / "o")
    assert code == 2 and "no training examples" in io.err


def test_too_long_refused_or_truncated(base_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "long.jsonl", [chat("Tell me everything.", "word " * 200)])
    args = ["--recipe", "sft", "--model", base_model, "--data", data, "--seq-len", 32, "--max-steps", 1]
    code, io = run(capsys, *args, "--out", tmp_path / "a", "--too-long", "refuse")
    assert code == 2 and f"{data}:1:" in io.err and "longer than seq_len 32" in io.err
    code, io = run(capsys, *args, "--out", tmp_path / "b", "--eval-fraction", 0)
    assert code == 0 and "1 sequence(s) longer than seq_len 32 were truncated" in io.out


def test_sft_needs_a_chat_template(base_model, tmp_path, capsys, sft_file):
    model = tmp_path / "no-template"
    shutil.copytree(base_model, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    code, io = run(capsys, "--recipe", "sft", "--model", model, "--data", sft_file, "--out", tmp_path / "o")
    assert code == 2 and "no chat template" in io.err


def test_tokenizer_larger_than_the_embedding(base_model, tmp_path, capsys, sft_file):
    model = tmp_path / "mismatch"
    shutil.copytree(base_model, model)
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(f"w{i}x{i * 7}" for i in range(3000)))
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "1200", "--out", str(model)]) == 0
    code, io = run(capsys, "--recipe", "sft", "--model", model, "--data", sft_file, "--out", tmp_path / "o")
    assert code == 2 and "must come from the same checkpoint" in io.err


def test_existing_run_needs_resume(base_model, tmp_path, capsys, sft_file):
    args = ["--recipe", "sft", "--model", base_model, "--data", sft_file, "--out", tmp_path / "o", "--max-steps", 1]
    assert run(capsys, *args)[0] == 0
    code, io = run(capsys, *args)
    assert code == 2 and "--resume" in io.err


def test_config_file_and_flags(base_model, tmp_path, capsys, sft_file):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"recipe: sft\nmodel: {base_model}\ndata: [{sft_file}]\nout: {tmp_path / 'o'}\nlr: 1.0e-3\n"
                   "lora_rank: 4\nlora_targets: [q_proj, v_proj]\n")
    built = TrainConfig.build(cfg, lr=2e-3)
    assert built.lr == 2e-3 and built.lora_rank == 4 and built.lora_targets == ("q_proj", "v_proj")
    cfg.write_text(cfg.read_text() + "learning_rate: 3\n")
    code, io = run(capsys, cfg)
    assert code == 2 and "unknown training option 'learning_rate'" in io.err
    code, io = run(capsys, cfg.with_name("missing.yaml"))
    assert code == 2 and "does not exist" in io.err
    code, io = run(capsys, "--recipe", "sft", "--model", base_model, "--data", sft_file)
    assert code == 2 and "out is required" in io.err
    code, io = run(capsys, "--recipe", "sft", "--model", base_model, "--data", sft_file, "--out", tmp_path / "x",
                   "--lora-rank", 2, "--lora-targets", "qkv")
    assert code == 2 and "unknown module 'qkv'" in io.err


def test_distributed_section(base_model, tmp_path, capsys, sft_file):
    cfg = tmp_path / "run.yaml"
    head = f"recipe: sft\nmodel: {base_model}\ndata: [{sft_file}]\nout: {tmp_path / 'o'}\n"
    cfg.write_text(head + "distributed:\n  pool: 127.0.0.1:6380\n  workers: 3\n  inner_steps: 50\n  sync: every-step\n")
    built = TrainConfig.build(cfg, workers=2)
    assert (built.pool, built.workers, built.inner_steps, built.sync) == ("127.0.0.1:6380", 2, 50, "every-step")
    for body, why in (("distributed: 3\n", "must be a mapping"),
                      ("workers: 2\ndistributed:\n  workers: 3\n", "both at the top level and under distributed"),
                      ("distributed:\n  lr: 3\n", "unknown distributed option 'lr'"),
                      ("distributed:\n  pool: 6380\n  workers: 2\n", "HOST:PORT")):
        cfg.write_text(head + body)
        code, io = run(capsys, cfg)
        assert code == 2 and why in io.err, io.err
