"""Bench backends: one runner per backend, in the runner family's interface (activate / deactivate, as every
runtime.protocol.Runner, plus `infer`), in a registry that `--backends` chooses from. Each backend also says which
sources it takes (`plan`: export folders, engine folders, GGUF files, the source model), so planning never
branches on backend names. Each runs greedy on given token ids for a fixed number of new tokens, eos ignored,
and returns the time to the first token and the time of every decode step."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from aira_opt.benchmark.weights import gguf_type, gguf_weight_bytes, onnx_weight_bytes
from aira_opt.core.errors import MissingExtraError, TensorRTUnavailableError
from aira_opt.core.tables import tell_apart
from aira_opt.folders import EngineFolder, ExportFolder
from aira_opt.generation.generator import GenerateOptions, generate
from aira_opt.generation.sampling import GREEDY
from aira_opt.generation.speculative import Speculation
from aira_opt.precision.kernels import kernel_summary
from aira_opt.precision.variants import variant_named_in
from aira_opt.runners import check_draft
from aira_opt.runtime.openvino import openvino_python
from aira_opt.runtime.ort import OrtDecoder
from aira_opt.runtime.providers import PROVIDERS, session_options
from aira_opt.runtime.pytorch import Timings, hf_generate_timings
from aira_opt.runtime.protocol import Decoder, Runner
from aira_opt.source.models import load_model
from aira_opt.tensorrt.engines import TrtDecoder, import_tensorrt, require_gpu


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
    speculative: str = ""  # our loop's speculation: "ngram" or "draft" ("" = none)
    draft: str = ""  # the draft export folder ("draft")
    num_speculative_tokens: int = 0  # 0: the method's default


@dataclass
class BenchSources:
    """What a bench was given: the source model, and the files each backend may take."""

    model_spec: str
    num_layers: int | None = None
    onnx_dirs: list[Path] = field(default_factory=list)
    engines: list[Path] = field(default_factory=list)
    genai_dirs: list[Path] = field(default_factory=list)
    gguf_files: list[Path] = field(default_factory=list)
    provider: str = "cpu"
    optimum_python: str | None = None  # another virtual environment's interpreter for optimum
    speculative: str | None = None  # add our loop's rows with this speculation ("ngram" or "draft")
    draft_dir: Path | None = None  # the draft export ("draft")
    num_speculative_tokens: int | None = None
    openvino_dirs: list[Path] = field(default_factory=list)  # OpenVINO IR folders (optimum-cli export openvino)
    openvino_python: str | None = None  # OpenVINO's own environment's interpreter


Planned = tuple[list[Job], list[str]]  # the jobs a backend will run, and the reasons it runs none (or fewer)


class BenchRunner(Runner):
    """Load once (activate), time greedy runs (infer), let go (deactivate). After activate: where the weights
    live (`device`), the bytes on disk and the weight bytes one decode step reads."""

    name: ClassVar[str]

    def __init__(self, job: Job, threads: int | None, eos: int, pad: int, positions: int = 0):
        self.job, self.threads, self.eos, self.pad = job, threads, eos, pad
        self.positions = positions  # the longest prompt + new tokens it will be asked for (0: unknown)
        self.device = "cpu" if job.provider == "cpu" else "cuda"
        self.size_bytes = self.weight_bytes = 0
        self.kernels = ""  # which kernels ran, where the backend makes a choice (the bench row shows it)
        self.speculation: list[dict] = []  # our loop's acceptance per run, when it speculates

    @classmethod
    def plan(cls, sources: BenchSources) -> Planned:
        """The jobs this backend runs on these sources, and the reasons where it runs none."""
        raise NotImplementedError

    def activate(self) -> BenchRunner:
        raise NotImplementedError

    def infer(self, ids: np.ndarray, new_tokens: int) -> Timings:
        """ids: [B, P] -> timings of producing `new_tokens` tokens per row."""
        raise NotImplementedError

    def deactivate(self) -> None:
        """Drop what activate loaded (the child process ends right after, so this is usually nothing)."""


def jobs_on_exports(backend: str, sources: BenchSources, python: str = "") -> list[Job]:
    """One job per export folder, labelled by its manifest's variant (and the provider, off the CPU)."""
    where = "" if sources.provider == "cpu" else f" ({sources.provider})"
    jobs = []
    labels = [ExportFolder(folder).manifest.label for folder in sources.onnx_dirs]
    rows = tell_apart(labels, [Path(folder).name for folder in sources.onnx_dirs])
    for folder, label, row in zip(sources.onnx_dirs, labels, rows):
        jobs.append(Job(backend, f"{backend} {row}{where}", label, folder=str(folder), provider=sources.provider,
                        python=python))
    return jobs


