"""int8 Q/DQ for TensorRT 11's explicit quantization: symmetric QuantizeLinear/DequantizeLinear on the inputs of
the weight MatMuls only, per-channel weight scales, activation scales calibrated on prompts in the model's own
format, after SmoothQuant has moved the activations' outlier channels into the weights (smoothing.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from aira_opt.core.contract import DecoderContract, empty_past
from aira_opt.core.errors import AiraOptError
from aira_opt.exporting.onnx_files import remove_model_files, save_model
from aira_opt.exporting.support import model_format
from aira_opt.precision.graph import qdq_problems, weight_matmuls
from aira_opt.precision.recipe import RecipeInput, RecipeOutput
from aira_opt.precision.smoothing import smooth, smooth_groups
from aira_opt.source.corpus import calibration_questions, training_pairs
from aira_opt.source.prompts import PromptFormat, conversation_ids, detect_format, prompt_ids


def calibration_sequences(tokenizer: Any, fmt: PromptFormat | None = None) -> list[list[int]]:
    """Token sequences for activation calibration, in the model's own prompt format: whole turns and bare
    prompts (never the held-out texts)."""
    fmt = fmt or detect_format(tokenizer)
    answers = dict(training_pairs())
    return [conversation_ids(tokenizer, q, answers[q], fmt) if q in answers else prompt_ids(tokenizer, q, fmt)
            for q in calibration_questions()]


def calibration_hash(sequences: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(sequences).encode()).hexdigest()


def calibration_record(sequences: list[list[int]]) -> dict[str, Any]:
    """What the manifest says about calibration text (never the evaluation corpus)."""
    return {"source": "aira_opt.corpus.calibration_questions()", "sequences": len(sequences),
            "tokens": sum(map(len, sequences)), "sha256": calibration_hash(sequences)}


class AiraCalibrationReader:
    """Feeds calibration prompts as prefill steps (past length 0), one at a time."""

    def __init__(self, sequences: list[list[int]], contract: DecoderContract):
        self.sequences, self.contract, self.index = sequences, contract, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.sequences):
            return None
        ids = np.array([self.sequences[self.index]], dtype=np.int64)  # [1, T]
        self.index += 1
        past = empty_past(self.contract, 1, np.float32)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None], **past}

    def rewind(self) -> None:
        self.index = 0

    def __iter__(self):
        self.rewind()
        return iter(self.get_next, None)


def quantize_qdq(fp32_path: Path, out_path: Path, tokenizer: Any, contract: DecoderContract,
                 fmt: PromptFormat | None = None) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(fp32_path))
    groups = smooth_groups(model)
    kept = sorted(m.name for g in groups if g.gated for m in g.matmuls)  # down_proj: fp32 (see smoothing.py)
    nodes = [n for n in weight_matmuls(model) if n not in kept]
    sequences = calibration_sequences(tokenizer, fmt)
    smoothing = smooth(model, [g for g in groups if not g.gated], AiraCalibrationReader(sequences, contract))
    smoothed = out_path.with_name("smoothed-fp32.onnx")  # inside the export's temporary folder
    save_model(model, smoothed)
    del model
    quantize_static(
        str(smoothed), str(out_path), AiraCalibrationReader(sequences, contract), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=smoothed.with_name(smoothed.name + "_data").exists(),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "DedicatedQDQPair": True,
                       "OpTypesToExcludeOutputQuantization": ["MatMul"]},
    )
    remove_model_files(smoothed)
    stray = out_path.with_name(out_path.name + ".data")
    if stray.exists():  # onnxruntime names it model.onnx.data; our folders use model.onnx_data
        save_model(onnx.load(str(out_path)), out_path)
        stray.unlink()
    return {
        "method": "static QDQ (onnxruntime.quantization.quantize_static)", "format": "QuantizeLinear/DequantizeLinear",
        "weights": "int8, symmetric, per output channel", "activations": "int8, symmetric, per tensor, MinMax",
        "quantized_nodes": len(nodes), "op_types": ["MatMul"], "smoothing": smoothing, "kept_fp32_matmuls": kept,
        "calibration": calibration_record(sequences),
    }


def qdq_recipe(job: RecipeInput) -> RecipeOutput:
    source = job.fp32_graph()
    contract = DecoderContract.from_config(job.loaded.config)
    quantization = quantize_qdq(source.path, job.output, job.loaded.tokenizer, contract, model_format(job.loaded))
    problems = qdq_problems(onnx.load(str(job.output), load_external_data=False))
    if problems:
        raise AiraOptError(f"int8-qdq placement: {'; '.join(problems[:5])}")
    return RecipeOutput(quantization=quantization,
                        kept_fp32="all non-MatMul compute and the down_proj MatMuls (their inputs' outliers)")
