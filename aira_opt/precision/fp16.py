"""fp16 for TensorRT 11 (strongly typed) and ONNX Runtime CUDA: exported from the model in fp16, so
transformers' own fp32 islands survive (RMSNorm's reduction, rotary angles); softmax and logits are lifted to
fp32. Standard ops only."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from aira_opt.exporting.exporters import Exporter
from aira_opt.precision.graph import fp32_islands, tensor_types
from aira_opt.precision.recipe import RecipeInput, RecipeOutput
from aira_opt.source.models import LoadedModel


def softmax_in_fp32(model: onnx.ModelProto) -> int:
    """Wrap every fp16 Softmax in Cast(fp32) -> Softmax -> Cast(fp16); returns how many were wrapped."""
    types = tensor_types(model)
    nodes = list(model.graph.node)
    out: list[onnx.NodeProto] = []
    wrapped = 0
    for node in nodes:
        if node.op_type == "Softmax" and types.get(node.input[0]) == TensorProto.FLOAT16:
            up, down = f"{node.name}_in_fp32", f"{node.name}_out_fp32"
            out.append(helper.make_node("Cast", [node.input[0]], [up], to=TensorProto.FLOAT, name=f"{node.name}_up"))
            final = node.output[0]
            node.input[0], node.output[0] = up, down
            out.append(node)
            out.append(helper.make_node("Cast", [down], [final], to=TensorProto.FLOAT16, name=f"{node.name}_down"))
            wrapped += 1
        else:
            out.append(node)
    del model.graph.node[:]
    model.graph.node.extend(out)
    return wrapped


def logits_in_fp32(model: onnx.ModelProto) -> None:
    """Make the `logits` output fp32 with a final Cast, so every consumer reads fp32 logits."""
    inner = "logits_fp16"
    for node in model.graph.node:
        node.output[:] = [inner if o == "logits" else o for o in node.output]
    model.graph.node.append(helper.make_node("Cast", [inner], ["logits"], to=TensorProto.FLOAT, name="logits_to_fp32"))
    for out in model.graph.output:
        if out.name == "logits":
            out.type.tensor_type.elem_type = TensorProto.FLOAT


def export_fp16(loaded: LoadedModel, folder: Path, exporter: Exporter) -> dict[str, Any]:
    """Export the fp16 model into `folder` and lift softmax and logits to fp32; returns the quantization record."""
    half = copy.deepcopy(loaded.model).half()
    # Eager attention exports as plain fp16 MatMuls; torch's SDPA export upcasts attention to fp32 and
    # with it o_proj and the residual adds, which would leave large fp32 islands in a TensorRT graph.
    half.config._attn_implementation = "eager"
    exporter.export_graph(LoadedModel(loaded.name, loaded.source, loaded.kind, half, loaded.tokenizer), folder)
    del half
    path = folder / "model.onnx"
    # The edits touch nodes only: leave the weights where they are (model.onnx_data for models over 2 GB,
    # whose graph with weights inline could not even be serialized for shape inference).
    model = onnx.load(str(path), load_external_data=False)
    wrapped = softmax_in_fp32(model)
    logits_in_fp32(model)
    onnx.save_model(model, str(path))
    return {
        "method": "exported from the fp16 PyTorch model; softmax and logits lifted to fp32",
        "softmax_wrapped_in_fp32": wrapped,
        "attention": "eager (SDPA's export would run attention, o_proj and the residual stream in fp32)",
        "kv_cache_dtype": "float16",
    }


def fp16_recipe(job: RecipeInput) -> RecipeOutput:
    quantization = export_fp16(job.loaded, job.output.parent, job.exporter)
    model = onnx.load(str(job.output), load_external_data=False)
    return RecipeOutput(quantization=quantization, kept_fp32=fp32_islands(model))
