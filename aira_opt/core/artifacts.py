"""Artifact folders: written atomically, described by a manifest with a sha256 of every file.

A folder is built under a temporary sibling name and renamed into place only when complete, so an error or
Ctrl-C never leaves a half-written export behind; an existing folder is replaced only with --force.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from aira_opt.core.errors import ArtifactExistsError, ExportFolderError

MANIFEST = "manifest.json"
LIBRARIES = ("aira-opt", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "tokenizers")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    # The module actually imported wins over package metadata: onnxruntime-gpu installs the same module name,
    # and a path-installed copy can shadow a different installed distribution.
    import onnxruntime

    gpu = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    versions["onnxruntime"] = onnxruntime.__version__ + (" (gpu build)" if gpu else "")
    return versions


def refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise ArtifactExistsError(f"'{path}' already exists; pass --force to replace it")


@contextlib.contextmanager
def atomic_folder(final: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; rename it to `final` when the block succeeds."""
    final = Path(final)
    refuse_existing(final, force)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it 0700; an export folder is meant to be shared
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:  # also KeyboardInterrupt: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_hashes(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in `folder` except the manifest itself."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(folder).as_posix()
        out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def write_manifest(folder: Path, info: dict[str, Any]) -> dict[str, Any]:
    manifest = {
        "format": "aira-opt-export/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        **info,
        "files": file_hashes(folder),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(folder: Path, name: str = MANIFEST) -> dict[str, Any]:
    path = Path(folder) / name
    if not path.is_file():
        raise ExportFolderError(f"'{folder}' has no {name}; is it an aira-opt export (or engine) folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportFolderError(f"'{path}' is not valid JSON: {exc}") from exc


def graph_is_fused(manifest: dict[str, Any]) -> bool:
    """Whether an export's attention was fused to ONNX Runtime contrib ops (aira_opt.precision.fusing). Manifests made
    before fusion existed have no `graph` entry: standard ops."""
    graph = manifest.get("graph")
    return isinstance(graph, dict) and bool(graph.get("fused"))


def verify_manifest(folder: Path) -> list[str]:
    """Every mismatch between the manifest's hashes and the files on disk (empty when all match)."""
    manifest = read_manifest(folder)
    problems = []
    actual = file_hashes(Path(folder))
    for name, want in manifest.get("files", {}).items():
        got = actual.get(name)
        if got is None:
            problems.append(f"{name}: missing")
        elif got["sha256"] != want["sha256"]:
            problems.append(f"{name}: sha256 differs")
    problems.extend(f"{name}: not in manifest" for name in actual if name not in manifest.get("files", {}))
    return problems


def folder_size_bytes(folder: Path, suffixes: tuple[str, ...] = (".onnx", ".onnx_data", ".data")) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(suffixes))
