"""The peer's int8 recipe: optimum's ORTQuantizer, dynamic int8 with its AVX2 config, applied to our fp32 export.
This is what a user of optimum would run; `bench` times it under optimum's ORTModelForCausalLM (and our loop).

    python benchmarks/optimum_int8.py export/aira-2-1b1-random/fp32 export/aira-2-1b1-random/optimum-int8
    python benchmarks/optimum_int8.py --per-channel --config avx512_vnni FP32 OUT   # one scale per output channel
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig

from aira_opt.core.artifacts import read_manifest, write_manifest

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fp32_folder", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--config", choices=["avx2", "avx512", "avx512_vnni"], default="avx2",
                        help="optimum's AutoQuantizationConfig for the CPU [default: avx2, the common denominator]")
    parser.add_argument("--per-channel", action="store_true", help="one weight scale per output channel")
    args = parser.parse_args()
    config = getattr(AutoQuantizationConfig, args.config)(is_static=False, per_channel=args.per_channel)
    quantizer = ORTQuantizer.from_pretrained(args.fp32_folder, file_name="model.onnx")
    quantizer.quantize(save_dir=args.output, quantization_config=config)
    (args.output / "model_quantized.onnx").rename(args.output / "model.onnx")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "config.json"):
        if (args.fp32_folder / name).is_file():  # transformers 5 no longer writes special_tokens_map.json
            shutil.copy2(args.fp32_folder / name, args.output / name)
    source = read_manifest(args.fp32_folder)
    write_manifest(args.output, {"precision": "int8-dynamic", "source_model": source["source_model"],
                                 "quantization": {"method": f"optimum ORTQuantizer, AutoQuantizationConfig."
                                                  f"{args.config}(is_static=False, per_channel={args.per_channel})"},
                                 "contract": source.get("contract")})
    print(f"wrote {args.output}")
