"""Iteration-level ("continuous") batching: sequences join the running batch between decode steps and leave it
as soon as they finish, so a new request never waits for the longest one of a batch to end, and a finished
sequence stops costing compute.

The running batch stays left-padded and right-aligned: a newcomer's prompt is prefilled on its own (as one
left-padded batch with the other newcomers), then its cache and mask are padded on the left to the running
width and stacked under the running rows; leaving rows are sliced out and columns that only padding still uses
are trimmed. Each row keeps its own options, generator and token history, so its tokens are what `generate`
would give it alone (the repetition penalty sees only its own tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from aira_opt.generation.loop import GenerateOptions, decode_one, left_pad, prefill
from aira_opt.generation.sampling import select_next_per_row
from aira_opt.runtime.decoder import Decoder


@dataclass
class Sequence_:
    """One row of the running batch."""

    prompt: list[int]
    options: GenerateOptions
    on_token: Callable[[int], bool | None]  # called with each chosen token; False ends the sequence there
    rng: np.random.Generator = field(default=None)  # type: ignore[assignment]
    tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rng is None:
            self.rng = np.random.default_rng(self.options.seed)


def supports_continuous(model: Decoder) -> bool:
    """Whether the runner can hand its cache to the host and take it back (what adding and dropping rows needs)."""
    return hasattr(model, "cache_to_host") and hasattr(model, "cache_from_host")


class ContinuousBatch:
    """The running batch of one decoder: `add` newcomers, then `step` until `active` is 0."""

    def __init__(self, model: Decoder, stop_ids: Sequence[int], pad_id: int):
        self.model = model
        self.stops = np.array(list(stop_ids), dtype=np.int64)
        self.pad_id = pad_id
        self.rows: list[Sequence_] = []
        self.cache = None  # the runner's cache: [B, kv_heads, T, head_dim] per layer tensor
        self.mask = np.zeros((0, 0), dtype=np.int64)  # [B, T]: left padding 0, then the row's positions
        self.logits = np.zeros((0, 0), dtype=np.float32)  # [B, V]: where each row's next token comes from

    @property
    def active(self) -> int:
        return len(self.rows)

    def add(self, newcomers: Sequence[Sequence_]) -> None:
        """Prefill the newcomers together and stack them under the running rows."""
        if not newcomers:
            return
        input_ids, mask = left_pad([s.prompt for s in newcomers], self.pad_id)  # [N, S]
        logits, cache, _ = prefill(self.model, input_ids, mask)  # growing cache: rows will come and go
        fresh = self.model.cache_to_host(cache)  # each [N, kv, S, D]
        if not self.rows:
            self.rows, self.mask, self.logits, self.cache = list(newcomers), mask, logits, cache
            return
        running = self.model.cache_to_host(self.cache)  # each [B, kv, T, D]
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = np.concatenate([_pad_left(self.mask, width), _pad_left(mask, width)])  # [B + N, width]
        self.cache = self.model.cache_from_host([np.concatenate([_pad_left(a, width, axis=2), _pad_left(b, width, axis=2)])
                                                 for a, b in zip(running, fresh)])
        self.logits = np.concatenate([self.logits, logits])
        self.rows += list(newcomers)

    def step(self) -> None:
        """Choose every row's next token, hand each to its row, drop the rows that ended, decode the rest."""
        history = self._history()  # [B, L]
        chosen = select_next_per_row(self.logits, history, [r.options.sampling for r in self.rows],
                                     [r.rng for r in self.rows])  # [B]
        keep = []
        for i, row in enumerate(self.rows):
            token = int(chosen[i])
            row.tokens.append(token)
            wanted = row.on_token(token) is not False
            at_stop = token in self.stops and not row.options.ignore_eos
            if wanted and not at_stop and len(row.tokens) < row.options.max_new_tokens:
                keep.append(i)
        if len(keep) < len(self.rows):
            self._keep(keep)
            chosen = chosen[keep]
        if not self.rows:
            return
        self.mask = np.concatenate([self.mask, np.ones((len(self.rows), 1), dtype=np.int64)], axis=1)  # [B, T + 1]
        self.logits, self.cache, _ = decode_one(self.model, chosen, self.mask, self.cache)

    def _keep(self, keep: list[int]) -> None:
        """Only the rows at `keep`; padding columns no row needs any more are trimmed."""
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask, self.logits = None, np.zeros((0, 0), dtype=np.int64), self.logits[:0]
            return
        mask = self.mask[keep]
        start = int(np.argmax(mask.any(axis=0)))  # the first column some row still attends to
        self.mask, self.logits = mask[:, start:], self.logits[keep]
        self.cache = self.model.cache_from_host([a[keep][:, :, start:] for a in self.model.cache_to_host(self.cache)])

    def _history(self) -> np.ndarray:
        """Each row's prompt and tokens so far, [B, L], padded with the row's own first id (the repetition
        penalty treats a token once however often it occurs, so the padding changes nothing)."""
        seen = [row.prompt + row.tokens for row in self.rows]
        width = max(len(s) for s in seen)
        return np.array([[s[0]] * (width - len(s)) + s for s in seen], dtype=np.int64)


def _pad_left(array: np.ndarray, width: int, axis: int = 1) -> np.ndarray:
    """Zeros on the left of `axis` up to `width` (mask columns or cache positions nobody attends to)."""
    missing = width - array.shape[axis]
    if missing == 0:
        return array
    shape = list(array.shape)
    shape[axis] = missing
    return np.concatenate([np.zeros(shape, dtype=array.dtype), array], axis=axis)
