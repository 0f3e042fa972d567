"""The optimum stack beside ours: `--exporter optimum` and the optimum bench backend where the `optimum` extra is
installed (CI's second environment, transformers 4.57); a one-line error or a skipped row with the install hint
where it is not (the main environment, transformers 5); and the optimum backend driven from the main environment
through another environment's interpreter (`bench --optimum-python`, which CI points at its second environment)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from click.testing import CliRunner

from aira_opt.cli import main
from aira_opt.exporting.exporters import EXPORTERS

OPTIMUM_MISSING = None
try:
    EXPORTERS["optimum"].check_available()
except Exception as exc:  # noqa: BLE001 - MissingExtraError, recorded as the skip reason
    OPTIMUM_MISSING = str(exc)

needs_optimum = pytest.mark.skipif(OPTIMUM_MISSING is not None, reason=f"the optimum extra: {OPTIMUM_MISSING}")
without_optimum = pytest.mark.skipif(OPTIMUM_MISSING is None, reason="optimum is installed in this environment")
OTHER_PYTHON = os.environ.get("AIRA_OPT_OPTIMUM_PYTHON")

BENCH = ["--backends", "ort,optimum", "--new-tokens", "4", "--prompt-lengths", "8", "--warmup", "0", "--repeats", "1"]


@without_optimum
def test_the_optimum_exporter_without_its_extra_is_one_line_with_the_install_command(tmp_path):
    out = tmp_path / "fp32"
    result = CliRunner().invoke(main, ["export", "--exporter", "optimum", "--output", str(out)])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "pip install 'aira-opt[optimum]'" in result.output and not out.exists()


@without_optimum
def test_the_optimum_backend_without_its_extra_is_skipped_with_the_reason(tiny_export):
    result = CliRunner().invoke(main, ["bench", "--onnx", str(tiny_export), *BENCH],
                                env={"AIRA_OPT_OPTIMUM_PYTHON": None})  # no other environment named either
    assert result.exit_code == 0, result.output
    assert "skipped optimum:" in result.output and "--optimum-python" in result.output


@needs_optimum
def test_optimum_exports_validates_and_benches_in_its_own_environment(tiny, tmp_path):
    out = tmp_path / "fp32"
    result = CliRunner().invoke(main, ["export", "--exporter", "optimum", "--output", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["exporter"] == EXPORTERS["optimum"].description and manifest["validation"]["enforced"]
    assert manifest["versions"]["transformers"].startswith("4.")
    result = CliRunner().invoke(main, ["bench", "--onnx", str(out), "--json", "-", *BENCH])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert sorted(r["label"] for r in rows) == ["optimum fp32 via optimum", "ort fp32 via optimum"]


@pytest.mark.slow
@pytest.mark.skipif(not OTHER_PYTHON, reason="AIRA_OPT_OPTIMUM_PYTHON names no environment with the optimum extra "
                    "(CI sets it to its second environment)")
def test_bench_runs_the_optimum_backend_under_the_other_environments_python(tiny_export):
    result = CliRunner().invoke(main, ["bench", "--onnx", str(tiny_export), "--optimum-python", OTHER_PYTHON,
                                       "--json", "-", *BENCH])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {r["backend"]: r for r in data["results"]}
    assert set(rows) == {"ort", "optimum"}, data["skipped"]
    assert rows["optimum"]["decode_tokens_per_s"] > 0 and rows["optimum"]["peak_rss_mb"] > 0


READ_FOLDER = """
import json, sys
from transformers import AutoConfig, AutoTokenizer
tokenizer, config = AutoTokenizer.from_pretrained(sys.argv[1]), AutoConfig.from_pretrained(sys.argv[1])
rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
print(json.dumps([tokenizer(sys.argv[2]).input_ids, rope["rope_theta"], config.num_hidden_layers]))
"""


@pytest.mark.skipif(not OTHER_PYTHON, reason="AIRA_OPT_OPTIMUM_PYTHON names no environment with the optimum extra "
                    "(CI sets it to its second environment)")
def test_a_folder_written_here_loads_in_the_other_environments_transformers(tiny, tiny_export):
    """transformers 5 writes `TokenizersBackend` and rope settings that 4.57 cannot read; the export must not."""
    question = "<|startofinstruction|>What is the capital of Brazil?<|endofinstruction|>"
    done = subprocess.run([OTHER_PYTHON, "-c", READ_FOLDER, str(tiny_export), question], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    ids, rope_theta, layers = json.loads(done.stdout.strip().splitlines()[-1])
    assert ids == tiny.tokenizer(question).input_ids
    assert rope_theta == 10000.0 and layers == tiny.config.num_hidden_layers
