"""aira-opt: take Aira-2-1B1 (and Llama-family models like it) from PyTorch to verified ONNX Runtime and TensorRT.

The Python API (aira_opt.api), imported on first use so that `import aira_opt` stays light:

    import aira_opt
    model = aira_opt.load("export/aira-tiny/fp32")
    model.generate("What is the capital of Brazil?")
    folder = aira_opt.export("aira-tiny", precision="int4", output="out/tiny-int4")
    report = aira_opt.check(folder)
"""

from __future__ import annotations

from typing import Any

from aira_opt._version import __version__

__all__ = ["__version__", "load", "export", "plan_export", "run_export", "check", "check_draft", "evaluate", "bench",
           "save_web", "serve_web", "inspect",
           "Model", "ExportFolder", "EngineFolder", "ExportPlan", "AiraOptError"]

_API = set(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    if name in _API:
        from aira_opt import api

        return getattr(api, name)
    raise AttributeError(f"module 'aira_opt' has no attribute '{name}'")
