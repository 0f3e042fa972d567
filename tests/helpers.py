"""What several test files share (imported as a module; conftest.py only holds fixtures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from aira_opt.generation.generator import GenerateOptions
from aira_opt.generation.sampling import GREEDY as GREEDY_SAMPLING
from aira_opt.runtime.pytorch import HF_GREEDY
from aira_opt.source.corpus import training_pairs

ROOT = Path(__file__).resolve().parents[1]


def export_model(loaded, precision: str, output: Path, quiet: bool = True, **options) -> dict:
    """A planned export of a model already in memory (the tests' loaded fixtures); returns its manifest as written.
    options: plan_export's (fuse, block_size, atol, kernels, reuse_fp32, exporter, force); quiet=False prints
    the progress as the CLI does."""
    from aira_opt.core.artifacts import read_manifest
    from aira_opt.core.progress import print_progress
    from aira_opt.pipeline.export_plan import plan_export
    from aira_opt.pipeline.export_run import run_export

    options.setdefault("reuse_fp32", False)
    if "fused" in options:
        options["fuse"] = options.pop("fused")
    if "exporter_name" in options:
        options["exporter"] = options.pop("exporter_name")
    plan = plan_export(loaded.source, precision, output, num_layers=loaded.extra.get("num_layers_override"), **options)
    folder = run_export(plan, on_progress=None if quiet else print_progress, loaded=loaded)
    return read_manifest(folder.path)

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


def browser_ready() -> Path:
    """The page's node_modules when Chromium, Playwright and the page's npm packages are all here; else the test
    skips, saying which is missing."""
    import pytest

    from aira_opt.core.errors import AiraOptError
    from aira_opt.web.browser import find_chromium
    from aira_opt.web.packages import ensure_packages

    if find_chromium() is None:
        pytest.skip("no Chromium: apt-get install -y --no-install-recommends chromium (tools/install_chromium.sh)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.skip("Playwright is not installed: pip install 'aira-opt[browser]'")
    try:
        return ensure_packages()
    except AiraOptError as exc:
        pytest.skip(str(exc))
