"""`check`: parity of an ONNX export (through our loop) with the PyTorch fp32 baseline.

Two runners of one family (PyTorch's and the export's, runtime.protocol.Decoder) produce comparable data, the one
comparator (runtime.compare) measures it, and the thresholds come from the export's variant record:
- greedy sequences, per prompt (our loop vs transformers' generate), exact match; with speculation on, the loop
  that speculates (its greedy output must not change);
- logits under teacher forcing: the ONNX model is fed PyTorch's greedy tokens one decode step at a time
  (exercising the KV cache), and its logits at the prefill and every step are compared with PyTorch's;
- perplexity on held-out text that neither training nor calibration saw (Aira-format turns for Aira models,
  public-domain English prose for the others).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aira_opt.core.contract import position_ids_from_mask
from aira_opt.core.errors import AiraOptError, OptionError
from aira_opt.folders import EngineFolder, ExportFolder
from aira_opt.core.numerics import perplexity
from aira_opt.core.progress import bar
from aira_opt.core.tables import text_table
from aira_opt.generation.generator import GenerateOptions, generate
from aira_opt.generation.speculative import Speculation
from aira_opt.generation.sampling import GREEDY
from aira_opt.precision.variants import VARIANTS, Thresholds
from aira_opt.runtime.compare import Comparison
from aira_opt.runtime.pytorch import BASELINES, TorchDecoder
from aira_opt.runners import open_draft, open_runner
from aira_opt.runtime.protocol import Decoder
from aira_opt.source.corpus import CHAT_QUESTIONS, heldout_english, heldout_pairs
from aira_opt.source.models import LoadedModel, load_reference
from aira_opt.source.prompts import (
    DEFAULT_CHECK_PROMPTS,
    PromptFormat,
    conversation_ids,
    decode_answer,
    prompt_ids,
    text_ids,
)

__all__ = ["BASELINES", "CheckReport", "check_folder", "run_check", "report_table", "load_questions"]


@dataclass
class PromptResult:
    prompt: str
    greedy_match: bool
    torch_answer: str
    onnx_answer: str
    steps: int
    top1_agreement: float
    max_abs_logit_diff: float
    min_cosine: float


@dataclass
class CheckReport:
    passed: bool
    precision: str
    provider: str
    baseline: str
    prompts: int
    greedy_exact_match: int
    top1_agreement: float
    max_abs_logit_diff: float
    min_cosine: float
    perplexity_torch: float
    perplexity_onnx: float
    thresholds: dict[str, Any]
    failures: list[str]
    per_prompt: list[PromptResult] = field(default_factory=list)
    evaluation: str = ""  # what ran the export, in words
    speculation: dict[str, Any] | None = None  # the greedy sequences' proposals and acceptance, when speculating

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# What `check` asks of any decoder runner --------------------------------------------------------------------
def sequence_logits(decoder: Decoder, ids: list[int]) -> np.ndarray:
    """All positions of one sequence in one prefill: ids [T] -> [T, V]."""
    x = np.array([ids], dtype=np.int64)
    mask = np.ones_like(x)
    out, _ = decoder.step(x, mask, position_ids_from_mask(mask, x.shape[1]), decoder.empty_cache(1), all_logits=True)
    return out.logits[0]


def teacher_forced_logits(decoder: Decoder, prompt: list[int], forced: list[int]) -> np.ndarray:
    """Logits predicting forced[0..n-1]: the prefill's last position, then one decode step per forced token
    except the last, through the runner's KV cache. prompt: [P]; forced: [n] -> [n, V]."""
    ids = np.array([prompt], dtype=np.int64)
    mask = np.ones_like(ids)
    out, cache = decoder.step(ids, mask, position_ids_from_mask(mask, ids.shape[1]), decoder.empty_cache(1))
    rows = [out.logits[0]]
    for token in forced[:-1]:
        mask = np.concatenate([mask, [[1]]], axis=1)
        out, cache = decoder.step(np.array([[token]], dtype=np.int64), mask, position_ids_from_mask(mask, 1), cache)
        rows.append(out.logits[0])
    return np.stack(rows)


def greedy_tokens(decoder: Decoder, ids: list[int], max_new_tokens: int, fmt: PromptFormat,
                  speculation: Speculation | None = None,
                  draft: Decoder | None = None) -> tuple[list[int], dict | None]:
    """Our generator's greedy answer to one prompt, and its speculation record (None without)."""
    options = GenerateOptions(max_new_tokens=max_new_tokens, sampling=GREEDY, speculation=speculation)
    result = generate(decoder, [ids], options, fmt.stop_ids, fmt.pad_id, draft=draft)
    return result.tokens[0], result.speculation


