"""The llama.cpp peer's files: a transformers checkpoint converted with llama.cpp's own converter
(convert_hf_to_gguf.py from the llama-cpp-python source distribution that benchmarks/build_llamacpp.sh keeps) to
f32, then quantized with llama.cpp's own quantizer (llama_model_quantize) to each type asked for.

    python benchmarks/make_gguf.py export/aira-2-1b1-random/ckpt export/aira-2-1b1-random/gguf

Writes OUT/model-<type>.gguf (f32, Q8_0, Q4_0, Q4_K_M by default), each through a temporary name. A tokenizer
whose BPE pre-tokenizer the converter does not know (the random presets' small one) gets llama.cpp's 'default'
pre-tokenizer, with a warning: such a file is for speed only, since `bench` feeds token ids, never text.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from aira_opt.source.models import cache_dir

QUANT_TYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
               "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
               "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K"}

# Run inside the converter's interpreter: an unknown BPE pre-tokenizer falls back to 'default' instead of failing.
CONVERT = """
import logging, runpy, sys
sys.path.insert(0, sys.argv[1])
import conversion.base as base
owner = next(c for c in vars(base).values() if isinstance(c, type) and 'get_vocab_base_pre' in vars(c))
known = owner.get_vocab_base_pre
def forced(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        logging.warning("unknown BPE pre-tokenizer: using llama.cpp's 'default' (a speed-only file)")
        return 'default'
owner.get_vocab_base_pre = forced
script = sys.argv[2]
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name='__main__')
"""


def converter_source() -> Path:
    """llama.cpp's source tree (vendored in llama-cpp-python's sdist) of the installed version, unpacked once."""
    import llama_cpp

    version = llama_cpp.__version__
    sdists = sorted((cache_dir() / "llama-cpp-python").glob(f"{version}-*/llama_cpp_python-{version}.tar.gz"))
    if not sdists:
        sys.exit(f"no llama-cpp-python {version} source distribution in {cache_dir() / 'llama-cpp-python'}; "
                 "run benchmarks/build_llamacpp.sh")
    root = sdists[0].parent / "src"
    tree = root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (tree / "convert_hf_to_gguf.py").is_file():
        with tarfile.open(sdists[0]) as archive:
            prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
            wanted = [m for m in archive.getmembers() if m.name.startswith(prefix) and (
                m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith(prefix + "conversion/")
                or m.name.startswith(prefix + "gguf-py/"))]
            archive.extractall(root, members=wanted, filter="data")
    return tree


def convert(checkpoint: Path, out: Path, outtype: str = "f32") -> None:
    tree = converter_source()
    tmp = out.with_name(out.name + ".tmp")
    try:
        subprocess.run([sys.executable, "-c", CONVERT, str(tree), str(tree / "convert_hf_to_gguf.py"),
                        str(checkpoint), "--outtype", outtype, "--outfile", str(tmp)], check=True)
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)


def quantize(source: Path, out: Path, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[kind])
    params.nthread = os.cpu_count() or 1
    tmp = out.with_name(out.name + ".tmp")
    try:
        if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            sys.exit(f"llama.cpp could not quantize {source} to {kind}")
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a transformers checkpoint (benchmarks/save_checkpoint.py)")
    parser.add_argument("output", type=Path)
    parser.add_argument("--types", default="f32,Q8_0,Q4_0,Q4_K_M",
                        help=f"the converted file's type and any of {', '.join(QUANT_TYPES)}, comma-separated")
    parser.add_argument("--convert-to", default="f32", choices=["f32", "f16", "bf16"],
                        help="the converter's output type, which the quantizer starts from (f16/bf16: half the "
                        "disk of f32; exact for a bf16 checkpoint)")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.types.split(",") if k.strip()]
    unknown = [k for k in kinds if k != args.convert_to and k not in QUANT_TYPES]
    if unknown:
        sys.exit(f"unknown GGUF type(s) {unknown}; choose from {args.convert_to}, {', '.join(QUANT_TYPES)}")
    args.output.mkdir(parents=True, exist_ok=True)
    converted = args.output / f"model-{args.convert_to}.gguf"
    if not converted.is_file():
        convert(args.checkpoint, converted, args.convert_to)
    for kind in kinds:
        target = args.output / f"model-{kind}.gguf"
        if kind != args.convert_to and not target.is_file():
            quantize(converted, target, kind)
        print(f"{target}  {target.stat().st_size / 1e6:.0f} MB")