class TorchRunner(BenchRunner):
    """transformers' generate on the PyTorch model: fp32 on the CPU, fp16 on a GPU (what users run there)."""

    name = "torch"

    @classmethod
    def plan(cls, sources: BenchSources) -> Planned:
        import torch  # heavy: only when PyTorch is benched

        precision = "fp16" if torch.cuda.is_available() else "fp32"  # what users run on each device
        return [Job(cls.name, f"torch {precision}", precision, model_spec=sources.model_spec,
                    num_layers=sources.num_layers)], []

    def activate(self) -> TorchRunner:
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
        return self

    def infer(self, ids: np.ndarray, new_tokens: int) -> Timings:
        return hf_generate_timings(self.model, ids, new_tokens, self.pad, self.device)


class OptimumRunner(BenchRunner):
    """optimum's ORTModelForCausalLM over an export folder, through transformers' generate."""

    name = "optimum"

    @classmethod
    def plan(cls, sources: BenchSources) -> Planned:
        if not sources.optimum_python:
            try:
                import optimum.onnxruntime  # noqa: F401
            except ImportError as exc:
                return [], [f"optimum is not importable here ({exc}); pip install 'aira-opt[optimum]' in a virtual "
                            "environment of its own (it pins transformers 4.57) and pass its interpreter with "
                            "--optimum-python"]
        return jobs_on_exports(cls.name, sources, sources.optimum_python or ""), []

    def activate(self) -> OptimumRunner:
        from optimum.onnxruntime import ORTModelForCausalLM

        self.size_bytes, self.weight_bytes = onnx_weight_bytes(Path(self.job.folder))
        self.model = ORTModelForCausalLM.from_pretrained(
            self.job.folder, use_cache=True, use_io_binding=self.device == "cuda",
            provider=PROVIDERS[self.job.provider][0], session_options=session_options(self.threads))
        return self

    def infer(self, ids: np.ndarray, new_tokens: int) -> Timings:
        return hf_generate_timings(self.model, ids, new_tokens, self.pad, self.device)


class LoopRunner(BenchRunner):
    """Our generator over a decoder runner; subclasses say which."""

    decoder: Decoder

    draft: Decoder | None = None

    def infer(self, ids: np.ndarray, new_tokens: int) -> Timings:
        speculation = None
        if self.job.speculative:
            speculation = Speculation(self.job.speculative, self.job.num_speculative_tokens or None)
        options = GenerateOptions(max_new_tokens=new_tokens, ignore_eos=True, sampling=GREEDY,
                                  speculation=speculation)
        result = generate(self.decoder, [list(r) for r in ids], options, self.eos, self.pad, draft=self.draft)
        if result.speculation is not None:
            self.speculation.append(result.speculation)
        return result.prefill_seconds, result.per_token_seconds()  # one entry per token, as every backend gives

    def deactivate(self) -> None:
        self.decoder.deactivate()
        if self.draft is not None:
            self.draft.deactivate()


