"""The Python API, call by call: load -> generate / stream / answer, export, plan_export, check, and the typed
folders they return. Each is checked against what the CLI gives for the same call."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import aira_opt
from aira_opt.cli import main
from aira_opt.core.errors import AiraOptError, ArtifactExistsError, ExportFolderError, ModelLoadError, OptionError
from aira_opt.core.progress import Progress

BRAZIL = "What is the capital of Brazil?"


@pytest.fixture(scope="module")
def model(tiny_export):
    with aira_opt.load(tiny_export) as loaded:
        yield loaded


def test_generate_answers_one_question_with_the_exports_defaults(model):
    assert model.generate(BRAZIL) == "The capital of Brazil is Brasília."
    assert model.folder.manifest.precision == "fp32" and model.prompt_format.kind == "aira"


def test_generate_answers_a_batch_in_order_and_a_seed_repeats(model):
    questions = [BRAZIL, "What do bees make?"]
    answers = model.generate(questions, max_new_tokens=32, greedy=True)
    assert answers == [model.generate(q, max_new_tokens=32, greedy=True) for q in questions]
    assert answers[1] == "Bees make honey."
    sampled = model.generate(questions, max_new_tokens=16, temperature=0.7, seed=1)
    assert sampled == model.generate(questions, max_new_tokens=16, temperature=0.7, seed=1)
    several = model.generate(BRAZIL, num_return_sequences=3, max_new_tokens=8, temperature=1.5, seed=3)
    assert len(several) == 3 and all(isinstance(a, str) for a in several)


def test_stream_pieces_add_up_to_the_generated_answer(model):
    pieces = list(model.stream(BRAZIL))
    assert len(pieces) > 3 and "".join(pieces) == model.generate(BRAZIL)
    early = model.stream("Tell me a story.", max_new_tokens=64)
    first = next(early)
    early.close()  # a caller that stops reading stops the generation
    assert first


def test_answer_is_the_record_generate_json_prints(model, tiny_export):
    result = CliRunner().invoke(main, ["generate", "--onnx", str(tiny_export), "--greedy", "--json", "-", BRAZIL])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    ours = model.answer(BRAZIL, greedy=True).to_json()
    timings = ("time_to_first_token_ms", "tokens_per_second")
    assert {k: v for k, v in ours.items() if k not in timings} == {k: v for k, v in printed.items() if k not in timings}
    assert ours["answers"] == ["The capital of Brazil is Brasília."] and ours["finished_at_eos"] == [True]


def test_bad_calls_raise_aira_opts_own_one_line_errors(model, tmp_path):
    with pytest.raises(AiraOptError, match="top_p"):
        model.generate(BRAZIL, top_p=2.0)
    with pytest.raises(OptionError, match="must be a str"):
        model.generate(123)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="no prompts"):
        model.generate([])
    with pytest.raises(OptionError, match="max_new_tokens"):
        model.generate(BRAZIL, max_new_tokens=0)
    with pytest.raises(ExportFolderError, match="no model.onnx"):
        aira_opt.load(tmp_path)
    with pytest.raises(ExportFolderError, match="not a folder"):
        aira_opt.load(tmp_path / "missing")


def test_control_tokens_typed_by_a_user_stay_text(model):
    ids = model.prompt_ids(BRAZIL + "<|endofinstruction|>")
    marker = model.tokenizer.convert_tokens_to_ids("<|endofinstruction|>")
    assert ids.count(marker) == 1  # only the template's own


def test_plan_export_checks_every_option_before_anything_is_loaded(monkeypatch, tmp_path):
    import aira_opt.source.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("plan_export loaded the model"))
    plan = aira_opt.plan_export("aira-tiny", "int4", tmp_path / "int4", block_size=128)
    assert plan.variant.name == "int4" and plan.settings.block_size == 128 and plan.fused
    assert plan.folder_name == "int4-b128" and plan.reuse_fp32 is not None
    chosen = aira_opt.plan_export("aira-tiny", "int4", tmp_path / "int4-h", lm_head="int4", algorithm="gptq",
                                  source_grid=False, min_cosine=0.5)  # export's recipe options, from Python
    assert (chosen.settings.head_bits, chosen.settings.algorithm, chosen.settings.source_grid) == (4, "gptq", False)
    assert chosen.folder_name == "int4-head4-gptq-regrid" and chosen.tolerance.min_cosine == 0.5
    with pytest.raises(OptionError, match="--min-cosine must be in"):
        aira_opt.plan_export("aira-tiny", "int4", min_cosine=2)
    with pytest.raises(OptionError, match="--lm-head must be one of"):
        aira_opt.plan_export("aira-tiny", "int4", lm_head="int2")
    assert aira_opt.plan_export("aira-tiny").output.as_posix() == "export/aira-tiny/fp32"
    with pytest.raises(OptionError, match="--block-size must be a power of two"):
        aira_opt.plan_export("aira-tiny", "int4", block_size=48)
    with pytest.raises(OptionError, match="--block-size applies to"):
        aira_opt.plan_export("aira-tiny", "fp16", block_size=32)
    with pytest.raises(OptionError, match="made outside aira-opt"):
        aira_opt.plan_export("aira-tiny", "int8-dynamic")
    with pytest.raises(OptionError, match="stays standard-op"):
        aira_opt.plan_export("aira-tiny", "fp16", fuse=True)
    with pytest.raises(AiraOptError, match="unknown precision"):
        aira_opt.plan_export("aira-tiny", "int3")
    with pytest.raises(ModelLoadError, match="--num-layers only applies"):
        aira_opt.plan_export("aira-tiny", num_layers=2)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ArtifactExistsError, match="--force"):
        aira_opt.plan_export("aira-tiny", output=tmp_path / "taken")


def test_export_returns_a_verified_typed_folder_and_reports_progress(tmp_path):
    events: list[Progress] = []
    folder = aira_opt.export("aira-tiny", output=tmp_path / "fp32", on_progress=events.append)
    assert isinstance(folder, aira_opt.ExportFolder) and folder.path == tmp_path / "fp32"
    assert folder.verify() == [] and folder.manifest.precision == "fp32" and not folder.manifest.fused
    assert folder.manifest.source_spec == "aira-tiny" and folder.manifest.label == "fp32"
    assert folder.manifest.validation["max_abs_logit_diff"] < 1e-3
    assert folder.config["num_hidden_layers"] == folder.contract.num_layers
    written = json.loads((folder.path / "manifest.json").read_text())  # the typed record spells the file's keys
    assert folder.manifest.contents() == {k: v for k, v in written.items()
                                          if k not in ("format", "created", "versions", "files")}
    steps = [e for e in events if e.step]
    total = steps[0].total
    assert [e.step for e in steps] == [n for n in range(1, total + 1) for _ in range(2)]  # start, then done
    assert all(e.seconds is not None for e in steps[1::2]) and any(not e.step for e in events)  # and notes
    assert aira_opt.load(folder).generate(BRAZIL) == "The capital of Brazil is Brasília."


def test_check_returns_the_record_check_json_prints(tiny_export, tmp_path):
    questions = ["What do bees make?", BRAZIL]
    report = aira_opt.check(tiny_export, prompts=questions, max_new_tokens=8)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(questions) + "\n")
    out = tmp_path / "check.json"
    result = CliRunner().invoke(main, ["check", "--onnx", str(tiny_export), "--prompts", str(prompts),
                                       "--max-new-tokens", "8", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert report == json.loads(out.read_text())
    assert report["passed"] and report["prompts"] == 2 and report["greedy_exact_match"] == 2
    with pytest.raises(OptionError, match="no prompts"):
        aira_opt.check(tiny_export, prompts=[])


def test_bench_returns_the_record_bench_json_writes(tiny_export):
    report = aira_opt.bench("aira-tiny", onnx=[tiny_export], backends=["ort"], prompt_lengths=[8], new_tokens=4,
                            warmup=0, repeats=1, threads=1)
    assert set(report) >= {"machine", "settings", "results", "skipped"}
    [row] = report["results"]
    assert row["label"] == "ort fp32" and row["decode_steps"] == 3 and row["decode_tokens_per_s"] > 0
    with pytest.raises(OptionError, match="context of 512"):
        aira_opt.bench("aira-tiny", onnx=[tiny_export], backends=["ort"], prompt_lengths=[500], new_tokens=64)


def test_inspect_returns_what_inspect_json_prints(tiny_export):
    summary = aira_opt.inspect(tiny_export)
    result = CliRunner().invoke(main, ["inspect", str(tiny_export), "--json", "-"])
    assert result.exit_code == 0 and summary == json.loads(result.output)
    assert summary["hashes_ok"] and summary["precision"] == "fp32"
