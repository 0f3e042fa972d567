from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from aira_opt.cli import main
from aira_opt.core.numerics import logit_agreement
from aira_opt.precision.variants import VARIANTS

THRESHOLDS = {name: record.thresholds for name, record in VARIANTS.items()}

KEYS = {"passed", "precision", "prompts", "greedy_exact_match", "top1_agreement", "max_abs_logit_diff", "min_cosine",
        "perplexity_torch", "perplexity_onnx", "per_prompt", "failures"}


def test_check_passes_on_the_fp32_export(tiny_export, tmp_path):
    out = tmp_path / "check.json"
    result = CliRunner().invoke(main, ["check", "--onnx", str(tiny_export), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output
    data = json.loads(out.read_text())
    assert KEYS <= set(data)
    assert data["passed"] is True and data["precision"] == "fp32" and data["prompts"] == 8
    assert data["greedy_exact_match"] == 8 and data["top1_agreement"] == 1.0
    assert data["max_abs_logit_diff"] < 1e-3 and data["min_cosine"] > 0.9999
    assert abs(data["perplexity_onnx"] / data["perplexity_torch"] - 1) < 1e-4


def test_check_fails_on_an_export_with_perturbed_weights(tiny_export, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_export, broken)
    model = onnx.load(str(broken / "model.onnx"))
    rng = np.random.default_rng(0)
    perturbed = 0
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2 and w.size > 10000:  # the weight matrices
            init.CopyFrom(numpy_helper.from_array((w + rng.normal(0, 0.05, w.shape)).astype(w.dtype), init.name))
            perturbed += 1
    assert perturbed > 5
    onnx.save(model, str(broken / "model.onnx"))
    out = tmp_path / "check.json"
    result = CliRunner().invoke(main, ["check", "--onnx", str(broken), "--json", str(out)])
    assert result.exit_code == 1
    assert "FAILED" in result.output
    data = json.loads(out.read_text())
    assert data["passed"] is False and data["failures"]


def test_check_reads_prompts_from_a_file(tiny_export, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("What do bees make?\nWho are you?\n")
    result = CliRunner().invoke(main, ["check", "--onnx", str(tiny_export), "--prompts", str(prompts),
                                       "--max-new-tokens", "8", "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["prompts"] == 2


def test_logit_agreement_counts_top1_and_cosine():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    cand = np.array([[1.0, 2.0, 3.5], [1.0, 2.0, 3.0]])
    stats = logit_agreement(ref, cand)
    assert stats["top1_agreement"] == 0.5 and stats["max_abs_logit_diff"] == 2.0
    assert stats["min_cosine"] < 0.8


def test_fp32_threshold_demands_identical_sequences():
    assert THRESHOLDS["fp32"].min_greedy_fraction == 1.0 and THRESHOLDS["fp32"].max_abs_logit_diff == 1e-3


@pytest.mark.slow
def test_check_rebuilds_a_shallow_random_preset_from_the_manifest(tmp_path):
    """An export of `aira-2-1b1-random --num-layers 1` is checked against the same 1-layer seeded model."""
    out = tmp_path / "r1"
    result = CliRunner().invoke(main, ["export", "--model", "aira-2-1b1-random", "--num-layers", "1", "--output",
                                       str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_model"]["num_layers_override"] == 1 and manifest["source_model"]["num_hidden_layers"] == 1
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is the capital of Brazil?\n")
    report = tmp_path / "c.json"
    result = CliRunner().invoke(main, ["check", "--onnx", str(out), "--prompts", str(prompts), "--max-new-tokens", "4",
                                       "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["max_abs_logit_diff"] < 1e-3


def test_unknown_precision_in_a_manifest_is_a_one_line_error(tiny_export, tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(tiny_export, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "precision": "int3"}))
    result = CliRunner().invoke(main, ["check", "--onnx", str(folder), "--max-new-tokens", "2"])
    assert result.exit_code == 1 and "no parity thresholds for precision 'int3'" in result.output
