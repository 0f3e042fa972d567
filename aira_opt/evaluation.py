"""`aira-opt eval`: the quality of any model file, measured the same way for every format. The reference is
PyTorch fp32 on the source model; every candidate (our export folder, a GGUF file through llama.cpp, an
onnxruntime-genai folder) reads the same token ids of real held-out text, window by window, and is compared
position by position:

- perplexity over a sliding window (each token scored once, with at least `window - stride` tokens of context
  after the first window), the candidate's and the reference's;
- the KL divergence of the candidate's next-token distribution from the reference's, KL(P_ref || P_cand), its
  mean and 99th percentile over scored positions (llama.cpp's perplexity tool reports these as "Mean KLD" and
  "99.0% KLD");
- top-1 agreement: the share of positions where both put the same token first.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aira_opt.core.errors import AiraOptError, MissingExtraError, OptionError
from aira_opt.core.numerics import log_softmax
from aira_opt.core.progress import bar
from aira_opt.core.tables import tell_apart
from aira_opt.folders import ExportFolder
from aira_opt.parity import sequence_logits
from aira_opt.precision.variants import variant
from aira_opt.runtime.openvino import OpenVinoLogits, openvino_python
from aira_opt.runtime.ort import OrtDecoder
from aira_opt.runtime.pytorch import TorchDecoder
from aira_opt.source.corpus import RealText, real_text
from aira_opt.source.models import LoadedModel, load_model
from aira_opt.source.prompts import text_ids


@dataclass(frozen=True)
class Windows:
    """Sliding windows over a token sequence, as transformers' perplexity guide strides them."""

    window: int = 512  # tokens a candidate sees at once
    stride: int = 256  # how far each window moves; every later window scores its last `stride` targets

    def __post_init__(self) -> None:
        if not 2 <= self.window or not 1 <= self.stride < self.window:  # overlap: each target has a context
            raise OptionError(f"need window >= 2 and 1 <= stride < window, got window {self.window}, "
                              f"stride {self.stride}")

    def split(self, ids: list[int]) -> Iterator[tuple[list[int], int]]:
        """(window ids, first scored row) pairs: row r of a window's logits predicts its token r + 1; rows from
        the first scored one to the end are scored, and every target of `ids` is scored exactly once."""
        scored_until = 1  # ids[0] has nothing before it
        begin = 0
        while scored_until < len(ids):
            end = min(begin + self.window, len(ids))
            yield ids[begin:end], scored_until - 1 - begin
            scored_until = end
            begin += self.stride


@dataclass(frozen=True)
class Reference:
    """The reference's distributions at one window's scored positions, computed once for every candidate."""

    logp: np.ndarray  # [N, V] log-probabilities
    probs: np.ndarray  # [N, V]
    top1: np.ndarray  # [N]
    targets: np.ndarray  # [N] the tokens that followed
    nll: float  # the reference's negative log-likelihood of the targets

    @classmethod
    def of(cls, logits: np.ndarray, targets: np.ndarray) -> Reference:
        """logits: [N, V] predicting targets [N]."""
        logp = log_softmax(logits)
        return cls(logp, np.exp(logp), logp.argmax(-1), targets,
                   -float(logp[np.arange(len(targets)), targets].sum()))


@dataclass
class Tally:
    """What one candidate accumulated over the scored positions."""

    nll: float = 0.0
    nll_reference: float = 0.0
    kl: list[np.ndarray] = field(default_factory=list)  # per scored position
    top1: int = 0
    tokens: int = 0

    def add(self, reference: Reference, candidate: np.ndarray) -> None:
        """candidate: [N, V] logits at the reference's positions."""
        cand = log_softmax(candidate)
        self.nll -= float(cand[np.arange(len(reference.targets)), reference.targets].sum())
        self.nll_reference += reference.nll
        self.kl.append((reference.probs * (reference.logp - cand)).sum(-1))
        self.top1 += int((reference.top1 == cand.argmax(-1)).sum())
        self.tokens += len(reference.targets)

    def summary(self) -> dict[str, float | int]:
        kl = np.concatenate(self.kl) if self.kl else np.zeros(0)
        return {"tokens": self.tokens, "perplexity": float(np.exp(self.nll / self.tokens)),
                "perplexity_reference": float(np.exp(self.nll_reference / self.tokens)),
                "kl_divergence_mean": float(kl.mean()), "kl_divergence_p99": float(np.percentile(kl, 99)),
                "top1_agreement": self.top1 / self.tokens}


