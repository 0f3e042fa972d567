"""Our numpy processors must equal transformers' logits processors exactly, on random logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from aira_opt.generation.sampling import (
    SamplingSettings,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    process,
    select_next,
)

RNG = np.random.default_rng(0)
SCORES = (RNG.standard_normal((4, 300)) * 3).astype(np.float32)  # [B, V]
HISTORY = RNG.integers(0, 300, size=(4, 25))  # [B, T], with repeats


def hf(processor, scores=SCORES, history=HISTORY) -> np.ndarray:
    return processor(torch.from_numpy(history), torch.from_numpy(scores.copy())).numpy()


def same(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert np.array_equal(np.isinf(ours), np.isinf(theirs))
    finite = ~np.isinf(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("penalty", [1.2, 0.8, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    same(apply_repetition_penalty(SCORES, HISTORY, penalty), hf(RepetitionPenaltyLogitsProcessor(penalty)))


@pytest.mark.parametrize("temperature", [0.2, 0.7, 1.5])
def test_temperature_equals_transformers(temperature):
    same(apply_temperature(SCORES, temperature), hf(TemperatureLogitsWarper(temperature)))


@pytest.mark.parametrize("k", [1, 5, 30, 299])
def test_top_k_equals_transformers(k):
    same(apply_top_k(SCORES, k), hf(TopKLogitsWarper(k)))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_equals_transformers(p):
    same(apply_top_p(SCORES, p), hf(TopPLogitsWarper(p)))


def test_card_chain_equals_transformers_in_its_order():
    settings = SamplingSettings(do_sample=True, temperature=0.2, top_k=30, top_p=0.3, repetition_penalty=1.2)
    theirs = SCORES.copy()
    for proc in (RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.2), TopKLogitsWarper(30),
                 TopPLogitsWarper(0.3)):
        theirs = hf(proc, theirs)
    same(process(SCORES, HISTORY, settings), theirs)


def test_greedy_applies_the_repetition_penalty_then_argmax():
    settings = SamplingSettings(do_sample=False, repetition_penalty=1.2)
    expected = hf(RepetitionPenaltyLogitsProcessor(1.2)).argmax(-1)
    assert select_next(SCORES, HISTORY, settings, np.random.default_rng(0)).tolist() == expected.tolist()


def test_seeded_sampling_repeats_and_seeds_differ():
    settings = SamplingSettings(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    flat = np.zeros((64, 50), np.float32)  # uniform: every draw depends only on the generator
    history = np.zeros((64, 0), np.int64)
    a = select_next(flat, history, settings, np.random.default_rng(42))
    b = select_next(flat, history, settings, np.random.default_rng(42))
    c = select_next(flat, history, settings, np.random.default_rng(43))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_sampling_draws_only_tokens_the_warpers_keep():
    settings = SamplingSettings(do_sample=True, temperature=1.0, top_k=3, top_p=1.0, repetition_penalty=1.0)
    rng = np.random.default_rng(1)
    allowed = np.argsort(-SCORES, axis=-1)[:, :3]
    for _ in range(50):
        picks = select_next(SCORES, HISTORY[:, :0], settings, rng)
        assert all(p in row for p, row in zip(picks, allowed))


def test_sampling_frequencies_follow_the_distribution():
    settings = SamplingSettings(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    logits = np.log(np.array([[0.7, 0.2, 0.1]], np.float32)).repeat(20000, axis=0)
    picks = select_next(logits, np.zeros((20000, 0), np.int64), settings, np.random.default_rng(5))
    freq = np.bincount(picks, minlength=3) / len(picks)
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.015)
