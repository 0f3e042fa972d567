"""The files that travel with the graph so the folder is complete on its own: tokenizer, model config and
generation defaults."""

from __future__ import annotations

import json
from pathlib import Path

from aira_opt.spec.models import CARD_GENERATION_DEFAULTS, LoadedModel


def write_support_files(loaded: LoadedModel, folder: Path) -> None:
    """Tokenizer, config and the model card's generation defaults (optimum writes its own; ours wins)."""
    loaded.tokenizer.save_pretrained(folder)
    loaded.model.config.save_pretrained(folder)
    tok = loaded.tokenizer
    generation = {**CARD_GENERATION_DEFAULTS, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                  "pad_token_id": tok.pad_token_id}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