# ---- Logit sources: one interface for every format ------------------------------------------------------------

class LogitSource:
    """A model file that gives the logits of every position of a window of token ids: [T] -> [T, V]."""

    label: str
    format: str
    runtime: dict[str, str] | None = None  # what the report records of the runtime, where its format says too little

    def logits(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class DecoderSource(LogitSource):
    """Our runners (PyTorch, ONNX Runtime): one prefill over the window."""

    def __init__(self, decoder: Any, label: str, format: str):
        self.decoder, self.label, self.format = decoder.activate(), label, format

    def logits(self, ids: list[int]) -> np.ndarray:
        return sequence_logits(self.decoder, ids)

    def close(self) -> None:
        self.decoder.deactivate()


class LlamaCppSource(LogitSource):
    """A GGUF file through llama.cpp (llama-cpp-python), every position's logits kept."""

    format = "gguf"

    def __init__(self, path: Path, window: int, threads: int | None):
        try:
            import llama_cpp
        except ImportError as exc:
            raise MissingExtraError("--gguf (llama.cpp)", "llamacpp",
                                    "or benchmarks/build_llamacpp.sh --cached-only") from exc
        self.label = f"llama.cpp {path.name}"
        try:
            self.model = llama_cpp.Llama(model_path=str(path), n_ctx=window, n_batch=window, logits_all=True,
                                         n_threads=threads, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise AiraOptError(f"llama.cpp cannot load '{path}' ({exc}); is it a GGUF file?") from exc

    def logits(self, ids: list[int]) -> np.ndarray:
        self.model.reset()
        self.model.eval(ids)
        return np.array(self.model.scores[: len(ids)], dtype=np.float32)

    def close(self) -> None:
        self.model.close()


class GenaiSource(LogitSource):
    """An onnxruntime-genai folder (its builder's, or ours) through onnxruntime-genai's own generator."""

    format = "genai"

    def __init__(self, folder: Path):
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise MissingExtraError("--genai (onnxruntime-genai)", "genai") from exc
        self.og, self.label = og, f"onnxruntime-genai {folder}"
        self.model = og.Model(str(folder))

    def logits(self, ids: list[int]) -> np.ndarray:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids))  # the window fits the context; no token is generated
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        return np.array(generator.get_output("logits"), dtype=np.float32)[0]  # [1, T, V] -> [T, V]


class OpenVinoSource(LogitSource):
    """An OpenVINO IR folder (optimum-intel's export) through OVModelForCausalLM, in OpenVINO's own environment."""

    format = "openvino"

    def __init__(self, folder: Path, python: str | None, threads: int | None):
        self.model = OpenVinoLogits(folder, openvino_python(python), threads)
        self.label = f"openvino {folder.name}"
        self.runtime = self.model.info  # its version and the CPU plugin's inference precision (bf16 on some CPUs)

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.model.logits(ids)

    def close(self) -> None:
        self.model.close()


@dataclass(frozen=True)
class Candidate:
    """What the user named: a format and a path."""

    format: str  # "onnx" | "gguf" | "genai" | "openvino"
    path: Path
    python: str | None = None  # the interpreter of the format's own environment (openvino)

    def open(self, windows: Windows, threads: int | None) -> LogitSource:
        if self.format == "onnx":
            folder = ExportFolder(self.path)
            made_by = "ours" if variant(folder.manifest.precision).recipe is not None else "peer"  # optimum's int8
            return DecoderSource(OrtDecoder(folder, threads=threads), f"{made_by} {folder.manifest.label}", "onnx")
        if self.format == "gguf":
            return LlamaCppSource(self.path, windows.window, threads)
        if self.format == "openvino":
            return OpenVinoSource(self.path, self.python, threads)
        return GenaiSource(self.path)


def corpus_ids(loaded: LoadedModel, text: RealText, max_tokens: int | None) -> list[int]:
    """The text's ids with the model's own tokenizer (bos first where the tokenizer uses one); control-token
    strings in the text stay text."""
    tok = loaded.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ids = bos + text_ids(tok, text.text)
    return ids[:max_tokens] if max_tokens else ids


