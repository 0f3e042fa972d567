"""What lets other runtimes use an export folder without our Python code: ONNX metadata_props (source, precision,
the prompt format and its control tokens, stop ids, generation defaults, the I/O contract) and a
genai_config.json that onnxruntime-genai loads as it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from aira_opt.core.contract import DecoderContract
from aira_opt.exporting.support import generation_defaults, model_format
from aira_opt.source.models import AIRA_TOKENS, LoadedModel
from aira_opt.source.prompts import PromptFormat, control_ids


def graph_kind(model: onnx.ModelProto) -> str:
    """What a runtime needs to know about the graph's ops: standard ONNX, or our CPU fusion's contrib ops."""
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    if ("com.microsoft", "GroupQueryAttention") in ops:
        return "fused attention: com.microsoft GroupQueryAttention + RotaryEmbedding (ONNX Runtime CPU)"
    return "standard attention"


def special_tokens(loaded: LoadedModel, fmt: PromptFormat) -> dict[str, Any]:
    """The control tokens by role, with their ids: Aira's four, or the stop and pad tokens of any other format."""
    tok = loaded.tokenizer
    if fmt.kind == "aira":
        ids = control_ids(tok)
        return {role: {"token": getattr(AIRA_TOKENS, role), "id": ids[role]} for role in ("bos", "sep", "eos", "pad")}
    named = {"stop": [{"token": tok.convert_ids_to_tokens(i), "id": i} for i in fmt.stop_ids],
             "pad": {"token": tok.convert_ids_to_tokens(fmt.pad_id), "id": fmt.pad_id}}
    if tok.bos_token is not None:
        named["bos"] = {"token": tok.bos_token, "id": tok.bos_token_id}
    return named


def metadata(loaded: LoadedModel, precision: str) -> dict[str, str]:
    """metadata_props entries (ONNX wants strings; structured values are JSON)."""
    fmt = model_format(loaded)
    return {
        "aira_opt.source_model": loaded.source,
        "aira_opt.precision": precision,
        "aira_opt.special_tokens": json.dumps(special_tokens(loaded, fmt)),
        "aira_opt.prompt_format": fmt.kind,
        "aira_opt.prompt_template": fmt.template,
        "aira_opt.stop_ids": json.dumps(list(fmt.stop_ids)),
        "aira_opt.prompt_note": "the template's control tokens are matched as tokens; the question is tokenized "
                                "with special-token matching off, so typed control strings stay text",
        "aira_opt.generation_defaults": json.dumps(generation_defaults(loaded, fmt)),
        "aira_opt.io_contract": json.dumps(DecoderContract.from_config(loaded.config).describe()),
    }


def read_metadata(folder: Path) -> dict[str, str]:
    """metadata_props of a folder's model.onnx (empty when there is none)."""
    path = Path(folder) / "model.onnx"
    if not path.is_file():
        return {}
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def write_metadata(model_path: Path, props: dict[str, str]) -> None:
    """Set metadata_props on model.onnx in place, with the graph's kind (graph_kind); external weight data is
    left untouched."""
    model = onnx.load(str(model_path), load_external_data=False)
    props = {**props, "aira_opt.graph": graph_kind(model)}
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)
    onnx.save_model(model, str(model_path))


def genai_config(loaded: LoadedModel, cuda: bool) -> dict[str, Any]:
    """onnxruntime-genai's configuration for our graph: our I/O names, position_ids as an input, a cache that
    grows by concatenation (so no shared past/present buffer), stop ids and search defaults of the source model.
    cuda: the graph was made for a GPU (the variant record says so), so genai runs it on its CUDA provider."""
    cfg = loaded.config
    contract = DecoderContract.from_config(cfg)
    fmt = model_format(loaded)
    defaults = generation_defaults(loaded, fmt)
    provider_options = [{"cuda": {}}] if cuda else []
    return {
        "model": {
            "bos_token_id": loaded.tokenizer.bos_token_id,
            "context_length": int(cfg.max_position_embeddings),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options},
                "filename": "model.onnx",
                "head_size": contract.head_dim,
                "hidden_size": int(cfg.hidden_size),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": int(cfg.num_attention_heads),
                "num_hidden_layers": contract.num_layers,
                "num_key_value_heads": contract.num_kv_heads,
            },
            "eos_token_id": fmt.eos_token_id,
            "pad_token_id": fmt.pad_id,
            "type": "llama",
            "vocab_size": contract.vocab_size,
        },
        "search": {
            "do_sample": bool(defaults.get("do_sample", False)),
            "early_stopping": True,
            "max_length": int(cfg.max_position_embeddings),
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            **{key: defaults[key] for key in ("repetition_penalty", "temperature", "top_k", "top_p") if key in defaults},
        },
    }


def make_portable(loaded: LoadedModel, folder: Path, precision: str, cuda: bool) -> None:
    """Metadata into model.onnx and genai_config.json next to it (called before the manifest is written)."""
    write_metadata(Path(folder) / "model.onnx", metadata(loaded, precision))
    (Path(folder) / "genai_config.json").write_text(json.dumps(genai_config(loaded, cuda), indent=2) + "\n")
