"""Right after export: the export's runner against PyTorch's, prefill and decode, batch 1 and 2 with left
padding. Both are driven through the same step interface (runtime.protocol.Decoder), one after the other (the
reference's logits are kept, a few MB), and judged by the one comparator (runtime.compare); every miss is
collected, then one ValidationError lists them all."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx

from aira_opt.core.contract import DecoderContract, position_ids_from_mask
from aira_opt.core.errors import ValidationError
from aira_opt.exporting.support import write_support_files
from aira_opt.folders import ExportFolder
from aira_opt.precision.variants import Tolerance
from aira_opt.runtime.compare import Comparison
from aira_opt.runtime.ort import OrtDecoder
from aira_opt.runtime.pieces import PIECE_BYTES, Step, run_in_pieces
from aira_opt.runtime.pytorch import TorchDecoder
from aira_opt.runtime.protocol import Decoder
from aira_opt.source.models import LoadedModel
from aira_opt.source.prompts import ordinary_token_ids


@dataclass(frozen=True)
class ValidationCase:
    batch: int
    prompt_len: int
    left_pad: int  # pad tokens on the left of the second row (0 = none)
    decode_steps: int = 2


VALIDATION_CASES = (
    ValidationCase(batch=1, prompt_len=7, left_pad=0),
    ValidationCase(batch=1, prompt_len=16, left_pad=0),
    ValidationCase(batch=2, prompt_len=7, left_pad=0),
    ValidationCase(batch=2, prompt_len=16, left_pad=5),
)


def validation_batch(case: ValidationCase, ordinary: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random ordinary token ids and a mask: input_ids, attention_mask: [B, prompt_len]; row 1 left-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(ordinary, size=(case.batch, case.prompt_len)).astype(np.int64)
    mask = np.ones_like(ids)
    if case.batch > 1 and case.left_pad:
        mask[1, : case.left_pad] = 0
        ids[1, : case.left_pad] = 0
    return ids, mask


def case_steps(ordinary: np.ndarray) -> list[tuple[str, Step]]:
    """Every case's forward passes, labelled: prefill, then decode steps whose tokens come from a seeded generator,
    never from the logits, so any runner gets the same inputs on its own."""
    steps = []
    for n, case in enumerate(VALIDATION_CASES):
        ids, mask = validation_batch(case, ordinary, seed=n)
        rng = np.random.default_rng(100 + n)
        step_ids, full_mask = ids, mask  # [B, S], [B, past + S]
        for step in range(case.decode_steps + 1):
            label = f"batch {case.batch} len {case.prompt_len} {'prefill' if step == 0 else f'decode {step}'}"
            steps.append((label, Step(n, step_ids, full_mask, position_ids_from_mask(full_mask, step_ids.shape[1]))))
            step_ids = rng.choice(ordinary, size=(case.batch, 1)).astype(np.int64)
            full_mask = np.concatenate([full_mask, np.ones((case.batch, 1), np.int64)], axis=1)
    return steps


def case_logits(runner: Decoder, steps: list[tuple[str, Step]]) -> Iterator[np.ndarray]:
    """Each step through one runner with a cache per case: the logits [B, S, V]."""
    caches: dict[int, Any] = {}
    for _, step in steps:
        cache = caches.get(step.case) or runner.empty_cache(step.input_ids.shape[0])
        out, caches[step.case] = runner.step(step.input_ids, step.attention_mask, step.position_ids, cache,
                                             all_logits=True)
        yield out.logits


def real_positions(step: Step) -> np.ndarray:
    """[B, S] True where a step's position is a token, not left padding (padded logits mean nothing)."""
    return step.attention_mask[:, -step.input_ids.shape[1]:].astype(bool)


def validate_export(loaded: LoadedModel, folder: ExportFolder, tolerance: Tolerance,
                    enforce: bool = True) -> dict[str, Any]:
    """The manifest's `validation` entry; raises one ValidationError listing every miss.

    With enforce=False the misses are returned in the report instead of raised (used for reduced-precision
    variants of random-weight presets, whose near-flat logits make cosine bars meaningless)."""
    mismatches: list[str] = loaded_contract_problems(loaded, folder)
    ordinary = ordinary_token_ids(loaded.tokenizer, min(loaded.config.vocab_size, len(loaded.tokenizer)))
    comparison = Comparison(tolerance)
    steps = case_steps(ordinary)
    # One runner after the other, never both at once: the export's memory and the reference's do not add up.
    with TorchDecoder(loaded) as reference:
        expected = [logits[real_positions(step)] for logits, (_, step) in zip(case_logits(reference, steps), steps)]
    for (label, step), want, have in zip(steps, expected, export_logits(folder, steps), strict=True):
        comparison.add(label, want, have[real_positions(step)])
    mismatches += comparison.misses
    if mismatches and enforce:
        raise ValidationError(mismatches)
    return {"max_abs_logit_diff": comparison.max_abs_logit_diff, "min_cosine": comparison.min_cosine,
            "tolerance": asdict(tolerance), "enforced": enforce, "misses": mismatches,
            "cases": [{k: c[k] for k in ("case", "max_abs_logit_diff", "min_cosine")} for c in comparison.cases]}


def export_logits(folder: ExportFolder, steps: list[tuple[str, Step]]) -> Iterator[np.ndarray]:
    """The export's logits [B, S, V] for each step: one session, or piece by piece when it is large."""
    if in_pieces(folder):
        yield from run_in_pieces(folder, [step for _, step in steps])
        return
    with OrtDecoder(folder, provider="cpu") as candidate:
        yield from case_logits(candidate, steps)


def in_pieces(folder: ExportFolder) -> bool:
    """Whether validation runs the export in pieces (runtime/pieces.py): a standard-op graph whose weights are
    more than a piece may hold. Fused graphs (contrib ops) and small exports run whole."""
    data = folder.model_path.with_name(folder.model_path.name + "_data")
    if not data.is_file() or data.stat().st_size <= PIECE_BYTES:
        return False
    model = onnx.load(str(folder.model_path), load_external_data=False)
    return not any(n.domain == "com.microsoft" for n in model.graph.node)


def loaded_contract_problems(loaded: LoadedModel, folder: ExportFolder) -> list[str]:
    """Where the graph's inputs and outputs differ from the contract the model's config implies."""
    graph = onnx.load(str(folder.model_path), load_external_data=False)
    return DecoderContract.from_config(loaded.config).check_graph(graph)


def validate_graph(loaded: LoadedModel, folder: Path, tolerance: Tolerance = Tolerance(),
                   enforce: bool = False) -> dict[str, Any]:
    """A graph made outside `run_export` (folder/model.onnx: a recipe the CLI does not offer, tried by a research
    script in benchmarks/), validated exactly as an export is: the support files go next to it first."""
    write_support_files(loaded, folder)
    return validate_export(loaded, ExportFolder(folder), tolerance, enforce)
