"""Shared fixtures: the bundled model and one fp32 export of it, made once per test session."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from aira_opt.corpus import training_pairs
from aira_opt.generation import GenerateOptions
from aira_opt.sampling import SamplingSettings

warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def tiny():
    from aira_opt.specs import load_model

    return load_model("aira-tiny")


@pytest.fixture(scope="session")
def tiny_export(tiny, tmp_path_factory) -> Path:
    from aira_opt.exporting import export_fp32

    out = tmp_path_factory.mktemp("exports") / "aira-tiny" / "fp32"
    export_fp32(tiny, out, quiet=True)
    return out


@pytest.fixture(scope="session")
def tiny_fused(tiny, tmp_path_factory) -> Path:
    """aira-tiny fp32 with attention fused to ONNX Runtime's CPU ops (export --fuse)."""
    from aira_opt.exporting import export_fp32

    out = tmp_path_factory.mktemp("fused") / "aira-tiny" / "fp32-fused"
    export_fp32(tiny, out, quiet=True, fused=True)
    return out


@pytest.fixture(scope="session")
def tiny_decoder(tiny_export):
    from aira_opt.runtime import OrtDecoder

    with OrtDecoder(tiny_export) as decoder:
        yield decoder


GREEDY = GenerateOptions(max_new_tokens=32, sampling=SamplingSettings(do_sample=False, repetition_penalty=1.0))
# Eight trained questions and eight unseen ones: on unseen text the model is uncertain, a harder parity case.
QUESTIONS = [q for q, _ in training_pairs()[::7]][:8] + [
    "Tell me a story.", "Why?", "What is the capital of Finland?", "Do you like music?",
    "Explain gravity to me.", "What is three plus nine?", "Name a color.", "<|pad|> odd input <|unk|>",
]


def hf_greedy(tiny, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate, without the card's repetition penalty."""
    import torch

    x = torch.tensor([ids])
    out = tiny.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, repetition_penalty=1.0,
                              max_new_tokens=max_new_tokens, eos_token_id=tiny.tokenizer.eos_token_id,
                              pad_token_id=tiny.tokenizer.pad_token_id, temperature=None, top_k=None, top_p=None)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="session")
def tiny_variants(tiny, tmp_path_factory) -> dict[str, Path]:
    """Every reduced-precision variant of aira-tiny, exported once."""
    from aira_opt.precision import export_variant

    root = tmp_path_factory.mktemp("variants")
    out = {}
    for precision in ("fp16", "int8-qdq", "int8", "int4"):
        out[precision] = root / precision
        export_variant(tiny, precision, out[precision], quiet=True)
    return out
