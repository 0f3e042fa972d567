"""Weight-only recipes on a real model: post-export sanity (min cosine vs PyTorch over the validation cases),
decode speed of our loop and, with --check, `check`'s parity on the chat questions. The "Real weights" section of
benchmarks/README.md came from these measurements.

    aira-opt export --model smollm2-135m
    python benchmarks/recipes_on_real_weights.py --model smollm2-135m --fp32 export/smollm2-135m/fp32 [--check]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import matmul_nbits_quantizer as nbits

from aira_opt.parity import load_questions, run_check
from aira_opt.pipeline.validation import validate_graph
from aira_opt.exporting.onnx_files import save_model
from aira_opt.exporting.support import model_format
from aira_opt.generation.generator import GenerateOptions, generate
from aira_opt.precision.fusing import fuse_and_pack
from aira_opt.precision.recipe import WeightOnlySettings
from aira_opt.precision.variants import Tolerance
from aira_opt.precision.weight_only import quantize_weight_only
from aira_opt.runtime.ort import OrtDecoder
from aira_opt.source.models import load_model

# label -> (bits, block size, symmetric, accuracy level, algorithm); "ours" is the export's own recipe
# (quantize_weight_only: weights on a 4-bit source grid keep it), "rtn" rounds every weight again.
RECIPES = {
    "int4 sym b32 acc4 (default: source grid kept)": (4, 32, True, 4, "ours"),
    "int4 sym b32 acc0, source grid kept": (4, 32, True, 0, "ours"),
    "int4 sym b32 acc4, requantized": (4, 32, True, 4, "rtn"),
    "int4 asym b32 acc4, requantized": (4, 32, False, 4, "rtn"),
    "int4 sym b16 acc4, requantized": (4, 16, True, 4, "rtn"),
    "int4 HQQ b32": (4, 32, False, 4, "hqq"),
    "int8 sym b32 acc4": (8, 32, True, 4, "rtn"),
    "int8 asym b32 acc4 (default)": (8, 32, False, 4, "ours"),
}


def quantize(fp32: Path, out: Path, config, recipe) -> None:
    bits, block, symmetric, accuracy, algorithm = recipe
    if algorithm == "ours":
        quantize_weight_only(fp32, out / "model.onnx", WeightOnlySettings(bits, block, symmetric, accuracy), config)
        return
    model = onnx.load(str(fp32))
    fuse_and_pack(model, config)
    algo = (nbits.HQQWeightOnlyQuantConfig(block_size=block, bits=bits) if algorithm == "hqq" else
            nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, accuracy_level=accuracy,
                                               bits=bits))
    quantizer = nbits.MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=symmetric,
                                           accuracy_level=accuracy, algo_config=algo)
    quantizer.process()
    save_model(quantizer.model.model, out / "model.onnx")


def decode_speed(folder: Path, stop: int, pad: int, threads: int) -> float:
    prompt = [list(np.random.default_rng(0).integers(100, 1000, 64))]  # [1, 64]
    options = GenerateOptions(max_new_tokens=48, ignore_eos=True)
    with OrtDecoder(folder, threads=threads) as decoder:
        return max(generate(decoder, prompt, options, stop, pad).decode_tokens_per_s for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fp32", type=Path, required=True, help="an fp32 export of --model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="also run `check`'s parity (minutes per recipe)")
    parser.add_argument("--only", help="run only the recipes whose label contains this text")
    args = parser.parse_args()
    loaded = load_model(args.model)
    fmt = model_format(loaded)
    print("| recipe | min cosine (sanity) | decode tokens/s | check |\n|---|---|---|---|")
    for label, recipe in RECIPES.items():
        if args.only and args.only not in label:
            continue
        out = Path(tempfile.mkdtemp(prefix="recipe-"))
        try:
            quantize(args.fp32 / "model.onnx", out, loaded.config, recipe)
            report = validate_graph(loaded, out, Tolerance())
            speed = decode_speed(out, fmt.stop_ids[0], fmt.pad_id, args.threads)
            verdict = "-"
            if args.check:
                with OrtDecoder(out, threads=args.threads) as decoder:
                    result = run_check(loaded, decoder, f"int{recipe[0]}", load_questions(None, fmt), 32, fmt,
                                       quiet=True)
                verdict = (f"top-1 {result.top1_agreement:.4f}, perplexity x"
                           f"{result.perplexity_onnx / result.perplexity_torch:.3f}, "
                           f"{'PASSED' if result.passed else 'FAILED'}")
            print(f"| {label} | {report['min_cosine']:.4f} | {speed:.1f} | {verdict} |", flush=True)
        finally:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
