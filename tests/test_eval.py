"""cairn eval against independent oracles: transformers' own loss for perplexity, lm-evaluation-harness's own
pipeline for multiple choice; windows and metrics against hand computation; the CLI as a user runs it."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cairn.config import EngineConfig
from cairn.engine.api import LLM
from cairn.eval import choice, generate, perplexity
from cairn.eval import commands as ev
from cairn.eval.data import ChoiceItem

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["A cairn is a heap of stones that walkers build to mark a path across open ground. " * 6,
         "Each person who passes adds a stone, and over the years the little tower grows taller."]
ITEMS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "Madrid"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["three", "four", "five and a half"], "answer": 1},
    {"question": "Water freezes at ", "choices": ["zero degrees", "fifty degrees"], "answer": 0},
    {"question": "The sun rises in the", "choices": ["east", "west", "north", "south"], "answer": 0},
    {"question": "A heap of stones on a path is a", "choices": ["cairn", "river", "tower of glass"], "answer": 0},
    {"question": "Stones are added by", "choices": ["walkers", "the wind", "nobody at all"], "answer": 0},
    {"question": "Coffee in Paris is served at a", "choices": ["café", "cafe au lait stand", "crêperie"], "answer": 0},
]


@pytest.fixture(scope="module")
def llm(tiny_model):
    with LLM(tiny_model, EngineConfig(max_seqs=4, max_context=256)) as m:
        yield m


def test_windows_cover_every_token_once():
    # 10 tokens (0 is the prefix), window 4, stride 2: [0,4) scores 1-3, [2,6) scores 4-5, [4,8) 6-7, [6,10) 8-9
    got = [(w.begin, w.end, w.first_target) for w in perplexity.windows(10, 4, 2)]
    assert got == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert [(w.begin, w.end, w.first_target) for w in perplexity.windows(5, 8, 7)] == [(0, 5, 1)]
    for window, stride in [(4, 4), (4, 5), (1, 1), (4, 0)]:
        with pytest.raises(ValueError):
            perplexity.windows(10, window, stride)


@pytest.mark.parametrize("window, stride", [(32, 16), (64, 63), (48, 7)])
def test_perplexity_equals_transformers_loss(llm, tiny_model, window, stride):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prefix = ev.prefix_token(llm)
    ours = perplexity.perplexity(TEXTS, llm.tokenizer.encode, prefix, llm.score, window, stride)
    nll, count = 0.0, 0
    for text in TEXTS:  # the recipe of transformers' perplexity guide, with its own loss
        ids = torch.tensor([[prefix, *llm.tokenizer.encode(text)]])
        prev_end = 1
        for begin in range(0, ids.shape[1], stride):
            end = min(begin + window, ids.shape[1])
            if end <= prev_end:
                break
            window_ids = ids[:, begin:end]
            labels = window_ids.clone()
            labels[:, : prev_end - begin] = -100
            n = int((labels[:, 1:] != -100).sum())
            with torch.no_grad():
                nll += hf(window_ids, labels=labels).loss.item() * n
            count += n
            prev_end = end
    assert ours.tokens == count == sum(len(llm.tokenizer.encode(t)) for t in TEXTS)
    assert ours.perplexity == pytest.approx(math.exp(nll / count), rel=1e-3)
    assert ours.bits_per_byte == pytest.approx(nll / math.log(2) / sum(len(t.encode()) for t in TEXTS), rel=1e-3)


def test_real_model_perplexity_equals_transformers(smollm2_dir):
    import transformers

    text = (ROOT / "examples" / "eval" / "heldout.txt").read_text()
    with LLM(smollm2_dir, EngineConfig(max_seqs=1, max_context=512)) as m:
        prefix = ev.prefix_token(m)
        ours = perplexity.perplexity([text], m.tokenizer.encode, prefix, m.score, 512, 511)
        ids = [prefix, *m.tokenizer.encode(text)]
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    nll = 0.0
    for begin, end in [(0, 512), (511, len(ids))]:  # [0, 512) scores tokens 1-511, [511, T) tokens 512 on
        window = torch.tensor([ids[begin:end]])
        with torch.no_grad():  # the label shift leaves each window's first token unscored: exactly our split
            nll += hf(window, labels=window).loss.item() * (end - begin - 1)
    assert len(ids) > 512 and ours.tokens == len(ids) - 1
    assert ours.perplexity == pytest.approx(math.exp(nll / ours.tokens), rel=1e-3)
    assert 10 < ours.perplexity < 100  # a real language model on plain English prose


def test_encode_pair_moves_trailing_space_like_the_harness():
    assert choice.split_pair("Water freezes at ", " zero") == ("Water freezes at", "  zero")
    assert choice.split_pair("Q", " a") == ("Q", " a")
    enc = {"": [], "Q": [5], "Q a": [5, 6], "Qa": [7]}.__getitem__
    assert choice.encode_pair("Q", " a", enc, prefix=0) == ([5], [6])
    assert choice.encode_pair("", "Q a", enc, prefix=0) == ([0], [5, 6])


def test_accuracy_definitions_by_hand():
    r = choice.ChoiceResult(loglikelihoods=[[-1.0, -1.5], [-4.0, -6.0]], answers=[1, 1], lengths=[[1, 3], [2, 6]])
    # item 0: acc picks 0 (wrong); per char -1.0 vs -0.5 picks 1 (right). item 1: acc 0 (wrong); -2.0 vs -1.0 -> 1
    assert r.as_dict() == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0, "items": 2}
    # bytes: "é" (2 bytes) makes choice 0 of item 0 longer: -1.0 / 2 beats -1.5 / 3 -> 0 (wrong)
    r.byte_lengths = [[2, 3], [2, 6]]
    assert r.as_dict()["acc_bytes"] == 0.5


@pytest.mark.parametrize("fewshot", [0, 2])
def test_multiple_choice_equals_lm_evaluation_harness(llm, tiny_model, tmp_path, fewshot):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    (tmp_path / "shots.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ITEMS[:fewshot]) or "\n")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ITEMS[fewshot:]))
    files = {"test": str(tmp_path / "test.jsonl")} | ({"train": str(tmp_path / "shots.jsonl")} if fewshot else {})
    task = {"task": f"cairn_mc_{fewshot}", "dataset_path": "json", "dataset_kwargs": {"data_files": files},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}, {"metric": "acc_bytes"}]}
    if fewshot:
        task |= {"fewshot_split": "train", "fewshot_config": {"sampler": "first_n"}}
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=str(tiny_model), dtype="float32", batch_size=1, device="cpu"),
                                  tasks=[task], num_fewshot=fewshot, log_samples=True, random_seed=0)
    name = task["task"]
    theirs = [[float(r[0][0]) for r in s["resps"]] for s in sorted(out["samples"][name], key=lambda s: s["doc_id"])]

    items = [ChoiceItem.model_validate(x) for x in ITEMS]
    ours = choice.multiple_choice(items[fewshot:], ev._choice_requests(llm, False, items[:fewshot], 256), llm.score_many)
    assert [len(r) for r in ours.loglikelihoods] == [len(r) for r in theirs]
    flat = [x for r in ours.loglikelihoods for x in r]
    assert flat == pytest.approx([x for r in theirs for x in r], abs=2e-4)
    metrics = out["results"][name]
    assert ours.as_dict()["acc"] == pytest.approx(metrics["acc,none"])
    assert ours.as_dict()["acc_norm"] == pytest.approx(metrics["acc_norm,none"])
    assert ours.as_dict()["acc_bytes"] == pytest.approx(metrics["acc_bytes,none"])


def test_generation_matching():
    assert generate.exact_match("  Paris. ", ["paris"]) and not generate.exact_match("Paris, France", ["Paris"])
    assert generate.contains("It is Paris, France.", ["paris"]) and not generate.contains("Lyon", ["Paris"])


def test_cli_writes_results_and_compares(tiny_model, tmp_path):
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ITEMS))
    (tmp_path / "gen.jsonl").write_text(json.dumps({"prompt": "The river", "answer": "x"}) + "\n"
                                        + json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                      "answer": ["a", "b"]}) + "\n")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))

    def cairn(*args):
        return subprocess.run([sys.executable, "-m", "cairn", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    r = cairn("eval", tiny_model, "--perplexity", tmp_path / "t.jsonl", "--choice", tmp_path / "mc.jsonl",
              "--generate", tmp_path / "gen.jsonl", "--window", 64, "--max-tokens", 4, "--out", tmp_path / "a.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "a.json").read_text())
    assert [t["task"] for t in res["tasks"]] == ["perplexity", "choice", "generate"]
    assert len(res["model"]["sha256"]) == 64 and res["model"]["dtype"] == "float32"
    assert res["tasks"][1]["items"] == len(ITEMS) and len(res["tasks"][2]["outputs"]) == 2
    assert "perplexity" in r.stdout and "acc_norm" in r.stdout
    b = json.loads((tmp_path / "a.json").read_text())
    b["tasks"][1]["acc"] += 0.25
    (tmp_path / "b.json").write_text(json.dumps(b))
    r = cairn("eval", "--compare", tmp_path / "a.json", tmp_path / "b.json")
    assert r.returncode == 0 and "(+0.2500)" in r.stdout, r.stdout


@pytest.mark.parametrize("args, message", [
    ([], "at least one task"),
    (["--choice", "missing.jsonl"], "does not exist"),
    (["--choice", "BAD"], "answer 5 is not an index"),
    (["--perplexity", "T", "--window", "100000"], "exceeds the context"),
    (["--perplexity", "T", "--window", "64", "--stride", "64"], "below the window"),
])
def test_cli_bad_input_exits_2(tiny_model, tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    (tmp_path / "t.txt").write_text(TEXTS[0])
    args = [{"BAD": tmp_path / "bad.jsonl", "T": tmp_path / "t.txt"}.get(a, a) for a in args]
    r = subprocess.run([sys.executable, "-m", "cairn", "eval", str(tiny_model), *map(str, args)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_batched_scoring_equals_one_sequence_at_a_time(llm):
    seqs = [llm.tokenizer.encode(t)[:n] for t, n in [(TEXTS[0], 40), (TEXTS[1], 9), (TEXTS[0], 17)]]
    starts = [5, 1, 16]
    batched = llm.score_many(seqs, starts)
    for seq, start, (lp, greedy) in zip(seqs, starts, batched):
        one, one_greedy = llm.score(seq)
        assert lp == pytest.approx(one[start - 1 :], abs=1e-4) and greedy == one_greedy[start - 1 :]
    with pytest.raises(Exception, match="start within"):
        llm.score_many([seqs[1]], [9])
