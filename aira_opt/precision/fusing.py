"""CPU graph fusion: each layer's exported attention becomes RotaryEmbedding + GroupQueryAttention.

An exported graph (ours from torch.onnx, or optimum's) spells attention out in many small nodes per layer (shape
arithmetic, rotary slices, repeat_kv's Expand/Reshape, the mask, softmax, NaN guard). On a CPU each node costs
dispatch time however small its tensor, a measurable share of a decode step (benchmarks/notes/). ONNX Runtime's contrib ops do
the same work in three kernels per layer (two RotaryEmbedding, one GroupQueryAttention). They are ONNX Runtime-only, so only the CPU variants
(int8, int4, and fp32 on request) get them; fp16 and int8-qdq stay standard-op for TensorRT.

The I/O contract does not change: same inputs (left-padding mask, position_ids, past [B, kv, P, D]) and
outputs (present [B, kv, P+S, D]), so our loop, onnxruntime-genai and optimum read the graph as before.
Left padding is kept exact: every row claims the full length (seqlens_k = T - 1, so all rows share one
cache layout) and the padding columns are masked by an additive bias, as transformers' SDPA mask does;
rotary positions come from position_ids per token, not from the row's length.

Then each residual Add joins the RMSNorm after it (SkipSimplifiedLayerNormalization, fuse_residual_norms),
and the projections that read the same input (q/k/v, gate/up) are packed into one wider MatMul each
(pack_projections), as onnxruntime-genai's builder does for q/k/v.

The layers are found by structure, anchored on contract names: `present.{i}.key` is Concat(past, K),
`present.{i}.value` is Concat(past, V); walking up from K and V reaches the k_proj/v_proj weight MatMuls,
whose shared input also feeds q_proj; walking down from the value cache reaches o_proj.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aira_opt.core.contract import DecoderContract
from aira_opt.core.errors import AiraOptError

MS_DOMAIN = "com.microsoft"
FUSED_OPS = ("GroupQueryAttention", "RotaryEmbedding")


class FusionError(AiraOptError):
    """The graph does not have the Llama attention this pass rewrites."""


@dataclass(frozen=True)
class AttentionSite:
    """One layer's attention as found in the exported graph (tensor names, and the o_proj node to rewire)."""

    layer: int
    query: str       # q_proj output: [B, S, Hq*D]
    key: str         # k_proj output: [B, S, Hkv*D]
    value: str       # v_proj output: [B, S, Hkv*D]
    o_proj: onnx.NodeProto  # o_proj's MatMul, whose input [B, S, Hq*D] becomes the fused output


class Graph:
    """Producer/consumer indexes over a GraphProto, enough to walk it both ways."""

    def __init__(self, model: onnx.ModelProto):
        # Constant tensors: initializers, Constant nodes, and Identity copies of them (the exporter dedupes
        # equal initializers into Identity nodes, e.g. equal bias vectors).
        self.initializers = {i.name: i for i in model.graph.initializer}
        self.weights = set(self.initializers)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            if node.op_type == "Constant" or (node.op_type == "Identity" and node.input[0] in self.weights):
                self.weights.update(node.output)
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)

    def is_weight_matmul(self, node: onnx.NodeProto) -> bool:
        # A MatMul by an initializer, or one already quantized to MatMulNBits.
        return (node.op_type == "MatMul" and node.input[1] in self.weights) or node.op_type == "MatMulNBits"

    def projection_above(self, tensor: str, limit: int = 40) -> onnx.NodeProto:
        """The nearest weight MatMul upstream of `tensor` (breadth-first over data inputs)."""
        queue, seen = deque([tensor]), set()
        while queue and len(seen) < limit:
            name = queue.popleft()
            node = self.producer.get(name)
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if self.is_weight_matmul(node):
                return node
            data = [i for i in node.input if i and i not in self.weights]
            queue.extend(data[:1])  # follow the data path: the first input that is not a weight
        raise FusionError(f"no projection MatMul found above '{tensor}'")

    def projection_below(self, tensor: str, limit: int = 80) -> onnx.NodeProto:
        """The nearest weight MatMul downstream of `tensor`."""
        queue, seen = deque([tensor]), set()
        while queue and len(seen) < limit:
            for node in self.consumers.get(queue.popleft(), []):
                if node.name in seen:
                    continue
                seen.add(node.name)
                if self.is_weight_matmul(node):
                    return node
                queue.extend(node.output)
        raise FusionError(f"no projection MatMul found below '{tensor}'")


    def constant_value(self, tensor: str) -> float | None:
        """The scalar value of a constant tensor (initializer or Constant node), else None."""
        if tensor in self.initializers:
            return float(numpy_helper.to_array(self.initializers[tensor]).reshape(-1)[0])
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "Constant":
            return float(numpy_helper.to_array(_attr(node, "value")).reshape(-1)[0])
        return None

    def projection_output(self, node: onnx.NodeProto) -> str:
        """A projection's output, after its bias Add when it has one (attention_bias=True models)."""
        users = self.consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add" and any(i in self.weights for i in users[0].input):
            return users[0].output[0]
        return node.output[0]


