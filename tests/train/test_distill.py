"""Distillation: the KD losses against formulas computed by hand (plain Python floats), alpha = 1 is SFT bit for
bit, the top-K cache round-trips and matches the teacher's own distribution, a student made from a teacher keeps
its layers, a distilled student moves its held-out KL down, and a teacher with another tokenizer is refused."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from cairn.cli import main
from cairn.config import ModelConfig
from cairn.errors import UserError
from cairn.models.checkpoint import load_stage
from cairn.models.init import init_model
from cairn.models.llama import full_forward
from cairn.models.student import evenly_spaced, make_student, most_important
from cairn.train.config import TrainConfig
from cairn.train.distill import distill_loss_sum, kd_loss_sum, top_k
from cairn.train.loop import Trainer, prepare
from cairn.train.losses import lm_loss_sum
from cairn.train.teacher_cache import TeacherCache, write_shard

from .conftest import FACTS, chat, grammar_sentences, write_jsonl

S = [1.0, 2.0, 0.5, -1.0]  # one position's student logits
P = [0.2, 1.5, 1.0, 0.3]  # the teacher's


def softmax(xs, T=1.0):
    m = max(x / T for x in xs)
    e = [math.exp(x / T - m) for x in xs]
    return [v / sum(e) for v in e]


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def one(xs):
    return torch.tensor([[xs]])  # (B=1, T=1, V)


LABEL = torch.tensor([[1]])


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_kl_and_jsd_match_hand_computed_values(T):
    p, q = softmax(P, T), softmax(S, T)
    want = {"forward_kl": kl(p, q), "reverse_kl": kl(q, p)}
    for beta in (0.1, 0.5, 0.9):
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        want[f"jsd{beta}"] = beta * kl(p, m) + (1 - beta) * kl(q, m)
    for name, value in want.items():
        kind, beta = (name, 0.5) if not name.startswith("jsd") else ("jsd", float(name[3:]))
        got = kd_loss_sum(one(S), one(P), LABEL, kind, T, beta).item()
        assert got == pytest.approx(value * T * T, rel=1e-5), name  # scaled by T^2


def test_jsd_limits_are_the_two_kls():
    for beta, kind in ((0.0, "reverse_kl"), (1.0, "forward_kl")):
        assert kd_loss_sum(one(S), one(P), LABEL, "jsd", 1.0, beta).item() == pytest.approx(
            kd_loss_sum(one(S), one(P), LABEL, kind).item(), rel=1e-6)


def test_sparse_teacher_renormalises_over_its_top_k():
    """Top-2 of the teacher: p renormalised over its two tokens; forward KL takes the student's full softmax at
    those tokens, reverse KL the student renormalised over them too."""
    T = 1.5
    top = top_k(one(P), 2)
    assert top.ids.tolist() == [[[1, 2]]]
    p = softmax([P[1], P[2]], T)
    q_full = softmax(S, T)
    q_two = softmax([S[1], S[2]], T)
    fwd = sum(pi * math.log(pi / qi) for pi, qi in zip(p, [q_full[1], q_full[2]]))
    assert kd_loss_sum(one(S), top, LABEL, "forward_kl", T).item() == pytest.approx(fwd * T * T, rel=1e-5)
    assert kd_loss_sum(one(S), top, LABEL, "reverse_kl", T).item() == pytest.approx(kl(q_two, p) * T * T, rel=1e-5)
    full = top_k(one(P), 4)  # K = V: the sparse path is the dense one
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert kd_loss_sum(one(S), full, LABEL, kind, T).item() == pytest.approx(
            kd_loss_sum(one(S), one(P), LABEL, kind, T).item(), rel=1e-5)


def test_only_target_positions_count_and_alpha_one_is_sft_exactly():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.tensor([[-100, 3, 4, -100, 1], [2, -100, -100, -100, 7]])
    per = [kd_loss_sum(s[b : b + 1, i : i + 1], t[b : b + 1, i : i + 1], labels[b : b + 1, i : i + 1]).item()
           for b in range(2) for i in range(5) if labels[b, i] != -100]
    assert kd_loss_sum(s, t, labels).item() == pytest.approx(sum(per), rel=1e-5)
    loss, parts = distill_loss_sum(s, t, labels, alpha=1.0)
    assert torch.equal(loss, lm_loss_sum(s, labels)) and "kd" not in parts
    mixed, parts = distill_loss_sum(s, t, labels, alpha=0.3, kind="reverse_kl", temperature=2.0)
    assert mixed.item() == pytest.approx(0.3 * parts["ce"] + 0.7 * parts["kd"], rel=1e-6)


def test_cache_round_trips_and_refuses_other_tokens(tmp_path):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=g)
    top = top_k(logits, 8)
    write_shard(tmp_path / "c", {"r1": ([5, 6, 7, 8, 9, 10, 11], top)}, teacher="t")
    write_shard(tmp_path / "c", {"r2": ([1, 2], top_k(logits[:1], 8))}, teacher="t")
    cache = TeacherCache(tmp_path / "c")
    assert len(cache) == 2 and cache.k == 8
    got = cache.lookup("r1", [5, 6, 7, 8, 9, 10, 11], "x")
    assert torch.equal(got.ids, top.ids)
    assert torch.allclose(got.logprobs, top.logprobs, atol=2e-3)  # stored as float16
    assert cache.lookup("r1", [5, 6, 7], "x").ids.shape == (2, 8)  # a truncated sequence reads a prefix
    with pytest.raises(UserError, match="other tokens"):
        cache.lookup("r1", [5, 6, 99], "x")
    with pytest.raises(UserError, match="not in the teacher cache"):
        cache.lookup("r3", [1, 2], "x")
    (tmp_path / "c" / "shard-000001.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="damaged"):
        TeacherCache(tmp_path / "c")


def test_student_keeps_the_chosen_layers(base_model, tmp_path):
    half = evenly_spaced(30, 15)
    assert len(half) == 15 and half[0] == 0 and half[-1] == 29 and all(b - a in (2, 3) for a, b in zip(half, half[1:]))
    assert evenly_spaced(4, 2) == [0, 3] and evenly_spaced(5, 3) == [0, 2, 4] and evenly_spaced(3, 3) == [0, 1, 2]
    assert most_important([0.1, 0.5, 0.2, 0.5], 2) == [1, 3]
    cfg = ModelConfig.from_hf_dir(base_model)
    out = tmp_path / "student"
    scfg, kept = make_student(base_model, out, 1, "even")
    assert scfg.num_layers == 1 and kept == [0]
    teacher, student = (load_stage(p, ModelConfig.from_hf_dir(p)) for p in (base_model, out))
    assert torch.equal(student.layers[0].mlp.down_proj.weight, teacher.layers[0].mlp.down_proj.weight)
    assert torch.equal(student.embed_tokens.weight, teacher.embed_tokens.weight)
    assert cfg.num_layers == 2
    code = main(["init-model", str(tmp_path / "imp"), "--from", str(base_model), "--layers", "1", "--select",
                 "importance"])
    assert code == 0
    with safe_open(str(tmp_path / "imp" / "model.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["cairn_student"])
    assert meta["select"] == "importance" and len(meta["influence"]) == 2
    assert meta["layers"] == [max(range(2), key=lambda i: meta["influence"][i])]
    assert main(["init-model", str(tmp_path / "rnd"), "--width-from", str(base_model), "--layers", "1"]) == 0
    assert ModelConfig.from_hf_dir(tmp_path / "rnd").hidden_size == cfg.hidden_size
    assert main(["init-model", str(tmp_path / "bad"), "--from", str(base_model), "--layers", "3"]) == 2


def _teacher(base_model, tmp_path):
    """A teacher with something to teach: the tiny base model after a short SFT on the facts."""
    data = write_jsonl(tmp_path / "facts.jsonl", [chat(q, a) for q, a in FACTS] * 4)
    assert main(["train", "--recipe", "sft", "--model", str(base_model), "--data", str(data), "--out",
                 str(tmp_path / "teacher"), "--seq-len", "64", "--batch-size", "8", "--max-steps", "30", "--lr",
                 "3e-3", "--no-progress", "--eval-fraction", "0"]) == 0
    return tmp_path / "teacher"


def test_distilled_student_moves_held_out_kl_down(base_model, tmp_path):
    teacher = _teacher(base_model, tmp_path)
    make_student(teacher, tmp_path / "student", 1, "even")
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in grammar_sentences(200, 5)])
    held = write_jsonl(tmp_path / "held.jsonl", [{"text": t} for t in grammar_sentences(40, 6)])
    results = {}
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        cfg = TrainConfig.build(recipe="distill", model=str(tmp_path / "student"), teacher=str(teacher),
                                data=[str(text)], eval_data=[str(held)], out=str(tmp_path / f"d-{kind}"),
                                seq_len=64, batch_size=8, max_steps=25, lr=2e-3, distill_alpha=0.0,
                                distill_loss=kind, progress=False)
        cfg, model_cfg, _, data, total = prepare(cfg)
        trainer = Trainer(cfg, model_cfg, data, total)
        before = trainer.evaluate()["eval_kd"]
        for _ in range(total):
            trainer.step()
        results[kind] = (before, trainer.evaluate()["eval_kd"])
    for kind, (before, after) in results.items():
        assert after < 0.7 * before, (kind, results)


def test_on_policy_and_offline_cache_runs_through_the_cli(base_model, tmp_path):
    teacher = _teacher(base_model, tmp_path)
    make_student(teacher, tmp_path / "student", 1, "even")
    data = write_jsonl(tmp_path / "d.jsonl", [{**chat(q, a), "id": f"r{i}"} for i, (q, a) in enumerate(FACTS)])
    code = main(["train", "--recipe", "distill", "--model", str(tmp_path / "student"), "--teacher", str(teacher),
                 "--data", str(data), "--out", str(tmp_path / "op"), "--seq-len", "64", "--batch-size", "4",
                 "--max-steps", "4", "--on-policy", "1.0", "--on-policy-tokens", "6", "--no-progress",
                 "--eval-fraction", "0"])
    assert code == 0
    metrics = [json.loads(x) for x in (tmp_path / "op" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "kd" in m]
    assert len(steps) == 4 and all(m["loss"] == pytest.approx(m["kd"]) and m["kd"] > 0 for m in steps)  # KD alone
    # an offline cache of the teacher's top-8 for every record, written as `cairn synth` writes it
    from cairn.models.tokenizer import Tokenizer
    from cairn.train.data import render_masked

    tok, stage = Tokenizer.from_dir(teacher), load_stage(teacher, ModelConfig.from_hf_dir(teacher))
    entries = {}
    for i, (q, a) in enumerate(FACTS):
        ids = render_masked(tok, chat(q, a)["messages"]).ids
        with torch.no_grad():
            entries[f"r{i}"] = (ids, top_k(full_forward(stage, torch.tensor([ids]))[0, :-1], 8))
    write_shard(tmp_path / "cache", entries, str(teacher))
    code = main(["train", "--recipe", "distill", "--model", str(tmp_path / "student"), "--teacher-logits",
                 str(tmp_path / "cache"), "--data", str(data), "--out", str(tmp_path / "off"), "--seq-len", "64",
                 "--batch-size", "4", "--max-steps", "3", "--no-progress", "--eval-fraction", "0"])
    assert code == 0
    code = main(["train", "--recipe", "distill", "--model", str(tmp_path / "student"), "--teacher", str(teacher),
                 "--data", str(data), "--out", str(tmp_path / "lora"), "--seq-len", "64", "--batch-size", "4",
                 "--max-steps", "2", "--lora-rank", "4", "--no-progress", "--eval-fraction", "0"])
    assert code == 0 and (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").is_file()  # a LoRA student
    no_id = write_jsonl(tmp_path / "noid.jsonl", [chat(q, a) for q, a in FACTS])
    code = main(["train", "--recipe", "distill", "--model", str(tmp_path / "student"), "--teacher-logits",
                 str(tmp_path / "cache"), "--data", str(no_id), "--out", str(tmp_path / "off2"), "--max-steps", "1",
                 "--no-progress"])
    assert code == 2


def test_teacher_with_another_tokenizer_is_refused(base_model, tmp_path, capsys):
    other = tmp_path / "other"
    init_model(other, shape="tiny", seed=0, corpus=["completely different words here"] * 50)
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in grammar_sentences(20, 1)])
    code = main(["train", "--recipe", "distill", "--model", str(base_model), "--teacher", str(other), "--data",
                 str(data), "--out", str(tmp_path / "o"), "--max-steps", "1", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "another tokenizer" in err and "Traceback" not in err
    for bad in (["--teacher", str(base_model), "--teacher-logits", str(tmp_path)], []):
        assert main(["train", "--recipe", "distill", "--model", str(base_model), "--data", str(data), "--out",
                     str(tmp_path / "o2"), "--max-steps", "1", "--no-progress", *bad]) == 2
    assert main(["train", "--recipe", "sft", "--model", str(base_model), "--teacher", str(base_model), "--data",
                 str(data), "--out", str(tmp_path / "o3"), "--max-steps", "1", "--no-progress"]) == 2
