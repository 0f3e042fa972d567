"""Bench runners: one per backend, one interface (activate / infer / deactivate, as Polygraphy's runners share
one), in a registry that `--backends` chooses from. Each runs greedy on given token ids for a fixed number of
new tokens, eos ignored, and returns the time to the first token and the time of every decode step."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from aira_opt.bench.weights import gguf_weight_bytes, onnx_weight_bytes
from aira_opt.generation.loop import GenerateOptions, generate
from aira_opt.generation.sampling import GREEDY, HF_GREEDY
from aira_opt.precision.kernels import kernel_summary
from aira_opt.runtime.decoder import Decoder
from aira_opt.runtime.ort import OrtDecoder
from aira_opt.runtime.providers import PROVIDERS, session_options
from aira_opt.spec.models import load_model
from aira_opt.tensorrt.engines import PLAN_FILE, TrtDecoder

Timings = tuple[float, list[float]]  # (seconds to the first token, seconds of each decode step)


@dataclass(frozen=True)
class Job:
    """One backend on one model, run for every setting in its own process."""

    backend: str  # a key of RUNNERS
    label: str  # what the table shows, e.g. "ort int4"
    precision: str  # the variant's folder name, e.g. "int4-b128"
    folder: str = ""  # export folder (ort, optimum), onnxruntime-genai folder (genai), engine folder (trt)
    model_spec: str = ""  # --model spec (torch)
    num_layers: int | None = None  # depth override of a random preset (torch)
    provider: str = "cpu"  # ONNX Runtime provider (ort, optimum)
    python: str = ""  # the interpreter of another virtual environment to run this job in ("" = this one)


class BenchRunner:
    """Load once (activate), time greedy runs (infer), let go (deactivate). After activate: where the weights
    live (`device`), the bytes on disk and the weight bytes one decode step reads."""

    name: ClassVar[str]

    def __init__(self, job: Job, threads: int | None, eos: int, pad: int, positions: int = 0):
        self.job, self.threads, self.eos, self.pad = job, threads, eos, pad
        self.positions = positions  # the longest prompt + new tokens it will be asked for (0: unknown)
        self.device = "cpu" if job.provider == "cpu" else "cuda"
        self.size_bytes = self.weight_bytes = 0
        self.kernels = ""  # which kernels ran, where the backend makes a choice (the bench row shows it)

    def activate(self) -> None:
        raise NotImplementedError

    def infer(self, ids: np.ndarray, new_tokens: int) -> Timings:
        """ids: [B, P] -> timings of producing `new_tokens` tokens per row."""
        raise NotImplementedError

    def deactivate(self) -> None:
        """Drop what activate loaded (the child process ends right after, so this is usually nothing)."""


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


class TorchRunner(BenchRunner):
    """transformers' generate on the PyTorch model: fp32 on the CPU, fp16 on a GPU (what users run there)."""

    name = "torch"

    def activate(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        model = load_model(self.job.model_spec, num_layers=self.job.num_layers).model
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            model = model.half().to(self.device)
        self.model = model
        self.size_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        emb = model.get_input_embeddings().weight  # a lookup table: one row per token is read, not the table
        self.weight_bytes = self.size_bytes - emb.numel() * emb.element_size()

    def infer(self, ids: np.ndarray, new_tokens: int) -> Timings:
        return hf_generate_timings(self.model, ids, new_tokens, self.pad, self.device)


class OptimumRunner(BenchRunner):
    """optimum's ORTModelForCausalLM over an export folder, through transformers' generate."""

    name = "optimum"

    def activate(self) -> None:
        from optimum.onnxruntime import ORTModelForCausalLM

        self.size_bytes, self.weight_bytes = onnx_weight_bytes(Path(self.job.folder))
        self.model = ORTModelForCausalLM.from_pretrained(
            self.job.folder, use_cache=True, use_io_binding=self.device == "cuda",
            provider=PROVIDERS[self.job.provider][0], session_options=session_options(self.threads))

    def infer(self, ids: np.ndarray, new_tokens: int) -> Timings:
        return hf_generate_timings(self.model, ids, new_tokens, self.pad, self.device)


class LoopRunner(BenchRunner):
    """Our generation loop over a Decoder; subclasses say which."""

    decoder: Decoder

    def infer(self, ids: np.ndarray, new_tokens: int) -> Timings:
        options = GenerateOptions(max_new_tokens=new_tokens, ignore_eos=True, sampling=GREEDY)
        result = generate(self.decoder, [list(r) for r in ids], options, self.eos, self.pad)
        return result.prefill_seconds, result.decode_seconds

    def deactivate(self) -> None:
        self.decoder.deactivate()


class OrtRunner(LoopRunner):
    name = "ort"

    def activate(self) -> None:
        self.size_bytes, self.weight_bytes = onnx_weight_bytes(Path(self.job.folder))
        self.decoder = OrtDecoder(Path(self.job.folder), provider=self.job.provider, threads=self.threads).activate()
        self.kernels = kernel_summary(self.decoder.manifest)


class TrtRunner(LoopRunner):
    name = "trt"

    def activate(self) -> None:
        self.size_bytes = self.weight_bytes = (Path(self.job.folder) / PLAN_FILE).stat().st_size
        self.decoder = TrtDecoder(Path(self.job.folder)).activate()
        self.device = "cuda"


def genai_threads(threads: int | None) -> dict[str, int]:
    """onnxruntime-genai session options: bench's --threads (all cores when not given), one inter-op thread."""
    return {"intra_op_num_threads": threads or os.cpu_count() or 1, "inter_op_num_threads": 1}


class GenaiRunner(BenchRunner):
    """onnxruntime-genai's own generator over a folder it can load (its builder's, or ours)."""

    name = "genai"

    def activate(self) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.size_bytes, self.weight_bytes = onnx_weight_bytes(Path(self.job.folder))
        config = og.Config(self.job.folder)
        # The same thread settings as every other backend: left to its folder's defaults, onnxruntime-genai ran
        # at a fraction of its speed here (benchmarks/README.md), an unfair comparison.
        config.overlay(json.dumps({"model": {"decoder": {"session_options": genai_threads(self.threads)}}}))
        self.model = og.Model(config)

    def infer(self, ids: np.ndarray, new_tokens: int) -> Timings:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=ids.shape[1] + new_tokens, min_length=ids.shape[1] + new_tokens,
                                  do_sample=False, batch_size=ids.shape[0])
        generator = og.Generator(self.model, params)
        t0 = time.perf_counter()
        generator.append_tokens(ids.astype(np.int32))
        t1 = time.perf_counter()
        steps = []
        while not generator.is_done() and len(steps) < new_tokens - 1:
            s = time.perf_counter()
            generator.generate_next_token()
            steps.append(time.perf_counter() - s)
        return t1 - t0, steps


