"""Right after export: ONNX Runtime's logits against PyTorch's, prefill and decode, batch 1 and 2 with left
padding. Every miss is collected, then one ValidationError lists them all.

The graph runs in a bare CPU session with numpy in and out: the simplest path, independent of the runner
under test elsewhere."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from aira_opt.core.contract import ORT_KV_DTYPES, DecoderContract, empty_past, position_ids_from_mask
from aira_opt.core.errors import ValidationError
from aira_opt.core.numerics import logit_agreement
from aira_opt.precision.variants import Tolerance
from aira_opt.spec.compat import forward
from aira_opt.spec.models import LoadedModel
from aira_opt.spec.prompts import ordinary_token_ids



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


def validate_against_torch(loaded: LoadedModel, folder: Path, tolerance: Tolerance,
                           enforce: bool = True) -> dict[str, Any]:
    """Compare ONNX Runtime's logits with PyTorch's for every case; one error lists all misses.

    With enforce=False the misses are returned in the report instead of raised (used for reduced-precision
    variants of random-weight presets, whose near-flat logits make cosine bars meaningless)."""
    import torch

    model = loaded.model
    contract = DecoderContract.from_config(loaded.config)
    ordinary = ordinary_token_ids(loaded.tokenizer, min(loaded.config.vocab_size, len(loaded.tokenizer)))
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    mismatches: list[str] = contract.check_graph(graph)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    kv_dtype = ORT_KV_DTYPES[next(i.type for i in session.get_inputs() if i.name == contract.past_names()[0])]
    output_names = [o.name for o in session.get_outputs()]
    worst, worst_cos = 0.0, 1.0
    details = []
    for n, case in enumerate(VALIDATION_CASES):
        ids, mask = validation_batch(case, ordinary, seed=n)
        rng = np.random.default_rng(100 + n)
        past_ort = empty_past(contract, case.batch, kv_dtype)
        past_torch = None
        step_ids, full_mask = ids, mask
        for step in range(case.decode_steps + 1):
            pos = position_ids_from_mask(full_mask, step_ids.shape[1])
            feeds = {"input_ids": step_ids, "attention_mask": full_mask, "position_ids": pos, **past_ort}
            out = dict(zip(output_names, session.run(output_names, feeds)))
            with torch.no_grad():
                ref, past_torch = forward(model, past_torch, input_ids=torch.from_numpy(step_ids),
                                          attention_mask=torch.from_numpy(full_mask), position_ids=torch.from_numpy(pos))
            ref_logits = ref.float().numpy()
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
            step_ids = rng.choice(ordinary, size=(case.batch, 1)).astype(np.int64)
            full_mask = np.concatenate([full_mask, np.ones((case.batch, 1), np.int64)], axis=1)
    del session
    if mismatches and enforce:
        raise ValidationError(mismatches)
    return {"max_abs_logit_diff": worst, "min_cosine": worst_cos, "tolerance": asdict(tolerance), "enforced": enforce,
            "misses": mismatches, "cases": details}
