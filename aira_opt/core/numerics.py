"""How two sets of logits are compared: used by the post-export validation and by `check` alike."""

from __future__ import annotations

import numpy as np


def logit_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """reference, candidate: [N, V] -> max |diff|, min cosine per row, top-1 agreement (fraction of rows)."""
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    cos = (ref * cand).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(cand, axis=-1) + 1e-30)
    return {
        "max_abs_logit_diff": float(np.abs(ref - cand).max()),
        "min_cosine": float(cos.min()),
        "top1_agreement": float((ref.argmax(-1) == cand.argmax(-1)).mean()),
        "rows": int(ref.shape[0]),
    }


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[N, V] logits -> [N, V] log-probabilities, in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def perplexity(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    """Sum of negative log-likelihoods of ids[1:] given logits[:-1]; returns (nll_sum, count)."""
    logp = log_softmax(logits[:-1])
    targets = np.array(ids[1:])
    return float(-logp[np.arange(len(targets)), targets].sum()), len(targets)
