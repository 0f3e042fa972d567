"""The one export pipeline, for fp32 and every variant: PyTorch -> ONNX -> the variant's recipe -> support files
and metadata -> validation against PyTorch -> manifest. The folder is built under a temporary name and renamed
into place only when complete."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import click

from aira_opt.core.artifacts import atomic_folder, graph_is_fused, read_manifest, verify_manifest, write_manifest
from aira_opt.core.contract import DecoderContract
from aira_opt.core.errors import OptionError, ValidationError
from aira_opt.core.progress import Steps
from aira_opt.export.exporters import DEFAULT_EXPORTER, OPSET, Exporter, exporter
from aira_opt.export.portable import make_portable
from aira_opt.export.support import model_format, write_support_files
from aira_opt.export.onnx_files import remove_model_files
from aira_opt.precision.kernels import KernelCandidate, candidates, choose_kernels
from aira_opt.precision.recipe import Fp32Graph, RecipeInput, WeightOnlySettings
from aira_opt.precision.validate import validate_against_torch
from aira_opt.precision.variants import VARIANTS, Tolerance, Variant, exportable_names, variant
from aira_opt.spec.models import LoadedModel


def default_output(model_name: str, folder_name: str) -> Path:
    """Where exports go unless --output says otherwise: export/<model>/<variant folder name>."""
    return Path("export") / model_name / folder_name


def reusable_fp32(loaded: LoadedModel, folder: Path, by: Exporter) -> Path | None:
    """model.onnx of an existing fp32 export of the same model in `folder`, when its manifest matches the model
    and the exporter, its files still hash to the manifest and it is standard-op; None means export afresh."""
    if not (folder / "manifest.json").is_file():
        return None
    manifest = read_manifest(folder)
    if manifest.get("precision") != "fp32" or graph_is_fused(manifest) or manifest.get("exporter") != by.description:
        return None  # a fused fp32 graph cannot be fused again or fed to the TensorRT-facing variants
    if manifest.get("source_model", {}) != _json_round_trip(loaded.describe()) or verify_manifest(folder):
        return None
    return folder / "model.onnx"


def _json_round_trip(value: Any) -> Any:
    return json.loads(json.dumps(value))


def graph_record(fusion: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's `graph` entry: standard ops, or what the CPU fusion did."""
    if fusion is None:
        return {"fused": False}
    return {"fused": True, "runtime": "ONNX Runtime CPU provider (com.microsoft contrib ops)", **fusion}


class Fp32Source:
    """The fp32 graph recipes start from, made at most once: reused from an existing export when one is given,
    else exported into a scratch folder inside the partial output (so whatever cleans that, cleans this)."""

    def __init__(self, loaded: LoadedModel, scratch: Path, reuse: Path | None, by: Exporter):
        self.loaded, self.scratch, self.reuse, self.by = loaded, scratch, reuse, by
        self.graph: Fp32Graph | None = None

    def __call__(self) -> Fp32Graph:
        if self.graph is None:
            if self.reuse is not None:
                self.graph = Fp32Graph(self.reuse, owned=False)
            else:
                self.graph = Fp32Graph(self.by.export_graph(self.loaded, self.scratch), owned=True)
        return self.graph


def kernel_choices() -> list[str]:
    """`--kernels` values: auto, default, and every candidate of every variant that has a choice."""
    names = {c.name for v in VARIANTS.values() if v.kernel_tuning and v.weight_only
             for c in candidates(v.name, v.weight_only, False)}
    return ["auto", "default", *sorted(names)]


def kernel_options(record: Variant, precision: str, settings: WeightOnlySettings | None, block_size: int | None,
                   kernels: str) -> list[KernelCandidate]:
    """The kernel candidates an export chooses from (none for variants without a choice); a --kernels name that
    is not one of them is a one-line error."""
    if not record.kernel_tuning or settings is None:
        if kernels not in ("auto", "default"):
            raise OptionError(f"--kernels {kernels} applies to --precision int8 or int4 only")
        return []
    options = candidates(precision, settings, block_size is not None)
    if kernels not in ("auto", "default", *(c.name for c in options)):
        raise OptionError(f"--kernels {kernels} is not a choice for {precision}"
                          + (" with --block-size" if block_size is not None else "")
                          + f"; choose auto, default or {', '.join(c.name for c in options)}")
    return options


