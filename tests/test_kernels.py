"""Kernel choice by measurement (precision/kernels.py): candidates, the timing probe and its per-machine cache,
the export's record of what ran, the fallback when a faster kernel misses the sanity bar, and the CPU facts the
choice depends on."""

from __future__ import annotations

import dataclasses
import json

import onnx
import pytest
from click.testing import CliRunner

from aira_opt.cli import main
from aira_opt.core import cpu
from aira_opt.precision import kernels
from aira_opt.precision.kernels import candidates, choose_kernels, layer_shapes, probe_key
from helpers import export_model
from aira_opt.precision.variants import VARIANTS


@pytest.fixture
def small_probe(tmp_path, monkeypatch):
    """A private timings cache and a probe small enough for a test (the real one outgrows the last-level cache)."""
    monkeypatch.setenv("AIRA_OPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "PROBE_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(kernels, "last_level_cache_bytes", lambda: 0)
    return tmp_path / "cache" / kernels.CACHE_FILE


def op_types(folder) -> set[str]:
    return {n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}


def test_candidates_put_the_default_first_and_leave_dynamic_int8_to_int8_without_blocks():
    int8, int4 = VARIANTS["int8"], VARIANTS["int4"]

    def names(record, blocks):
        return [c.name for c in candidates(record.kernel_candidates, record.weight_only, blocks)]

    assert names(int8, False) == ["matmulnbits", "matmulnbits-fp32", "dynamic"]
    assert candidates(int8.kernel_candidates, int8.weight_only, False)[0].weight_only == int8.weight_only  # unchanged
    assert names(int8, True) == ["matmulnbits", "matmulnbits-fp32"]
    assert names(int4, False) == ["matmulnbits", "matmulnbits-fp32"]
    fp32_compute = candidates(int4.kernel_candidates, int4.weight_only, False)[1]
    assert fp32_compute.weight_only.accuracy_level == 1 and fp32_compute.same_numerics
    assert not candidates(int8.kernel_candidates, int8.weight_only, False)[2].same_numerics  # per-tensor activations


def test_layer_shapes_are_the_fused_exports_packed_matmuls(tiny):
    c = tiny.config
    head_dim = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    assert layer_shapes(c) == [(c.hidden_size, q + 2 * kv), (q, c.hidden_size), (c.hidden_size,
                               2 * c.intermediate_size), (c.intermediate_size, c.hidden_size)]


def test_choice_is_timed_fastest_first_then_read_back_from_the_per_machine_cache(tiny, small_probe, monkeypatch):
    options = candidates(VARIANTS["int8"].kernel_candidates, VARIANTS["int8"].weight_only, False)
    choice = choose_kernels(options, tiny.config, threads=1, quiet=True)
    measured = choice.record["measured_ms_per_layer"]
    assert set(measured) == {c.name for c in options}
    for t in measured.values():
        assert 0 < t["decode_ms"] and 0 < t["prefill_ms"]
        assert t["request_ms"] == pytest.approx(t["prefill_ms"] + 63 * t["decode_ms"], abs=1e-2)
    totals = [measured[c.name]["request_ms"] for c in choice.ordered]
    assert totals == sorted(totals) and not choice.record["from_cache"]
    cached = json.loads(small_probe.read_text())
    assert {probe_key(layer_shapes(tiny.config), c, 1) for c in options} <= set(cached)
    assert all(cpu.cpu_model() in key for key in cached)  # keyed by the machine

    def no_timing(*args, **kwargs):
        raise AssertionError("a cached candidate was timed again")

    monkeypatch.setattr(kernels, "time_candidate", no_timing)
    again = choose_kernels(options, tiny.config, threads=1, quiet=True)
    assert again.record["from_cache"] and [c.name for c in again.ordered] == [c.name for c in choice.ordered]
    # 'default' and a named kernel are not timed at all
    assert [c.name for c in choose_kernels(options, tiny.config, mode="default").ordered] == ["matmulnbits"]
    named = choose_kernels(options, tiny.config, mode="dynamic")
    assert [c.name for c in named.ordered] == ["dynamic"] and named.record == {"tuned": False, "requested": "dynamic"}


def test_export_records_the_timed_choice_and_runs_those_kernels(tiny, tiny_export, small_probe, tmp_path):
    manifest = export_model(tiny, "int8", tmp_path / "int8", quiet=True, reuse_fp32=tiny_export, kernels="auto")
    record = manifest["kernels"]
    assert record["tuned"] and record["choice"] in record["measured_ms_per_layer"]
    assert record["machine"] == cpu.machine_key(None) and record["cache"] == str(small_probe)
    fastest = min(record["measured_ms_per_layer"].items(), key=lambda kv: kv[1]["request_ms"])[0]
    assert record["choice"] == fastest  # aira-tiny passes the sanity bar with each of them
    expected = {"dynamic": "MatMulInteger", "matmulnbits": "MatMulNBits", "matmulnbits-fp32": "MatMulNBits"}
    assert expected[record["choice"]] in op_types(tmp_path / "int8") or (
        record["choice"] == "dynamic" and "DynamicQuantizeMatMul" in op_types(tmp_path / "int8"))


def test_dynamic_int8_is_standard_ops_and_passes_int8s_check_on_aira_tiny(tiny, tiny_export, tmp_path):
    manifest = export_model(tiny, "int8", tmp_path / "dyn", quiet=True, reuse_fp32=tiny_export, kernels="dynamic")
    assert manifest["kernels"]["choice"] == "dynamic" and not manifest["kernels"]["tuned"]
    quantization = manifest["quantization"]
    assert quantization["method"].startswith("dynamic int8") and quantization["bits"] == 8
    assert quantization["weight_range"].startswith("7-bit" if not cpu.has_int8_dot() else "8-bit")
    ops = op_types(tmp_path / "dyn")
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "MatMulNBits" not in ops
    result = CliRunner().invoke(main, ["check", "--onnx", str(tmp_path / "dyn")])  # int8's full bar
    assert result.exit_code == 0 and "PASSED" in result.output, result.output
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "dyn")])
    assert shown.exit_code == 0 and "kernels: dynamic (--kernels dynamic)" in shown.output


