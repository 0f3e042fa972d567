"""The one runner family. Every runner is loaded by `activate`, released by `deactivate` (or used as a context
manager), as Polygraphy's runners are. A decoder runner (ONNX Runtime, TensorRT, PyTorch) also steps one
forward pass with a KV cache: the Decoder protocol, which the generator, validation, `check` and `bench` drive.
Here too: one step's output, and the KV cache, which owns how it grows."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from aira_opt.core.contract import DecoderContract


@dataclass
class StepOutput:
    logits: np.ndarray  # [B, V] for the last position, or [B, S, V] when all positions were asked for
    seconds: float


class CacheCapacityError(ValueError):
    """A step would write past the positions the cache was sized for."""


@dataclass
class KVCache:
    """The past keys and values of every layer, in the runner's own device memory.

    Two policies, chosen when the cache is made: growing (each step's present tensors become the next past) or
    in place (buffers preallocated at `capacity`, bound as both past and present, written by the graph).
    Either way a cache made with a capacity refuses to hold more than that many positions."""

    values: list[Any]  # 2 * num_layers, each [B, kv_heads, length, head_dim] ([.., capacity, ..] in place)
    length: int  # positions filled so far (the past length of the next step)
    batch: int
    capacity: int | None = None  # most positions this cache may hold; None: unbounded
    in_place: bool = False  # values are preallocated at capacity and written in place

    def reserve(self, new_tokens: int) -> None:
        """Check that `new_tokens` more positions fit, before a step writes them."""
        if self.capacity is not None and self.length + new_tokens > self.capacity:
            raise CacheCapacityError(f"KV cache capacity {self.capacity} exceeded: {self.length} positions held, "
                                     f"{new_tokens} more asked for")

    def rewound(self, dropped: int) -> KVCache:
        """The cache without its last `dropped` positions (proposals the target rejected): an in-place cache's
        graph writes over them at the next step. A growing cache cannot shrink in place; its caller masks them."""
        if not self.in_place:
            raise ValueError("only an in-place cache rewinds")
        return replace(self, length=self.length - dropped)

    def advanced(self, presents: list[Any], new_tokens: int) -> KVCache:
        """The cache after a step: the same buffers when written in place, else the step's present tensors."""
        return replace(self, values=self.values if self.in_place else list(presents),
                       length=self.length + new_tokens)


class Decoder(Protocol):
    """A decoder runner: runtime.ort.OrtDecoder, tensorrt.engines.TrtDecoder, runtime.pytorch.TorchDecoder.
    A runner that can also move its cache to the host and back (`cache_to_host`, `cache_from_host`) lets rows
    join and leave a running batch (generation.generator)."""

    config: dict[str, Any]  # the export's config.json
    contract: DecoderContract
    provider: str  # what runs it, as reports show it
    kv_dtype: Any  # numpy dtype of the cache (known once activated)
    in_place_cache: bool  # given a capacity, it preallocates the cache once and its graph writes it in place
    batched_chunks: bool  # a step of several positions after the prefill works at batch > 1 (speculation's verify)
    exact_chunks: bool  # such a step gives the logits single steps give, up to float rounding

    def activate(self) -> Decoder: ...

    def deactivate(self) -> None: ...

    def __enter__(self) -> Decoder: ...

    def __exit__(self, *exc: object) -> None: ...

    def empty_cache(self, batch: int, capacity: int | None = None) -> KVCache: ...

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: KVCache,
             all_logits: bool = False) -> tuple[StepOutput, KVCache]: ...


class Runner:
    """activate / deactivate, and the same as a context manager: what every runner shares (the decoder runners
    here, bench's backends)."""

    def activate(self) -> Runner:
        raise NotImplementedError

    def deactivate(self) -> None:
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204 - returns the concrete runner
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()
