"""PyTorch -> ONNX with KV cache: one graph for prefill (past length 0) and decode, through optimum's exporter.

This module only produces `model.onnx` (and `model.onnx_data` for large models) in a folder; precision
recipes, validation and the manifest belong to aira_opt.precision.pipeline.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from aira_opt.core.errors import ValidationError
from aira_opt.export.onnx_files import remove_model_files, save_model
from aira_opt.spec.models import LoadedModel

OPSET = 18  # optimum's default for Llama; TensorRT 10+/11's ONNX parser supports it
EXPORTER = "optimum.exporters.onnx (text-generation-with-past)"


def export_graph(loaded: LoadedModel, folder: Path) -> Path:
    """Export `loaded.model` (in whatever dtype it is) into `folder`; returns the path of model.onnx."""
    from optimum.exporters.onnx import onnx_export_from_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings from transformers are expected and noisy
        onnx_export_from_model(
            loaded.model, folder, opset=OPSET, task="text-generation-with-past", do_validation=False,
            preprocessors=[loaded.tokenizer],
        )
    onnx_files = sorted(p.name for p in folder.glob("*.onnx"))
    if onnx_files != ["model.onnx"]:
        raise ValidationError([f"expected one merged model.onnx from optimum, got {onnx_files}"])
    if getattr(loaded.config, "tie_word_embeddings", False):
        tie_embeddings(folder / "model.onnx")
    return folder / "model.onnx"


def tie_embeddings(path: Path) -> bool:
    """Keep one copy of a tied embedding table: the exporter writes lm_head as its own transposed copy of the
    embedding; read it from the table through a Transpose instead. Returns whether a copy was removed."""
    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    table = next((n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                  and "input_ids" in n.input[1:]), None)
    producers = {o: n for n in graph.node for o in n.output}
    head = producers.get("logits")
    while head is not None and head.op_type != "MatMul" and head.input:  # past a Cast to the fp32 logits
        head = producers.get(head.input[0])
    if table is None or head is None or head.input[1] not in inits:
        return False
    weight = numpy_helper.to_array(inits[head.input[1]])
    if not np.array_equal(weight, numpy_helper.to_array(inits[table]).T):
        return False
    copy = head.input[1]
    graph.node.insert(0, helper.make_node("Transpose", [table], [f"{table}_transposed"], perm=[1, 0],
                                          name="tied_lm_head_transpose"))  # reads only an initializer
    head.input[1] = f"{table}_transposed"
    for k in reversed(range(len(graph.initializer))):  # in place: no copy of the other weights
        if graph.initializer[k].name == copy:
            del graph.initializer[k]
    remove_model_files(path)
    save_model(model, path)
    return True
