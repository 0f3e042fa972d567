"""int8 as dynamic quantization: int8 weights per output channel, activations quantized to uint8 on every call
(DynamicQuantizeLinear -> MatMulInteger, which ONNX Runtime fuses into its integer GEMM kernels). Standard ops, so
any ONNX runtime runs it. On CPUs without an int8 dot product (AVX2 without VNNI) ONNX Runtime's u8 x s8 kernels
add pairs of products in 16 bits, so the weights keep 7 bits there (reduce_range) and never saturate."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx

from aira_opt.core.cpu import has_int8_dot
from aira_opt.exporting.onnx_files import remove_model_files, save_model
from aira_opt.precision.fusing import fuse_and_pack
from aira_opt.precision.graph import weight_matmuls


def quantize_dynamic_int8(model: onnx.ModelProto, out_path: Path, reduce_range: bool | None = None
                          ) -> dict[str, Any]:
    """Quantize every weight MatMul of `model` (in memory) into `out_path`; returns the quantization record.
    reduce_range None: 7-bit weights where this CPU lacks an int8 dot product."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    seven_bits = (not has_int8_dot()) if reduce_range is None else reduce_range
    quantizable = len(weight_matmuls(model))
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".dynamic-") as scratch:
        source, quantized = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
        save_model(model, source)
        del model
        quantize_dynamic(source, quantized, per_channel=True, reduce_range=seven_bits, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True,
                                        "DefaultTensorType": onnx.TensorProto.FLOAT})  # contrib ops: no inference
        remove_model_files(out_path)
        save_model(onnx.load(str(quantized)), out_path)
    return {"method": "dynamic int8 (DynamicQuantizeLinear + MatMulInteger, onnxruntime.quantization)",
            "bits": 8, "weights": "int8, symmetric, one scale per output channel",
            "weight_range": "7-bit (no int8 dot product on the exporting CPU)" if seven_bits else "8-bit",
            "activations": "uint8, one scale per tensor, computed on every call", "quantized_nodes": quantizable}


def dynamic_int8(model: onnx.ModelProto, out_path: Path, fuse_config: Any | None = None
                 ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Fuse attention first (with a config), then quantize; returns the quantization and fusion records."""
    fusion = fuse_and_pack(model, fuse_config) if fuse_config is not None else None
    return quantize_dynamic_int8(model, out_path), fusion
