"""int8 / int4 for CPUs: ONNX Runtime's MatMulNBits (a contrib op), weight-only and block-wise, with attention
fused to GroupQueryAttention first (fusing.py) unless the export asks for standard attention; or, for int8 where
it measured faster (kernels.py), dynamic int8 (dynamic_int8.py)."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import onnx

from aira_opt.core.contract import DecoderContract
from aira_opt.core.errors import AiraOptError
from aira_opt.exporting.onnx_files import save_model
from aira_opt.exporting.support import model_format
from aira_opt.precision.dynamic_int8 import dynamic_int8
from aira_opt.precision.fusing import fuse_and_pack
from aira_opt.precision.graph import weight_matmuls
from aira_opt.precision.head import head_matmul, own_head, untie_head
from aira_opt.precision.qdq import AiraCalibrationReader, calibration_record, calibration_sequences
from aira_opt.precision.recipe import RecipeInput, RecipeOutput, WeightOnlySettings
from aira_opt.precision.source_grid import GRID_BLOCK, store_source_grids, store_symmetric_grids
from aira_opt.precision.streaming import rewrite_by_layer


def quantize_model(model: onnx.ModelProto, settings: WeightOnlySettings, fuse_config: Any | None = None,
                   calibration: Any | None = None, scope: AbstractSet[str] | None = None
                   ) -> tuple[onnx.ModelProto, dict[str, Any], dict[str, Any] | None]:
    """MatMulNBits over every weight MatMul; with a config, attention is fused and projections packed first
    (the quantizer leaves the fused nodes alone and quantizes the packed weights like any other). At 4 bits,
    weights already on a 4-bit grid keep it exactly (source_grid.py) instead of being rounded a second time.
    calibration: a CalibrationDataReader (GPTQ only). scope: the MatMuls to quantize now (a streamed export's
    chunk, streaming.py), None for all. Returns the quantized model, the quantization record and the fusion
    record (None when not fused)."""
    fusion = fuse_and_pack(model, fuse_config) if fuse_config is not None else None
    head_node = head_matmul(model)
    head_here = head_node is not None and (scope is None or head_node.name in scope)
    head = untie_head(model) if settings.head_bits is not None and head_here else None
    untied = own_head(model) if head_here else None
    float_head = [untied] if settings.head_bits is None and untied else []  # an untied head kept float
    if float_head and settings.algorithm == "gptq":
        raise AiraOptError("--algorithm gptq quantizes every weight MatMul, the head included: use --lm-head int8 "
                           "or int4 with it")
    elsewhere = [m for m in weight_matmuls(model) if scope is not None and m not in scope]
    quantizable = len(weight_matmuls(model)) - len(elsewhere) - len(float_head)
    exact: list[str] = []
    if head is not None and settings.head_bits != settings.bits:
        model, exact = _head_apart(model, head, settings)
    grids = settings.source_grid and settings.algorithm != "gptq"  # GPTQ would round the grids' offsets too
    layers_exact, offsets = (_source_grids(model, settings.bits, settings.accuracy_level, only=scope,
                                           skip=set(float_head)) if grids else ([], []))
    model = nbits_quantize(model, settings.bits, settings, exclude=offsets + float_head + elsewhere,
                           calibration=calibration)
    grid_nodes = len(exact) + len(layers_exact)
    quantization = {**settings.describe(), "quantized_nodes": quantizable, "source_grid_nodes": grid_nodes,
                    **({"source_grid_block_size": GRID_BLOCK} if grid_nodes else {}),  # whatever block was asked
                    "head": f"{settings.head_bits}-bit" if head is not None else "float (not quantized)"}
    return model, quantization, fusion


def _head_apart(model: onnx.ModelProto, head: str, settings: WeightOnlySettings) -> tuple[onnx.ModelProto, list[str]]:
    """The head first, at its own bits (on its source grid when it lies on one), so the layers' pass never sees
    a MatMul for it. Returns the model and the head's name when it was stored on its grid."""
    assert settings.head_bits is not None, "a head apart has its own bits"
    exact = (_source_grids(model, settings.head_bits, settings.accuracy_level, only={head})[0]
             if settings.source_grid else [])
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name != head]
    return nbits_quantize(model, settings.head_bits, settings, exclude=others), exact


