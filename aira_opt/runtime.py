"""ONNX Runtime runner for an exported decoder: activate, step, deactivate.

The KV cache lives in ONNX Runtime's own buffers (OrtValue + IOBinding): each step's `present.*` outputs are
bound as the next step's `past_key_values.*` inputs without a numpy round trip, so under the CUDA provider
the cache never leaves the GPU. Only the logits of the last position come back to the host, for sampling.

On a fused graph (GroupQueryAttention, see fusing.py) and when the caller knows the final length, the cache
is preallocated once at that capacity and bound as both past and present: the op writes each step's keys in
place instead of the standard graph's Concat copying the whole cache every step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from aira_opt.contract import DecoderContract
from aira_opt.errors import ExportFolderError, ProviderUnavailableError

PROVIDERS = {
    "cpu": ("CPUExecutionProvider", "onnxruntime"),
    "cuda": ("CUDAExecutionProvider", "aira-opt[gpu]  (onnxruntime-gpu; uninstall onnxruntime first)"),
    "tensorrt": ("TensorrtExecutionProvider", "aira-opt[gpu,trt]  (onnxruntime-gpu and tensorrt)"),
}
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


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


def onnx_file(folder: Path) -> Path:
    path = Path(folder) / "model.onnx"
    if not path.is_file():
        raise ExportFolderError(f"'{folder}' has no model.onnx; run `aira-opt export` first")
    return path


def session_options(threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


@dataclass
class StepOutput:
    logits: np.ndarray  # [B, V] for the last position, or [B, S, V] when all positions were asked for
    seconds: float


@dataclass
class KVCache:
    """The past keys and values of every layer, as OrtValues in the session's device memory."""

    values: list[ort.OrtValue]  # 2 * num_layers, each [B, kv_heads, past, head_dim] ([.., capacity, ..] in place)
    length: int  # past length
    batch: int = field(default=0)
    capacity: int | None = None  # set when the buffers are preallocated and written in place


class Decoder(Protocol):
    """What the generation loop, `check` and `bench` need from a runner (OrtDecoder, engines.TrtDecoder)."""

    config: dict[str, Any]
    provider: str

    def empty_cache(self, batch: int, capacity: int | None = None) -> KVCache: ...

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: KVCache,
             all_logits: bool = False) -> tuple[StepOutput, KVCache]: ...


class DecoderLifecycle:
    """activate / deactivate, and the same as a context manager: what every decoder runner shares."""

    def activate(self) -> DecoderLifecycle:
        raise NotImplementedError

    def deactivate(self) -> None:
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204 - returns the concrete runner
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()


