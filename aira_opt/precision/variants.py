"""One record per precision variant. The CLI's choices, the recipe, the post-export sanity bar, `check`'s
thresholds, whether a graph may be fused and whether it can become a TensorRT engine are all read from here.
Adding a variant is one record plus its recipe function.

TensorRT 11 is strongly typed, so precision lives in the graph itself: fp16 and int8-qdq are standard-op graphs
for TensorRT (and ONNX Runtime CUDA); int8 and int4 are ONNX Runtime's CPU forms (MatMulNBits).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from aira_opt.core.errors import AiraOptError, OptionError
from aira_opt.precision.cuda import fp16_cuda_recipe, int4_cuda_recipe
from aira_opt.precision.fp16 import fp16_recipe
from aira_opt.precision.qdq import qdq_recipe
from aira_opt.precision.recipe import ALGORITHMS, Recipe, WeightOnlySettings, as_exported
from aira_opt.precision.weight_only import weight_only_recipe


@dataclass(frozen=True)
class Tolerance:
    """What the post-export validation accepts; `check` then judges the variant by its thresholds."""

    atol: float | None = None  # max |logit diff| over every compared position
    min_cosine: float | None = None  # min cosine similarity of a position's logits with PyTorch fp32's

    def misses(self, diff: float, cosine: float) -> str | None:
        if not (np.isfinite(diff) and np.isfinite(cosine)):
            return "non-finite logits"
        if self.atol is not None and diff > self.atol:
            return f"max |logit diff| {diff:.3e} > {self.atol:g}"
        if self.min_cosine is not None and cosine < self.min_cosine:
            return f"min cosine {cosine:.5f} < {self.min_cosine}"
        return None


@dataclass(frozen=True)
class Thresholds:
    """What `check` demands of a variant. None means the metric is reported but not judged."""

    min_greedy_fraction: float  # prompts whose greedy sequences are identical / prompts
    min_top1: float  # top-1 agreement under teacher forcing
    max_abs_logit_diff: float | None = None
    max_perplexity_ratio: float | None = None  # perplexity_onnx / perplexity_torch


BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits block sizes we offer: powers of two
HEAD_BITS = {"int8": 8, "int4": 4, "float": None}  # --lm-head: the output head's bits (precision/head.py)
RECIPE_OPTIONS = {"--block-size": "block_size", "--lm-head": "head_bits", "--algorithm": "algorithm",
                  "--source-grid": "source_grid"}  # export's recipe options -> the WeightOnlySettings field each sets


@dataclass(frozen=True)
class Variant:
    name: str  # the --precision value and the manifest's `precision`
    target: str  # what runs it
    recipe: Recipe | None  # fp32 graph -> this variant; None: made outside aira-opt, known to check and bench
    tolerance: Tolerance  # the sanity bar right after export: it catches a broken graph, not a small loss
    thresholds: Thresholds  # `check`'s bar, written in the README too; never loosened silently
    weight_only: WeightOnlySettings | None = None  # MatMulNBits defaults (int8/int4)
    fusable: bool = False  # may carry the CPU fusion's contrib ops
    fused_by_default: bool = False
    tensorrt: bool = False  # `build` takes it
    enforce_on_random_weights: bool = False  # random weights give near-flat logits: cosine bars say little
    kernel_candidates: tuple[str, ...] = ()  # kernels.py times these at export and keeps the fastest; () none
    dtype: str = "float32"  # activations and KV cache of the graph (numpy's name)
    cuda: bool = False  # made for a GPU: onnxruntime-genai's config asks for its CUDA provider
    web_dtype: str | None = None  # transformers.js's dtype for this graph (onnx/model{suffix}.onnx); None: not web

    @property
    def kernel_tuning(self) -> bool:
        return bool(self.kernel_candidates)

    @property
    def is_source_graph(self) -> bool:
        """The exporter's fp32 graph as it is: what every other variant's recipe starts from."""
        return self.recipe is as_exported

    def fused(self, requested: bool | None) -> bool:
        """Whether an export is fused (None: this variant's default); fusing a TensorRT variant is refused."""
        if requested and not self.fusable:
            raise OptionError(f"--fuse makes ONNX Runtime-only contrib ops; {self.name} feeds TensorRT "
                              "and stays standard-op")
        return self.fused_by_default if requested is None else requested

    def settings(self, block_size: int | None = None, lm_head: str | None = None, algorithm: str | None = None,
                 source_grid: bool | None = None) -> WeightOnlySettings | None:
        """The weight-only settings with the recipe choices a user made (None: the variant's default); the one
        place their rules live."""
        given = dict(zip(RECIPE_OPTIONS, (block_size, lm_head, algorithm, source_grid)))
        if all(v is None for v in given.values()):
            return self.weight_only
        if self.weight_only is None:
            names = weight_only_names()
            option = next(k for k, v in given.items() if v is not None)
            raise OptionError(f"{option} applies to --precision {', '.join(names[:-1])} or {names[-1]} only")
        if block_size is not None and block_size not in BLOCK_SIZES:
            raise OptionError(f"--block-size must be a power of two from {BLOCK_SIZES[0]} to {BLOCK_SIZES[-1]}, "
                              f"got {block_size}")
        if lm_head is not None and lm_head not in HEAD_BITS:
            raise OptionError(f"--lm-head must be one of {', '.join(HEAD_BITS)}, got {lm_head}")
        if algorithm is not None and algorithm not in ALGORITHMS:
            raise OptionError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm}")
        if algorithm in ("hqq", "gptq") and self.weight_only.bits != 4:
            raise OptionError(f"--algorithm {algorithm} is a 4-bit algorithm; {self.name} rounds to nearest")
        changes: dict[str, object] = {}
        if block_size is not None:
            changes["block_size"] = block_size
        if lm_head is not None:
            changes["head_bits"] = HEAD_BITS[lm_head]
        if algorithm is not None:
            changes["algorithm"] = algorithm
        if source_grid is not None:
            changes["source_grid"] = source_grid
        return replace(self.weight_only, **changes)

    def folder_name(self, settings: WeightOnlySettings | None = None, fused: bool | None = None) -> str:
        """The folder/row name: the precision plus whatever differs from its defaults
        (int4 block 128 -> 'int4-b128', fused fp32 -> 'fp32-fused', unfused int4 -> 'int4-unfused')."""
        name = self.name
        if settings is not None and self.weight_only is not None:
            name += settings.suffix(self.weight_only)
        if fused is not None and fused != self.fused_by_default:
            name += "-fused" if fused else "-unfused"
        return name


