"""Which bench jobs to run: backends x models, and the reasons for the ones that cannot run here."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aira_opt.bench.runners import RUNNERS, Job
from aira_opt.bench.weights import gguf_type
from aira_opt.core.artifacts import graph_is_fused, read_manifest
from aira_opt.core.errors import AiraOptError, TensorRTUnavailableError
from aira_opt.export.exporters import DEFAULT_EXPORTER, EXPORTERS
from aira_opt.export.support import read_format
from aira_opt.precision.pipeline import default_output
from aira_opt.precision.variants import variant_name
from aira_opt.runtime.ort import read_config
from aira_opt.spec.models import PRESETS, BUNDLED, bundled_model_dir, load_model, model_name
from aira_opt.spec.prompts import detect_format, ordinary_token_ids
from aira_opt.tensorrt.engines import SIDECAR, import_tensorrt, require_gpu


@dataclass
class BenchPlan:
    jobs: list[Job]
    token_ids: np.ndarray  # prompts are drawn from these: the tokenizer's ordinary (non-special) ids
    eos: int
    pad: int
    context: int | None  # the model's positions, where known: every setting must fit
    skipped: list[dict[str, str]] = field(default_factory=list)


def export_label(folder: Path) -> str:
    """The manifest's variant name: precision plus what differs from its defaults ('int4-b128', 'fp32-fused',
    'fp32 via optimum' for a graph from a non-default exporter)."""
    manifest = read_manifest(folder)
    precision = str(manifest.get("precision", "fp32"))
    quantization = manifest.get("quantization") or {}
    block = quantization.get("block_size") if isinstance(quantization, dict) else None
    made_by = next((e.name for e in EXPORTERS.values() if str(manifest.get("exporter", "")).startswith(e.description)),
                   DEFAULT_EXPORTER)
    return variant_name(precision, block, graph_is_fused(manifest)) + (
        "" if made_by == DEFAULT_EXPORTER else f" via {made_by}")


def trt_missing() -> str:
    """Why the trt backend cannot run here, or '' when it can."""
    try:
        import_tensorrt()
        require_gpu()
    except TensorRTUnavailableError as exc:
        return exc.message
    return ""


def genai_label(folder: Path) -> str:
    """The precision as benchmarks/build_genai.sh names its folders (genai-int4): a guess from the folder name,
    since onnxruntime-genai's folders carry no manifest of ours."""
    name = Path(folder).name.lower()
    for precision in ("int4", "int8", "fp16", "fp32"):
        if precision in name:
            return precision
    return "genai"


def engine_precision(folder: Path) -> str:
    return str(json.loads((Path(folder) / SIDECAR).read_text()).get("precision", "?"))


@dataclass(frozen=True)
class PeerBackend:
    """A peer that runs its own files: what `bench` needs given, the module it imports, how to get each."""

    name: str
    source_option: str  # e.g. "--genai folder (build one with benchmarks/build_genai.sh)"
    module: str  # imported by its runner
    install: str  # how to get the module
    label: Callable[[Path], str]  # the precision a source holds


PEERS = {p.name: p for p in (
    PeerBackend("genai", "--genai folder (build one with benchmarks/build_genai.sh)", "onnxruntime_genai",
                "onnxruntime-genai is not installed (pip install 'aira-opt[genai]')", genai_label),
    PeerBackend("llamacpp", "--gguf file (benchmarks/make_gguf.py converts and quantizes a checkpoint with "
                "llama.cpp's own tools)", "llama_cpp", "llama-cpp-python is not installed (PyPI has no CPU wheel: "
                "benchmarks/build_llamacpp.sh builds one for this CPU and caches it)", gguf_type),
)}


def peer_backend_jobs(peer: PeerBackend, sources: list[Path]) -> tuple[list[Job], str | None]:
    """One job per source, or none and the reason (no source given, or the peer's package missing)."""
    if not sources:
        return [], f"no {peer.source_option}"
    if importlib.util.find_spec(peer.module) is None:
        return [], peer.install
    labelled = [(source, peer.label(source)) for source in sources]  # reads each source's header once
    return [Job(peer.name, f"{peer.name} {label}", label, folder=str(source)) for source, label in labelled], None


