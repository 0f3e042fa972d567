"""PyTorch -> ONNX with KV cache: one graph for prefill (past length 0) and decode, through optimum's exporter.

This module only produces `model.onnx` (and `model.onnx_data` for large models) in a folder; precision
recipes, validation and the manifest belong to aira_opt.precision.pipeline.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from aira_opt.core.errors import ValidationError
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
    return folder / "model.onnx"