TENSORRT_OR_CUDA = "TensorRT 11 (strongly typed) and ONNX Runtime CUDA; standard ops"
ORT_CPU = "ONNX Runtime CPU (MatMulNBits contrib op)"
ORT_CUDA = "ONNX Runtime CUDA (fused: GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization)"
INT8_THRESHOLDS = Thresholds(min_greedy_fraction=0.0, min_top1=0.95, max_perplexity_ratio=1.05)
FP16_THRESHOLDS = Thresholds(min_greedy_fraction=7 / 8, min_top1=0.99)
INT4_THRESHOLDS = Thresholds(min_greedy_fraction=0.0, min_top1=0.90, max_perplexity_ratio=1.10)
# The head in 8 bits (precision/head.py): it is most of a step's bytes on small models with large vocabularies,
# and its 4-bit rounding moves the logits most (benchmarks/notes: quality against speed).
INT4_SETTINGS = WeightOnlySettings(bits=4, block_size=32, symmetric=True, accuracy_level=4, head_bits=8)

VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("fp32", "any ONNX runtime; standard ops (fused on request: ONNX Runtime CPU)", as_exported,
            Tolerance(atol=1e-3),
            Thresholds(min_greedy_fraction=1.0, min_top1=1.0, max_abs_logit_diff=1e-3),
            fusable=True, tensorrt=True, enforce_on_random_weights=True, web_dtype="fp32"),
    Variant("fp16", TENSORRT_OR_CUDA, fp16_recipe, Tolerance(min_cosine=0.999), FP16_THRESHOLDS, tensorrt=True,
            dtype="float16", cuda=True, web_dtype="fp16"),
    # Random-token probes leave the calibrated activation ranges (clipped), and on real weights one clipped outlier
    # decides their minimum, which moves with the machine (docs/precision.md): a looser sanity bar that still
    # refuses a collapsed graph. `check` judges the variant on real text with INT8_THRESHOLDS, unchanged.
    Variant("int8-qdq", "TensorRT 11 explicit quantization; standard ops", qdq_recipe, Tolerance(min_cosine=0.93),
            INT8_THRESHOLDS, tensorrt=True, web_dtype="int8"),
    # int8: MatMulNBits 8-bit or dynamic int8 (MatMulInteger), whichever times faster on the exporting machine
    # (kernels.py); both are measured in benchmarks/README.md.
    Variant("int8", ORT_CPU, weight_only_recipe, Tolerance(min_cosine=0.98), INT8_THRESHOLDS,
            weight_only=WeightOnlySettings(bits=8, block_size=32, symmetric=False, accuracy_level=4, head_bits=8),
            fusable=True, fused_by_default=True, kernel_candidates=("matmulnbits", "matmulnbits-fp32", "dynamic"),
            web_dtype="q8"),
    # int4: block 32 with int8 compute, as onnxruntime-genai's int4 default; decode is memory-bound. Weights
    # already on a 4-bit grid (a GGUF source) keep it exactly (source_grid.py).
    Variant("int4", ORT_CPU, weight_only_recipe, Tolerance(min_cosine=0.95), INT4_THRESHOLDS,
            weight_only=INT4_SETTINGS, fusable=True, fused_by_default=True,
            kernel_candidates=("matmulnbits", "matmulnbits-fp32"), web_dtype="q4"),
    # The fused fp16 graph for ONNX Runtime CUDA (GroupQueryAttention is fp16 there) and its int4 (cuda.py), whose
    # head is 4-bit as onnxruntime-genai's CUDA int4 has it (not yet measured on a GPU).
    Variant("fp16-cuda", ORT_CUDA, fp16_cuda_recipe, Tolerance(min_cosine=0.999), FP16_THRESHOLDS,
            fusable=True, fused_by_default=True, dtype="float16", cuda=True),
    Variant("int4-cuda", ORT_CUDA + "; MatMulNBits with fp16 activations", int4_cuda_recipe,
            Tolerance(min_cosine=0.95), INT4_THRESHOLDS, weight_only=replace(INT4_SETTINGS, head_bits=4), fusable=True,
            fused_by_default=True, dtype="float16", cuda=True),
    # optimum's dynamic int8 (benchmarks/optimum_int8.py makes it): checked and benched, not exported by us.
    Variant("int8-dynamic", "ONNX Runtime CPU (MatMulInteger, optimum's recipe)", None, Tolerance(min_cosine=0.98),
            INT8_THRESHOLDS),
)}


