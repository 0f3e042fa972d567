"""PyTorch -> ONNX through torch.onnx's dynamo exporter: our contract's graph, one graph for prefill (past length 0)
and decode, standard ai.onnx ops only.

The model's forward takes a cache object, which torch.export cannot take as a graph input; `FlatCacheDecoder`
takes the contract's flat inputs, builds the cache inside forward (aira_opt.source.compat, the one place that knows
each transformers version's calls) and returns logits and the flat presents. The mask's length gets a dim of its
own (torch.export cannot declare it as past + sequence); it is renamed to the contract's name after export.
"""

from __future__ import annotations

import ast
import logging
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import torch

from aira_opt.core.contract import BATCH, PAST, SEQ, DecoderContract
from aira_opt.exporting.onnx_files import EXTERNAL_DATA_THRESHOLD, TIED_TRANSPOSE
from aira_opt.source.compat import cache_from_pairs, forward, pairs_from_cache
from aira_opt.source.models import LoadedModel

# Example sizes for tracing: each at least 2 and all different, so no dim is specialised or merged with another.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 5
MASK_DIM = "attention_mask_length"  # torch.export's own name for the mask's length, renamed to TOTAL after export


class FlatCacheDecoder(torch.nn.Module):
    """The contract as a module: (input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # input_ids, position_ids: [B, S]; attention_mask: [B, P + S]; past: 2 per layer, [B, kv_heads, P, D]
        cache = cache_from_pairs(list(zip(past[0::2], past[1::2])))
        logits, cache = forward(self.model, cache, input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids)
        # logits: [B, S, V]; presents: 2 per layer, [B, kv_heads, P + S, D]
        return (logits, *[t for pair in pairs_from_cache(cache) for t in pair])


def example_inputs(contract: DecoderContract, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    b, s, p = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST
    input_ids = torch.ones(b, s, dtype=torch.int64)                                   # [B, S]
    attention_mask = torch.ones(b, p + s, dtype=torch.int64)                          # [B, P + S]
    position_ids = torch.arange(p, p + s, dtype=torch.int64).expand(b, s).contiguous()  # [B, S]
    past = [torch.zeros(b, contract.num_kv_heads, p, contract.head_dim, dtype=dtype)  # [B, kv, P, D]
            for _ in contract.past_names()]
    return (input_ids, attention_mask, position_ids, *past)


def dynamic_shapes(contract: DecoderContract) -> dict[str, Any]:
    """torch.export's dims for the wrapper's arguments, named as in the contract."""
    from torch.export import Dim

    batch, seq, past, total = Dim(BATCH), Dim(SEQ), Dim(PAST), Dim(MASK_DIM)
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
            "position_ids": {0: batch, 1: seq},
            "past": tuple({0: batch, 2: past} for _ in contract.past_names())}


def name_by_module(graph: Any) -> None:
    """Name each node after the module that made it (`/model/layers/0/self_attn/q_proj/MatMul`, as optimum's
    exporter does), parameters by transformers' names, and each projection's folded weight after its parameter
    (`model.layers.0.self_attn.q_proj.weight.T`, stored transposed); drop the per-node trace metadata (source
    lines, fx nodes), which would bloat the file."""
    for value in list(graph.initializers.values()):  # `model.` is the wrapper's attribute, not the model's
        if value.name.startswith("model.") and value.name[len("model."):] not in graph.initializers:
            value.name = value.name[len("model."):]
    taken: Counter[str] = Counter()
    for node in graph:
        scopes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))
        module = scopes[-2].removeprefix("model.") if len(scopes) >= 2 else ""
        base = "/" + "/".join(filter(None, [*module.split("."), node.op_type]))
        taken[base] += 1
        node.name = base if taken[base] == 1 else f"{base}_{taken[base] - 1}"
        node.metadata_props.clear()
        weight = node.inputs[1] if node.op_type == "MatMul" and module and len(node.inputs) == 2 else None
        if (weight is not None and weight.is_initializer() and len(weight.uses()) == 1
                and f"{module}.weight.T" not in graph.initializers):
            weight.name = f"{module}.weight.T"


def export_graph(loaded: LoadedModel, folder: Path, opset: int) -> None:
    """Write `folder`/model.onnx (and model.onnx_data when large) from `loaded.model`, in the model's dtype.

    A streamed model (source.weights.streamed_model) is traced without its weights, on the meta device; each
    weight is then read from the checkpoint only while it is written into model.onnx_data, one at a time."""
    import onnx_ir as ir

    contract = DecoderContract.from_config(loaded.config)
    weights = getattr(loaded.model, "streamed_weights", None)
    dtype = next(loaded.model.parameters()).dtype
    traced = _meta_twin(loaded.model) if weights is not None else loaded.model
    inputs = example_inputs(contract, dtype)
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # deprecation and tracer notes from transformers and torch.export
            program = torch.onnx.export(
                FlatCacheDecoder(traced), inputs, dynamo=True, opset_version=opset,
                dynamic_shapes=dynamic_shapes(contract), input_names=contract.input_names(),
                output_names=contract.output_names(), optimize=weights is None, verbose=False, report=False)
    finally:
        registry_log.setLevel(level)
    model = program.model
    if weights is not None:
        _read_weights_lazily(model.graph, loaded.model, weights)
        program.optimize()  # what optimize=True does; every large weight is already in place, unread
    name_by_module(model.graph)
    shapes = {**contract.input_shapes(), **contract.output_shapes()}
    for value in [*model.graph.inputs, *model.graph.outputs]:  # the contract's dim names, the mask's included
        value.shape = ir.Shape(shapes[value.name])
    path = folder / "model.onnx"
    size = sum(v.const_value.size * v.const_value.dtype.itemsize for v in model.graph.initializers.values()
               if v.const_value is not None)
    if size > EXTERNAL_DATA_THRESHOLD:  # tensors read and written on every core, a bounded amount in flight
        ir.save(model, path, external_data=path.name + "_data", max_workers=os.cpu_count())
    else:
        ir.save(model, path)
    del program, model
    # No value_info: a later pass that changes a type (fp16, Q/DQ) must not meet a stale one. The weights stay
    # where they are (model.onnx_data for large models).
    graph_only = onnx.load(str(path), load_external_data=False)
    del graph_only.graph.value_info[:]
    name_tied_transpose(graph_only.graph)
    onnx.save_model(graph_only, str(path))


def name_tied_transpose(graph: onnx.GraphProto) -> None:
    """A head that reads the embedding table through a Transpose of its own (a tied model traced without its
    weights, where nothing folds it) gets the node tie_embeddings writes when it removes a folded copy: first, by
    the same names, so an export is the same graph whichever way the weights came."""
    inits = {i.name for i in graph.initializer}
    node = next((n for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits
                 and any(m.op_type == "Gather" and m.input[0] == n.input[0] for m in graph.node)), None)
    if node is None or node.name == TIED_TRANSPOSE:
        return
    old, new = node.output[0], f"{node.input[0]}_transposed"
    for other in graph.node:
        other.input[:] = [new if i == old else i for i in other.input]
    node.output[0], node.name = new, TIED_TRANSPOSE
    graph.node.remove(node)
    graph.node.insert(0, node)


def _meta_twin(model: Any) -> Any:
    """`model`'s architecture for torch.export to trace while the weights stay in the checkpoint: parameters are
    allocated but never written or read (the pages of untouched memory are not resident), so the trace is the
    one an in-memory model gives; buffers (the rotary frequencies) are `model`'s own."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=True):
        twin = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    twin.to_empty(device="cpu")
    if getattr(model.config, "tie_word_embeddings", False):  # to_empty gives each name a tensor of its own
        twin.lm_head.weight = twin.get_input_embeddings().weight
    for name, buffer in model.named_buffers():  # the model's own, dtype included (half() casts them too)
        owner, _, attr = name.rpartition(".")
        twin.get_submodule(owner)._buffers[attr] = buffer.detach().clone()
    return twin.eval()


