"""Saving an ONNX graph the way every export folder stores it: inline when small, `model.onnx_data` beside it
when the weights are large."""

from __future__ import annotations

from pathlib import Path

import onnx

# Weights above this go to model.onnx_data. Past protobuf's 2 GB limit it is required; well below it, it pays:
# ONNX Runtime memory-maps external data, which lowers peak RSS and load time (benchmarks/README.md).
EXTERNAL_DATA_THRESHOLD = 64 * 1024 * 1024
TIED_TRANSPOSE = "tied_lm_head_transpose"  # the node through which a tied head reads the embedding table


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save, with external data (`model.onnx_data`) when the weights are large (see EXTERNAL_DATA_THRESHOLD)."""
    size = sum(len(i.raw_data) for i in model.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def remove_model_files(path: Path) -> None:
    """Delete model.onnx and its data file: onnx appends to an existing data file, so a re-save starts clean."""
    for old in path.parent.glob(path.name + "*"):
        old.unlink()
