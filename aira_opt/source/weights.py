"""A model's weights read one tensor at a time, so nothing needs the whole model in memory.

`SafetensorsWeights` is a read-only mapping from transformers' parameter names to fp32 tensors, read on each
access from the folder's memory-mapped safetensors files. Random presets become such a folder once
(`preset_checkpoint`): each tensor is drawn from its own seeded generator and written shard by shard, so a preset
of any size is made in the memory of one layer. `streamed_model` gives a model whose parameters live on the meta
device and are read from the mapping just before each module runs (accelerate's offload hooks): the PyTorch
reference of an export without the model in memory, and the graph the exporter traces without weights.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PRESET_DTYPE = "bfloat16"  # what a preset's checkpoint stores; loaded as fp32 (exactly: every bf16 is an fp32)
INITIALIZER_RANGE = 0.02  # transformers' Llama init: normal(0, 0.02) for linear and embedding weights
INDEX = "model.safetensors.index.json"


class SafetensorsWeights(Mapping[str, Any]):
    """The tensors of a safetensors folder (one file or an index of shards) by name, each read on access as fp32."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            self.files = {name: self.folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open

            single = self.folder / "model.safetensors"
            with safe_open(str(single), framework="pt") as f:
                self.files = {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)

    def __getitem__(self, name: str) -> Any:
        import torch
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as f:  # KeyError for a name the folder lacks
            return f.get_tensor(name).to(torch.float32)

    def __contains__(self, name: object) -> bool:  # Mapping's own would read the tensor to find out
        return name in self.files

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> Any:
    """A preset's tensor: norms are ones, the rest normal(0, 0.02) as transformers initialises Llama, drawn from a
    generator of its own (seed and name), so any tensor can be made without the others."""
    import torch

    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=generator) * INITIALIZER_RANGE).to(torch.bfloat16)


def write_preset_checkpoint(config: Any, tokenizer: Any, folder: Path, seed: int) -> None:
    """A transformers folder of `config`'s shape with seeded random bf16 weights, one shard per layer (plus one
    for the embeddings, final norm and head), written shard by shard: peak memory is one layer."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    config.architectures = [type(skeleton).__name__]  # other converters (llama.cpp's) read the class from it
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)  # the head reads the embedding
    del skeleton
    shards: dict[str, list[str]] = {}
    for name in shapes:
        layer = name.split(".layers.")[1].split(".")[0] if ".layers." in name else None
        shards.setdefault(f"model-layer-{int(layer):03d}.safetensors" if layer else "model-other.safetensors",
                          []).append(name)
    weight_map, total = {}, 0
    for number, (file, names) in enumerate(sorted(shards.items()), 1):
        tensors = {name: random_tensor(name, shapes[name], seed) for name in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: file for name in names})
        del tensors
        log.info("random weights: shard %d of %d written", number, len(shards))
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.torch_dtype = PRESET_DTYPE
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def streamed_model(folder: Path, config: Any) -> Any:
    """A LlamaForCausalLM-like model of `config` whose parameters stay on the meta device and are read from
    `folder`'s safetensors just before each module runs, then dropped (accelerate's CPU offload with our
    mapping as its weights). Buffers (rotary frequencies) are computed as usual, in memory: they are small."""
    import torch
    from accelerate import cpu_offload, init_empty_weights
    from transformers import AutoModelForCausalLM

    config.torch_dtype = torch.float32
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if getattr(config, "tie_word_embeddings", False):  # one parameter, as from_pretrained leaves it
        model.lm_head.weight = model.get_input_embeddings().weight
    model.eval()
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    weights = SafetensorsWeights(folder)
    tied = getattr(config, "tie_word_embeddings", False)
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    lookup = StreamedWeights(weights, names, tied)
    # counted now: the offload hooks swap a module's parameters at each forward, which unties a tied head
    lookup.parameter_count = sum(p.numel() for p in model.parameters())
    cpu_offload(model, execution_device=torch.device("cpu"), offload_buffers=False, state_dict=lookup)
    model.streamed_weights = lookup  # the exporter reads the weights from here
    return model


class StreamedWeights(Mapping[str, Any]):
    """A model's parameter names onto a checkpoint's tensors: a tied head reads the embedding."""

    def __init__(self, weights: SafetensorsWeights, names: set[str], tied: bool):
        self.weights, self.names, self.tied = weights, names, tied
        self.parameter_count = 0  # the model's parameters, a tied head once (set by streamed_model)

    def source_name(self, name: str) -> str:
        if name not in self.weights and self.tied and name == "lm_head.weight":
            return "model.embed_tokens.weight"
        return name

    def __getitem__(self, name: str) -> Any:
        return self.weights[self.source_name(name)]

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.names))

    def __len__(self) -> int:
        return len(self.names)