def _read_weights_lazily(graph: Any, model: Any, weights: Any) -> None:
    """Give each initializer of a graph traced on the meta device a tensor that reads its weight only when it is
    written (onnx_ir's LazyTensor, evaluated once, then dropped), and fold each weight's Transpose into a
    lazily transposed initializer, as the optimizer folds them when the weights are in memory."""
    import numpy as np
    import onnx_ir as ir

    buffers = dict(model.named_buffers())  # computed, in memory (the rotary frequencies)

    def reader(name: str, dtype: Any, transpose: bool = False) -> Any:
        def read() -> Any:
            tensor = buffers[name] if name in buffers else weights[name]
            array = tensor.detach().to(torch.float32).numpy().astype(dtype.numpy(), copy=False)
            return ir.tensor(np.ascontiguousarray(array.T) if transpose else array)
        return read

    for value in list(graph.initializers.values()):
        name = value.name.removeprefix("model.")
        value.const_value = ir.LazyTensor(reader(name, value.dtype), dtype=value.dtype, shape=value.shape,
                                          name=value.name)
    for node in list(graph):
        source = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        perm = node.attributes.get("perm")
        if (source is None or not source.is_initializer() or len(source.shape) != 2 or len(source.uses()) != 1
                or (perm is not None and list(perm.as_ints()) != [1, 0])):
            continue
        name = source.name.removeprefix("model.")
        rows, cols = source.shape
        folded = ir.Value(name=f"{source.name}_transposed", shape=ir.Shape([cols, rows]), type=source.type,
                          const_value=ir.LazyTensor(reader(name, source.dtype, transpose=True), dtype=source.dtype,
                                                    shape=ir.Shape([cols, rows])))
        graph.register_initializer(folded)
        node.outputs[0].replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        graph.initializers.pop(source.name)
