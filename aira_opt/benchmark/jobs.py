"""Which bench jobs to run: every chosen backend plans its own jobs from the sources given (bench.backends), and
says why where it cannot run here; this module adds what every job shares (the prompts' token ids, eos, pad,
the model's context)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from aira_opt.benchmark.backends import RUNNERS, BenchSources, Job
from aira_opt.benchmark.measure import BenchReport, Setting, run_bench
from aira_opt.core.errors import AiraOptError, OptionError
from aira_opt.exporting.support import read_format
from aira_opt.folders import ExportFolder, default_export_path
from aira_opt.precision.variants import source_variant
from aira_opt.source.models import BUNDLED, PRESETS, bundled_model_dir, load_model, model_name
from aira_opt.source.prompts import detect_format, ordinary_token_ids

EXPORT_BACKENDS = ("ort", "optimum")  # the backends that run export folders (default: export/<model>/fp32)


@dataclass
class BenchPlan:
    jobs: list[Job]
    token_ids: np.ndarray  # prompts are drawn from these: the tokenizer's ordinary (non-special) ids
    eos: int
    pad: int
    context: int | None  # the model's positions, where known: every setting must fit
    skipped: list[dict[str, str]] = field(default_factory=list)


def plan_jobs(sources: BenchSources, backends: list[str]) -> BenchPlan:
    unknown = [b for b in backends if b not in RUNNERS]
    if unknown:
        raise AiraOptError(f"unknown backend(s) {unknown}; choose from {', '.join(RUNNERS)}")
    if not sources.onnx_dirs and set(EXPORT_BACKENDS) & set(backends):
        default = default_export_path(model_name(sources.model_spec, sources.num_layers),
                                      source_variant().folder_name())
        if not (default / "model.onnx").is_file():
            raise AiraOptError(f"no --onnx given and {default} does not exist; run "
                               f"`aira-opt export --model {sources.model_spec}` first or pass --onnx")
        sources.onnx_dirs = [default]
    jobs: list[Job] = []
    skipped: list[dict[str, str]] = []
    for backend in backends:
        planned, reasons = RUNNERS[backend].plan(sources)
        jobs.extend(planned)
        skipped.extend({"backend": backend, "reason": reason} for reason in reasons)
    tokenizer, fmt = _tokenizer_and_format(sources)
    return BenchPlan(jobs=jobs, token_ids=ordinary_token_ids(tokenizer, len(tokenizer)), eos=fmt.stop_ids[0],
                     pad=fmt.pad_id, context=model_context(sources), skipped=skipped)


def _tokenizer_and_format(sources: BenchSources) -> tuple[object, object]:
    """The tokenizer every backend's prompts come from, and the prompt format (its eos and pad)."""
    from transformers import AutoTokenizer  # heavy: only once a bench is planned

    export = ExportFolder(sources.onnx_dirs[0]) if sources.onnx_dirs else None
    if sources.model_spec in PRESETS or sources.model_spec == BUNDLED:
        tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    elif export is not None:
        tokenizer = export.tokenizer
    else:
        tokenizer = load_model(sources.model_spec, streamed=True).tokenizer  # the weights are not read
    fmt = read_format(export.path, tokenizer) if export is not None else detect_format(tokenizer)
    return tokenizer, fmt


def model_context(sources: BenchSources) -> int | None:
    """The positions the benched model has: from a preset, the bundled model, or an export's config."""
    if sources.model_spec in PRESETS:
        return PRESETS[sources.model_spec].max_position_embeddings
    if sources.model_spec == BUNDLED:
        return int(json.loads((bundled_model_dir() / "config.json").read_text())["max_position_embeddings"])
    if sources.onnx_dirs:
        return ExportFolder(sources.onnx_dirs[0]).context_length
    return None


def bench(sources: BenchSources, backends: list[str], settings: list[Setting], warmup: int = 1, repeats: int = 3,
          threads: int | None = None, progress: Callable[[str], None] | None = None) -> BenchReport:
    """Plan the jobs, check every setting fits the model, run them; a report with no result at all is an error
    naming why each backend was skipped."""
    plan = plan_jobs(sources, backends)
    longest = max(settings, key=lambda s: s.prompt_length + s.new_tokens)
    if plan.context is not None and longest.prompt_length + longest.new_tokens > plan.context:
        raise OptionError(f"a {longest.prompt_length}-token prompt + {longest.new_tokens} new tokens exceeds the "
                          f"model's context of {plan.context}; lower --prompt-lengths or --new-tokens")
    report = run_bench(plan.jobs, settings, warmup, repeats, threads, plan.token_ids, plan.eos, plan.pad,
                       skipped=plan.skipped, progress=progress)
    if not report.results:
        raise AiraOptError("no backend produced a result: " + "; ".join(s["reason"] for s in report.skipped))
    return report
