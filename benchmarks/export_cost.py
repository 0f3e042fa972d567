"""What an export costs as the model grows: wall time, peak resident memory of the whole process tree and bytes
on disk, for each model x precision, each export in a fresh process (`aira-opt export --force` into a scratch
folder, validation included, as a user runs it). The baseline for issue 27 (a streaming export whose memory does
not grow with the model); peers' converters join as further commands.

    python benchmarks/export_cost.py --models smollm2-135m,aira-2-1b1-random --precisions fp32,fp16,int4 \\
        --json results/DATE-export-cost.json --markdown results/DATE-export-cost.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from aira_opt.benchmark.machine import machine_info
from aira_opt.core.processes import source_tree_env
from aira_opt.core.tables import markdown_table

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
    """Run `command` in `cwd`; its wall time, peak resident memory (process tree, polled) and exit code."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd,
                             env=source_tree_env())
    process, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        peak = max(peak, tree_rss(process))
        time.sleep(POLL_S)
    stderr = child.stderr.read() if child.stderr else ""
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(peak / 1e9, 2),
            "returncode": child.returncode, "error": stderr.strip().splitlines()[-1] if child.returncode else ""}


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,aira-2-1b1-random")
    parser.add_argument("--precisions", default="fp32,fp16,int4")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="export-cost-") as scratch:
        for model in args.models.split(","):
            for precision in args.precisions.split(","):
                out = Path(scratch) / f"{model}-{precision}"
                command = [sys.executable, "-m", "aira_opt", "export", "--model", model, "--precision", precision,
                           "--output", str(out), "--force"]
                # from an empty folder, as a new user runs it: no export/<model>/fp32 to start from
                row = {"tool": "aira-opt", "model": model, "precision": precision, **measure(command, Path(scratch)),
                       "disk_gb": round(disk_bytes(out) / 1e9, 3) if out.exists() else None}
                rows.append(row)
                print(json.dumps(row), flush=True)
    report = {"machine": machine_info(None, float("nan")), "command": " ".join(sys.argv), "results": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        table = markdown_table(["tool", "model", "precision", "wall s", "peak RSS GB", "on disk GB", "exit"],
                               [[r["tool"], r["model"], r["precision"], r["seconds"], r["peak_rss_gb"], r["disk_gb"],
                                 r["returncode"] or "ok"] for r in rows])
        machine = report["machine"]
        where = f"{machine['cpu']}, {machine['cores_logical']} cores, {machine['memory_gb']} GB"
        args.markdown.write_text(f"# Export cost\n\nMachine: {where}.\n\n    {report['command']}\n\n{table}\n")


if __name__ == "__main__":
    main()