def find_attention(graph: Graph, contract: DecoderContract) -> list[AttentionSite]:
    sites = []
    for layer in range(contract.num_layers):
        key_cache, value_cache = graph.producer.get(f"present.{layer}.key"), graph.producer.get(f"present.{layer}.value")
        if key_cache is None or value_cache is None or key_cache.op_type != "Concat" or value_cache.op_type != "Concat":
            raise FusionError(f"layer {layer}: present.{layer}.key/value are not Concat(past, new); already fused?")
        k_proj = graph.projection_above(key_cache.input[1])
        v_proj = graph.projection_above(value_cache.input[1])
        hidden = k_proj.input[0]
        if v_proj.input[0] != hidden:
            raise FusionError(f"layer {layer}: k_proj and v_proj read different inputs")
        others = [n for n in graph.consumers[hidden] if graph.is_weight_matmul(n) and n not in (k_proj, v_proj)]
        if len(others) != 1:
            raise FusionError(f"layer {layer}: expected one q_proj beside k_proj/v_proj, found {len(others)}")
        o_proj = graph.projection_below(f"present.{layer}.value")
        sites.append(AttentionSite(layer, graph.projection_output(others[0]), graph.projection_output(k_proj),
                                   graph.projection_output(v_proj), o_proj))
    return sites


def rotary_caches(config: Any) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [max_positions, D/2] computed by transformers' own rotary module (so rope scaling
    variants come out as the model defines them)."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config=config)
    positions = torch.arange(config.max_position_embeddings)[None]            # [1, max]
    probe = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(probe, positions)                                       # [1, max, D]
    half = cos.shape[-1] // 2
    # transformers repeats the half-size table twice (rotate_half layout); the op wants one half.
    return cos[0, :, :half].numpy().astype(np.float32), sin[0, :, :half].numpy().astype(np.float32)


