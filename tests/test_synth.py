"""`cairn synth` with the real SmolLM2 teacher: seeds, documents and self-instruct; filters and near-duplicate
detection; resuming after a kill (no duplicates, nothing lost); the teacher's top-K cache against transformers."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cairn.cli import main
from cairn.config import EngineConfig
from cairn.data.dedup import DedupIndex, normalise
from cairn.data.filters import answer_problem, clean_instruction, instruction_problem, is_refusal
from cairn.data.synth import passages, read_seeds, seed_tasks
from cairn.engine.api import LLM
from cairn.eval.judge import parse_rating, rate
from cairn.train.teacher_cache import TeacherCache

QUESTIONS = ["What is the capital of France? Answer in one word.", "What colour is the sky on a clear day? One word.",
             "How many legs does a spider have? Answer with a number.", "What is 2 + 2? Answer with a number.",
             "Name the largest ocean on Earth in two words.", "What do bees make? One word.",
             "What is frozen water called? One word.", "Which planet is known as the red planet? One word.",
             "What is the opposite of hot? One word.", "How many days are in a week? A number.",
             "What animal says moo? One word.", "What is the first letter of the alphabet? One letter."]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """SmolLM2 as `cairn synth` runs it: its GGUF, quantized as the file is."""
    from cairn.models.gguf import resolve_model, smollm2_path

    return resolve_model(smollm2_path(), tmp_path_factory.mktemp("smollm2-q"), quantized=True)


def _seeds(tmp_path, questions, extra=()):
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps({"instruction": q}) + "\n" for q in questions)
                    + "".join(json.dumps(x) + "\n" for x in extra))
    return path


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_filters_and_cleaning():
    assert answer_problem("", "stop", 1, 100) == "empty answer"
    assert answer_problem("The answer is", "length", 1, 100) == "truncated answer"
    assert answer_problem("I'm sorry, but I can't help with that.", "stop", 1, 100) == "refusal"
    assert answer_problem("As an AI, I have no opinion.", "stop", 1, 100) == "refusal"
    assert answer_problem("Paris.", "stop", 8, 100) == "answer too short"
    assert answer_problem("x" * 101, "stop", 1, 100) == "answer too long"
    assert answer_problem("Paris is the capital of France.", "stop", 8, 100) is None
    assert not is_refusal("Sorry to hear that the bread did not rise; here is why.")
    assert instruction_problem("  ", 1, 100) == "empty instruction"
    assert instruction_problem("Why?", 8, 100) == "instruction too short"
    assert clean_instruction('Question: How do tides work?\n\nThis question is about the moon.') == "How do tides work?"
    assert clean_instruction('A student might ask: "Why is the sea salty?"\n\nThis is') == "Why is the sea salty?"
    assert clean_instruction('"Explain photosynthesis simply."') == "Explain photosynthesis simply."


def test_near_duplicates_agree_with_exact_jaccard():
    """MinHash LSH (datasketch) flags what the exact 5-gram Jaccard similarity, computed here with sets, puts far
    above FineWeb's ~0.75 threshold, and passes what it puts far below."""
    base = ("the river starts as a spring high in the hills a thread of cold water running between rocks and other "
            "streams join it until it is wide and slow")
    words = base.split()
    near = " ".join(words[:-1] + ["deep"])  # one word changed at the end
    far = " ".join(reversed(words))

    def jac(a, b, n=5):
        sa = {tuple(a.split()[i : i + n]) for i in range(len(a.split()) - n + 1)}
        sb = {tuple(b.split()[i : i + n]) for i in range(len(b.split()) - n + 1)}
        return len(sa & sb) / len(sa | sb)

    assert jac(base, near) > 0.9 and jac(base, far) < 0.1
    index = DedupIndex(ngram=5)
    assert index.add(base, "a") is None
    assert index.add(near, "b") == ("near", "a")
    assert index.add(far, "c") is None
    assert index.add(base.upper() + "!", "d") == ("exact", "a")
    assert normalise("Hello,   World!") == "hello world"


