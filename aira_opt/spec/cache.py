"""The one place that knows how each transformers version passes a KV cache to a causal LM.

transformers 4.57 takes `past_key_values=` and returns `.past_key_values`; 5.x takes `cache=` and returns `.cache`
(the old name still works in early 5.x with a deprecation warning, and is due to go). Both build a `DynamicCache`
from (key, value) pairs and expose each layer's tensors as `cache.layers[i].keys / .values`. Everything else in
aira_opt (the exporter's wrapper, validation, parity) calls through here.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Sequence


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
