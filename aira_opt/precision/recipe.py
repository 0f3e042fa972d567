"""What a precision recipe receives and returns, and the simplest recipe: the fp32 graph as exported, fused on
request. Each variant's record (variants.py) names its recipe; the pipeline calls it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


from aira_opt.exporting.exporters import Exporter
from aira_opt.exporting.onnx_files import remove_model_files
from aira_opt.precision.streaming import keep_weights, rewrite_by_layer
from aira_opt.source.models import LoadedModel


@dataclass(frozen=True)
class WeightOnlySettings:
    """MatMulNBits settings for the CPU variants."""

    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int  # 4: int8 compute on the activations (fastest on x86), 0: fp32 compute
    head_bits: int | None = None  # the output head's own bits (head.py); None: kept in float
    algorithm: str = "rtn"  # one of ALGORITHMS: how onnxruntime's MatMulNBitsQuantizer picks each block's grid
    source_grid: bool = True  # weights already on a grid (a GGUF source) keep it exactly (source_grid.py)

    def describe(self) -> dict[str, Any]:
        return {"method": "MatMulNBits weight-only (onnxruntime contrib op)", **asdict(self)}

    def suffix(self, default: WeightOnlySettings) -> str:
        """What a folder name adds for each choice that differs from the variant's default ('-b128-head4')."""
        parts = [f"b{self.block_size}" if self.block_size != default.block_size else "",
                 f"head{self.head_bits or 'float'}" if self.head_bits != default.head_bits else "",
                 self.algorithm if self.algorithm != default.algorithm else "",
                 "regrid" if self.source_grid != default.source_grid else ""]
        return "".join(f"-{p}" for p in parts if p)

    @classmethod
    def from_record(cls, record: dict[str, Any], default: WeightOnlySettings) -> WeightOnlySettings:
        """The settings a manifest's `quantization` record names; fields it lacks (older exports) take the
        values those exports had. A record of another kind (dynamic int8) gives the default."""
        if "block_size" not in record:
            return default
        older = {"head_bits": None, "algorithm": "rtn", "source_grid": True}
        return cls(**{f.name: record.get(f.name, older.get(f.name, getattr(default, f.name))) for f in fields(cls)})


ALGORITHMS = {  # --algorithm: what onnxruntime's quantizer does per block
    "rtn": "round to nearest (DefaultWeightOnlyQuantConfig)",
    "hqq": "half-quadratic optimization of scale and zero point (HQQWeightOnlyQuantConfig; float zero points)",
    "gptq": "GPTQ: error-compensating rounding over calibration activations (GPTQWeightOnlyQuantConfig)",
}


@dataclass(frozen=True)
class Fp32Graph:
    """The fp32 graph a recipe starts from: exported on first use into a scratch folder, or an existing one."""

    path: Path  # model.onnx (its model.onnx_data, if any, beside it)
    owned: bool  # True: made for this export, so it may be moved instead of copied


@dataclass
class RecipeInput:
    loaded: LoadedModel
    output: Path  # the model.onnx to write, inside the export's temporary folder
    fp32_graph: Callable[[], Fp32Graph]  # exports (once) or reuses the fp32 graph
    fused: bool  # rewrite attention to ONNX Runtime's CPU contrib ops (fusing.py)
    exporter: Exporter  # what turns the PyTorch model into ONNX (recipes that export their own graph use it too)
    weight_only: WeightOnlySettings | None = None  # int8/int4: the MatMulNBits settings to use
    dynamic_int8: bool = False  # int8 as MatMulInteger with activations quantized per call (kernels.py chose it)


@dataclass
class RecipeOutput:
    """What the manifest records about the recipe."""

    quantization: dict[str, Any] | None = None
    fusion: dict[str, Any] | None = None  # what fusing.fuse_and_pack did; None when not fused
    kept_fp32: Any = field(default_factory=list)  # op types left in fp32 (fp16: counted; int8/int4: a phrase)


Recipe = Callable[[RecipeInput], RecipeOutput]


def as_exported(job: RecipeInput) -> RecipeOutput:
    """fp32: the exporter's graph unchanged, or fused and packed for ONNX Runtime's CPU provider."""
    source = job.fp32_graph()
    if not job.fused:
        for part in source.path.parent.glob(source.path.name + "*"):  # model.onnx and model.onnx_data
            target = job.output.parent / part.name.replace(source.path.name, job.output.name, 1)
            (shutil.move if source.owned else shutil.copy2)(str(part), str(target))
        return RecipeOutput()
    remove_model_files(job.output)
    _, fusion = rewrite_by_layer(source.path, job.output, keep_weights, job.loaded.config)
    return RecipeOutput(fusion=fusion)