def test_seed_reading_and_passages(tmp_path):
    p = tmp_path / "s.txt"
    p.write_text("volcanoes\n\nthe moon\nvolcanoes\n")
    tasks = seed_tasks(read_seeds(p), 2)
    assert len(tasks) == 4 and len({t.key for t in tasks}) == 4  # the repeated topic is one seed
    text = "\n\n".join(f"Paragraph {i}. " + "word " * 50 for i in range(6))
    chunks = passages(text, 600)
    assert all(len(c) <= 600 for c in chunks) and "".join(chunks).count("Paragraph") == 6
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nothing": 1}\n')
    assert main(["synth", "x", "--out", str(tmp_path / "o.jsonl"), "--seeds", str(bad)]) == 2
    assert main(["synth", "x", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert main(["synth", "x", "--out", str(tmp_path / "o.jsonl"), "--seeds", str(p), "--self-instruct"]) == 2


def test_seeds_filter_and_rerun_adds_nothing(teacher, tmp_path):
    seeds = _seeds(tmp_path, QUESTIONS[:6] + ["what is the capital of france?  answer in ONE word"],
                   extra=[{"topic": "the water cycle"}])
    out = tmp_path / "data.jsonl"
    args = ["synth", str(teacher), "--out", str(out), "--seeds", str(seeds), "--max-tokens", "48", "--batch", "8",
            "--temperature", "0"]
    assert main(args) == 0
    records, progress = _lines(out), _lines(tmp_path / "data.jsonl.progress")
    assert len(progress) == 8 and len({p["id"] for p in progress}) == 8
    assert sum(p["status"] == "exact duplicate instruction" for p in progress) == 1
    assert [p["id"] for p in progress if p["status"] == "kept"] == [r["id"] for r in records]
    assert len(records) >= 4
    paris = next(r for r in records if "France" in r["messages"][0]["content"])
    assert "Paris" in paris["messages"][1]["content"]
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["meta"]["teacher"] == str(teacher) and r["meta"]["sampling"]["temperature"] == 0
    before = out.read_text()
    assert main(args) == 0  # everything is done: nothing is redone or added
    assert out.read_text() == before and len(_lines(tmp_path / "data.jsonl.progress")) == 8
    # the records train: `cairn train --recipe sft` reads them as they are
    from cairn.models.tokenizer import Tokenizer
    from cairn.train.config import TrainConfig
    from cairn.train.data import build_datasets

    cfg = TrainConfig.build(recipe="sft", model=str(teacher), data=[str(out)], out=str(tmp_path / "t"),
                            eval_fraction=0.0)
    assert len(build_datasets(cfg, Tokenizer.from_dir(teacher), ()).train) == len(records)


def test_killed_run_resumes_without_duplicates_or_losses(teacher, tmp_path):
    seeds = _seeds(tmp_path, QUESTIONS)
    out = tmp_path / "data.jsonl"
    cmd = [sys.executable, "-m", "cairn", "synth", str(teacher), "--out", str(out), "--seeds", str(seeds),
           "--max-tokens", "32", "--batch", "2", "--temperature", "0", "--threads", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "data.jsonl.progress"
    deadline = time.monotonic() + 240
    try:
        while len(_lines(progress)) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    first = _lines(progress)
    assert 4 <= len(first) < len(QUESTIONS), "the run must be killed part way"
    kept_before = out.read_text() if out.exists() else ""
    with open(out, "a") as f:
        f.write('{"id": "t-cut-short", "mess')  # a record a kill cut in the middle of its write
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    final = _lines(progress)
    assert sorted(p["id"] for p in final) == sorted(t.key for t in seed_tasks(read_seeds(seeds), 1))
    assert out.read_text().startswith(kept_before) and "t-cut-short" not in out.read_text()
    ids = [r["id"] for r in _lines(out)]
    assert len(ids) == len(set(ids)) == sum(p["status"] == "kept" for p in final)


def test_docs_self_instruct_judge_and_saved_logits_match_transformers(teacher, smollm2_dir, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "bread.txt").write_text(
        "Bread needs only flour, water, salt and yeast. Mix them, knead the dough until it is smooth, and leave it "
        "somewhere warm until it has doubled in size. Bake it in a hot oven until the crust is brown.")
    out = tmp_path / "docs.jsonl"  # the fp32 import here: the cache holds the teacher as synth ran it
    assert main(["synth", str(smollm2_dir), "--out", str(out), "--from-docs", str(docs), "--per-source", "3",
                 "--max-tokens", "96", "--save-logits", "8", "--seed", "1"]) == 0
    progress = _lines(tmp_path / "docs.jsonl.progress")
    assert len(progress) == 3
    records = _lines(out)
    for r in records:
        assert "Bread needs only flour" in r["messages"][0]["content"]  # grounded: the passage is in the prompt
        assert r["meta"]["question"] in r["messages"][0]["content"] and r["meta"]["source"] == "bread.txt#0"
    assert records, "no record was kept to check the teacher's saved logits against"
    # the teacher's top-8 per token, against transformers on the fp32 import of the same file
    from transformers import AutoModelForCausalLM

    cache = TeacherCache(tmp_path / "docs.jsonl.logits")
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids, top = cache.records[records[0]["id"]]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), -1)
    assert torch.equal(top.ids[:, 0].long(), ref.argmax(-1))
    picked = ref.gather(-1, top.ids.long())
    assert torch.allclose(top.logprobs.float(), picked, atol=1e-2, rtol=2e-3)  # stored as float16
    si = tmp_path / "si.jsonl"  # Magpie: the teacher writes the user turn from its template's opening alone
    assert main(["synth", str(teacher), "--out", str(si), "--self-instruct", "--count", "1", "--max-tokens", "24",
                 "--batch", "2"]) == 0
    asked = _lines(tmp_path / "si.jsonl.progress")
    assert 1 <= len(asked) <= 4 and [p["id"] for p in asked] == [f"m-{i}" for i in range(len(asked))]
    questions = [p["instruction"] for p in asked if p["status"] != "empty instruction"]
    assert questions and len(set(questions)) == len(questions) and any(q.endswith("?") for q in questions)
    assert len(_lines(si)) == sum(p["status"] == "kept" for p in asked) <= 2  # count + tasks in flight - 1
    with LLM(teacher, EngineConfig(max_seqs=4)) as llm:
        ratings = rate(llm, [("What is the capital of France?", "The capital of France is Paris."),
                             ("What is the capital of France?", "Bananas are yellow and grow on trees.")])
    assert all(r in (1, 2, 3, 4, 5) for r in ratings)
    assert parse_rating("Rating: 4/5") == 4 and parse_rating("none") is None
