"""What an export costs as the model grows: wall time, peak resident memory of the whole process tree and bytes
on disk, for each model x precision, each export in a fresh process (`aira-opt export --force` into a scratch
folder, validation included, as a user runs it), and the peers' converters from the same checkpoint folder:
optimum's ONNX exporter (its own environment), onnxruntime-genai's model builder (int4), OpenVINO's exporter
(optimum-intel, int4 and int8; its own environment) and llama.cpp's converter plus quantizer (Q4_K_M).

    python benchmarks/export_cost.py --models smollm2-135m,aira-2-1b1-random --precisions fp32,fp16,int4 \\
        --peers openvino-int4,openvino-int8,genai-int4,llamacpp-Q4_K_M,optimum-fp32 \\
        --openvino-python /tmp/ovenv/bin/python --optimum-python .ci/venv-optimum/bin/python \\
        --json results/DATE-export-cost.json --markdown results/DATE-export-cost.md --plot results/DATE-export-cost.png

A run that fails (out of memory, a converter's error) keeps its row, with the memory it reached and the error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from aira_opt.benchmark.machine import machine_info
from aira_opt.core.processes import source_tree_env
from aira_opt.core.tables import markdown_table
from aira_opt.source.models import load_model

HERE = Path(__file__).resolve().parent

POLL_S = 0.05


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of a process and its children, now."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # gone between the listing and the read
            pass
    return total


def measure(command: list[str], cwd: Path) -> dict:
    """Run `command` in `cwd`; its wall time, peak resident memory (process tree, polled) and exit code. Its
    output goes to a file (a pipe nobody reads while it runs would fill and stall a chatty converter)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        try:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                                     env=source_tree_env())
        except OSError as exc:
            return {"seconds": None, "peak_rss_gb": None, "returncode": None, "error": str(exc)}
        process, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            peak = max(peak, tree_rss(process))
            time.sleep(POLL_S)
        log.seek(0)
        lines = log.read().strip().splitlines()
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(peak / 1e9, 2),
            "returncode": child.returncode, "error": lines[-1] if child.returncode and lines else ""}


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def peer_command(peer: str, checkpoint: Path, out: Path, args: argparse.Namespace) -> list[str] | None:
    """The command a peer converts `checkpoint` with, into `out`; None when its environment is missing."""
    tool, _, kind = peer.partition("-")
    if tool == "openvino":
        if not args.openvino_python:
            return None
        weights = ["--weight-format", "int4", "--group-size", "32", "--sym"] if kind == "int4" else [
            "--weight-format", kind]
        return [args.openvino_python, "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model",
                str(checkpoint), "--task", "text-generation-with-past", *weights, str(out)]
    if tool == "optimum":
        if not args.optimum_python:
            return None
        return [args.optimum_python, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model",
                str(checkpoint), "--task", "text-generation-with-past", str(out)]
    if tool == "genai":
        return ["bash", str(HERE / "build_genai.sh"), str(checkpoint), str(out), kind]
    if tool == "llamacpp":  # convert to bf16 (exact for our bf16 checkpoints, half f32's disk), then quantize
        return [sys.executable, str(HERE / "make_gguf.py"), str(checkpoint), str(out), "--convert-to", "bf16",
                "--types", kind]
    raise SystemExit(f"unknown peer {peer}")