def test_a_faster_kernel_that_misses_the_sanity_bar_gives_way_to_the_next(tiny, tiny_export, small_probe, tmp_path):
    """Timings seeded so dynamic int8 ranks first, and a max |logit diff| bar between what dynamic int8 and
    MatMulNBits each reach on aira-tiny: the export falls back to MatMulNBits and records why."""
    errors = {name: export_model(tiny, "int8", tmp_path / name, quiet=True, reuse_fp32=tiny_export, kernels=name)
              ["validation"]["max_abs_logit_diff"] for name in ("dynamic", "matmulnbits")}
    assert errors["matmulnbits"] < errors["dynamic"]  # per-block weights, no activation rounding
    options = candidates(VARIANTS["int8"].kernel_candidates, VARIANTS["int8"].weight_only, False)
    shapes = layer_shapes(tiny.config)
    fake = {"dynamic": 1.0, "matmulnbits": 2.0, "matmulnbits-fp32": 3.0}
    kernels._write_cache({probe_key(shapes, c, None): {"decode_ms": fake[c.name], "prefill_ms": fake[c.name],
                                                       "request_ms": 64 * fake[c.name]} for c in options})
    bar = (errors["matmulnbits"] + errors["dynamic"]) / 2
    manifest = export_model(tiny, "int8", tmp_path / "int8", quiet=True, reuse_fp32=tiny_export, kernels="auto",
                            atol=bar)
    record = manifest["kernels"]
    assert record["from_cache"] and record["choice"] == "matmulnbits"
    assert "dynamic" in record["rejected"] and "max |logit diff|" in record["rejected"]["dynamic"]
    assert "MatMulNBits" in op_types(tmp_path / "int8") and "MatMulInteger" not in op_types(tmp_path / "int8")
    assert manifest["validation"]["max_abs_logit_diff"] <= bar


def test_random_weights_only_time_kernels_that_keep_the_numerics(tiny, tiny_export, tmp_path, monkeypatch):
    from aira_opt.pipeline import export_run as pipeline

    timed = {}

    class Stop(Exception):
        pass

    def record(options, *args, **kwargs):
        timed["names"] = [c.name for c in options]
        raise Stop  # what the tuner is offered is the point; the export itself is tested above

    monkeypatch.setattr(pipeline, "choose_kernels", record)
    for model, expected in ((dataclasses.replace(tiny, kind="random"), ["matmulnbits", "matmulnbits-fp32"]),
                            (tiny, ["matmulnbits", "matmulnbits-fp32", "dynamic"])):
        with pytest.raises(Stop):
            export_model(model, "int8", tmp_path / "int8", quiet=True, reuse_fp32=tiny_export, kernels="auto")
        assert timed["names"] == expected  # the sanity bar is not enforced for random weights
    assert not (tmp_path / "int8").exists()  # nothing half-written


def test_kernels_option_errors_are_one_line(tmp_path):
    runner = CliRunner()
    for args, expected in [
        (["--precision", "int4", "--kernels", "dynamic"], "--kernels dynamic is not a choice for int4"),
        (["--precision", "int8", "--block-size", "64", "--kernels", "dynamic"], "with --block-size"),
        (["--precision", "fp32", "--kernels", "matmulnbits"], "applies to --precision int8 or int4 only"),
    ]:
        result = runner.invoke(main, ["export", *args, "--output", str(tmp_path / "x")])
        assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output
        assert not (tmp_path / "x").exists()


def test_cpu_facts_come_from_this_machine():
    flags = cpu.instruction_sets()
    assert set(flags) <= set(cpu.KERNEL_FEATURES)
    assert cpu.has_int8_dot() == any(f in flags for f in cpu.INT8_DOT_FEATURES)
    assert cpu.last_level_cache_bytes() >= 0
    assert cpu.cpu_model() in cpu.machine_key(2) and cpu.machine_key(2).endswith("x2")


def test_an_8_bit_dynamic_export_warns_on_a_cpu_whose_int8_kernels_may_saturate(tiny, tiny_export, tmp_path,
                                                                                monkeypatch):
    import warnings

    from aira_opt.runtime import ort as ort_runtime

    folder = tmp_path / "dyn8"
    export_model(tiny, "int8", folder, quiet=True, reuse_fp32=tiny_export, kernels="dynamic")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["quantization"]["weight_range"] = "8-bit"  # as a VNNI machine's export records it
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for dot, expected in ((False, True), (True, False)):
        monkeypatch.setattr(ort_runtime, "has_int8_dot", lambda dot=dot: dot)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ort_runtime.OrtDecoder(folder).activate().deactivate()
        assert any("may saturate" in str(w.message) for w in caught) == expected


def test_a_failed_cache_write_leaves_no_temporary_file(small_probe, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kernels.json, "dump", full_disk)
    kernels._write_cache({"a key": {"request_ms": 1.0}})  # a failed write only costs a re-probe
    folder = small_probe.parent
    assert folder.is_dir() and list(folder.iterdir()) == []
