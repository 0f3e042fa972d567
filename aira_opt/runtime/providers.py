"""ONNX Runtime execution providers and session options, with a one-line error for a missing provider."""

from __future__ import annotations

import onnxruntime as ort

from aira_opt.core.errors import ProviderUnavailableError
from aira_opt.core.threads import session_threads

PROVIDERS = {
    "cpu": ("CPUExecutionProvider", "onnxruntime"),
    "cuda": ("CUDAExecutionProvider", "aira-opt[gpu]  (onnxruntime-gpu; uninstall onnxruntime first)"),
    "tensorrt": ("TensorrtExecutionProvider", "aira-opt[gpu,trt]  (onnxruntime-gpu and tensorrt)"),
}


def resolve_provider(name: str) -> list[str]:
    """Provider list for a --provider name; a missing one is a one-line error naming the package."""
    if name not in PROVIDERS:
        raise ProviderUnavailableError(f"unknown provider '{name}'; use one of {', '.join(PROVIDERS)}")
    provider, package = PROVIDERS[name]
    if name != "cpu" and hasattr(ort, "preload_dlls"):
        # CUDA and cuDNN often come as pip packages (nvidia-*); this loads them so the provider finds them.
        ort.preload_dlls()
    if provider not in ort.get_available_providers():
        raise ProviderUnavailableError(
            f"ONNX Runtime provider {provider} is not available here; install it: pip install '{package}'"
        )
    return [provider] if name == "cpu" else [provider, "CPUExecutionProvider"]


def session_options(threads: int | None = None, shared_threads: bool = False) -> ort.SessionOptions:
    """shared_threads: run on the process's shared pool (core.threads) instead of a pool of its own."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return session_threads(opts, threads, shared_threads)
