"""PyTorch -> ONNX with KV cache through optimum's exporter, then validation against PyTorch.

One graph serves prefill (past length 0) and decode. The folder gets the tokenizer, the model card's
generation defaults and a manifest; it is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aira_opt.artifacts import atomic_folder, write_manifest
from aira_opt.contract import DecoderContract
from aira_opt.errors import ValidationError
from aira_opt.portable import make_portable
from aira_opt.progress import Steps
from aira_opt.runtime import OrtDecoder, position_ids_from_mask
from aira_opt.specs import CARD_GENERATION_DEFAULTS, LoadedModel

log = logging.getLogger(__name__)

OPSET = 18  # optimum's default for Llama; TensorRT 10+/11's ONNX parser supports it
FP32_ATOL = 1e-3  # max |logit difference| accepted right after an fp32 export (aira-tiny is ~1e-5)


@dataclass(frozen=True)
class Tolerance:
    """What the post-export validation accepts; `check` then judges the variant by its precision's bar."""

    atol: float | None = None  # max |logit diff| over every compared position
    min_cosine: float | None = None  # min cosine similarity of a position's logits with PyTorch fp32's

    def misses(self, diff: float, cosine: float) -> str | None:
        if not (np.isfinite(diff) and np.isfinite(cosine)):
            return "non-finite logits"
        if self.atol is not None and diff > self.atol:
            return f"max |logit diff| {diff:.3e} > {self.atol:g}"
        if self.min_cosine is not None and cosine < self.min_cosine:
            return f"min cosine {cosine:.5f} < {self.min_cosine}"
        return None


# Sanity bars right after a reduced-precision export: they catch a broken graph, not a small accuracy loss.
VARIANT_TOLERANCE = {
    "fp16": Tolerance(min_cosine=0.999),
    "int8-qdq": Tolerance(min_cosine=0.95),  # random-token probes leave the calibrated ranges (clipped)
    "int8": Tolerance(min_cosine=0.98),
    "int4": Tolerance(min_cosine=0.95),
}


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


def default_output(model_name: str, precision: str) -> Path:
    return Path("export") / model_name / precision


def export_fp32(loaded: LoadedModel, output: Path, force: bool = False, atol: float = FP32_ATOL,
                quiet: bool = False, fused: bool = False) -> dict[str, Any]:
    """Export `loaded` to `output` (fp32), validate it against PyTorch, write the manifest; returns it.
    fused=True rewrites attention to ONNX Runtime's CPU contrib ops (fusing.py): faster, no longer standard-op."""
    from aira_opt.precision import graph_record

    steps = Steps(4, quiet=quiet)
    fusion = None
    with atomic_folder(output, force) as tmp:
        with steps.step(f"exporting {loaded.name} with optimum (task text-generation-with-past, opset {OPSET})"
                        + (", attention fused" if fused else "")):
            run_optimum_export(loaded, tmp)
            if fused:
                fusion = fuse_in_place(tmp / "model.onnx", loaded.config)
        with steps.step("writing tokenizer, config, generation defaults, metadata and genai_config.json"):
            write_support_files(loaded, tmp)
            make_portable(loaded, tmp, "fp32")
        with steps.step("validating against PyTorch (prefill + decode, batch 1 and 2, two lengths)"):
            report = validate_against_torch(loaded, tmp, Tolerance(atol=atol))
        if not quiet:
            import click
            click.echo(f"      max |logit diff| vs PyTorch: {report['max_abs_logit_diff']:.2e} (tolerance {atol:g})",
                       err=True)
        with steps.step("hashing files into manifest.json"):
            manifest = write_manifest(tmp, {
                "precision": "fp32",
                "source_model": loaded.describe(),
                "opset": OPSET,
                "exporter": "optimum.exporters.onnx (text-generation-with-past)",
                "contract": DecoderContract.from_config(loaded.config).describe(),
                "kept_fp32": [],
                "quantization": None,
                "graph": graph_record(fusion),
                "validation": report,
            })
    return manifest


def fuse_in_place(path: Path, config: Any) -> dict[str, Any]:
    """Fuse and pack the graph at `path` (fusing.fuse_and_pack) and save it back, weights included."""
    import gc

    import onnx

    from aira_opt.fusing import fuse_and_pack
    from aira_opt.precision import save_model

    gc.collect()  # the exporter's garbage must go before the weights come in again
    model = onnx.load(str(path))
    fusion = fuse_and_pack(model, config)
    for old in path.parent.glob(path.name + "*"):  # onnx appends to an existing data file: start clean
        old.unlink()
    save_model(model, path)
    return fusion


