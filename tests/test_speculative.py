"""Speculative decoding (generation.speculative, in the one generator): greedy output token for token identical to
the plain loop under both cache policies, prompt lookup and a draft model; rows of a batch keeping their own
accepted lengths; the sampled output distribution equal to plain sampling's (a chi-square test with fixed seeds);
bad drafts refused in one line; the CLI and the API reporting the acceptance."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

import aira_opt
from aira_opt.cli import main
from aira_opt.core.errors import AiraOptError, DraftMismatchError, OptionError
from aira_opt.generation.generator import GenerateOptions, Generator, Row, generate
from aira_opt.generation.sampling import GREEDY, SamplingSettings
from aira_opt.generation.speculative import Acceptance, Speculation, StepCosts, ngram_proposal, verify
from aira_opt.runtime.ort import OrtDecoder
from aira_opt.source.prompts import prompt_ids

QUESTIONS = ["What is the capital of Brazil?", "Repeat after me: the cat sat on the mat, the cat sat on the mat.",
             "Tell me a story.", "What do bees make?", "Who are you?", "What is two plus three?"]
FIXED = [Speculation("ngram", 3, adaptive=False), Speculation("ngram"), Speculation("draft", 4, adaptive=False),
         Speculation("draft", 2)]


def test_prompt_lookup_continues_the_longest_latest_match():
    history = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6, 7]
    assert ngram_proposal(history, 2, max_ngram=3) == [2, 3]  # "6 7": latest earlier occurrence is followed by 2 3
    assert ngram_proposal([1, 2, 3, 9, 2, 3], 3, max_ngram=2) == [9, 2, 3]  # the 2-gram "2 3", then what followed
    assert ngram_proposal([1, 2, 3, 4], 3) == []  # nothing repeats
    assert ngram_proposal([4, 4], 5) == [4]  # only what exists after the match


def test_the_row_stops_speculating_when_nothing_is_accepted_and_probes_again():
    costs = StepCosts(seconds={1: 1.0, 2: 1.1, 3: 1.2, 4: 1.3, 5: 1.4})
    record = Acceptance(Speculation("ngram", 4))
    assert record.choose(costs, draft_cost=False) > 0  # the prior: one in two accepted
    for _ in range(6):
        record.record(4, 0)
    assert record.choose(costs, draft_cost=False) == 0
    record.plain_steps = 8
    assert record.choose(costs, draft_cost=False) == 1  # a probe now and then
    for _ in range(6):
        record.record(4, 4)
    assert record.choose(costs, draft_cost=False) == 4
    always = StepCosts(seconds={5: 1.4}, draft_seconds=0.5)  # no plain step measured: inferred from the prior
    assert always.plain() == pytest.approx(1.0) and always.draft_ratio() == pytest.approx(0.5)
    expensive = StepCosts(seconds={1: 1.0, 5: 1.4}, draft_seconds=2.0)  # a draft slower than the target
    slow_draft = Acceptance(Speculation("draft", 4), plain_steps=100)
    assert slow_draft.choose(expensive, draft_cost=True) == 0  # no probe: even certain acceptance would not pay


@pytest.mark.parametrize("graph", ["standard", "fused"])
@pytest.mark.parametrize("speculation", FIXED, ids=lambda s: f"{s.method}-{s.num_tokens}-{s.adaptive}")
def test_greedy_output_is_the_plain_loops_under_both_cache_policies(tiny, tiny_export, tiny_fused, tiny_variants,
                                                                     graph, speculation):
    """The target's own tokens, token for token: the standard graph's growing cache (rejected positions become
    holes) and the fused graph's in-place cache (rewound); the int4 export (fused, in place) as the draft."""
    tok = tiny.tokenizer
    options = GenerateOptions(max_new_tokens=40, sampling=GREEDY)
    with OrtDecoder(tiny_export if graph == "standard" else tiny_fused) as target, \
            OrtDecoder(tiny_variants["int4"]) as draft:
        assert target.in_place_cache == (graph == "fused") and draft.in_place_cache
        verified = 0
        for question in QUESTIONS:
            ids = prompt_ids(tok, question)
            plain = generate(target, [ids], options, tok.eos_token_id, tok.pad_token_id)
            spec = generate(target, [ids], GenerateOptions(40, GREEDY, speculation=speculation), tok.eos_token_id,
                            tok.pad_token_id, draft=draft)
            assert spec.tokens == plain.tokens, question
            verified += spec.speculation["verify_steps"]
            assert len(spec.decode_seconds) <= len(plain.decode_seconds)
        assert verified > 0  # proposals were made and judged


