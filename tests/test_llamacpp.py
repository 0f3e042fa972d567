"""llama.cpp as a bench peer: benchmarks/make_gguf.py converts with llama.cpp's own converter and quantizes with
its own quantizer, and the llamacpp runner decodes greedy what our ONNX Runtime loop decodes (a golden test on
aira-tiny's f32 GGUF). Skipped, with the reason, where llama-cpp-python is not installed: PyPI has no CPU wheel,
benchmarks/build_llamacpp.sh builds one per CPU family and caches it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (benchmarks/build_llamacpp.sh)")

from aira_opt.benchmark.backends import BenchSources  # noqa: E402
from aira_opt.benchmark.jobs import plan_jobs  # noqa: E402
from aira_opt.benchmark.measure import Setting, run_bench  # noqa: E402
from aira_opt.benchmark.backends import Job, LlamaCppRunner  # noqa: E402
from aira_opt.benchmark.weights import gguf_type, gguf_weight_bytes  # noqa: E402
from aira_opt.generation.generator import GenerateOptions, generate  # noqa: E402
from aira_opt.generation.sampling import GREEDY  # noqa: E402
from aira_opt.runtime.ort import OrtDecoder  # noqa: E402
from aira_opt.source.models import bundled_model_dir  # noqa: E402
from aira_opt.source.prompts import detect_format, prompt_ids  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """aira-tiny's checkpoint as f32 and Q8_0 GGUF files, made by the benchmark script itself."""
    out = tmp_path_factory.mktemp("gguf")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_gguf.py"), str(bundled_model_dir()),
                           str(out), "--types", "f32,Q8_0"], capture_output=True, text=True)
    if "no llama-cpp-python" in done.stderr:
        pytest.skip(done.stderr.strip().splitlines()[-1])  # the wheel came without build_llamacpp.sh's sdist
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_make_gguf_writes_each_type_through_llama_cpps_own_tools(tiny_gguf):
    assert sorted(p.name for p in tiny_gguf.iterdir()) == ["model-Q8_0.gguf", "model-f32.gguf"]  # no temp files
    assert gguf_type(tiny_gguf / "model-f32.gguf") == "f32" and gguf_type(tiny_gguf / "model-Q8_0.gguf") == "Q8_0"
    f32_size, f32_read = gguf_weight_bytes(tiny_gguf / "model-f32.gguf")
    q8_size, q8_read = gguf_weight_bytes(tiny_gguf / "model-Q8_0.gguf")
    assert 0 < f32_read < f32_size and 0 < q8_read < q8_size and q8_size < 0.4 * f32_size


def test_llamacpp_greedy_matches_our_onnx_runtime_loop_on_the_same_ids(tiny, tiny_export, tiny_gguf):
    fmt = detect_format(tiny.tokenizer)
    ids = np.array([prompt_ids(tiny.tokenizer, "What is the capital of France?", fmt)], dtype=np.int64)  # [1, P]
    runner = LlamaCppRunner(Job("llamacpp", "llamacpp f32", "f32", folder=str(tiny_gguf / "model-f32.gguf")),
                            threads=1, eos=fmt.stop_ids[0], pad=fmt.pad_id, positions=ids.shape[1] + 12)
    runner.activate()
    try:
        tokens, (first, steps) = runner.greedy(ids, 12)
        again, _ = runner.greedy(ids, 12)  # a second request starts from an empty cache
    finally:
        runner.deactivate()
    with OrtDecoder(tiny_export) as decoder:
        ours = generate(decoder, ids.tolist(), GenerateOptions(max_new_tokens=12, ignore_eos=True, sampling=GREEDY),
                        fmt.stop_ids[0], fmt.pad_id)
    assert tokens == again == list(ours.tokens[0])
    assert first > 0 and len(steps) == 11 and runner.kernels.startswith("llama.cpp f32 (")


def test_bench_runs_llamacpp_beside_ort_with_the_same_prompts(tiny_export, tiny_gguf):
    plan = plan_jobs(BenchSources("aira-tiny", onnx_dirs=[tiny_export],
                                  gguf_files=[tiny_gguf / "model-f32.gguf", tiny_gguf / "model-Q8_0.gguf"]),
                     ["ort", "llamacpp"])
    assert [j.label for j in plan.jobs] == ["ort fp32", "llamacpp f32", "llamacpp Q8_0"] and not plan.skipped
    report = run_bench(plan.jobs, [Setting(1, 8, 4)], 0, 1, 1, plan.token_ids, plan.eos, plan.pad)
    assert [r.label for r in report.results] == ["ort fp32", "llamacpp f32", "llamacpp Q8_0"], report.skipped
    for row in report.results[1:]:
        assert row.decode_steps == 3 and row.decode_tokens_per_s > 0 and row.ttft_ms > 0
        assert row.kernels.startswith(f"llama.cpp {row.precision} (") and row.pct_of_bound > 0
    assert report.results[2].size_mb < report.results[1].size_mb
