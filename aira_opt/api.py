"""The Python API: what people embed in their own programs, as they use onnxruntime-genai's `og.Model` or
optimum's `ORTModelForCausalLM`. The CLI's commands are thin layers over the same calls.

    model = aira_opt.load("export/aira-tiny/fp32")          # an export or engine folder
    model.generate("What is the capital of Brazil?")         # -> str, with the export's own generation defaults
    model.generate(["q1", "q2"], max_new_tokens=32)          # a batch -> list[str]
    model.generate("Repeat: ...", speculative="ngram")        # the same answer, fewer target steps
    aira_opt.load("export/m/fp32", draft="export/m/int4")    # the int4 export drafts for the fp32 one
    for piece in model.stream("Tell me about Brazil."): ...  # text pieces as they are decoded
    folder = aira_opt.export("smollm2-135m", precision="int4", output="out/smol-int4")   # -> ExportFolder
    report = aira_opt.check(folder)                          # -> the same record as `check --json`

Errors are aira-opt's own (aira_opt.AiraOptError and its subclasses), each with a one-line message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from aira_opt.benchmark.backends import BenchSources
from aira_opt.benchmark.jobs import bench as run_bench_jobs
from aira_opt.benchmark.measure import Setting
from aira_opt.benchmark.report import report_json
from aira_opt.evaluation import Windows, evaluate_files
from aira_opt.inspection import inspect_folder
from aira_opt.parity import check_folder
from aira_opt.core.errors import AiraOptError, OptionError
from aira_opt.core.progress import ProgressCallback
from aira_opt.folders import EngineFolder, ExportFolder, open_folder
from aira_opt.generation.defaults import generate_options, speculation_from
from aira_opt.generation.generator import GenerateOptions, GenerationResult, Generator, Row, fitted, generate
from aira_opt.generation.streaming import TextStream
from aira_opt.pipeline.export_plan import ExportPlan, plan_export
from aira_opt.pipeline.export_run import run_export
from aira_opt.runners import check_draft, open_draft, open_runner
from aira_opt.runtime.protocol import Decoder
from aira_opt.source.corpus import LANGUAGE_REFERENCE
from aira_opt.source.prompts import decode_answer, prompt_ids
from aira_opt.serve.server import LOCAL_HOST
from aira_opt.web.layout import web_models
from aira_opt.web.server import WebServer, open_server

__all__ = ["load", "export", "plan_export", "run_export", "check", "check_draft", "evaluate", "bench", "save_web", "serve_web",
           "inspect", "Model",
           "Answer", "ExportFolder", "EngineFolder", "ExportPlan", "AiraOptError"]

FolderLike = str | Path | ExportFolder | EngineFolder


@dataclass(frozen=True)
class Answer:
    """One prompt's answers with what it took: the record `generate --json` prints."""

    prompt: str
    answers: list[str]
    token_ids: list[list[int]]
    prompt_token_ids: list[int]
    finished_at_eos: list[bool]
    time_to_first_token_ms: float
    tokens_per_second: float
    new_tokens: int
    speculation: dict[str, Any] | None = None  # proposals and acceptance, when speculating

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Model:
    """An export (or engine) folder with an active runner, ready to answer. Use it as a context manager, or call
    `close` when done (the runner's session and memory are released)."""

    def __init__(self, folder: ExportFolder | EngineFolder, runner: Decoder, draft: Decoder | None = None):
        self.folder = folder
        self.runner = runner
        self.draft = draft  # a draft model's runner: speculation proposes with it by default
        self.tokenizer = folder.tokenizer
        self.prompt_format = folder.prompt_format

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.runner.deactivate()
        if self.draft is not None:
            self.draft.deactivate()

    def __repr__(self) -> str:
        return f"Model('{self.folder.path}', {self.runner.provider})"

    # Options ------------------------------------------------------------------------------------------------
    def options(self, *, max_new_tokens: int | None = None, temperature: float | None = None,
                top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                greedy: bool = False, seed: int | None = None, num_return_sequences: int = 1,
                speculative: str | None = None, num_speculative_tokens: int | None = None) -> GenerateOptions:
        """The export's own generation defaults (generation_config.json), with what is given here instead.
        temperature 0 means greedy. speculative: "ngram" (prompt lookup), "draft" (the default when the model was
        loaded with one) or "off"; the output is the same, with fewer steps of the target."""
        if num_return_sequences < 1:
            raise OptionError("num_return_sequences must be at least 1")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise OptionError("max_new_tokens must be at least 1")
        if temperature == 0:
            greedy, temperature = True, None
        return generate_options(self.folder.generation_config, greedy=greedy, seed=seed,
                                num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty,
                                speculation=speculation_from(speculative, num_speculative_tokens,
                                                             self.draft is not None))

    # Answers ------------------------------------------------------------------------------------------------
    def prompt_ids(self, text: str) -> list[int]:
        """The question in the export's prompt format, as token ids; control tokens typed in it stay text."""
        if not isinstance(text, str):
            raise OptionError(f"a prompt must be a str, got {type(text).__name__}")
        return prompt_ids(self.tokenizer, text, self.prompt_format)

    def run(self, prompts: Sequence[str], options: GenerateOptions,
            on_token: Callable[[int, int], bool | None] | None = None) -> GenerationResult:
        """Our generator on a batch of questions: token ids and timings (on_token(row, token) as each is chosen)."""
        return generate(self.runner, [self.prompt_ids(p) for p in prompts], options, self.prompt_format.stop_ids,
                        self.prompt_format.pad_id, on_token=on_token, draft=self.draft)

    @overload
    def generate(self, prompt: str, **options: Any) -> str | list[str]: ...

    @overload
    def generate(self, prompt: Sequence[str], **options: Any) -> list[str] | list[list[str]]: ...

    def generate(self, prompt: str | Sequence[str], **options: Any) -> Any:
        """The answer to one question (a str), or one per question for a list. With num_return_sequences above 1,
        a list of answers per question. Options: see `options`."""
        single = isinstance(prompt, str)
        if not single and not isinstance(prompt, Sequence):
            raise OptionError(f"a prompt must be a str or a list of str, got {type(prompt).__name__}")
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise OptionError("no prompts to answer")
        chosen = self.options(**options)
        result = self.run(prompts, chosen)
        texts = [decode_answer(self.tokenizer, tokens) for tokens in result.tokens]
        per_prompt = chosen.num_return_sequences
        grouped = [texts[i:i + per_prompt] for i in range(0, len(texts), per_prompt)]
        answers = [group[0] if per_prompt == 1 else group for group in grouped]
        return answers[0] if single else answers

    def answer(self, prompt: str, **options: Any) -> Answer:
        """One question's answers with token ids and timings (what `generate --json` prints)."""
        result = self.run([prompt], self.options(**options))
        return Answer(prompt=prompt, answers=[decode_answer(self.tokenizer, t) for t in result.tokens],
                      token_ids=result.tokens, prompt_token_ids=result.prompts[0], finished_at_eos=result.finished,
                      time_to_first_token_ms=round(result.ttft_ms, 3),
                      tokens_per_second=round(result.decode_tokens_per_s, 3),
                      new_tokens=sum(len(t) for t in result.tokens), speculation=result.speculation)

    def stream(self, prompt: str, **options: Any) -> Iterator[str]:
        """The answer's text in pieces, each as soon as its tokens decode to whole characters; the pieces add up to
        `generate`'s answer. Stopping the iteration early stops generating."""
        chosen = self.options(**options)
        if chosen.num_return_sequences != 1:
            raise OptionError("stream gives one answer; use generate for num_return_sequences above 1")
        ids = self.prompt_ids(prompt)
        chosen = fitted(self.runner, [ids], chosen)
        text = TextStream(self.tokenizer)
        row = Row(ids, chosen)
        generator = Generator(self.runner, self.prompt_format.stop_ids, self.prompt_format.pad_id, draft=self.draft)
        generator.add([row], capacity=len(ids) + chosen.max_new_tokens)
        while generator.active:
            seen = len(row.tokens)
            generator.step()
            piece = "".join(text.push(token) for token in row.tokens[seen:])
            if piece:
                yield piece
        rest = text.rest()
        if rest:
            yield rest


