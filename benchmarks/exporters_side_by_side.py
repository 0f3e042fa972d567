"""Our torch.onnx (dynamo) exporter against optimum's, on the same model: export wall time and peak RSS (each export
in a fresh process, its own maximum resident set as the kernel counts it), node count and size on disk of the fp32
graph, then one `aira-opt bench` run over fp32 and the fused int4 made from each exporter's graph.

optimum's exporter needs transformers 4.57 (the `optimum` extra), so it runs under a second virtual environment's
interpreter; ours runs under this one (transformers 5):

    python benchmarks/exporters_side_by_side.py --optimum-python .venv-optimum/bin/python \
        [--model aira-2-1b1-random] [--root export/exporters] [--tag NAME]

Results: benchmarks/results/<date>-exporters[-tag].{json,md} (the export table) and the bench's own files beside.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parents[1]

INT4_FROM_FP32 = """
import sys
from pathlib import Path
import aira_opt
model, fp32, out, exporter = sys.argv[1:5]
aira_opt.export(model, "int4", Path(out), force=True, reuse_fp32=Path(fp32), exporter=exporter)
"""


def run_measured(command: list[str]) -> tuple[float, float]:
    """Run `command`; returns (wall seconds, the process tree's peak RSS in MB as wait4 reports the largest child)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=sys.stderr)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}")
    return wall, usage.ru_maxrss / 1024


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimum-python", required=True, help="python of an environment with aira-opt[optimum]")
    parser.add_argument("--model", default="aira-2-1b1-random")
    parser.add_argument("--root", type=Path, default=REPO / "export" / "exporters")
    parser.add_argument("--tag", default="")
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args()
    pythons = {"torch": sys.executable, "optimum": args.optimum_python}
    rows = []
    for exporter, python in pythons.items():
        fp32, int4 = args.root / f"{exporter}-fp32", args.root / f"{exporter}-int4"
        print(f"== {exporter}: fp32 export", file=sys.stderr)
        wall, rss = run_measured([python, "-m", "aira_opt", "export", "--model", args.model, "--exporter", exporter,
                                  "--output", str(fp32), "--force"])
        graph = onnx.load(str(fp32 / "model.onnx"), load_external_data=False)
        manifest = json.loads((fp32 / "manifest.json").read_text())
        print(f"== {exporter}: int4 (fused) from that fp32 graph", file=sys.stderr)
        int4_wall, int4_rss = run_measured([python, "-c", INT4_FROM_FP32, args.model, str(fp32), str(int4), exporter])
        int4_graph = onnx.load(str(int4 / "model.onnx"), load_external_data=False)
        rows.append({
            "exporter": exporter, "versions": {k: manifest["versions"].get(k) for k in
                                               ("torch", "transformers", "onnxscript", "optimum-onnx")},
            "export_s": round(wall, 1), "export_peak_rss_mb": round(rss), "fp32_nodes": len(graph.graph.node),
            "fp32_mb": round(folder_mb(fp32), 1), "int4_s": round(int4_wall, 1), "int4_peak_rss_mb": round(int4_rss),
            "int4_nodes": len(int4_graph.graph.node), "int4_mb": round(folder_mb(int4), 1),
            "validation_max_abs_logit_diff": manifest["validation"]["max_abs_logit_diff"],
        })
    stem = REPO / "benchmarks" / "results" / f"{datetime.date.today()}-exporters{'-' + args.tag if args.tag else ''}"
    header = ["exporter", "export s", "export peak RSS MB", "fp32 nodes", "fp32 MB", "int4 s", "int4 peak RSS MB",
              "int4 nodes", "int4 MB", "fp32 max |logit diff| vs PyTorch"]
    keys = ["exporter", "export_s", "export_peak_rss_mb", "fp32_nodes", "fp32_mb", "int4_s", "int4_peak_rss_mb",
            "int4_nodes", "int4_mb", "validation_max_abs_logit_diff"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{r[k]:.2e}" if k.startswith("validation") else str(r[k]) for k in keys) + " |"
              for r in rows]
    command = "python benchmarks/exporters_side_by_side.py " + " ".join(sys.argv[1:])
    stem.with_suffix(".json").write_text(json.dumps({"command": command, "model": args.model, "rows": rows},
                                                    indent=2) + "\n")
    stem.with_suffix(".md").write_text(f"`{command}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.skip_bench:
        folders = [str(args.root / f"{e}-{p}") for e in pythons for p in ("fp32", "int4")]
        bench = [sys.executable, "-m", "aira_opt", "bench", "--model", args.model, "--backends", "ort",
                 "--threads", str(os.cpu_count()), "--prompt-lengths", "64", "--new-tokens", "64", "--batch-sizes",
                 "1", "--warmup", "1", "--repeats", "3", "--json", f"{stem}-bench.json", "--markdown",
                 f"{stem}-bench.md"]
        for folder in folders:
            bench += ["--onnx", folder]
        subprocess.run(bench, cwd=REPO, check=True)


if __name__ == "__main__":
    main()
