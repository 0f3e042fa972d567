"""The one place that knows what differs between transformers 4.57 and 5.x.

- The KV cache: 4.57 takes `past_key_values=` and returns `.past_key_values`; 5.x takes `cache=` and returns
  `.cache` (the old name still works in early 5.x with a deprecation warning, and is due to go). Both build a
  `DynamicCache` from (key, value) pairs and expose each layer's tensors as `cache.layers[i].keys / .values`.
  The exporter's wrapper and validation call through here.
- Saved folders: 5.x writes `tokenizer_class: TokenizersBackend`, which 4.57 cannot load, and keeps rope settings
  only under `rope_parameters`, which 4.57 ignores (it would fall back to rope_theta 10000). `save_portable`
  writes both spellings, so a folder made under either version loads in both (optimum needs 4.57).
"""

from __future__ import annotations

import inspect
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence


def transformers_major() -> int:
    from importlib.metadata import version

    return int(version("transformers").split(".")[0])


@lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_from_pairs(pairs: Sequence[tuple[Any, Any]]) -> Any:
    """A DynamicCache holding `pairs`: one (key, value) per layer, each [B, kv_heads, past, head_dim]."""
    from transformers import DynamicCache

    return DynamicCache([(k, v) for k, v in pairs])


def pairs_from_cache(cache: Any) -> list[tuple[Any, Any]]:
    """The (key, value) tensors of every layer of a returned cache, in layer order."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def forward(model: Any, cache: Any = None, **inputs: Any) -> tuple[Any, Any]:
    """model(**inputs) with the KV cache passed and returned under this transformers version's name:
    returns (logits [B, S, V], the updated cache)."""
    out = model(**inputs, use_cache=True, **{_cache_keyword(type(model)): cache})
    returned = out.cache if hasattr(out, "cache") else out.past_key_values
    return out.logits, returned


def save_portable(folder: Path, tokenizer: Any = None, config: Any = None) -> None:
    """save_pretrained of the tokenizer and/or config into `folder`, readable by transformers 4.57 and 5.x."""
    folder = Path(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        path = folder / "tokenizer_config.json"
        data = json.loads(path.read_text())
        if data.get("tokenizer_class") == "TokenizersBackend":  # 5.x's generic fast tokenizer
            data["tokenizer_class"] = "PreTrainedTokenizerFast"  # the same tokenizer.json, by its 4.x name
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    if config is not None:
        config.save_pretrained(folder)
        path = folder / "config.json"
        data = json.loads(path.read_text())
        rope = data.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" not in data and "rope_theta" in rope:
            data["rope_theta"] = rope["rope_theta"]
            if rope.get("rope_type", "default") != "default":
                data["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if "dtype" in data and "torch_dtype" not in data:
            data["torch_dtype"] = data["dtype"]
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
