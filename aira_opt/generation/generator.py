"""The one decode loop, for every caller: `generate` (a static batch: every row added at once), `check`, bench's
`ort` and `trt` rows, the Python API's streams, and serving's continuous batching (rows join between steps and
leave when they end).

A step chooses every row's next token, hands it to the row, ends the rows that reach a stop id or their budget or
are cancelled, then decodes the rest one position. The batch is left-padded and right-aligned. What happens to an
ended row is the generator's policy:
- static (the default): it rides along with pad tokens until the last row ends, so the batch never changes shape
  and a runner that writes its cache in place keeps doing so;
- compact (serving): it leaves at once, and newcomers may join a running batch. Both need a runner that can move
  its cache to the host and back (`Decoder.cache_to_host` / `cache_from_host`); columns that only padding still
  uses are trimmed.
Either way a row's tokens are the ones it would get alone: it keeps its own options, generator and history (the
repetition penalty sees only its own prompt and tokens).

A row whose options ask for speculation (generation.speculative) gets proposals after its token is chosen; the
step then runs the target over the token and the proposals at once and hands the row every proposal the target
accepts. Greedy rows get exactly the tokens of the plain loop; sampling rows get the target's distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from aira_opt.core.contract import position_ids_from_mask
from aira_opt.core.errors import PromptTooLongError
from aira_opt.generation.sampling import GREEDY, SamplingSettings, draw, select_next_per_row
from aira_opt.generation.speculative import (DRAFT, NGRAM, Acceptance, DraftProposer, Speculation, StepCosts,
                                             forward_chunk, ngram_proposal, settle, summary, verify)
from aira_opt.runtime.protocol import Decoder, KVCache


@dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int
    sampling: SamplingSettings = GREEDY
    seed: int | None = None
    num_return_sequences: int = 1
    ignore_eos: bool = False  # bench: every run produces exactly max_new_tokens
    fit_context: bool = False  # a default max_new_tokens: shorten it to what the context leaves, never fail
    speculation: Speculation | None = None  # propose tokens and verify them in one step (same output)


# Called with each token a row chooses; returning False ends the row there (a client that left).
TokenCallback = Callable[[int], "bool | None"]
STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"  # why a row ended


@dataclass
class Row:
    """One sequence: its prompt (already in the model's prompt format), options, and what it has made so far."""

    prompt: list[int]
    options: GenerateOptions
    on_token: TokenCallback | None = None
    rng: np.random.Generator = field(default=None)  # type: ignore[assignment]  # default: from options.seed
    tokens: list[int] = field(default_factory=list)
    ended: str | None = None  # STOP, LENGTH or CANCELLED once it has ended
    acceptance: Acceptance | None = None  # speculating rows: what was proposed and accepted
    next_probs: np.ndarray | None = None  # [V]: after a rejected proposal, where the next token is drawn from

    def __post_init__(self) -> None:
        if self.rng is None:
            self.rng = np.random.default_rng(self.options.seed)
        if self.options.speculation is not None and self.acceptance is None:
            self.acceptance = Acceptance(self.options.speculation)

    @property
    def history(self) -> list[int]:
        return self.prompt + self.tokens

    @property
    def budget_left(self) -> int:
        return self.options.max_new_tokens - len(self.tokens)

    def cancel(self) -> None:
        """End the row before its next token (its client left)."""
        if self.ended is None:
            self.ended = CANCELLED


def supports_host_cache(model: Decoder) -> bool:
    """Whether the runner can hand its cache to the host and take it back (rows joining and leaving need it)."""
    return hasattr(model, "cache_to_host") and hasattr(model, "cache_from_host")


class Generator:
    """The running batch of one decoder: `add` rows, then `step` until `active` is 0."""

    def __init__(self, model: Decoder, stop_ids: int | Sequence[int], pad_id: int, compact: bool = False,
                 draft: Decoder | None = None):
        if draft is not None and compact:
            raise ValueError("a draft model runs beside a static batch only (rows cannot join its cache)")
        self.model, self.draft = model, draft
        self.drafter: DraftProposer | None = None  # the draft's state over this batch, from the first `add`
        self.costs = StepCosts()
        self.stops = np.array([stop_ids] if isinstance(stop_ids, (int, np.integer)) else list(stop_ids),
                              dtype=np.int64)
        self.pad_id = pad_id
        self.compact = compact and supports_host_cache(model)
        self.rows: list[Row] = []  # the batch, in order (static: ended rows stay until the last ends)
        self.cache: KVCache | None = None  # [B, kv_heads, T, head_dim] per layer tensor, in the runner's memory
        self.mask = np.zeros((0, 0), dtype=np.int64)  # [B, T]: left padding 0, then the row's positions
        self.logits = np.zeros((0, 0), dtype=np.float32)  # [B, V]: where each row's next token comes from
        self.prefill_seconds: list[float] = []  # one per prefill (each `add`)
        self.decode_seconds: list[float] = []  # one per decode step (the whole batch)
        self.decode_tokens: list[int] = []  # per decode step: the most tokens it gave a row (1 + accepted proposals)
        self.padded_prompt_length = 0  # the first prefill's width

    @property
    def active(self) -> int:
        """Rows still generating."""
        return sum(row.ended is None for row in self.rows)

    def add(self, rows: Sequence[Row], capacity: int | None = None) -> None:
        """Prefill `rows` together and put them in the batch. capacity: every position this batch will fill (the
        longest prompt plus the largest budget), so a runner that can preallocates its cache once."""
        rows = list(rows)
        if not rows:
            return
        drafting = any(r.acceptance is not None and r.acceptance.speculation.method == DRAFT for r in rows)
        if drafting and self.draft is None:
            raise ValueError("a row asks for a draft model's proposals and this generator has none")
        input_ids, mask = left_pad([r.prompt for r in rows], self.pad_id)  # [N, S]
        if self.active == 0:
            self.rows = rows
            self.cache = self.model.empty_cache(len(rows), None if self.compact else _bound(self.model, rows, capacity))
            self.logits, self.cache = self._forward(input_ids, mask, self.prefill_seconds)
            self.mask, self.padded_prompt_length = mask, self.padded_prompt_length or input_ids.shape[1]
            if drafting:
                # The draft reads the prompts now too: prompt processing, counted in the time to the first token.
                self.drafter = DraftProposer(self.draft, self.pad_id, len(rows), _bound(self.draft, rows, capacity))
                self.prefill_seconds[-1] += self.drafter.catch_up([r.prompt for r in rows])[1]
            return
        if not self.compact:
            raise ValueError("rows can join a running batch only in a compact generator over a runner with host "
                             "cache access")
        fresh = self.model.empty_cache(len(rows))
        self.cache, running = fresh, self.cache
        logits, cache = self._forward(input_ids, mask, self.prefill_seconds)
        new = self.model.cache_to_host(cache)  # type: ignore[attr-defined]  # each [N, kv, S, D]
        old = self.model.cache_to_host(running)  # type: ignore[attr-defined]  # each [B, kv, T, D]
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = np.concatenate([_pad_left(self.mask, width), _pad_left(mask, width)])  # [B + N, width]
        self.cache = self.model.cache_from_host(  # type: ignore[attr-defined]
            [np.concatenate([_pad_left(a, width, axis=2), _pad_left(b, width, axis=2)]) for a, b in zip(old, new)])
        self.logits = np.concatenate([self.logits, logits])
        self.rows += rows

    def step(self) -> list[Row]:
        """Choose every row's next token, hand each to its row, end the rows that are done, decode the others
        (with the proposals of speculating rows, of which each row keeps what the target accepts). Returns the
        rows that ended in this step."""
        if self.active == 0:
            return []
        chosen = self._choose()  # [B]
        ended = []
        for i, row in enumerate(self.rows):
            if row.ended is not None:  # static: an ended row carries a pad (compact: one cancelled since the last step)
                chosen[i] = self.pad_id
                continue
            if self._hand(row, int(chosen[i])):
                ended.append(row)
        if self.compact and len(self.rows) > self.active:
            keep = [i for i, row in enumerate(self.rows) if row.ended is None]
            self._keep(keep)
            chosen = chosen[keep]
        if self.active == 0:
            return ended
        proposals, probs, ks = self._propose()
        if not any(proposals):
            self.mask = np.concatenate([self.mask, np.ones((len(self.rows), 1), dtype=np.int64)], axis=1)  # [B, T+1]
            self.logits, self.cache = self._forward(chosen[:, None], self.mask, self.decode_seconds)
            self.costs.record(1, self.decode_seconds[-1])
            self.decode_tokens.append(1)
            return ended
        return ended + self._verify(chosen, proposals, probs, ks)

    def _choose(self) -> np.ndarray:
        """Every row's next token from the logits: [B]. A row whose proposal was just rejected draws from what
        rejection sampling left it instead."""
        chosen = select_next_per_row(self.logits, self._history(), [r.options.sampling for r in self.rows],
                                     [r.rng for r in self.rows])  # [B]
        for i, row in enumerate(self.rows):
            if row.next_probs is not None:
                chosen[i], row.next_probs = draw(row.next_probs, row.rng), None
        return chosen

    def _hand(self, row: Row, token: int) -> bool:
        """Give `row` its next token; True when that ends it."""
        row.tokens.append(token)
        if row.on_token is not None and row.on_token(token) is False:
            row.ended = CANCELLED
        elif token in self.stops and not row.options.ignore_eos:
            row.ended = STOP
        elif len(row.tokens) >= row.options.max_new_tokens:
            row.ended = LENGTH
        return row.ended is not None

    def _propose(self) -> tuple[list[list[int]], list[np.ndarray | None], list[int]]:
        """Each row's proposals (none for rows not speculating, ended, or choosing not to now), the draft's
        distributions for sampling rows, and how many tokens each row asked its draft for."""
        batch = len(self.rows)
        proposals: list[list[int]] = [[] for _ in range(batch)]
        probs: list[np.ndarray | None] = [None] * batch
        ks = [0] * batch
        if batch > 1 and not getattr(self.model, "batched_chunks", True):
            return proposals, probs, ks  # the runner verifies one row at a time only: plain steps
        drafts = batch == 1 or getattr(self.draft, "batched_chunks", True)
        for i, row in enumerate(self.rows):
            if row.ended is not None or row.acceptance is None:
                continue
            speculation = row.acceptance.speculation
            if speculation.method == DRAFT and not drafts:
                continue
            k = min(row.acceptance.choose(self.costs, speculation.method == DRAFT), row.budget_left)
            if k > 0 and speculation.method == NGRAM:
                proposals[i] = ngram_proposal(row.history, k, speculation.max_ngram, speculation.min_ngram)
            elif k > 0:
                ks[i] = k
            row.acceptance.plain_steps = 0 if proposals[i] or ks[i] else row.acceptance.plain_steps + 1
        if any(ks):
            assert self.drafter is not None
            drafted, drafted_probs = self.drafter.propose([r.history for r in self.rows], ks,
                                                          [r.options.sampling for r in self.rows],
                                                          [r.rng for r in self.rows])
            self.costs.record_draft(self.drafter.seconds[-1] / max(ks))
            for i, k in enumerate(ks):
                if k:
                    proposals[i], probs[i] = drafted[i], drafted_probs[i]
        return proposals, probs, ks

    def _verify(self, chosen: np.ndarray, proposals: list[list[int]], probs: list[np.ndarray | None],
                ks: list[int]) -> list[Row]:
        """One target step over each row's token and its proposals; each row keeps the accepted ones."""
        width = 1 + max(len(p) for p in proposals)
        batch = len(self.rows)
        ids = np.full((batch, width), self.pad_id, dtype=np.int64)  # [B, 1 + K]: the token, then the proposals
        valid = np.zeros((batch, width), dtype=bool)
        ids[:, 0], valid[:, 0] = chosen, True
        for i, p in enumerate(proposals):
            ids[i, 1:1 + len(p)], valid[i, 1:1 + len(p)] = p, True
        logits, self.cache, self.mask, seconds = forward_chunk(self.model, self.cache, self.mask, ids, valid, True)
        self.costs.record(width, seconds)  # logits: [B, 1 + K, V]
        if self.drafter is not None and any(ks):
            seconds += self.drafter.seconds[-1]
        self.decode_seconds.append(seconds)
        accepted = np.zeros(batch, dtype=np.int64)
        ended = []
        for i, row in enumerate(self.rows):
            if not proposals[i] or row.ended is not None:
                continue
            n, row.next_probs = verify(logits[i, :len(proposals[i]) + 1], row.history, proposals[i],
                                       row.options.sampling, row.rng, probs[i])
            row.acceptance.record(len(proposals[i]), n)  # type: ignore[union-attr]
            accepted[i] = n
            for token in proposals[i][:n]:
                if self._hand(row, token):
                    ended.append(row)
                    break
        self.decode_tokens.append(1 + int(accepted.max()))
        self.cache, self.mask = settle(self.cache, self.mask, width, accepted + 1)
        self.logits = logits[np.arange(batch), accepted]  # [B, V]: where each row's next token comes from
        if self.drafter is not None and any(ks):
            self.drafter.settle(accepted.tolist(), ks)
        return ended

    def speculation_summary(self) -> dict | None:
        """The speculation of this batch's rows so far (None when no row speculates)."""
        records = [r.acceptance for r in self.rows if r.acceptance is not None]
        if not records:
            return None
        tokens = max((len(r.tokens) for r in self.rows), default=1) - 1
        return summary(records, tokens, len(self.decode_seconds), getattr(self.model, "exact_chunks", True))

    def run(self) -> None:
        """Step until every row has ended."""
        while self.active:
            self.step()

    def _forward(self, input_ids: np.ndarray, mask: np.ndarray, timings: list[float]) -> tuple[np.ndarray, KVCache]:
        """One step of the runner. input_ids: [B, S]; mask: [B, past + S] -> last logits [B, V] and the cache."""
        assert self.cache is not None
        out, cache = self.model.step(input_ids, mask, position_ids_from_mask(mask, input_ids.shape[1]), self.cache)
        timings.append(out.seconds)
        return out.logits, cache

    def _keep(self, keep: list[int]) -> None:
        """Only the rows at `keep`; padding columns no row needs any more are trimmed."""
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask, self.logits = None, np.zeros((0, 0), dtype=np.int64), self.logits[:0]
            return
        mask = self.mask[keep]
        start = int(np.argmax(mask.any(axis=0)))  # the first column some row still attends to
        self.mask, self.logits = mask[:, start:], self.logits[keep]
        self.cache = self.model.cache_from_host(  # type: ignore[attr-defined]
            [a[keep][:, :, start:] for a in self.model.cache_to_host(self.cache)])  # type: ignore[attr-defined]

    def _history(self) -> np.ndarray:
        """Each row's prompt and tokens so far, [B, L], padded on the left with the row's own first id (the
        repetition penalty treats a token once however often it occurs, so the padding changes nothing)."""
        seen = [row.prompt + row.tokens for row in self.rows]
        width = max(len(s) for s in seen)
        return np.array([[s[0]] * (width - len(s)) + s for s in seen], dtype=np.int64)


# A static batch --------------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    prompts: list[list[int]]  # one per returned sequence (prompts repeated num_return_sequences times)
    tokens: list[list[int]]  # new tokens per sequence, up to and including the stop id when one was produced
    finished: list[bool]  # True where the sequence ended at a stop id
    prefill_seconds: float
    decode_seconds: list[float]  # one per decode step (the whole batch; with speculation, the draft's time too)
    padded_prompt_length: int
    speculation: dict | None = None  # proposals and acceptance, when rows speculated (speculative.summary)
    decode_step_tokens: list[int] = field(default_factory=list)  # per decode step: 1 + the most proposals accepted

    def per_token_seconds(self) -> list[float]:
        """Each decode step's seconds shared out over the tokens it produced: one entry per decoded token."""
        tokens = self.decode_step_tokens or [1] * len(self.decode_seconds)
        shares = [s / n for s, n in zip(self.decode_seconds, tokens) for _ in range(n)]
        if len(shares) != self.decode_tokens:  # the last step's next token was never needed: spread evenly
            total = sum(self.decode_seconds)
            shares = [total / self.decode_tokens] * self.decode_tokens if self.decode_tokens else []
        return shares

    @property
    def ttft_ms(self) -> float:
        return self.prefill_seconds * 1000

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second per sequence during decode (the first token comes from the prefill)."""
        total = sum(self.decode_seconds)
        return self.decode_tokens / total if total > 0 else float("nan")

    @property
    def decode_tokens(self) -> int:
        """Tokens the decode steps produced for the longest sequence (one per step without speculation)."""
        return max((len(t) for t in self.tokens), default=1) - 1


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids, attention_mask: [B, S] with S the longest prompt; shorter prompts padded on the left."""
    width = max(len(p) for p in prompts)
    input_ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = ids
        mask[row, width - len(ids):] = 1
    return input_ids, mask


def check_context(prompts: Sequence[Sequence[int]], max_new_tokens: int, context: int) -> None:
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > context:
        raise PromptTooLongError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context of {context}; "
            "shorten the prompt or lower --max-new-tokens"
        )


