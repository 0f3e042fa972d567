"""int8-qdq on real weights: SmoothQuant migration strength and which MatMuls stay fp32, judged by the post-export
sanity bar (min cosine vs PyTorch fp32 over the validation cases). The "int8-qdq on real weights" table of
benchmarks/README.md came from this script.

    aira-opt export --model smollm2-135m
    python benchmarks/qdq_smoothing_sweep.py --model smollm2-135m --fp32 export/smollm2-135m/fp32
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from aira_opt.core.contract import DecoderContract
from aira_opt.exporting.onnx_files import save_model
from aira_opt.exporting.support import model_format
from aira_opt.precision.graph import weight_matmuls
from aira_opt.precision.qdq import AiraCalibrationReader, calibration_sequences
from aira_opt.precision.smoothing import smooth, smooth_groups
from aira_opt.pipeline.validation import validate_graph
from aira_opt.precision.variants import Tolerance
from aira_opt.source.models import load_model

# (alpha or None for no smoothing, smooth the down_proj input too, MatMul name parts kept fp32)
SETTINGS = [
    (None, False, ()), (0.5, True, ()), (0.8, True, ()),
    (0.5, False, ("down_proj",)), (0.7, False, ("down_proj",)), (0.8, False, ("down_proj",)),
    (0.85, False, ("down_proj",)),
    (0.8, False, ("gate_proj", "up_proj", "down_proj", "o_proj")),  # attention inputs only
    (0.8, True, ("q_proj", "k_proj", "v_proj", "o_proj")),  # MLP only
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fp32", type=Path, required=True, help="an fp32 export of --model")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    loaded = load_model(args.model)
    contract = DecoderContract.from_config(loaded.config)
    sequences = calibration_sequences(loaded.tokenizer, model_format(loaded))
    print("| SmoothQuant alpha | down_proj input smoothed | kept fp32 | min cosine (bar 0.95) |\n|---|---|---|---|")
    for alpha, smooth_down, kept in SETTINGS:
        out = Path(tempfile.mkdtemp(prefix="qdq-"))
        try:
            model = onnx.load(str(args.fp32 / "model.onnx"))
            if alpha is not None:
                groups = [g for g in smooth_groups(model) if smooth_down or not g.gated]
                smooth(model, groups, AiraCalibrationReader(sequences, contract), alpha)
            save_model(model, out / "smoothed.onnx")
            nodes = [n for n in weight_matmuls(model) if not any(part in n for part in kept)]
            del model
            quantize_static(
                str(out / "smoothed.onnx"), str(out / "model.onnx"), AiraCalibrationReader(sequences, contract),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "DedicatedQDQPair": True,
                               "OpTypesToExcludeOutputQuantization": ["MatMul"]})
            report = validate_graph(loaded, out, Tolerance())
            print(f"| {alpha if alpha is not None else 'none'} | {'yes' if smooth_down and alpha else 'no'} | "
                  f"{', '.join(kept) or '-'} | {report['min_cosine']:.4f} |", flush=True)
        finally:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
