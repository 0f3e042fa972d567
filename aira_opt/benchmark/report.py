"""How bench results are shown: a text table, markdown, JSON and a plot, each with ratios to PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aira_opt.benchmark.measure import BenchReport
from aira_opt.core.tables import markdown_table, text_table


HEADERS = ["backend", "B", "prompt", "new", "TTFT ms", "x torch", "decode tok/s", "x torch", "% of bound",
           "p50 ms", "p90 ms", "p99 ms", "peak RSS MB", "size MB", "kernels"]


def table_rows(report: BenchReport) -> list[list[Any]]:
    torch_rows = {(r.batch_size, r.prompt_length, r.new_tokens): r for r in report.results if r.backend == "torch"}
    rows = []
    for r in report.results:
        base = torch_rows.get((r.batch_size, r.prompt_length, r.new_tokens))
        rows.append([
            r.label, r.batch_size, r.prompt_length, r.new_tokens, r.ttft_ms,
            f"{base.ttft_ms / r.ttft_ms:.2f}x" if base else "-", r.decode_tokens_per_s,
            f"{r.decode_tokens_per_s / base.decode_tokens_per_s:.2f}x" if base else "-",
            f"{r.pct_of_bound:.0f}%" if r.pct_of_bound is not None else "-",
            r.decode_ms_p50, r.decode_ms_p90, r.decode_ms_p99, r.peak_rss_mb, r.size_mb, r.kernels or "-",
        ])
    return rows


def render_text(report: BenchReport) -> str:
    m = report.machine
    isa = " ".join(m.get("instruction_sets", [])) or "?"
    head = (f"{m['cpu']} ({isa}) | {m['threads']} threads | {m['memory_gb']} GB | memory bandwidth "
            f"{m['memory_bandwidth_gbps']} GB/s (copy, read+write)"
            + (f" | GPU {m['gpu']}, {m.get('gpu_memory_bandwidth_gbps')} GB/s copy" if m["gpu"] else ""))
    lines = [head, text_table(HEADERS, table_rows(report))]
    lines += [f"skipped {s['backend']}: {s['reason']}" for s in report.skipped]
    lines.append("x torch: TTFT is torch's / this (higher is faster); decode is this / torch's. "
                 "% of bound: decode steps/s over bandwidth / weight bytes per step.")
    return "\n".join(lines)


def render_markdown(report: BenchReport, command: str = "") -> str:
    m = report.machine
    out = [f"Machine: {m['cpu']} ({', '.join(m.get('instruction_sets', [])) or 'instruction sets not recorded'}), "
           f"{m['threads']} threads, {m['memory_gb']} GB, measured copy bandwidth "
           f"{m['memory_bandwidth_gbps']} GB/s" + (f", GPU {m['gpu']}" if m["gpu"] else "") + ".", ""]
    if command:
        out += [f"Command: `{command}`", ""]
    out.append(markdown_table(HEADERS, table_rows(report)))
    out += [f"\nSkipped {s['backend']}: {s['reason']}" for s in report.skipped]
    return "\n".join(out) + "\n"


def render_plot(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.label}\nB{r.batch_size} P{r.prompt_length}" for r in report.results]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(labels)), 4.5))
    axes[0].bar(labels, [r.decode_tokens_per_s for r in report.results], color="tab:blue")
    axes[0].set_title("decode tokens/s (higher is better)")
    axes[1].bar(labels, [r.ttft_ms for r in report.results], color="tab:orange")
    axes[1].set_title("time to first token, ms (lower is better)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, rotation=45)
    fig.suptitle(report.machine["cpu"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_json(report: BenchReport, command: str = "") -> dict[str, Any]:
    """What `--json` writes: the report plus the command that produced it."""
    return {**report.to_json(), "command": command}


def write_outputs(report: BenchReport, markdown_path: Path | None, plot_path: Path | None, command: str = "") -> None:
    if markdown_path:
        markdown_path.write_text(render_markdown(report, command))
    if plot_path:
        render_plot(report, plot_path)
