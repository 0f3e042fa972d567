"""Which runner serves `--onnx DIR` or `--engine DIR`: ONNX Runtime or a TensorRT engine, behind one Decoder
protocol. It sits above both so neither runtime knows of the other."""

from __future__ import annotations

from pathlib import Path

from aira_opt.core.errors import AiraOptError
from aira_opt.runtime.decoder import Decoder
from aira_opt.runtime.ort import OrtDecoder
from aira_opt.tensorrt.engines import TrtDecoder


def chosen_folder(onnx_dir: Path | None, engine_dir: Path | None) -> tuple[Path, str]:
    """The folder of --onnx DIR or --engine DIR and which it is ("onnx" or "engine"); exactly one must be given."""
    if (onnx_dir is None) == (engine_dir is None):
        raise AiraOptError("give exactly one of --onnx DIR (ONNX Runtime) or --engine DIR (TensorRT engine folder)")
    return (Path(onnx_dir), "onnx") if onnx_dir is not None else (Path(engine_dir), "engine")


def open_decoder(onnx_dir: Path | None, engine_dir: Path | None, provider: str = "cpu",
                 threads: int | None = None) -> tuple[Path, Decoder]:
    """The folder and (not yet activated) decoder for --onnx DIR or --engine DIR; exactly one must be given."""
    folder, runtime = chosen_folder(onnx_dir, engine_dir)
    if runtime == "engine":
        return folder, TrtDecoder(folder)
    return folder, OrtDecoder(folder, provider=provider, threads=threads)