def mask_preamble() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing, once for all layers, what GQA needs from the contract's attention_mask:
    seqlens_k [B] int32 (= T - 1 for every row), total_sequence_length (scalar int32 T), and the fp32
    additive bias [B, 1, S, T]: 0 where attended, fp32's lowest finite value on padding (finite, so a
    fully padded row stays finite instead of becoming NaN, as transformers' mask does)."""
    lowest = np.finfo(np.float32).min
    consts = [
        numpy_helper.from_array(np.array([0], np.int64), "fuse_i0"),
        numpy_helper.from_array(np.array([1], np.int64), "fuse_i1"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "fuse_axes12"),
        numpy_helper.from_array(np.array(1, np.int32), "fuse_one32"),
        numpy_helper.from_array(np.array(1.0, np.float32), "fuse_onef"),
        numpy_helper.from_array(np.array(lowest, np.float32), "fuse_lowest"),
    ]
    n = helper.make_node
    nodes = [
        n("Shape", ["attention_mask"], ["fuse_mask_shape"], name="fuse/mask_shape"),                # [2] = (B, T)
        n("Gather", ["fuse_mask_shape", "fuse_i0"], ["fuse_batch"], axis=0, name="fuse/batch"),     # [1] = B
        n("Gather", ["fuse_mask_shape", "fuse_i1"], ["fuse_total64"], axis=0, name="fuse/total"),   # [1] = T
        n("Cast", ["fuse_total64"], ["fuse_total32_1d"], to=TensorProto.INT32, name="fuse/total32"),
        n("Squeeze", ["fuse_total32_1d"], ["fuse_total_sequence_length"], name="fuse/total_scalar"),  # scalar T
        n("Sub", ["fuse_total32_1d", "fuse_one32"], ["fuse_last"], name="fuse/last"),                # [1] = T - 1
        n("Expand", ["fuse_last", "fuse_batch"], ["fuse_seqlens_k"], name="fuse/seqlens_k"),         # [B]
        n("Shape", ["input_ids"], ["fuse_ids_shape"], name="fuse/ids_shape"),                        # [2] = (B, S)
        n("Gather", ["fuse_ids_shape", "fuse_i1"], ["fuse_seq"], axis=0, name="fuse/seq"),           # [1] = S
        n("Concat", ["fuse_batch", "fuse_i1", "fuse_seq", "fuse_total64"], ["fuse_bias_shape"], axis=0,
          name="fuse/bias_shape"),                                                                   # (B,1,S,T)
        n("Cast", ["attention_mask"], ["fuse_maskf"], to=TensorProto.FLOAT, name="fuse/maskf"),      # [B, T]
        n("Sub", ["fuse_onef", "fuse_maskf"], ["fuse_padding"], name="fuse/padding"),                 # 1 on pads
        n("Mul", ["fuse_padding", "fuse_lowest"], ["fuse_bias2d"], name="fuse/bias2d"),
        n("Unsqueeze", ["fuse_bias2d", "fuse_axes12"], ["fuse_bias4d"], name="fuse/bias4d"),          # [B,1,1,T]
        n("Expand", ["fuse_bias4d", "fuse_bias_shape"], ["fuse_attention_bias"], name="fuse/bias"),  # [B,1,S,T]
    ]
    return nodes, consts


def prune_and_sort(model: onnx.ModelProto) -> int:
    """Drop the nodes (and weights) no graph output needs, then order the rest so each node follows the producers
    of its inputs; returns how many nodes went. onnxruntime's own passes: measured equal to the hand-written ones
    they replaced in time and peak memory on the full-size fused export (benchmarks/README.md)."""
    # onnxruntime.transformers takes a noticeable share of a second to import: only when a graph is fused.
    from onnxruntime.transformers.onnx_model import OnnxModel

    before = len(model.graph.node)
    OnnxModel(model).prune_graph(allow_remove_graph_inputs=False)  # removes unused initializers in place
    try:
        OnnxModel.graph_topological_sort(model.graph)
    except RuntimeError as exc:  # "Graph is not a DAG"
        raise FusionError(f"the fused graph cannot be ordered: {exc}") from exc
    return before - len(model.graph.node)


