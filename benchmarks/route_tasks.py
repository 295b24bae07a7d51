"""The routing task set: short questions with checkable answers, in kinds a 135M model gets right often and kinds it
gets right rarely, so that a router has something to learn. Written to examples/route/tasks.jsonl (the `answer`
items `cairn router train|eval` read); rerunning writes the same file.

    python benchmarks/route_tasks.py [--out examples/route/tasks.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CAPITALS = {"France": "Paris", "Italy": "Rome", "Japan": "Tokyo", "Spain": "Madrid", "Germany": "Berlin",
            "England": "London", "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo", "Greece": "Athens",
            "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna", "Norway": "Oslo", "Sweden": "Stockholm",
            "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Hungary": "Budapest",
            "Canada": "Ottawa", "Australia": "Canberra", "Mexico": "Mexico City", "Peru": "Lima",
            "Argentina": "Buenos Aires", "Kenya": "Nairobi", "Thailand": "Bangkok", "Turkey": "Ankara",
            "Cuba": "Havana", "Chile": "Santiago", "Belgium": "Brussels", "the Netherlands": "Amsterdam",
            "Switzerland": "Bern", "South Korea": "Seoul", "India": "New Delhi", "Vietnam": "Hanoi",
            "Colombia": "Bogota", "Iran": "Tehran", "Iraq": "Baghdad", "Nigeria": "Abuja", "Brazil": "Brasilia"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night", "happy": "sad",
             "open": "closed", "light": "dark", "old": "young", "wet": "dry", "hard": "soft", "early": "late",
             "high": "low", "full": "empty", "rich": "poor", "strong": "weak", "left": "right", "in": "out",
             "win": "lose", "true": "false", "push": "pull", "thick": "thin", "loud": "quiet", "black": "white",
             "long": "short", "heavy": "light", "inside": "outside", "clean": "dirty", "buy": "sell",
             "first": "last"}
COLOURS = {"a banana": "yellow", "the sky on a clear day": "blue", "grass": "green", "snow": "white",
           "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow",
           "a strawberry": "red", "the sun": "yellow", "milk": "white", "a carrot": "orange", "a frog": "green",
           "blood": "red", "charcoal": "black", "a lime": "green", "an eggplant": "purple", "chocolate": "brown"}
PLURALS = {"mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women",
           "goose": "geese", "person": "people", "cat": "cats", "box": "boxes", "baby": "babies", "leaf": "leaves",
           "knife": "knives", "city": "cities", "bus": "buses", "wolf": "wolves", "dog": "dogs", "book": "books",
           "fish": "fish", "sheep": "sheep", "ox": "oxen", "cactus": "cacti"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
SPANISH = {"hello": "hola", "thank you": "gracias", "goodbye": "adios", "cat": "gato", "dog": "perro",
           "water": "agua", "house": "casa", "friend": "amigo", "book": "libro", "red": "rojo", "one": "uno",
           "two": "dos", "three": "tres", "good morning": "buenos dias", "please": "por favor"}
ANIMALS = {"a cow": "moo", "a dog": "woof", "a cat": "meow", "a duck": "quack", "a sheep": "baa", "a lion": "roar",
           "a snake": "hiss", "an owl": "hoot", "a pig": "oink", "a bee": "buzz"}
REPEAT = ["banana", "window", "purple", "river", "castle", "pencil", "garden", "rocket", "silver", "lantern",
          "marble", "thunder", "velvet", "harbor", "meadow", "crystal", "falcon", "copper", "pepper", "island"]


def items(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []

    def add(kind, question, answer):
        out.append({"kind": kind, "messages": [{"role": "user", "content": question}],
                    "answer": answer if isinstance(answer, list) else [answer]})

    for country, city in CAPITALS.items():
        add("capital", f"What is the capital of {country}? Answer with the city's name only.", city)
    for word, opposite in OPPOSITES.items():
        add("opposite", f"What is the opposite of \"{word}\"? Answer with one word.", opposite)
    for thing, colour in COLOURS.items():
        add("colour", f"What color is {thing}? Answer with one word.", colour)
    for word, plural in PLURALS.items():
        add("plural", f"What is the plural of \"{word}\"? Answer with one word.", plural)
    for i, day in enumerate(DAYS):
        add("next-day", f"Which day of the week comes after {day}? Answer with one word.", DAYS[(i + 1) % 7])
    for i, month in enumerate(MONTHS):
        add("next-month", f"Which month comes after {month}? Answer with one word.", MONTHS[(i + 1) % 12])
    for n in range(21):
        add("number-word", f"Write the number {n} in words. Answer with the word only.", WORDS[n])
    for english, spanish in SPANISH.items():
        add("spanish", f"How do you say \"{english}\" in Spanish? Answer with the Spanish only.",
            [spanish, spanish.replace("adios", "adiós").replace("buenos dias", "buenos días")])
    for animal, sound in ANIMALS.items():
        add("animal-sound", f"What sound does {animal} make? Answer with one word.", sound)
    for word in REPEAT:
        add("repeat", f"Repeat this word exactly once: {word}", word)
    for _ in range(40):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        add("addition", f"What is {a} + {b}? Answer with the number only.", str(a + b))
    for _ in range(30):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        add("multiplication", f"What is {a} times {b}? Answer with the number only.", str(a * b))
    for _ in range(20):
        a = rng.randint(20, 99)
        b = rng.randint(1, a - 1)
        add("subtraction", f"What is {a} minus {b}? Answer with the number only.", str(a - b))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "examples" / "route" / "tasks.jsonl"))
    a = ap.parse_args()
    rows = items()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} items to {a.out}")


if __name__ == "__main__":
    main()
