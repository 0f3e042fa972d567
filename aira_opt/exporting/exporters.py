"""The exporters that turn a loaded PyTorch model into our contract's ONNX graph, one record each, and the
tidying every exported graph gets. Precision recipes, validation and the manifest belong to
aira_opt.pipeline (export_plan, export_run).

`torch` (our torch.onnx dynamo exporter) is the default and works with transformers 4.57 and 5.x; `optimum`
(optimum-onnx's TorchScript exporter) needs the `optimum` extra. Both write the same names and dims.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from aira_opt.core.errors import MissingExtraError, OptionError
from aira_opt.exporting.onnx_files import TIED_TRANSPOSE, remove_model_files, save_model
from aira_opt.source.models import LoadedModel

OPSET = 18  # TensorRT 10+/11's ONNX parser supports it; optimum's default for Llama


@dataclass(frozen=True)
class Exporter:
    name: str                  # the `--exporter` value
    description: str           # what the manifest records
    module: str                # its module's export_graph(loaded, folder, opset) writes model.onnx (+ _data);
                               # imported on use, as both import torch
    needs: str | None = None   # the module it imports, when that comes from an extra
    extra: str | None = None   # the package extra that brings it
    streams: bool = False      # traces a streamed model (weights read from the checkpoint as written)

    def check_available(self) -> None:
        """One-line error, before any slow work, when this exporter's extra is not installed."""
        if self.needs is None:
            return
        try:  # imported, not only found: optimum-onnx 0.1.0 installed beside transformers 5 fails at import
            importlib.import_module(self.needs)
        except ImportError as exc:
            raise MissingExtraError(f"--exporter {self.name}", self.extra or self.name,
                                    f"{exc}; the extra installs optimum-onnx and moves transformers to 4.57") from None

    def export_graph(self, loaded: LoadedModel, folder: Path) -> Path:
        """Export `loaded.model` (in whatever dtype it is) into `folder`; returns the path of model.onnx.
        The pipeline has called check_available before any model work."""
        importlib.import_module(self.module).export_graph(loaded, folder, OPSET)
        if getattr(loaded.config, "tie_word_embeddings", False):
            tie_embeddings(folder / "model.onnx")
        return folder / "model.onnx"


EXPORTERS = {e.name: e for e in (
    Exporter("torch", "torch.onnx dynamo exporter (aira_opt.exporting.torch_onnx)", "aira_opt.exporting.torch_onnx",
             streams=True),
    Exporter("optimum", "optimum.exporters.onnx (text-generation-with-past)", "aira_opt.exporting.optimum_onnx",
             needs="optimum.exporters.onnx", extra="optimum"),
)}
DEFAULT_EXPORTER = "torch"


def exporter(name: str) -> Exporter:
    if name not in EXPORTERS:
        raise OptionError(f"unknown exporter '{name}'; choose one of {', '.join(EXPORTERS)}")
    return EXPORTERS[name]


def tied_head(model: onnx.ModelProto) -> tuple[str, onnx.NodeProto] | None:
    """(embedding table, lm_head MatMul) when the head reads a weight initializer of its own beside the table that
    input_ids index; None otherwise (no table, or a head that already reads the table through a Transpose). Needs
    the graph only, not the weights."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    table = next((n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                  and "input_ids" in n.input[1:]), None)
    producers = {o: n for n in graph.node for o in n.output}
    head = producers.get("logits")
    while head is not None and head.op_type != "MatMul" and head.input:  # past a Cast to the fp32 logits
        head = producers.get(head.input[0])
    if table is None or head is None or head.input[1] not in inits:
        return None
    return table, head


def tie_embeddings(path: Path) -> bool:
    """Keep one copy of a tied embedding table: an exporter may write lm_head as its own transposed copy of the
    embedding; read it from the table through a Transpose instead. Returns whether a copy was removed. The
    weights are read only when the graph has such a copy (torch.onnx's dynamo export of a large tied table
    already reads it through a Transpose)."""
    if tied_head(onnx.load(str(path), load_external_data=False)) is None:
        return False
    model = onnx.load(str(path))
    graph = model.graph
    table, head = tied_head(model)
    inits = {i.name: i for i in graph.initializer}
    weight = numpy_helper.to_array(inits[head.input[1]])
    if not np.array_equal(weight, numpy_helper.to_array(inits[table]).T):
        return False
    copy = head.input[1]
    graph.node.insert(0, helper.make_node("Transpose", [table], [f"{table}_transposed"], perm=[1, 0],
                                          name=TIED_TRANSPOSE))  # reads only an initializer
    head.input[1] = f"{table}_transposed"
    for k in reversed(range(len(graph.initializer))):  # in place: no copy of the other weights
        if graph.initializer[k].name == copy:
            del graph.initializer[k]
    remove_model_files(path)
    save_model(model, path)
    return True