def fuse_attention(model: onnx.ModelProto, config: Any) -> dict[str, Any]:
    """Rewrite `model` (a transformers Llama-family config's export) in place, graph only; returns what
    was done."""
    contract = DecoderContract.from_config(config)
    num_heads = config.num_attention_heads
    graph = Graph(model)
    sites = find_attention(graph, contract)
    before = len(model.graph.node)
    cos, sin = rotary_caches(config)
    preamble, consts = mask_preamble()
    consts += [numpy_helper.from_array(cos, "fuse_cos_cache"), numpy_helper.from_array(sin, "fuse_sin_cache")]
    new_nodes: list[onnx.NodeProto] = list(preamble)
    for site in sites:
        i = site.layer
        rot = {}
        for part, tensor, heads in (("q", site.query, num_heads), ("k", site.key, contract.num_kv_heads)):
            rot[part] = f"fuse/{i}/{part}_rotary"
            new_nodes.append(helper.make_node(
                "RotaryEmbedding", [tensor, "position_ids", "fuse_cos_cache", "fuse_sin_cache"], [rot[part]],
                name=f"fuse/{i}/{part}_rotary", domain=MS_DOMAIN, interleaved=0, num_heads=heads,
                rotary_embedding_dim=contract.head_dim))
        attention_out = f"fuse/{i}/attention"
        new_nodes.append(helper.make_node(
            "GroupQueryAttention",
            [rot["q"], rot["k"], site.value, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
             "fuse_seqlens_k", "fuse_total_sequence_length", "", "", "", "fuse_attention_bias"],
            [attention_out, f"present.{i}.key", f"present.{i}.value"],
            name=f"fuse/{i}/GroupQueryAttention", domain=MS_DOMAIN,
            num_heads=num_heads, kv_num_heads=contract.num_kv_heads,
            scale=float(contract.head_dim ** -0.5), do_rotary=0))
        site.o_proj.input[0] = attention_out
    # The old cache Concats lose their outputs to the GQA nodes; the rest of the old attention dies with them.
    presents = {f"present.{s.layer}.{kind}" for s in sites for kind in ("key", "value")}
    for node in model.graph.node:
        if any(o in presents for o in node.output):
            node.output[:] = [f"{o}_unfused" for o in node.output]
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(consts)
    removed = prune_and_sort(model)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return {"fused_ops": list(FUSED_OPS), "layers": len(sites), "nodes_before": before,
            "nodes_after": len(model.graph.node), "nodes_removed": removed}


def fuse_residual_norms(model: onnx.ModelProto) -> int:
    """Residual Add + RMSNorm (transformers' Pow/ReduceMean/Add/Sqrt/Div/Mul spelling, with its fp32 Casts, as
    optimum's exporter writes it; the dynamo exporter writes rsqrt as Sqrt/Reciprocal instead of Sqrt/Div)
    -> one SkipSimplifiedLayerNormalization, whose fourth output is the residual sum the next layer adds to.
    ONNX Runtime fuses the norm alone at load time but leaves the Add; returns how many were fused."""
    graph = Graph(model)

    def only(tensor: str, op: str) -> onnx.NodeProto | None:
        users = [n for n in graph.consumers.get(tensor, []) if n.op_type == op]
        return users[0] if len(users) == 1 else None

    def through_cast(tensor: str) -> str:
        users = graph.consumers.get(tensor, [])
        casts = [n for n in users if n.op_type == "Cast" and _attr(n, "to") == TensorProto.FLOAT]
        return casts[0].output[0] if len(casts) == 1 else tensor

    fused, drop, new = 0, set(), []
    renames: dict[str, str] = {}
    for add in list(model.graph.node):
        if add.op_type != "Add" or any(i in graph.weights for i in add.input):
            continue
        x = through_cast(add.output[0])                                      # the norm's input, [B, S, H]
        pow_ = only(x, "Pow")
        mean = pow_ and only(pow_.output[0], "ReduceMean")
        eps_add = mean and only(mean.output[0], "Add")
        sqrt = eps_add and only(eps_add.output[0], "Sqrt")
        div = sqrt and (only(sqrt.output[0], "Div") or only(sqrt.output[0], "Reciprocal"))  # 1 / sqrt, either way
        scale = div and only(div.output[0], "Mul")
        if not (scale and x in scale.input and graph.constant_value(pow_.input[1]) == 2.0):
            continue
        normed = through_cast(scale.output[0])
        weight_mul = only(normed, "Mul")
        weight = weight_mul and next((i for i in weight_mul.input if i in graph.weights), None)
        eps = graph.constant_value(next(i for i in eps_add.input if i != mean.output[0]))
        if weight is None or eps is None:
            continue
        total = f"{add.name}_skip_sum"
        new.append(helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], weight],
            [weight_mul.output[0], "", "", total], name=f"{add.name}_skip_norm", domain=MS_DOMAIN,
            epsilon=float(eps)))
        renames[add.output[0]] = renames[x] = total  # the residual stream continues from the sum
        drop.update(n.name for n in (add, pow_, mean, eps_add, sqrt, div, scale, weight_mul))
        fused += 1
    if fused:
        nodes = [n for n in model.graph.node if n.name not in drop] + new
        for node in nodes:
            node.input[:] = [renames.get(i, i) for i in node.input]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        prune_and_sort(model)
    return fused


