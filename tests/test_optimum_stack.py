"""The optimum stack beside ours: `--exporter optimum` and the optimum bench backend where the `optimum` extra is
installed (CI's second environment, transformers 4.57); a one-line error or a skipped row with the install hint
where it is not (the main environment, transformers 5); and the optimum backend driven from the main environment
through another environment's interpreter (`bench --optimum-python`, which CI points at its second environment)."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from aira_opt.cli import main
from aira_opt.export.exporters import EXPORTERS

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
    result = CliRunner().invoke(main, ["bench", "--onnx", str(tiny_export), *BENCH])
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
