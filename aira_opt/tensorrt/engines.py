"""The thin TensorRT 11 layer: build a strongly typed engine from an export folder, and run it.

TensorRT 11 networks are always strongly typed, so there are no precision flags: the ONNX graph carries fp16
or int8 Q/DQ. This module only executes what `engine_plan` decided; everything it calls on TensorRT is listed
in API_SURFACE, which a conformance test checks against the real TensorRT 11.4 Python bindings.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from aira_opt.core.artifacts import atomic_folder, refuse_existing, sha256_file
from aira_opt.core.errors import TensorRTUnavailableError
from aira_opt.folders import PLAN_FILE, SIDECAR, SOURCE_MANIFEST, EngineFolder, EngineRecord
from aira_opt.runtime.protocol import Runner, KVCache, StepOutput
from aira_opt.tensorrt.build_plan import BuildPlan, Profile, ShapeRange, hardware_compatibility, profile_for

INSTALL_HINT = "pip install 'aira-opt[trt]'"
SUPPORT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "manifest.json")

# Every TensorRT class member this module uses, by class. tests/test_engines.py imports the real bindings
# and checks that each exists in TensorRT 11.4, and that this file uses nothing outside this list.
API_SURFACE: dict[str, tuple[str, ...]] = {
    "Logger": ("WARNING",),
    "Builder": ("create_network", "create_builder_config", "create_optimization_profile",
                "build_serialized_network"),
    "OnnxParser": ("parse_from_file", "num_errors", "get_error"),
    "IBuilderConfig": ("set_memory_pool_limit", "builder_optimization_level", "hardware_compatibility_level",
                       "add_optimization_profile", "create_timing_cache", "set_timing_cache", "get_timing_cache"),
    "IOptimizationProfile": ("set_shape",),
    "ITimingCache": ("serialize",),
    "MemoryPoolType": ("WORKSPACE",),
    "HardwareCompatibilityLevel": ("NONE", "AMPERE_PLUS"),  # by name, via hardware_compatibility()
    "Runtime": ("deserialize_cuda_engine",),
    "ICudaEngine": ("create_execution_context",),
    "IExecutionContext": ("set_optimization_profile_async", "set_input_shape", "get_tensor_shape",
                          "set_tensor_address", "execute_async_v3"),
}


def import_tensorrt() -> Any:
    """The tensorrt module, or a one-line error naming what is missing."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError:
        raise TensorRTUnavailableError(f"TensorRT is not installed; install it on a machine with an NVIDIA GPU: "
                                       f"{INSTALL_HINT}") from None
    return trt


def require_gpu() -> tuple[str, tuple[int, int]]:
    """(GPU name, compute capability) of device 0, or a one-line error."""
    try:
        import torch
    except ImportError:
        raise TensorRTUnavailableError("the engine layer uses PyTorch's CUDA allocator; install torch with CUDA") from None
    if not torch.cuda.is_available():
        raise TensorRTUnavailableError("no NVIDIA GPU is visible (torch.cuda.is_available() is False); TensorRT "
                                       "engines are built and run on the GPU they target")
    return torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]