class LlamaCppRunner(BenchRunner):
    """llama.cpp (llama-cpp-python) over a GGUF file: the same token ids in, greedy on the last logits, one
    sequence at a time (its Python API decodes one sequence)."""

    name = "llamacpp"

    def activate(self) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.size_bytes, self.weight_bytes = gguf_weight_bytes(Path(self.job.folder))
        threads = self.threads or os.cpu_count() or 1
        self.model = llama_cpp.Llama(model_path=self.job.folder, n_ctx=self.positions or 0, n_batch=512,
                                     n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
        system = llama_cpp.llama_print_system_info().decode()  # "AVX2 = 1 | ..." as built for this CPU
        simd = [f for f in ("AVX512", "AVX512_VNNI", "AVX_VNNI", "AMX_INT8", "AVX2") if f"{f} = 1" in system]
        self.kernels = f"llama.cpp {self.job.precision} ({', '.join(simd)})"  # precision: the GGUF's type

    def last_logits(self) -> np.ndarray:
        pointer = self.llama_cpp.llama_get_logits_ith(self.model.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.model.n_vocab(),))  # [V]

    def greedy(self, ids: np.ndarray, new_tokens: int) -> tuple[list[int], Timings]:
        """ids: [1, P] -> the greedy tokens and their timings."""
        if ids.shape[0] != 1:
            raise ValueError("llama.cpp is benched at batch 1 only (its Python API decodes one sequence)")
        self.model.reset()  # the next eval starts at position 0 and drops the old cache
        start = time.perf_counter()
        self.model.eval(ids[0].tolist())  # prefill: ids [P]
        tokens = [int(np.argmax(self.last_logits()))]
        first = time.perf_counter() - start
        steps = []
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            self.model.eval(tokens[-1:])
            tokens.append(int(np.argmax(self.last_logits())))
            steps.append(time.perf_counter() - start)
        return tokens, (first, steps)

    def infer(self, ids: np.ndarray, new_tokens: int) -> Timings:
        return self.greedy(ids, new_tokens)[1]

    def deactivate(self) -> None:
        self.model.close()


RUNNERS: dict[str, type[BenchRunner]] = {r.name: r for r in (TorchRunner, OrtRunner, OptimumRunner, GenaiRunner,
                                                             TrtRunner, LlamaCppRunner)}
