"""Prompt formats as data, injection-safe tokenization, and the built-in prompt sets.

A model's prompt format is chosen from its tokenizer, in this order:
- `aira`: the tokenizer has Aira's control tokens: `<|startofinstruction|>` question `<|endofinstruction|>`,
  the answer ends at `<|endofcompletion|>`;
- `chat-template`: the tokenizer's own chat template (transformers' apply_chat_template with its default system
  prompt and generation prompt), one user turn;
- `plain`: completion, bos + text, for base models with neither.
Each is recorded as a template string around `{question}`. Template parts are tokenized with special-token
matching on; the user's text with it off, so a user who types `<|im_end|>`, `</s>` or `<|endofinstruction|>`
gets those characters, never the control token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from aira_opt.source.models import AIRA_TOKENS

QUESTION = "{question}"
FORMATS = ("aira", "chat-template", "plain")

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


def has_aira_tokens(tokenizer: Any) -> bool:
    try:
        control_ids(tokenizer)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes the model's prompt, and which tokens end its answer."""

    kind: str  # one of FORMATS
    template: str  # the prompt with the question as "{question}", control tokens spelled out
    stop_ids: tuple[int, ...]  # any of these ends a sequence
    pad_id: int  # what fills left padding and finished rows

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "stop_ids": list(self.stop_ids)}

    @property
    def eos_token_id(self) -> int | list[int]:
        """The stop ids as generation configs spell `eos_token_id`: one id, or a list when there are several."""
        return self.stop_ids[0] if len(self.stop_ids) == 1 else list(self.stop_ids)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptFormat:
        return cls(str(data["kind"]), str(data["template"]), tuple(int(i) for i in data["stop_ids"]),
                   int(data["pad_id"]))


def _ids(value: Any) -> list[int]:
    """A generation config's token id field, which may be one id or a list (Llama 3 style)."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def detect_format(tokenizer: Any, generation_config: Any = None) -> PromptFormat:
    """The format of a model from its tokenizer (and the stop and pad ids of its generation config)."""
    if has_aira_tokens(tokenizer):
        ids = control_ids(tokenizer)
        return PromptFormat("aira", AIRA_TOKENS.bos + QUESTION + AIRA_TOKENS.sep, (ids["eos"],), ids["pad"])
    stops = _ids(getattr(generation_config, "eos_token_id", None))
    stops += [i for i in _ids(tokenizer.eos_token_id) if i not in stops]
    if not stops:
        raise ValueError("the model names no end-of-sequence token (generation config or tokenizer)")
    pads = _ids(getattr(generation_config, "pad_token_id", None)) or _ids(tokenizer.pad_token_id) or stops
    if getattr(tokenizer, "chat_template", None):
        marker = "\x00question\x00"  # survives any template, and no tokenizer merges it with its neighbours
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                                 add_generation_prompt=True)
        if rendered.count(marker) == 1:
            return PromptFormat("chat-template", rendered.replace(marker, QUESTION), tuple(stops), pads[0])
    # Whether the tokenizer itself starts a text with bos (its post-processor does, whatever flag says so).
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    bos = tokenizer.bos_token if tokenizer.bos_token and adds_bos else ""
    return PromptFormat("plain", bos + QUESTION, tuple(stops), pads[0])


def _template_ids(tokenizer: Any, part: str) -> list[int]:
    """A template part, with its control tokens matched as such (and no bos added)."""
    return list(tokenizer(part, add_special_tokens=False)["input_ids"]) if part else []


def _text_after_last_control_token(tokenizer: Any, part: str) -> str:
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t] + [
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    end = max((part.rfind(t) + len(t) for t in set(specials) if t in part), default=0)
    return part[end:]


def _continuation_ids(tokenizer: Any, lead: str, text: str) -> list[int]:
    """Ids of user `text` as the tokenizer splits it right after the template's plain `lead` (`user\n`, say):
    a SentencePiece tokenizer marks only a segment's first word with a space, so text tokenized on its own would
    differ from the whole prompt tokenized at once. Falls back to the text alone if the lead does not split off."""
    if lead:
        alone, joint = text_ids(tokenizer, lead), text_ids(tokenizer, lead + text)
        if joint[:len(alone)] == alone:
            return joint[len(alone):]
    return text_ids(tokenizer, text)


def prompt_ids(tokenizer: Any, question: str, fmt: PromptFormat | None = None) -> list[int]:
    """The ids the model expects before its answer: the template's parts as control tokens, the question as text."""
    fmt = fmt or detect_format(tokenizer)
    before, after = fmt.template.split(QUESTION, 1)
    question_ids = _continuation_ids(tokenizer, _text_after_last_control_token(tokenizer, before), question)
    return [*_template_ids(tokenizer, before), *question_ids, *_template_ids(tokenizer, after)]


def conversation_ids(tokenizer: Any, question: str, answer: str, fmt: PromptFormat | None = None) -> list[int]:
    """A whole turn, as in training: the prompt, the answer as text, the first stop token."""
    fmt = fmt or detect_format(tokenizer)
    lead = _text_after_last_control_token(tokenizer, fmt.template.split(QUESTION, 1)[1])
    return [*prompt_ids(tokenizer, question, fmt), *_continuation_ids(tokenizer, lead, answer), fmt.stop_ids[0]]


def decode_answer(tokenizer: Any, ids: list[int]) -> str:
    """Answer text from generated ids, without control tokens."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def ordinary_token_ids(tokenizer: Any, vocab: int) -> np.ndarray:
    """Every id below `vocab` that is not one of the tokenizer's special tokens: what random probes draw from,
    wherever a tokenizer puts its specials (aira-tiny's are 0-4, the real Aira's 32000-32004)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return np.array([i for i in range(vocab) if i not in special], dtype=np.int64)
