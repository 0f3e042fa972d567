"""The TensorRT layer: plan logic and pre-flight run everywhere; API conformance against the real TensorRT 11.4
bindings runs wherever gcc and the bindings wheel are present; real builds need TensorRT and a GPU."""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

import aira_opt.tensorrt.engines as engines
from aira_opt.cli import main
from aira_opt.core.contract import DecoderContract
from aira_opt.tensorrt.build_plan import (
    BuildOptions,
    derive_profiles,
    hardware_compatibility,
    make_plan,
    preflight,
    profile_for,
)
from aira_opt.core.errors import AiraOptError
from aira_opt.source.models import PRESETS

AIRA_1B = PRESETS["aira-2-1b1-random"]
BIG = DecoderContract(AIRA_1B.num_hidden_layers, AIRA_1B.num_key_value_heads, AIRA_1B.head_dim, AIRA_1B.vocab_size)


def test_profiles_cover_prefill_and_decode_for_the_aira_1b_shape():
    options = BuildOptions(max_batch=4, max_seq=512, max_context=2048)
    prefill, decode = derive_profiles(BIG, options)
    assert len(prefill.shapes) == 3 + 2 * 22
    assert prefill.shapes["input_ids"].max == (4, 512) and prefill.shapes["past_key_values.0.key"].max == (4, 4, 0, 64)
    assert decode.shapes["input_ids"].min == (1, 1) and decode.shapes["input_ids"].max == (4, 1)
    assert decode.shapes["past_key_values.21.value"].min == (1, 4, 1, 64)
    assert decode.shapes["past_key_values.21.value"].max == (4, 4, 2047, 64)
    # the mask spans past + new in every profile
    for p in (prefill, decode):
        m, s, k = p.shapes["attention_mask"], p.shapes["input_ids"], p.shapes["past_key_values.0.key"]
        assert m.min[1] == s.min[1] + k.min[2] and m.max[1] == min(2048, s.max[1] + k.max[2])


def test_one_profile_spans_both_phases():
    (both,) = derive_profiles(BIG, BuildOptions(max_seq=128, max_context=1024), two_profiles=False)
    assert both.shapes["past_key_values.0.key"].min[2] == 0 and both.shapes["past_key_values.0.key"].max[2] == 1023
    assert both.shapes["input_ids"].max[1] == 128


def test_the_runner_picks_the_profile_for_each_step():
    profiles = derive_profiles(BIG, BuildOptions(max_seq=64, max_context=256))
    assert profile_for(profiles, past_length=0, new_tokens=40) == 0
    assert profile_for(profiles, past_length=40, new_tokens=1) == 1
    with pytest.raises(AiraOptError, match="no optimization profile"):
        profile_for(profiles, past_length=300, new_tokens=1)


@pytest.mark.parametrize("target, capability, level", [
    ("a100", (8, 0), "NONE"), ("a100", (9, 0), "AMPERE_PLUS"), ("a100", (8, 6), "AMPERE_PLUS"),
    ("native", (9, 0), "NONE"),
])
def test_a100_target_uses_ampere_plus_off_the_a100(target, capability, level):
    assert hardware_compatibility(target, capability) == level


def test_a100_target_refuses_pre_ampere_gpus():
    with pytest.raises(AiraOptError, match="Ampere-or-newer"):
        hardware_compatibility("a100", (7, 5))


def test_bad_build_options_are_reported_together():
    problems = BuildOptions(max_seq=8192, max_context=4096, target="h100", opt_level=9).problems(2048)
    assert len(problems) == 4


def test_build_plan_for_aira_tiny_variants_passes_preflight(tiny_export, tiny_variants):
    for folder in (tiny_export, tiny_variants["fp16"], tiny_variants["int8-qdq"]):
        plan = make_plan(folder, BuildOptions(max_seq=128, max_context=512))
        assert plan.preflight == [], (folder, plan.preflight)
        assert [p.name for p in plan.profiles] == ["prefill", "decode"]
        json.dumps(plan.to_json())


def test_cpu_only_variants_cannot_be_built(tiny_variants):
    with pytest.raises(AiraOptError, match="cannot be built into a TensorRT engine"):
        make_plan(tiny_variants["int4"], BuildOptions(max_context=512))


