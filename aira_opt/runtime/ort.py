"""ONNX Runtime runner for an exported decoder: activate, step, deactivate.

The KV cache lives in ONNX Runtime's own buffers (OrtValue + IOBinding): each step's `present.*` outputs are
bound as the next step's `past_key_values.*` inputs without a numpy round trip, so under the CUDA provider
the cache never leaves the GPU. Only the logits come back to the host, for sampling.

On a fused graph (GroupQueryAttention, see precision/fusing.py) and when the caller knows the final length,
the cache is preallocated once at that capacity and bound as both past and present: the op writes each step's
keys in place instead of the standard graph's Concat copying the whole cache every step.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from aira_opt.core.contract import ORT_KV_DTYPES
from aira_opt.core.cpu import has_int8_dot
from aira_opt.core.errors import ExportFolderError, ProviderUnavailableError
from aira_opt.folders import ExportFolder, Manifest
from aira_opt.runtime.providers import resolve_provider, session_options
from aira_opt.runtime.protocol import KVCache, Runner, StepOutput


def saturation_risk(manifest: Manifest) -> bool:
    """Dynamic int8 with full 8-bit weights (kernels chosen on a VNNI CPU) running where u8 x s8 products are added
    in 16 bits (AVX2 without VNNI): ONNX Runtime's kernels may saturate there."""
    quantization = manifest.quantization
    return (str(quantization.get("method", "")).startswith("dynamic int8")
            and str(quantization.get("weight_range", "")).startswith("8-bit") and not has_int8_dot())


def quantized_activations(manifest: Manifest | None) -> bool:
    """Whether the graph's kernels quantize activations at run time (MatMulNBits at accuracy level 4, dynamic
    int8). Their multi-row kernels then compute a step over several positions differently from a single-position
    step (by more than rounding), so speculation's verify step cannot reproduce the plain loop's logits exactly."""
    if manifest is None:
        return False
    quantization = manifest.quantization
    return (quantization.get("accuracy_level") == 4
            or str(quantization.get("method", "")).startswith("dynamic int8"))


class OrtDecoder(Runner):
    """One ONNX Runtime session over an export folder, with KV cache stepping through IOBinding."""

    def __init__(self, folder: Path | ExportFolder, provider: str = "cpu", threads: int | None = None,
                 shared_threads: bool = False):
        self.export = folder if isinstance(folder, ExportFolder) else ExportFolder(folder)
        self.folder = self.export.path
        self.provider = provider
        self.model_path = self.export.model_path
        self.config: dict[str, Any] = self.export.config
        # None for a folder another tool made: it runs, with what its graph alone tells.
        self.manifest: Manifest | None = self.export.manifest if self.export.has_manifest else None
        self.contract = self.export.contract
        self.providers = resolve_provider(provider)
        self.threads = threads
        self.shared_threads = shared_threads  # the process's one thread pool (a target and its draft take turns)
        self.session: ort.InferenceSession | None = None
        self.device = "cuda" if provider in ("cuda", "tensorrt") else "cpu"
        self.kv_dtype: Any = None
        # Only GroupQueryAttention can read a cache longer than its mask and write into it: fused graphs only
        # (fp32/int8/int4 on the CPU provider, fp16-cuda/int4-cuda on CUDA or the CPU); TensorRT never.
        self.in_place_cache = provider in ("cpu", "cuda") and self.manifest is not None and self.manifest.fused
        # GroupQueryAttention takes several new positions on top of a past only at batch 1.
        self.batched_chunks = not (self.manifest is not None and self.manifest.fused)
        self.exact_chunks = not quantized_activations(self.manifest)

    # Lifecycle --------------------------------------------------------------------------------------
    def activate(self) -> OrtDecoder:
        if self.session is None:
            try:
                self.session = ort.InferenceSession(str(self.model_path),
                                                    sess_options=session_options(self.threads, self.shared_threads),
                                                    providers=self.providers)
            except Exception as exc:  # onnxruntime's own types: InvalidProtobuf, Fail, NoSuchFile, ...
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ExportFolderError(
                    f"ONNX Runtime cannot load '{self.model_path}' ({first[:200]}); the file or its "
                    f"model.onnx_data may be truncated or corrupt: `aira-opt inspect {self.folder}` shows which "
                    "file, then export again") from exc
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
            self.kv_dtype = ORT_KV_DTYPES[inputs[self.contract.past_names()[0]].type]
            if self.manifest is not None and saturation_risk(self.manifest):
                warnings.warn(f"{self.folder} holds 8-bit dynamic int8 weights, chosen on a CPU with an int8 dot "
                              "product; this CPU lacks one, so its int8 kernels may saturate: export again here "
                              "(it picks 7-bit weights) or with --kernels default", RuntimeWarning, stacklevel=2)
        return self

    def deactivate(self) -> None:
        self.session = None

    # Steps ------------------------------------------------------------------------------------------
    def empty_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """An empty cache for `batch` rows. With a capacity (the prompt plus every token to come) a fused graph
        gets zeroed buffers of that length, written in place; a standard graph grows up to it."""
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
            return KVCache(values=values, length=0, batch=batch, capacity=capacity, in_place=True)
        shape = [batch, c.num_kv_heads, 0, c.head_dim]  # the prefill is the same graph with past length 0
        values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device, 0)
                  for _ in c.past_names()]
        return KVCache(values=values, length=0, batch=batch, capacity=capacity)

    def cache_to_host(self, cache: KVCache) -> list[np.ndarray]:
        """The cache's filled positions as numpy arrays, each [B, kv_heads, length, head_dim] (for a scheduler
        that adds and drops rows between steps)."""
        return [value.numpy()[:, :, :cache.length] for value in cache.values]

    def cache_from_host(self, arrays: list[np.ndarray]) -> KVCache:
        """A growing cache holding `arrays` (each [B, kv_heads, length, head_dim]), in ONNX Runtime's memory."""
        values = []
        for array in arrays:
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), self.kv_dtype, self.device, 0)
            value.update_inplace(np.ascontiguousarray(array, dtype=self.kv_dtype))
            values.append(value)
        return KVCache(values=values, length=int(arrays[0].shape[2]), batch=int(arrays[0].shape[0]))

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: KVCache,
             all_logits: bool = False) -> tuple[StepOutput, KVCache]:
        """Run one forward pass; returns the logits and the advanced cache (still in ONNX Runtime memory).

        input_ids, position_ids: [B, S] int64; attention_mask: [B, past + S] int64.
        """
        assert self.session is not None, "call activate() first"
        new_tokens = input_ids.shape[1]
        cache.reserve(new_tokens)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, value in zip(self.contract.past_names(), cache.values):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")  # sampling happens on the host
        for name, value in zip(self.contract.present_names(), cache.values):
            if cache.in_place:
                binding.bind_ortvalue_output(name, value)  # the same buffer as the past: written in place
            else:
                binding.bind_output(name, self.device, 0)
        start = time.perf_counter()
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()  # [B, S, V]
        seconds = time.perf_counter() - start
        logits = logits if all_logits else logits[:, -1, :]
        return (StepOutput(logits=logits.astype(np.float32, copy=False), seconds=seconds),
                cache.advanced(outputs[1:], new_tokens))