# The calls ------------------------------------------------------------------------------------------------------
def load(folder: FolderLike, provider: str = "cpu", threads: int | None = None,
         draft: FolderLike | None = None, shared_threads: bool = False) -> Model:
    """An export folder (ONNX Runtime on `provider`: cpu, cuda, tensorrt) or an engine folder (TensorRT),
    loaded and ready to answer. draft: an export with the same tokenizer (the int4 export of the same model, say)
    that proposes tokens for this one to verify: the answers stay this model's own. The draft runs on one thread;
    shared_threads puts it and this model on ONNX Runtime's process-wide pool instead (faster, but from then on
    every ONNX Runtime session of the process must use that pool: onnxruntime's own tools that make sessions,
    such as its static quantizer, then fail. The CLI does it, since its process ends with the command)."""
    opened = open_folder(folder)
    shared = shared_threads and draft is not None
    draft_runner = open_draft(opened, draft, provider, threads, shared) if draft is not None else None
    runner = open_runner(opened, provider, threads, shared_threads=shared)
    runner.activate()
    try:
        if draft_runner is not None:
            draft_runner.activate()
        return Model(opened, runner, draft_runner)
    except BaseException:
        runner.deactivate()
        raise


def export(model: str = "aira-tiny", precision: str = "fp32", output: str | Path | None = None, *,
           force: bool = False, on_progress: ProgressCallback | None = None, **options: Any) -> ExportFolder:
    """Export `model` (a --model spec) as `precision` into `output` (default export/<model>/<variant>),
    validated against PyTorch; returns the finished folder. options: those of `plan_export` (num_layers,
    block_size, lm_head, algorithm, source_grid, fuse, atol, min_cosine, exporter, kernels, reuse_fp32).
    on_progress: called with each aira_opt.core.progress event."""
    return run_export(plan_export(model, precision, output, force=force, **options), on_progress=on_progress)


