"""A small English text cairn ships, so a tokenizer can be trained with no download.

A few hand-written paragraphs plus sentences generated from a tiny grammar (seeded, so always the same)."""

from __future__ import annotations

import random

PARAGRAPHS = """\
A cairn is a heap of stones that walkers build to mark a path across open ground. Each person who passes adds a
stone, and over the years the little tower grows taller than anyone who built it. On a clear day you can see the
next cairn from the last one, and so the line of stones carries travellers over hills where no road was ever laid.

The weather on the high moor changes quickly. In the morning the sky may be bright and still; by noon a grey wall
of cloud rolls in from the west, the wind rises, and rain drives sideways across the heather. Experienced hikers
carry a map, a compass, warm clothes and more water than they think they need.

Computers are machines that follow instructions. A program is a list of those instructions written in a language
that people can read and a compiler can translate. Small programs add numbers, sort lists or draw pictures; large
programs fly aircraft, route phone calls and answer questions typed by millions of people every day.

A language model reads a sequence of tokens and predicts the next one. Trained on enough text, it learns spelling,
grammar, facts about the world and a little reasoning. The same model can continue a story, translate a sentence,
summarise a report or hold a conversation, depending on how the question is put to it.

Bread needs only flour, water, salt and yeast. Mix them, knead the dough until it is smooth, and leave it somewhere
warm until it has doubled in size. Shape the loaf, let it rise again, then bake it in a hot oven until the crust is
brown and the bottom sounds hollow when you tap it.

The river starts as a spring high in the hills, a thread of cold water running between rocks. Other streams join
it, and by the time it reaches the valley it is wide and slow, turning mills, watering fields and carrying boats
down to the town by the sea.
"""

_SUBJECTS = ["the engineer", "a small robot", "my neighbour", "the old teacher", "our team", "the farmer",
             "a curious child", "the captain", "every student", "the baker", "the model", "a tired traveller"]
_VERBS = ["builds", "reads", "measures", "paints", "repairs", "counts", "carries", "studies", "writes", "finds",
          "cleans", "tests", "opens", "describes", "follows", "remembers"]
_OBJECTS = ["a wooden boat", "the long report", "three red apples", "the broken clock", "a map of the coast",
            "the quiet garden", "seven blue stones", "the new program", "a letter from home", "the night sky",
            "the heavy box", "a list of numbers", "the mountain path", "a cup of tea"]
_PLACES = ["in the morning", "after lunch", "near the river", "at the station", "before the storm",
           "on the hill", "under the bridge", "every Tuesday", "in the library", "by the window"]
_ADJ = ["bright", "careful", "quiet", "strange", "simple", "ancient", "busy", "gentle", "clever", "cold"]
_QUESTIONS = ["What is", "How do you make", "Where can I find", "Why is", "When does", "Who wrote"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.5:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
            out.append(s[0].upper() + s[1:])
        elif kind < 0.7:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            out.append(f"{a} plus {b} is {a + b}, and {a} times {b} is {a * b}.")
        elif kind < 0.85:
            out.append(f"{rng.choice(_QUESTIONS)} {rng.choice(_OBJECTS)}? It is {rng.choice(_ADJ)}.")
        else:
            out.append(f"The {rng.choice(_ADJ)} day was {rng.choice(_ADJ)}; {rng.choice(_SUBJECTS)} said so.")
    return out


def shipped_corpus(n_sentences: int = 4000) -> list[str]:
    """Documents: the paragraphs, then generated sentences in groups of ten."""
    docs = [p.replace("\n", " ") for p in PARAGRAPHS.split("\n\n")]
    s = sentences(n_sentences)
    docs += [" ".join(s[i : i + 10]) for i in range(0, len(s), 10)]
    return docs


if __name__ == "__main__":  # python -m cairn.models.corpus OUT.txt: write the shipped text for training demos
    import sys
    from pathlib import Path

    Path(sys.argv[1]).parent.mkdir(parents=True, exist_ok=True)
    Path(sys.argv[1]).write_text("\n\n".join(shipped_corpus()) + "\n")
