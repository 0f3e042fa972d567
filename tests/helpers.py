"""What several test files share (imported as a module; conftest.py only holds fixtures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from aira_opt.generation.loop import GenerateOptions
from aira_opt.generation.sampling import GREEDY as GREEDY_SAMPLING
from aira_opt.generation.sampling import HF_GREEDY
from aira_opt.spec.corpus import training_pairs

ROOT = Path(__file__).resolve().parents[1]

GREEDY = GenerateOptions(max_new_tokens=32, sampling=GREEDY_SAMPLING)
# Eight trained questions and eight unseen ones: on unseen text the model is uncertain, a harder parity case.
QUESTIONS = [q for q, _ in training_pairs()[::7]][:8] + [
    "Tell me a story.", "Why?", "What is the capital of Finland?", "Do you like music?",
    "Explain gravity to me.", "What is three plus nine?", "Name a color.", "<|pad|> odd input <|unk|>",
]


def hf_greedy(tiny, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate, without the card's repetition penalty."""
    import torch

    x = torch.tensor([ids])
    out = tiny.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                              eos_token_id=tiny.tokenizer.eos_token_id, pad_token_id=tiny.tokenizer.pad_token_id,
                              **HF_GREEDY)
    return out[0, len(ids):].tolist()


def run_numpy(folder: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A bare ONNX Runtime session over an export: numpy in, every output out by name."""
    session = ort.InferenceSession(str(Path(folder) / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))
