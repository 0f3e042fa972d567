"""Artifact folders: written atomically, described by a manifest with a sha256 of every file.

A folder is built under a temporary sibling name and renamed into place only when complete, so an error or
Ctrl-C never leaves a half-written export behind; an existing folder is replaced only with --force.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
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

from aira_opt.core.errors import ArtifactExistsError, DiskFullError, ExportFolderError

MANIFEST = "manifest.json"
LIBRARIES = ("aira-opt", "torch", "transformers", "onnxscript", "optimum", "optimum-onnx", "onnx", "onnxruntime",
             "tokenizers")


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


PARTIAL_MARK = ".aira-opt-partial"  # inside a folder being built: who is building it (pid and process start)
SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _process_start(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot, /proc/PID/stat field 22), or None when there is no such
    process. Together with the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(partial: Path) -> bool:
    """Whether the process that is building `partial` still runs; unreadable marks count as alive (never delete
    what might be in use)."""
    try:
        pid_text, start = (partial / PARTIAL_MARK).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        try:  # a folder created a moment ago may not have its mark yet
            return partial.stat().st_mtime > _dt.datetime.now().timestamp() - 60
        except OSError:
            return False
    return _process_start(pid) == start


def remove_stale_partials(final: Path) -> list[Path]:
    """Delete what exports to `final` left behind when their process died (SIGKILL, power loss); returns them."""
    removed = []
    for partial in sorted(final.parent.glob(f".{final.name}.partial-*")):
        if partial.is_dir() and not _owner_alive(partial):
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
    return removed


@contextlib.contextmanager
def _parent_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the output's parent folder, so two exports never rename into the same place at once."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def atomic_folder(final: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; rename it to `final` when the block succeeds.

    Whatever ends the block early (an error, Ctrl-C, SIGTERM, a full disk) removes the temporary folder; one
    left by a process that died outright is removed by the next export to the same place. An export that finds
    `final` written by another one meanwhile stops with a clean error instead of mixing the two."""
    final = Path(final)
    refuse_existing(final, force)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        (tmp / PARTIAL_MARK).write_text(f"{os.getpid()} {_process_start(os.getpid())}\n")
        yield tmp
        (tmp / PARTIAL_MARK).unlink()
        tmp.chmod(0o755)  # mkdtemp makes it 0700; an export folder is meant to be shared
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        with _parent_lock(final.parent):
            if final.exists() and not force:
                raise ArtifactExistsError(f"'{final}' was written by another export meanwhile; "
                                          "pass --force to replace it")
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
                os.replace(final, old / final.name)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in SPACE_ERRNOS:
            raise DiskFullError(f"ran out of space writing '{final}' ({exc.strerror}); nothing was left behind "
                                "and any earlier export there is untouched: free some space or pass another "
                                "--output") from exc
        raise
    except BaseException:  # also KeyboardInterrupt and Terminated: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def artifact_files(folder: Path) -> list[Path]:
    """Every file of an artifact folder a manifest accounts for (all but the manifest and the partial mark)."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name not in (MANIFEST, PARTIAL_MARK))


def file_hashes(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in `folder` except the manifest itself."""
    out: dict[str, dict[str, Any]] = {}
    for path in artifact_files(folder):
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
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportFolderError(f"'{path}' is not valid JSON ({exc}); export again, or restore the file") from exc
    if not isinstance(manifest, dict):
        raise ExportFolderError(f"'{path}' is not an aira-opt manifest (a JSON object); export again")
    return manifest


def graph_is_fused(manifest: dict[str, Any]) -> bool:
    """Whether an export's attention was fused to ONNX Runtime contrib ops (aira_opt.precision.fusing). Manifests made
    before fusion existed have no `graph` entry: standard ops."""
    graph = manifest.get("graph")
    return isinstance(graph, dict) and bool(graph.get("fused"))


def verify_manifest(folder: Path) -> list[str]:
    """Every file the manifest lists that is missing or differs from its hash (empty when all match). Files the
    manifest does not list are not problems: see unlisted_files."""
    listed = read_manifest(folder).get("files", {})
    problems = []
    for name, want in listed.items():
        path = Path(folder) / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size < want.get("bytes", 0):
            problems.append(f"{name}: truncated, {path.stat().st_size} of {want['bytes']} bytes")
        elif sha256_file(path) != want.get("sha256"):
            problems.append(f"{name}: sha256 differs")
    return problems


def unlisted_files(folder: Path) -> list[str]:
    """Files in the folder the manifest does not list (a README someone added, a .DS_Store): worth a warning."""
    listed = read_manifest(folder).get("files", {})
    names = (p.relative_to(folder).as_posix() for p in artifact_files(folder))
    return [name for name in names if name not in listed]


def folder_size_bytes(folder: Path, suffixes: tuple[str, ...] = (".onnx", ".onnx_data", ".data")) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(suffixes))
