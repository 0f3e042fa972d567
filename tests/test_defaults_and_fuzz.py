"""Every option's default fits every model we ship or preset; property-based tests of the bookkeeping that
left padding, position ids, the KV cache and sampling rest on; a fuzz of the command line's option values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aira_opt.cli import main
from aira_opt.core.contract import position_ids_from_mask
from aira_opt.folders import ExportFolder
from aira_opt.generation.defaults import generate_options
from aira_opt.generation.generator import generate, left_pad
from aira_opt.generation.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
)
from aira_opt.runtime.protocol import CacheCapacityError, KVCache
from aira_opt.source.models import PRESETS, bundled_model_dir, known_specs
from aira_opt.source.prompts import DEFAULT_CHECK_PROMPTS, prompt_ids
from aira_opt.tensorrt.build_plan import BuildOptions

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def default(command: str, name: str):
    return next(p for p in main.commands[command].params if p.name == name).default


def spec_context(spec: str) -> int:
    if spec in PRESETS:
        return PRESETS[spec].max_position_embeddings
    return json.loads((bundled_model_dir() / "config.json").read_text())["max_position_embeddings"]


# Defaults ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", known_specs())
def test_every_default_fits_every_bundled_spec(spec, tiny):
    context = spec_context(spec)
    build = BuildOptions(max_batch=default("build", "max_batch"), max_seq=default("build", "max_seq"),
                         max_context=default("build", "max_context"), target=default("build", "target"),
                         workspace_gib=default("build", "workspace_gib"), opt_level=default("build", "opt_level"))
    assert build.for_model(context).problems(context) == []
    longest_bench = max(int(v) for v in default("bench", "prompt_lengths").split(","))
    assert longest_bench + default("bench", "new_tokens") <= context
    longest_check = max(len(prompt_ids(tiny.tokenizer, q)) for q in DEFAULT_CHECK_PROMPTS)
    assert longest_check + default("check", "max_new_tokens") <= context


def test_build_with_every_default_plans_for_the_bundled_model(tiny_variants):
    result = CliRunner().invoke(main, ["build", "--onnx", str(tiny_variants["fp16"]), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "pre-flight: passed" in result.output and "max [1, 2, 511, 32]" in result.output  # its 512 positions


def test_the_default_max_new_tokens_shortens_to_fit_a_long_prompt(tiny, tiny_decoder, tiny_export):
    options = generate_options(ExportFolder(tiny_export).generation_config, greedy=True)  # the card's 200 new tokens, not given by the user
    prompt = [1] + [50] * 450 + [3]                            # 452 of aira-tiny's 512 positions
    result = generate(tiny_decoder, [prompt], options, tiny.tokenizer.eos_token_id, tiny.tokenizer.pad_token_id)
    assert 1 <= len(result.tokens[0]) <= 512 - len(prompt)


# Property-based -------------------------------------------------------------------------------------------
@st.composite
def padded_prompts(draw):
    rows = draw(st.integers(1, 4))
    return [draw(st.lists(st.integers(5, 400), min_size=1, max_size=12)) for _ in range(rows)]


@FUZZ
@given(padded_prompts(), st.data())
def test_left_padding_and_position_ids_match_transformers(prompts, data):
    ids, mask = left_pad(prompts, pad_id=0)                                    # [B, S]
    width = max(map(len, prompts))
    assert ids.shape == mask.shape == (len(prompts), width)
    for row, prompt in enumerate(prompts):
        assert ids[row, width - len(prompt):].tolist() == prompt and mask[row].sum() == len(prompt)
        assert not mask[row, : width - len(prompt)].any()
    # transformers' generate: cumsum of the mask minus one, pads at 1
    theirs = torch.from_numpy(mask).long().cumsum(-1) - 1
    theirs.masked_fill_(torch.from_numpy(mask) == 0, 1)
    new = data.draw(st.integers(1, width))
    assert position_ids_from_mask(mask, new).tolist() == theirs[:, -new:].tolist()


@FUZZ
@given(st.lists(st.integers(1, 40), min_size=1, max_size=12), st.one_of(st.none(), st.integers(1, 200)),
       st.booleans())
def test_kv_cache_bookkeeping(steps, capacity, in_place):
    values = [object(), object()]
    cache = KVCache(values=values, length=0, batch=1, capacity=capacity, in_place=in_place and capacity is not None)
    length = 0
    for n in steps:
        if capacity is not None and length + n > capacity:
            with pytest.raises(CacheCapacityError):
                cache.reserve(n)
            return
        cache.reserve(n)
        presents = [object(), object()]
        cache = cache.advanced(presents, n)
        length += n
        assert cache.length == length and cache.capacity == capacity
        assert cache.values == (values if cache.in_place else presents)


@FUZZ
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(2, 300), st.floats(0.5, 3.0), st.floats(0.05, 2.0),
       st.integers(0, 320), st.floats(0.01, 1.0))
def test_sampling_processors_match_transformers(seed, batch, vocab, penalty, temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(seed)
    scores = (rng.standard_normal((batch, vocab)) * 4).astype(np.float32)     # [B, V]
    history = rng.integers(0, vocab, (batch, int(rng.integers(1, 20))))         # [B, T]
    ids, t_scores = torch.from_numpy(history), torch.from_numpy(scores)
    pairs = [(apply_repetition_penalty(scores, history, penalty), RepetitionPenaltyLogitsProcessor(penalty)),
             (apply_temperature(scores, temperature), TemperatureLogitsWarper(temperature)),
             (apply_top_p(scores, top_p), TopPLogitsWarper(top_p))]
    if top_k > 0:
        pairs.append((apply_top_k(scores, top_k), TopKLogitsWarper(top_k)))
    for ours, processor in pairs:
        theirs = processor(ids, t_scores.clone()).numpy()
        assert np.array_equal(np.isneginf(ours), np.isneginf(theirs))
        finite = np.isfinite(theirs)
        np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-5, atol=1e-5)


# The command line under hostile option values --------------------------------------------------------------
NASTY = ["-1", "0", "1e309", "nan", "inf", "", "abc", "99999999999999999999", "0.5", "-0.0"]
GENERATE_OPTIONS = ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--repetition-penalty",
                    "--num-return-sequences", "--threads", "--seed"]


def assert_clean_exit(result) -> None:
    """0, or 1/2 with exactly one `Error:` line and no traceback."""
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.output)
    assert "Traceback" not in result.output and not isinstance(result.exception, (AssertionError, NameError))
    if result.exit_code:
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert len(errors) == 1, result.output


@pytest.mark.slow
@FUZZ
@given(st.sampled_from(GENERATE_OPTIONS), st.sampled_from(NASTY))
def test_generate_survives_any_option_value(tiny_export, option, value):
    base = ["generate", "--onnx", str(tiny_export), "What is the capital of Japan?"]
    extra = [] if option == "--max-new-tokens" else ["--max-new-tokens", "2"]
    assert_clean_exit(CliRunner().invoke(main, [*base, *extra, option, value]))


@pytest.mark.slow
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_check_survives_any_prompts_file(tiny_export, tmp_path_factory, content):
    prompts = tmp_path_factory.mktemp("fuzz") / "prompts.txt"
    prompts.write_bytes(content)
    result = CliRunner().invoke(main, ["check", "--onnx", str(tiny_export), "--prompts", str(prompts),
                                       "--max-new-tokens", "1"])
    assert_clean_exit(result)


@pytest.mark.slow
@FUZZ
@given(st.sampled_from(["--prompt-lengths", "--batch-sizes", "--new-tokens", "--backends"]),
       st.sampled_from([*NASTY, "1,,2", "0,64", "ort,nope"]))
def test_bench_rejects_bad_option_values_before_running(tiny_export, option, value):
    defaults = {"--prompt-lengths": "8", "--new-tokens": "2", "--backends": "ort"}
    args = ["bench", "--onnx", str(tiny_export), "--repeats", "1", "--warmup", "0",
            *[x for k, v in defaults.items() if k != option for x in (k, v)], option, value]
    assert_clean_exit(CliRunner().invoke(main, args))
