"""Tiny models and data the training tests make themselves."""

import json
import random

import pytest

from cairn.models.init import init_model

FACTS = [
    ("Where does Anna live?", "Anna lives in Oslo."),
    ("Where does Bruno live?", "Bruno lives in Lima."),
    ("What does Clara drink?", "Clara drinks green tea."),
    ("What does David play?", "David plays the cello."),
    ("Which pet has Emma?", "Emma has a grey cat."),
    ("Which car has Felix?", "Felix has a red van."),
    ("What does Greta read?", "Greta reads old maps."),
    ("What does Hugo cook?", "Hugo cooks fish soup."),
]

NOUNS = ["cat", "dog", "bird", "fox", "horse", "sheep", "goat", "mouse"]
ADJS = ["small", "big", "red", "quiet", "old", "young", "brown", "fast"]
VERBS = ["sees", "chases", "follows", "likes", "finds", "watches"]


def grammar_sentences(n: int, seed: int) -> list[str]:
    """Sentences from a tiny grammar: structure a model can learn, vocabulary a unigram model cannot exploit."""
    rng = random.Random(seed)
    return [f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(ADJS)} "
            f"{rng.choice(NOUNS)} near the river." for _ in range(n)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    """A tiny random Llama whose tokenizer was trained on the tests' text (facts and grammar sentences)."""
    path = tmp_path_factory.mktemp("train-base")
    texts = [f"{q} {a}" for q, a in FACTS] * 20 + grammar_sentences(400, 99) + [
        "yes, gladly. no. I will help you with that. I refuse."] * 20
    init_model(path, shape="tiny", seed=0, corpus=texts)
    return path