# Judging ---------------------------------------------------------------------------------------------
def judge(report: CheckReport, limits: Thresholds) -> list[str]:
    """Every threshold the report misses, as one line each."""
    failures = []
    fraction = report.greedy_exact_match / max(report.prompts, 1)
    if fraction < limits.min_greedy_fraction:
        failures.append(f"greedy sequences identical for {report.greedy_exact_match}/{report.prompts} prompts, "
                        f"need >= {limits.min_greedy_fraction:.3f} of them")
    if report.top1_agreement < limits.min_top1:
        failures.append(f"top-1 agreement {report.top1_agreement:.4f} < {limits.min_top1}")
    if limits.max_abs_logit_diff is not None and not report.max_abs_logit_diff <= limits.max_abs_logit_diff:
        failures.append(f"max |logit diff| {report.max_abs_logit_diff:.3e} > {limits.max_abs_logit_diff:g}")
    if limits.max_perplexity_ratio is not None:
        ratio = report.perplexity_onnx / report.perplexity_torch
        if not ratio <= limits.max_perplexity_ratio:
            failures.append(f"perplexity {report.perplexity_onnx:.4f} is {100 * (ratio - 1):.2f}% above PyTorch's "
                            f"{report.perplexity_torch:.4f}, limit {100 * (limits.max_perplexity_ratio - 1):.0f}%")
    return failures


def heldout_texts(tokenizer: Any, fmt: PromptFormat) -> list[list[int]]:
    """Token ids of held-out text for perplexity: Aira-format turns for Aira models, real English prose for the
    rest (their training never saw our synthetic texts). Neither is used for training or calibration."""
    if fmt.kind == "aira":
        return [conversation_ids(tokenizer, q, a, fmt) for q, a in heldout_pairs()]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + text_ids(tokenizer, paragraph) for paragraph in heldout_english()]


def thresholds(precision: str) -> Thresholds:
    """check's bar for a precision, or a one-line error naming the known ones."""
    if precision not in VARIANTS:
        raise AiraOptError(f"no parity thresholds for precision '{precision}'; known: {', '.join(VARIANTS)}")
    return VARIANTS[precision].thresholds


@dataclass
class ReferencePass:
    """What the PyTorch reference said, before any export runs (so the two never share the memory): each
    prompt's ids, greedy tokens and the logits at those tokens, and the held-out texts with their NLL."""

    baseline: str
    prompts: list[tuple[str, list[int], list[int], np.ndarray]]  # question, ids, greedy tokens, logits [T, V]
    heldout: list[list[int]]
    nll: float  # summed over every held-out token
    tokens: int


def reference_pass(loaded: LoadedModel, questions: list[str], max_new_tokens: int, fmt: PromptFormat,
                   quiet: bool = False, baseline: str = "cpu-fp32") -> ReferencePass:
    """The reference's half of `check`: greedy sequences, their logits, held-out perplexity."""
    tok = loaded.tokenizer
    prompts = []
    with TorchDecoder(loaded, baseline) as reference:
        for question in bar(questions, "check prompts (PyTorch)", quiet=quiet):
            ids = prompt_ids(tok, question, fmt)
            tokens = reference.greedy(ids, max_new_tokens, list(fmt.stop_ids), fmt.pad_id)
            logits = sequence_logits(reference, ids + tokens)[len(ids) - 1: len(ids) - 1 + len(tokens)]
            prompts.append((question, ids, tokens, logits))
        heldout = heldout_texts(tok, fmt)
        nll = count = 0.0
        for ids in heldout:
            a, n = perplexity(sequence_logits(reference, ids), ids)
            nll, count = nll + a, count + n
    return ReferencePass(baseline, prompts, heldout, nll, int(count))


def run_check(loaded: LoadedModel, decoder: Decoder, precision: str, questions: list[str],
              max_new_tokens: int, fmt: PromptFormat, quiet: bool = False, baseline: str = "cpu-fp32",
              speculation: Speculation | None = None, draft: Decoder | None = None) -> CheckReport:
    """Both runners on the same prompts (in the export's recorded format), judged by the variant's thresholds.
    speculation (and its draft runner): our greedy sequences come from the loop that speculates."""
    expected = reference_pass(loaded, questions, max_new_tokens, fmt, quiet, baseline)
    return judge_export(expected, decoder, precision, loaded.tokenizer, max_new_tokens, fmt, quiet, speculation,
                        draft)


def judge_export(expected: ReferencePass, decoder: Decoder, precision: str, tok: Any, max_new_tokens: int,
                 fmt: PromptFormat, quiet: bool = False, speculation: Speculation | None = None,
                 draft: Decoder | None = None) -> CheckReport:
    """The export's half of `check`: its greedy sequences, its logits teacher-forced on the reference's tokens and
    its held-out perplexity, judged against the reference pass by the variant's thresholds."""
    limits = thresholds(precision)
    comparison = Comparison()  # check judges the whole report by the variant's thresholds (judge), not per case
    per_prompt: list[PromptResult] = []
    speculated: list[dict] = []
    for question, ids, ref_tokens, ref_logits in bar(expected.prompts, "check prompts (export)", quiet=quiet):
        onnx_tokens, record = greedy_tokens(decoder, ids, max_new_tokens, fmt, speculation, draft)
        speculated += [record] if record else []
        cand_logits = teacher_forced_logits(decoder, ids, ref_tokens)
        stats = comparison.add(question, ref_logits, cand_logits)
        per_prompt.append(PromptResult(
            prompt=question, greedy_match=ref_tokens == onnx_tokens, torch_answer=decode_answer(tok, ref_tokens),
            onnx_answer=decode_answer(tok, onnx_tokens), steps=len(ref_tokens),
            top1_agreement=stats["top1_agreement"], max_abs_logit_diff=stats["max_abs_logit_diff"],
            min_cosine=stats["min_cosine"],
        ))
    nll_o = sum(perplexity(sequence_logits(decoder, ids), ids)[0] for ids in expected.heldout)
    report = CheckReport(
        passed=False, precision=precision, provider=decoder.provider, baseline=expected.baseline,
        prompts=len(expected.prompts), greedy_exact_match=sum(p.greedy_match for p in per_prompt),
        top1_agreement=comparison.top1_agreement, max_abs_logit_diff=comparison.max_abs_logit_diff,
        min_cosine=comparison.min_cosine, perplexity_torch=float(np.exp(expected.nll / expected.tokens)),
        perplexity_onnx=float(np.exp(nll_o / expected.tokens)), thresholds=asdict(limits), failures=[],
        per_prompt=per_prompt, speculation=_totals(speculated),
    )
    report.failures = judge(report, limits)
    report.passed = not report.failures
    return report


