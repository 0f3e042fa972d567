"""Next-token selection: greedy, or sampling with exactly the semantics of transformers' logits processors.

Order as in transformers' generate: repetition penalty (a processor, applied to greedy too), then the sampling
warpers temperature -> top-k -> top-p, then a draw from the softmax. All on numpy scores [B, V].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NEG_INF = -np.inf


@dataclass(frozen=True)
class SamplingSettings:
    """Defaults leave the scores as they are; a model's own defaults come from its generation_config.json."""

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def validate(self) -> list[str]:
        problems = [f"{name} must be a finite number, got {value}" for name, value in
                    (("temperature", self.temperature), ("top_p", self.top_p),
                     ("repetition_penalty", self.repetition_penalty)) if not math.isfinite(value)]
        if problems:
            return problems
        if self.do_sample and self.temperature <= 0:
            problems.append("temperature must be > 0 when sampling (use --greedy for argmax)")
        if self.top_k < 0:
            problems.append("top_k must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            problems.append("repetition_penalty must be > 0")
        return problems


GREEDY = SamplingSettings(do_sample=False)  # argmax of the raw logits: what parity checks and bench compare


def apply_repetition_penalty(scores: np.ndarray, history: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor: every token already in the sequence (prompt included)
    has its score divided by `penalty` when positive, multiplied when negative.

    scores: [B, V]; history: [B, T] token ids.
    """
    if penalty == 1.0 or history.shape[1] == 0:
        return scores
    out = scores.copy()
    rows = np.arange(scores.shape[0])[:, None]
    seen = scores[rows, history]  # [B, T]
    out[rows, history] = np.where(seen < 0, seen * penalty, seen / penalty)
    return out


def apply_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    return scores / temperature if temperature != 1.0 else scores


def apply_top_k(scores: np.ndarray, top_k: int) -> np.ndarray:
    """transformers' TopKLogitsWarper: scores below the k-th largest become -inf (ties with it stay)."""
    if top_k <= 0 or top_k >= scores.shape[-1]:
        return scores
    kth = -np.partition(-scores, top_k - 1, axis=-1)[:, top_k - 1 : top_k]  # [B, 1]
    return np.where(scores < kth, NEG_INF, scores)


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - np.max(scores, axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def apply_top_p(scores: np.ndarray, top_p: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """transformers' TopPLogitsWarper: sort ascending, drop tokens whose cumulative probability is
    <= 1 - top_p, always keep the `min_tokens_to_keep` most likely."""
    if top_p >= 1.0:
        return scores
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(softmax(sorted_scores), axis=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[:, -min_tokens_to_keep:] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, NEG_INF, scores)


def process(scores: np.ndarray, history: np.ndarray, settings: SamplingSettings) -> np.ndarray:
    """All processors in transformers' order; the result is what greedy takes the argmax of, or samples."""
    scores = apply_repetition_penalty(scores, history, settings.repetition_penalty)
    if settings.do_sample:
        scores = apply_temperature(scores, settings.temperature)
        scores = apply_top_k(scores, settings.top_k)
        scores = apply_top_p(scores, settings.top_p)
    return scores


def select_next(scores: np.ndarray, history: np.ndarray, settings: SamplingSettings,
                rng: np.random.Generator) -> np.ndarray:
    """Next token per row, every row with the same settings and generator. scores: [B, V] fp32 logits;
    history: [B, T] -> [B] int64."""
    rows = scores.shape[0]
    return select_next_per_row(scores, history, [settings] * rows, [rng] * rows)


def select_next_per_row(scores: np.ndarray, history: np.ndarray, settings: Sequence[SamplingSettings],
                        rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """Next token per row, each row with its own settings and generator (a server's batch of requests).
    scores: [B, V]; history: [B, T]; settings, rngs: one per row -> [B] int64.

    Rows that share settings are processed together. A sampling row draws one uniform from its generator, in
    row order, so rows sharing one generator draw exactly what a single [B, 1] draw would."""
    chosen = np.empty(scores.shape[0], dtype=np.int64)  # [B]
    for group in dict.fromkeys(settings):  # distinct settings, in first-seen order
        rows = np.array([r for r, s in enumerate(settings) if s == group])
        processed = process(scores[rows].astype(np.float32), history[rows], group)  # [G, V]
        if not group.do_sample:
            chosen[rows] = np.argmax(processed, axis=-1)
            continue
        probs = softmax(processed)  # [G, V]
        chosen[rows] = [draw(row_probs, rngs[r]) for row_probs, r in zip(probs, rows)]
    return chosen


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token from a distribution [V]: an inverse-CDF draw of one uniform from the row's seeded generator (so
    a seed repeats exactly), scaled by the total, which rounding leaves near 1."""
    cdf = np.cumsum(probs)
    return int(min((cdf < rng.random() * cdf[-1]).sum(), probs.size - 1))
