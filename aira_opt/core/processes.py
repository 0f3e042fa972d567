"""Child processes that run this source tree, possibly under another virtual environment's python (optimum's,
OpenVINO's): the tree goes first on their import path, so they run the same aira_opt as the parent."""

from __future__ import annotations

import os
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the aira_opt package


def source_tree_env() -> dict[str, str]:
    """This process's environment, with the source tree first on PYTHONPATH."""
    path = os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}
