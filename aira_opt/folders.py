"""The folders aira-opt writes and every reader opens: an export folder (the ONNX graph, its support files and
`manifest.json`) and an engine folder (a TensorRT plan, its sidecar `model.json`, and the source export's
manifest and support files). Each owns its files: the manifest as a typed record, the config, prompt format,
generation defaults, metadata and tokenizer loaded once, when first asked for, and `verify()`. No other module
reads these files by key."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from aira_opt.core.artifacts import MANIFEST, read_manifest, sha256_file, unlisted_files, verify_manifest
from aira_opt.core.contract import DecoderContract
from aira_opt.core.errors import ExportFolderError
from aira_opt.exporting.exporters import DEFAULT_EXPORTER, EXPORTERS
from aira_opt.exporting.portable import read_metadata
from aira_opt.exporting.support import read_format, read_generation_config
from aira_opt.precision.recipe import WeightOnlySettings
from aira_opt.precision.variants import Variant, variant
from aira_opt.source.prompts import PromptFormat

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
GENAI_CONFIG = "genai_config.json"
PLAN_FILE, SIDECAR = "model.plan", "model.json"
SOURCE_MANIFEST = "source_manifest.json"  # an engine folder's copy of the export's manifest.json


def default_export_path(model_name: str, folder_name: str) -> Path:
    """Where exports go unless told otherwise: export/<model>/<variant folder name>."""
    return Path("export") / model_name / folder_name


@dataclass(frozen=True)
class Manifest:
    """manifest.json of an export: what it was made from, how, what it holds, and how it validated."""

    precision: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> sha256 and bytes
    source_model: dict[str, Any] = field(default_factory=dict)  # source.models.LoadedModel.describe()
    target: str = ""
    prompt_format: dict[str, Any] | None = None
    opset: int | None = None
    exporter: str = ""  # export.exporters.Exporter.description
    contract: dict[str, Any] = field(default_factory=dict)
    kept_fp32: Any = None
    quantization: dict[str, Any] = field(default_factory=dict)
    graph: dict[str, Any] = field(default_factory=lambda: {"fused": False})
    kernels: dict[str, Any] | None = None  # precision.kernels.KernelChoice.manifest, where kernels were chosen
    validation: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format: str = "aira-opt-export/1"

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path | str = MANIFEST) -> Manifest:
        """The record of a parsed manifest; a key of the wrong type is a one-line error naming it. Keys this
        version does not know are ignored (a newer aira-opt may add some)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("precision", "fp32")  # manifests made before precision variants existed
        for name, kind in (("precision", str), ("files", dict), ("source_model", dict), ("contract", dict)):
            if not isinstance(values.get(name, kind()), kind):
                raise ExportFolderError(f"'{where}': `{name}` is not a {kind.__name__}; export again")
        for name in ("quantization", "graph", "validation"):
            if not isinstance(values.get(name), dict):
                values.pop(name, None)
        return cls(**values)

    def contents(self) -> dict[str, Any]:
        """What an export says of itself, as manifest.json spells it: every field but those the writer adds
        (core.artifacts.write_manifest: format, created, versions, files); fields left unset are left out."""
        added = {"format", "created", "versions", "files"}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in added and getattr(self, f.name) is not None}

    @property
    def variant(self) -> Variant:
        """The precision's record (thresholds, targets, what may run it); an unknown one is a one-line error."""
        return variant(self.precision)

    @property
    def fused(self) -> bool:
        """Whether attention was fused to ONNX Runtime contrib ops (precision/fusing.py)."""
        return bool(self.graph.get("fused"))

    @property
    def block_size(self) -> int | None:
        value = self.quantization.get("block_size")
        return int(value) if isinstance(value, int) else None

    @property
    def exporter_name(self) -> str:
        """Which of export.exporters.EXPORTERS made the graph."""
        return next((e.name for e in EXPORTERS.values() if self.exporter.startswith(e.description)),
                    DEFAULT_EXPORTER)

    @property
    def label(self) -> str:
        """The variant's folder name ('int4-b128', 'fp32-fused'), plus 'via optimum' for another exporter's graph."""
        record = variant(self.precision)
        settings = (WeightOnlySettings.from_record(self.quantization, record.weight_only)
                    if record.weight_only is not None else None)
        return record.folder_name(settings, self.fused) + (
            "" if self.exporter_name == DEFAULT_EXPORTER else f" via {self.exporter_name}")

    @property
    def source_spec(self) -> str | None:
        """The --model spec the export was made from."""
        source = self.source_model.get("source")
        return str(source) if source else None

    @property
    def num_layers_override(self) -> int | None:
        value = self.source_model.get("num_layers_override")
        return int(value) if value else None

    @property
    def source_name(self) -> str | None:
        name = self.source_model.get("name")
        return str(name) if name else None


