"""SmoothQuant for the int8 Q/DQ graph: move activation outliers into the weights before static quantization.

Real LLM activations carry a few channels far larger than the rest; one static per-tensor int8 scale then
leaves every other channel a handful of levels. For a MatMul `x @ W`, dividing channel j of x by s_j and
multiplying row j of W by s_j changes nothing in fp32, and with s_j = max|x_j|^alpha / max|W_j|^(1-alpha) both
sides become easy to quantize (Xiao et al., SmoothQuant, 2023). The division is folded into what produces x,
so the graph gains no node: where x = RMSNorm(h) * gamma (feeding q/k/v or gate/up), gamma_j /= s_j.

The gated product act(gate) * up feeding down_proj is found too, but not smoothed: on real weights its outliers
survive any migration strength we measured, so the Q/DQ recipe keeps down_proj unquantized
(benchmarks/README.md, "int8-qdq on real weights"). The attention output feeding o_proj is quantized as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from aira_opt.core.threads import session_threads

ALPHA = 0.65  # migration strength; benchmarks/README.md ("int8-qdq on real weights") measures others


@dataclass
class SmoothGroup:
    """One activation and what may absorb its scale: the weight MatMuls reading it and the folding initializer."""

    activation: str  # the tensor x, [B, S, K]
    matmuls: list[onnx.NodeProto]  # x @ W for each (W an initializer [K, N])
    fold: str  # an initializer: gamma [K] (a norm) or W_up [H, K] (a gated product, along its columns)
    gated: bool  # x = act(gate) * up, the input of down_proj


def smooth_groups(model: onnx.ModelProto) -> list[SmoothGroup]:
    """The activations that can be smoothed without a new node: a norm's gamma product, or act(gate) * up."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    groups: dict[str, SmoothGroup] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[0] in groups:
            continue
        x = node.input[0]
        mul = producers.get(x)
        if mul is None or mul.op_type != "Mul":
            continue
        matmuls = [r for r in readers[x] if r.op_type == "MatMul" and r.input[0] == x and r.input[1] in inits]
        if any(r.op_type not in ("MatMul", "Shape") for r in readers[x]):
            continue  # x is read by compute we could not rescale
        k = numpy_helper.to_array(inits[node.input[1]]).shape[0]
        fold = _foldable(mul, inits, producers, readers, k)
        if fold is not None:
            groups[x] = SmoothGroup(x, matmuls, *fold)
    return list(groups.values())


def _foldable(mul: onnx.NodeProto, inits: dict, producers: dict, readers: dict, k: int) -> tuple[str, bool] | None:
    for side in mul.input:
        if len(readers.get(side, [])) != 1:
            continue  # shared: rescaling it would change another reader
        if side in inits and list(inits[side].dims) == [k]:
            return side, False  # RMSNorm's gamma
        up = producers.get(side)
        if up is not None and up.op_type == "MatMul" and up.input[1] in inits and inits[up.input[1]].dims[-1] == k:
            if len(readers.get(up.input[1], [])) == 1:
                return up.input[1], True  # W_up [H, K]: its output channel j is x's channel j
    return None


def activation_maxima(model: onnx.ModelProto, names: list[str], feeds: Iterable[dict[str, np.ndarray]]
                      ) -> dict[str, np.ndarray]:
    """max |x_j| per channel of each named activation over the calibration feeds (fp32, CPU)."""
    import onnxruntime as ort  # the calibration run; only the Q/DQ recipe needs it

    # The probed tensors become outputs only for the serialization: no copy of the weights is kept meanwhile.
    outputs = len(model.graph.output)
    model.graph.output.extend([onnx.helper.make_empty_tensor_value_info(n) for n in names])
    serialized = model.SerializeToString()
    del model.graph.output[outputs:]
    options = session_threads(ort.SessionOptions())
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the named tensors
    session = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    del serialized
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:
        values = session.run(names, feed)
        for name, value in zip(names, values, strict=True):
            peak = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)  # [K]
            maxima[name] = np.maximum(maxima[name], peak) if name in maxima else peak
    return maxima


def smooth(model: onnx.ModelProto, groups: list[SmoothGroup], feeds: Iterable[dict[str, np.ndarray]],
           alpha: float = ALPHA) -> dict:
    """Fold SmoothQuant scales for these groups into the fp32 graph in place; returns what the manifest records."""
    inits = {i.name: i for i in model.graph.initializer}
    maxima = activation_maxima(model, [g.activation for g in groups], feeds)
    for group in groups:
        weights = [numpy_helper.to_array(inits[m.input[1]]) for m in group.matmuls]  # each [K, N]
        weight_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)  # [K]
        scale = (np.maximum(maxima[group.activation], 1e-5) ** alpha
                 / np.maximum(weight_peak, 1e-5) ** (1 - alpha)).astype(np.float32)  # [K]
        for matmul, weight in zip(group.matmuls, weights, strict=True):
            inits[matmul.input[1]].CopyFrom(numpy_helper.from_array(weight * scale[:, None], matmul.input[1]))
        fold = numpy_helper.to_array(inits[group.fold])
        inits[group.fold].CopyFrom(numpy_helper.from_array((fold / scale).astype(fold.dtype), group.fold))
    return {"method": "SmoothQuant (scales folded into the producers of the MatMul inputs)", "alpha": alpha,
            "smoothed_activations": len(groups),
            "smoothed_matmuls": sum(len(g.matmuls) for g in groups)}
