"""Which runner serves `--onnx DIR` or `--engine DIR`: ONNX Runtime or a TensorRT engine, behind one Decoder
protocol. It sits above both so neither runtime knows of the other."""

from __future__ import annotations

from pathlib import Path

from aira_opt.core.errors import AiraOptError
from aira_opt.runtime.decoder import Decoder
from aira_opt.runtime.ort import OrtDecoder
from aira_opt.tensorrt.engines import TrtDecoder


def open_decoder(onnx_dir: Path | None, engine_dir: Path | None, provider: str = "cpu",
                 threads: int | None = None) -> tuple[Path, Decoder]:
    """The folder and (not yet activated) decoder for --onnx DIR or --engine DIR; exactly one must be given."""
    if (onnx_dir is None) == (engine_dir is None):
        raise AiraOptError("give exactly one of --onnx DIR (ONNX Runtime) or --engine DIR (TensorRT engine folder)")
    if engine_dir is not None:
        return Path(engine_dir), TrtDecoder(Path(engine_dir))
    return Path(onnx_dir), OrtDecoder(Path(onnx_dir), provider=provider, threads=threads)
