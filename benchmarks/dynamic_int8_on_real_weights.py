"""Dynamic int8 on a real model: is the kernel that wins int8 prefill on AVX2 (MatMulInteger, activations quantized
per tensor on every call) accurate enough? Each recipe is exported beside the folder of an int8 export (its support
files reused) and judged by the post-export sanity bar (min cosine vs PyTorch fp32); `--check` adds `check`'s
parity on the chat questions. benchmarks/README.md ("Kernel choice per machine") came from this.

    aira-opt export --model smollm2-135m && aira-opt export --model smollm2-135m --precision int8
    python benchmarks/dynamic_int8_on_real_weights.py --model smollm2-135m --fp32 export/smollm2-135m/fp32 \
        --int8 export/smollm2-135m/int8 [--check]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization import matmul_nbits_quantizer as nbits

from aira_opt.parity import load_questions, run_check
from aira_opt.core.contract import DecoderContract
from aira_opt.exporting.support import model_format
from aira_opt.precision.dynamic_int8 import quantize_dynamic_int8
from aira_opt.precision.fusing import fuse_and_pack
from aira_opt.precision.qdq import AiraCalibrationReader, calibration_sequences
from aira_opt.precision.smoothing import smooth, smooth_groups
from aira_opt.pipeline.validation import validate_graph
from aira_opt.precision.variants import VARIANTS
from aira_opt.runtime.ort import OrtDecoder
from aira_opt.source.models import load_model

# label -> (SmoothQuant alpha or None, MatMul name parts kept as MatMulNBits 8-bit, 7-bit weights)
RECIPES = {
    "dynamic int8, every MatMul (the kernels.py candidate)": (None, [], True),
    "dynamic int8, 8-bit weights (saturation risk without VNNI)": (None, [], False),
    "dynamic, down_proj as MatMulNBits": (None, ["down_proj"], True),
    "dynamic, down_proj and o_proj as MatMulNBits": (None, ["down_proj", "o_proj"], True),
    "SmoothQuant 0.65 + dynamic, down_proj as MatMulNBits": (0.65, ["down_proj"], True),
    "SmoothQuant 0.8 + dynamic, down_proj as MatMulNBits": (0.8, ["down_proj"], True),
}


def build(loaded, fp32: Path, out: Path, alpha: float | None, kept: list[str], seven_bits: bool) -> None:
    model = onnx.load(str(fp32 / "model.onnx"))
    if alpha is not None:
        reader = AiraCalibrationReader(calibration_sequences(loaded.tokenizer),
                                       DecoderContract.from_config(loaded.config))
        smooth(model, [g for g in smooth_groups(model) if not g.gated], reader, alpha=alpha)
    fuse_and_pack(model, loaded.config)
    inits = {i.name for i in model.graph.initializer}
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    keep = [n for n in matmuls if any(part in n for part in kept)]
    if keep:
        settings = dict(bits=8, block_size=32, is_symmetric=False, accuracy_level=4)
        quantizer = nbits.MatMulNBitsQuantizer(model, algo_config=nbits.DefaultWeightOnlyQuantConfig(**settings),
                                               nodes_to_exclude=[n for n in matmuls if n not in keep], **settings)
        quantizer.process()
        model = quantizer.model.model
    quantize_dynamic_int8(model, out / "model.onnx", reduce_range=seven_bits)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fp32", type=Path, required=True, help="an unfused fp32 export of the model")
    parser.add_argument("--int8", type=Path, required=True, help="an int8 export (its support files are reused)")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    loaded = load_model(args.model)
    fmt = model_format(loaded)
    print("| recipe | sanity min cosine (bar 0.98) | check top-1 (bar 0.95) | perplexity ratio (bar 1.05) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for label, (alpha, kept, seven_bits) in RECIPES.items():
            out = Path(scratch) / "recipe"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(args.int8, out, ignore=shutil.ignore_patterns("model.onnx*", "manifest.json"))
            build(loaded, args.fp32, out, alpha, kept, seven_bits)
            sanity = validate_graph(loaded, out, VARIANTS["int8"].tolerance)
            top1 = ratio = "-"
            if args.check:
                with OrtDecoder(out) as decoder:
                    report = run_check(loaded, decoder, "int8", load_questions(None, fmt), 32, fmt, quiet=True)
                top1 = f"{report.top1_agreement:.4f}"
                ratio = f"{report.perplexity_onnx / report.perplexity_torch:.3f}"
            print(f"| {label} | {sanity['min_cosine']:.4f} | {top1} | {ratio} |", flush=True)
