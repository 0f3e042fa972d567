"""Kernel choice by measurement: the int8 and int4 variants each have candidate kernels, and the fastest on the
machine doing the export is picked by timing them there, as TensorRT times tactics.

A probe graph holds the model's own weight-MatMul shapes (one layer, copied until it outgrows the last-level
cache, so weights stream from memory as in a real decode step) with random weights; each candidate is timed on
a reference request (a prompt prefill plus one decode step per new token). The timings are cached per machine,
ONNX Runtime version, threads and shapes in the user's cache (never in an export folder), so a second export skips
the probe; the choice and every timing go into the export's manifest. Candidates that change the numerics
(dynamic int8 quantizes activations per tensor) must still pass the variant's post-export sanity bar: the
pipeline falls back to the next one when they do not, and leaves them out for random weights, where the bar is
not enforced.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aira_opt.core.cpu import last_level_cache_bytes, machine_key
from aira_opt.core.threads import session_threads
from aira_opt.core.progress import bar
from aira_opt.precision.dynamic_int8 import quantize_dynamic_int8
from aira_opt.precision.recipe import WeightOnlySettings
from aira_opt.precision.weight_only import nbits_quantize
from aira_opt.source.models import cache_dir

REFERENCE_PROMPT, REFERENCE_NEW_TOKENS = 64, 64  # the request a choice is scored on (bench's default setting)
PROBE_MIN_BYTES = 128 << 20  # the probe's weights are at least this and 3x the last-level cache
CACHE_FILE = "kernel-timings.json"


@dataclass(frozen=True)
class KernelCandidate:
    """One way to run a variant's weight MatMuls."""

    name: str  # the manifest's and `--kernels`' name
    description: str
    weight_only: WeightOnlySettings | None  # MatMulNBits settings; None: dynamic int8 (MatMulInteger)
    same_numerics: bool  # computes what the variant's default computes, or closer to fp32 (no sanity re-check)

    def key(self) -> str:
        """What the timing depends on, for the cache."""
        return self.name + (f" {self.weight_only}" if self.weight_only else "")


def candidates(names: tuple[str, ...], settings: WeightOnlySettings, recipe_chosen: bool) -> list[KernelCandidate]:
    """The candidates a variant names (Variant.kernel_candidates), its default first. Block size, the head's bits
    and the rounding algorithm are never candidates: they change the quantization grid, so they stay the user's
    explicit accuracy-for-speed choices (--block-size, --lm-head, --algorithm); with one given, dynamic int8
    (which has none of them) is out."""
    level = settings.accuracy_level
    made = {
        "matmulnbits": KernelCandidate("matmulnbits", f"MatMulNBits {settings.bits}-bit, block {settings.block_size}, "
                                       f"accuracy level {level}", settings, True),
        "matmulnbits-fp32": KernelCandidate("matmulnbits-fp32", f"MatMulNBits {settings.bits}-bit, block "
                                            f"{settings.block_size}, accuracy level 1 (fp32 compute)",
                                            replace(settings, accuracy_level=1), True),
        "dynamic": KernelCandidate("dynamic", "dynamic int8: MatMulInteger, int8 weights per channel, uint8 "
                                   "activations per tensor", None, False),
    }
    options = [made[name] for name in names]
    if level == 1:
        options = [c for c in options if c.name != "matmulnbits-fp32"]  # the default already computes in fp32
    if recipe_chosen:
        options = [c for c in options if c.weight_only is not None]
    return options


