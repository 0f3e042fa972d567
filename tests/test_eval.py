"""`aira-opt eval`: the sliding windows, the maths (against a direct numpy computation), the same ids for every
format, and peers that are missing skipped with their reason."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import aira_opt
from aira_opt.cli import main
from aira_opt.core.errors import OptionError
from aira_opt.evaluation import Candidate, LogitSource, Reference, Tally, Windows, corpus_ids, evaluate
from aira_opt.source.corpus import LANGUAGE_REFERENCE, SMALL_SLICE, real_text
from aira_opt.source.models import bundled_model_dir


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (10, 4, 3), (3, 8, 4), (257, 64, 17), (2, 2, 1)])
def test_every_target_is_scored_once_with_the_windows_context(n, window, stride):
    ids = list(range(100, 100 + n))
    scored = []
    for i, (chunk, first) in enumerate(Windows(window, stride).split(ids)):
        assert len(chunk) <= window and 0 <= first < len(chunk) - 1
        begin = ids.index(chunk[0])
        targets = list(range(begin + first + 1, begin + len(chunk)))
        if i:  # after the first window, every scored target sees at least window - stride tokens before it
            assert targets[0] - begin >= min(window - stride, targets[0])
        scored += targets
    assert scored == list(range(1, n))


def test_bad_windows_are_one_line_errors():
    for window, stride in ((8, 16), (8, 8), (1, 1)):
        with pytest.raises(OptionError, match="stride"):
            Windows(window, stride)
    result = CliRunner().invoke(main, ["eval", "--gguf", __file__, "--model", "aira-tiny", "--window", "4", "--stride",
                                       "8"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    nothing = CliRunner().invoke(main, ["eval"])
    assert nothing.exit_code != 0 and "nothing to evaluate" in nothing.output


def test_tally_matches_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    reference, candidate = rng.normal(size=(50, 7)), rng.normal(size=(50, 7))
    targets = rng.integers(0, 7, size=50)
    tally = Tally()
    tally.add(Reference.of(reference[:20], targets[:20]), candidate[:20])  # in two parts, as windows come
    tally.add(Reference.of(reference[20:], targets[20:]), candidate[20:])
    got = tally.summary()

    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = softmax(reference), softmax(candidate)
    kl = np.array([sum(p[i, v] * np.log(p[i, v] / q[i, v]) for v in range(7)) for i in range(50)])
    assert got["tokens"] == 50
    assert got["kl_divergence_mean"] == pytest.approx(kl.mean(), rel=1e-12)
    assert got["kl_divergence_p99"] == pytest.approx(np.percentile(kl, 99), rel=1e-12)
    assert got["perplexity"] == pytest.approx(np.exp(-np.mean(np.log(q[np.arange(50), targets]))), rel=1e-12)
    assert got["perplexity_reference"] == pytest.approx(np.exp(-np.mean(np.log(p[np.arange(50), targets]))), rel=1e-12)
    assert got["top1_agreement"] == pytest.approx(np.mean(p.argmax(1) == q.argmax(1)))


class Recording(LogitSource):
    """Wraps a source and keeps every window of ids it was given."""

    def __init__(self, inner: LogitSource, seen: list):
        self.inner, self.seen, self.label, self.format = inner, seen, inner.label, inner.format

    def logits(self, ids):
        self.seen.append(list(ids))
        return self.inner.logits(ids)

    def close(self):
        self.inner.close()


def test_every_format_gets_the_same_ids_and_an_exact_export_measures_zero(tiny, tiny_export, tiny_variants,
                                                                         monkeypatch):
    seen: dict[str, list] = {}
    opened = Candidate.open

    def recording_open(self, windows, threads):
        seen[f"{self.format} {self.path.name}"] = []
        return Recording(opened(self, windows, threads), seen[f"{self.format} {self.path.name}"])

    monkeypatch.setattr(Candidate, "open", recording_open)
    windows = Windows(128, 64)
    report = evaluate(tiny, [Candidate("onnx", tiny_export), Candidate("onnx", tiny_variants["int4"]),
                             Candidate("genai", tiny_export)], real_text(SMALL_SLICE), windows, max_tokens=600,
                      quiet=True)
    ids = corpus_ids(tiny, real_text(SMALL_SLICE), 600)
    expected = [chunk for chunk, _ in windows.split(ids)]
    assert all(windows_seen == expected for windows_seen in seen.values()) and len(seen) == 3
    fp32, int4, genai = report["results"]
    assert fp32["tokens"] == len(ids) - 1 == report["corpus"]["tokens_available"] - 1
    assert fp32["kl_divergence_mean"] < 1e-8 and fp32["top1_agreement"] == 1.0
    assert fp32["perplexity"] == pytest.approx(fp32["perplexity_reference"], rel=1e-5)
    assert genai["kl_divergence_mean"] < 1e-8  # onnxruntime-genai's own runtime on the same graph
    assert int4["kl_divergence_mean"] > 1e-4 and int4["kl_divergence_p99"] >= int4["kl_divergence_mean"]
    assert report["window"] == 128 and report["stride"] == 64 and len(report["corpus"]["ids_sha256"]) == 64


def test_a_missing_peer_is_skipped_with_its_reason(tiny_export, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", "--onnx", str(tiny_export), "--gguf", str(gguf), "--corpus",
                                       SMALL_SLICE, "--max-tokens", "200", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [r["format"] for r in report["results"]] == ["onnx"]
    assert report["skipped"][0]["path"] == str(gguf) and "llamacpp" in report["skipped"][0]["reason"]
    assert "skipped" in result.output and "KL mean" in result.output


def test_the_corpus_is_real_prose_with_its_provenance():
    full, small = real_text(LANGUAGE_REFERENCE), real_text(SMALL_SLICE)
    assert len(full.text) > 400_000 and full.text.startswith(small.text) and len(small.text) == 6000
    assert "Python Language Reference" in full.source and "PSF" in full.licence
    with pytest.raises(ValueError, match="known"):
        real_text("wikipedia")


def test_a_file_llama_cpp_cannot_load_and_a_window_past_the_context_are_one_line_errors(tiny_export, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama.cpp (llama-cpp-python) is not installed")
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file")
    result = CliRunner().invoke(main, ["eval", "--onnx", str(tiny_export), "--gguf", str(bad), "--corpus", SMALL_SLICE])
    assert result.exit_code != 0 and "llama.cpp cannot load" in result.output and "Traceback" not in result.output
    long = CliRunner().invoke(main, ["eval", "--onnx", str(tiny_export), "--window", "4096", "--stride", "8"])
    assert long.exit_code != 0 and "context" in long.output


def test_openvino_without_its_environment_is_skipped_with_how_to_get_it(tiny_export, tmp_path, monkeypatch):
    monkeypatch.delenv("AIRA_OPT_OPENVINO_PYTHON", raising=False)
    if importlib.util.find_spec("openvino_genai") is not None:
        pytest.skip("openvino imports in this environment")
    ir = tmp_path / "openvino-int4"
    ir.mkdir()
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", "--onnx", str(tiny_export), "--openvino", str(ir), "--corpus",
                                       SMALL_SLICE, "--max-tokens", "100", "--json", str(out)])
    assert result.exit_code == 0, result.output
    skipped = json.loads(out.read_text())["skipped"]
    assert skipped[0]["format"] == "openvino" and "--openvino-python" in skipped[0]["reason"]
    from_python = aira_opt.evaluate(onnx=[tiny_export], openvino=[ir], corpus=SMALL_SLICE, max_tokens=100)
    assert from_python["skipped"][0]["format"] == "openvino" and len(from_python["results"]) == 1
    bench = CliRunner().invoke(main, ["bench", "--onnx", str(tiny_export), "--backends", "ort,openvino", "--openvino",
                                      str(ir), "--repeats", "1", "--new-tokens", "4", "--json", "-"])
    assert bench.exit_code == 0, bench.output
    assert "--openvino-python" in json.loads(bench.stdout)["skipped"][0]["reason"]


OPENVINO_PYTHON = os.environ.get("AIRA_OPT_OPENVINO_PYTHON")


@pytest.mark.slow
@pytest.mark.skipif(not OPENVINO_PYTHON, reason="needs OpenVINO's own environment: set AIRA_OPT_OPENVINO_PYTHON to "
                                                "the python of a venv with openvino-genai and optimum-intel")
def test_an_openvino_ir_is_evaluated_and_benched_through_its_own_environment(tiny_export, tmp_path):
    """optimum-intel's own exporter makes the IR from aira-tiny's checkpoint, in OpenVINO's environment."""
    ir = tmp_path / "openvino-fp32"
    made = subprocess.run([str(Path(OPENVINO_PYTHON).parent / "optimum-cli"), "export", "openvino", "--model",
                           str(bundled_model_dir()), "--task", "text-generation-with-past", "--weight-format", "fp32", str(ir)],
                          capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stderr[-2000:]
    report = evaluate_report(["--onnx", str(tiny_export), "--openvino", str(ir)], tmp_path)
    ours, openvino = report["results"]
    assert openvino["format"] == "openvino" and openvino["tokens"] == ours["tokens"]
    assert openvino["kl_divergence_mean"] < 0.01 and openvino["top1_agreement"] > 0.95  # fp32 weights (bf16 compute
    assert "openvino" in openvino["runtime"]                                             # where the CPU has it)
    bench = CliRunner().invoke(main, ["bench", "--onnx", str(tiny_export), "--backends", "openvino", "--openvino",
                                      str(ir), "--repeats", "2", "--new-tokens", "8", "--json", "-"])
    row = json.loads(bench.stdout)["results"][0]
    assert row["backend"].startswith("openvino") and row["decode_tokens_per_s"] > 0 and row["ttft_ms"] > 0


def evaluate_report(args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", *args, "--corpus", SMALL_SLICE, "--max-tokens", "300", "--json",
                                       str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_two_folders_of_one_variant_are_told_apart_by_their_folder_names(tiny, tiny_export, tmp_path):
    twin = tmp_path / "fp32-again"
    shutil.copytree(tiny_export, twin)
    report = evaluate(tiny, [Candidate("onnx", tiny_export), Candidate("onnx", twin)], real_text(SMALL_SLICE),
                      Windows(64, 32), max_tokens=100, quiet=True)
    assert [r["label"] for r in report["results"]] == [f"ours fp32 [{tiny_export.name}]", "ours fp32 [fp32-again]"]
    alone = evaluate(tiny, [Candidate("onnx", twin)], real_text(SMALL_SLICE), Windows(64, 32), max_tokens=100,
                     quiet=True)
    assert alone["results"][0]["label"] == "ours fp32" and "runtime" not in alone["results"][0]