def export_model(loaded: LoadedModel, precision: str, output: Path, force: bool = False, quiet: bool = False,
                 block_size: int | None = None, fused: bool | None = None, atol: float | None = None,
                 reuse_fp32: Path | None = None, exporter_name: str = DEFAULT_EXPORTER,
                 kernels: str | None = None) -> dict[str, Any]:
    """Export `loaded` as `precision` into `output` (atomically), validate it, write its manifest; returns it.

    block_size: int8/int4 MatMulNBits block; fused: None for the variant's default; atol: overrides the
    sanity bar's max |logit diff| (fp32); reuse_fp32: an fp32 export folder whose graph may be reused;
    exporter_name: which of export.exporters.EXPORTERS turns the model into ONNX; kernels: 'auto' times the
    variant's kernel candidates on this CPU (kernels.py), 'default' skips that, a candidate's name forces it
    (None: $AIRA_OPT_KERNELS, else 'auto')."""
    kernels = kernels or os.environ.get("AIRA_OPT_KERNELS") or "auto"
    record: Variant = variant(precision)
    by = exporter(exporter_name)
    by.check_available()
    if record.recipe is None:
        raise OptionError(f"{precision} is made outside aira-opt; export one of {', '.join(exportable_names())}")
    settings = record.settings(block_size)
    is_fused = record.fused(fused)
    reuse = reusable_fp32(loaded, reuse_fp32, by) if reuse_fp32 is not None else None
    tolerance = record.tolerance if atol is None else Tolerance(atol=atol, min_cosine=record.tolerance.min_cosine)
    enforce = record.enforce_on_random_weights or loaded.kind != "random"
    contract = DecoderContract.from_config(loaded.config)
    name = record.folder_name(block_size, is_fused)
    tuning = kernel_options(record, precision, settings, block_size, kernels)
    if not enforce and kernels == "auto":
        # Random weights: the sanity bar is not enforced, so it cannot vouch for a kernel that changes the
        # numerics; only the ones computing what the default computes are timed.
        tuning = [c for c in tuning if c.same_numerics]
    steps = Steps(5 if tuning else 4, quiet=quiet)
    with atomic_folder(output, force) as tmp:
        choice = None
        if tuning:
            with steps.step(f"choosing {name}'s kernels on this CPU ({kernels}: "
                            + ", ".join(c.name for c in tuning) + ")"):
                choice = choose_kernels(tuning, loaded.config, mode=kernels, quiet=quiet)
            if not quiet and choice.record["tuned"]:
                times = choice.record["measured_ms_per_layer"]
                click.echo("      per layer, prefill + decode steps of the reference request: " + ", ".join(
                    f"{c.name} {times[c.name]['request_ms']:.1f} ms" for c in choice.ordered)
                    + (" (cached)" if choice.record["from_cache"] else ""), err=True)
        rejected: dict[str, str] = {}
        attempts = choice.ordered if choice else [None]
        with tempfile.TemporaryDirectory(dir=tmp, prefix=".fp32-") as scratch:  # gone before hashing
            source = Fp32Source(loaded, Path(scratch), reuse, by)
            for attempt in attempts:
                with steps.step(f"exporting {loaded.name} as {name} ({by.description}, opset {OPSET}"
                                + (", reusing the fp32 graph of " + str(reuse.parent) if reuse else "")
                                + (f", kernels: {attempt.name}" if attempt else "") + ")"):
                    job = RecipeInput(loaded, tmp / "model.onnx", source, is_fused, by,
                                      attempt.weight_only or settings if attempt else settings,
                                      dynamic_int8=attempt is not None and attempt.weight_only is None)
                    result = record.recipe(job)
                with steps.step("writing tokenizer, config, generation defaults, metadata and genai_config.json"):
                    write_support_files(loaded, tmp)
                    make_portable(loaded, tmp, precision)
                with steps.step("validating against PyTorch fp32 (prefill + decode, batch 1 and 2, two lengths)"):
                    try:
                        report = validate_against_torch(loaded, tmp, tolerance, enforce=enforce)
                    except ValidationError as exc:
                        if attempt is None or attempt.same_numerics or attempt is attempts[-1]:
                            raise
                        rejected[attempt.name] = exc.message.splitlines()[0]
                        if not quiet:
                            click.echo(f"      {attempt.name} missed the sanity bar ({rejected[attempt.name]}); "
                                       "trying the next fastest kernels", err=True)
                        remove_model_files(tmp / "model.onnx")
                        steps.total += 3  # export, support files and validation once more
                        continue
                break
        if not quiet:
            click.echo(f"      vs PyTorch fp32: max |logit diff| {report['max_abs_logit_diff']:.3e}, min cosine "
                       f"{report['min_cosine']:.5f} (sanity bar {tolerance}); `aira-opt check` applies the full bar",
                       err=True)
            if report["misses"]:
                click.echo(f"      warning: {len(report['misses'])} case(s) below the sanity bar; not enforced for "
                           "random weights", err=True)
        with steps.step("hashing files into manifest.json"):
            manifest = write_manifest(tmp, {
                "precision": precision,
                "target": record.target,
                "source_model": loaded.describe(),
                "prompt_format": model_format(loaded).describe(),
                "opset": OPSET,
                "exporter": by.description,
                "contract": contract.describe(),
                "kept_fp32": result.kept_fp32,
                "quantization": result.quantization,
                "graph": graph_record(result.fusion),
                **({"kernels": choice.manifest(attempt, rejected)} if choice and attempt else {}),
                "validation": report,
            })
    return manifest
