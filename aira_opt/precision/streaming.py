"""A weight recipe over a graph whose weights stay on disk: the fp32 graph is read without its weights, and each
layer's weights are loaded, packed and quantized, then written to the output's data file before the next layer's
are read. Peak memory is one layer (or the largest tensor, an embedding or head), whatever the model's size; the
graph and the bytes are those the whole-graph recipe makes (tests/test_streaming.py)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, set_external_data, uses_external_data

from aira_opt.exporting.onnx_files import EXTERNAL_DATA_THRESHOLD, remove_model_files, save_model
from aira_opt.precision.fusing import fuse_attention, fuse_residual_norms, pack_projections
from aira_opt.precision.graph import weight_matmuls
from aira_opt.precision.head import head_matmul

ChunkStep = Callable[[onnx.ModelProto, set[str]], tuple[onnx.ModelProto, dict[str, Any]]]
LAYER = re.compile(r"/layers/(\d+)/")  # a node's decoder layer, from the module path in its name
SMALL = 1 << 20  # initializers below this are loaded up front: the constants graph rewrites read
INLINE = 1024  # what stays inside model.onnx, as onnx.save_model's size_threshold keeps it
ALIGN = 4096  # each tensor starts on a page, so ONNX Runtime can map it
COPY_BLOCK = 64 << 20  # bytes per read when a tensor is copied through unchanged


class DeferredWeights:
    """A graph (model.onnx) with its large initializers left in their data file until `load` asks for them."""

    def __init__(self, source: Path):
        self.base = source.parent
        self.model = onnx.load(str(source), load_external_data=False)
        self.load({t.name for t in self.model.graph.initializer if _external_length(t) < SMALL})

    def load(self, names: set[str]) -> None:
        for tensor in self.model.graph.initializer:
            if tensor.name in names and uses_external_data(tensor):
                load_external_data_for_tensor(tensor, str(self.base))
                tensor.data_location = TensorProto.DEFAULT
                del tensor.external_data[:]


class DataWriter:
    """Appends tensors to one external data file and points each tensor at its bytes."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0
        self.written: set[str] = set()
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close(); the caller's folder cleans up on error)

    def _append(self, tensor: TensorProto, chunks: Iterator[bytes], length: int) -> None:
        pad = -self.offset % ALIGN
        self.file.write(b"\0" * pad)
        self.offset += pad
        start = self.offset
        for chunk in chunks:
            self.file.write(chunk)
        self.offset += length
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            tensor.ClearField(field)
        tensor.raw_data = b"\0"  # set_external_data wants the field present
        del tensor.external_data[:]
        set_external_data(tensor, self.path.name, offset=start, length=length)
        tensor.data_location = TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        self.written.add(tensor.name)

    def offload(self, model: onnx.ModelProto, keep: set[str]) -> None:
        """Every initializer in memory above INLINE bytes goes to the file, but those in `keep` (weights a later
        chunk transforms)."""
        for tensor in model.graph.initializer:
            if uses_external_data(tensor) or tensor.name in keep:
                continue
            data = tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
            if len(data) > INLINE:
                self._append(tensor, iter([data]), len(data))

    def copy_through(self, model: onnx.ModelProto, base: Path) -> None:
        """Initializers still in the source's data file (never transformed) are copied across, a block at a time."""
        for tensor in model.graph.initializer:
            if uses_external_data(tensor) and tensor.name not in self.written:
                info = {e.key: e.value for e in tensor.external_data}
                offset, length = int(info.get("offset", 0)), int(info["length"])
                self._append(tensor, _read(base / info["location"], offset, length), length)

    def close(self) -> None:
        self.file.close()


