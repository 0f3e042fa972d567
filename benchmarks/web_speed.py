"""Browser decode speed: our page's loop (aira-loop.mjs over onnxruntime-web) against transformers.js's own
`generate`, on the same export folder, the same prompt ids and the same WebAssembly build, in headless Chromium,
single-threaded and multi-threaded.

Both runtimes import one onnxruntime-web module (the page's import map), so the graph, the kernels and the wasm
binary are the same; what differs is the loop around `session.run`. Each (model, threads, runtime) gets a fresh
page (WebAssembly's thread count is fixed when it starts), one warm-up answer, then `--repeats` timed answers of
`--new-tokens` tokens each (stop ids ignored, so every answer is the same length); the runtimes alternate
(ABBA) so drift falls on both. Greedy tokens of the two runtimes are compared on the same question, stopping
at the stop id. The server sends cross-origin isolation headers throughout, so one thread and two see the same
page.

    python benchmarks/web_speed.py --onnx export/smollm2-135m/fp32 --onnx export/smollm2-135m/int4 \
        --threads 1,2 --json benchmarks/results/DATE-web-speed.json --markdown ... --plot ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

from aira_opt.benchmark.machine import machine_info, probe_bandwidth_gbps
from aira_opt.core.tables import markdown_table
from aira_opt.folders import ExportFolder
from aira_opt.web.browser import find_chromium, headless_chromium, open_page
from aira_opt.web.layout import web_models
from aira_opt.web.packages import PAGE, ensure_packages
from aira_opt.web.server import WebApp, WebServer

RUNTIMES = {"aira": "aira-opt loop", "transformers": "transformers.js generate"}
QUESTION = "Tell me about the history of Brazil."


def measure(browser, url: str, model: str, runtime: str, threads: int, new_tokens: int, repeats: int) -> dict:
    """One runtime on one model at one thread count, in a fresh page."""
    with open_page(browser, f"{url}?threads={threads}") as page:
        greedy = page.ask(QUESTION, model=model, runtime=runtime, raw=True, maxNewTokens=new_tokens)
        runs = [page.ask(QUESTION, model=model, runtime=runtime, raw=True, maxNewTokens=new_tokens, ignoreStop=True)
                for _ in range(repeats)]
        assert page.off_loopback() == [], page.off_loopback()
    return {"runtime": runtime, "threads": threads, "greedy_tokens": greedy["tokens"],
            "load_seconds": round(greedy["loadSeconds"], 3), "prompt_tokens": len(greedy["promptIds"]),
            "decode_tokens_per_s": [round(r["decodeTokensPerSecond"], 2) for r in runs],
            "time_to_first_token_ms": [round(r["timeToFirstToken"] * 1000, 1) for r in runs],
            "decode_run_share": [round(r["decodeRunShare"], 4) for r in runs if r["decodeRunShare"] is not None]}


def native(model, threads: int, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """Our Python loop on native ONNX Runtime, same folder, same lengths and threads (`aira-opt bench`'s ort row,
    random ids of the prompt's length): what the browser costs."""
    import aira_opt

    spec = model.folder.manifest.source_spec or model.folder.manifest.source_name
    report = aira_opt.bench(spec, onnx=[model.folder.path], backends=["ort"], prompt_lengths=[prompt_tokens],
                            new_tokens=new_tokens, threads=threads, repeats=repeats)
    row = report["results"][0]
    return {"decode_tokens_per_s": round(row["decode_tokens_per_s"], 2), "time_to_first_token_ms": round(row["ttft_ms"], 1)}


def run(folders: list[Path], threads: list[int], new_tokens: int, repeats: int) -> dict:
    models = web_models([ExportFolder(f) for f in folders])
    app = WebApp(models, ensure_packages(), threads=max(max(threads), 2))  # isolation headers in every run
    rows = []
    with WebServer(app) as server, headless_chromium() as browser:
        for model in models.values():
            for n in threads:
                pair = {}
                for runtime in ("aira", "transformers", "transformers", "aira"):  # ABBA
                    result = measure(browser, server.url, model.name, runtime, n, new_tokens, repeats)
                    if runtime in pair:
                        pair[runtime]["decode_tokens_per_s"] += result["decode_tokens_per_s"]
                        pair[runtime]["time_to_first_token_ms"] += result["time_to_first_token_ms"]
                        pair[runtime]["decode_run_share"] += result["decode_run_share"]
                    else:
                        pair[runtime] = result
                    print(model.name, runtime, n, result["decode_tokens_per_s"], flush=True)
                reference = native(model, n, pair["aira"]["prompt_tokens"], new_tokens, repeats)
                for runtime, result in pair.items():
                    rows.append({"native_ort": reference,"model": model.folder.manifest.source_name, "precision": model.precision,
                                 "dtype": model.dtype, "graph": model.graph_name, **result,
                                 "decode_tokens_per_s_median": statistics.median(result["decode_tokens_per_s"]),
                                 "time_to_first_token_ms_median": statistics.median(result["time_to_first_token_ms"]),
                                 "greedy_identical": pair["aira"]["greedy_tokens"] == pair["transformers"]["greedy_tokens"]})
    lock = json.loads((PAGE / "package-lock.json").read_text())["packages"]
    chromium = subprocess.run([find_chromium(), "--version"], capture_output=True, text=True).stdout.strip()
    return {"machine": machine_info(max(threads), probe_bandwidth_gbps()), "browser": chromium,
            "packages": {name: lock[f"node_modules/{name}"]["version"]
                         for name in ("onnxruntime-web", "@huggingface/transformers")},
            "question": QUESTION, "new_tokens": new_tokens, "repeats_per_runtime": 2 * repeats,
            "date": time.strftime("%Y-%m-%d"), "rows": rows}


def markdown(result: dict, command: str) -> str:
    by_key = {(r["model"], r["precision"], r["threads"], r["runtime"]): r for r in result["rows"]}
    table = []
    for (model, precision, threads, runtime), row in by_key.items():
        if runtime != "aira":
            continue
        other = by_key[(model, precision, threads, "transformers")]
        table.append([model, f"{precision} ({row['graph']})", threads, row["decode_tokens_per_s_median"],
                      other["decode_tokens_per_s_median"],
                      f"{row['decode_tokens_per_s_median'] / other['decode_tokens_per_s_median']:.2f}x",
                      row["native_ort"]["decode_tokens_per_s"],
                      row["time_to_first_token_ms_median"], other["time_to_first_token_ms_median"],
                      f"{100 * (1 - statistics.median(row['decode_run_share'])):.1f}%",
                      "yes" if row["greedy_identical"] else "NO"])
    m = result["machine"]
    return "\n".join([
        f"# Browser decode: our page's loop against transformers.js ({result['date']})", "",
        f"Machine: {m['cpu']}, {m['cores_logical']} cores, {m['memory_gb']} GB; {result['browser']} headless; "
        f"onnxruntime-web {result['packages']['onnxruntime-web']}, transformers.js "
        f"{result['packages']['@huggingface/transformers']}.", "",
        f"Question: \"{result['question']}\", {result['new_tokens']} new tokens (stop ids ignored), greedy; "
        f"median of {result['repeats_per_runtime']} timed answers per runtime after a warm-up, runtimes in "
        "ABBA order, a fresh page for each. Beside them, our Python loop on native ONNX Runtime with the same "
        "folder, prompt length and threads (`aira-opt bench`, ort row): what running in the browser costs.", "",
        f"    {command}", "",
        markdown_table(["model", "precision (file)", "threads", "ours tok/s", "transformers.js tok/s", "ours / tjs",
                        "native ONNX Runtime tok/s (our Python loop)",
                        "ours first token ms", "tjs first token ms", "our loop's own share of a step",
                        "same greedy tokens"], table), ""])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["runtime"] == "aira"]
    labels = [f"{r['model']}\n{r['precision']}, {r['threads']} thr" for r in rows]
    ours = [r["decode_tokens_per_s_median"] for r in rows]
    theirs = [next(o for o in result["rows"] if o["runtime"] == "transformers" and o["precision"] == r["precision"]
                   and o["threads"] == r["threads"] and o["model"] == r["model"])["decode_tokens_per_s_median"]
              for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], ours, 0.4, label=RUNTIMES["aira"])
    ax.bar([x + 0.2 for x in xs], theirs, 0.4, label=RUNTIMES["transformers"])
    for x, a, b in zip(xs, ours, theirs):
        ax.text(x - 0.2, a, f"{a:.1f}", ha="center", va="bottom", fontsize=7)
        ax.text(x + 0.2, b, f"{b:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_yscale("log")  # aira-tiny decodes a hundred times faster than SmolLM2's int4
    ax.set_ylabel("decode tokens/s (log)")
    ax.set_title(f"Headless Chromium, WebAssembly ({result['machine']['cpu']})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", action="append", default=[], type=Path)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--replot", type=Path, help="only redraw --plot from this JSON (a result of this script)")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.plot)
        return
    import sys

    result = run(args.onnx, [int(t) for t in args.threads.split(",")], args.new_tokens, args.repeats)
    command = "python " + " ".join(sys.argv)
    result["command"] = command
    text = markdown(result, command)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
