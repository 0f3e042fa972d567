"""Precision variants, all ONNX -> ONNX and verifiable on a CPU.

TensorRT 11 is strongly typed, so precision lives in the graph itself:
- fp16: exported from the model in fp16, so transformers' own fp32 islands survive (RMSNorm's reduction,
  rotary angles); we add fp32 softmax and fp32 logits. Standard ops only (TensorRT, ONNX Runtime CUDA).
- int8-qdq: explicit, symmetric QuantizeLinear/DequantizeLinear on the inputs of the weight MatMuls only,
  per-channel weight scales, activation scales calibrated on Aira-format prompts. Standard ops (TensorRT).
- int8 / int4: ONNX Runtime's CPU forms (MatMulNBits, a contrib op), weight-only, block-wise, with
  attention fused to GroupQueryAttention (see fusing.py) unless --no-fuse.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from aira_opt.artifacts import atomic_folder, write_manifest
from aira_opt.contract import DecoderContract
from aira_opt.corpus import calibration_questions, training_pairs
from aira_opt.errors import AiraOptError
from aira_opt.portable import make_portable
from aira_opt.progress import Steps
from aira_opt.prompts import conversation_ids, prompt_ids
from aira_opt.specs import LoadedModel

# Weights above this go to model.onnx_data. Past protobuf's 2 GB limit it is required; well below it, it pays:
# ONNX Runtime memory-maps external data, which cut peak RSS of the 1.1B int4 model from 1.71x to 1.13x its
# size on disk and its load time from 4.2 s to 1.3 s (README, "Fastest on a CPU").
EXTERNAL_DATA_THRESHOLD = 64 * 1024 * 1024


@dataclass(frozen=True)
class WeightOnlySettings:
    """MatMulNBits settings for the CPU variants."""

    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int  # 4: int8 compute on the activations (fastest on x86), 0: fp32 compute

    def describe(self) -> dict[str, Any]:
        return {"method": "MatMulNBits weight-only (onnxruntime contrib op)", **asdict(self)}


# int8 for CPUs: MatMulNBits 8-bit beat dynamic int8 MatMulInteger on decode here (see README: precision table).
INT8_CPU = WeightOnlySettings(bits=8, block_size=32, symmetric=True, accuracy_level=4)
# int4 for CPUs: block 32 with int8 compute, as onnxruntime-genai's int4 default; decode is memory-bound.
INT4_CPU = WeightOnlySettings(bits=4, block_size=32, symmetric=True, accuracy_level=4)
WEIGHT_ONLY_RECIPES = {"int8": INT8_CPU, "int4": INT4_CPU}

# Graphs that may carry fused attention (fusing.py; ONNX Runtime contrib ops).
# fp16 and int8-qdq feed TensorRT: standard ops.
FUSABLE = ("fp32", "int8", "int4")


def default_fused(precision: str) -> bool:
    """int8/int4 already need ONNX Runtime's contrib ops, so fusing costs them no portability; fp32 is the
    portable standard-op export, fused only on request."""
    return precision in ("int8", "int4")


def variant_name(precision: str, block_size: int | None = None, fused: bool | None = None) -> str:
    """The folder/row name of a variant: its precision plus whatever differs from that precision's default
    (int4 block 128 -> 'int4-b128', fused fp32 -> 'fp32-fused', unfused int4 -> 'int4-unfused')."""
    name = precision
    recipe = WEIGHT_ONLY_RECIPES.get(precision)
    if block_size is not None and (recipe is None or block_size != recipe.block_size):
        name += f"-b{block_size}"
    if fused is not None and fused != default_fused(precision):
        name += "-fused" if fused else "-unfused"
    return name


VARIANT_TARGETS = {
    "fp16": "TensorRT 11 (strongly typed) and ONNX Runtime CUDA; standard ops",
    "int8-qdq": "TensorRT 11 explicit quantization; standard ops",
    "int8": "ONNX Runtime CPU (MatMulNBits contrib op)",
    "int4": "ONNX Runtime CPU (MatMulNBits contrib op)",
}


# Graph inspection ----------------------------------------------------------------------------------------
def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """elem_type of every named tensor (inputs, outputs, initializers, inferred intermediates)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=False)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def fp32_islands(model: onnx.ModelProto) -> dict[str, int]:
    """Compute op types whose outputs stay fp32 in a reduced-precision graph (Cast/Constant/shape ops left out)."""
    types = tensor_types(model)
    skip = {"Cast", "Constant", "Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Expand", "Transpose",
            "ConstantOfShape", "Slice", "Squeeze"}
    counts = Counter(n.op_type for n in model.graph.node
                     if n.op_type not in skip and any(types.get(o) == TensorProto.FLOAT for o in n.output))
    return dict(sorted(counts.items()))


