"""Speculative decoding: propose a few tokens cheaply, then verify them in one forward pass of the target.

At batch 1 a decode step reads every weight once for one token; a step over K + 1 positions reads them once for
up to K + 1 tokens and costs little more. The proposals come from
- prompt lookup (`ngram`): the tokens that followed the latest earlier occurrence of the text's last n-gram, in
  the prompt or in what was generated (vLLM's `ngram`, transformers' `prompt_lookup_num_tokens`); no second model;
- a draft model (`draft`): any export with the target's tokenizer, for example the int4 export of the same model.

The output is the target's: greedy rows accept a proposal only where the target's own choice is that token;
sampling rows use rejection sampling (Leviathan et al. 2023, Chen et al. 2023), whose output distribution is the
target's. Rejected positions leave the cache at once: an in-place cache has its length rewound past the columns
no row keeps, and every other rejected column becomes a hole in the attention mask (never attended again; the
position ids come from the mask's running sum). Rows of a batch keep their own accepted lengths that way. A row
never proposes past its budget, so an in-place cache (rewound; its fused graph verifies at batch 1 only) never
needs more room than the plain loop; a growing cache's holes take room, so it is made without a bound.

How many tokens to propose adapts per row: the expected tokens per verify step, (1 - a^(K+1)) / (1 - a) for a
per-token acceptance a, over the step's measured cost against a plain step; K = 0 (no speculation) when nothing
pays, with a probe now and then so a row whose text turns repetitive gets speculation back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from aira_opt.core.contract import position_ids_from_mask
from aira_opt.generation.sampling import SamplingSettings, draw, process, softmax
from aira_opt.runtime.protocol import Decoder, KVCache

NGRAM, DRAFT = "ngram", "draft"
METHODS = (NGRAM, DRAFT)
DEFAULT_TOKENS = {NGRAM: 6, DRAFT: 4}  # the most proposed per step unless given (benchmarks/notes: speedup vs K)
MAX_TOKENS = 16


@dataclass(frozen=True)
class Speculation:
    """How a row speculates: the method, the most tokens proposed per verify step, and whether that number adapts
    to the row's acceptance (fixed: always propose num_tokens, for measuring the cost of K)."""

    method: str = NGRAM
    num_tokens: int | None = None  # None: DEFAULT_TOKENS[method]
    adaptive: bool = True
    max_ngram: int = 3  # prompt lookup: the longest suffix matched
    min_ngram: int = 1  # prompt lookup: the shortest suffix matched

    @property
    def max_tokens(self) -> int:
        return self.num_tokens if self.num_tokens is not None else DEFAULT_TOKENS[self.method]

    def validate(self) -> list[str]:
        problems = []
        if self.method not in METHODS:
            problems.append(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.num_tokens is not None and not 1 <= self.num_tokens <= MAX_TOKENS:
            problems.append(f"num_speculative_tokens must be in [1, {MAX_TOKENS}], got {self.num_tokens}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            problems.append("the n-gram sizes must satisfy 1 <= min_ngram <= max_ngram")
        return problems


# Proposals -------------------------------------------------------------------------------------------------
def ngram_proposal(history: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Prompt lookup: the longest suffix of `history` (max_ngram tokens down to min_ngram) that occurred earlier,
    at its latest earlier occurrence; the (up to) k tokens that followed it there. [] when nothing matches."""
    h = np.asarray(history, dtype=np.int64)  # [L]
    if k < 1 or h.size < 2:
        return []
    for n in range(min(max_ngram, h.size - 1), min_ngram - 1, -1):
        windows = sliding_window_view(h[:-1], n)  # [L - n, n]: every earlier n-gram, each followed by a token
        hits = np.flatnonzero((windows == h[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return h[start:start + k].tolist()
    return []


# Cost and acceptance ----------------------------------------------------------------------------------------
PRIOR_STEP_SLOPE = 0.1  # a step over w positions costs 1 + slope * (w - 1) plain steps until measured
PRIOR_DRAFT_RATIO = 0.25  # a draft step's cost in target steps until measured
# Plain steps before a row that stopped speculating tries one proposal again: a draft's probe costs a catch-up of
# every token since its last proposal, prompt lookup's only a verify step.
PROBE_AFTER = {NGRAM: 8, DRAFT: 32}


@dataclass
class StepCosts:
    """Seconds of a forward pass by its width (positions per row), measured as the batch runs; the ratio of a
    verify step to a plain step is what speculation pays for its proposals."""

    seconds: dict[int, float] = field(default_factory=dict)  # width -> moving average of the target's step
    draft_seconds: float | None = None  # moving average of one draft step

    def record(self, width: int, seconds: float) -> None:
        old = self.seconds.get(width)
        self.seconds[width] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def record_draft(self, seconds: float) -> None:
        old = self.draft_seconds
        self.draft_seconds = seconds if old is None else 0.8 * old + 0.2 * seconds

    def plain(self) -> float | None:
        """A plain step's seconds: measured, or (a row that always speculates) inferred from the narrowest step
        measured with the prior's slope."""
        if 1 in self.seconds or not self.seconds:
            return self.seconds.get(1)
        width = min(self.seconds)
        return self.seconds[width] / (1 + PRIOR_STEP_SLOPE * (width - 1))

    def ratio(self, width: int) -> float:
        """A step over `width` positions in plain steps."""
        plain = self.plain()
        if plain and width in self.seconds:
            return max(1.0, self.seconds[width] / plain)
        return 1 + PRIOR_STEP_SLOPE * (width - 1)

    def draft_ratio(self) -> float:
        plain = self.plain()
        return self.draft_seconds / plain if plain and self.draft_seconds is not None else PRIOR_DRAFT_RATIO


@dataclass
class Acceptance:
    """One row's record: what it proposed and accepted, and its running estimate of the per-token acceptance."""

    speculation: Speculation
    proposed: int = 0
    accepted: int = 0
    verify_steps: int = 0
    plain_steps: int = 0  # consecutive steps without a proposal, since the last
    _hits: float = 1.0  # decayed accepted proposals (a prior of one in two)
    _trials: float = 2.0  # decayed proposals judged

    @property
    def rate(self) -> float:
        return self._hits / self._trials

    def record(self, proposed: int, accepted: int) -> None:
        """A verify step judged `proposed` tokens and accepted the first `accepted` (a rejection ends the run)."""
        self.proposed += proposed
        self.accepted += accepted
        self.verify_steps += 1
        self._hits = 0.8 * self._hits + accepted
        self._trials = 0.8 * self._trials + accepted + (1 if accepted < proposed else 0)

    def choose(self, costs: StepCosts, draft_cost: bool) -> int:
        """How many tokens to propose now: the K that gives the most expected tokens per unit of cost. Where
        several K come within a few percent of the best (the measured costs are noisy), the largest: a run of
        accepted proposals pays off most there."""
        most = self.speculation.max_tokens
        if not self.speculation.adaptive:
            return most
        draft = costs.draft_ratio() if draft_cost else 0.0

        def gains(a: float) -> list[float]:  # expected tokens per plain step's cost, for K = 0 .. most
            return [1.0 / costs.ratio(1)] + [(1 - a ** (k + 1)) / (1 - a) / (costs.ratio(k + 1) + k * draft)
                                             for k in range(1, most + 1)]

        expected = gains(min(self.rate, 0.999))
        if max(expected[1:]) <= expected[0] * 1.02:  # speculation must pay by a margin, so noise does not flip to it
            certain = gains(0.999)  # were every proposal accepted: if even that does not pay, never probe
            probe = self.plain_steps >= PROBE_AFTER[self.speculation.method] and max(certain[1:]) > certain[0] * 1.02
            return 1 if probe else 0
        return max(k for k, gain in enumerate(expected) if gain >= 0.97 * max(expected))

    def report(self) -> dict[str, float | int | str]:
        return {"method": self.speculation.method, "proposed": self.proposed, "accepted": self.accepted,
                "verify_steps": self.verify_steps,
                "acceptance_rate": round(self.accepted / self.proposed, 4) if self.proposed else 0.0}


def summary(records: Sequence[Acceptance], tokens: int, target_steps: int,
            exact: bool) -> dict[str, float | int | str | bool]:
    """The acceptance of a whole generation: proposals, acceptances, tokens per target decode step, and whether
    the target's verify steps compute exactly what its single steps do (greedy output identical to the plain
    loop's); where they do not, the output is the target's as its multi-row kernels compute it."""
    proposed = sum(r.proposed for r in records)
    accepted = sum(r.accepted for r in records)
    return {"method": records[0].speculation.method if records else "", "proposed": proposed, "accepted": accepted,
            "verify_steps": sum(r.verify_steps for r in records),
            "acceptance_rate": round(accepted / proposed, 4) if proposed else 0.0,
            "tokens_per_step": round(tokens / target_steps, 4) if target_steps else 0.0, "exact": exact}


# Verification ---------------------------------------------------------------------------------------------
def verify(logits: np.ndarray, history: list[int], proposal: Sequence[int], settings: SamplingSettings,
           rng: np.random.Generator, proposal_probs: np.ndarray | None = None) -> tuple[int, np.ndarray | None]:
    """Judge a row's proposals with the target's logits at each proposed position.

    logits: [K + 1, V], position j predicting the token after history + proposal[:j]; proposal: K ids;
    proposal_probs: [K, V] the draft's distributions the proposals were drawn from (sampling; None for a
    deterministic proposal such as prompt lookup, a point mass). Returns how many proposals are accepted and,
    when a sampling row rejected one, the distribution its next token must be drawn from instead of the
    target's: max(0, p - q), normalized (rejection sampling keeps the target's distribution exactly)."""
    for j, token in enumerate(proposal):
        seen = np.array([history + list(proposal[:j])], dtype=np.int64)  # [1, T]
        scores = process(logits[j:j + 1].astype(np.float32), seen, settings)  # [1, V]
        if not settings.do_sample:
            if int(np.argmax(scores[0])) != token:
                return j, None
            continue
        p = softmax(scores)[0]  # [V]
        q = proposal_probs[j] if proposal_probs is not None else None
        q_token = 1.0 if q is None else float(q[token])
        if rng.random() * q_token < p[token]:  # accept with probability min(1, p / q)
            continue
        residual = p.copy()
        if q is None:
            residual[token] = 0.0
        else:
            residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        return j, (residual / total if total > 0 else p)
    return len(proposal), None


# The cache across a chunk with holes -----------------------------------------------------------------------
def forward_chunk(model: Decoder, cache: KVCache, mask: np.ndarray, ids: np.ndarray, valid: np.ndarray,
                  all_logits: bool) -> tuple[np.ndarray, KVCache, np.ndarray, float]:
    """One step over a chunk in which some rows have fewer positions than others: ids, valid: [B, S]; invalid
    positions are holes (pad ids, masked). Returns the logits ([B, S, V] or [B, V]), the cache, the mask
    [B, T + S] and the runner's seconds."""
    mask = np.concatenate([mask, valid.astype(np.int64)], axis=1)  # [B, T + S]
    out, cache = model.step(ids, mask, position_ids_from_mask(mask, ids.shape[1]), cache, all_logits=all_logits)
    return out.logits, cache, mask, out.seconds


def settle(cache: KVCache, mask: np.ndarray, width: int, kept: np.ndarray) -> tuple[KVCache, np.ndarray]:
    """After a chunk of `width` positions, row i keeps its first kept[i] of them: an in-place cache is rewound past
    the columns no row keeps; every other dropped column becomes a hole. mask: [B, T] -> the settled mask."""
    mask = mask.copy()
    start = mask.shape[1] - width
    for i, k in enumerate(kept):
        mask[i, start + int(k):] = 0
    if cache.in_place:
        keep = int(max(kept)) if len(kept) else 0
        drop = width - keep
        if drop:
            cache, mask = cache.rewound(drop), mask[:, :mask.shape[1] - drop]
    return cache, mask


# The draft model --------------------------------------------------------------------------------------------
class DraftProposer:
    """A draft model running beside the target over the same rows: it catches up on each row's text (whatever
    it has not seen yet, one chunk), then proposes K tokens one step at a time. Its cache is settled like the
    target's after each verification."""

    def __init__(self, model: Decoder, pad_id: int, batch: int, capacity: int | None):
        self.model, self.pad_id = model, pad_id
        self.cache = model.empty_cache(batch, capacity)
        self.mask = np.zeros((batch, 0), dtype=np.int64)  # [B, T]
        self.fed = [0] * batch  # per row: how many of its tokens (prompt first) the draft's cache holds
        self.proposed_width = 0  # draft positions written for the last proposals (settled after verification)
        self.seconds: list[float] = []

    def catch_up(self, histories: Sequence[list[int]]) -> tuple[np.ndarray, float]:
        """Feed the draft what it has not seen of each row's history (prompt and tokens), as one chunk: the
        prompts' prefill at first, then the token the target chose (and the last proposal, when all were kept).
        Returns the last logits [B, V] and the seconds."""
        batch = len(histories)
        pending = [h[f:] for h, f in zip(histories, self.fed)]
        width = max(1, max(len(p) for p in pending))
        ids = np.full((batch, width), self.pad_id, dtype=np.int64)  # [B, P]: right-aligned, holes on the left
        valid = np.zeros((batch, width), dtype=bool)
        for i, p in enumerate(pending):
            if p:
                ids[i, width - len(p):], valid[i, width - len(p):] = p, True
        logits, self.cache, self.mask, seconds = forward_chunk(self.model, self.cache, self.mask, ids, valid, False)
        self.fed = [len(h) for h in histories]
        return logits, seconds

    def propose(self, histories: Sequence[list[int]], ks: Sequence[int], settings: Sequence[SamplingSettings],
                rngs: Sequence[np.random.Generator]) -> tuple[list[list[int]], list[np.ndarray | None]]:
        """Row i's history (prompt and tokens) and how many tokens to propose -> the proposals and, for sampling
        rows, the [K, V] distributions they were drawn from."""
        batch, most = len(histories), max(ks)
        logits, seconds = self.catch_up(histories)
        proposals: list[list[int]] = [[] for _ in histories]
        probs: list[list[np.ndarray]] = [[] for _ in histories]
        for j in range(most):
            step = np.full((batch, 1), self.pad_id, dtype=np.int64)  # [B, 1]
            for i in range(batch):
                if j >= ks[i]:
                    continue
                seen = np.array([histories[i] + proposals[i]], dtype=np.int64)
                scores = process(logits[i:i + 1], seen, settings[i])  # [1, V]
                if settings[i].do_sample:
                    q = softmax(scores)[0]
                    proposals[i].append(draw(q, rngs[i]))
                    probs[i].append(q)
                else:
                    proposals[i].append(int(np.argmax(scores[0])))
                step[i, 0] = proposals[i][-1]
            if j + 1 < most:  # the last proposal is verified by the target; the draft sees it next time if kept
                valid = np.array([[j + 1 < k] for k in ks])
                logits, self.cache, self.mask, s = forward_chunk(self.model, self.cache, self.mask, step, valid, False)
                seconds += s
        self.proposed_width = most - 1
        self.seconds.append(seconds)
        return proposals, [np.stack(p) if p else None for p in probs]

    def settle(self, accepted: Sequence[int], ks: Sequence[int]) -> None:
        """Row i accepted `accepted[i]` of its ks[i] proposals: of the proposals the draft itself stepped (all
        but the last), it keeps the accepted ones."""
        kept = np.array([min(a, max(k - 1, 0)) for a, k in zip(accepted, ks)], dtype=np.int64)
        if self.proposed_width:
            self.cache, self.mask = settle(self.cache, self.mask, self.proposed_width, kept)
        self.fed = [f + int(k) for f, k in zip(self.fed, kept)]
        self.proposed_width = 0