class ModelFolder:
    """What export and engine folders share: the model's config, tokenizer, prompt format and generation
    defaults, each read once when first asked for."""

    kind: str  # "onnx" or "engine": which runtime opens it

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ExportFolderError(f"'{self.path}' is not a folder")

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{self.path}')"

    @cached_property
    def config(self) -> dict[str, Any]:
        """config.json, checked to describe a decoder we can drive."""
        path = self.path / CONFIG_FILE
        if not path.is_file():
            raise ExportFolderError(f"'{self.path}' has no {CONFIG_FILE}; run `aira-opt export` first")
        try:
            config = json.loads(path.read_text())
            DecoderContract.from_config_dict(config)
        except (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as exc:
            raise ExportFolderError(f"'{path}' is not a usable model config ({type(exc).__name__}: {exc}); "
                                    "export again") from exc
        return config

    @property
    def contract(self) -> DecoderContract:
        return DecoderContract.from_config_dict(self.config)

    @property
    def context_length(self) -> int:
        return int(self.config.get("max_position_embeddings", 2048))

    @cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer  # heavy: only once a tokenizer is needed

        try:
            return AutoTokenizer.from_pretrained(str(self.path))
        except (OSError, ValueError) as exc:
            raise ExportFolderError(f"'{self.path}' has no loadable tokenizer: {str(exc).splitlines()[0]}") from exc

    @cached_property
    def prompt_format(self) -> PromptFormat:
        """The prompt format the export recorded (else the tokenizer's)."""
        return read_format(self.path, self.tokenizer)

    @cached_property
    def generation_config(self) -> dict[str, Any]:
        """generation_config.json: the source model's own generation defaults ({} when absent)."""
        return read_generation_config(self.path)

    def verify(self) -> list[str]:
        """Every file that is missing or differs from its recorded hash (empty when all match)."""
        raise NotImplementedError


class ExportFolder(ModelFolder):
    """An export folder: model.onnx (and model.onnx_data), support files, manifest.json."""

    kind = "onnx"

    @property
    def model_path(self) -> Path:
        path = self.path / MODEL_FILE
        if not path.is_file():
            raise ExportFolderError(f"'{self.path}' has no {MODEL_FILE}; run `aira-opt export` first")
        return path

    @property
    def has_manifest(self) -> bool:
        """False for a folder another tool made (it still runs; only what the manifest says is unknown)."""
        return (self.path / MANIFEST).is_file()

    @cached_property
    def manifest(self) -> Manifest:
        return Manifest.from_json(read_manifest(self.path), self.path / MANIFEST)

    @cached_property
    def metadata(self) -> dict[str, str]:
        """model.onnx's metadata_props (read without its weights)."""
        return read_metadata(self.path)

    @cached_property
    def genai_config(self) -> dict[str, Any]:
        """genai_config.json (onnxruntime-genai's description of the decoder: file, shapes, I/O names)."""
        path = self.path / GENAI_CONFIG
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ExportFolderError(f"'{path}' is missing or unreadable ({exc}); export again") from exc

    def verify(self) -> list[str]:
        return verify_manifest(self.path)

    def unlisted_files(self) -> list[str]:
        return unlisted_files(self.path)


@dataclass(frozen=True)
class EngineRecord:
    """model.json next to a TensorRT plan: what it was built from, for what GPU, and how to feed it."""

    precision: str
    profiles: list[dict[str, Any]]
    sha256: dict[str, str] = field(default_factory=dict)
    tensorrt_version: str = ""
    gpu: str = ""
    compute_capability: str = ""
    target: str = ""
    hardware_compatibility_level: str = ""
    build_seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    inputs: Any = None
    outputs: Any = None
    created: str = ""
    format: str = "aira-opt-engine/1"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def variant(self) -> Variant:
        return variant(self.precision)


class EngineFolder(ModelFolder):
    """An engine folder from `aira-opt build`: model.plan, model.json, and the source export's support files."""

    kind = "engine"

    @property
    def plan_path(self) -> Path:
        return self.path / PLAN_FILE

    @cached_property
    def record(self) -> EngineRecord:
        path = self.path / SIDECAR
        if not path.is_file():
            raise ExportFolderError(f"'{self.path}' has no {SIDECAR}; is it an engine folder from `aira-opt build`?")
        try:
            return EngineRecord.from_json(json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ExportFolderError(f"'{path}' is not an engine record ({exc}); build again") from exc

    @cached_property
    def manifest(self) -> Manifest:
        """The manifest of the export the engine was built from."""
        return Manifest.from_json(read_manifest(self.path, SOURCE_MANIFEST), self.path / SOURCE_MANIFEST)

    def verify(self) -> list[str]:
        problems = [f"{name}: missing" for name in (PLAN_FILE, SIDECAR, CONFIG_FILE) if not (self.path / name).is_file()]
        if not problems and sha256_file(self.plan_path) != self.record.sha256.get("plan"):
            problems.append(f"{PLAN_FILE}: sha256 differs from {SIDECAR}")
        return problems


def open_folder(path: Path | str | ModelFolder) -> ExportFolder | EngineFolder:
    """An engine folder when it holds a TensorRT plan's record, else an export folder; one already opened is
    returned as it is (with what it has read so far)."""
    if isinstance(path, (ExportFolder, EngineFolder)):
        return path
    path = Path(path)
    if not path.is_dir():
        raise ExportFolderError(f"'{path}' is not a folder (an export folder from `aira-opt export`, or an engine "
                                "folder from `aira-opt build`)")
    return EngineFolder(path) if (path / SIDECAR).is_file() else ExportFolder(path)