# The probe --------------------------------------------------------------------------------------------------
def layer_shapes(config: Any) -> list[tuple[int, int]]:
    """(K, N) of one decoder layer's weight MatMuls as the fused export packs them: qkv, o, gate+up, down."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    q = config.num_attention_heads * head_dim
    return [(hidden, q + 2 * kv_heads * head_dim), (q, hidden), (hidden, 2 * inter), (inter, hidden)]


def fp32_layer(shapes: list[tuple[int, int]]) -> onnx.ModelProto:
    """x_K: [M, K] -> y_i: [M, N] for every (K, N), random weights; one graph input per distinct K."""
    rng = np.random.default_rng(0)
    inputs = {k: helper.make_tensor_value_info(f"x_{k}", TensorProto.FLOAT, ["M", k]) for k, _ in shapes}
    nodes, inits, outputs = [], [], []
    for i, (k, n) in enumerate(shapes):
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x_{k}", f"w{i}"], [f"y{i}"], name=f"matmul{i}"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["M", n]))
    graph = helper.make_graph(nodes, "kernel_probe", list(inputs.values()), outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def quantized_layer(shapes: list[tuple[int, int]], candidate: KernelCandidate) -> onnx.ModelProto:
    model = fp32_layer(shapes)
    if candidate.weight_only is None:
        with tempfile.TemporaryDirectory(prefix="aira-opt-probe-") as scratch:
            out = Path(scratch) / "probe.onnx"
            quantize_dynamic_int8(model, out)
            return onnx.load(str(out))
    s = replace(candidate.weight_only, algorithm="rtn")  # the probe times kernels on random weights: no calibration
    return nbits_quantize(model, s.bits, s, exclude=[])


def replicated(layer: onnx.ModelProto, copies: int) -> onnx.ModelProto:
    """`copies` independent copies of the layer's nodes and weights on the same inputs: the weights of one step
    no longer fit in a cache."""
    graph = layer.graph
    shared = {i.name for i in graph.input}
    nodes, inits, outputs = [], [], []
    for c in range(copies):
        def rename(name: str, c: int = c) -> str:
            return name if not name or name in shared else f"{name}.{c}"
        for node in graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = rename(node.name)
            copy.input[:] = [rename(n) for n in node.input]
            copy.output[:] = [rename(n) for n in node.output]
            nodes.append(copy)
        for init in graph.initializer:
            copy = onnx.TensorProto()
            copy.CopyFrom(init)
            copy.name = rename(init.name)
            inits.append(copy)
        for out in graph.output:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(out)
            copy.name = rename(out.name)
            outputs.append(copy)
    new = helper.make_graph(nodes, graph.name, list(graph.input), outputs, inits)
    return helper.make_model(new, opset_imports=list(layer.opset_import))


def time_candidate(shapes: list[tuple[int, int]], candidate: KernelCandidate, threads: int | None
                   ) -> dict[str, float]:
    """Milliseconds per decoder layer: a prefill of REFERENCE_PROMPT rows and one decode row (medians)."""
    import onnxruntime as ort

    layer = quantized_layer(shapes, candidate)
    layer_bytes = sum(len(i.raw_data) or 4 * int(np.prod(i.dims)) for i in layer.graph.initializer)
    copies = max(2, -(-max(PROBE_MIN_BYTES, 3 * last_level_cache_bytes()) // layer_bytes))
    options = session_threads(ort.SessionOptions(), threads)
    session = ort.InferenceSession(replicated(layer, copies).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    timings = {}
    for label, rows, repeats in (("decode_ms", 1, 15), ("prefill_ms", REFERENCE_PROMPT, 3)):
        feed = {i.name: rng.standard_normal((rows, i.shape[1]), dtype=np.float32) for i in session.get_inputs()}
        session.run(None, feed)  # warm-up: the first run allocates
        runs: list[float] = []
        while len(runs) < repeats and (len(runs) < 2 or sum(runs) < 2.0):  # a slow candidate stops early
            start = time.perf_counter()
            session.run(None, feed)
            runs.append(time.perf_counter() - start)
        timings[label] = round(1000 * float(np.median(runs)) / copies, 4)
    timings["request_ms"] = round(timings["prefill_ms"] + (REFERENCE_NEW_TOKENS - 1) * timings["decode_ms"], 3)
    return timings


# The cache and the choice --------------------------------------------------------------------------------------
def timings_cache() -> Path:
    return cache_dir() / CACHE_FILE


def _read_cache() -> dict[str, Any]:
    try:
        return json.loads(timings_cache().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(entries: dict[str, Any]) -> None:
    """Merged into whatever is there now, written to a temporary name and renamed (a reader never sees half)."""
    path = timings_cache()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read_cache(), **entries}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernel-timings-")
    except OSError:
        return  # a read-only cache only costs a re-probe next time
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(merged, handle, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a full disk only costs a re-probe next time
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone after the rename; left behind only by a failed write


def probe_key(shapes: list[tuple[int, int]], candidate: KernelCandidate, threads: int | None) -> str:
    import onnxruntime as ort

    return f"{machine_key(threads)} | onnxruntime {ort.__version__} | {shapes} | {candidate.key()}"


@dataclass
class KernelChoice:
    """The candidates in the order to try them (fastest first) and what was measured."""

    ordered: list[KernelCandidate]
    record: dict[str, Any]  # the manifest's `kernels` entry, without the final choice

    def manifest(self, chosen: KernelCandidate, rejected: dict[str, str]) -> dict[str, Any]:
        return {"choice": chosen.name, "description": chosen.description, **self.record,
                **({"rejected": rejected} if rejected else {})}


def choose_kernels(options: list[KernelCandidate], config: Any, threads: int | None = None,
                   mode: str = "auto", quiet: bool = False) -> KernelChoice:  # quiet: no progress bar
    """mode 'auto': time every candidate (or read the cache) and order them fastest first; 'default': the
    variant's default only, untimed; a candidate's name: that one only."""
    if mode != "auto":
        wanted = options[0] if mode == "default" else next(c for c in options if c.name == mode)
        return KernelChoice([wanted], {"tuned": False, "requested": mode})
    shapes = layer_shapes(config)
    cached = _read_cache()
    measured: dict[str, dict[str, float]] = {}
    fresh: dict[str, Any] = {}
    todo = [c for c in options if probe_key(shapes, c, threads) not in cached]
    for candidate in (bar(todo, "timing kernel candidates") if todo and not quiet else todo):
        fresh[probe_key(shapes, candidate, threads)] = time_candidate(shapes, candidate, threads)
    if fresh:
        _write_cache(fresh)
    for candidate in options:
        key = probe_key(shapes, candidate, threads)
        measured[candidate.name] = fresh.get(key) or cached[key]
    ordered = sorted(options, key=lambda c: measured[c.name]["request_ms"])
    return KernelChoice(ordered, {
        "tuned": True, "machine": machine_key(threads), "layer_shapes": [list(s) for s in shapes],
        "scored_on": f"one layer: prefill of {REFERENCE_PROMPT} tokens + {REFERENCE_NEW_TOKENS - 1} decode steps",
        "measured_ms_per_layer": measured, "from_cache": not todo, "cache": str(timings_cache())})


def kernel_summary(kernels: dict[str, Any] | None) -> str:
    """One line for a bench row from a manifest's `kernels` entry: the kernels an export runs and whether they
    were timed here or requested."""
    if not isinstance(kernels, dict):
        return ""
    how = "autotuned" if kernels.get("tuned") else f"--kernels {kernels.get('requested', 'default')}"
    return f"{kernels.get('choice')} ({how})"