def exportable_names() -> list[str]:
    """The --precision choices of `export`."""
    return [v.name for v in VARIANTS.values() if v.recipe is not None]


def weight_only_names() -> list[str]:
    return [v.name for v in VARIANTS.values() if v.weight_only is not None]


def tensorrt_names() -> list[str]:
    return [v.name for v in VARIANTS.values() if v.tensorrt]


def web_names() -> list[str]:
    """Variants a web page can load (transformers.js names their files)."""
    return [v.name for v in VARIANTS.values() if v.web_dtype]


def variant(name: str) -> Variant:
    """The record of a precision, or a one-line error naming the known ones."""
    if name not in VARIANTS:
        raise AiraOptError(f"unknown precision '{name}'; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def variant_name(precision: str, block_size: int | None = None, fused: bool | None = None) -> str:
    """Variant.folder_name for a precision by name (a name without a record passes through unchanged)."""
    record = VARIANTS.get(precision)
    return record.folder_name(record.settings(block_size), fused) if record else precision


def source_variant() -> Variant:
    """The record of the exporter's own graph (fp32), which the other recipes start from."""
    return next(v for v in VARIANTS.values() if v.is_source_graph)


def variant_named_in(text: str) -> Variant | None:
    """The variant whose name a folder's name mentions (the longest match: 'int4-cuda' before 'int4'), for
    folders other tools made, which carry no manifest of ours."""
    text = text.lower()
    return max((v for v in VARIANTS.values() if v.name in text), key=lambda v: len(v.name), default=None)
