"""An export run as consecutive pieces of its graph, one ONNX Runtime session at a time, so that running it needs
the memory of one piece's weights, not the whole model's: how validation runs a standard-op export whose weights
are larger than a budget (an fp32 or fp16 export of a big model).

Every node runs once per step, in the export's own order, with the export's own weights; only ONNX Runtime's
graph optimizations stop at a piece's edges. The steps' inputs never depend on their outputs (validation draws
its next tokens from a seeded generator), so each piece runs every step before the next piece opens: a piece's
session is opened once, and what crosses into the next piece (the residual stream, masks, the logits) is kept,
a few MB per step.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from onnx.external_data_helper import uses_external_data

from aira_opt.folders import ExportFolder
from aira_opt.precision.graph import tensor_types
from aira_opt.runtime.providers import session_options

PIECE_BYTES = 1 << 30  # the weights one piece may hold; an export under this runs whole


@dataclass(frozen=True)
class Step:
    """One forward pass of a validation case: the contract's inputs, and which cache (case) it continues."""

    case: int
    input_ids: np.ndarray  # [B, S]
    attention_mask: np.ndarray  # [B, past + S]
    position_ids: np.ndarray  # [B, S]


def weight_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of each initializer, read from its external data record or its inline bytes."""
    sizes = {}
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            sizes[tensor.name] = int({e.key: e.value for e in tensor.external_data}.get("length", 0))
        else:
            sizes[tensor.name] = len(tensor.raw_data)
    return sizes


def sink_weight_nodes(model: onnx.ModelProto) -> None:
    """Move each node that reads only weights (a tied head's Transpose of the embedding table) to just before its
    first reader, in place: left where it is, its output would cross every piece between, held for every step."""
    inits = {t.name for t in model.graph.initializer}
    nodes = list(model.graph.node)
    weight_only = {id(n) for n in nodes if n.input and all(i in inits for i in n.input if i)}
    pending = {o: n for n in nodes if id(n) in weight_only for o in n.output}
    ordered = []
    for node in nodes:
        if id(node) in weight_only:
            continue
        for name in node.input:
            if name in pending:
                ordered.append(pending.pop(name))
        ordered.append(node)
    ordered += [n for n in dict.fromkeys(pending.values())]  # read by nothing: keep them
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def split(model: onnx.ModelProto, budget: int) -> list[tuple[int, int]]:
    """Consecutive node ranges [start, end) whose weights (counted where first used) stay within the budget; a
    node whose own weights exceed it is a piece alone. A node that reads only weights stays with the node after
    it (sink_weight_nodes puts it there): its output, often as large as its input, never crosses pieces."""
    sizes = weight_bytes(model)
    nodes = model.graph.node
    seen: set[str] = set()
    pieces, start, held = [], 0, 0
    for index, node in enumerate(nodes):
        new = [i for i in node.input if i in sizes and i not in seen]
        cost = sum(sizes[i] for i in new)
        cut = index
        while cut > start and all(i in sizes for i in nodes[cut - 1].input if i):  # keep weight-only nodes
            cut -= 1
        if held and held + cost > budget and cut > start:
            pieces.append((start, cut))
            start, seen = cut, set()
            new = [i for n in nodes[cut:index + 1] for i in n.input if i in sizes]
            cost, held = sum(sizes[i] for i in set(new)), 0
        seen.update(new)
        held += cost
    pieces.append((start, len(nodes)))
    return pieces


def piece_models(model: onnx.ModelProto, ranges: Sequence[tuple[int, int]]) -> list[onnx.ModelProto]:
    """Each node range as a model of its own: its inputs are what it reads from the graph's inputs or from earlier
    pieces; its outputs what later pieces read and the graph's own outputs it makes. Weights stay external."""
    graph = model.graph
    types = tensor_types(model)
    inits = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    consumers: dict[str, int] = {}  # a tensor -> the last node index that reads it
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers[name] = index
    models = []
    for start, end in ranges:
        nodes = graph.node[start:end]
        made = {o for n in nodes for o in n.output if o}
        needed = [i for n in nodes for i in n.input if i and i not in made and i not in inits]
        outputs = [o for o in made if o in graph_outputs or consumers.get(o, -1) >= end]
        used = {i for n in nodes for i in n.input if i in inits}
        piece = helper.make_graph(
            list(nodes), f"piece_{start}",
            [helper.make_tensor_value_info(name, types[name], None) for name in dict.fromkeys(needed)],
            [helper.make_tensor_value_info(name, types[name], None) for name in sorted(outputs)],
            [inits[name] for name in inits if name in used])
        models.append(helper.make_model(piece, opset_imports=model.opset_import, ir_version=model.ir_version))
    return models


def shape_only(piece: onnx.ModelProto, names: list[str]) -> None:
    """Refuse a cut where a piece reads the values (not only the shape) of a cache whose layer is in another
    piece: piece by piece, that cache does not exist yet."""
    for node in piece.graph.node:
        read = [n for n in node.input if n in names]
        if read and node.op_type != "Shape":
            raise ValueError(f"{node.name} ({node.op_type}) reads {read[0]} outside its layer's piece")


def run_in_pieces(folder: ExportFolder, steps: Sequence[Step], budget: int = PIECE_BYTES,
                  threads: int | None = None) -> list[np.ndarray]:
    """The logits [B, S, V] of every step, the export run piece by piece (each piece's session opened once)."""
    model = onnx.load(str(folder.model_path), load_external_data=False)
    sink_weight_nodes(model)
    contract = folder.contract
    kv_dtype = helper.tensor_dtype_to_np_dtype(
        next(i for i in model.graph.input if i.name.startswith("past_key_values.")).type.tensor_type.elem_type)
    if kv_dtype == np.float16:
        budget //= 2  # ONNX Runtime's CPU kernels compute fp16 weights in fp32: each is held twice over
    ranges = split(model, budget)
    pieces = piece_models(model, ranges)
    del model
    data = folder.model_path.with_name(folder.model_path.name + "_data")
    values: list[dict[str, np.ndarray]] = [
        {"input_ids": s.input_ids, "attention_mask": s.attention_mask, "position_ids": s.position_ids}
        for s in steps]
    with tempfile.TemporaryDirectory(prefix=".pieces-", dir=folder.path) as scratch:
        if data.is_file():
            os.link(data, Path(scratch) / data.name)  # the pieces' weights point at the export's own file
        for number, piece in enumerate(pieces):
            path = Path(scratch) / f"piece_{number}.onnx"
            onnx.save_model(piece, str(path))
            session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
            inputs = [i.name for i in session.get_inputs()]
            outputs = [o.name for o in session.get_outputs()]
            own = {"past_key_values." + o.removeprefix("present.") for o in outputs if o.startswith("present.")}
            shape_only(piece, [i for i in inputs if i.startswith("past_key_values.") and i not in own])
            caches: dict[int, dict[str, np.ndarray]] = {}  # case -> the past of this piece's layers
            for step, feed in zip(steps, values, strict=True):
                cache = caches.setdefault(step.case, {})
                past = step.attention_mask.shape[1] - step.input_ids.shape[1]
                # a past this piece only measures (its layer's cache is another piece's): zeros of its shape
                stand_in = np.zeros((step.input_ids.shape[0], contract.num_kv_heads, past, contract.head_dim),
                                    kv_dtype)  # [B, kv, past, D]
                feeds = {}
                for name in inputs:
                    if name.startswith("past_key_values."):
                        feeds[name] = cache[name] if name in cache else stand_in
                    else:
                        feeds[name] = feed[name]
                for name, value in zip(outputs, session.run(outputs, feeds), strict=True):
                    if name.startswith("present."):
                        cache["past_key_values." + name.removeprefix("present.")] = value
                    else:
                        feed[name] = value
            del session
            path.unlink()
    return [feed["logits"] for feed in values]


