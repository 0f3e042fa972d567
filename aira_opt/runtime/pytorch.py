"""PyTorch, the reference every export is compared with, driven in one place: the source model behind the
runners' step interface (post-export validation and `check`'s teacher-forced logits step it exactly as they step
an export), and transformers' own `generate` (`check`'s reference sequences, bench's torch rows and optimum's,
which is transformers' generate over ONNX Runtime)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from aira_opt.core.contract import DecoderContract
from aira_opt.runtime.protocol import KVCache, Runner, StepOutput
from aira_opt.source.compat import forward
from aira_opt.source.models import LoadedModel

BASELINES = ("cpu-fp32", "cuda-fp16")  # PyTorch fp32 on the CPU, or fp16 on the GPU (what GPU users run)
Timings = tuple[float, list[float]]  # (seconds to the first token, seconds of each decode step)
# Greedy for transformers' generate, whose model generation_config would otherwise add its own processors.
HF_GREEDY = {"do_sample": False, "repetition_penalty": 1.0, "temperature": None, "top_k": None, "top_p": None}


class TorchDecoder(Runner):
    """The source model as a decoder runner. Its cache is transformers' own cache object, held as the KVCache's
    single value."""

    def __init__(self, loaded: LoadedModel, baseline: str = "cpu-fp32"):
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}")
        self.loaded, self.baseline = loaded, baseline
        self.model = loaded.model
        self.config: dict[str, Any] = loaded.config.to_dict()
        self.contract = DecoderContract.from_config(loaded.config)
        self.device = "cuda" if baseline == "cuda-fp16" else "cpu"
        self.provider = f"torch {baseline}"
        self.in_place_cache = False  # transformers' cache object grows
        self.batched_chunks = True
        self.exact_chunks = True
        self.kv_dtype: Any = np.float16 if baseline == "cuda-fp16" else np.float32

    def activate(self) -> TorchDecoder:
        if self.baseline == "cuda-fp16" and next(self.model.parameters()).device.type != "cuda":
            self.model = self.model.half().to("cuda")
        return self

    def deactivate(self) -> None:
        pass  # the model belongs to the caller's LoadedModel

    def empty_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        return KVCache(values=[None], length=0, batch=batch, capacity=capacity)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: KVCache,
             all_logits: bool = False) -> tuple[StepOutput, KVCache]:
        """input_ids, position_ids: [B, S]; attention_mask: [B, past + S] -> logits [B, V] or [B, S, V] (fp32)."""
        import torch

        cache.reserve(input_ids.shape[1])
        start = time.perf_counter()
        with torch.no_grad():
            logits, past = forward(self.model, cache.values[0],
                                   input_ids=torch.from_numpy(np.ascontiguousarray(input_ids, np.int64)).to(self.device),
                                   attention_mask=torch.from_numpy(np.ascontiguousarray(attention_mask, np.int64)).to(self.device),
                                   position_ids=torch.from_numpy(np.ascontiguousarray(position_ids, np.int64)).to(self.device))
        host = (logits if all_logits else logits[:, -1, :]).float().cpu().numpy()
        return StepOutput(logits=host, seconds=time.perf_counter() - start), cache.advanced([past], input_ids.shape[1])

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: list[int], pad_id: int) -> list[int]:
        """transformers' own greedy generate of one sequence: the reference `check` compares our loop with."""
        import torch

        x = torch.tensor([ids], device=self.device)
        out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                  eos_token_id=list(stop_ids), pad_token_id=pad_id, **HF_GREEDY)
        return out[0, len(ids):].tolist()


def _timing_streamer(cuda: bool = False) -> Any:
    from transformers.generation.streamers import BaseStreamer

    class TimingStreamer(BaseStreamer):
        """Timestamps each put(): the first is the prompt, then one per generated step. On CUDA it waits for
        the GPU first, so a timestamp means the token really exists."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            if cuda:
                import torch

                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

        def end(self):
            pass

    return TimingStreamer()


def hf_generate_timings(model: Any, ids: np.ndarray, new_tokens: int, pad_id: int, device: str = "cpu") -> Timings:
    """transformers' generate (PyTorch or optimum's ORTModel), greedy for exactly `new_tokens` tokens."""
    import torch

    x = torch.from_numpy(ids).to(device)
    streamer = _timing_streamer(cuda=device == "cuda")
    with torch.inference_mode():
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       pad_token_id=pad_id, streamer=streamer, **HF_GREEDY)
    t = streamer.times
    return t[1] - t[0], list(np.diff(t[1:]))