def _source_grids(model: onnx.ModelProto, bits: int, accuracy_level: int, only: AbstractSet[str] | None = None,
                  skip: AbstractSet[str] = frozenset()) -> tuple[list[str], list[str]]:
    """Weights already on a grid of `bits` stored exactly (source_grid.py): the MatMuls stored so, and the offset
    MatMuls added (the quantizer must leave them alone)."""
    if bits == 8:
        return store_symmetric_grids(model, accuracy_level, only=only, skip=skip), []
    offsets = store_source_grids(model, accuracy_level, only=only, skip=skip)
    return [o.removesuffix("_grid_offset_matmul") for o in offsets], offsets


def nbits_quantize(model: onnx.ModelProto, bits: int, settings: WeightOnlySettings, exclude: list[str],
                   calibration: Any | None = None) -> onnx.ModelProto:
    """onnxruntime's MatMulNBitsQuantizer over every weight MatMul not excluded; the settings' algorithm where it
    applies (HQQ and GPTQ are 4-bit; an 8-bit head is rounded to nearest)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    algorithm = settings.algorithm if bits == 4 else "rtn"
    if algorithm == "hqq":
        config = nbits.HQQWeightOnlyQuantConfig(block_size=settings.block_size, bits=bits)
    elif algorithm == "gptq":
        config = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=calibration, block_size=settings.block_size)
    else:
        config = nbits.DefaultWeightOnlyQuantConfig(block_size=settings.block_size, is_symmetric=settings.symmetric,
                                                    accuracy_level=settings.accuracy_level, bits=bits)
    quantizer = nbits.MatMulNBitsQuantizer(model, bits=bits, block_size=settings.block_size,
                                           is_symmetric=settings.symmetric, accuracy_level=settings.accuracy_level,
                                           algo_config=config, nodes_to_exclude=exclude)
    quantizer.process()
    return quantizer.model.model


def quantize_weight_only(fp32_path: Path, out_path: Path, settings: WeightOnlySettings,
                         fuse_config: Any | None = None, calibration: Any | None = None
                         ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """quantize_model from file to file, a layer at a time (streaming.py) unless GPTQ's calibration needs the
    whole graph; returns the quantization and fusion records."""
    if calibration is not None:
        model, quantization, fusion = quantize_model(onnx.load(str(fp32_path)), settings, fuse_config, calibration)
        save_model(model, out_path)
        return quantization, fusion

    def chunk(model: onnx.ModelProto, scope: AbstractSet[str]) -> tuple[onnx.ModelProto, dict[str, Any]]:
        model, record, _ = quantize_model(model, settings, scope=scope)
        return model, record

    records, fusion = rewrite_by_layer(fp32_path, out_path, chunk, fuse_config)
    grid_nodes = sum(r["source_grid_nodes"] for r in records)
    quantization = {**records[-1], "quantized_nodes": sum(r["quantized_nodes"] for r in records),
                    "source_grid_nodes": grid_nodes, **({"source_grid_block_size": GRID_BLOCK} if grid_nodes else {})}
    return quantization, fusion


def weight_only_recipe(job: RecipeInput) -> RecipeOutput:
    """MatMulNBits with the job's settings, or dynamic int8 where the kernel choice (kernels.py) says so. GPTQ
    calibrates on the prompt-format calibration set (qdq.py), recorded in the manifest."""
    assert job.weight_only is not None, "a weight-only variant always has its settings"
    source = job.fp32_graph()
    fuse_config = job.loaded.config if job.fused else None
    if job.dynamic_int8:
        quantization, fusion = dynamic_int8(onnx.load(str(source.path)), job.output, fuse_config)
        return RecipeOutput(quantization=quantization, fusion=fusion, kept_fp32="all non-MatMul compute")
    calibration, calibrated = None, {}
    if job.weight_only.algorithm == "gptq":
        sequences = calibration_sequences(job.loaded.tokenizer, model_format(job.loaded))
        calibration = AiraCalibrationReader(sequences, DecoderContract.from_config(job.loaded.config))
        calibrated = {"calibration": calibration_record(sequences)}
    quantization, fusion = quantize_weight_only(source.path, job.output, job.weight_only, fuse_config, calibration)
    return RecipeOutput(quantization={**quantization, **calibrated}, fusion=fusion,
                        kept_fp32="all non-MatMul compute" + ("" if job.weight_only.head_bits else " and the head"))