def fitted(model: Decoder, prompts: Sequence[Sequence[int]], options: GenerateOptions) -> GenerateOptions:
    """The options with their budget checked against the model's context: a default budget (fit_context) shrinks
    to what the longest prompt leaves; one the user gave that does not fit is a one-line error."""
    context = int(model.config.get("max_position_embeddings", 2048))
    if options.fit_context:
        room = context - max(len(p) for p in prompts)
        options = replace(options, max_new_tokens=max(1, min(options.max_new_tokens, room)))
    check_context(prompts, options.max_new_tokens, context)
    return options


def generate(model: Decoder, prompts: Sequence[Sequence[int]], options: GenerateOptions, stop_ids: int | Sequence[int],
             pad_id: int, on_token: Callable[[int, int], bool | None] | None = None,
             draft: Decoder | None = None) -> GenerationResult:
    """A static batch of tokenized prompts (each already in the model's prompt format) to its end; a sequence
    ends at any of `stop_ids`. on_token(row, token) is called as each token is chosen; False ends that row.
    The rows share one generator seeded by options.seed, drawing in row order."""
    if not prompts:
        raise ValueError("no prompts")
    if options.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    options = fitted(model, prompts, options)
    rng = np.random.default_rng(options.seed)
    expanded = [list(p) for p in prompts for _ in range(options.num_return_sequences)]
    rows = [Row(p, options, None if on_token is None else (lambda t, i=i: on_token(i, t)), rng=rng)
            for i, p in enumerate(expanded)]
    return run_rows(model, rows, stop_ids, pad_id, draft)


