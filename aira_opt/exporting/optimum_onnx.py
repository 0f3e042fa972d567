"""PyTorch -> ONNX through optimum's exporter (TorchScript tracing, `text-generation-with-past`), kept as
`--exporter optimum` for side-by-side comparison. It needs the `optimum` extra, which pins transformers 4.57."""

from __future__ import annotations

import warnings
from pathlib import Path

from aira_opt.core.errors import ValidationError
from aira_opt.source.models import LoadedModel


def export_graph(loaded: LoadedModel, folder: Path, opset: int) -> None:
    """Write `folder`/model.onnx (and model.onnx_data when large) with optimum's merged decoder."""
    from optimum.exporters.onnx import onnx_export_from_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings from transformers are expected and noisy
        onnx_export_from_model(
            loaded.model, folder, opset=opset, task="text-generation-with-past", do_validation=False,
            preprocessors=[loaded.tokenizer],
        )
    onnx_files = sorted(p.name for p in folder.glob("*.onnx"))
    if onnx_files != ["model.onnx"]:
        raise ValidationError([f"expected one merged model.onnx from optimum, got {onnx_files}"])
