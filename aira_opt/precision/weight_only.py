"""int8 / int4 for CPUs: ONNX Runtime's MatMulNBits (a contrib op), weight-only and block-wise, with attention
fused to GroupQueryAttention first (fusing.py) unless the export asks for standard attention; or, for int8 where
it measured faster (kernels.py), dynamic int8 (dynamic_int8.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from aira_opt.exporting.onnx_files import save_model
from aira_opt.precision.dynamic_int8 import dynamic_int8
from aira_opt.precision.fusing import fuse_and_pack
from aira_opt.precision.graph import weight_matmuls
from aira_opt.precision.recipe import RecipeInput, RecipeOutput, WeightOnlySettings
from aira_opt.precision.source_grid import store_source_grids


def quantize_model(model: onnx.ModelProto, settings: WeightOnlySettings, fuse_config: Any | None = None
                   ) -> tuple[onnx.ModelProto, dict[str, Any], dict[str, Any] | None]:
    """MatMulNBits over every weight MatMul; with a config, attention is fused and projections packed first
    (the quantizer leaves the fused nodes alone and quantizes the packed weights like any other). At 4 bits,
    weights already on a 4-bit grid keep it exactly (source_grid.py) instead of being rounded a second time.
    Returns the quantized model, the quantization record and the fusion record (None when not fused)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    fusion = fuse_and_pack(model, fuse_config) if fuse_config is not None else None
    quantizable = len(weight_matmuls(model))
    kept_grid = store_source_grids(model, settings.accuracy_level) if settings.bits == 4 else []
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=settings.block_size, is_symmetric=settings.symmetric,
                                                accuracy_level=settings.accuracy_level, bits=settings.bits)
    quantizer = nbits.MatMulNBitsQuantizer(model, bits=settings.bits, block_size=settings.block_size,
                                           is_symmetric=settings.symmetric, accuracy_level=settings.accuracy_level,
                                           algo_config=config, nodes_to_exclude=kept_grid)
    quantizer.process()
    quantization = {**settings.describe(), "quantized_nodes": quantizable, "source_grid_nodes": len(kept_grid)}
    return quantizer.model.model, quantization, fusion


def quantize_weight_only(fp32_path: Path, out_path: Path, settings: WeightOnlySettings,
                         fuse_config: Any | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """quantize_model from file to file; returns the quantization and fusion records."""
    model, quantization, fusion = quantize_model(onnx.load(str(fp32_path)), settings, fuse_config)
    save_model(model, out_path)
    return quantization, fusion


def weight_only_recipe(job: RecipeInput) -> RecipeOutput:
    """MatMulNBits with the job's settings, or dynamic int8 where the kernel choice (kernels.py) says so."""
    assert job.weight_only is not None, "a weight-only variant always has its settings"
    source = job.fp32_graph()
    fuse_config = job.loaded.config if job.fused else None
    if job.dynamic_int8:
        quantization, fusion = dynamic_int8(onnx.load(str(source.path)), job.output, fuse_config)
    else:
        quantization, fusion = quantize_weight_only(source.path, job.output, job.weight_only, fuse_config)
    return RecipeOutput(quantization=quantization, fusion=fusion, kept_fp32="all non-MatMul compute")
