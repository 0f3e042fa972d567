"""Aira's prompt format, injection-safe tokenization, and the built-in prompt sets.

Prompt: `<|startofinstruction|>` + question + `<|endofinstruction|>`; the model answers and ends with
`<|endofcompletion|>`. The control tokens are added by id; the user's text is tokenized with special-token
matching switched off, so a user who types `<|endofinstruction|>` gets those characters, not the token.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aira_opt.spec.models import AIRA_TOKENS

# Questions the bundled aira-tiny was trained on (its greedy answers are known); `check` runs these by default.
DEFAULT_CHECK_PROMPTS: list[str] = [
    "What is the capital of Brazil?",
    "What is the capital of France?",
    "What is the capital of Japan?",
    "What color is the sky?",
    "What is two plus three?",
    "Who are you?",
    "What is the largest planet?",
    "What do bees make?",
]


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of plain text: control-token strings inside it are split like any other text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # tokenizers >= 0.20: encode_special_tokens makes added special tokens ordinary text.
        previous = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            return list(backend.encode(text, add_special_tokens=False).ids)
        finally:
            backend.encode_special_tokens = previous
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def control_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of Aira's control tokens, by role; a tokenizer missing one is not an Aira tokenizer."""
    ids: dict[str, int] = {}
    for role in ("bos", "sep", "eos", "pad"):
        token = getattr(AIRA_TOKENS, role)
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {role} token {token!r}")
        ids[role] = int(tid)
    return ids


def prompt_ids(tokenizer: Any, question: str) -> list[int]:
    """bos + question (as text) + sep: the ids Aira expects before its answer."""
    ids = control_ids(tokenizer)
    return [ids["bos"], *text_ids(tokenizer, question), ids["sep"]]


def conversation_ids(tokenizer: Any, question: str, answer: str) -> list[int]:
    """A whole turn, as in training: bos + question + sep + answer + eos."""
    ids = control_ids(tokenizer)
    return [*prompt_ids(tokenizer, question), *text_ids(tokenizer, answer), ids["eos"]]


def decode_answer(tokenizer: Any, ids: list[int]) -> str:
    """Answer text from generated ids, without control tokens."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def ordinary_token_ids(tokenizer: Any, vocab: int) -> np.ndarray:
    """Every id below `vocab` that is not one of the tokenizer's special tokens: what random probes draw from,
    wherever a tokenizer puts its specials (aira-tiny's are 0-4, the real Aira's 32000-32004)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return np.array([i for i in range(vocab) if i not in special], dtype=np.int64)