def qdq_problems(model: onnx.ModelProto) -> list[str]:
    """Every Q/DQ that TensorRT's explicit quantization would not take as we intend: non-int8, non-zero zero
    point, or a DequantizeLinear feeding anything but MatMul/Gemm."""
    problems: list[str] = []
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        return ["no QuantizeLinear/DequantizeLinear nodes"]
    for node in qdq:
        if len(node.input) < 3 or node.input[2] not in inits:
            problems.append(f"{node.name}: no constant zero point")
            continue
        zp = onnx.numpy_helper.to_array(inits[node.input[2]])
        if zp.dtype != np.int8:
            problems.append(f"{node.name}: zero point is {zp.dtype}, TensorRT needs int8")
        if np.any(zp != 0):
            problems.append(f"{node.name}: zero point is not 0 (asymmetric)")
        if node.op_type == "DequantizeLinear":
            bad = [c.op_type for c in consumers.get(node.output[0], []) if c.op_type not in ("MatMul", "Gemm")]
            if bad:
                problems.append(f"{node.name}: feeds {sorted(set(bad))}, only MatMul/Gemm inputs are quantized")
    return problems


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of MatMul nodes whose second input is a weight (an initializer): the ones worth quantizing."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save, with external data (`model.onnx_data`) when the weights are large (see EXTERNAL_DATA_THRESHOLD)."""
    size = sum(len(i.raw_data) for i in model.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


# fp16 ----------------------------------------------------------------------------------------------------
def softmax_in_fp32(model: onnx.ModelProto) -> int:
    """Wrap every fp16 Softmax in Cast(fp32) -> Softmax -> Cast(fp16); returns how many were wrapped."""
    types = tensor_types(model)
    nodes = list(model.graph.node)
    out: list[onnx.NodeProto] = []
    wrapped = 0
    for node in nodes:
        if node.op_type == "Softmax" and types.get(node.input[0]) == TensorProto.FLOAT16:
            up, down = f"{node.name}_in_fp32", f"{node.name}_out_fp32"
            out.append(helper.make_node("Cast", [node.input[0]], [up], to=TensorProto.FLOAT, name=f"{node.name}_up"))
            final = node.output[0]
            node.input[0], node.output[0] = up, down
            out.append(node)
            out.append(helper.make_node("Cast", [down], [final], to=TensorProto.FLOAT16, name=f"{node.name}_down"))
            wrapped += 1
        else:
            out.append(node)
    del model.graph.node[:]
    model.graph.node.extend(out)
    return wrapped


def logits_in_fp32(model: onnx.ModelProto) -> None:
    """Make the `logits` output fp32 with a final Cast, so every consumer reads fp32 logits."""
    inner = "logits_fp16"
    for node in model.graph.node:
        node.output[:] = [inner if o == "logits" else o for o in node.output]
    model.graph.node.append(helper.make_node("Cast", [inner], ["logits"], to=TensorProto.FLOAT, name="logits_to_fp32"))
    for out in model.graph.output:
        if out.name == "logits":
            out.type.tensor_type.elem_type = TensorProto.FLOAT


def export_fp16(loaded: LoadedModel, folder: Path) -> dict[str, Any]:
    from aira_opt.exporting import run_optimum_export

    half = copy.deepcopy(loaded.model).half()
    # Eager attention exports as plain fp16 MatMuls; torch's SDPA export upcasts attention to fp32 and
    # with it o_proj and the residual adds, which would leave large fp32 islands in a TensorRT graph.
    half.config._attn_implementation = "eager"
    run_optimum_export(LoadedModel(loaded.name, loaded.source, loaded.kind, half, loaded.tokenizer), folder)
    del half
    path = folder / "model.onnx"
    # The edits touch nodes only: leave the weights where they are (model.onnx_data for models over 2 GB,
    # whose graph with weights inline could not even be serialized for shape inference).
    model = onnx.load(str(path), load_external_data=False)
    wrapped = softmax_in_fp32(model)
    logits_in_fp32(model)
    onnx.save_model(model, str(path))
    return {
        "method": "exported from the fp16 PyTorch model; softmax and logits lifted to fp32",
        "softmax_wrapped_in_fp32": wrapped,
        "attention": "eager (SDPA's export would run attention, o_proj and the residual stream in fp32)",
        "kv_cache_dtype": "float16",
    }


# int8-qdq (TensorRT) -----------------------------------------------------------------------------------
def calibration_sequences(tokenizer: Any) -> list[list[int]]:
    """Aira-format token sequences for activation calibration: whole training turns and bare prompts."""
    answers = dict(training_pairs())
    return [conversation_ids(tokenizer, q, answers[q]) if q in answers else prompt_ids(tokenizer, q)
            for q in calibration_questions()]


def calibration_hash(sequences: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(sequences).encode()).hexdigest()


class AiraCalibrationReader:
    """Feeds calibration prompts as prefill steps (past length 0), one at a time."""

    def __init__(self, sequences: list[list[int]], contract: DecoderContract):
        self.sequences, self.contract, self.index = sequences, contract, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.sequences):
            return None
        ids = np.array([self.sequences[self.index]], dtype=np.int64)  # [1, T]
        self.index += 1
        c = self.contract
        past = {n: np.zeros((1, c.num_kv_heads, 0, c.head_dim), np.float32) for n in c.past_names()}
        return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None], **past}

    def rewind(self) -> None:
        self.index = 0