def run_rows(model: Decoder, rows: Sequence[Row], stop_ids: int | Sequence[int], pad_id: int,
             draft: Decoder | None = None) -> GenerationResult:
    """Rows that each bring their own options and generator (a server's requests batched on arrival), as one
    static batch to its end. Each must already fit the context with its budget. draft: the runner of rows that
    speculate with a draft model."""
    if not rows or any(r.options.max_new_tokens < 1 for r in rows):
        raise ValueError("one row per prompt, each with max_new_tokens >= 1")
    generator = Generator(model, stop_ids, pad_id, draft=draft)
    capacity = max(len(r.prompt) for r in rows) + max(r.options.max_new_tokens for r in rows)
    generator.add(rows, capacity)
    generator.run()
    return GenerationResult(prompts=[list(r.prompt) for r in rows], tokens=[list(r.tokens) for r in rows],
                            finished=[r.ended == STOP for r in rows], prefill_seconds=sum(generator.prefill_seconds),
                            decode_seconds=generator.decode_seconds,
                            padded_prompt_length=generator.padded_prompt_length, speculation=generator.speculation_summary(),
                            decode_step_tokens=generator.decode_tokens)


def _bound(model: Decoder, rows: Sequence[Row], capacity: int | None) -> int | None:
    """The capacity to make a cache with. A growing cache under speculation gets none: its rejected positions stay
    as masked holes, so it may hold more than the plain loop's positions (an in-place cache rewinds instead)."""
    if any(r.acceptance is not None for r in rows) and not model.in_place_cache:
        return None
    return capacity


def _pad_left(array: np.ndarray, width: int, axis: int = 1) -> np.ndarray:
    """Zeros on the left of `axis` up to `width` (mask columns or cache positions nobody attends to)."""
    missing = width - array.shape[axis]
    if missing == 0:
        return array
    shape = list(array.shape)
    shape[axis] = missing
    return np.concatenate([np.zeros(shape, dtype=array.dtype), array], axis=axis)