# Build ----------------------------------------------------------------------------------------------------
def build_engine(plan: BuildPlan, folder: Path, output: Path, force: bool = False) -> EngineFolder:
    """Parse the ONNX (external data included), add the profiles, build, and write plan + sidecar atomically."""
    refuse_existing(output, force)
    trt = import_tensorrt()
    gpu, capability = require_gpu()
    level = hardware_compatibility(plan.options.target, capability)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # strongly typed is the only mode in TensorRT 11
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(plan.onnx_path):  # resolves model.onnx_data next to the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTUnavailableError("TensorRT's ONNX parser rejected the graph: " + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan.options.workspace_gib * (1 << 30)))
    config.builder_optimization_level = plan.options.opt_level
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)
    for profile in plan.profiles:
        config.add_optimization_profile(_trt_profile(builder, profile))
    cache_path = Path(plan.options.timing_cache) if plan.options.timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.exists() else b"")
    config.set_timing_cache(cache, False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTUnavailableError("TensorRT could not build the engine (see the log above)")
    build_seconds = time.perf_counter() - start
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    with atomic_folder(output, force) as tmp:
        (tmp / PLAN_FILE).write_bytes(bytes(serialized))
        for name in SUPPORT_FILES:
            if (Path(folder) / name).is_file():
                shutil.copy2(Path(folder) / name, tmp / (SOURCE_MANIFEST if name == "manifest.json" else name))
        record = engine_record(plan, trt.__version__, gpu, capability, level, tmp / PLAN_FILE, build_seconds)
        (tmp / SIDECAR).write_text(json.dumps(record.to_json(), indent=2) + "\n")
    return EngineFolder(output)


def _trt_profile(builder: Any, profile: Profile) -> Any:
    trt_profile = builder.create_optimization_profile()
    for name, r in profile.shapes.items():
        trt_profile.set_shape(name, r.min, r.opt, r.max)
    return trt_profile


def engine_record(plan: BuildPlan, trt_version: str, gpu: str, capability: tuple[int, int], level: str,
                  plan_path: Path, build_seconds: float) -> EngineRecord:
    """model.json next to model.plan: what it was built from, for what, and how to feed it."""
    data = plan.to_json()
    return EngineRecord(
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        tensorrt_version=trt_version, gpu=gpu, compute_capability=f"{capability[0]}.{capability[1]}",
        target=plan.options.target, hardware_compatibility_level=level,
        precision=plan.precision, profiles=data["profiles"], options=data["options"],
        inputs=plan.inputs, outputs=plan.outputs, build_seconds=round(build_seconds, 1),
        sha256={"plan": sha256_file(plan_path), "onnx": sha256_file(Path(plan.onnx_path))},
    )


# Run ------------------------------------------------------------------------------------------------------
class TrtDecoder(Runner):
    """A TensorRT engine with the same step interface as runtime.OrtDecoder, so the generation loop,
    `check` and `bench` run it unchanged. Buffers live in PyTorch CUDA tensors; the KV cache stays on the GPU."""

    def __init__(self, folder: Path | EngineFolder):
        self.engine_folder = folder if isinstance(folder, EngineFolder) else EngineFolder(folder)
        self.folder = self.engine_folder.path
        self.record = self.engine_folder.record
        self.config = self.engine_folder.config
        self.contract = self.engine_folder.contract
        self.provider = "tensorrt-engine"
        self.in_place_cache = False  # the engine's graph concatenates its cache
        self.batched_chunks = True
        self.exact_chunks = True
        self.profiles = [Profile(p["name"], {k: _shape_range(v) for k, v in p["shapes"].items()})
                         for p in self.record.profiles]
        self.engine = self.context = None
        self.kv_dtype: Any = None

    def activate(self) -> TrtDecoder:
        if self.engine is None:
            import torch

            trt = import_tensorrt()
            require_gpu()
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = runtime.deserialize_cuda_engine(self.engine_folder.plan_path.read_bytes())
            self.context = self.engine.create_execution_context()
            # One stream for everything: the host-to-device copies of the inputs, the engine, the copy back.
            self.stream = torch.cuda.current_stream()
            self.kv_dtype = np.dtype(self.record.variant.dtype)  # the graph's activations and cache
            self.kv_torch_dtype = getattr(torch, self.kv_dtype.name)
            # A non-null address for zero-size tensors (the empty past at prefill): TensorRT rejects null.
            self._placeholder = torch.empty(16, dtype=torch.uint8, device="cuda")
            self._profile = -1
        return self

    def deactivate(self) -> None:
        self.context = self.engine = None

    def empty_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """Zero-length past that grows (the engine's graph concatenates), up to `capacity` when given."""
        import torch

        c = self.contract
        values = [torch.empty((batch, c.num_kv_heads, 0, c.head_dim), dtype=self.kv_torch_dtype, device="cuda")
                  for _ in c.past_names()]
        return KVCache(values=values, length=0, batch=batch, capacity=capacity)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: KVCache,
             all_logits: bool = False) -> tuple[StepOutput, KVCache]:
        import torch

        ctx = self.context
        cache.reserve(input_ids.shape[1])
        profile = profile_for(self.profiles, cache.length, input_ids.shape[1])
        if profile != self._profile:
            ctx.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self._profile = profile
        feeds = {"input_ids": torch.from_numpy(np.ascontiguousarray(input_ids, np.int64)).cuda(),
                 "attention_mask": torch.from_numpy(np.ascontiguousarray(attention_mask, np.int64)).cuda(),
                 "position_ids": torch.from_numpy(np.ascontiguousarray(position_ids, np.int64)).cuda()}
        feeds.update(zip(self.contract.past_names(), cache.values))
        for name, tensor in feeds.items():
            ctx.set_input_shape(name, tuple(tensor.shape))
            ctx.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr())
        outputs = {}
        for name in self.contract.output_names():
            dtype = torch.float32 if name == "logits" else self.kv_torch_dtype
            outputs[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device="cuda")
            ctx.set_tensor_address(name, outputs[name].data_ptr())
        start = time.perf_counter()
        ctx.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        logits = outputs["logits"] if all_logits else outputs["logits"][:, -1, :]
        host = logits.float().cpu().numpy()
        seconds = time.perf_counter() - start
        presents = [outputs[n] for n in self.contract.present_names()]
        return StepOutput(logits=host, seconds=seconds), cache.advanced(presents, input_ids.shape[1])


def _shape_range(v: dict[str, list[int]]) -> ShapeRange:
    return ShapeRange(tuple(v["min"]), tuple(v["opt"]), tuple(v["max"]))