def quantize_qdq(fp32_path: Path, out_path: Path, tokenizer: Any, contract: DecoderContract) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(fp32_path), load_external_data=False)
    nodes = weight_matmuls(model)
    sequences = calibration_sequences(tokenizer)
    quantize_static(
        str(fp32_path), str(out_path), AiraCalibrationReader(sequences, contract), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=fp32_path.with_name(fp32_path.name + "_data").exists(),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "DedicatedQDQPair": True,
                       "OpTypesToExcludeOutputQuantization": ["MatMul"]},
    )
    stray = out_path.with_name(out_path.name + ".data")
    if stray.exists():  # onnxruntime names it model.onnx.data; our folders use model.onnx_data
        save_model(onnx.load(str(out_path)), out_path)
        stray.unlink()
    return {
        "method": "static QDQ (onnxruntime.quantization.quantize_static)", "format": "QuantizeLinear/DequantizeLinear",
        "weights": "int8, symmetric, per output channel", "activations": "int8, symmetric, per tensor, MinMax",
        "quantized_nodes": len(nodes), "op_types": ["MatMul"],
        "calibration": {"source": "aira_opt.corpus.calibration_questions()", "sequences": len(sequences),
                        "tokens": sum(map(len, sequences)), "sha256": calibration_hash(sequences)},
    }


