"""An export folder as transformers.js expects a model: the same files, named its way, computed from the folder
on request and never copied. The export folder stays the one source of truth; `aira-opt web` serves this view,
and `aira-opt web --save DIR` writes it out (the weights hard-linked where the file system allows).

transformers.js (src/utils/model-loader.js, src/models/session.js, 4.x) reads:
- `onnx/model{suffix}.onnx`, the suffix named by its dtype: fp32 '', fp16 '_fp16', int8 '_int8', q8 '_quantized',
  q4 '_q4', q4f16 '_q4f16' (`transformers.js_config.dtype` in config.json chooses the default);
- external data as `onnx/model{suffix}.onnx_data`, fetched only where `transformers.js_config.use_external_data_format`
  names the file, and handed to ONNX Runtime under that name, which must be the location the graph records. Our
  graphs record `model.onnx_data`, so a renamed graph gets its locations rewritten (the graph without its weights:
  small);
- the first step's empty cache from the graph's input dims (our contract fixes heads and head size).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import onnx

from aira_opt.core.artifacts import atomic_folder
from aira_opt.core.errors import OptionError
from aira_opt.folders import CONFIG_FILE, GENAI_CONFIG, ExportFolder
from aira_opt.precision.variants import web_names

# transformers.js's DEFAULT_DTYPE_SUFFIX_MAPPING, for the dtypes our variants map to (Variant.web_dtype).
DTYPE_SUFFIX = {"fp32": "", "fp16": "_fp16", "int8": "_int8", "q8": "_quantized", "q4": "_q4", "q4f16": "_q4f16"}
SUPPORT_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja")  # served as they are; config.json and genai_config.json are rewritten
DATA_SUFFIX = "_data"  # transformers.js: `${fileName}${suffix}.onnx_data`


@dataclass(frozen=True)
class WebFile:
    """One file of the view: bytes made here (small: configs, a renamed graph) or a file of the export."""

    content: bytes | None = None
    source: Path | None = None

    @property
    def size(self) -> int:
        return len(self.content) if self.content is not None else self.source.stat().st_size


class WebModel:
    """An export folder under transformers.js's names (`files`: path inside the model -> WebFile)."""

    def __init__(self, folder: ExportFolder, name: str):
        self.folder, self.name = folder, name
        variant = folder.manifest.variant
        if variant.web_dtype is None:
            raise OptionError(f"'{folder.path}' is a {variant.name} export, made for {variant.target}; a web page "
                              f"runs {', '.join(web_names())}")
        self.precision = variant.name
        self.dtype = variant.web_dtype
        self.graph_name = f"onnx/model{DTYPE_SUFFIX[self.dtype]}.onnx"

    @cached_property
    def external_data(self) -> Path | None:
        """The export's weight file, if its graph keeps weights outside (one file: our exporter writes one)."""
        locations = {entry.value for tensor in _external_tensors(self._graph) for entry in tensor.external_data
                     if entry.key == "location"}
        if len(locations) > 1:
            raise OptionError(f"'{self.folder.path}' spreads its weights over {len(locations)} files; a web page "
                              "takes one")
        return self.folder.path / locations.pop() if locations else None

    @cached_property
    def _graph(self) -> onnx.ModelProto:
        return onnx.load(str(self.folder.model_path), load_external_data=False)

    @cached_property
    def files(self) -> dict[str, WebFile]:
        files = {name: WebFile(source=self.folder.path / name) for name in SUPPORT_FILES
                 if (self.folder.path / name).is_file()}
        files[CONFIG_FILE] = WebFile(content=_json(self.config))
        files[GENAI_CONFIG] = WebFile(content=_json(self._genai_config()))
        if self.external_data is None:
            files[self.graph_name] = WebFile(source=self.folder.model_path)
        else:
            files[self.graph_name] = WebFile(content=self._relocated_graph())
            files[self.graph_name + DATA_SUFFIX] = WebFile(source=self.external_data)
        return files

    @property
    def config(self) -> dict:
        """config.json with what transformers.js reads: the default dtype, and which graph has external data."""
        web = {"dtype": self.dtype}
        if self.external_data is not None:
            web["use_external_data_format"] = {Path(self.graph_name).name: 1}
        return {**self.folder.config, "transformers.js_config": web}

    def _genai_config(self) -> dict:
        """genai_config.json naming the graph where this layout puts it."""
        config = copy.deepcopy(self.folder.genai_config)
        config["model"]["decoder"]["filename"] = self.graph_name
        return config

    def _relocated_graph(self) -> bytes:
        """The graph with its weights' location renamed to the data file transformers.js hands over."""
        graph = onnx.ModelProto()
        graph.CopyFrom(self._graph)
        location = Path(self.graph_name).name + DATA_SUFFIX
        for tensor in _external_tensors(graph):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        return graph.SerializeToString()

    def save(self, out: Path, force: bool = False) -> None:
        """Write the view as a folder (atomically, as an export): weights hard-linked where possible, else copied."""
        with atomic_folder(out, force) as tmp:
            for rel, file in self.files.items():
                _write(tmp / rel, file)


def _write(target: Path, file: WebFile) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if file.content is not None:
        target.write_bytes(file.content)
        return
    try:
        os.link(file.source, target)
    except OSError:
        shutil.copyfile(file.source, target)


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor whose data lives in a file: initializers and constant attributes, subgraphs included."""
    def walk(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from walk(sub)
    return (t for t in walk(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL)


def _json(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def web_models(folders: list[ExportFolder]) -> dict[str, WebModel]:
    """One model per folder, named `<model>-<variant>` (the folder's parent and its name), unique."""
    models: dict[str, WebModel] = {}
    for folder in folders:
        if not folder.has_manifest:
            raise OptionError(f"'{folder.path}' has no manifest.json; serve a folder `aira-opt export` wrote")
        base = f"{folder.path.resolve().parent.name}-{folder.path.name}".lower()
        name, n = base, 2
        while name in models:
            name, n = f"{base}-{n}", n + 1
        models[name] = WebModel(folder, name)
        models[name].files  # noqa: B018 (reads the graph's header now: a bad folder fails before anything is served)
    return models