def parameters(spec: str) -> int:
    return load_model(spec, streamed=True).describe()["num_parameters"]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, wall) = plt.subplots(1, 2, figsize=(12, 4.8))
    series: dict[str, list[dict]] = {}
    for row in rows:
        if row["returncode"] == 0:
            series.setdefault(f"{row['tool']} {row['precision']}", []).append(row)
    for label, points in sorted(series.items()):
        points.sort(key=lambda r: r["parameters"])
        x = [r["parameters"] / 1e9 for r in points]
        style = "-o" if label.startswith("aira-opt") else "--s"
        mem.plot(x, [r["peak_rss_gb"] for r in points], style, label=label)
        wall.plot(x, [r["seconds"] for r in points], style, label=label)
    sizes = sorted({r["parameters"] for r in rows})
    mem.plot([s / 1e9 for s in sizes], [4 * s / 1e9 for s in sizes], ":", color="grey", label="fp32 weights")
    mem.set(xlabel="parameters (billions)", ylabel="peak RSS of the process tree (GB)", xscale="log",
            title="Export memory as the model grows")
    wall.set(xlabel="parameters (billions)", ylabel="wall time (s)", xscale="log", yscale="log",
             title="Export wall time (ours: validation included)")
    for axis in (mem, wall):  # one labelled tick per model size, no log-scale clutter
        axis.set_xticks([s / 1e9 for s in sizes], [f"{s / 1e9:.2g}B" for s in sizes])
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    mem.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,aira-2-1b1-random", help="empty: only --rows-from")
    parser.add_argument("--precisions", default="fp32,fp16,int4", help="ours; empty for none")
    parser.add_argument("--peers", default="", help="openvino-int4,openvino-int8,genai-int4,llamacpp-Q4_K_M,"
                        "optimum-fp32 (each from the model's checkpoint folder)")
    parser.add_argument("--openvino-python", default=None, help="the OpenVINO environment's interpreter")
    parser.add_argument("--optimum-python", default=None, help="the optimum-onnx environment's interpreter")
    parser.add_argument("--scratch", type=Path, default=None, help="where outputs go (default: a temp folder)")
    parser.add_argument("--keep", type=Path, default=None, help="keep each output in this folder (for bench)")
    parser.add_argument("--rows-from", type=Path, action="append", default=[],
                        help="a JSON report of an earlier run (this script's) whose rows join the table")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    for name in ("openvino_python", "optimum_python"):  # the commands run in the scratch folder
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).absolute()))
    rows = [row for path in args.rows_from for row in json.loads(path.read_text())["results"]]
    counts = {model: parameters(model) for model in {row["model"] for row in rows}}
    for row in rows:  # counted again, the same way for every row
        row["parameters"] = counts[row["model"]]
    with tempfile.TemporaryDirectory(prefix="export-cost-", dir=args.scratch) as scratch:
        for model in filter(None, args.models.split(",")):
            count = parameters(model)
            jobs = [("aira-opt", p, [sys.executable, "-m", "aira_opt", "export", "--model", model, "--precision", p,
                                     "--output", "{out}", "--force"]) for p in filter(None, args.precisions.split(","))]
            checkpoint = load_model(model, streamed=True).checkpoint
            for peer in filter(None, args.peers.split(",")):
                command = peer_command(peer, checkpoint, Path("{out}"), args) if checkpoint else None
                jobs.append((peer.split("-")[0], peer.partition("-")[2], command))
            for tool, precision, command in jobs:
                out = Path(scratch) / f"{model}-{tool}-{precision}"
                row = {"tool": tool, "model": model, "parameters": count, "precision": precision,
                       "command": " ".join(command) if command else None}
                if command is None:
                    row.update(seconds=None, peak_rss_gb=None, returncode=None, disk_gb=None,
                               error="its environment was not given")
                else:
                    # from an empty folder, as a new user runs it: no export/<model>/fp32 to start from
                    row.update(measure([c.replace("{out}", str(out)) for c in command], Path(scratch)))
                    row["disk_gb"] = round(disk_bytes(out) / 1e9, 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.keep and out.exists():
                    args.keep.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(out), str(args.keep / out.name))
                shutil.rmtree(out, ignore_errors=True)  # disk: the next one needs the room
    rows.sort(key=lambda r: (r["parameters"], r["tool"] != "aira-opt", r["tool"], r["precision"]))
    report = {"machine": machine_info(None, float("nan")), "command": " ".join(sys.argv), "results": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot)
    if args.markdown:
        table = markdown_table(
            ["tool", "model", "parameters", "precision", "wall s", "peak RSS GB", "on disk GB", "result"],
            [[r["tool"], r["model"], f"{r['parameters'] / 1e9:.2f}B", r["precision"], r["seconds"],
              r["peak_rss_gb"], r["disk_gb"], "ok" if r["returncode"] == 0 else r["error"] or r["returncode"]]
             for r in rows])
        machine = report["machine"]
        where = f"{machine['cpu']}, {machine['cores_logical']} cores, {machine['memory_gb']} GB"
        args.markdown.write_text(f"# Export cost\n\nMachine: {where}.\n\n    {report['command']}\n\n{table}\n")


if __name__ == "__main__":
    main()