# int8 / int4 (CPU) -------------------------------------------------------------------------------------
def quantize_weight_only(fp32_path: Path, out_path: Path, settings: WeightOnlySettings,
                         fuse_config: Any | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """MatMulNBits over every weight MatMul; with a config, attention is fused and projections packed first
    (the quantizer leaves the fused nodes alone and quantizes the packed weights like any other).
    Returns the quantization record and the fusion record (None when not fused)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    from aira_opt.fusing import fuse_and_pack

    model = onnx.load(str(fp32_path))
    fusion = fuse_and_pack(model, fuse_config) if fuse_config is not None else None
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=settings.block_size, is_symmetric=settings.symmetric,
                                                accuracy_level=settings.accuracy_level, bits=settings.bits)
    quantizer = nbits.MatMulNBitsQuantizer(model, bits=settings.bits, block_size=settings.block_size,
                                           is_symmetric=settings.symmetric, accuracy_level=settings.accuracy_level,
                                           algo_config=config)
    quantizer.process()
    save_model(quantizer.model.model, out_path)
    return {**settings.describe(), "quantized_nodes": len(weight_matmuls(model))}, fusion


def reusable_fp32(loaded: LoadedModel) -> Path | None:
    """The model.onnx of an existing fp32 export of the same model, when its manifest matches the model and
    its files still hash to the manifest; None means export afresh."""
    from aira_opt.artifacts import graph_is_fused, read_manifest, verify_manifest
    from aira_opt.exporting import default_output

    folder = default_output(loaded.name, "fp32")
    if not (folder / "manifest.json").is_file():
        return None
    manifest = read_manifest(folder)
    if manifest.get("source_model", {}) != json.loads(json.dumps(loaded.describe())) or verify_manifest(folder):
        return None
    if graph_is_fused(manifest):
        return None  # a fused fp32 graph cannot be fused again or fed to the TensorRT-facing variants
    return folder / "model.onnx"


def graph_record(fusion: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's `graph` entry: standard ops, or what the CPU fusion did."""
    if fusion is None:
        return {"fused": False}
    return {"fused": True, "runtime": "ONNX Runtime CPU provider (com.microsoft contrib ops)", **fusion}


# The variant pipeline ----------------------------------------------------------------------------------
def weight_only_settings(precision: str, block_size: int | None) -> WeightOnlySettings:
    """The CPU recipe for int8/int4, with an optional block size (a power of two, 16..256)."""
    base = WEIGHT_ONLY_RECIPES[precision]
    if block_size is None:
        return base
    if block_size < 16 or block_size > 256 or block_size & (block_size - 1):
        raise AiraOptError(f"--block-size must be a power of two from 16 to 256, got {block_size}")
    return WeightOnlySettings(base.bits, block_size, base.symmetric, base.accuracy_level)


def check_fusable(precision: str, fused: bool | None) -> bool:
    """Whether the variant is fused (None means the precision's default); a fused TensorRT variant is an error."""
    if fused and precision not in FUSABLE:
        raise AiraOptError(f"--fuse makes ONNX Runtime-only contrib ops; {precision} feeds TensorRT "
                           "and stays standard-op")
    return default_fused(precision) if fused is None else fused


def export_variant(loaded: LoadedModel, precision: str, output: Path, force: bool = False,
                   quiet: bool = False, block_size: int | None = None, fused: bool | None = None) -> dict[str, Any]:
    """Export `loaded` at `precision` into `output` (atomically), validate it, write its manifest."""
    from aira_opt.exporting import (OPSET, VARIANT_TOLERANCE, run_optimum_export, validate_against_torch,
                                    write_support_files)

    if precision not in VARIANT_TARGETS:
        raise AiraOptError(f"unknown precision '{precision}'")
    if block_size is not None and precision not in ("int8", "int4"):
        raise AiraOptError("--block-size applies to the weight-only CPU variants (int8, int4) only")
    fused = check_fusable(precision, fused)
    fusion = None
    steps = Steps(4, quiet=quiet)
    with atomic_folder(output, force) as tmp:
        with steps.step(f"exporting {loaded.name} as {precision}"):
            if precision == "fp16":
                quantization = export_fp16(loaded, tmp)
            else:
                with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".fp32-") as scratch:
                    src = reusable_fp32(loaded)
                    if src is None:
                        run_optimum_export(loaded, Path(scratch))
                        src = Path(scratch) / "model.onnx"
                    contract = DecoderContract.from_config(loaded.config)
                    if precision == "int8-qdq":
                        quantization = quantize_qdq(src, tmp / "model.onnx", loaded.tokenizer, contract)
                    else:
                        quantization, fusion = quantize_weight_only(
                            src, tmp / "model.onnx", weight_only_settings(precision, block_size),
                            loaded.config if fused else None)
        with steps.step("writing tokenizer, config, generation defaults, metadata and genai_config.json"):
            write_support_files(loaded, tmp)
            make_portable(loaded, tmp, precision)
        model = onnx.load(str(tmp / "model.onnx"), load_external_data=False)
        problems = qdq_problems(model) if precision == "int8-qdq" else []
        if problems:
            raise AiraOptError(f"int8-qdq placement: {'; '.join(problems[:5])}")
        # Random weights give near-flat logits on which a cosine bar says little: report, do not enforce.
        enforce = loaded.kind != "random"
        with steps.step("validating against PyTorch fp32 (finite logits, cosine)"):
            report = validate_against_torch(loaded, tmp, VARIANT_TOLERANCE[precision], enforce=enforce)
        if not quiet:
            import click
            click.echo(f"      vs PyTorch fp32: min cosine {report['min_cosine']:.5f}, "
                       f"max |logit diff| {report['max_abs_logit_diff']:.3e}; run `aira-opt check` for the full bar",
                       err=True)
            if report["misses"]:
                click.echo(f"      warning: {len(report['misses'])} case(s) below the sanity bar "
                           f"{VARIANT_TOLERANCE[precision]}; not enforced for random weights", err=True)
        with steps.step("hashing files into manifest.json"):
            manifest = write_manifest(tmp, {
                "precision": precision,
                "target": VARIANT_TARGETS[precision],
                "source_model": loaded.describe(),
                "opset": OPSET,
                "exporter": "optimum.exporters.onnx (text-generation-with-past) + aira_opt.precision",
                "contract": DecoderContract.from_config(loaded.config).describe(),
                "kept_fp32": fp32_islands(model) if precision == "fp16" else "all non-MatMul compute",
                "quantization": quantization,
                "graph": graph_record(fusion),
                "validation": report,
            })
    return manifest
