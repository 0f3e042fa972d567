"""Triton's generate extension as data: the tensors a request may carry and the ones a response returns, and the
validation that turns one request's tensors into our generation options (or one clear error).

The same records write `config.pbtxt` (serve/repository.py) and read requests (serve/backend.py), so the two
cannot drift. `POST /v2/models/<name>/generate` maps each JSON field to the input of the same name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from aira_opt.generation.generator import GenerateOptions
from aira_opt.generation.speculative import NGRAM, Speculation


@dataclass(frozen=True)
class Field:
    """One tensor of the protocol: its name, Triton's type, and what it means."""

    name: str
    triton_type: str  # as config.pbtxt spells it
    optional: bool
    help: str


INPUTS: tuple[Field, ...] = (
    Field("text_input", "TYPE_STRING", False, "the question (plain text: control tokens typed in it stay text)"),
    Field("max_tokens", "TYPE_INT32", True, "most new tokens [default: the export's, fitted to the context]"),
    Field("temperature", "TYPE_FP32", True, "0: greedy; > 0: sample at that temperature [default: the export's]"),
    Field("top_k", "TYPE_INT32", True, "keep the k most likely tokens, 0: off [default: the export's]"),
    Field("top_p", "TYPE_FP32", True, "nucleus sampling in (0, 1] [default: the export's]"),
    Field("repetition_penalty", "TYPE_FP32", True, "> 0, 1: off [default: the export's]"),
    Field("seed", "TYPE_INT64", True, "seed for this request's sampling (repeats exactly, whatever it is batched with)"),
    Field("ignore_eos", "TYPE_BOOL", True, "true: generate exactly max_tokens, past any eos (load tests)"),
    Field("stream", "TYPE_BOOL", True, "true: one response per new token, with its text (use with generate_stream)"),
    Field("speculative", "TYPE_STRING", True, "ngram: prompt lookup proposes tokens, verified in one step (the same "
          "answer, fewer steps); off [default]"),
    Field("num_speculative_tokens", "TYPE_INT32", True, "the most tokens proposed per step [default: 6]"),
)
OUTPUTS: tuple[Field, ...] = (
    Field("text_output", "TYPE_STRING", False, "the answer, or the next piece of it when streaming"),
    Field("finish_reason", "TYPE_STRING", False, "stop (eos), length (max_tokens) or cancelled; last response only"),
    Field("generated_tokens", "TYPE_INT32", False, "new tokens so far, eos included"),
)
FINISH_REASONS = ("stop", "length", "cancelled")


class BadRequest(ValueError):
    """What is wrong with one request, as the message its client gets; the server goes on serving."""


@dataclass(frozen=True)
class GenerateRequest:
    """One validated request: the text, the options its row of the batch runs with, and how to answer."""

    text: str
    options: GenerateOptions
    stream: bool
    max_tokens_given: bool  # False: the export's default, shortened to what the context leaves


def _scalar(values: dict[str, np.ndarray | None], name: str, problems: list[str]) -> Any:
    value = values.get(name)
    if value is None:
        return None
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        problems.append(f"{name} must be one value, got {flat.size}")
        return None
    return flat[0]


def parse_request(values: dict[str, np.ndarray | None], defaults: GenerateOptions) -> GenerateRequest:
    """A request's input tensors (name -> array, None when absent) -> the request, or BadRequest naming every
    problem at once. `defaults` are the export's own (generation_config.json)."""
    problems: list[str] = []
    raw = _scalar(values, "text_input", problems)
    text = ""
    if raw is None and not problems:
        problems.append("text_input is missing")
    elif raw is not None:
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError:
            problems.append("text_input is not valid UTF-8")
        if not problems and not text.strip():
            problems.append("text_input is empty")

    max_tokens = _scalar(values, "max_tokens", problems)
    if max_tokens is not None and int(max_tokens) < 1:
        problems.append(f"max_tokens must be at least 1, got {int(max_tokens)}")
    sampling = defaults.sampling
    temperature = _scalar(values, "temperature", problems)
    if temperature is not None:
        temperature = float(temperature)
        if not math.isfinite(temperature) or temperature < 0:
            problems.append(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
        elif temperature == 0:
            sampling = replace(sampling, do_sample=False)
        else:
            sampling = replace(sampling, do_sample=True, temperature=temperature)
    for name, cast in (("top_k", int), ("top_p", float), ("repetition_penalty", float)):
        value = _scalar(values, name, problems)
        if value is not None:
            sampling = replace(sampling, **{name: cast(value)})
    problems += sampling.validate()
    seed = _scalar(values, "seed", problems)
    if seed is not None and int(seed) < 0:
        problems.append(f"seed must be >= 0, got {int(seed)}")
    stream = _scalar(values, "stream", problems)
    ignore_eos = _scalar(values, "ignore_eos", problems)
    speculation = _speculation(values, problems)
    if problems:
        raise BadRequest("; ".join(problems))
    options = replace(defaults, sampling=sampling, seed=None if seed is None else int(seed), num_return_sequences=1,
                      max_new_tokens=defaults.max_new_tokens if max_tokens is None else int(max_tokens),
                      ignore_eos=bool(ignore_eos) if ignore_eos is not None else False, speculation=speculation)
    return GenerateRequest(text, options, bool(stream) if stream is not None else False, max_tokens is not None)


def _speculation(values: dict[str, np.ndarray | None], problems: list[str]) -> Speculation | None:
    """A request's speculation: prompt lookup only (a draft model would need its own cache beside the running
    batch's, which rows join and leave)."""
    raw = _scalar(values, "speculative", problems)
    count = _scalar(values, "num_speculative_tokens", problems)
    method = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)) if raw is not None else "off"
    if method not in (NGRAM, "off"):
        problems.append(f"speculative must be ngram or off (a server speculates by prompt lookup), got {method!r}")
        return None
    if method == "off":
        if count is not None:
            problems.append("num_speculative_tokens needs speculative ngram")
        return None
    speculation = Speculation(NGRAM, None if count is None else int(count))
    problems += speculation.validate()
    return speculation


def fit_to_context(request: GenerateRequest, prompt_tokens: int, context: int) -> GenerateRequest:
    """The request with its token budget checked against the context: an explicit max_tokens that does not fit is
    an error; the default is shortened to what the context leaves."""
    room = context - prompt_tokens
    if room < 1:
        raise BadRequest(f"the prompt is {prompt_tokens} tokens, which leaves no room in the model's context of "
                         f"{context}; shorten text_input")
    if request.max_tokens_given and request.options.max_new_tokens > room:
        raise BadRequest(f"prompt of {prompt_tokens} tokens + max_tokens {request.options.max_new_tokens} exceeds "
                         f"the model's context of {context}; lower max_tokens to at most {room}")
    budget = min(request.options.max_new_tokens, room)
    return replace(request, options=replace(request.options, max_new_tokens=budget))
