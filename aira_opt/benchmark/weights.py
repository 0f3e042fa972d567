"""Bytes an ONNX folder holds, and the weight bytes one decode step reads: what "% of bound" divides by."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from aira_opt.core.artifacts import folder_size_bytes


def onnx_weight_bytes(folder: Path) -> tuple[int, int]:
    """(bytes on disk of the ONNX files, weight bytes read per decode step).

    Per step every weight is read once for the whole batch, except lookup tables (the embedding): tensors only
    ever read as a Gather's table, one row per token. Found by use, not by name, so other builders' graphs
    (onnxruntime-genai's) are measured the same way.
    """
    model = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False)
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    other_uses = {i for n in model.graph.node for k, i in enumerate(n.input) if n.op_type != "Gather" or k > 0}
    read_per_step = 0
    for init in model.graph.initializer:
        if init.name in tables and init.name not in other_uses:
            continue
        n = int(np.prod(init.dims)) if init.dims else 1
        read_per_step += n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return folder_size_bytes(Path(folder)), read_per_step


def gguf_type(path: Path) -> str:
    """A GGUF file's quantization type as llama.cpp names it (f32, Q8_0, Q4_K_M), from its metadata."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(str(path)).fields.get("general.file_type")
    if field is None:
        return "?"
    name = LlamaFileType(int(field.parts[field.data[0]][0])).name  # MOSTLY_Q4_K_M, ALL_F32
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").replace("F32", "f32").replace("F16", "f16")


def gguf_weight_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the GGUF file, weight bytes read per decode step): every tensor but the token embedding table,
    unless the output layer shares it (tied embeddings have no output.weight)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    table = tensors.get("token_embd.weight", 0) if "output.weight" in tensors else 0
    return Path(path).stat().st_size, sum(tensors.values()) - table
