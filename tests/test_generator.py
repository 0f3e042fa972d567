"""The one generator. Compact (continuous batching): sequences that join a running batch at different steps, and
leave it at different times, get exactly the tokens they get alone (greedy and seeded sampling), on the standard
and the fused graph. Static: every row added at once, ended rows ride along, and the batch keeps its shape."""

from __future__ import annotations

import numpy as np
import pytest

from aira_opt.generation.generator import CANCELLED, LENGTH, STOP, GenerateOptions, Generator, Row, generate
from aira_opt.generation.sampling import GREEDY, SamplingSettings
from aira_opt.runtime.ort import OrtDecoder
from aira_opt.source.prompts import prompt_ids

QUESTIONS = ["What is the capital of Brazil?", "What do bees make?", "Tell me a story.", "Who are you?",
             "What is two plus three?", "Why?"]
SAMPLED = SamplingSettings(do_sample=True, temperature=1.3, top_k=0, top_p=1.0, repetition_penalty=1.2)


def options(i: int) -> GenerateOptions:
    """A mix: greedy and seeded sampling, short and long budgets, one row that ignores eos."""
    return GenerateOptions(max_new_tokens=[24, 5, 40, 12, 30, 18][i], sampling=GREEDY if i % 2 == 0 else SAMPLED,
                           seed=100 + i, ignore_eos=i == 4)


def each_alone(decoder, prompts: list[list[int]], tok) -> list[list[int]]:
    """Every prompt's tokens generated on its own, with its own options: what a batch must give each row."""
    return [generate(decoder, [p], options(i), tok.eos_token_id, tok.pad_token_id).tokens[0]
            for i, p in enumerate(prompts)]


@pytest.mark.parametrize("graph", ["standard", "fused"])
def test_rows_joining_and_leaving_get_what_they_get_alone(tiny, tiny_export, tiny_fused, graph):
    tok = tiny.tokenizer
    prompts = [prompt_ids(tok, q) for q in QUESTIONS]
    with OrtDecoder(tiny_export if graph == "standard" else tiny_fused) as decoder:
        alone = each_alone(decoder, prompts, tok)
        batch = Generator(decoder, [tok.eos_token_id], tok.pad_token_id, compact=True)
        rows = [Row(p, options(i)) for i, p in enumerate(prompts)]
        joins = {0: rows[:2], 3: rows[2:3], 4: rows[3:5], 9: rows[5:]}  # step -> who joins before it
        widths = []
        step = 0
        while step in joins or batch.active or any(s > step for s in joins):
            batch.add(joins.get(step, []))
            if batch.active:
                widths.append(batch.mask.shape[1])
                batch.step()
            step += 1
    assert [r.tokens for r in rows] == alone
    assert rows[4].tokens and len(rows[4].tokens) == 30  # ignore_eos: its whole budget
    assert max(widths) <= max(len(p) for p in prompts) + 40  # leaving rows' padding is trimmed


def test_a_callback_that_declines_ends_only_its_row(tiny, tiny_export):
    tok = tiny.tokenizer
    with OrtDecoder(tiny_export) as decoder:
        batch = Generator(decoder, [tok.eos_token_id], tok.pad_token_id, compact=True)
        leaving = Row(prompt_ids(tok, QUESTIONS[0]), options(0), lambda t: len(leaving.tokens) < 3)
        staying = Row(prompt_ids(tok, QUESTIONS[0]), options(0))
        batch.add([leaving, staying])
        while batch.active:
            batch.step()
        alone = generate(decoder, [staying.prompt], options(0), tok.eos_token_id, tok.pad_token_id).tokens[0]
    assert len(leaving.tokens) == 3 and staying.tokens == alone
    assert np.array_equal(np.array(leaving.tokens), np.array(alone[:3]))
    assert leaving.ended == CANCELLED and staying.ended == STOP


@pytest.mark.parametrize("graph", ["standard", "fused"])
def test_a_static_batch_keeps_its_shape_and_each_row_its_own_tokens(tiny, tiny_export, tiny_fused, graph):
    """Every row added at once (what `generate`, `check` and bench run): rows that end carry pads until the last
    one ends, so the batch (and a fused graph's in-place cache) never changes shape."""
    tok = tiny.tokenizer
    prompts = [prompt_ids(tok, q) for q in QUESTIONS]
    with OrtDecoder(tiny_export if graph == "standard" else tiny_fused) as decoder:
        alone = each_alone(decoder, prompts, tok)
        batch = Generator(decoder, [tok.eos_token_id], tok.pad_token_id)
        rows = [Row(p, options(i)) for i, p in enumerate(prompts)]
        capacity = max(len(p) for p in prompts) + max(r.options.max_new_tokens for r in rows)
        batch.add(rows, capacity)
        assert batch.cache.in_place == (graph == "fused")  # the fused graph writes its cache in place
        heights = set()
        while batch.active:
            heights.add(batch.mask.shape[0])
            batch.step()
        with pytest.raises(ValueError, match="compact"):  # a static batch takes no newcomers while it runs
            busy = Generator(decoder, [tok.eos_token_id], tok.pad_token_id)
            busy.add([Row(prompts[0], options(0))])
            busy.add([Row(prompts[1], options(0))])
    assert heights == {len(prompts)}
    assert [r.tokens for r in rows] == alone
    assert rows[1].ended == LENGTH and len(rows[1].tokens) == 5


@pytest.mark.parametrize("compact", [True, False])
def test_a_cancelled_row_ends_at_once_and_the_others_go_on(tiny, tiny_export, compact):
    """Cancelling a row between steps (its client left): no more tokens for it; in a compact batch it leaves at
    the next step, so it costs nothing more."""
    tok = tiny.tokenizer
    prompts = [prompt_ids(tok, q) for q in QUESTIONS[:2]]
    with OrtDecoder(tiny_export) as decoder:
        alone = each_alone(decoder, prompts, tok)
        batch = Generator(decoder, [tok.eos_token_id], tok.pad_token_id, compact=compact)
        leaving, staying = rows = [Row(p, options(i)) for i, p in enumerate(prompts)]
        batch.add(rows, max(len(p) for p in prompts) + 40)
        batch.step()
        batch.step()
        leaving.cancel()
        heights = set()
        while batch.active:
            batch.step()
            heights.add(batch.mask.shape[0] if batch.active else None)
        heights.discard(None)  # the batch after its last row ended
    assert leaving.ended == CANCELLED and leaving.tokens == alone[0][:2]
    assert staying.tokens == alone[1]
    assert heights == ({1} if compact else {2})
