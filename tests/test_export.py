from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from aira_opt.cli import main
from aira_opt.core.artifacts import verify_manifest
from aira_opt.core.contract import DecoderContract, position_ids_from_mask
from aira_opt.exporting.exporters import DEFAULT_EXPORTER, EXPORTERS
from helpers import run_numpy


def test_export_follows_the_onnx_contract(tiny, tiny_export):
    graph = onnx.load(str(tiny_export / "model.onnx"))
    contract = DecoderContract.from_config(tiny.config)
    assert contract.check_graph(graph) == []
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 32]
    outputs = [o.name for o in graph.graph.output]
    assert outputs[0] == "logits" and f"present.{tiny.config.num_hidden_layers - 1}.value" in outputs


def test_export_folder_is_self_describing(tiny_export):
    names = {p.name for p in tiny_export.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "manifest.json"} <= names
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["opset"] == 18
    assert manifest["source_model"]["source"] == "aira-tiny"
    assert {"torch", "transformers", "onnxscript", "onnx", "onnxruntime"} <= set(manifest["versions"])
    assert manifest["exporter"] == EXPORTERS[DEFAULT_EXPORTER].description
    gen = json.loads((tiny_export / "generation_config.json").read_text())
    assert (gen["repetition_penalty"], gen["temperature"], gen["top_k"], gen["top_p"], gen["max_new_tokens"]) == (
        1.2, 0.2, 30, 0.3, 200)


def test_manifest_hashes_match_the_files(tiny_export, tmp_path):
    assert verify_manifest(tiny_export) == []
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    with open(copy / "config.json", "a") as f:
        f.write(" ")
    assert verify_manifest(copy) == ["config.json: sha256 differs"]
    result = CliRunner().invoke(main, ["inspect", str(copy)])
    assert result.exit_code == 1 and "sha256 differs" in result.output


def test_onnx_matches_pytorch_at_prefill_and_decode(tiny, tiny_decoder):
    rng = np.random.default_rng(7)
    contract = tiny_decoder.contract
    for batch, length in ((1, 9), (2, 13)):
        ids = rng.integers(5, 500, size=(batch, length))
        mask = np.ones_like(ids)
        past = {n: np.zeros((batch, contract.num_kv_heads, 0, contract.head_dim), np.float32)
                for n in contract.past_names()}
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask, length), **past}
        out = run_numpy(tiny_decoder.folder, feeds)
        with torch.no_grad():
            ref = tiny.model(input_ids=torch.from_numpy(ids), use_cache=True)
        assert np.abs(out["logits"] - ref.logits.numpy()).max() < 1e-4  # prefill
        nxt = rng.integers(5, 500, size=(batch, 1))
        mask2 = np.ones((batch, length + 1), np.int64)
        feeds = {"input_ids": nxt, "attention_mask": mask2, "position_ids": position_ids_from_mask(mask2, 1),
                 **{p: out[o] for p, o in zip(contract.past_names(), contract.present_names())}}
        out2 = run_numpy(tiny_decoder.folder, feeds)
        with torch.no_grad():
            ref2 = tiny.model(input_ids=torch.from_numpy(nxt), past_key_values=ref.past_key_values, use_cache=True)
        assert np.abs(out2["logits"] - ref2.logits.numpy()).max() < 1e-4  # decode


def test_export_validation_is_recorded_and_tight(tiny_export):
    report = json.loads((tiny_export / "manifest.json").read_text())["validation"]
    assert report["max_abs_logit_diff"] < 1e-4
    cases = {c["case"] for c in report["cases"]}
    assert {"batch 1 len 7 prefill", "batch 2 len 16 decode 2"} <= cases


def test_existing_output_is_refused_without_force(tiny_export):
    before = (tiny_export / "manifest.json").read_text()
    result = CliRunner().invoke(main, ["export", "--output", str(tiny_export)])
    assert result.exit_code == 1
    assert "already exists; pass --force" in result.output and "Traceback" not in result.output
    assert (tiny_export / "manifest.json").read_text() == before


def test_force_replaces_an_existing_output(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    result = CliRunner().invoke(main, ["export", "--output", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists() and (out / "model.onnx").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temporary folders left behind


def test_interrupted_export_leaves_nothing_half_written(monkeypatch, tmp_path):
    import aira_opt.pipeline.export_run as export_run
    from helpers import export_model

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_run, "validate_export", interrupted)
    from aira_opt.source.models import load_model

    with pytest.raises(KeyboardInterrupt):
        export_model(load_model("aira-tiny"), "fp32", tmp_path / "out", quiet=True)
    assert os.listdir(tmp_path) == []


def test_failed_validation_raises_one_error_listing_every_mismatch(tiny, tmp_path):
    from aira_opt.core.errors import ValidationError
    from helpers import export_model

    with pytest.raises(ValidationError) as info:
        export_model(tiny, "fp32", tmp_path / "out", atol=1e-12, quiet=True)
    assert len(info.value.mismatches) >= 4 and "prefill" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_damaged_fp32_export_is_not_reused_but_exported_afresh(tiny, tmp_path):
    """The variants start from export/<model>/fp32 when it matches; one whose manifest is damaged cannot vouch
    for its graph, so the fp32 graph is exported again instead of the export failing."""
    from aira_opt.pipeline.export_run import reusable_fp32
    from aira_opt.exporting.exporters import DEFAULT_EXPORTER, EXPORTERS

    fp32 = tmp_path / "export" / "aira-tiny" / "fp32"
    fp32.mkdir(parents=True)
    (fp32 / "model.onnx").write_bytes(b"")
    (fp32 / "manifest.json").write_text("{not json")
    assert reusable_fp32(tiny, fp32, EXPORTERS[DEFAULT_EXPORTER]) is None