def test_rows_of_a_batch_keep_their_own_accepted_lengths(tiny, tiny_export, tiny_variants):
    """A static batch on the standard graph: rows accept different numbers of proposals in the same step (holes
    in the mask), leave at different lengths, and each gets exactly its plain tokens; a draft with a standard
    graph (fp16) proposes for the batch."""
    tok = tiny.tokenizer
    prompts = [prompt_ids(tok, q) for q in QUESTIONS]
    budgets = [24, 5, 40, 12, 30, 18]
    with OrtDecoder(tiny_export) as target, OrtDecoder(tiny_variants["fp16"]) as draft:
        for speculation in (Speculation("ngram", 3, adaptive=False), Speculation("draft", 3, adaptive=False)):
            plain = [generate(target, [p], GenerateOptions(b, GREEDY), tok.eos_token_id, tok.pad_token_id).tokens[0]
                     for p, b in zip(prompts, budgets)]
            batch = Generator(target, [tok.eos_token_id], tok.pad_token_id, draft=draft)
            rows = [Row(p, GenerateOptions(b, GREEDY, speculation=speculation)) for p, b in zip(prompts, budgets)]
            batch.add(rows, max(map(len, prompts)) + max(budgets))
            holes = False
            while batch.active:
                batch.step()
                inner = batch.mask[:, -8:]  # recent columns: a hole is a 0 after a 1 in a row
                holes |= bool(((np.diff(inner, axis=1) < 0)).any())
            assert [r.tokens for r in rows] == plain
            assert holes, "no step had rows accepting different lengths"
            assert {len(r.tokens) for r in rows} != {len(rows[0].tokens)}


def test_a_fused_target_speculates_at_batch_1_and_steps_plainly_in_a_batch(tiny, tiny_fused):
    """GroupQueryAttention takes several new positions over a past only at batch 1: a batch of rows on the fused
    graph steps one token at a time, and gets the same tokens."""
    tok = tiny.tokenizer
    prompts = [prompt_ids(tok, q) for q in QUESTIONS[:3]]
    with OrtDecoder(tiny_fused) as target:
        options = GenerateOptions(30, GREEDY, speculation=Speculation("ngram", 3, adaptive=False))
        batched = generate(target, prompts, options, tok.eos_token_id, tok.pad_token_id)
        plain = generate(target, prompts, GenerateOptions(30, GREEDY), tok.eos_token_id, tok.pad_token_id)
    assert batched.tokens == plain.tokens and batched.speculation["verify_steps"] == 0


def test_verify_keeps_the_target_distribution_for_a_point_mass_proposal():
    """Rejection sampling of a deterministic proposal (prompt lookup): accept with probability p(token); on
    rejection the next token comes from p without that token. Together: exactly p."""
    logits = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=np.float32))  # [K + 1, V]
    settings = SamplingSettings(do_sample=True)
    rng = np.random.default_rng(0)
    counts = Counter()
    for _ in range(20000):
        n, residual = verify(logits, [], [1], settings, rng)
        counts[1 if n == 1 else int(rng.choice(3, p=residual))] += 1
    observed = np.array([counts[i] for i in range(3)]) / 20000
    assert np.abs(observed - [0.5, 0.3, 0.2]).max() < 0.015


