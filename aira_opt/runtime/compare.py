"""The comparator: a candidate runner's logits against a reference's, case by case. Post-export validation and
`check` both judge through it; it collects every case that misses the bar, and the caller raises one error (or
reports them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from aira_opt.core.numerics import logit_agreement


class Bar(Protocol):
    """What a case must meet (precision.variants.Tolerance): the miss as one line, or None."""

    def misses(self, diff: float, cosine: float) -> str | None: ...


@dataclass
class Comparison:
    bar: Bar | None = None  # None: measure only
    cases: list[dict[str, Any]] = field(default_factory=list)  # per case: label, max |diff|, min cosine, top-1
    misses: list[str] = field(default_factory=list)  # "label: what it missed", one per failing case

    def add(self, label: str, reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        """reference, candidate: [N, V] logits of the same positions -> that case's agreement."""
        stats = logit_agreement(reference, candidate)
        self.cases.append({"case": label, **stats})
        miss = self.bar.misses(stats["max_abs_logit_diff"], stats["min_cosine"]) if self.bar is not None else None
        if miss:
            self.misses.append(f"{label}: {miss}")
        return stats

    @property
    def max_abs_logit_diff(self) -> float:
        return max((c["max_abs_logit_diff"] for c in self.cases), default=0.0)

    @property
    def min_cosine(self) -> float:
        return min((c["min_cosine"] for c in self.cases), default=1.0)

    @property
    def top1_agreement(self) -> float:
        """Over every compared position of every case."""
        rows = sum(c["rows"] for c in self.cases)
        return sum(c["top1_agreement"] * c["rows"] for c in self.cases) / rows if rows else 1.0