class OrtRunner(LoopRunner):
    name = "ort"

    @classmethod
    def plan(cls, sources: BenchSources) -> Planned:
        """Every export; with speculation asked for, every export again speculating beside its plain row."""
        plain = jobs_on_exports(cls.name, sources)
        if not sources.speculative:
            return plain, []
        how = "ngram"
        if sources.draft_dir is not None:
            how = f"draft {ExportFolder(sources.draft_dir).manifest.label}"
            for job in plain:
                check_draft(job.folder, sources.draft_dir)  # a draft that cannot propose is one line, before any run
        k = sources.num_speculative_tokens or 0
        return plain + [replace(job, label=f"{job.label} + {how}", speculative=sources.speculative,
                                draft=str(sources.draft_dir or ""), num_speculative_tokens=k) for job in plain], []

    def activate(self) -> OrtRunner:
        self.size_bytes, self.weight_bytes = onnx_weight_bytes(Path(self.job.folder))
        shared = bool(self.job.draft)  # a target and its draft take turns on one thread pool
        if self.job.draft:
            self.draft = OrtDecoder(Path(self.job.draft), provider=self.job.provider, threads=self.threads,
                                    shared_threads=True).activate()
        self.decoder = OrtDecoder(Path(self.job.folder), provider=self.job.provider, threads=self.threads,
                                  shared_threads=shared).activate()
        self.kernels = kernel_summary(self.decoder.manifest.kernels if self.decoder.manifest else None)
        return self


class TrtRunner(LoopRunner):
    name = "trt"

    @classmethod
    def plan(cls, sources: BenchSources) -> Planned:
        if not sources.engines:
            return [], []
        try:
            import_tensorrt()
            require_gpu()
        except TensorRTUnavailableError as exc:
            return [], [f"{engine}: {exc.message}" for engine in sources.engines]
        precisions = [EngineFolder(engine).record.precision for engine in sources.engines]
        return [Job(cls.name, f"trt {p}", p, folder=str(e)) for e, p in zip(sources.engines, precisions)], []

    def activate(self) -> TrtRunner:
        engine = EngineFolder(self.job.folder)
        self.size_bytes = self.weight_bytes = engine.plan_path.stat().st_size
        self.decoder = TrtDecoder(engine).activate()
        self.device = "cuda"
        return self


class PeerRunner(BenchRunner):
    """A peer that runs its own files: what `bench` must be given, the module it imports, how to get that."""

    source_option: ClassVar[str]  # e.g. "--genai folder (build one with benchmarks/build_genai.sh)"
    module: ClassVar[str]  # imported by the runner
    install: ClassVar[str]  # how to get the module

    @classmethod
    def sources(cls, given: BenchSources) -> list[Path]:
        raise NotImplementedError

    @classmethod
    def label(cls, source: Path) -> str:
        """The precision a source holds."""
        raise NotImplementedError

    @classmethod
    def plan(cls, sources: BenchSources) -> Planned:
        given = cls.sources(sources)
        if not given:
            return [], [f"no {cls.source_option}"]
        if importlib.util.find_spec(cls.module) is None:
            return [], [cls.install]
        labelled = [(source, cls.label(source)) for source in given]  # reads each source's header once
        return [Job(cls.name, f"{cls.name} {label}", label, folder=str(source)) for source, label in labelled], []


def genai_threads(threads: int | None) -> dict[str, int]:
    """onnxruntime-genai session options: bench's --threads (all cores when not given), one inter-op thread."""
    return {"intra_op_num_threads": threads or os.cpu_count() or 1, "inter_op_num_threads": 1}


class GenaiRunner(PeerRunner):
    """onnxruntime-genai's own generator over a folder it can load (its builder's, or ours)."""

    name = "genai"
    source_option = "--genai folder (build one with benchmarks/build_genai.sh)"
    module = "onnxruntime_genai"
    install = "onnxruntime-genai is not installed (pip install 'aira-opt[genai]')"

    @classmethod
    def sources(cls, given: BenchSources) -> list[Path]:
        return given.genai_dirs

    @classmethod
    def label(cls, source: Path) -> str:
        """The precision its folder's name mentions (benchmarks/build_genai.sh names them genai-int4):
        onnxruntime-genai's folders carry no manifest of ours."""
        found = variant_named_in(Path(source).name)
        return found.name if found else "genai"

    def activate(self) -> GenaiRunner:
        import onnxruntime_genai as og

        self.og = og
        self.size_bytes, self.weight_bytes = onnx_weight_bytes(Path(self.job.folder))
        config = og.Config(self.job.folder)
        # The same thread settings as every other backend: left to its folder's defaults, onnxruntime-genai ran
        # at a fraction of its speed here (benchmarks/README.md), an unfair comparison.
        config.overlay(json.dumps({"model": {"decoder": {"session_options": genai_threads(self.threads)}}}))
        self.model = og.Model(config)
        return self

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


