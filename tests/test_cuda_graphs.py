"""The fused fp16 and int4 graphs for ONNX Runtime CUDA (precision/cuda.py), checked where CI runs: ONNX Runtime's
CPU provider has fp16 kernels for GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization and
MatMulNBits. Slow there is fine; wrong is not."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto

from aira_opt.cli import main
from aira_opt.core.contract import position_ids_from_mask
from aira_opt.runtime.ort import OrtDecoder
from aira_opt.source.prompts import prompt_ids

CUDA_VARIANTS = ("fp16-cuda", "int4-cuda")


@pytest.mark.parametrize("precision", CUDA_VARIANTS)
def test_the_cuda_graph_is_fused_fp16_with_fp32_logits(tiny_variants, precision):
    model = onnx.load(str(tiny_variants[precision] / "model.onnx"))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["GroupQueryAttention"] == 3 and ops["RotaryEmbedding"] == 6  # 3 layers; q and k
    assert ops["SkipSimplifiedLayerNormalization"] >= 5
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert inputs["past_key_values.0.key"] == outputs["present.2.value"] == TensorProto.FLOAT16
    assert outputs["logits"] == TensorProto.FLOAT
    assert not [i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT]  # no fp32 weights
    if precision == "int4-cuda":
        assert ops["MatMulNBits"] == 3 * 4 + 1 and ops["MatMul"] == 0
    manifest = json.loads((tiny_variants[precision] / "manifest.json").read_text())
    assert manifest["graph"]["fused"] and "CUDA" in manifest["graph"]["runtime"]
    genai = json.loads((tiny_variants[precision] / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]  # made for a GPU


@pytest.mark.parametrize("precision", CUDA_VARIANTS)
def test_the_cuda_graphs_pass_check_on_the_cpu(tiny_variants, precision, tmp_path):
    out = tmp_path / "check.json"
    result = CliRunner().invoke(main, ["check", "--onnx", str(tiny_variants[precision]), "--json", str(out)])
    assert result.exit_code == 0 and "PASSED" in result.output, result.output
    assert json.loads(out.read_text())["precision"] == precision


def test_the_cuda_graph_cannot_be_unfused(tmp_path):
    result = CliRunner().invoke(main, ["export", "--precision", "fp16-cuda", "--no-fuse",
                                       "--output", str(tmp_path / "x")])
    assert result.exit_code != 0 and result.output.count("Error:") == 1 and "Traceback" not in result.output
    assert "fused graph for CUDA" in result.output and not (tmp_path / "x").exists()


def test_the_static_cache_keeps_its_addresses_and_the_growing_caches_tokens(tiny, tiny_variants):
    """The static decode path on the CPU provider: buffers preallocated at capacity, bound as past and present,
    never reallocated, and the same greedy tokens as the growing cache."""
    ids = np.array([prompt_ids(tiny.tokenizer, "What is the capital of Brazil?")])  # input_ids: [1, S]
    steps = 6
    with OrtDecoder(tiny_variants["fp16-cuda"]) as decoder:
        assert decoder.kv_dtype == np.float16
        tokens = {}
        for policy in ("growing", "static"):
            cache = decoder.empty_cache(1, capacity=ids.shape[1] + steps if policy == "static" else None)
            pointers = [v.data_ptr() for v in cache.values]
            mask, x, chosen = np.ones_like(ids), ids, []
            for _ in range(steps):
                out, cache = decoder.step(x, mask, position_ids_from_mask(mask, x.shape[1]), cache)
                x = out.logits.argmax(-1)[:, None]  # [1, 1]
                chosen.append(int(x[0, 0]))
                mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
                if policy == "static":
                    assert cache.in_place and [v.data_ptr() for v in cache.values] == pointers
            tokens[policy] = chosen
    assert tokens["static"] == tokens["growing"]
