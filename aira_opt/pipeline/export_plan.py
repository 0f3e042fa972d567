"""An export, planned: every option checked once, against the variant's record, before anything is loaded. The
CLI and the Python API both plan this way, so a bad option is one line before a minute of model loading."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from aira_opt.core.artifacts import refuse_existing
from aira_opt.core.errors import OptionError
from aira_opt.exporting.exporters import DEFAULT_EXPORTER, EXPORTERS, Exporter
from aira_opt.folders import default_export_path
from aira_opt.precision.kernels import KernelCandidate, candidates
from aira_opt.precision.recipe import WeightOnlySettings
from aira_opt.precision.variants import (RECIPE_OPTIONS, VARIANTS, Tolerance, Variant, exportable_names,
                                         source_variant, variant)
from aira_opt.source.models import check_spec, model_name

KERNEL_MODES = ("auto", "default")  # time the candidates, or take the variant's default untimed


def kernel_choices() -> list[str]:
    """`--kernels` values: auto, default, and every candidate of every variant that has a choice."""
    names = {c.name for v in VARIANTS.values() if v.kernel_tuning and v.weight_only
             for c in candidates(v.kernel_candidates, v.weight_only, False)}
    return [*KERNEL_MODES, *sorted(names)]


@dataclass(frozen=True)
class ExportPlan:
    """One export, decided: what to load, which recipe with which settings, where it goes."""

    model: str  # the --model spec
    num_layers: int | None  # depth override of a random preset
    variant: Variant
    output: Path
    force: bool
    exporter: Exporter
    settings: WeightOnlySettings | None  # MatMulNBits settings (int8/int4), the user's recipe choices applied
    block_size: int | None  # as asked for (None: the variant's default)
    fused: bool
    tolerance: Tolerance  # the post-export sanity bar
    kernels: str  # auto, default, or a candidate's name
    kernel_candidates: tuple[KernelCandidate, ...]  # () for variants without a kernel choice
    reuse_fp32: Path | None  # an fp32 export whose graph the recipe may start from, when it matches the model

    @property
    def folder_name(self) -> str:
        return self.variant.folder_name(self.settings, self.fused)


def plan_export(model: str = "aira-tiny", precision: str = "fp32", output: Path | str | None = None, *,
                num_layers: int | None = None, force: bool = False, block_size: int | None = None,
                lm_head: str | None = None, algorithm: str | None = None, source_grid: bool | None = None,
                fuse: bool | None = None, atol: float | None = None, min_cosine: float | None = None,
                exporter: str = DEFAULT_EXPORTER, kernels: str | None = None,
                reuse_fp32: bool | str | Path = True) -> ExportPlan:
    """Check every option and decide the export; nothing is loaded.

    block_size: int8/int4 MatMulNBits block; lm_head: the output head's precision (int8, int4, float);
    algorithm: rtn, hqq or gptq (int4); source_grid: keep weights already on a grid exactly; fuse: None for the
    variant's default; atol: overrides the fp32 sanity bar's max |logit diff|; min_cosine: overrides the sanity
    bar's min cosine (a recipe known to be lossy); exporter: a key of export.exporters.EXPORTERS; kernels: 'auto'
    times the variant's kernel candidates on this CPU, 'default' skips that, a candidate's name forces it (None:
    $AIRA_OPT_KERNELS, else 'auto'); reuse_fp32: start from export/<model>/fp32 (True), from this fp32 export
    folder (a path), or never (False), where the folder matches the model."""
    if exporter not in EXPORTERS:
        raise OptionError(f"unknown exporter '{exporter}'; choose {', '.join(EXPORTERS)}")
    by = EXPORTERS[exporter]
    by.check_available()  # a missing extra is an error before the slow model load
    record = variant(precision)
    if record.recipe is None:
        raise OptionError(f"{precision} is made outside aira-opt; export one of {', '.join(exportable_names())}")
    check_spec(model, num_layers)
    settings = record.settings(block_size, lm_head, algorithm, source_grid)
    fused = record.fused(fuse)
    if atol is not None and atol <= 0:
        raise OptionError(f"--atol must be positive, got {atol}")
    if min_cosine is not None and not -1 <= min_cosine <= 1:
        raise OptionError(f"--min-cosine must be in [-1, 1], got {min_cosine}")
    tolerance = replace(record.tolerance, **{k: v for k, v in (("atol", atol), ("min_cosine", min_cosine))
                                             if v is not None})
    kernels = kernels or os.environ.get("AIRA_OPT_KERNELS") or "auto"
    options = _kernel_candidates(record, settings, kernels)
    name = model_name(model, num_layers)
    output = Path(output) if output is not None else default_export_path(name, record.folder_name(settings, fused))
    refuse_existing(output, force)
    if record.is_source_graph or reuse_fp32 is False:
        reuse = None
    elif reuse_fp32 is True:
        reuse = default_export_path(name, source_variant().folder_name())
    else:
        reuse = Path(reuse_fp32)
    return ExportPlan(model=model, num_layers=num_layers, variant=record, output=output, force=force, exporter=by,
                      settings=settings, block_size=block_size, fused=fused, tolerance=tolerance, kernels=kernels,
                      kernel_candidates=tuple(options), reuse_fp32=reuse)


def _kernel_candidates(record: Variant, settings: WeightOnlySettings | None, kernels: str) -> list[KernelCandidate]:
    """The kernel candidates an export chooses from (none for variants without a choice); a --kernels name that
    is not one of them is a one-line error. Recipe choices (block size, head, algorithm) rule out the kernels that
    ignore them."""
    if not record.kernel_tuning or settings is None:
        if kernels not in KERNEL_MODES:
            tuned = [v.name for v in VARIANTS.values() if v.kernel_tuning]
            raise OptionError(f"--kernels {kernels} applies to --precision {' or '.join(tuned)} only")
        return []
    assert record.weight_only is not None, "a variant with kernel candidates has weight-only settings"
    chosen = [option for option, field in RECIPE_OPTIONS.items()
              if getattr(settings, field) != getattr(record.weight_only, field)]
    options = candidates(record.kernel_candidates, settings, bool(chosen))
    if kernels not in (*KERNEL_MODES, *(c.name for c in options)):
        raise OptionError(f"--kernels {kernels} is not a choice for {record.name}"
                          + (f" with {', '.join(chosen)}" if chosen else "")
                          + f"; choose auto, default or {', '.join(c.name for c in options)}")
    return options
