"""The quality frontier: `aira-opt eval`'s KL divergence against `aira-opt bench`'s decode tokens/s, one point per
recipe, ours and the peers' marked apart; a markdown table and a Pareto plot. It joins two JSON reports made on
the same machine in one session (the eval's `results[].label` and the bench's `results[].label` name the same
files), and marks each point that no other point beats on both axes.

    aira-opt eval --model smollm2-135m --onnx ... --gguf ... --genai ... --json quality.json
    aira-opt bench --model smollm2-135m --backends ort,llamacpp,genai --onnx ... --gguf ... --genai ... --json speed.json
    python benchmarks/quality_frontier.py quality.json speed.json --markdown frontier.md --plot frontier.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aira_opt.core.tables import markdown_table

FLOOR = 1e-5  # the plot's lowest KL: below it a file is as good as exact


def same_file(path: str) -> str:
    return str(Path(path).resolve())


def join(quality: dict, speed: dict, names: dict[str, str]) -> list[dict]:
    """One point per evaluated file with a bench row on the same file (bench's `source`, eval's `path`); `names`
    maps eval labels to bench labels for reports made before bench recorded its source."""
    rows = {same_file(r["source"]) if r.get("source") else r["label"]: r
            for r in speed["results"] if r["batch_size"] == 1}
    points = []
    for q in quality["results"]:
        s = rows.get(same_file(q["path"])) or rows.get(names.get(q["label"], q["label"]))
        bench_label = s["label"] if s else names.get(q["label"], q["label"])
        points.append({**q, "bench_label": bench_label, "ours": q["label"].startswith("ours "),
                       "decode_tokens_per_s": s["decode_tokens_per_s"] if s else None,
                       "ttft_ms": s["ttft_ms"] if s else None, "size_mb": s["size_mb"] if s else None})
    for p in points:
        p["on_frontier"] = p["decode_tokens_per_s"] is not None and not any(
            o is not p and o["decode_tokens_per_s"] is not None and o["decode_tokens_per_s"] >= p["decode_tokens_per_s"]
            and o["kl_divergence_mean"] <= p["kl_divergence_mean"]
            and (o["decode_tokens_per_s"] > p["decode_tokens_per_s"] or o["kl_divergence_mean"] < p["kl_divergence_mean"])
            for o in points)
    return points


def markdown(points: list[dict], quality: dict, command: str) -> str:
    rows = [[p["label"], "ours" if p["ours"] else "peer", f"{p['kl_divergence_mean']:.5f}",
             f"{p['kl_divergence_p99']:.4f}", f"{100 * (p['perplexity'] / p['perplexity_reference'] - 1):+.2f}%",
             f"{p['top1_agreement']:.4f}", p["decode_tokens_per_s"] or "not run", p["ttft_ms"] or "",
             "yes" if p["on_frontier"] else ""]
            for p in sorted(points, key=lambda p: p["kl_divergence_mean"])]
    corpus = quality["corpus"]
    return "\n".join([
        "# Quality against speed", "",
        f"Quality: `aira-opt eval`, {points[0]['tokens']} tokens of {corpus['source']} ({corpus['licence']}), "
        f"window {quality['window']}, stride {quality['stride']}, against {quality['reference']['runner']} on "
        f"{quality['reference']['model']}. Speed: `aira-opt bench`, batch 1, the same files.", "",
        f"    {command}", "",
        markdown_table(["file", "", "KL mean", "KL p99", "perplexity vs fp32", "top-1", "decode tok/s",
                        "first token ms", "on the frontier"], rows), ""])


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for ours, colour, marker, name in ((True, "tab:blue", "o", "aira-opt"), (False, "tab:orange", "s", "peers")):
        group = [p for p in points if p["ours"] == ours and p["decode_tokens_per_s"]]
        kl = [max(p["kl_divergence_mean"], FLOOR) for p in group]  # exact files sit on the floor
        ax.scatter([p["decode_tokens_per_s"] for p in group], kl, c=colour, marker=marker, label=name, s=36)
        for p, y in zip(group, kl):
            ax.annotate(p["bench_label"], (p["decode_tokens_per_s"], y), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    ax.set_yscale("log")
    ax.set_ylim(bottom=FLOOR / 2)
    ax.set_xlabel("decode tokens/s (batch 1)")
    ax.set_ylabel(f"mean KL divergence from PyTorch fp32 (log, floor {FLOOR:g}; lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quality", type=Path)
    parser.add_argument("speed", type=Path)
    parser.add_argument("--names", type=Path, help="JSON: eval label -> bench label, where they differ")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--title", default="Quality against speed")
    args = parser.parse_args()
    quality, speed = json.loads(args.quality.read_text()), json.loads(args.speed.read_text())
    names = json.loads(args.names.read_text()) if args.names else {}
    points = join(quality, speed, names)
    import sys

    text = markdown(points, quality, "python " + " ".join(sys.argv))
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"quality": quality, "speed_machine": speed.get("machine"), "points": points},
                                        indent=1) + "\n")
    if args.plot:
        plot(points, args.plot, args.title)


if __name__ == "__main__":
    main()
