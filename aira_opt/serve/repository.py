"""A Triton model repository for an export or engine folder: `<repo>/<name>/config.pbtxt` and
`<repo>/<name>/1/model.py` (the Python backend running our loop), with the folder itself at `1/model/`.

The same repository loads in a stock `tritonserver` (NVIDIA's container with aira-opt installed) and in the one
`aira-opt serve` starts. It is written atomically: a failure leaves no half-written model behind.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from aira_opt._version import __version__
from aira_opt.core.artifacts import atomic_folder
from aira_opt.core.errors import ExportFolderError, OptionError
from aira_opt.folders import MODEL_FILE, PLAN_FILE, EngineFolder, ExportFolder, open_folder
from aira_opt.serve.protocol import INPUTS, OUTPUTS

VERSION = "1"
MODEL_FOLDER = "model"  # inside the version folder: the export or engine the backend opens
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# model.py: Triton imports it from the version folder. AIRA_OPT_SITE_PACKAGES lets `aira-opt serve` hand the
# stub its own environment; in a container with aira-opt installed it is simply unset.
MODEL_PY = '''"""Triton Python backend model written by aira-opt {version} (`aira-opt triton-repo`).

The model itself lives in aira_opt.serve.backend; it serves the folder next to this file ({folder}/).
"""

import os
import site

for _path in os.environ.get("AIRA_OPT_SITE_PACKAGES", "").split(os.pathsep):
    if _path:
        site.addsitedir(_path)

from aira_opt.serve.backend import TritonPythonModel  # noqa: E402,F401
'''


@dataclass(frozen=True)
class ServingOptions:
    """How Triton runs the model: batching, instances, and the runtime the backend opens."""

    max_batch_size: int = 16
    queue_delay_us: int = 2000  # how long the dynamic batcher waits for more requests to join a batch
    instances: int = 1
    provider: str = "cpu"  # cpu, cuda or tensorrt (ONNX Runtime); an engine folder always runs on TensorRT
    threads: int | None = None

    def problems(self) -> list[str]:
        found = []
        if self.max_batch_size < 1:
            found.append("max batch size must be at least 1")
        if self.queue_delay_us < 0:
            found.append("queue delay must be >= 0 microseconds")
        if self.instances < 1:
            found.append("instances must be at least 1")
        return found


def default_name(folder: Path) -> str:
    """The source model's name from the folder's manifest (`aira-tiny`), else the folder's own name, made into
    a valid Triton model name."""
    try:
        name = open_folder(folder).manifest.source_name or ""
    except ExportFolderError:  # no manifest (a folder made by hand): the folder's own name
        name = ""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name or Path(folder).resolve().name).strip("-.")
    return name or "model"


def _tensor(field_name: str, triton_type: str, optional: bool) -> str:
    return (f'  {{\n    name: "{field_name}"\n    data_type: {triton_type}\n    dims: [ 1 ]\n'
            + ("    optional: true\n" if optional else "") + "  }")


def config_pbtxt(name: str, runtime: str, options: ServingOptions) -> str:
    """Triton's model configuration (protobuf text format), inputs and outputs from serve/protocol.py."""
    on_gpu = runtime == "engine" or options.provider in ("cuda", "tensorrt")
    params = {"runtime": runtime, "folder": MODEL_FOLDER, "threads": str(options.threads or ""),
              "provider": "tensorrt" if runtime == "engine" else options.provider}
    inputs = ",\n".join(_tensor(f.name, f.triton_type, f.optional) for f in INPUTS)
    outputs = ",\n".join(_tensor(f.name, f.triton_type, False) for f in OUTPUTS)
    parameters = "\n".join(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())
    return f'''# Written by aira-opt {__version__} `triton-repo`: our generation loop in Triton's Python backend.
# Inputs and outputs follow Triton's generate extension (POST /v2/models/{name}/generate and generate_stream).
name: "{name}"
backend: "python"
max_batch_size: {options.max_batch_size}
dynamic_batching {{
  max_queue_delay_microseconds: {options.queue_delay_us}
}}
model_transaction_policy {{
  decoupled: true
}}
input [
{inputs}
]
output [
{outputs}
]
instance_group [
  {{
    count: {options.instances}
    kind: {"KIND_GPU" if on_gpu else "KIND_CPU"}
  }}
]
{parameters}
'''


def _place(source: Path, target: Path, link: bool) -> None:
    """The folder's files at `target`: a symlink to it (a local server), else hard links where the filesystem
    allows and copies where not (a repository that moves to another machine or container)."""
    if link:
        target.symlink_to(source.resolve(), target_is_directory=True)
        return

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)


def write_repository(folder: ExportFolder | EngineFolder, repository: Path, name: str | None = None,
                     options: ServingOptions = ServingOptions(), force: bool = False, link: bool = False) -> Path:
    """Write `<repository>/<name>/` for an export or engine folder (its `kind` is the runtime); returns it."""
    source, runtime = folder.path, folder.kind
    needed = MODEL_FILE if isinstance(folder, ExportFolder) else PLAN_FILE
    if not (source / needed).is_file() or not (source / "config.json").is_file():
        raise ExportFolderError(f"'{source}' is not an aira-opt {'export' if runtime == 'onnx' else 'engine'} "
                                f"folder (no {needed} or config.json)")
    name = name or default_name(source)
    problems = options.problems() + ([] if NAME.match(name) else [
        f"model name '{name}' is not valid for Triton: letters, digits, '_', '.', '-' (128 at most)"])
    if problems:
        raise OptionError("; ".join(problems))
    with atomic_folder(Path(repository) / name, force) as tmp:
        version = tmp / VERSION
        version.mkdir()
        (tmp / "config.pbtxt").write_text(config_pbtxt(name, runtime, options))
        (version / "model.py").write_text(MODEL_PY.format(version=__version__, folder=MODEL_FOLDER))
        _place(source, version / MODEL_FOLDER, link)
    return Path(repository) / name