def check(folder: FolderLike, *, model: str | None = None, prompts: Sequence[str] | str | Path | None = None,
          max_new_tokens: int = 32, provider: str = "cpu", threads: int | None = None,
          baseline: str = "cpu-fp32", quiet: bool = True, speculative: str | None = None,
          draft: FolderLike | None = None, num_speculative_tokens: int | None = None,
          shared_threads: bool = False) -> dict[str, Any]:
    """Parity of an export (or engine) with the PyTorch model it came from: the record `check --json` prints.
    Its `passed` says whether the variant's thresholds were met. prompts: questions, or a file of one per
    line (default: the built-in ones for the export's prompt format). speculative ("ngram", or "draft" with
    `draft`): the greedy sequences come from our loop speculating (shared_threads: as in `load`)."""
    opened = open_folder(folder)
    if prompts is not None and not isinstance(prompts, (str, Path)):
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise OptionError("no prompts to check")
    questions = Path(prompts) if isinstance(prompts, (str, Path)) else prompts
    speculation = speculation_from(speculative, num_speculative_tokens, draft is not None)
    return check_folder(opened, model, questions, max_new_tokens, provider, threads, baseline, quiet,
                        speculation=speculation, draft=open_folder(draft) if draft is not None else None,
                        shared_threads=shared_threads).to_json()


def evaluate(*, onnx: Sequence[str | Path] = (), gguf: Sequence[str | Path] = (), genai: Sequence[str | Path] = (),
             model: str | None = None, corpus: str = LANGUAGE_REFERENCE, window: int = 512,
             stride: int = 256, max_tokens: int | None = None, threads: int | None = None, quiet: bool = True,
             on_skip: Callable[[str], None] | None = None, openvino: Sequence[str | Path] = (),
             openvino_python: str | None = None) -> dict[str, Any]:
    """`aira-opt eval`: each file's quality on real held-out text against PyTorch fp32 on the source model (the
    first export's, or `model`): perplexity, KL divergence (mean, p99) and top-1 agreement, the same token ids for
    every format. openvino: IR folders, run by optimum-intel under `openvino_python` (its own environment). A
    file whose runtime is missing is listed under `skipped` with the reason."""
    return evaluate_files([Path(p) for p in onnx], [Path(p) for p in gguf], [Path(p) for p in genai], model, corpus,
                          Windows(window, stride), max_tokens, threads, quiet, on_skip,
                          [Path(p) for p in openvino], openvino_python)


