"""Export every precision of a model, run `aira-opt check --json` on each, and write the README's precision table.

    python benchmarks/precision_table.py [--model aira-tiny] [--out benchmarks/results/precision-aira-tiny]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from aira_opt.core.artifacts import folder_size_bytes
from aira_opt.core.tables import markdown_table

# variant folder name -> export options (int8/int4 are fused by default; fp32-fused is fp32 with --fuse;
# fp16-cuda/int4-cuda are ONNX Runtime CUDA's graphs, checked here on the CPU provider)
VARIANTS = {"fp32": ["--precision", "fp32"], "fp32-fused": ["--precision", "fp32", "--fuse"],
            "fp16": ["--precision", "fp16"], "int8-qdq": ["--precision", "int8-qdq"],
            "int8": ["--precision", "int8"], "int4": ["--precision", "int4"],
            "fp16-cuda": ["--precision", "fp16-cuda"], "int4-cuda": ["--precision", "int4-cuda"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="aira-tiny")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/precision-aira-tiny"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for precision, options in VARIANTS.items():
        folder = Path("export") / args.model / precision
        if not (folder / "manifest.json").is_file():
            made = subprocess.run(["aira-opt", "export", "--model", args.model, *options], capture_output=True, text=True)
            if made.returncode:  # the post-export sanity bar refused it: say so in the table
                reason = next((line for line in made.stderr.splitlines() if line.startswith("Error")), "failed")
                rows.append([precision, "-", "-", "-", "-", "-", f"export refused: {reason[7:]}", "-"])
                continue
        report = args.out / f"check-{precision}.json"
        subprocess.run(["aira-opt", "check", "--onnx", str(folder), "--json", str(report)], check=False,
                       stdout=subprocess.DEVNULL)
        data = json.loads(report.read_text())
        delta = 100 * (data["perplexity_onnx"] / data["perplexity_torch"] - 1)
        rows.append([precision, f"{folder_size_bytes(folder) / 1e6:.2f}", f"{data['top1_agreement']:.4f}",
                     f"{delta:+.2f}%", f"{data['greedy_exact_match']}/{data['prompts']}",
                     f"{data['max_abs_logit_diff']:.2e}", "PASSED" if data["passed"] else "FAILED",
                     f"`aira-opt check --onnx {folder}`"])
    table = markdown_table(["variant", "size MB", "top-1 agreement", "perplexity vs PyTorch fp32",
                            "greedy answers identical", "max abs logit diff", "check", "command"], rows)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
