"""What a TensorRT build will do, decided without TensorRT: optimization profiles, targets, and the pre-flight
checks on the ONNX graph. Everything here runs on any machine; `engines.py` only executes the plan."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from aira_opt.core.contract import BATCH, PAST, SEQ, TOTAL, DecoderContract
from aira_opt.core.errors import AiraOptError
from aira_opt.folders import ExportFolder
from aira_opt.precision.graph import fp32_islands, qdq_problems
from aira_opt.precision.variants import tensorrt_names, variant

TARGETS = ("a100", "native")
DEFAULT_MAX_SEQ = 512  # the longest prefill an engine takes unless told: a long prompt, a modest workspace
A100_COMPUTE_CAPABILITY = (8, 0)
# TensorRT 10.0's ONNX parser documents opsets 9..20; 11.x keeps that range. Our exports use opset 18.
TRT_OPSETS = range(9, 21)
# Standard ONNX ops TensorRT's ONNX parser (10.x/11.x) imports, as far as Llama-family decoders use them.
TRT_SUPPORTED_OPS = frozenset("""
Abs Add And ArgMax Cast Ceil Clip Concat Constant ConstantOfShape Cos CumSum DequantizeLinear Div Equal Erf Exp
Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm Greater GreaterOrEqual Identity If IsInf IsNaN
LayerNormalization Less LessOrEqual Log MatMul Max Min Mod Mul Neg Not Or Pad Pow QuantizeLinear Range
Reciprocal ReduceMax ReduceMean ReduceMin ReduceSum Relu Reshape ScatterElements ScatterND Shape Sigmoid Sin
Slice Softmax Split Sqrt Squeeze Sub Tanh Tile TopK Transpose Trilu Unsqueeze Where Xor
""".split())


@dataclass(frozen=True)
class BuildOptions:
    max_batch: int = 1
    max_seq: int | None = None  # new tokens per call, the longest prefill (None: up to 512, within the context)
    max_context: int | None = None  # past + new; past runs 0..max_context-1 (None: the model's positions)
    target: str = "a100"
    workspace_gib: float = 8.0
    opt_level: int = 3  # TensorRT's default builder optimization level
    timing_cache: str | None = None

    def for_model(self, model_context: int) -> BuildOptions:
        """The options with every default filled in from the model, so a default always fits it."""
        context = self.max_context if self.max_context is not None else model_context
        seq = self.max_seq if self.max_seq is not None else min(DEFAULT_MAX_SEQ, context)
        return replace(self, max_context=context, max_seq=seq)

    def problems(self, model_context: int) -> list[str]:
        out = []
        if self.max_batch < 1 or self.max_seq < 1:
            out.append("--max-batch and --max-seq must be at least 1")
        if self.max_seq > self.max_context:
            out.append(f"--max-seq {self.max_seq} exceeds --max-context {self.max_context}")
        if self.max_context > model_context:
            out.append(f"--max-context {self.max_context} exceeds the model's {model_context} positions")
        if self.target not in TARGETS:
            out.append(f"--target must be one of {', '.join(TARGETS)}")
        if not 0 <= self.opt_level <= 5:
            out.append("--opt-level must be 0..5")
        if self.workspace_gib <= 0:
            out.append("--workspace must be positive")
        return out


@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass
class Profile:
    """One TensorRT optimization profile: a shape range per input."""

    name: str
    shapes: dict[str, ShapeRange]


@dataclass
class BuildPlan:
    onnx_path: str
    precision: str
    options: BuildOptions
    profiles: list[Profile]
    inputs: dict[str, list[Any]]
    outputs: dict[str, list[Any]]
    preflight: list[str] = field(default_factory=list)  # problems found; empty means ready to build

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for profile in data["profiles"]:
            profile["shapes"] = {k: {"min": list(v["min"]), "opt": list(v["opt"]), "max": list(v["max"])}
                                 for k, v in profile["shapes"].items()}
        return data


def dimension_ranges(options: BuildOptions, phase: str) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) for every named dynamic axis of the contract, for one phase.

    prefill: past 0, new tokens 1..S.  decode: one new token, past 1..C-1.  The attention mask always spans
    past + new, so its range is derived from the other two, never chosen independently.
    """
    b, s, c = options.max_batch, options.max_seq, options.max_context
    batch = (1, 1, b)
    if phase == "prefill":
        seq, past = (1, min(64, s), s), (0, 0, 0)
    elif phase == "decode":
        seq, past = (1, 1, 1), (1, min(256, c - 1), c - 1)
    else:  # one profile for both phases
        seq, past = (1, 1, s), (0, min(256, c - 1), c - 1)
    total = (seq[0] + past[0], seq[1] + past[1], min(c, seq[2] + past[2]))
    return {BATCH: batch, SEQ: seq, PAST: past, TOTAL: total}