def save_web(folder: FolderLike, output: str | Path, *, force: bool = False) -> Path:
    """`aira-opt web --save`: the export in transformers.js's layout (onnx/model{suffix}.onnx, config.json with
    transformers.js_config), written atomically, the weights hard-linked where the file system allows."""
    model = next(iter(web_models([_export_folder(folder)]).values()))
    model.save(Path(output), force)
    return Path(output)


def serve_web(folders: Sequence[FolderLike], *, host: str = LOCAL_HOST, port: int = 8080, threads: int = 1,
              on_progress: ProgressCallback | None = None) -> WebServer:
    """`aira-opt web`: the chat page's server for these exports, listening but not yet serving: `start()` serves
    on a background thread (`stop()` ends it), `serve_forever()` on this one. The page's npm packages are
    installed on first use."""
    return open_server([_export_folder(f) for f in folders], host, port, threads, on_progress)


def _export_folder(folder: FolderLike) -> ExportFolder:
    opened = open_folder(folder)
    if not isinstance(opened, ExportFolder):
        raise OptionError(f"'{opened.path}' is a TensorRT engine folder; a web page runs an export folder")
    return opened


def bench(model: str = "aira-tiny", *, onnx: Sequence[str | Path] = (), engines: Sequence[str | Path] = (),
          genai: Sequence[str | Path] = (), gguf: Sequence[str | Path] = (), backends: Sequence[str] = ("torch", "ort"),
          num_layers: int | None = None, prompt_lengths: Sequence[int] = (64,), new_tokens: int = 64,
          batch_sizes: Sequence[int] = (1,), warmup: int = 1, repeats: int = 3, threads: int | None = None,
          provider: str = "cpu", optimum_python: str | None = None,
          on_progress: Callable[[str], None] | None = None, speculative: str | None = None,
          draft: str | Path | None = None, num_speculative_tokens: int | None = None,
          openvino: Sequence[str | Path] = (), openvino_python: str | None = None) -> dict[str, Any]:
    """`aira-opt bench`: every backend on the same seeded token ids, each in its own process; returns the record
    `bench --json` writes (machine, settings, results, skipped). speculative ("ngram", or "draft" with `draft`):
    each export also gets an `ort` row that speculates. openvino: IR folders for the openvino backend, run under
    `openvino_python` (its own environment)."""
    if new_tokens < 2 or not prompt_lengths or not batch_sizes or min(*prompt_lengths, *batch_sizes) < 1:
        raise OptionError("bench needs new_tokens >= 2 and positive prompt lengths and batch sizes")
    speculation = speculation_from(speculative, num_speculative_tokens, draft is not None)
    sources = BenchSources(model, num_layers, [Path(p) for p in onnx], [Path(p) for p in engines],
                           [Path(p) for p in genai], [Path(p) for p in gguf], provider, optimum_python,
                           speculative=speculation.method if speculation else None,
                           draft_dir=Path(draft) if draft is not None else None,
                           num_speculative_tokens=num_speculative_tokens,
                           openvino_dirs=[Path(p) for p in openvino], openvino_python=openvino_python)
    settings = [Setting(b, p, new_tokens) for b in batch_sizes for p in prompt_lengths]
    report = run_bench_jobs(sources, list(backends), settings, warmup, repeats, threads, progress=on_progress)
    return report_json(report)


def inspect(folder: FolderLike) -> dict[str, Any]:
    """`aira-opt inspect`: what an export or engine folder holds; `problems` lists every file that does not match
    its recorded hash."""
    return inspect_folder(open_folder(folder).path)[0]
