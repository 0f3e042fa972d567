"""fp16 and int4 graphs for ONNX Runtime's CUDA provider: the fused graph (GroupQueryAttention with rotary,
packed projections, SkipSimplifiedLayerNormalization, see fusing.py) in fp16, the form onnxruntime-genai decodes
fast on GPUs. CUDA's GroupQueryAttention is fp16/bf16 only, so fusion and fp16 go together here; the standard-op
fp16 and int8-qdq graphs stay TensorRT's.

The fp32 graph is fused, then converted by onnxruntime's own fp16 converter; logits are cast back to fp32 so
every consumer reads fp32 logits, and the KV cache is fp16. int4-cuda quantizes the fused fp32 graph first
(MatMulNBits, a source's 4-bit grid kept, weight_only.py) and converts after, so MatMulNBits runs with fp16
activations and scales. ONNX Runtime's CPU provider has fp16 kernels for these ops: `check` runs on a CPU too.
"""

from __future__ import annotations

import gc
from pathlib import Path

import onnx

from aira_opt.core.errors import OptionError
from aira_opt.exporting.onnx_files import remove_model_files, save_model
from aira_opt.precision.fp16 import logits_in_fp32
from aira_opt.precision.fusing import fuse_and_pack
from aira_opt.precision.recipe import RecipeInput, RecipeOutput
from aira_opt.precision.weight_only import quantize_model

RUNTIME = "ONNX Runtime CUDA provider (com.microsoft contrib ops, fp16; CPU kernels exist too)"


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp32 -> fp16 everywhere (weights, activations, KV inputs and outputs), logits back to fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16  # onnxruntime's converter

    half = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    logits_in_fp32(half)
    return half


def _fused_only(job: RecipeInput, name: str) -> None:
    if not job.fused:
        raise OptionError(f"{name} is the fused graph for CUDA; --precision fp16 is the standard-op fp16 one")


def _save_fp16(model: onnx.ModelProto, output: Path) -> None:
    half = to_fp16(model)
    del model
    remove_model_files(output)
    save_model(half, output)


def fp16_cuda_recipe(job: RecipeInput) -> RecipeOutput:
    _fused_only(job, "fp16-cuda")
    source = job.fp32_graph()
    gc.collect()
    model = onnx.load(str(source.path))
    fusion = fuse_and_pack(model, job.loaded.config)
    _save_fp16(model, job.output)
    return RecipeOutput(quantization={"method": "onnxruntime.transformers.float16 on the fused graph",
                                      "kv_cache": "float16", "logits": "float32"},
                        fusion={**fusion, "runtime": RUNTIME}, kept_fp32="logits only")


def int4_cuda_recipe(job: RecipeInput) -> RecipeOutput:
    _fused_only(job, "int4-cuda")
    assert job.weight_only is not None, "a weight-only variant always has its settings"
    source = job.fp32_graph()
    model, quantization, fusion = quantize_model(onnx.load(str(source.path)), job.weight_only, job.loaded.config)
    assert fusion is not None, "fused above: a config was given"
    _save_fp16(model, job.output)
    return RecipeOutput(quantization={**quantization, "activations": "float16", "kv_cache": "float16"},
                        fusion={**fusion, "runtime": RUNTIME}, kept_fp32="logits only")
