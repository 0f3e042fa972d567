"""Fixtures: the bundled model and its exports, each made once per test session and only when a test asks."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore")
# Exports in tests use each variant's default kernels, the same on every machine; tests/test_kernels.py times them.
os.environ["AIRA_OPT_KERNELS"] = "default"


@pytest.fixture(autouse=True)
def _no_working_directory_files(tmp_path, monkeypatch):
    """Every test runs in its own empty folder, so nothing a developer has in export/ is picked up."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny():
    from aira_opt.source.models import load_model

    return load_model("aira-tiny")


@pytest.fixture(scope="session")
def tiny_export(tiny, tmp_path_factory) -> Path:
    from helpers import export_model

    out = tmp_path_factory.mktemp("exports") / "aira-tiny" / "fp32"
    export_model(tiny, "fp32", out, quiet=True)
    return out


@pytest.fixture(scope="session")
def tiny_fused(tiny, tiny_export, tmp_path_factory) -> Path:
    """aira-tiny fp32 with attention fused to ONNX Runtime's CPU ops (export --fuse), from tiny_export's graph."""
    from helpers import export_model

    out = tmp_path_factory.mktemp("fused") / "aira-tiny" / "fp32-fused"
    export_model(tiny, "fp32", out, quiet=True, fused=True, reuse_fp32=tiny_export)
    return out


@pytest.fixture(scope="session")
def tiny_decoder(tiny_export):
    from aira_opt.runtime.ort import OrtDecoder

    with OrtDecoder(tiny_export) as decoder:
        yield decoder


class LazyVariants:
    """aira-tiny's reduced-precision variants, each exported the first time a test asks for it (from the fp32
    export's graph, as `aira-opt export` reuses it)."""

    def __init__(self, tiny, root: Path, fp32: Path):
        self.tiny, self.root, self.fp32, self.made = tiny, root, fp32, {}

    def __getitem__(self, precision: str) -> Path:
        from helpers import export_model

        if precision not in self.made:
            export_model(self.tiny, precision, self.root / precision, quiet=True, reuse_fp32=self.fp32,
                         kernels="default")
            self.made[precision] = self.root / precision
        return self.made[precision]

    def items(self):
        return [(p, self[p]) for p in ("fp16", "int8-qdq", "int8", "int4")]


@pytest.fixture(scope="session")
def tiny_variants(tiny, tiny_export, tmp_path_factory) -> LazyVariants:
    return LazyVariants(tiny, tmp_path_factory.mktemp("variants"), tiny_export)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu or tensorrt are skipped at collection, with the reason, where those are missing. Files are
    ordered by their share of slow tests, most first: under `-n 2 --dist loadfile` a long file (SmolLM2's) then
    starts at once instead of last, so the other worker's files run beside it rather than before it."""
    import importlib.util
    from collections import Counter

    slow, total = Counter(), Counter()
    for item in items:
        total[item.path] += 1
        slow[item.path] += "slow" in item.keywords
    items.sort(key=lambda item: -slow[item.path] / total[item.path])  # stable: file order and test order kept

    reasons = {}
    if importlib.util.find_spec("tensorrt") is None:
        reasons["tensorrt"] = "TensorRT is not installed (pip install 'aira-opt[trt]' on a machine with an NVIDIA GPU)"
    try:
        import torch

        if not torch.cuda.is_available():
            reasons["gpu"] = "no NVIDIA GPU visible to PyTorch"
    except ImportError:
        reasons["gpu"] = "PyTorch is not installed"
    for item in items:
        for marker, reason in reasons.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
