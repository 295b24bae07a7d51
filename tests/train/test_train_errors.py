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


@pytest.mark.parametrize("change, needle", [
    ({"model": 5}, "model: expected a string, got 5"),
    ({"data": [{}]}, "data: expected a list of strings, got [{}]"),
    ({"data": []}, "data: give at least one training file"),
    ({"seed": 1.5}, "seed: expected a whole number, got 1.5"),
    ({"lr": "fast"}, "lr: expected a finite number, got 'fast'"),
    ({"lr": float("nan")}, "lr: expected a finite number, got nan"),
    ({"lr": 0}, "lr: must be positive, got 0"),
    ({"batch_size": 0}, "batch_size: must be at least 1, got 0"),
    ({"batch_size": True}, "batch_size: expected a whole number, got True"),
    ({"max_steps": "10"}, "max_steps: expected a whole number, got '10'"),
    ({"recipe": "finetune"}, "recipe: expected one of pretrain, sft, dpo, distill, got 'finetune'"),
    ({"resume": "yes please"}, "resume: expected true or false, got 'yes please'"),
    ({"threads": 0}, "threads: must be at least 1, got 0"),
    ({"adam_betas": [0.9]}, "adam_betas: expected two numbers [beta1, beta2], got [0.9]"),
    ({"adam_betas": [0.9, 1.5]}, "adam_betas: must be two numbers in [0, 1), got [0.9, 1.5]"),
    ({"eval_data": 5}, "eval_data: expected a list of strings, got 5"),
    ({"lora_targets": [1]}, "lora_targets: expected a list of strings, got [1]"),
    ({"learning_rate": 0.1}, "unknown training option 'learning_rate'"),
    ({"distributed": {"workers": "3"}}, "workers: expected a whole number, got '3'"),
    ({"distributed": {"pool": 6380}}, "pool: expected the pool's HOST:PORT address, got 6380"),
])
def test_wrong_values_in_the_config_file_exit_2_naming_key_and_value(tmp_path, capsys, change, needle):
    """Each wrong value in a config file: exit 2 before anything runs, one line naming the key, the value and what
    was expected (the files need not exist: types are checked first)."""
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"recipe": "sft", "model": str(tmp_path / "m"), "data": [str(tmp_path / "d")],
                                   "out": str(tmp_path / "o"), **change}))
    code, io = run(capsys, cfg)
    assert code == 2, io
    assert needle in io.err and len(io.err.strip().splitlines()) == 1, io.err
    assert "Traceback" not in io.err and not (tmp_path / "o").exists()


def test_yaml_quirks(tmp_path):
    """PyYAML reads 1e-3 (no dot) as a string: it is the number it spells. A key given twice is refused (PyYAML
    would silently keep the last)."""
    from cairn.errors import UserError

    cfg = tmp_path / "run.yaml"
    cfg.write_text("recipe: sft\nmodel: m\ndata: d.jsonl\nout: o\nlr: 1e-3\n")
    built = TrainConfig.build(cfg)
    assert built.lr == 1e-3 and built.data == ("d.jsonl",)
    cfg.write_text(cfg.read_text() + "lr: 2e-3\n")
    with pytest.raises(UserError, match=r"run.yaml:6: 'lr' is given twice"):
        TrainConfig.build(cfg)


def test_flags_are_typed_too(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's own check: exit 2, one line
        run(capsys, "--recipe", "sft", "--model", "m", "--data", "d", "--out", tmp_path / "o", "--seed", "1.5")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--seed" in err and "'1.5'" in err and len(err.strip().splitlines()) == 1