def chi_square_p(a: Counter, b: Counter) -> float:
    """Two-sample chi-square test of homogeneity (categories with fewer than 10 draws together pooled); the
    p-value from the Wilson-Hilferty normal approximation of the chi-square distribution."""
    keys = sorted(set(a) | set(b))
    big = [k for k in keys if a[k] + b[k] >= 10]
    rows = [[a[k] for k in big] + [sum(a[k] for k in keys if k not in big)],
            [b[k] for k in big] + [sum(b[k] for k in keys if k not in big)]]
    table = np.array(rows, dtype=float)
    table = table[:, table.sum(axis=0) > 0]
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    dof = table.shape[1] - 1
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_tokens_follow_the_targets_distribution(tiny, tiny_export, tiny_variants, method, monkeypatch):
    """Many seeded draws of the first three tokens, with and without speculation (the second and third come from
    verify steps): their distributions agree (chi-square, p >= 0.001), token by token and as a pair. Top-k 5 at
    temperature 2 spreads each position over a few tokens. Prompt lookup proposes the plain loop's most common
    continuation (a point mass, accepted about as often as the target picks it); the int4 draft proposes from its
    own distribution. Both accept some proposals and reject others, so the residual draws are tested too."""
    import aira_opt.generation.generator as generator_module

    tok = tiny.tokenizer
    ids = prompt_ids(tok, "Tell me a story.")
    sampling = SamplingSettings(do_sample=True, temperature=2.0, top_k=5)
    draws = 600
    with OrtDecoder(tiny_export) as target, OrtDecoder(tiny_variants["int4"]) as draft:
        plain = Counter()
        for seed in range(draws):
            options = GenerateOptions(3, sampling, seed=seed, ignore_eos=True)
            plain[tuple(generate(target, [ids], options, tok.eos_token_id, tok.pad_token_id).tokens[0][1:])] += 1
        likely = list(plain.most_common(1)[0][0])
        monkeypatch.setattr(generator_module, "ngram_proposal", lambda history, k, *sizes: likely[:k])
        spec, proposed, accepted = Counter(), 0, 0
        for seed in range(draws):
            options = GenerateOptions(3, sampling, seed=10_000 + seed, ignore_eos=True,
                                      speculation=Speculation(method, 2, adaptive=False))
            result = generate(target, [ids], options, tok.eos_token_id, tok.pad_token_id, draft=draft)
            spec[tuple(result.tokens[0][1:])] += 1
            proposed += result.speculation["proposed"]
            accepted += result.speculation["accepted"]
    assert 0.1 * proposed < accepted < proposed  # both ways of the rejection sampler were taken
    for position in (0, 1):
        a, b = Counter(), Counter()
        for pair, n in plain.items():
            a[pair[position]] += n
        for pair, n in spec.items():
            b[pair[position]] += n
        assert chi_square_p(a, b) >= 1e-3, (position, a.most_common(5), b.most_common(5))
    assert chi_square_p(plain, spec) >= 1e-3, (plain.most_common(5), spec.most_common(5))


