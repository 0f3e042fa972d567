"""The output head: the MatMul that turns the last hidden state into logits, quantized on its own terms.

With tied embeddings the exporter reads the head as Transpose(embedding), so no weight quantizer sees it and every
decode step reads it in fp32: on a small model with a large vocabulary that is most of the bytes a step reads.
`untie_head` gives the head its own [hidden, vocab] initializer (the embedding Gather keeps the original, so only
the vocabulary rows a prompt uses are ever read from it); the weight-only recipe then quantizes it with the bits
its settings name for the head, which may differ from the layers' (benchmarks/notes: quality against speed).
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

LOGITS = "logits"


def head_matmul(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The MatMul whose output is the graph's logits, or None (a graph that ends otherwise)."""
    return next((n for n in model.graph.node if n.op_type == "MatMul" and LOGITS in n.output), None)


def own_head(model: onnx.ModelProto) -> str | None:
    """The head's node name when its weight is an initializer of its own (an untied head), else None."""
    head = head_matmul(model)
    if head is None or head.input[1] not in {i.name for i in model.graph.initializer}:
        return None
    if not head.name:
        head.name = "lm_head_matmul"
    return head.name


def untie_head(model: onnx.ModelProto) -> str | None:
    """Give a head that reads Transpose(initializer) its own transposed initializer, in place. Returns the head's
    node name when its weight is an initializer now (untied here, or already untied), else None."""
    head = head_matmul(model)
    if head is None:
        return None
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    if head.input[1] not in inits:
        transpose = next((n for n in graph.node if n.op_type == "Transpose" and head.input[1] in n.output), None)
        if transpose is None or transpose.input[0] not in inits:
            return None
        perm = [a.ints for a in transpose.attribute if a.name == "perm"]
        if perm and list(perm[0]) != [1, 0]:
            return None
        weight = numpy_helper.to_array(inits[transpose.input[0]])  # [V, H]
        name = f"{transpose.input[0]}.head"
        graph.initializer.append(numpy_helper.from_array(weight.T.copy(), name))  # [H, V]
        del weight
        head.input[1] = name
        if not any(transpose.output[0] in n.input for n in graph.node):
            graph.node.remove(transpose)
    return own_head(model)
