"""Our generation loop over an ONNX decoder: prefill, decode one token, select, stop.

Batches are left-padded; each sequence stops at eos on its own and then carries pad tokens (as transformers'
generate does), so batched and one-by-one greedy runs pick the same tokens. The loop times its own prefill
and every decode step, which is what `bench` reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from aira_opt.core.contract import position_ids_from_mask
from aira_opt.core.errors import PromptTooLongError
from aira_opt.generation.sampling import GREEDY, SamplingSettings, select_next_per_row
from aira_opt.runtime.decoder import Decoder, KVCache

# (row, token id), called as each token is chosen; returning False ends that row there (a client that left).
TokenCallback = Callable[[int, int], "bool | None"]


@dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int
    sampling: SamplingSettings = GREEDY
    seed: int | None = None
    num_return_sequences: int = 1
    ignore_eos: bool = False  # bench: every run produces exactly max_new_tokens
    fit_context: bool = False  # a default max_new_tokens: shorten it to what the context leaves, never fail


@dataclass
class GenerationResult:
    prompts: list[list[int]]  # one per returned sequence (prompts repeated num_return_sequences times)
    tokens: list[list[int]]  # new tokens per sequence, up to and including eos when it was produced
    finished: list[bool]  # True where the sequence ended at eos
    prefill_seconds: float
    decode_seconds: list[float]  # one per decode step (the whole batch)
    padded_prompt_length: int

    @property
    def ttft_ms(self) -> float:
        return self.prefill_seconds * 1000

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second per sequence during decode (the first token comes from the prefill)."""
        total = sum(self.decode_seconds)
        return len(self.decode_seconds) / total if total > 0 else float("nan")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids, attention_mask: [B, S] with S the longest prompt; shorter prompts padded on the left."""
    width = max(len(p) for p in prompts)
    input_ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = ids
        mask[row, width - len(ids):] = 1
    return input_ids, mask


def prefill(model: Decoder, input_ids: np.ndarray, mask: np.ndarray, capacity: int | None = None
            ) -> tuple[np.ndarray, KVCache, float]:
    """Run the whole prompt with an empty cache. input_ids, mask: [B, S] -> logits of the last position [B, V].
    capacity: the final length, so a runner that can preallocates its cache once."""
    cache = model.empty_cache(input_ids.shape[0], capacity)
    out, cache = model.step(input_ids, mask, position_ids_from_mask(mask, input_ids.shape[1]), cache)
    return out.logits, cache, out.seconds


def decode_one(model: Decoder, tokens: np.ndarray, mask: np.ndarray, cache: KVCache
               ) -> tuple[np.ndarray, KVCache, float]:
    """Feed one token per row. tokens: [B]; mask: [B, past + 1] -> logits [B, V] and the grown cache."""
    out, cache = model.step(tokens[:, None], mask, position_ids_from_mask(mask, 1), cache)
    return out.logits, cache, out.seconds


def check_context(prompts: Sequence[Sequence[int]], max_new_tokens: int, context: int) -> None:
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > context:
        raise PromptTooLongError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context of {context}; "
            "shorten the prompt or lower --max-new-tokens"
        )


def generate(model: Decoder, prompts: Sequence[Sequence[int]], options: GenerateOptions, stop_ids: int | Sequence[int],
             pad_id: int, on_token: TokenCallback | None = None) -> GenerationResult:
    """Generate for a batch of tokenized prompts (each already in the model's prompt format); a sequence ends at
    any of `stop_ids` (one id, or several as Llama 3 style models have)."""
    if not prompts:
        raise ValueError("no prompts")
    if options.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    context = int(model.config.get("max_position_embeddings", 2048))
    if options.fit_context:
        room = context - max(len(p) for p in prompts)
        options = replace(options, max_new_tokens=max(1, min(options.max_new_tokens, room)))
    check_context(prompts, options.max_new_tokens, context)
    expanded = [list(p) for p in prompts for _ in range(options.num_return_sequences)]
    rng = np.random.default_rng(options.seed)  # one generator for the batch: its rows draw in row order
    return generate_rows(model, expanded, [options] * len(expanded), stop_ids, pad_id, on_token,
                         rngs=[rng] * len(expanded))


def generate_rows(model: Decoder, prompts: Sequence[Sequence[int]], rows: Sequence[GenerateOptions],
                  stop_ids: int | Sequence[int], pad_id: int, on_token: TokenCallback | None = None,
                  rngs: Sequence[np.random.Generator] | None = None) -> GenerationResult:
    """One left-padded batch where each row has its own options (a server's concurrent requests): its own
    sampling, seed, token budget and eos handling. Prompts are taken as given (num_return_sequences and
    fit_context are the caller's); each must already fit the context with its budget.

    rngs: one generator per row; by default each row's own seed, so a request's tokens do not depend on the
    requests batched with it."""
    stops = np.array([stop_ids] if isinstance(stop_ids, (int, np.integer)) else list(stop_ids), dtype=np.int64)
    budgets = np.array([r.max_new_tokens for r in rows])  # [B]
    if not prompts or len(rows) != len(prompts) or (budgets < 1).any():
        raise ValueError("one options record per prompt, each with max_new_tokens >= 1")
    rngs = list(rngs) if rngs is not None else [np.random.default_rng(r.seed) for r in rows]
    sampling = [r.sampling for r in rows]
    stops_row = np.array([not r.ignore_eos for r in rows])  # [B]: rows that end at a stop id

    input_ids, mask = left_pad(prompts, pad_id)  # [B, S]
    history = input_ids  # [B, S + generated]: what the repetition penalty looks at, as in transformers
    unfinished = np.ones(len(prompts), dtype=bool)  # [B]
    tokens: list[list[int]] = [[] for _ in prompts]

    capacity = input_ids.shape[1] + int(budgets.max())  # every position this call can fill
    logits, cache, prefill_seconds = prefill(model, input_ids, mask, capacity)
    decode_seconds: list[float] = []
    for step in range(int(budgets.max())):
        chosen = select_next_per_row(logits, history, sampling, rngs)  # [B]
        chosen = np.where(unfinished, chosen, pad_id)  # finished rows carry pads
        for row in np.flatnonzero(unfinished):
            tokens[row].append(int(chosen[row]))
            if on_token is not None and on_token(int(row), int(chosen[row])) is False:
                unfinished[row] = False
        unfinished &= ~(stops_row & np.isin(chosen, stops)) & (budgets > step + 1)
        history = np.concatenate([history, chosen[:, None]], axis=1)
        if not unfinished.any():
            break
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)  # [B, past + 1]
        logits, cache, seconds = decode_one(model, chosen, mask, cache)
        decode_seconds.append(seconds)
    finished = [bool(t) and t[-1] in stops and bool(stops_row[i]) for i, t in enumerate(tokens)]
    return GenerationResult(prompts=[list(p) for p in prompts], tokens=tokens, finished=finished,
                            prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                            padded_prompt_length=input_ids.shape[1])
