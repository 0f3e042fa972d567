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
