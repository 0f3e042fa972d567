"""The CPU goals of issue 19, judged as ratios within `aira-opt bench` runs on one machine (benchmarks/run_cpu.sh
writes one; more runs of the same machine, made one after another, interleave the backends against drift).

    python benchmarks/cpu_goals.py benchmarks/results/<date>-cpu.json [more.json ...] [--markdown OUT.md]

Each goal compares ours against llama.cpp, onnxruntime-genai and optimum; a backend in several runs counts with
the median of its rows. A goal whose reference row is missing (a peer skipped) is reported as such, never as met.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def goals(rows: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, float | None, str, bool | None]]:
    """(goal, ours, reference, ratio, target, met) per goal; ratio None where a row is missing."""
    out = []

    def add(goal: str, ours: str, ref: str, metric: str, target: float, higher_is_better: bool) -> None:
        if ours not in rows or ref not in rows:
            out.append((goal, ours, ref, None, f"{target:g}x", None))
            return
        ratio = rows[ours][metric] / rows[ref][metric]
        met = ratio >= target if higher_is_better else ratio <= target
        out.append((goal, ours, ref, ratio, ("≥ " if higher_is_better else "≤ ") + f"{target:g}x", met))

    fp32 = max((r for r in ("ort fp32", "ort fp32-fused") if r in rows),
               key=lambda r: rows[r]["decode_tokens_per_s"], default="ort fp32")
    fp32_ttft = min((r for r in ("ort fp32", "ort fp32-fused") if r in rows),
                    key=lambda r: rows[r]["ttft_ms"], default="ort fp32")
    add("fp32 decode vs llama.cpp f32", fp32, "llamacpp f32", "decode_tokens_per_s", 1.0, True)
    peers = [r for r in ("optimum fp32", "genai fp32") if r in rows]
    best_peer = max(peers, key=lambda r: rows[r]["decode_tokens_per_s"], default="optimum fp32")
    add("fp32 decode vs the best other peer", fp32, best_peer, "decode_tokens_per_s", 1.0, True)
    add("int8 time to first token vs our fp32", "ort int8", fp32_ttft, "ttft_ms", 1.0, False)
    add("int8 time to first token vs optimum int8", "ort int8", "optimum int8-dynamic", "ttft_ms", 1.0, False)
    add("int8 decode vs llama.cpp Q8_0", "ort int8", "llamacpp Q8_0", "decode_tokens_per_s", 1.1, True)
    add("int4 decode vs genai int4", "ort int4", "genai int4", "decode_tokens_per_s", 1.15, True)
    add("int4 decode vs llama.cpp Q4_K_M", "ort int4", "llamacpp Q4_K_M", "decode_tokens_per_s", 1.2, True)
    add("int4 time to first token vs genai int4", "ort int4", "genai int4", "ttft_ms", 0.8, False)
    for label, row in rows.items():
        if label in ("ort fp32", "ort fp32-fused", "ort int8", "ort int4"):  # our variants, not a peer's recipe
            ratio = row["peak_rss_mb"] / row["size_mb"]
            out.append((f"{label[4:]} peak RSS vs size on disk", label, "its files", ratio, "≤ 1.15x", ratio <= 1.15))
    return out


def median_rows(reports: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """label -> the median of each metric over that label's batch-1 rows in every report."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for report in reports:
        for row in report["results"]:
            if row["batch_size"] == 1:
                grouped.setdefault(row["label"], []).append(row)
    return {label: {k: statistics.median(r[k] for r in rows) for k in ("ttft_ms", "decode_tokens_per_s",
                                                                      "peak_rss_mb", "size_mb")}
            for label, rows in grouped.items()}


def render(reports: list[dict[str, Any]]) -> str:
    rows = median_rows(reports)
    m = reports[0]["machine"]
    runs = "one run" if len(reports) == 1 else f"medians over {len(reports)} runs"
    lines = [f"Goals on {m['cpu']} ({', '.join(m.get('instruction_sets', []))}), {m['threads']} threads, {runs}.",
             "",
             "| goal | ours | reference | ratio | target | met |", "|---|---|---|---|---|---|"]
    for goal, ours, ref, ratio, target, met in goals(rows):
        shown = "row missing" if ratio is None else f"{ratio:.3f}x"
        verdict = "-" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {goal} | {ours} | {ref} | {shown} | {target} | {verdict} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", type=Path, nargs="+")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    reports = [json.loads(path.read_text()) for path in args.bench_json]
    if len({r["machine"]["cpu"] for r in reports}) > 1:
        parser.error("the runs come from different CPUs; goals are ratios within one machine")
    text = render(reports)
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)
