"""Per-layer timings of CPU kernel candidates on a model's own MatMul shapes, with the probe `export` uses to choose
(aira_opt/precision/kernels.py), including candidates it never picks by itself (block sizes change the quantization
grid). benchmarks/README.md ("Kernel choice per machine") came from this.

    python benchmarks/kernel_candidates.py --model aira-2-1b1-random --threads 2
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from aira_opt.core.cpu import machine_key
from aira_opt.core.tables import markdown_table
from aira_opt.precision.kernels import KernelCandidate, REFERENCE_PROMPT, time_candidate, layer_shapes
from aira_opt.precision.variants import VARIANTS
from aira_opt.source.models import load_model


def candidates() -> list[tuple[str, KernelCandidate]]:
    int8, int4 = VARIANTS["int8"].weight_only, VARIANTS["int4"].weight_only
    out = [("int8", KernelCandidate("dynamic", "dynamic int8, per channel", None, False))]
    for precision, base in (("int8", int8), ("int4", int4)):
        for block in (32, 64, 128):
            for level in (4, 1):
                settings = replace(base, block_size=block, accuracy_level=level)
                out.append((precision, KernelCandidate(f"MatMulNBits b{block} acc{level}", "", settings, True)))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="aira-2-1b1-random")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    config = load_model(args.model, num_layers=1).config
    shapes = layer_shapes(config)
    rows = []
    for precision, candidate in candidates():
        t = time_candidate(shapes, candidate, args.threads)
        rows.append([precision, candidate.name, t["decode_ms"], t["prefill_ms"], t["request_ms"]])
        print(rows[-1], flush=True)
    print(f"\n{machine_key(args.threads)}; shapes {shapes}; ms per layer\n")
    print(markdown_table(["precision", "kernel", "decode step", f"prefill of {REFERENCE_PROMPT}", "request"], rows))