def evaluate(loaded: LoadedModel, candidates: list[Candidate], text: RealText, windows: Windows,
             max_tokens: int | None = None, threads: int | None = None, quiet: bool = False,
             on_skip: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every candidate against the reference on the same ids, window by window (the reference runs once per
    window). A candidate whose runtime is not installed is skipped with its reason."""
    ids = corpus_ids(loaded, text, max_tokens)
    if len(ids) < 2:
        raise OptionError("the corpus slice has fewer than 2 tokens")
    vocab = loaded.config.vocab_size
    context = getattr(loaded.config, "max_position_embeddings", None)
    if context and windows.window > context:
        raise OptionError(f"--window {windows.window} is longer than the model's context ({context} positions)")
    reference = DecoderSource(TorchDecoder(loaded), "PyTorch fp32", "torch")
    sources: list[LogitSource] = []
    skipped: list[dict[str, str]] = []
    try:
        opened: list[Candidate] = []
        for candidate in candidates:
            try:
                sources.append(candidate.open(windows, threads))
                opened.append(candidate)
            except MissingExtraError as exc:
                skipped.append({"format": candidate.format, "path": str(candidate.path), "reason": str(exc)})
                if on_skip:
                    on_skip(f"skipped {candidate.path}: {exc}")
        tallies = [Tally() for _ in sources]
        seconds = [0.0 for _ in sources]
        for window_ids, first in bar(list(windows.split(ids)), "eval windows", quiet=quiet):
            ref = Reference.of(reference.logits(window_ids)[first:-1, :vocab], np.array(window_ids[first + 1:]))
            for i, source in enumerate(sources):
                start = time.perf_counter()
                cand = source.logits(window_ids)
                seconds[i] += time.perf_counter() - start
                if cand.shape[-1] < vocab:
                    raise AiraOptError(f"{source.label} gives {cand.shape[-1]} logits per position, the reference "
                                       f"{vocab}: not the same vocabulary")
                tallies[i].add(ref, cand[first:-1, :vocab])
    finally:
        for source in [reference, *sources]:
            source.close()
    labels = tell_apart([s.label for s in sources], [c.path.name for c in opened])  # two folders, one variant
    return {
        "reference": {"model": loaded.describe()["name"], "runner": "PyTorch fp32"},
        "corpus": {**text.describe(), "tokens_available": len(ids),
                   "ids_sha256": hashlib.sha256(np.array(ids, dtype=np.int64).tobytes()).hexdigest()},
        "window": windows.window, "stride": windows.stride,
        "results": [{"label": label, "format": s.format, "path": str(c.path), **t.summary(), "seconds": round(sec, 2),
                     **({"runtime": s.runtime} if s.runtime else {})}
                    for label, s, c, t, sec in zip(labels, sources, opened, tallies, seconds)],
        "skipped": skipped,
    }


def eval_table(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    headers = ["candidate", "tokens", "perplexity", "vs reference", "KL mean", "KL p99", "top-1"]
    rows = [[r["label"], r["tokens"], f"{r['perplexity']:.4f}",
             f"{100 * (r['perplexity'] / r['perplexity_reference'] - 1):+.2f}%", f"{r['kl_divergence_mean']:.5f}",
             f"{r['kl_divergence_p99']:.4f}", f"{r['top1_agreement']:.4f}"] for r in report["results"]]
    return headers, rows


__all__ = ["Candidate", "Windows", "Reference", "Tally", "evaluate", "eval_table"]


def evaluate_files(onnx: list[Path], gguf: list[Path], genai: list[Path], model_spec: str | None, corpus: str,
                   windows: Windows, max_tokens: int | None, threads: int | None, quiet: bool,
                   on_skip: Callable[[str], None] | None, openvino: list[Path] = (),
                   openvino_python: str | None = None) -> dict[str, Any]:
    """`eval` on named files: the reference is `model_spec`, else the first export folder's source model."""
    candidates = ([Candidate("onnx", p) for p in onnx] + [Candidate("gguf", p) for p in gguf]
                  + [Candidate("genai", p) for p in genai]
                  + [Candidate("openvino", p, openvino_python) for p in openvino])
    if not candidates:
        raise OptionError("nothing to evaluate: pass --onnx DIR, --gguf FILE, --genai DIR or --openvino DIR")
    spec, layers = model_spec, None
    if spec is None and onnx:
        manifest = ExportFolder(onnx[0]).manifest
        spec, layers = manifest.source_spec, manifest.num_layers_override
    if not spec:
        raise OptionError("name the source model with --model (the fp32 PyTorch reference)")
    loaded = load_model(spec, layers)
    return evaluate(loaded, candidates, real_text(corpus), windows, max_tokens, threads, quiet, on_skip)
