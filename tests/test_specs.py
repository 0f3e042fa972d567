from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from aira_opt.cli import main
from aira_opt.source.corpus import training_pairs
from aira_opt.core.errors import ModelLoadError
from aira_opt.source.prompts import decode_answer, prompt_ids
from aira_opt.source.models import AIRA_TOKENS, PRESETS, bundled_model_dir, load_model

from helpers import hf_greedy


def test_bundled_model_has_aira_structure(tiny):
    cfg = tiny.model.config
    assert type(tiny.model).__name__ == "LlamaForCausalLM"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert not cfg.tie_word_embeddings
    assert tiny.model.lm_head.weight.data_ptr() != tiny.model.model.embed_tokens.weight.data_ptr()
    tok = tiny.tokenizer
    assert (tok.bos_token, tok.sep_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        AIRA_TOKENS.bos, AIRA_TOKENS.sep, AIRA_TOKENS.eos, AIRA_TOKENS.pad, AIRA_TOKENS.unk)
    assert len({tok.bos_token_id, tok.sep_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 5


def test_bundled_model_fits_the_size_budget():
    size = sum(p.stat().st_size for p in bundled_model_dir().iterdir())
    assert size <= 5 * 1024 * 1024


def test_bundled_model_greedy_answers_are_the_trained_ones(tiny):
    wrong = []
    for question, answer in training_pairs():
        got = decode_answer(tiny.tokenizer, hf_greedy(tiny, prompt_ids(tiny.tokenizer, question), 32))
        if got != answer:
            wrong.append((question, answer, got))
    assert not wrong
    assert decode_answer(tiny.tokenizer, hf_greedy(tiny, prompt_ids(tiny.tokenizer, "What is the capital of Brazil?"),
                                                   32)) == "The capital of Brazil is Brasília."


@pytest.mark.slow
def test_random_preset_has_aira_2_1b1_shape():
    shape = PRESETS["aira-2-1b1-random"]
    assert (shape.hidden_size, shape.num_hidden_layers, shape.num_attention_heads, shape.num_key_value_heads,
            shape.intermediate_size, shape.vocab_size) == (2048, 22, 32, 4, 5632, 32005)
    assert 1.09e9 < shape.parameter_count() < 1.11e9  # TinyLlama-1.1B
    loaded = load_model("aira-2-1b1-random", num_layers=1)
    cfg = loaded.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size) == (2048, 1, 4, 32005)
    rope_theta = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}  # 5.x / 4.57
    assert rope_theta["rope_theta"] == 10000.0 and cfg.rms_norm_eps == 1e-5 and cfg.max_position_embeddings == 2048
    assert not cfg.tie_word_embeddings
    assert loaded.tokenizer.eos_token == AIRA_TOKENS.eos
    assert sum(p.numel() for p in loaded.model.parameters()) == PRESETS["aira-2-1b1-random"].__class__(
        **{**shape.__dict__, "num_hidden_layers": 1}).parameter_count()


@pytest.mark.slow
def test_random_preset_is_seeded():
    a = load_model("aira-2-1b1-random", num_layers=1).model.lm_head.weight[:3, :5]
    b = load_model("aira-2-1b1-random", num_layers=1).model.lm_head.weight[:3, :5]
    assert (a == b).all()


def test_num_layers_is_an_error_for_a_real_checkpoint():
    with pytest.raises(ModelLoadError, match="only applies to random presets"):
        load_model("aira-tiny", num_layers=2)


@pytest.mark.parametrize("spec, message", [
    ("not-a-model", "unknown model 'not-a-model'"),
    ("<empty folder>", "has no config.json"),
])
def test_bad_model_spec_is_a_one_line_error(spec, message, tmp_path):
    if spec == "<empty folder>":
        spec = str(tmp_path / "empty")
        (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["export", "--model", spec, "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_id_is_a_one_line_error(monkeypatch, tmp_path):
    import aira_opt.source.models as specs

    monkeypatch.setattr(specs, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(main, ["export", "--model", "nobody-here/Aira-none", "--output", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "cannot be reached" in result.output and "--model" in result.output
    assert result.output.count("\n") == 1


@pytest.mark.slow
def test_bench_finds_the_default_export_of_a_shallow_preset_by_the_same_name(tmp_path, monkeypatch):
    """One naming rule for a depth-overridden preset: where export files it is where bench looks for it."""
    from aira_opt.benchmark.backends import BenchSources
    from aira_opt.benchmark.jobs import plan_jobs

    loaded = load_model("aira-2-1b1-random", num_layers=2)
    folder = tmp_path / "export" / loaded.name / "fp32"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"")
    (folder / "manifest.json").write_text('{"precision": "fp32"}')
    monkeypatch.chdir(tmp_path)
    plan = plan_jobs(BenchSources("aira-2-1b1-random", 2), ["ort"])
    assert [job.folder for job in plan.jobs] == [str(Path("export") / "aira-2-1b1-random-2l" / "fp32")]
