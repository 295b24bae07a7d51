"""The one atomic-write helper: the target is the old file or the new one, never a part, and no litter is left."""

import json

import pytest

from cairn.fsutil import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_writes_replace_the_target_and_leave_nothing_else(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "naïve\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "c.json", {"k": "é", "n": [1, 2]})
    atomic_write_json(tmp_path / "c.json", {"k": "second"})
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "naïve\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.json").read_text(encoding="utf-8") == '{\n  "k": "second"\n}\n'
    assert json.loads((tmp_path / "c.json").read_text()) == {"k": "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")

    def half_then_crash(tmp):
        tmp.write_bytes(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_the_temporary_file_keeps_the_suffix_and_is_hidden_beside_the_target(tmp_path):
    seen = []

    def write(tmp):
        seen.append(tmp)
        tmp.write_text("x")

    atomic_write(tmp_path / "loss.png", write)
    atomic_write(tmp_path / "loss.png", write)
    assert all(t.parent == tmp_path and t.name.startswith(".") and t.suffix == ".png" for t in seen)
    assert seen[0] != seen[1]  # a fresh name per write: two writers never share one


def test_save_checkpoint_leaves_no_temporary_files(tiny_model, tmp_path):
    from cairn.config import ModelConfig
    from cairn.models.checkpoint import copy_side_files, load_stage, save_checkpoint

    cfg = ModelConfig.from_hf_dir(tiny_model)
    save_checkpoint(load_stage(tiny_model, cfg), tmp_path, max_shard_bytes=100_000)
    copy_side_files(tiny_model, tmp_path)
    names = [p.name for p in tmp_path.iterdir()]
    assert not [n for n in names if n.startswith(".") or "tmp" in n], names
    assert "config.json" in names and "tokenizer.json" in names and "model.safetensors.index.json" in names


def test_a_secret_is_private_from_its_creation(tmp_path):
    seen = []

    def write(tmp):
        seen.append(tmp.stat().st_mode & 0o777)  # already private before a byte is written
        tmp.write_text("token")

    atomic_write(tmp_path / "token", write, mode=0o600)
    atomic_write_text(tmp_path / "token2", "token\n", mode=0o600)
    assert seen == [0o600]
    assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "token2").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "token2").read_text() == "token\n"
