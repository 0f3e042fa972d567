"""The ONNX I/O contract of an exported decoder, as one object: names, dtypes and dynamic axes.

Names follow optimum / transformers.js / onnxruntime-genai so those runtimes load our folders as they are.
`check_graph` collects every deviation, then the caller raises one typed error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

# ONNX Runtime's type strings of the cache tensors, as numpy dtypes (fp32 and fp16 exports).
ORT_KV_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "past_sequence_length + sequence_length"


@dataclass(frozen=True)
class DecoderContract:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> DecoderContract:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.num_key_value_heads, head_dim, config.vocab_size)

    @classmethod
    def from_config_dict(cls, cfg: dict[str, Any]) -> DecoderContract:
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        return cls(cfg["num_hidden_layers"], cfg.get("num_key_value_heads", cfg["num_attention_heads"]), head_dim,
                   cfg["vocab_size"])

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.past_names()]

    def output_names(self) -> list[str]:
        return ["logits", *self.present_names()]

    def input_shapes(self) -> dict[str, list[str | int]]:
        # input_ids/position_ids: [B, S]; attention_mask: [B, past + S]; past: [B, kv_heads, past, head_dim]
        shapes: dict[str, list[str | int]] = {"input_ids": [BATCH, SEQ], "attention_mask": [BATCH, TOTAL],
                                              "position_ids": [BATCH, SEQ]}
        for name in self.past_names():
            shapes[name] = [BATCH, self.num_kv_heads, PAST, self.head_dim]
        return shapes

    def output_shapes(self) -> dict[str, list[str | int]]:
        shapes: dict[str, list[str | int]] = {"logits": [BATCH, SEQ, self.vocab_size]}
        for name in self.present_names():
            shapes[name] = [BATCH, self.num_kv_heads, TOTAL, self.head_dim]
        return shapes

    def describe(self) -> dict[str, Any]:
        """The contract as JSON-ready data (for the manifest, metadata and `inspect`)."""
        return {
            "inputs": {n: s for n, s in self.input_shapes().items()},
            "outputs": {n: s for n, s in self.output_shapes().items()},
            "past_length_axis": 2,
            "kv_layout": "[batch, kv_heads, past, head_dim]",
        }

    def check_graph(self, model: onnx.ModelProto) -> list[str]:
        """Every way `model`'s I/O deviates from the contract (names, ranks, static dims, int64 ids)."""
        problems: list[str] = []
        for kind, values, expected in (("input", model.graph.input, self.input_shapes()),
                                       ("output", model.graph.output, self.output_shapes())):
            by_name = {v.name: v for v in values}
            for name, shape in expected.items():
                if name not in by_name:
                    problems.append(f"{kind} '{name}' missing")
                    continue
                dims = by_name[name].type.tensor_type.shape.dim
                if len(dims) != len(shape):
                    problems.append(f"{kind} '{name}' has rank {len(dims)}, expected {len(shape)}")
                    continue
                for axis, (dim, want) in enumerate(zip(dims, shape)):
                    if isinstance(want, int) and dim.dim_value != want:
                        problems.append(f"{kind} '{name}' axis {axis} is {dim.dim_value or dim.dim_param}, expected {want}")
                    if isinstance(want, str) and dim.dim_value:
                        problems.append(f"{kind} '{name}' axis {axis} is static {dim.dim_value}, expected dynamic")
            extra = set(by_name) - set(expected)
            problems.extend(f"unexpected {kind} '{n}'" for n in sorted(extra))
        for name in ("input_ids", "attention_mask", "position_ids"):
            for v in model.graph.input:
                if v.name == name and v.type.tensor_type.elem_type != onnx.TensorProto.INT64:
                    problems.append(f"input '{name}' is not int64")
        return problems


def position_ids_from_mask(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """position_ids for the last `new_tokens` positions: cumulative sum of the mask, so left padding works.

    Pads get position 1, exactly as transformers' generate does, so batched logits match it.
    attention_mask: [B, past + S] -> position_ids: [B, S]
    """
    positions = np.cumsum(attention_mask, axis=1) - 1
    positions = np.where(attention_mask == 0, 1, positions)
    return positions[:, -new_tokens:].astype(np.int64)


def empty_past(contract: DecoderContract, batch: int, dtype: type) -> dict[str, np.ndarray]:
    """Zero-length past tensors, [B, kv_heads, 0, head_dim] each: the prefill is the same graph at past 0."""
    return {name: np.zeros((batch, contract.num_kv_heads, 0, contract.head_dim), dtype)
            for name in contract.past_names()}
