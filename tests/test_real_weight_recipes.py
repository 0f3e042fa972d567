"""The recipe parts that real weights needed (benchmarks/README.md, "Real weights"): a 4-bit or 8-bit source grid
kept exactly, the output head quantized on its own, and SmoothQuant before Q/DQ. Each is held to plain numpy on small graphs run in ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from aira_opt.precision.recipe import WeightOnlySettings
from aira_opt.precision.smoothing import smooth, smooth_groups
from aira_opt.precision.source_grid import on_grid, store_source_grids, store_symmetric_grids
from aira_opt.precision.weight_only import quantize_model

K, N, H = 64, 48, 96


def q4_1_weight(rng: np.random.Generator) -> np.ndarray:
    """What transformers makes of a Q4_1 GGUF tensor: per block of 32 along K, fp16 scale d and minimum m,
    W = m + d q with q in 0..15 (the block's min and max on q = 0 and 15, as the quantizer leaves them)."""
    q = rng.integers(0, 16, (K, N))
    q[0::32], q[1::32] = 0, 15
    d = rng.uniform(1e-3, 2e-2, (K // 32, N)).astype(np.float16).astype(np.float32)
    m = rng.normal(0, 0.1, (K // 32, N)).astype(np.float16).astype(np.float32)
    return (np.repeat(m, 32, 0) + np.repeat(d, 32, 0) * q).astype(np.float32)  # [K, N]


def run(model: onnx.ModelProto, **feeds: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, weight.shape[1]])],
        [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_q4_1_grid_is_found_and_random_weights_are_not():
    rng = np.random.default_rng(0)
    grid = on_grid(q4_1_weight(rng), 32)
    assert grid is not None and grid.q.max() == 15 and grid.scale.shape == grid.offset.shape == (K // 32, N)
    assert on_grid(rng.normal(size=(K, N)).astype(np.float32), 32) is None
    assert on_grid(q4_1_weight(rng)[:40], 32) is None  # K not a whole number of blocks
    broken = q4_1_weight(rng)
    broken[5, 7] = np.nan
    assert on_grid(broken, 32) is None


def test_a_source_grid_is_stored_exactly_in_matmulnbits_plus_offsets():
    rng = np.random.default_rng(1)
    weight = q4_1_weight(rng)
    model = matmul_model(weight)
    offsets = store_source_grids(model, accuracy_level=0)  # fp32 compute: the stored form itself is exact
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert offsets == ["proj_grid_offset_matmul"] and ops.count("MatMulNBits") == 1 and "W" not in {
        i.name for i in model.graph.initializer}
    x = rng.normal(size=(1, 5, K)).astype(np.float32)
    (y,) = run(model, x=x)
    assert np.abs(y - x @ weight).max() < 1e-4 * np.abs(x @ weight).max()
    assert store_source_grids(matmul_model(rng.normal(size=(K, N)).astype(np.float32)), 0) == []


def test_aira_tinys_int4_has_no_source_grid(tiny_variants):
    quantization = json.loads((tiny_variants["int4"] / "manifest.json").read_text())["quantization"]
    assert quantization["source_grid_nodes"] == 0 and quantization["quantized_nodes"] == 13


def llama_block(gamma: np.ndarray, wq: np.ndarray, wk: np.ndarray, w_up: np.ndarray, w_gate: np.ndarray,
                w_down: np.ndarray) -> onnx.ModelProto:
    """x * gamma -> q, k projections; and silu(h @ W_gate) * (h @ W_up) -> down: the two shapes smoothing folds."""
    nodes = [
        helper.make_node("Mul", ["gamma", "x"], ["normed"]),
        helper.make_node("MatMul", ["normed", "Wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["normed", "Wk"], ["k"], name="k_proj"),
        helper.make_node("Shape", ["normed"], ["shape"]),
        helper.make_node("MatMul", ["q", "W_gate"], ["gate"], name="gate_proj"),
        helper.make_node("MatMul", ["q", "W_up"], ["up"], name="up_proj"),
        helper.make_node("Sigmoid", ["gate"], ["sig"]),
        helper.make_node("Mul", ["gate", "sig"], ["act"]),
        helper.make_node("Mul", ["act", "up"], ["gated"]),
        helper.make_node("MatMul", ["gated", "W_down"], ["down"], name="down_proj"),
    ]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             ((gamma, "gamma"), (wq, "Wq"), (wk, "Wk"), (w_up, "W_up"), (w_gate, "W_gate"), (w_down, "W_down"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, K])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("k", "down")],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_smoothing_finds_norm_and_gated_inputs_and_keeps_fp32_outputs():
    rng = np.random.default_rng(2)
    model = llama_block(rng.uniform(0.5, 1.5, K), rng.normal(size=(K, N)), rng.normal(size=(K, N)),
                        rng.normal(size=(N, H)), rng.normal(size=(N, H)), rng.normal(size=(H, N)))
    groups = {g.activation: g for g in smooth_groups(model)}
    assert sorted(groups) == ["gated", "normed"]
    assert [m.name for m in groups["normed"].matmuls] == ["q_proj", "k_proj"] and groups["normed"].fold == "gamma"
    assert groups["gated"].gated and groups["gated"].fold == "W_up"
    x = rng.normal(size=(1, 7, K)).astype(np.float32)
    x[..., 3] *= 40  # an outlier channel, as real activations have
    before = run(model, x=x)
    record = smooth(model, [groups["normed"]], [{"x": x}], alpha=0.8)
    after = run(model, x=x)
    for b, a in zip(before, after, strict=True):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    gamma = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "gamma"))
    normed = x * gamma  # the smoothed activation: its outlier channel is no longer 40x the rest
    peaks = np.abs(normed).max(axis=(0, 1))
    assert peaks.max() / np.median(peaks) < 40 / 4
    assert record["smoothed_matmuls"] == 2 and record["alpha"] == 0.8


def test_int8_qdq_smooths_and_keeps_down_proj_fp32(tiny_variants):
    quantization = json.loads((tiny_variants["int8-qdq"] / "manifest.json").read_text())["quantization"]
    # the normed inputs of attention and MLP in 3 layers, and of the untied lm_head
    assert quantization["smoothing"]["smoothed_activations"] == 2 * 3 + 1
    assert len(quantization["kept_fp32_matmuls"]) == 3 and all("down_proj" in n
                                                                for n in quantization["kept_fp32_matmuls"])
    model = onnx.load(str(tiny_variants["int8-qdq"] / "model.onnx"))
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    down = [n for n in model.graph.node if n.name in quantization["kept_fp32_matmuls"]]
    assert down and not any(i in dequantized for n in down for i in n.input)


def q8_0_weight(rng: np.random.Generator) -> np.ndarray:
    """What transformers makes of a Q8_0 GGUF tensor: per block of 32 along K, W = d q with q in -127..127 and
    the block's largest magnitude on 127."""
    q = rng.integers(-127, 128, (K, N))
    q[0::32] = 127
    d = rng.uniform(1e-4, 1e-3, (K // 32, N)).astype(np.float16).astype(np.float32)
    return (np.repeat(d, 32, 0) * q).astype(np.float32)  # [K, N]


def test_a_q8_0_grid_is_stored_exactly_in_8_bit_matmulnbits():
    rng = np.random.default_rng(2)
    weight = q8_0_weight(rng)
    model = matmul_model(weight)
    assert store_symmetric_grids(model, accuracy_level=0) == ["proj"]
    onnx.checker.check_model(model)
    (node,) = model.graph.node
    assert node.op_type == "MatMulNBits" and {a.name: a.i for a in node.attribute}["bits"] == 8
    x = rng.normal(size=(1, 5, K)).astype(np.float32)
    (y,) = run(model, x=x)
    assert np.abs(y - x @ weight).max() < 1e-4 * np.abs(x @ weight).max()
    assert store_symmetric_grids(matmul_model(q4_1_weight(rng)), 0) == []  # an affine grid is not symmetric


def tied_head_model(embedding: np.ndarray) -> onnx.ModelProto:
    """ids -> Gather(E) -> MatMul(Transpose(E)) -> logits: a tied head as the exporter writes it."""
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"]),
             helper.make_node("Transpose", ["E"], ["E_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "E_t"], ["logits"], name="/lm_head/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, embedding.shape[0]])],
                              [numpy_helper.from_array(embedding, "E")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("head_bits", [8, 4, None])
def test_a_tied_head_is_quantized_at_its_own_bits_and_the_embedding_stays(head_bits):
    rng = np.random.default_rng(3)
    embedding = rng.normal(0, 0.05, (N * 4, K)).astype(np.float32)  # [V, H]
    ids = rng.integers(0, N * 4, (1, 7))
    (reference,) = run(tied_head_model(embedding), input_ids=ids)
    settings = WeightOnlySettings(bits=4, block_size=32, symmetric=True, accuracy_level=4, head_bits=head_bits)
    model, record, _ = quantize_model(tied_head_model(embedding), settings)
    onnx.checker.check_model(model)
    head = next(n for n in model.graph.node if "logits" in n.output)
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    assert gather.input[0] == "E"  # the embedding rows a prompt reads stay as they were
    if head_bits is None:
        assert head.op_type == "MatMul" and record["head"].startswith("float")
        assert [n.op_type for n in model.graph.node].count("Transpose") == 1  # still tied: one copy on disk
    else:
        assert head.op_type == "MatMulNBits" and {a.name: a.i for a in head.attribute}["bits"] == head_bits
        assert record["head"] == f"{head_bits}-bit" and "Transpose" not in [n.op_type for n in model.graph.node]
    (logits,) = run(model, input_ids=ids)
    cosine = (logits * reference).sum() / np.linalg.norm(logits) / np.linalg.norm(reference)
    assert cosine > {8: 0.999, 4: 0.98, None: 0.999999}[head_bits]


def test_an_untied_heads_float_choice_keeps_it_float():
    """--lm-head float on a model whose head has its own weight (Aira, TinyLlama): the layers are quantized, the
    head is left alone, also by the source-grid pass."""
    rng = np.random.default_rng(4)
    head = q8_0_weight(rng)  # on a grid: the grid pass must still leave it
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
         helper.make_node("MatMul", ["h", "H"], ["logits"], name="/lm_head/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, K])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, N])],
        [numpy_helper.from_array(rng.normal(0, 0.05, (K, K)).astype(np.float32), "W"),
         numpy_helper.from_array(head, "H")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    settings = WeightOnlySettings(bits=4, block_size=32, symmetric=True, accuracy_level=4, head_bits=None)
    quantized, record, _ = quantize_model(model, settings)
    ops = {n.name: n.op_type for n in quantized.graph.node}
    assert ops["/lm_head/MatMul"] == "MatMul" and "H" in {i.name for i in quantized.graph.initializer}
    assert list(ops.values()).count("MatMulNBits") == 1 and record["quantized_nodes"] == 1
    assert record["head"].startswith("float")
