"""Which runner opens a folder: ONNX Runtime for an export folder, TensorRT for an engine folder. It sits above
both runtimes, so neither knows of the other."""

from __future__ import annotations

from pathlib import Path

from aira_opt.core.errors import AiraOptError
from aira_opt.folders import EngineFolder, ExportFolder, open_folder
from aira_opt.runtime.ort import OrtDecoder
from aira_opt.runtime.protocol import Decoder
from aira_opt.tensorrt.engines import TrtDecoder



def chosen_folder(onnx_dir: Path | None, engine_dir: Path | None) -> ExportFolder | EngineFolder:
    """The folder of --onnx DIR or --engine DIR; exactly one must be given."""
    if (onnx_dir is None) == (engine_dir is None):
        raise AiraOptError("give exactly one of --onnx DIR (ONNX Runtime) or --engine DIR (TensorRT engine folder)")
    return ExportFolder(onnx_dir) if onnx_dir is not None else EngineFolder(engine_dir)  # type: ignore[arg-type]


def open_runner(folder: Path | str | ExportFolder | EngineFolder, provider: str = "cpu",
                threads: int | None = None) -> Decoder:
    """The (not yet activated) runner for a folder: TensorRT for an engine folder, else ONNX Runtime with
    `provider` and `threads`."""
    opened = open_folder(folder)
    if isinstance(opened, EngineFolder):
        return TrtDecoder(opened)
    return OrtDecoder(opened, provider=provider, threads=threads)
