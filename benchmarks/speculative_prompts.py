"""Builds benchmarks/prompts/speculative.json: the two prompt sets of the speculative-decoding benchmark.

- grounded: a passage of real English prose, quoted, with a request to repeat, extract, rewrite or summarize it
  (what prompt lookup is for: the answer copies the prompt);
- open: questions with nothing to copy (where speculation must cost nothing).

The passages are the paragraphs of 45 to 110 words in the docstrings of CPython's standard library modules, as
installed (Python Software Foundation License), then the held-out public-domain paragraphs aira-opt ships
(aira_opt/assets/text/SOURCE.md). Deterministic: the same Python version gives the same file.

    python benchmarks/speculative_prompts.py [OUT]
"""

from __future__ import annotations

import ast
import json
import platform
import re
import sys
import sysconfig
from pathlib import Path

from aira_opt.source.corpus import heldout_english

REQUESTS = ["Repeat the following passage exactly, word for word.",
            "Copy the first two sentences of the following passage exactly.",
            "Rewrite the following passage in plain words, keeping every fact.",
            "Summarize the following passage in two or three sentences."]
OPEN = ["What is the capital of France?", "Why is the sky blue?", "How do bees make honey?",
        "Give me three tips for a good night's sleep.", "What is the difference between a virus and a bacterium?",
        "Write a short poem about the sea.", "How does a refrigerator keep food cold?",
        "What are the main causes of climate change?", "Explain what a prime number is.",
        "Who wrote Romeo and Juliet, and what is it about?", "How can I learn to cook simple meals?",
        "What is photosynthesis?", "Suggest a name for a friendly robot and explain why.",
        "Why do we have seasons on Earth?", "What should I pack for a weekend hiking trip?",
        "How does the internet work, in simple terms?", "What is the Pythagorean theorem used for?",
        "Tell me a short story about a lost cat.", "What are the benefits of regular exercise?",
        "How do airplanes stay in the air?"]


def stdlib_paragraphs() -> list[tuple[str, str]]:
    """(module file, paragraph) for every docstring paragraph of 45-110 words that reads as prose."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for paragraph in re.split(r"\n\s*\n", doc or ""):
            text = " ".join(paragraph.split())
            if (45 <= len(text.split()) <= 110 and text[0].isupper() and text.endswith(".")
                    and not re.search(r"[{}=<>\[\]_`]|\.\.\.|>>>|\bdef\b|\(\)", text)):
                found.append((path.name, text))
    return found


def build() -> dict:
    passages = [(f"CPython {platform.python_version()} Lib/{name} docstring (PSF License)", text)
                for name, text in stdlib_paragraphs()][:14]
    passages += [("aira_opt/assets/text/heldout-english.txt (public domain)", text) for text in heldout_english()]
    grounded = [{"prompt": f"{REQUESTS[i % len(REQUESTS)]}\n\n\"{text}\"", "source": source}
                for i, (source, text) in enumerate(passages[:20])]
    return {"about": (__doc__ or "").splitlines()[0], "grounded": grounded,
            "open": [{"prompt": q, "source": "written for this benchmark"} for q in OPEN]}


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "prompts" / "speculative.json"
    data = build()
    out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}: {len(data['grounded'])} grounded, {len(data['open'])} open prompts")