class OrtDecoder(DecoderLifecycle):
    """One ONNX Runtime session over an export folder, with KV cache stepping through IOBinding."""

    def __init__(self, folder: Path, provider: str = "cpu", threads: int | None = None):
        self.folder = Path(folder)
        self.provider = provider
        self.model_path = onnx_file(self.folder)
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise ExportFolderError(f"'{folder}' has no config.json")
        self.config = json.loads(config_path.read_text())
        self.contract = DecoderContract.from_config_dict(self.config)
        self.providers = resolve_provider(provider)
        self.threads = threads
        self.session: ort.InferenceSession | None = None
        self.device = "cuda" if provider in ("cuda", "tensorrt") else "cpu"
        self.load_seconds = 0.0
        # Only GroupQueryAttention can read a cache longer than its mask and write into it: fused graphs only,
        # and on the CPU provider they are made for (CUDA's GroupQueryAttention is fp16-only).
        self.in_place_cache = provider == "cpu" and fused_graph(self.folder)

    # Lifecycle --------------------------------------------------------------------------------------
    def activate(self) -> OrtDecoder:
        if self.session is None:
            start = time.perf_counter()
            self.session = ort.InferenceSession(str(self.model_path), sess_options=session_options(self.threads),
                                                providers=self.providers)
            self.load_seconds = time.perf_counter() - start
            wanted = self.providers[0]
            if wanted not in self.session.get_providers():
                # ONNX Runtime falls back to the CPU when a provider's libraries fail to load: say so, loudly.
                raise ProviderUnavailableError(
                    f"{wanted} did not load (session runs on {self.session.get_providers()}); check that CUDA 13 "
                    "and cuDNN 9 libraries are installed (pip install 'aira-opt[gpu]' brings the wheels)")
            inputs = {i.name: i for i in self.session.get_inputs()}
            missing = [n for n in self.contract.input_names() if n not in inputs]
            if missing:
                raise ExportFolderError(f"'{self.model_path}' lacks inputs {missing}; not an aira-opt decoder export")
            self.kv_dtype = ORT_DTYPES[inputs[self.contract.past_names()[0]].type]
        return self

    def deactivate(self) -> None:
        self.session = None

    # Steps ------------------------------------------------------------------------------------------
    def empty_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """Zero-length past tensors: the prefill is the same graph with past length 0. With a capacity (the
        prompt plus every token to come) a fused graph gets zeroed buffers of that length, written in place."""
        c = self.contract
        if capacity is not None and self.in_place_cache:
            shape = [batch, c.num_kv_heads, capacity, c.head_dim]  # [B, kv_heads, capacity, head_dim]
            zeros = np.zeros(shape, dtype=self.kv_dtype)
            values = []
            for _ in c.past_names():
                # One buffer per tensor, owned by ONNX Runtime (ortvalue_from_numpy would alias the numpy array).
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device, 0)
                value.update_inplace(zeros)
                values.append(value)
            return KVCache(values=values, length=0, batch=batch, capacity=capacity)
        shape = [batch, c.num_kv_heads, 0, c.head_dim]
        values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device, 0)
                  for _ in c.past_names()]
        return KVCache(values=values, length=0, batch=batch)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: KVCache,
             all_logits: bool = False) -> tuple[StepOutput, KVCache]:
        """Run one forward pass; returns the logits and the grown cache (still in ONNX Runtime memory).

        input_ids, position_ids: [B, S] int64; attention_mask: [B, past + S] int64.
        """
        assert self.session is not None, "call activate() first"
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, value in zip(self.contract.past_names(), cache.values):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")  # sampling happens on the host
        in_place = cache.capacity is not None
        if in_place and cache.length + input_ids.shape[1] > cache.capacity:
            raise ValueError(f"KV cache capacity {cache.capacity} exceeded")
        for name, value in zip(self.contract.present_names(), cache.values):
            if in_place:
                binding.bind_ortvalue_output(name, value)  # the same buffer as the past: written in place
            else:
                binding.bind_output(name, self.device, 0)
        start = time.perf_counter()
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()  # [B, S, V]
        seconds = time.perf_counter() - start
        values = cache.values if in_place else list(outputs[1:])
        new_cache = KVCache(values=values, length=cache.length + input_ids.shape[1], batch=cache.batch,
                            capacity=cache.capacity)
        logits = logits if all_logits else logits[:, -1, :]
        return StepOutput(logits=logits.astype(np.float32, copy=False), seconds=seconds), new_cache

    def forward_numpy(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Plain session.run with numpy in and out: the simple path, used for validation."""
        assert self.session is not None, "call activate() first"
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds)))


def fused_graph(folder: Path) -> bool:
    """Whether the export's manifest says its attention is fused (a folder without a manifest: no)."""
    from aira_opt.artifacts import MANIFEST, graph_is_fused, read_manifest

    return (Path(folder) / MANIFEST).is_file() and graph_is_fused(read_manifest(folder))


def open_decoder(onnx_dir: Path | None, engine_dir: Path | None, provider: str = "cpu",
                 threads: int | None = None) -> tuple[Path, Any]:
    """The folder and (not yet activated) decoder for --onnx DIR or --engine DIR; exactly one must be given."""
    from aira_opt.errors import AiraOptError

    if (onnx_dir is None) == (engine_dir is None):
        raise AiraOptError("give exactly one of --onnx DIR (ONNX Runtime) or --engine DIR (TensorRT engine folder)")
    if engine_dir is not None:
        from aira_opt.engines import TrtDecoder

        return Path(engine_dir), TrtDecoder(Path(engine_dir))
    return Path(onnx_dir), OrtDecoder(Path(onnx_dir), provider=provider, threads=threads)


def position_ids_from_mask(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """position_ids for the last `new_tokens` positions: cumulative sum of the mask, so left padding works.

    Pads get position 1, exactly as transformers' generate does, so batched logits match it.
    attention_mask: [B, past + S] -> position_ids: [B, S]
    """
    positions = np.cumsum(attention_mask, axis=1) - 1
    positions = np.where(attention_mask == 0, 1, positions)
    return positions[:, -new_tokens:].astype(np.int64)
