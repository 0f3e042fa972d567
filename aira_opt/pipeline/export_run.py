"""An export plan, run: load the model, choose the kernels (int8/int4: timed on this CPU), apply the variant's
recipe to the fp32 graph, write the support files, validate against PyTorch, hash everything into the
manifest. The folder is built under a temporary name and renamed into place only when complete; a kernel that
misses the sanity bar is replaced by the next fastest."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from aira_opt.core.artifacts import atomic_folder, write_manifest
from aira_opt.core.contract import DecoderContract
from aira_opt.core.errors import ExportFolderError, ValidationError
from aira_opt.core.progress import ProgressCallback, Steps
from aira_opt.exporting.exporters import OPSET, Exporter
from aira_opt.exporting.onnx_files import remove_model_files
from aira_opt.exporting.portable import make_portable
from aira_opt.exporting.support import model_format, write_support_files
from aira_opt.folders import ExportFolder, Manifest
from aira_opt.pipeline.export_plan import ExportPlan
from aira_opt.pipeline.validation import validate_export
from aira_opt.precision.kernels import KernelCandidate, KernelChoice, choose_kernels
from aira_opt.precision.recipe import Fp32Graph, RecipeInput
from aira_opt.source.models import LoadedModel, load_model


def reusable_fp32(loaded: LoadedModel, folder: Path, by: Exporter) -> Path | None:
    """model.onnx of an existing fp32 export of the same model in `folder`, when its manifest matches the model
    and the exporter, its files still hash to the manifest and it is standard-op; None means export afresh."""
    export = ExportFolder(folder) if Path(folder).is_dir() else None
    if export is None or not export.has_manifest:
        return None
    try:
        manifest = export.manifest
    except ExportFolderError:  # a damaged manifest: that folder cannot vouch for its graph
        return None
    if not manifest.variant.is_source_graph or manifest.fused or manifest.exporter != by.description:
        return None  # a fused fp32 graph cannot be fused again or fed to the TensorRT-facing variants
    if manifest.source_model != json.loads(json.dumps(loaded.describe())) or export.verify():
        return None
    return export.model_path


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


def run_export(plan: ExportPlan, on_progress: ProgressCallback | None = None,
               loaded: LoadedModel | None = None) -> ExportFolder:
    """Run `plan`; returns the finished folder. loaded: the model, when the caller has it in memory already."""
    record = plan.variant
    # Loading is not a numbered step: a model that cannot load is one error line, with nothing before it.
    # Streamed: the weights stay in the checkpoint and are read a tensor (or a layer) at a time, by the exporter,
    # the recipes and the PyTorch reference alike (source/weights.py).
    # optimum's exporter traces with TorchScript and needs the weights in memory.
    loaded = loaded or load_model(plan.model, num_layers=plan.num_layers, streamed=plan.exporter.streams)
    steps = Steps(5 if plan.kernel_candidates else 4, on_progress)
    enforce = record.enforce_on_random_weights or loaded.kind != "random"
    tuning = list(plan.kernel_candidates)
    if not enforce and plan.kernels == "auto":
        # Random weights: the sanity bar is not enforced, so it cannot vouch for a kernel that changes the
        # numerics; only the ones computing what the default computes are timed.
        tuning = [c for c in tuning if c.same_numerics]
    reuse = reusable_fp32(loaded, plan.reuse_fp32, plan.exporter) if plan.reuse_fp32 is not None else None
    with atomic_folder(plan.output, plan.force) as tmp:
        choice = _choose_kernels(plan, tuning, loaded, steps) if tuning else None
        attempts: list[KernelCandidate | None] = list(choice.ordered) if choice else [None]
        rejected: dict[str, str] = {}
        with tempfile.TemporaryDirectory(dir=tmp, prefix=".fp32-") as scratch:  # gone before hashing
            source = Fp32Source(loaded, Path(scratch), reuse, plan.exporter)
            for attempt in attempts:
                result = _apply_recipe(plan, loaded, tmp, source, reuse, attempt, steps)
                with steps.step("validating against PyTorch fp32 (prefill + decode, batch 1 and 2, two lengths)"):
                    try:
                        report = validate_export(loaded, ExportFolder(tmp), plan.tolerance, enforce=enforce)
                    except ValidationError as exc:
                        if attempt is None or attempt.same_numerics or attempt is attempts[-1]:
                            if record.is_source_graph:
                                raise
                            raise ValidationError(exc.mismatches, LOSSY_HINT) from None
                        rejected[attempt.name] = exc.message.splitlines()[0]
                        steps.note(f"{attempt.name} missed the sanity bar ({rejected[attempt.name]}); trying the "
                                   "next fastest kernels")
                        remove_model_files(tmp / "model.onnx")
                        steps.total += 3  # export, support files and validation once more
                        continue
                break
        steps.note(f"vs PyTorch fp32: max |logit diff| {report['max_abs_logit_diff']:.3e}, min cosine "
                   f"{report['min_cosine']:.5f} (sanity bar {plan.tolerance}); `aira-opt check` applies the full bar")
        if report["misses"]:
            steps.note(f"warning: {len(report['misses'])} case(s) below the sanity bar; not enforced for random "
                       "weights")
        with steps.step("hashing files into manifest.json"):
            write_manifest(tmp, Manifest(
                precision=record.name,
                target=record.target,
                source_model=loaded.describe(),
                prompt_format=model_format(loaded).describe(),
                opset=OPSET,
                exporter=plan.exporter.description,
                contract=DecoderContract.from_config(loaded.config).describe(),
                kept_fp32=result.kept_fp32,
                quantization=result.quantization or {},
                graph=graph_record(result.fusion),
                kernels=choice.manifest(attempt, rejected) if choice and attempt else None,
                validation=report,
            ).contents())
    return ExportFolder(plan.output)


def _choose_kernels(plan: ExportPlan, tuning: list[KernelCandidate], loaded: LoadedModel,
                    steps: Steps) -> KernelChoice:
    with steps.step(f"choosing {plan.folder_name}'s kernels on this CPU ({plan.kernels}: "
                    + ", ".join(c.name for c in tuning) + ")"):
        choice = choose_kernels(tuning, loaded.config, mode=plan.kernels, quiet=steps.on_progress is None)
    if choice.record["tuned"]:
        times = choice.record["measured_ms_per_layer"]
        steps.note("per layer, prefill + decode steps of the reference request: " + ", ".join(
            f"{c.name} {times[c.name]['request_ms']:.1f} ms" for c in choice.ordered)
            + (" (cached)" if choice.record["from_cache"] else ""))
    return choice


LOSSY_HINT = ("for a recipe you know loses this much, --min-cosine lowers the sanity bar; "
              "`aira-opt eval` measures the loss on real text")


def _apply_recipe(plan: ExportPlan, loaded: LoadedModel, tmp: Path, source: Fp32Source, reuse: Path | None,
                  attempt: KernelCandidate | None, steps: Steps) -> Any:
    """The variant's recipe into tmp/model.onnx (with one kernel candidate's settings), then the support files."""
    with steps.step(f"exporting {loaded.name} as {plan.folder_name} ({plan.exporter.description}, opset {OPSET}"
                    + (", reusing the fp32 graph of " + str(reuse.parent) if reuse else "")
                    + (f", kernels: {attempt.name}" if attempt else "") + ")"):
        settings = (attempt.weight_only or plan.settings) if attempt else plan.settings
        job = RecipeInput(loaded, tmp / "model.onnx", source, plan.fused, plan.exporter, settings,
                          dynamic_int8=attempt is not None and attempt.weight_only is None)
        assert plan.variant.recipe is not None, "plan_export refuses variants without a recipe"
        result = plan.variant.recipe(job)
    with steps.step("writing tokenizer, config, generation defaults, metadata and genai_config.json"):
        write_support_files(loaded, tmp)
        make_portable(loaded, tmp, plan.variant.name, plan.variant.cuda)
    return result
