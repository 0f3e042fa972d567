"""Reading what a graph computes in: tensor element types, fp32 islands, weight MatMuls and Q/DQ placement.
Used by the recipes and by the TensorRT pre-flight."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """elem_type of every named tensor (inputs, outputs, initializers, inferred intermediates)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=False)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def fp32_islands(model: onnx.ModelProto) -> dict[str, int]:
    """Compute op types whose outputs stay fp32 in a reduced-precision graph (Cast/Constant/shape ops left out)."""
    types = tensor_types(model)
    skip = {"Cast", "Constant", "Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Expand", "Transpose",
            "ConstantOfShape", "Slice", "Squeeze"}
    counts = Counter(n.op_type for n in model.graph.node
                     if n.op_type not in skip and any(types.get(o) == TensorProto.FLOAT for o in n.output))
    return dict(sorted(counts.items()))


def qdq_problems(model: onnx.ModelProto) -> list[str]:
    """Every Q/DQ that TensorRT's explicit quantization would not take as we intend: non-int8, non-zero zero
    point, or a DequantizeLinear feeding anything but MatMul/Gemm."""
    problems: list[str] = []
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        return ["no QuantizeLinear/DequantizeLinear nodes"]
    for node in qdq:
        if len(node.input) < 3 or node.input[2] not in inits:
            problems.append(f"{node.name}: no constant zero point")
            continue
        zp = onnx.numpy_helper.to_array(inits[node.input[2]])
        if zp.dtype != np.int8:
            problems.append(f"{node.name}: zero point is {zp.dtype}, TensorRT needs int8")
        if np.any(zp != 0):
            problems.append(f"{node.name}: zero point is not 0 (asymmetric)")
        if node.op_type == "DequantizeLinear":
            bad = [c.op_type for c in consumers.get(node.output[0], []) if c.op_type not in ("MatMul", "Gemm")]
            if bad:
                problems.append(f"{node.name}: feeds {sorted(set(bad))}, only MatMul/Gemm inputs are quantized")
    return problems


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of MatMul nodes whose second input is a weight (an initializer): the ones worth quantizing."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