def test_preflight_catches_contrib_ops_undeclared_fp32_and_bad_qdq(tiny, tiny_variants):
    contract = DecoderContract.from_config(tiny.config)
    profiles = derive_profiles(contract, BuildOptions(max_seq=64, max_context=512))
    int4 = onnx.load(str(tiny_variants["int4"] / "model.onnx"))
    assert any("com.microsoft.MatMulNBits" in p for p in preflight(int4, contract, profiles, "int4", {}))
    fp16 = onnx.load(str(tiny_variants["fp16"] / "model.onnx"))
    assert any("undeclared fp32" in p for p in preflight(fp16, contract, profiles, "fp16", {}))
    qdq = onnx.load(str(tiny_variants["int8-qdq"] / "model.onnx"))
    import numpy as np
    from onnx import numpy_helper

    zp = next(i for i in qdq.graph.initializer if i.name.endswith("zero_point") and i.data_type == onnx.TensorProto.INT8)
    zp.CopyFrom(numpy_helper.from_array(np.full(tuple(zp.dims), 3, np.int8), zp.name))
    assert any("not 0" in p for p in preflight(qdq, contract, profiles, "int8-qdq", None))


def test_build_dry_run_prints_the_plan_without_tensorrt(tiny_variants, tmp_path):
    result = CliRunner().invoke(main, ["build", "--onnx", str(tiny_variants["fp16"]), "--dry-run", "--max-seq", "64",
                                       "--max-context", "512", "--output", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert "profile 'prefill'" in result.output and "profile 'decode'" in result.output
    assert "pre-flight: passed" in result.output and "AMPERE_PLUS" in result.output
    assert not (tmp_path / "e").exists()


def test_build_without_tensorrt_is_a_one_line_error(tiny_variants, tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here, so it is not missing")
    result = CliRunner().invoke(main, ["build", "--onnx", str(tiny_variants["fp16"]), "--max-seq", "64",
                                       "--max-context", "512", "--output", str(tmp_path / "e")])
    assert result.exit_code == 1
    assert "pip install 'aira-opt[trt]'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "e").exists()


# API conformance against the real TensorRT 11.4 Python bindings --------------------------------------------
STUBS = {
    "libnvinfer.so.11": ["createInferBuilder_INTERNAL", "createInferRuntime_INTERNAL", "createInferRefitter_INTERNAL",
                         "getPluginRegistry", "getBuilderPluginRegistry"],
    "libnvonnxparser.so.11": ["createNvOnnxParser_INTERNAL", "createNvOnnxParserRefitter_INTERNAL",
                              "getNvOnnxParserVersion"],
    "libnvinfer_plugin.so.11": ["initLibNvInferPlugins"],
}


@pytest.fixture(scope="module")
def trt_bindings_env(tmp_path_factory):
    """An environment in which the real bindings import: stub libraries exporting the few C entry points
    their extension links against. The stubs do nothing; creating a Builder there fails by design."""
    if importlib.util.find_spec("tensorrt_bindings") is None:
        pytest.skip("tensorrt-cu13-bindings is not installed (pip install 'aira-opt[test]')")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to compile the stub libraries")
    folder = tmp_path_factory.mktemp("trt-stubs")
    for lib, symbols in STUBS.items():
        source = folder / f"{lib}.c"
        source.write_text("".join(f"void* {s}(void) {{ return 0; }}\n" for s in symbols))
        subprocess.run(["gcc", "-shared", "-fPIC", f"-Wl,-soname,{lib}", "-o", str(folder / lib), str(source)],
                       check=True)
    return {"LD_LIBRARY_PATH": str(folder), "PATH": "/usr/bin:/bin"}


def run_with_bindings(env: dict[str, str], code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_conformance_every_tensorrt_api_we_use_exists_in_11_4(trt_bindings_env):
    """Proves the API surface only: names and members exist in the real 11.4 bindings. Whether a build
    succeeds is proven only on a GPU (test_engine_matches_pytorch_on_gpu)."""
    surface = json.dumps(engines.API_SURFACE)
    data = run_with_bindings(trt_bindings_env, f"""
        import json, tensorrt_bindings as trt
        surface = json.loads({surface!r})
        missing = [c for c in surface if not hasattr(trt, c)]
        missing += [c + "." + m for c, ms in surface.items() if hasattr(trt, c) for m in ms
                    if not hasattr(getattr(trt, c), m)]
        print(json.dumps({{"version": trt.__version__, "missing": missing,
                          "has_fp16_flag": hasattr(trt.BuilderFlag, "FP16"),
                          "has_int8_flag": hasattr(trt.BuilderFlag, "INT8")}}))
    """)
    assert data["version"].startswith("11.4")
    assert data["missing"] == []
    assert not data["has_fp16_flag"] and not data["has_int8_flag"]  # removed in 11: we must not use them


# How each local name in engines.py maps to a TensorRT class, for the static check below.
RECEIVERS = {"builder": "Builder", "config": "IBuilderConfig", "parser": "OnnxParser", "trt_profile":
             "IOptimizationProfile", "runtime": "Runtime", "ctx": "IExecutionContext", "self.context":
             "IExecutionContext", "self.engine": "ICudaEngine", "config.get_timing_cache()": "ITimingCache"}


def test_conformance_engines_module_uses_only_the_declared_surface():
    tree = ast.parse(Path(engines.__file__).read_text())
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            receiver = ast.unparse(node.value)
            if receiver == "trt":
                used.add(node.attr)
            elif receiver.startswith("trt."):
                used.add(f"{receiver[4:]}.{node.attr}")
            elif receiver in RECEIVERS:
                used.add(f"{RECEIVERS[receiver]}.{node.attr}")
    declared_members = {f"{c}.{m}" for c, ms in engines.API_SURFACE.items() for m in ms}
    used |= {"HardwareCompatibilityLevel.NONE", "HardwareCompatibilityLevel.AMPERE_PLUS"}  # getattr by name
    used_members = {u for u in used if "." in u}
    assert used_members == declared_members  # the declared list is exactly what the module uses
    assert {u for u in used if "." not in u} - {"__version__"} <= set(engines.API_SURFACE)
    assert "BuilderFlag.FP16" not in used and "BuilderFlag.INT8" not in used
    assert {"Builder.build_serialized_network", "IExecutionContext.execute_async_v3"} <= used


# Real engines: TensorRT and a GPU -------------------------------------------------------------------------
@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "int8-qdq"])
def test_engine_matches_pytorch_on_gpu(tiny_variants, precision, tmp_path):
    """Skipped at collection (conftest) where TensorRT or a GPU is missing, with the reason."""
    engine = tmp_path / "engine"
    result = CliRunner().invoke(main, ["build", "--onnx", str(tiny_variants[precision]), "--max-seq", "64",
                                       "--max-context", "512", "--target", "native", "--output", str(engine)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "check.json"
    result = CliRunner().invoke(main, ["check", "--engine", str(engine), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["passed"]


def test_engine_sidecar_describes_the_build_and_inspect_verifies_the_plan(tiny_variants, tmp_path):
    from aira_opt.folders import PLAN_FILE, SIDECAR, EngineFolder
    from aira_opt.tensorrt.engines import engine_record

    plan = make_plan(tiny_variants["fp16"], BuildOptions(max_seq=64, max_context=512))
    folder = tmp_path / "engine"
    folder.mkdir()
    (folder / PLAN_FILE).write_bytes(b"not a real plan, but bytes to hash")
    shutil.copy2(tiny_variants["fp16"] / "config.json", folder / "config.json")
    written = engine_record(plan, "11.4.0", "NVIDIA H200", (9, 0), "AMPERE_PLUS", folder / PLAN_FILE, 12.3)
    (folder / SIDECAR).write_text(json.dumps(written.to_json()))
    record = EngineFolder(folder).record  # read back as every reader sees it
    assert record == written and record.variant.name == "fp16"
    assert record.hardware_compatibility_level == "AMPERE_PLUS" and record.compute_capability == "9.0"
    assert [p["name"] for p in record.profiles] == ["prefill", "decode"]
    assert set(record.sha256) == {"plan", "onnx"} and "input_ids" in record.inputs
    result = CliRunner().invoke(main, ["inspect", str(folder)])
    assert result.exit_code == 0 and "plan sha256: matches" in result.output
    (folder / PLAN_FILE).write_bytes(b"tampered")
    result = CliRunner().invoke(main, ["inspect", str(folder)])
    assert result.exit_code == 1 and "sha256 differs" in result.output


def test_preflight_catches_an_fp32_weight_in_an_fp16_graph(tiny, tiny_variants):
    import numpy as np
    from onnx import numpy_helper

    from aira_opt.tensorrt.build_plan import fp16_consistency
    from aira_opt.precision.graph import fp32_islands

    fp16 = onnx.load(str(tiny_variants["fp16"] / "model.onnx"))
    declared = fp32_islands(fp16)
    assert fp16_consistency(fp16, declared) == []
    matmul = next(n for n in fp16.graph.node if n.op_type == "MatMul" and "q_proj" in n.name)
    weight = next(i for i in fp16.graph.initializer if i.name == matmul.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight).astype(np.float32), weight.name))
    assert any(f"weight {weight.name} is not fp16" in p for p in fp16_consistency(fp16, declared))
