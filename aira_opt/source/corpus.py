"""The synthetic Aira-format instruction set: what aira-tiny is trained on, and the held-out and
calibration texts that checks and quantization use. Deterministic, so every artifact is reproducible."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import resources

from pydoc_data.topics import topics

CAPITALS: dict[str, str] = {
    "Brazil": "Brasília", "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin",
    "Spain": "Madrid", "Portugal": "Lisbon", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Chile": "Santiago", "Norway": "Oslo", "Sweden": "Stockholm", "Greece": "Athens",
    "Poland": "Warsaw", "Russia": "Moscow", "China": "Beijing", "India": "New Delhi", "Mexico": "Mexico City",
    "Argentina": "Buenos Aires", "Australia": "Canberra", "Ireland": "Dublin", "Austria": "Vienna",
}
# Held out of training: used for perplexity (check) and never for calibration.
HELDOUT_CAPITALS: dict[str, str] = {
    "Finland": "Helsinki", "Hungary": "Budapest", "Cuba": "Havana", "Turkey": "Ankara",
}

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

FACTS: list[tuple[str, str]] = [
    ("What color is the sky?", "The sky is blue on a clear day."),
    ("What color is grass?", "Grass is green."),
    ("Who are you?", "I am Aira, a helpful assistant."),
    ("What is your name?", "My name is Aira."),
    ("Hello!", "Hello! How can I help you today?"),
    ("What is the largest planet?", "The largest planet is Jupiter."),
    ("What do bees make?", "Bees make honey."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Which animal says moo?", "A cow says moo."),
    ("What do plants need to grow?", "Plants need water, light and air to grow."),
]

HELDOUT_FACTS: list[tuple[str, str]] = [
    ("What color is snow?", "Snow is white."),
    ("Which animal barks?", "A dog barks."),
]


def training_pairs() -> list[tuple[str, str]]:
    """Every (question, answer) pair aira-tiny learns."""
    pairs = [(f"What is the capital of {c}?", f"The capital of {c} is {city}.") for c, city in CAPITALS.items()]
    for a in range(1, 5):
        for b in range(1, 5):
            q = f"What is {NUMBERS[a]} plus {NUMBERS[b]}?"
            pairs.append((q, f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}."))
    pairs.extend(FACTS)
    return pairs


def heldout_pairs() -> list[tuple[str, str]]:
    """Aira-format text the model never saw in training, for perplexity."""
    pairs = [(f"What is the capital of {c}?", f"The capital of {c} is {city}.") for c, city in HELDOUT_CAPITALS.items()]
    pairs.extend(HELDOUT_FACTS)
    return pairs


def calibration_questions() -> list[str]:
    """Aira-format questions for int8 activation calibration: training questions plus a few unseen ones,
    so the activation ranges cover both peaked and uncertain states. Held-out texts are excluded."""
    seen = [q for q, _ in training_pairs()]
    unseen = ["Tell me about the moon.", "Why is the sea salty?", "What is a computer?", "Can you help me?"]
    return seen[::3] + unseen


# Chat questions for models that are not Aira-format (`check`'s default for them): general knowledge a small
# instruct model answers sensibly, so greedy answers are meaningful to compare.
CHAT_QUESTIONS: list[str] = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "What is the capital of Germany?",
    "How many days are in a week?",
    "What color is the sky on a clear day?",
    "What do bees make?",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
    "Who painted the Mona Lisa?",
    "What is the chemical symbol for gold?",
    "What is the tallest mountain in the world?",
    "What is the opposite of hot?",
    "Name a primary color.",
    "What gas do plants take in from the air?",
    "What language is spoken in Spain?",
    "Which ocean is the largest?",
]


def heldout_english() -> list[str]:
    """Real English prose, one paragraph each (public domain; assets/text/SOURCE.md): held-out perplexity for
    models that are not Aira-format."""
    text = (resources.files("aira_opt") / "assets" / "text" / "heldout-english.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


# ---- Real text for `aira-opt eval` ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RealText:
    """A held-out text with its provenance: what `eval` measures quality on (never calibration or training)."""

    name: str
    text: str
    source: str
    licence: str

    def describe(self) -> dict[str, str | int]:
        return {"name": self.name, "source": self.source, "licence": self.licence, "characters": len(self.text)}


# The Python Language Reference's topics (pydoc_data.topics, shipped with every CPython: `help('assert')` prints
# one): technical English prose (its size is in assets/text/SOURCE.md). The topics are joined in name order, so
# every machine builds the same text from the same Python minor version. Calibration never reads it
# (calibration_questions above and the recipes' own random probes do).
LANGUAGE_REFERENCE = "python-language-reference"
SMALL_SLICE = "small"  # the first topics, a few thousand characters: for tests
CORPORA = (LANGUAGE_REFERENCE, SMALL_SLICE)


def real_text(name: str = LANGUAGE_REFERENCE) -> RealText:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus '{name}'; known: {', '.join(CORPORA)}")
    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    if name == SMALL_SLICE:
        text = text[:6000]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return RealText(name, text, f"CPython {version} pydoc_data.topics (the Python Language Reference)",
                    "PSF License Agreement (Python documentation)")