def _attr(node: onnx.NodeProto, name: str) -> Any:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def fuse_and_pack(model: onnx.ModelProto, config: Any) -> dict[str, Any]:
    """The CPU graph: attention fused, residual norms fused, projections packed (weights must be loaded)."""
    record = fuse_attention(model, config)
    record["fused_residual_norms"] = fuse_residual_norms(model)
    record["packed_matmul_groups"] = pack_projections(model)
    record["nodes_after"] = len(model.graph.node)
    return record


def pack_projections(model: onnx.ModelProto, only: AbstractSet[str] | None = None) -> int:
    """Merge the weight MatMuls that read the same input (q/k/v; gate/up) into one MatMul over their
    concatenated weights and a Split that restores the original output names. Fewer, wider products: one
    kernel dispatch instead of three per step, and better-shaped GEMMs in prefill (k/v alone are only
    kv_heads * head_dim wide). Block-wise quantization along K treats each output column on its own, so a
    packed weight quantizes to the same numbers. Needs the weights loaded; returns how many groups."""
    weights = {t.name: t for t in model.graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if (node.op_type == "MatMul" and node.input[1] in weights and len(weights[node.input[1]].dims) == 2
                and (only is None or node.name in only)):
            groups.setdefault(node.input[0], []).append(node)
    uses = Counter(i for node in model.graph.node for i in node.input)
    replaced: dict[str, list[onnx.NodeProto]] = {}
    for source, nodes in groups.items():
        tensors = [weights[n.input[1]] for n in nodes]
        if (len(nodes) < 2 or len({(t.dims[0], t.data_type) for t in tensors}) != 1
                or any(uses[t.name] > 1 for t in tensors)):
            continue
        name = f"{nodes[0].name}_packed"
        packed = np.concatenate([numpy_helper.to_array(t) for t in tensors], axis=1)  # [K, sum N_i]
        sizes = numpy_helper.from_array(np.array([t.dims[1] for t in tensors], np.int64), f"{name}.split")
        model.graph.initializer.extend([numpy_helper.from_array(packed, f"{name}.weight"), sizes])
        del packed
        for tensor in tensors:  # free each unpacked weight now: a 1.1B fp32 model has no room for two copies
            del weights[tensor.name]
            model.graph.initializer.remove(tensor)
        del tensors  # the last Python references, which would keep the removed messages alive
        replaced[nodes[0].name] = [
            helper.make_node("MatMul", [source, f"{name}.weight"], [f"{name}_output"], name=name),
            helper.make_node("Split", [f"{name}_output", sizes.name], [n.output[0] for n in nodes], axis=-1,
                             name=f"{name}_split"),
        ]
        replaced.update({n.name: [] for n in nodes[1:]})
    if replaced:
        nodes = [new for node in model.graph.node for new in replaced.get(node.name, [node])]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        prune_and_sort(model)  # also drops the unpacked weights
    return sum(1 for v in replaced.values() if v)
