"""Which bench jobs to run: backends x models, and the reasons for the ones that cannot run here."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from aira_opt.bench import BACKENDS, Job
from aira_opt.errors import AiraOptError


@dataclass
class BenchPlan:
    jobs: list[Job]
    vocab: int  # token ids are drawn below this (the tokenizer's size)
    eos: int
    pad: int
    skipped: list[dict[str, str]] = field(default_factory=list)


def _precision(folder: Path) -> str:
    """The manifest's variant name: precision plus what differs from its defaults ('int4-b128', 'fp32-fused')."""
    from aira_opt.artifacts import graph_is_fused, read_manifest
    from aira_opt.precision import variant_name

    manifest = read_manifest(folder)
    precision = str(manifest.get("precision", "fp32"))
    quantization = manifest.get("quantization") or {}
    block = quantization.get("block_size") if isinstance(quantization, dict) else None
    return variant_name(precision, block, graph_is_fused(manifest))


def _trt_missing() -> str:
    """Why the trt backend cannot run here, or '' when it can."""
    from aira_opt.engines import import_tensorrt, require_gpu
    from aira_opt.errors import TensorRTUnavailableError

    try:
        import_tensorrt()
        require_gpu()
    except TensorRTUnavailableError as exc:
        return exc.message
    return ""


def _genai_precision(folder: Path) -> str:
    """fp32/int4 from the folder name the build script gives (genai-int4), else what its ops say."""
    name = Path(folder).name.lower()
    for precision in ("int4", "int8", "fp16", "fp32"):
        if precision in name:
            return precision
    return "genai"


def _engine_precision(folder: Path) -> str:
    import json

    return str(json.loads((Path(folder) / "model.json").read_text()).get("precision", "?"))


def plan_jobs(model_spec: str, num_layers: int | None, onnx_dirs: list[Path], engines: list[Path],
              genai_dirs: list[Path], backends: list[str], provider: str = "cpu") -> BenchPlan:
    from transformers import AutoTokenizer

    from aira_opt.specs import PRESETS, bundled_model_dir, load_model, model_name

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise AiraOptError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    if not onnx_dirs and ({"ort", "optimum"} & set(backends)):
        default = Path("export") / model_name(model_spec, num_layers) / "fp32"
        if not (default / "model.onnx").is_file():
            raise AiraOptError(f"no --onnx given and {default} does not exist; run "
                               f"`aira-opt export --model {model_spec}` first or pass --onnx")
        onnx_dirs = [default]
    if model_spec in PRESETS or model_spec == "aira-tiny":
        tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    elif onnx_dirs:
        tokenizer = AutoTokenizer.from_pretrained(str(onnx_dirs[0]))
    else:
        tokenizer = load_model(model_spec).tokenizer
    jobs: list[Job] = []
    skipped: list[dict[str, str]] = []
    if "torch" in backends:
        import torch

        torch_precision = "fp16" if torch.cuda.is_available() else "fp32"  # what users run on each device
        jobs.append(Job("torch", f"torch {torch_precision}", torch_precision, model_spec, model_spec, num_layers))
    where = "" if provider == "cpu" else f" ({provider})"
    for folder in onnx_dirs:
        precision = _precision(folder)
        if "ort" in backends:
            jobs.append(Job("ort", f"ort {precision}{where}", precision, str(folder), provider=provider))
        if "optimum" in backends:
            jobs.append(Job("optimum", f"optimum {precision}{where}", precision, str(folder), provider=provider))
    if "genai" in backends:
        if not genai_dirs:
            skipped.append({"backend": "genai", "reason": "no --genai folder (build one with "
                            "benchmarks/build_genai.sh)"})
        elif importlib.util.find_spec("onnxruntime_genai") is None:
            skipped.append({"backend": "genai", "reason": "onnxruntime-genai is not installed "
                            "(pip install 'aira-opt[genai]')"})
        else:
            for folder in genai_dirs:
                label = _genai_precision(folder)
                jobs.append(Job("genai", f"genai {label}", label, str(folder)))
    if "trt" in backends:
        for engine in engines:
            missing = _trt_missing()
            if missing:
                skipped.append({"backend": f"trt {engine}", "reason": missing})
            else:
                jobs.append(Job("trt", f"trt {_engine_precision(engine)}", _engine_precision(engine), str(engine)))
    return BenchPlan(jobs=jobs, vocab=len(tokenizer), eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id,
                     skipped=skipped)