def run_optimum_export(loaded: LoadedModel, folder: Path) -> None:
    from optimum.exporters.onnx import onnx_export_from_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings from transformers are expected and noisy
        onnx_export_from_model(
            loaded.model, folder, opset=OPSET, task="text-generation-with-past", do_validation=False,
            preprocessors=[loaded.tokenizer],
        )
    onnx_files = sorted(p.name for p in folder.glob("*.onnx"))
    if onnx_files != ["model.onnx"]:
        raise ValidationError([f"expected one merged model.onnx from optimum, got {onnx_files}"])


def write_support_files(loaded: LoadedModel, folder: Path) -> None:
    """Tokenizer, config and the model card's generation defaults (optimum writes its own; ours wins)."""
    loaded.tokenizer.save_pretrained(folder)
    loaded.model.config.save_pretrained(folder)
    tok = loaded.tokenizer
    generation = {**CARD_GENERATION_DEFAULTS, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                  "pad_token_id": tok.pad_token_id}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def validation_batch(case: ValidationCase, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids and a mask: input_ids, attention_mask: [B, prompt_len]; row 1 left-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, size=(case.batch, case.prompt_len), dtype=np.int64)
    mask = np.ones_like(ids)
    if case.batch > 1 and case.left_pad:
        mask[1, : case.left_pad] = 0
        ids[1, : case.left_pad] = 0
    return ids, mask


def validate_against_torch(loaded: LoadedModel, folder: Path, tolerance: Tolerance,
                           enforce: bool = True) -> dict[str, Any]:
    """Compare ONNX Runtime's logits with PyTorch's for every case; one error lists all misses.

    With enforce=False the misses are returned in the report instead of raised (used for reduced-precision
    variants of random-weight presets, whose near-flat logits make cosine bars meaningless)."""
    import torch

    model = loaded.model
    vocab = min(loaded.config.vocab_size, len(loaded.tokenizer))
    import onnx

    from aira_opt.compare import logit_agreement

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    mismatches: list[str] = DecoderContract.from_config(loaded.config).check_graph(graph)
    worst, worst_cos = 0.0, 1.0
    details = []
    with OrtDecoder(folder, provider="cpu") as onnx_model:
        contract = onnx_model.contract
        for n, case in enumerate(VALIDATION_CASES):
            ids, mask = validation_batch(case, vocab, seed=n)
            rng = np.random.default_rng(100 + n)
            past_ort = {name: np.zeros((case.batch, contract.num_kv_heads, 0, contract.head_dim), onnx_model.kv_dtype)
                        for name in contract.past_names()}
            past_torch = None
            step_ids, full_mask = ids, mask
            for step in range(case.decode_steps + 1):
                pos = position_ids_from_mask(full_mask, step_ids.shape[1])
                feeds = {"input_ids": step_ids, "attention_mask": full_mask, "position_ids": pos, **past_ort}
                out = onnx_model.forward_numpy(feeds)
                with torch.no_grad():
                    ref = model(input_ids=torch.from_numpy(step_ids), attention_mask=torch.from_numpy(full_mask),
                                position_ids=torch.from_numpy(pos), past_key_values=past_torch, use_cache=True)
                past_torch = ref.past_key_values
                ref_logits = ref.logits.float().numpy()
                # Padded positions' logits are meaningless in both; compare real tokens only.
                real = full_mask[:, -step_ids.shape[1]:].astype(bool)
                stats = logit_agreement(ref_logits[real], out["logits"][real])  # real positions: [N, V]
                diff, cosine = stats["max_abs_logit_diff"], stats["min_cosine"]
                worst, worst_cos = max(worst, diff), min(worst_cos, cosine)
                label = f"batch {case.batch} len {case.prompt_len} {'prefill' if step == 0 else f'decode {step}'}"
                details.append({"case": label, "max_abs_logit_diff": diff, "min_cosine": cosine})
                miss = tolerance.misses(diff, cosine)
                if miss:
                    mismatches.append(f"{label}: {miss}")
                past_ort = {p: out[o] for p, o in zip(contract.past_names(), contract.present_names())}
                step_ids = rng.integers(5, vocab, size=(case.batch, 1), dtype=np.int64)
                full_mask = np.concatenate([full_mask, np.ones((case.batch, 1), np.int64)], axis=1)
    if mismatches and enforce:
        raise ValidationError(mismatches)
    return {"max_abs_logit_diff": worst, "min_cosine": worst_cos, "tolerance": asdict(tolerance), "enforced": enforce,
            "misses": mismatches, "cases": details}