class LlamaCppRunner(PeerRunner):
    """llama.cpp (llama-cpp-python) over a GGUF file: the same token ids in, greedy on the last logits, one
    sequence at a time (its Python API decodes one sequence)."""

    name = "llamacpp"
    source_option = ("--gguf file (benchmarks/make_gguf.py converts and quantizes a checkpoint with llama.cpp's own "
                     "tools)")
    module = "llama_cpp"
    install = ("llama-cpp-python is not installed (PyPI has no CPU wheel: benchmarks/build_llamacpp.sh builds one for "
               "this CPU and caches it)")

    @classmethod
    def sources(cls, given: BenchSources) -> list[Path]:
        return given.gguf_files

    @classmethod
    def label(cls, source: Path) -> str:
        return gguf_type(source)

    def activate(self) -> LlamaCppRunner:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.size_bytes, self.weight_bytes = gguf_weight_bytes(Path(self.job.folder))
        threads = self.threads or os.cpu_count() or 1
        self.model = llama_cpp.Llama(model_path=self.job.folder, n_ctx=self.positions or 0, n_batch=512,
                                     n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
        system = llama_cpp.llama_print_system_info().decode()  # "AVX2 = 1 | ..." as built for this CPU
        simd = [f for f in ("AVX512", "AVX512_VNNI", "AVX_VNNI", "AMX_INT8", "AVX2") if f"{f} = 1" in system]
        self.kernels = f"llama.cpp {self.job.precision} ({', '.join(simd)})"  # precision: the GGUF's type
        return self

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


class OpenVinoRunner(BenchRunner):
    """OpenVINO GenAI's LLMPipeline over an IR folder, in OpenVINO's own environment, given the same token ids.
    Its prompt-prefix cache is switched off: a repeat of the same ids would otherwise skip the prefill."""

    name = "openvino"

    @classmethod
    def plan(cls, sources: BenchSources) -> Planned:
        if not sources.openvino_dirs:
            return [], ["no --openvino folder (optimum-cli export openvino, in OpenVINO's environment)"]
        try:
            python = openvino_python(sources.openvino_python)
        except MissingExtraError as exc:
            return [], [str(exc)]
        python = "" if python == sys.executable else python
        return [Job(cls.name, f"{cls.name} {Path(d).name.removeprefix('openvino-')}",
                    Path(d).name, folder=str(d), python=python) for d in sources.openvino_dirs], []

    def activate(self) -> OpenVinoRunner:
        import openvino_genai as genai

        folder = Path(self.job.folder)
        self.size_bytes = sum(f.stat().st_size for f in folder.glob("*.bin"))
        self.weight_bytes = self.size_bytes  # counted as read every step: over by the embedding, only gathered from
        scheduler = genai.SchedulerConfig()
        scheduler.enable_prefix_caching = False
        threads = {"INFERENCE_NUM_THREADS": self.threads} if self.threads else {}
        self.genai = genai
        self.pipe = genai.LLMPipeline(str(folder), "CPU", scheduler_config=scheduler, **threads)
        return self

    def infer(self, ids: np.ndarray, new_tokens: int) -> Timings:
        import openvino as ov

        genai, times = self.genai, []

        class Clock(genai.StreamerBase):
            def write(self, token):  # a token, or a list of them
                times.extend([time.perf_counter()] * (len(token) if isinstance(token, list) else 1))
                return genai.StreamingStatus.RUNNING

            def end(self):
                pass

        config = genai.GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        inputs = genai.TokenizedInputs(ov.Tensor(ids.astype(np.int64)), ov.Tensor(np.ones_like(ids, dtype=np.int64)))
        start = time.perf_counter()
        self.pipe.generate(inputs, config, Clock())
        return times[0] - start, list(np.diff(times))

    def deactivate(self) -> None:
        del self.pipe


RUNNERS: dict[str, type[BenchRunner]] = {r.name: r for r in (TorchRunner, OrtRunner, OptimumRunner, GenaiRunner,
                                                             TrtRunner, LlamaCppRunner, OpenVinoRunner)}
