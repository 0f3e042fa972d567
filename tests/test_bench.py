from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from aira_opt.benchmark.backends import BenchSources, jobs_on_exports
from aira_opt.benchmark.machine import probe_bandwidth_gbps
from aira_opt.cli import main

REQUIRED = {"backend", "precision", "batch_size", "prompt_length", "new_tokens", "ttft_ms", "decode_tokens_per_s",
            "decode_ms_p50", "decode_ms_p90", "peak_rss_mb", "size_mb"}


@pytest.mark.slow
def test_bench_on_aira_tiny_writes_wellformed_json_markdown_and_png(tiny_export, tmp_path):
    out_json, out_md, out_png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    result = CliRunner().invoke(main, [
        "bench", "--onnx", str(tiny_export), "--backends", "torch,ort", "--new-tokens", "8", "--prompt-lengths", "16",
        "--batch-sizes", "1,2", "--warmup", "0", "--repeats", "2", "--json", str(out_json), "--markdown",
        str(out_md), "--plot", str(out_png)])
    assert result.exit_code == 0, result.output
    data = json.loads(out_json.read_text())
    assert {"cpu", "threads", "memory_bandwidth_gbps", "versions"} <= set(data["machine"])
    assert data["machine"]["memory_bandwidth_gbps"] > 0
    rows = data["results"]
    assert sorted((r["backend"], r["batch_size"]) for r in rows) == [("ort", 1), ("ort", 2), ("torch", 1),
                                                                      ("torch", 2)]
    for r in rows:
        assert REQUIRED <= set(r)
        assert r["new_tokens"] == 8 and r["prompt_length"] == 16 and r["repeats"] == 2
        assert r["decode_steps"] == 7  # the first of the 8 tokens comes from the prefill
        assert r["ttft_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["size_mb"] > 0
        assert 0 < r["decode_ms_p50"] <= r["decode_ms_p90"] <= r["decode_ms_p99"]
        assert r["pct_of_bound"] > 0
        assert r["device"] == "cpu"  # no GPU here: every row is judged against the host's bandwidth
        assert r["source"] == (str(tiny_export) if r["backend"] == "ort" else "aira-tiny")  # what the row ran
    assert "| backend |" in out_md.read_text() and "torch fp32" in out_md.read_text()
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "x torch" in result.output and "ort fp32" in result.output


@pytest.mark.slow
def test_bench_reports_skipped_backends_with_a_reason(tiny_export):
    result = CliRunner().invoke(main, ["bench", "--onnx", str(tiny_export), "--backends", "ort,genai",
                                       "--new-tokens", "4", "--prompt-lengths", "8", "--warmup", "0",
                                       "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "skipped genai:" in result.output


def test_bench_rejects_unknown_backends_and_bad_lists(tiny_export):
    result = CliRunner().invoke(main, ["bench", "--onnx", str(tiny_export), "--backends", "torch,vllm"])
    assert result.exit_code == 1 and "unknown backend" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["bench", "--onnx", str(tiny_export), "--prompt-lengths", "64,x"])
    assert result.exit_code == 2 and "comma-separated" in result.output


def test_bandwidth_probe_returns_a_positive_figure():
    assert probe_bandwidth_gbps(megabytes=64, repeats=2) > 0


def test_gpu_rows_are_judged_against_gpu_bandwidth_not_the_host_probe():
    from aira_opt.benchmark.measure import summarize
    from aira_opt.benchmark.backends import Job

    payload = {"rows": [{"setting": {"batch_size": 1, "prompt_length": 8, "new_tokens": 3}, "ttft": [0.01],
                         "steps": [0.01, 0.01], "rates": [100.0]}],
               "load_s": 1.0, "peak_rss_mb": 1.0, "size_bytes": 2e9, "weight_bytes": 2e9, "device": "cuda"}
    job = Job("ort", "ort fp16 (cuda)", "fp16", folder="x", provider="cuda")
    (gpu,) = summarize(job, payload, bandwidth_gbps=20.0, gpu_bandwidth_gbps=4000.0)
    assert gpu.device == "cuda" and abs(gpu.pct_of_bound - 100 * 100 / 2000) < 1e-9  # bound: 4000/2 steps/s
    (host,) = summarize(job, {**payload, "device": "cpu"}, bandwidth_gbps=20.0)
    assert abs(host.pct_of_bound - 100 * 100 / 10) < 1e-9


def test_recorded_onnxruntime_version_is_the_imported_module():
    import onnxruntime

    from aira_opt.core.artifacts import library_versions

    assert library_versions()["onnxruntime"].startswith(onnxruntime.__version__)


def _die_at_once(queue, *args):
    raise SystemExit(3)  # exits without putting a result, as a crashed or killed child would


@pytest.mark.slow
def test_a_child_that_dies_without_reporting_is_an_error_not_a_hang(monkeypatch):
    import time

    import aira_opt.benchmark.measure as bench

    monkeypatch.setattr(bench, "_child", _die_at_once)
    start = time.monotonic()
    status, payload = bench.run_in_child(timeout=600)
    assert status == "error" and "exited with code 3" in payload
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_genai_rows_run_with_the_bench_thread_settings(tiny_export, tmp_path):
    import importlib.util



    from aira_opt.benchmark.backends import genai_threads

    if importlib.util.find_spec("onnxruntime_genai") is None:
        pytest.skip("onnxruntime-genai is not installed (pip install 'aira-opt[genai]')")
    assert genai_threads(3) == {"intra_op_num_threads": 3, "inter_op_num_threads": 1}
    # our fp32 folder carries a genai_config.json, so the genai backend can run it with the threads overlay
    result = CliRunner().invoke(main, ["bench", "--genai", str(tiny_export), "--backends", "genai", "--threads", "1",
                                       "--new-tokens", "4", "--prompt-lengths", "8", "--warmup", "0",
                                       "--repeats", "1", "--json", str(tmp_path / "g.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "g.json").read_text())
    assert [r["backend"] for r in report["results"]] == ["genai"] and report["skipped"] == []
    assert report["results"][0]["decode_steps"] == 3


def test_llamacpp_rows_skip_with_their_reason_without_a_gguf_or_without_llama_cpp(tiny_export, tmp_path, monkeypatch):
    import importlib.util

    from aira_opt.benchmark.backends import BenchSources
    from aira_opt.benchmark.jobs import plan_jobs

    plan = plan_jobs(BenchSources("aira-tiny", onnx_dirs=[tiny_export]), ["ort", "llamacpp"])
    assert [j.label for j in plan.jobs] == ["ort fp32"]
    assert plan.skipped == [{"backend": "llamacpp", "reason": plan.skipped[0]["reason"]}]
    assert "--gguf" in plan.skipped[0]["reason"] and "make_gguf.py" in plan.skipped[0]["reason"]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    plan = plan_jobs(BenchSources("aira-tiny", onnx_dirs=[tiny_export], gguf_files=[gguf]), ["llamacpp"])
    assert not plan.jobs and "build_llamacpp.sh" in plan.skipped[0]["reason"]


def test_two_folders_of_one_variant_get_their_folder_names_in_the_label(tiny_export, tmp_path):
    twin = tmp_path / "fp32-again"
    shutil.copytree(tiny_export, twin)
    one = jobs_on_exports("ort", BenchSources("aira-tiny", onnx_dirs=[tiny_export]))
    two = jobs_on_exports("ort", BenchSources("aira-tiny", onnx_dirs=[tiny_export, twin]))
    assert [j.label for j in one] == ["ort fp32"]
    assert [j.label for j in two] == [f"ort fp32 [{tiny_export.name}]", "ort fp32 [fp32-again]"]
