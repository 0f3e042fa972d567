"""Generation options as a user gets them: the export's own defaults (its generation_config.json), overridden
by what the user asks for, checked once."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aira_opt.core.errors import AiraOptError, OptionError
from aira_opt.generation.generator import GenerateOptions
from aira_opt.generation.sampling import SamplingSettings
from aira_opt.generation.speculative import DRAFT, Speculation
from aira_opt.source.models import CARD_GENERATION_DEFAULTS

DEFAULT_MAX_NEW_TOKENS = 256  # for a model whose generation config names none (transformers' own is a bare 20)


def generate_options(generation_config: dict[str, Any], greedy: bool = False, seed: int | None = None,
                     num_return_sequences: int = 1, max_new_tokens: int | None = None, temperature: float | None = None,
                     top_k: int | None = None, top_p: float | None = None,
                     repetition_penalty: float | None = None,
                     speculation: Speculation | None = None) -> GenerateOptions:
    """Options from a folder's generation_config.json (the source model's own defaults, written by the export),
    overridden by the user. What it leaves out takes transformers' defaults (no sampling processors, greedy); a
    folder without one (made by hand) gets Aira's model-card defaults. speculation: see speculation_from."""
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
    if problems:
        raise AiraOptError("; ".join(problems))
    return GenerateOptions(max_new_tokens=int(pick(max_new_tokens, "max_new_tokens")), sampling=sampling, seed=seed,
                           num_return_sequences=num_return_sequences, fit_context=max_new_tokens is None,
                           speculation=speculation)


def speculation_from(speculative: str | None, num_speculative_tokens: int | None,
                     draft_given: bool) -> Speculation | None:
    """The one reading of the speculation options (CLI, API, check, bench): the method ("ngram", "draft" or "off";
    None: "draft" when a draft model is given, else off) and the most tokens proposed per step. None: no
    speculation. What does not fit together is one OptionError."""
    method = speculative or (DRAFT if draft_given else None)
    if method in (None, "off"):
        if num_speculative_tokens is not None:
            raise OptionError("num_speculative_tokens needs a speculative method (ngram, or a draft model)")
        return None
    if method == DRAFT and not draft_given:
        raise OptionError("speculative 'draft' needs a draft model: load(folder, draft=DIR), or "
                          "--speculative-draft DIR")
    speculation = Speculation(method, num_speculative_tokens)
    problems = speculation.validate()
    if problems:
        raise OptionError("; ".join(problems))
    return speculation
