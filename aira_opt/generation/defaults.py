"""Generation options as a user gets them: the export's own defaults (its generation_config.json), overridden
by what the user asks for, checked once."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aira_opt.core.errors import AiraOptError
from aira_opt.generation.generator import GenerateOptions
from aira_opt.generation.sampling import SamplingSettings
from aira_opt.generation.speculative import Speculation
from aira_opt.source.models import CARD_GENERATION_DEFAULTS

DEFAULT_MAX_NEW_TOKENS = 256  # for a model whose generation config names none (transformers' own is a bare 20)


def generate_options(generation_config: dict[str, Any], greedy: bool = False, seed: int | None = None,
                     num_return_sequences: int = 1, max_new_tokens: int | None = None, temperature: float | None = None,
                     top_k: int | None = None, top_p: float | None = None,
                     repetition_penalty: float | None = None, speculative: str | None = None,
                     num_speculative_tokens: int | None = None) -> GenerateOptions:
    """Options from a folder's generation_config.json (the source model's own defaults, written by the export),
    overridden by the user. What it leaves out takes transformers' defaults (no sampling processors, greedy); a
    folder without one (made by hand) gets Aira's model-card defaults. speculative: "ngram" or "draft" (None: off);
    num_speculative_tokens: the most proposed per step (default: the method's)."""
    defaults = generation_config or dict(CARD_GENERATION_DEFAULTS)
    neutral = {**asdict(SamplingSettings()), "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}

    def pick(value: Any, key: str) -> Any:
        return value if value is not None else defaults.get(key, neutral[key])

    sampling = SamplingSettings(
        do_sample=not greedy and bool(defaults.get("do_sample", False)), temperature=float(pick(temperature, "temperature")),
        top_k=int(pick(top_k, "top_k")), top_p=float(pick(top_p, "top_p")),
        repetition_penalty=float(pick(repetition_penalty, "repetition_penalty")),
    )
    problems = sampling.validate()
    speculation = None
    if speculative is not None:
        speculation = Speculation(speculative, num_speculative_tokens)
        problems += speculation.validate()
    elif num_speculative_tokens is not None:
        problems.append("num_speculative_tokens needs a speculative method (ngram, or a draft model)")
    if problems:
        raise AiraOptError("; ".join(problems))
    return GenerateOptions(max_new_tokens=int(pick(max_new_tokens, "max_new_tokens")), sampling=sampling, seed=seed,
                           num_return_sequences=num_return_sequences, fit_context=max_new_tokens is None,
                           speculation=speculation)