def test_a_bad_draft_is_refused_in_one_line_naming_what_differs(tiny_export, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_export, other)
    config = json.loads((other / "config.json").read_text())
    config["max_position_embeddings"] //= 2
    (other / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(DraftMismatchError) as caught:
        aira_opt.load(tiny_export, draft=other)
    message = str(caught.value)
    assert "\n" not in message and "another tokenizer (2 of its tokens" in message
    assert "a context shorter than the target's" in message
    result = CliRunner().invoke(main, ["generate", "--onnx", str(tiny_export), "--speculative-draft", str(other), "hi"])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "cannot propose" in result.output


def aira_opt_cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a process of its own, as a user runs it: with a draft it puts ONNX Runtime on the process-wide
    thread pool, which this test process must not get."""
    return subprocess.run([sys.executable, "-m", "aira_opt", *args], capture_output=True, text=True, timeout=600)


def test_the_cli_prints_the_same_answer_and_reports_the_acceptance(tiny_export, tiny_variants):
    question = "What is the capital of Brazil?"
    plain = aira_opt_cli("generate", "--onnx", str(tiny_export), "--greedy", "--json", "-", question)
    spec = aira_opt_cli("generate", "--onnx", str(tiny_export), "--greedy", "--json", "-",
                        "--speculative-draft", str(tiny_variants["int4"]), question)
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    plain_answer, spec_answer = json.loads(plain.stdout), json.loads(spec.stdout)
    assert spec_answer["answers"] == plain_answer["answers"] and spec_answer["token_ids"] == plain_answer["token_ids"]
    assert plain_answer["speculation"] is None
    record = spec_answer["speculation"]
    assert record["method"] == "draft" and record["proposed"] > 0 and 0 <= record["acceptance_rate"] <= 1
    streamed = CliRunner().invoke(main, ["generate", "--onnx", str(tiny_export), "--greedy", "--speculative", "ngram",
                                         question])
    assert streamed.exit_code == 0 and streamed.output.strip() == plain_answer["answers"][0]


def test_a_draft_loaded_from_the_api_leaves_onnx_runtime_as_it_was(tiny_export, tiny_variants):
    """By default the draft runs on one thread of its own; the process-wide pool (which every later session of
    the process would have to use) is only made when asked for."""
    import onnxruntime as ort

    with aira_opt.load(tiny_export, draft=tiny_variants["int4"]) as model:
        assert model.draft.threads == 1 and not model.draft.shared_threads and not model.runner.shared_threads
        model.generate("What is the capital of Brazil?", greedy=True)
    ort.InferenceSession(str(tiny_export / "model.onnx"), ort.SessionOptions())  # a pool of its own still works


def test_the_api_speculates_on_request_and_refuses_what_cannot_work(tiny_export, tiny_variants):
    with aira_opt.load(tiny_export) as model:
        question = QUESTIONS[1]
        assert model.generate(question, greedy=True, speculative="ngram") == model.generate(question, greedy=True)
        with pytest.raises(OptionError, match="needs a draft model"):
            model.generate(question, speculative="draft")
        with pytest.raises(AiraOptError, match="num_speculative_tokens"):
            model.generate(question, num_speculative_tokens=3)
    with aira_opt.load(tiny_export, draft=tiny_variants["int4"]) as model:
        pieces = list(model.stream(question, greedy=True))
        answer = model.answer(question, greedy=True)
        assert "".join(pieces) == answer.answers[0] and answer.speculation["method"] == "draft"
        off = model.answer(question, greedy=True, speculative="off")
        assert off.speculation is None and off.token_ids == answer.token_ids


def test_bench_adds_a_speculating_row_beside_each_export(tiny_export, tiny_variants):
    report = aira_opt.bench("aira-tiny", onnx=[tiny_export], backends=["ort"], prompt_lengths=[16], new_tokens=12,
                            warmup=0, repeats=2, draft=tiny_variants["int4"])
    rows = {r["label"]: r for r in report["results"]}
    assert set(rows) == {"ort fp32", "ort fp32 + draft int4"}
    plain, drafted = rows["ort fp32"], rows["ort fp32 + draft int4"]
    assert plain["acceptance_rate"] is None and 0 <= drafted["acceptance_rate"] <= 1
    assert drafted["tokens_per_step"] >= 1 and drafted["decode_tokens_per_s"] > 0
    assert drafted["decode_steps"] == plain["decode_steps"] == 11  # one timing per token, however many per step
    with pytest.raises(DraftMismatchError):
        aira_opt.bench("aira-tiny", onnx=[tiny_export], backends=["ort"], draft=_mismatched(tiny_export))


def _mismatched(folder):
    """A copy of `folder` whose config claims half the context (a draft that cannot reach as far)."""
    import tempfile
    from pathlib import Path

    other = Path(tempfile.mkdtemp()) / "short"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    config["max_position_embeddings"] //= 2
    (other / "config.json").write_text(json.dumps(config))
    return other


def test_check_speculates_and_its_parity_holds(tiny_export):
    report = aira_opt.check(tiny_export, speculative="ngram", num_speculative_tokens=3, max_new_tokens=16)
    assert report["passed"] and report["speculation"]["method"] == "ngram" and report["speculation"]["exact"]
    with pytest.raises(OptionError, match="needs a draft model"):
        aira_opt.check(tiny_export, speculative="draft")
