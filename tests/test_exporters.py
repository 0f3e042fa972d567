"""Every graph pass on both exporters' graphs: our torch.onnx (dynamo) exporter and optimum's.

Each pass is counted, not only run: a fusion or a recipe that silently finds nothing in one exporter's spelling of
the model fails here. optimum's exporter needs the `optimum` extra (transformers 4.57), so its half runs in CI's
second environment and is skipped, with the reason, in the main one.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from aira_opt.core.contract import DecoderContract, empty_past, position_ids_from_mask
from aira_opt.core.errors import MissingExtraError
from aira_opt.exporting.exporters import EXPORTERS

VARIANTS = ("fp32", "fp32-fused", "fp16", "int8-qdq", "int4")


def unavailable(name: str) -> str | None:
    try:
        EXPORTERS[name].check_available()
    except MissingExtraError as exc:
        return exc.message
    return None


class ExporterVariants:
    """aira-tiny exported by one exporter, each variant on first use (the variants reuse its fp32 graph)."""

    def __init__(self, tiny, exporter: str, root: Path):
        self.tiny, self.exporter, self.root, self.made = tiny, exporter, root, {}

    def __getitem__(self, name: str) -> Path:
        from helpers import export_model

        if name not in self.made:
            precision, fused = ("fp32", True) if name == "fp32-fused" else (name, None)
            reuse = None if name == "fp32" else self["fp32"]
            export_model(self.tiny, precision, self.root / name, quiet=True, fused=fused, reuse_fp32=reuse,
                         exporter_name=self.exporter)
            self.made[name] = self.root / name
        return self.made[name]


@pytest.fixture(scope="module", params=list(EXPORTERS))
def exported(request, tiny, tmp_path_factory) -> ExporterVariants:
    reason = unavailable(request.param)
    if reason:
        pytest.skip(reason)
    return ExporterVariants(tiny, request.param, tmp_path_factory.mktemp(f"by-{request.param}"))


def ops(folder: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_the_graph_keeps_the_contract_in_standard_ops(tiny, exported):
    contract = DecoderContract.from_config(tiny.config)
    for name in ("fp32", "fp16", "int8-qdq"):
        model = onnx.load(str(exported[name] / "model.onnx"), load_external_data=False)
        assert contract.check_graph(model) == [], name
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, name  # TensorRT-parsable
        assert manifest(exported[name])["exporter"] == EXPORTERS[exported.exporter].description


def test_every_cpu_fusion_fires(tiny, exported):
    layers = tiny.config.num_hidden_layers
    graph = manifest(exported["fp32-fused"])["graph"]
    assert (graph["layers"], graph["fused_residual_norms"], graph["packed_matmul_groups"]) == (
        layers, 2 * layers, 2 * layers)
    count = ops(exported["fp32-fused"])
    assert count["GroupQueryAttention"] == layers and count["RotaryEmbedding"] == 2 * layers
    assert count["SkipSimplifiedLayerNormalization"] == 2 * layers and count["Softmax"] == 0
    assert count["MatMul"] == 4 * layers + 1  # qkv, o, gate_up, down per layer, and lm_head


def test_int4_quantizes_every_projection_of_the_fused_graph(tiny, exported):
    layers = tiny.config.num_hidden_layers
    record = manifest(exported["int4"])
    assert record["graph"]["layers"] == layers and record["graph"]["fused_residual_norms"] == 2 * layers
    assert record["quantization"]["quantized_nodes"] == 4 * layers + 1
    assert ops(exported["int4"])["MatMulNBits"] == 4 * layers + 1


def test_fp16_lifts_every_softmax_and_passes_the_tensorrt_preflight(tiny, exported):
    from aira_opt.tensorrt.build_plan import BuildOptions, make_plan

    layers = tiny.config.num_hidden_layers
    assert manifest(exported["fp16"])["quantization"]["softmax_wrapped_in_fp32"] == layers
    for name in ("fp16", "int8-qdq"):
        assert make_plan(exported[name], BuildOptions(max_seq=128, max_context=512)).preflight == [], name


def test_int8_qdq_smooths_and_quantizes_the_same_matmuls(tiny, exported):
    layers = tiny.config.num_hidden_layers
    record = manifest(exported["int8-qdq"])["quantization"]
    # q/k/v and gate/up behind each norm, lm_head behind the final one; down_proj stays fp32
    assert record["smoothing"]["smoothed_activations"] == 2 * layers + 1
    assert record["smoothing"]["smoothed_matmuls"] == 5 * layers + 1
    assert len(record["kept_fp32_matmuls"]) == layers
    assert record["quantized_nodes"] == 6 * layers + 1
    assert all("down_proj" in name for name in record["kept_fp32_matmuls"])


@pytest.mark.skipif(any(unavailable(n) for n in EXPORTERS), reason="needs every exporter in one environment "
                    "(the optimum extra, in CI's second environment)")
def test_both_exporters_compute_the_same_logits(tiny, tmp_path):
    from helpers import export_model

    contract = DecoderContract.from_config(tiny.config)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, tiny.config.vocab_size, (2, 7))                      # input_ids: [B, S]
    mask = np.ones((2, 7), np.int64)                                            # attention_mask: [B, S]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask, 7),
             **empty_past(contract, 2, np.float32)}
    outputs = []
    for name in EXPORTERS:
        export_model(tiny, "fp32", tmp_path / name, quiet=True, exporter_name=name)
        session = ort.InferenceSession(str(tmp_path / name / "model.onnx"), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, feeds))
    for name, a, b in zip(contract.output_names(), *outputs):
        assert np.abs(a - b).max() < 1e-4, name


def test_a_tied_embedding_is_stored_once_and_tying_again_changes_nothing(tiny, tmp_path):
    """A small tied table comes out of the dynamo export folded into its own transposed copy for lm_head;
    tie_embeddings reads it from the table instead. Run again, it finds nothing to tie and rewrites nothing."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aira_opt.exporting.exporters import DEFAULT_EXPORTER, tie_embeddings
    from aira_opt.source.models import LoadedModel

    config = LlamaConfig(**{**tiny.config.to_dict(), "tie_word_embeddings": True})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = EXPORTERS[DEFAULT_EXPORTER].export_graph(LoadedModel("tied", "tied", "random", model, tiny.tokenizer),
                                                    tmp_path)
    tables = [i for i in onnx.load(str(path)).graph.initializer
              if sorted(i.dims) == sorted([config.vocab_size, config.hidden_size])]
    assert len(tables) == 1
    written = path.stat().st_mtime_ns
    assert tie_embeddings(path) is False and path.stat().st_mtime_ns == written