def _read(path: Path, offset: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0:
            block = f.read(min(COPY_BLOCK, length))
            length -= len(block)
            yield block


def _external_length(tensor: TensorProto) -> int:
    if not uses_external_data(tensor):
        return 0
    return int({e.key: e.value for e in tensor.external_data}.get("length", 1 << 62))


def layer_of(node_name: str) -> int | None:
    found = LAYER.search(node_name)
    return int(found.group(1)) if found else None


def layer_chunks(model: onnx.ModelProto) -> dict[int | None, list[str]]:
    """The weight MatMuls by decoder layer, in order; the ones outside any layer (the head) last, under None."""
    chunks: dict[int | None, list[str]] = {}
    for name in weight_matmuls(model):
        chunks.setdefault(layer_of(name), []).append(name)
    head = head_matmul(model)
    if head is not None and layer_of(head.name) is None and head.name not in chunks.get(None, []):
        chunks.setdefault(None, []).append(head.name)  # a tied head reads Transpose(embedding) until untied
    order = sorted(k for k in chunks if k is not None) + ([None] if None in chunks else [])
    return {k: chunks[k] for k in order}


def weights_of(model: onnx.ModelProto, nodes: list[str]) -> set[str]:
    """The initializers the MatMuls read, directly or through one Transpose (a tied head reads the embedding)."""
    inits = {t.name for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    wanted = set()
    for node in (n for n in model.graph.node if n.name in nodes):
        weight = node.input[1]
        if weight not in inits and weight in producers and producers[weight].op_type == "Transpose":
            weight = producers[weight].input[0]
        if weight in inits:
            wanted.add(weight)
    return wanted


def rewrite_by_layer(fp32_path: Path, out_path: Path, quantize_chunk: ChunkStep, fuse_config: Any | None = None
                     ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Run a recipe chunk by chunk from fp32_path (model.onnx with its data) to out_path: attention fused first
    (graph only), then per layer: load its weights, pack them, `quantize_chunk(model, scope)` (returns the model
    and the chunk's record; `keep_weights` for a fused fp32 graph), write them out. Returns the chunks' records
    and the fusion record."""
    deferred = DeferredWeights(fp32_path)
    model = deferred.model
    fusion = None
    if fuse_config is not None:
        fusion = fuse_attention(model, fuse_config)
        fusion["fused_residual_norms"] = fuse_residual_norms(model)
        fusion["packed_matmul_groups"] = 0
    writer = DataWriter(out_path.parent / (out_path.name + "_data"))
    records, added = [], 0
    try:
        chunks = layer_chunks(model)
        later = {layer: weights_of(model, [n for k, c in chunks.items() for n in c if _after(k, layer)])
                 for layer in chunks}
        for layer, chunk in chunks.items():
            deferred.load(weights_of(model, chunk))
            if fusion is not None:
                fusion["packed_matmul_groups"] += pack_projections(model, only=set(chunk))
            head = head_matmul(model)
            scope = {n for n in weight_matmuls(model) if layer_of(n) == layer}  # packed ones renamed in place
            if head is not None and head.name in chunk:
                scope.add(head.name)
            before = len(model.graph.node)
            model, record = quantize_chunk(model, scope)
            added += len(model.graph.node) - before  # the fusion record counts the graph before quantization
            records.append(record)
            writer.offload(model, keep=later[layer])
            model = deferred.model = _fresh(model)
        if fusion is not None:
            fusion["nodes_after"] = len(model.graph.node) - added
        writer.copy_through(model, deferred.base)
    finally:
        writer.close()
    onnx.save_model(model, str(out_path))
    if writer.offset <= EXTERNAL_DATA_THRESHOLD:  # small: one file, as every export this small is stored
        whole = onnx.load(str(out_path))
        remove_model_files(out_path)
        save_model(whole, out_path)
    return records, fusion


def _fresh(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph in a new message. Python's protobuf (upb) keeps a message's bytes in an arena that is freed
    only with the whole message: weights removed or offloaded from it would stay resident until the end. With
    the chunk's weights written out, the graph alone is small to copy."""
    fresh = onnx.ModelProto()
    fresh.ParseFromString(model.SerializeToString())
    return fresh


def _after(layer: int | None, than: int | None) -> bool:
    """Whether chunk `layer` comes after chunk `than` (the head's chunk, None, comes last)."""
    return than is not None and (layer is None or layer > than)


def keep_weights(model: onnx.ModelProto, scope: set[str]) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The chunk step of a recipe that only fuses and packs."""
    return model, {}
