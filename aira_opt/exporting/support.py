"""The files that travel with the graph so the folder is complete on its own: tokenizer, model config, and the
generation config with the prompt format, stop ids and the source model's own generation defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aira_opt.source.compat import save_portable
from aira_opt.source.models import CARD_GENERATION_DEFAULTS, LoadedModel
from aira_opt.source.prompts import PromptFormat, detect_format

GENERATION_CONFIG = "generation_config.json"
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")


def model_format(loaded: LoadedModel) -> PromptFormat:
    return detect_format(loaded.tokenizer, loaded.model.generation_config)


def generation_defaults(loaded: LoadedModel, fmt: PromptFormat) -> dict[str, Any]:
    """Aira's model-card defaults for Aira; any other model's own generation config (what it sets, nothing more)."""
    if fmt.kind == "aira":
        return dict(CARD_GENERATION_DEFAULTS)
    own = loaded.model.generation_config.to_diff_dict()
    return {key: own[key] for key in SAMPLING_KEYS if key in own}


def generation_config(loaded: LoadedModel) -> dict[str, Any]:
    """generation_config.json: transformers' keys, plus `prompt_format` for our loop and other runtimes."""
    fmt = model_format(loaded)
    return {**generation_defaults(loaded, fmt), "bos_token_id": loaded.tokenizer.bos_token_id,
            "eos_token_id": fmt.eos_token_id, "pad_token_id": fmt.pad_id,
            "prompt_format": fmt.describe()}


def write_support_files(loaded: LoadedModel, folder: Path) -> None:
    """Tokenizer (its inputs: ids and mask only), config and generation config (optimum writes its own; ours wins)."""
    names = ["input_ids", "attention_mask"]  # no token_type_ids, which generate(**enc) would refuse
    loaded.tokenizer.model_input_names = names
    loaded.tokenizer.init_kwargs["model_input_names"] = names  # what save_pretrained writes
    save_portable(folder, loaded.tokenizer, loaded.model.config)  # loads under transformers 4.57 and 5.x
    (folder / GENERATION_CONFIG).write_text(json.dumps(generation_config(loaded), indent=2) + "\n")


def read_generation_config(folder: Path) -> dict[str, Any]:
    """A folder's generation_config.json ({} when absent or not a JSON object)."""
    path = Path(folder) / GENERATION_CONFIG
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def read_format(folder: Path, tokenizer: Any) -> PromptFormat:
    """The prompt format the export recorded; a folder without one (older or hand-made) gets it from its tokenizer."""
    recorded = read_generation_config(folder).get("prompt_format")
    if isinstance(recorded, dict):
        try:
            return PromptFormat.from_dict(recorded)
        except (KeyError, TypeError, ValueError):
            pass
    return detect_format(tokenizer)