def derive_profiles(contract: DecoderContract, options: BuildOptions, two_profiles: bool = True) -> list[Profile]:
    """Profiles for every input of the contract. Two (prefill, decode) let TensorRT pick kernels for each
    phase; the runner selects the profile per step."""
    phases = ["prefill", "decode"] if two_profiles else ["both"]
    profiles = []
    for phase in phases:
        dims = dimension_ranges(options, phase)
        shapes = {}
        for name, axes in contract.input_shapes().items():
            ranges = [dims[a] if isinstance(a, str) else (a, a, a) for a in axes]
            shapes[name] = ShapeRange(*(tuple(r[i] for r in ranges) for i in range(3)))
        profiles.append(Profile(phase, shapes))
    return profiles


def profile_for(profiles: list[Profile], past_length: int, new_tokens: int) -> int:
    """Index of the profile that covers a step (what the runner picks before each call)."""
    for index, profile in enumerate(profiles):
        ids, past = profile.shapes["input_ids"], profile.shapes["past_key_values.0.key"]
        if ids.min[1] <= new_tokens <= ids.max[1] and past.min[2] <= past_length <= past.max[2]:
            return index
    raise AiraOptError(f"no optimization profile covers past {past_length} + {new_tokens} new tokens; "
                       "rebuild with larger --max-seq/--max-context")


def hardware_compatibility(target: str, compute_capability: tuple[int, int]) -> str:
    """The HardwareCompatibilityLevel name for a target on the GPU at hand.

    a100 on an A100 (sm_80) builds natively; on another Ampere-or-newer GPU it builds AMPERE_PLUS so the
    plan loads on an A100 (at some speed cost: only kernels common to Ampere+ are used).
    """
    if target == "native":
        return "NONE"
    if compute_capability == A100_COMPUTE_CAPABILITY:
        return "NONE"
    if compute_capability >= A100_COMPUTE_CAPABILITY:
        return "AMPERE_PLUS"
    raise AiraOptError(f"--target a100 needs an Ampere-or-newer GPU to build on; this GPU is sm_"
                       f"{compute_capability[0]}{compute_capability[1]}")


# Pre-flight -----------------------------------------------------------------------------------------------
def preflight(model: onnx.ModelProto, contract: DecoderContract, profiles: list[Profile], precision: str,
              declared_fp32: dict[str, int] | None) -> list[str]:
    """Every reason TensorRT would reject the graph or build it other than intended."""
    problems: list[str] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset not in TRT_OPSETS:
        problems.append(f"opset {opset} is outside TensorRT's ONNX parser range {TRT_OPSETS.start}..{TRT_OPSETS.stop - 1}")
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{node.name or node.op_type}: {node.domain}.{node.op_type} is not a standard op "
                            "(CPU-only variants such as int8/int4 cannot go to TensorRT)")
        elif node.op_type not in TRT_SUPPORTED_OPS:
            problems.append(f"{node.name or node.op_type}: op {node.op_type} is not imported by TensorRT's ONNX parser")
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        problems.extend(qdq_problems(model))
    problems.extend(uncovered_dimensions(model, profiles))
    if variant(precision).dtype == "float16":
        problems.extend(fp16_consistency(model, declared_fp32 or {}))
    problems.extend(contract.check_graph(model))
    return problems


