"""The page's JavaScript packages (onnxruntime-web, transformers.js, tokenizers.js), installed once from the npm
registry into aira-opt's cache, exactly as page/package-lock.json pins them, so that the page loads everything
from localhost and never from a CDN. Install scripts are skipped: transformers.js's onnxruntime-node dependency
would download binaries, and the page needs none of them."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from aira_opt.core.errors import AiraOptError
from aira_opt.core.progress import ProgressCallback, Progress
from aira_opt.source.models import cache_dir

PAGE = Path(__file__).parent / "page"
MANIFESTS = ("package.json", "package-lock.json")
COMPLETE = ".aira-opt-complete"
# Served under /vendor/: the only parts of node_modules the page loads (their dist folders).
VENDORED = ("onnxruntime-web/dist", "@huggingface/transformers/dist", "@huggingface/tokenizers/dist",
            "@huggingface/jinja/dist", "onnxruntime-common/dist")


def modules_dir() -> Path:
    """node_modules for this page's lock file (AIRA_OPT_WEB_MODULES points at one made elsewhere, e.g. offline)."""
    if os.environ.get("AIRA_OPT_WEB_MODULES"):
        return Path(os.environ["AIRA_OPT_WEB_MODULES"])
    digest = hashlib.sha256(b"".join((PAGE / name).read_bytes() for name in MANIFESTS)).hexdigest()[:16]
    return cache_dir() / "web" / digest / "node_modules"


def ensure_packages(progress: ProgressCallback | None = None) -> Path:
    """node_modules with the page's packages, installing them on first use (npm ci into a temporary folder renamed
    into place, under a lock: an interrupted install leaves nothing behind, and two processes never install at
    once)."""
    if os.environ.get("AIRA_OPT_WEB_MODULES"):
        given = modules_dir()
        if not (given / "onnxruntime-web").is_dir():
            raise AiraOptError(f"AIRA_OPT_WEB_MODULES='{given}' has no onnxruntime-web: point it at the "
                               "node_modules of an `npm ci` of aira_opt/web/page/package.json")
        return given
    modules = modules_dir()
    if (modules / COMPLETE).is_file():
        return modules
    modules.parent.parent.mkdir(parents=True, exist_ok=True)
    with open(modules.parent.parent / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (modules / COMPLETE).is_file():  # another process may have installed meanwhile
            _install(modules, progress)
    return modules


def _install(modules: Path, progress: ProgressCallback | None) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise AiraOptError("the page needs onnxruntime-web and transformers.js from npm once: install Node.js "
                           "(with npm), or set AIRA_OPT_WEB_MODULES to a node_modules folder that has them")
    if progress:
        progress(Progress(0, 0, f"installing the page's packages once (npm ci) into {modules.parent}"))
    work = Path(tempfile.mkdtemp(prefix=".install-", dir=modules.parent.parent))
    try:
        for name in MANIFESTS:
            shutil.copy2(PAGE / name, work / name)
        result = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=work,
                                capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise AiraOptError(f"npm ci failed for the page's packages ({last}); is the npm registry reachable?")
        (work / "node_modules" / COMPLETE).write_text("npm ci\n")
        if modules.parent.exists():  # an install that never completed (the lock rules out a live one)
            shutil.rmtree(modules.parent)
        os.replace(work, modules.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