def _totals(records: list[dict]) -> dict[str, Any] | None:
    """Speculation over every prompt: proposals and acceptances summed."""
    if not records:
        return None
    proposed, accepted = sum(r["proposed"] for r in records), sum(r["accepted"] for r in records)
    return {"method": records[0]["method"], "proposed": proposed, "accepted": accepted,
            "verify_steps": sum(r["verify_steps"] for r in records),
            "acceptance_rate": round(accepted / proposed, 4) if proposed else 0.0,
            "exact": all(r["exact"] for r in records)}


def report_table(report: CheckReport) -> str:
    rows = [(p.prompt[:40], p.greedy_match, p.steps, p.top1_agreement, p.max_abs_logit_diff, p.min_cosine,
             p.onnx_answer[:40]) for p in report.per_prompt]
    return text_table(["prompt", "greedy same", "steps", "top-1", "max |diff|", "min cos", "onnx answer"], rows)


def load_questions(path: Path | None, fmt: PromptFormat) -> list[str]:
    """Questions from a file, one a line; by default Aira's eight for Aira models, sixteen chat questions else."""
    if path is None:
        return list(DEFAULT_CHECK_PROMPTS if fmt.kind == "aira" else CHAT_QUESTIONS)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AiraOptError(f"'{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8, one question "
                           "per line") from None
    questions = [line.strip() for line in text.splitlines() if line.strip()]
    if not questions:
        raise AiraOptError(f"'{path}' has no prompts (one question per line)")
    return questions


def check_folder(folder: ExportFolder | EngineFolder, model_spec: str | None = None,
                 questions: list[str] | Path | None = None, max_new_tokens: int = 32, provider: str = "cpu",
                 threads: int | None = None, baseline: str = "cpu-fp32", quiet: bool = False,
                 speculation: Speculation | None = None, draft: Path | ExportFolder | None = None,
                 shared_threads: bool = False) -> CheckReport:
    """`check` on a folder: its runner against the PyTorch model it was made from (its manifest names it; or
    `model_spec`), on `questions` (a list, a file of one per line, or the defaults for its prompt format).
    speculation: the greedy sequences come from our loop speculating (with `draft`'s proposals for "draft");
    shared_threads: the export and its draft on ONNX Runtime's process-wide pool (api.load says when)."""
    if baseline not in BASELINES:
        raise OptionError(f"baseline must be one of {', '.join(BASELINES)}")
    manifest = folder.manifest
    spec = model_spec or manifest.source_spec
    if not spec:
        raise OptionError("the manifest names no source model; pass --model")
    if baseline == "cuda-fp16":
        import torch

        if not torch.cuda.is_available():
            raise AiraOptError("--baseline cuda-fp16 needs a CUDA GPU visible to PyTorch")
    loaded = load_reference(spec, manifest.num_layers_override if model_spec is None else None)
    fmt = folder.prompt_format  # the format the export recorded
    asked = questions if isinstance(questions, list) else load_questions(questions, fmt)
    thresholds(manifest.precision)  # an unknown precision is an error before the slow part
    # The reference first, then the export: their memory never adds up (a streamed reference reads a layer at a
    # time; one in memory is released before the export opens).
    expected = reference_pass(loaded, asked, max_new_tokens, fmt, quiet, baseline)
    tokenizer = loaded.tokenizer
    del loaded
    shared = shared_threads and draft is not None
    draft_runner = open_draft(folder, draft, provider, threads, shared) if draft is not None else None
    with open_runner(folder, provider, threads, shared_threads=shared) as decoder:
        if draft_runner is not None:
            draft_runner.activate()
        try:
            report = judge_export(expected, decoder, manifest.precision, tokenizer, max_new_tokens, fmt,
                                  quiet=quiet, speculation=speculation, draft=draft_runner)
        finally:
            if draft_runner is not None:
                draft_runner.deactivate()
    report.evaluation = (f"TensorRT engine {folder.path}" if isinstance(folder, EngineFolder) else
                         f"onnxruntime {provider} provider running the {manifest.precision} graph as exported")
    return report