def uncovered_dimensions(model: onnx.ModelProto, profiles: list[Profile]) -> list[str]:
    """Dynamic input dims that some profile does not cover, and inputs with no shape range at all."""
    problems = []
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        for profile in profiles:
            ranges = profile.shapes.get(inp.name)
            if ranges is None:
                problems.append(f"input '{inp.name}' has no shape range in profile '{profile.name}'")
                continue
            for axis, dim in enumerate(dims):
                if dim.dim_value and not (ranges.min[axis] == ranges.max[axis] == dim.dim_value):
                    problems.append(f"profile '{profile.name}' gives static axis {axis} of '{inp.name}' a range")
                if ranges.min[axis] > ranges.opt[axis] or ranges.opt[axis] > ranges.max[axis]:
                    problems.append(f"profile '{profile.name}': '{inp.name}' axis {axis} min/opt/max out of order")
    return problems


def fp16_consistency(model: onnx.ModelProto, declared_fp32: dict[str, int]) -> list[str]:
    """No accidental fp32 in an fp16 graph: every fp32 compute op is one the manifest declares, and every
    weight matrix is fp16."""
    problems = []
    actual = fp32_islands(model)
    for op, count in actual.items():
        if count > declared_fp32.get(op, 0):
            problems.append(f"{count - declared_fp32.get(op, 0)} undeclared fp32 {op} op(s) in the fp16 graph")
    weight_dtypes = {i.name: i.data_type for i in model.graph.initializer}
    for node in model.graph.node:
        dtype = weight_dtypes.get(node.input[1]) if node.op_type == "MatMul" else None
        if dtype is not None and dtype != onnx.TensorProto.FLOAT16:
            problems.append(f"{node.name}: weight {node.input[1]} is not fp16")
    return problems


def make_plan(folder: Path, options: BuildOptions, two_profiles: bool = True) -> BuildPlan:
    """Read an export folder and decide the build: profiles, expected I/O, and the pre-flight result."""
    export = ExportFolder(folder)
    manifest = export.manifest
    precision = manifest.precision
    if not manifest.variant.tensorrt:
        raise AiraOptError(f"the {precision} export cannot be built into a TensorRT engine (it uses CPU-only "
                           f"ops); export with --precision {' or '.join(tensorrt_names())}")
    if manifest.fused:
        raise AiraOptError("this export was made with --fuse (CPU-only GroupQueryAttention); "
                           "export it again without --fuse for TensorRT")
    contract = export.contract
    model_context = export.context_length
    options = options.for_model(model_context)
    problems = options.problems(model_context)
    if problems:
        raise AiraOptError("; ".join(problems))
    model = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False)
    profiles = derive_profiles(contract, options, two_profiles)
    declared = manifest.kept_fp32 if isinstance(manifest.kept_fp32, dict) else {}
    return BuildPlan(
        onnx_path=str(Path(folder) / "model.onnx"), precision=precision, options=options, profiles=profiles,
        inputs=contract.input_shapes(), outputs=contract.output_shapes(),
        preflight=preflight(model, contract, profiles, precision, declared),
    )


def describe_plan(plan: BuildPlan) -> str:
    """The build plan as people read it (the --dry-run output)."""
    o = plan.options
    lines = [f"onnx: {plan.onnx_path} ({plan.precision}; strongly typed: precision comes from the graph)",
             f"target: {o.target}  workspace: {o.workspace_gib} GiB  builder optimization level: {o.opt_level}  "
             f"timing cache: {o.timing_cache or '(none)'}",
             "target a100: native on an A100 (sm_80); HardwareCompatibilityLevel.AMPERE_PLUS on other Ampere+ GPUs"
             if o.target == "a100" else "target native: built for the GPU at hand only"]
    for profile in plan.profiles:
        lines.append(f"profile '{profile.name}':")
        for name in ("input_ids", "attention_mask", "position_ids", "past_key_values.0.key"):
            r = profile.shapes[name]
            lines.append(f"  {name:24s} min {list(r.min)}  opt {list(r.opt)}  max {list(r.max)}")
        lines.append(f"  (+ {len(profile.shapes) - 4} more past_key_values.* inputs with the same range)")
    lines.append(f"outputs: logits {plan.outputs['logits']}, present.*.key/value "
                 f"{plan.outputs['present.0.key']} x {len(plan.outputs) - 1}")
    lines.append("pre-flight: passed" if not plan.preflight else f"pre-flight: {len(plan.preflight)} problem(s)")
    lines.extend(f"  - {p}" for p in plan.preflight[:50])
    return "\n".join(lines)