def optimum_missing() -> str | None:
    """Why optimum's runtime cannot run in this environment, or None when it can."""
    try:
        import optimum.onnxruntime  # noqa: F401
    except ImportError as exc:
        return (f"optimum is not importable here ({exc}); pip install 'aira-opt[optimum]' in a virtual environment "
                "of its own (it pins transformers 4.57) and pass its interpreter with --optimum-python")
    return None


def plan_jobs(model_spec: str, num_layers: int | None, onnx_dirs: list[Path], engines: list[Path],
              genai_dirs: list[Path], backends: list[str], provider: str = "cpu",
              optimum_python: str | None = None, gguf_files: list[Path] | None = None) -> BenchPlan:
    from transformers import AutoTokenizer  # heavy: only once a bench is planned

    unknown = [b for b in backends if b not in RUNNERS]
    if unknown:
        raise AiraOptError(f"unknown backend(s) {unknown}; choose from {', '.join(RUNNERS)}")
    if not onnx_dirs and ({"ort", "optimum"} & set(backends)):
        default = default_output(model_name(model_spec, num_layers), "fp32")
        if not (default / "model.onnx").is_file():
            raise AiraOptError(f"no --onnx given and {default} does not exist; run "
                               f"`aira-opt export --model {model_spec}` first or pass --onnx")
        onnx_dirs = [default]
    if model_spec in PRESETS or model_spec == BUNDLED:
        tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    elif onnx_dirs:
        tokenizer = AutoTokenizer.from_pretrained(str(onnx_dirs[0]))
    else:
        tokenizer = load_model(model_spec).tokenizer
    jobs: list[Job] = []
    skipped: list[dict[str, str]] = []
    if "torch" in backends:
        import torch  # heavy: only when PyTorch is benched

        torch_precision = "fp16" if torch.cuda.is_available() else "fp32"  # what users run on each device
        jobs.append(Job("torch", f"torch {torch_precision}", torch_precision, model_spec=model_spec,
                        num_layers=num_layers))
    where = "" if provider == "cpu" else f" ({provider})"
    optimum_reason = None if optimum_python or "optimum" not in backends else optimum_missing()
    if optimum_reason:
        skipped.append({"backend": "optimum", "reason": optimum_reason})
    for folder in onnx_dirs:
        label = export_label(folder)
        for backend in ("ort", "optimum"):
            if backend in backends and not (backend == "optimum" and optimum_reason):
                python = (optimum_python or "") if backend == "optimum" else ""
                jobs.append(Job(backend, f"{backend} {label}{where}", label, folder=str(folder), provider=provider,
                                python=python))
    for backend, sources in (("genai", genai_dirs), ("llamacpp", gguf_files or [])):
        if backend in backends:
            peer_jobs, reason = peer_backend_jobs(PEERS[backend], [Path(s) for s in sources])
            jobs.extend(peer_jobs)
            skipped.extend([{"backend": backend, "reason": reason}] if reason else [])
    if "trt" in backends:
        for engine in engines:
            missing = trt_missing()
            if missing:
                skipped.append({"backend": f"trt {engine}", "reason": missing})
            else:
                precision = engine_precision(engine)
                jobs.append(Job("trt", f"trt {precision}", precision, folder=str(engine)))
    fmt = read_format(onnx_dirs[0], tokenizer) if onnx_dirs else detect_format(tokenizer)
    return BenchPlan(jobs=jobs, token_ids=ordinary_token_ids(tokenizer, len(tokenizer)), eos=fmt.stop_ids[0],
                     pad=fmt.pad_id, context=model_context(model_spec, onnx_dirs), skipped=skipped)


def model_context(model_spec: str, onnx_dirs: list[Path]) -> int | None:
    """The positions the benched model has: from an export's config, a preset, or the bundled model."""
    if model_spec in PRESETS:
        return PRESETS[model_spec].max_position_embeddings
    if model_spec == BUNDLED:
        return int(json.loads((bundled_model_dir() / "config.json").read_text())["max_position_embeddings"])
    if onnx_dirs:
        return int(read_config(onnx_dirs[0]).get("max_position_embeddings", 2048))
    return None
