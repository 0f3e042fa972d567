"""Load test of `aira-opt serve` (Triton Inference Server on localhost): concurrent streaming clients against one
export at a time, at several concurrency levels.

For each export it starts the real server (the bundled tritonserver, our repository, our loop), then for each
level runs that many closed-loop clients, each sending a bounded number of `generate_stream` requests one after
another. Reported per level: aggregate generated tokens/s (all clients, over the level's wall time) and its ratio
to one client's, time to first token and request latency (p50, p99), errors, and the server's peak RSS
(tritonserver and its Python stub together). Bounded in requests and in time; localhost only.

    python benchmarks/load_test.py --onnx export/aira-2-1b1-random/int8 --onnx export/aira-2-1b1-random/int4 \
        --clients 1,4,8,16 --requests-per-client 3 --max-tokens 32 --markdown benchmarks/results/<date>-load.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from aira_opt.benchmark.machine import machine_info, probe_bandwidth_gbps
from aira_opt.folders import ExportFolder
from aira_opt.serve.repository import ServingOptions, write_repository
from aira_opt.serve.server import Ports, TritonServer, free_ports

QUESTIONS = ["What is the capital of Brazil?", "Tell me a story about a robot.", "What do bees make?",
             "Explain gravity to me.", "Who are you?", "What is the largest planet?", "Name a color.",
             "Why is the sky blue?"]


@dataclass
class RequestResult:
    ttft_s: float
    latency_s: float
    tokens: int
    error: str | None = None


@dataclass
class LevelResult:
    export: str
    clients: int
    requests: int
    errors: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    server_peak_rss_mb: float
    speedup_vs_1: float | None = None
    error_samples: list[str] = field(default_factory=list)


def stream_request(url: str, question: str, max_tokens: int, timeout: float) -> RequestResult:
    """One generate_stream request: time to the first event, to the last, and the tokens the server counted."""
    body = json.dumps({"text_input": question, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True}).encode()
    start = time.perf_counter()
    ttft = None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=timeout) as response:
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return RequestResult(0, time.perf_counter() - start, 0, event["error"])
                ttft = ttft if ttft is not None else time.perf_counter() - start
                if "finish_reason" in event:
                    return RequestResult(ttft, time.perf_counter() - start, int(event["generated_tokens"]))
        return RequestResult(ttft or 0, time.perf_counter() - start, 0, "stream ended without a final event")
    except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the test
        return RequestResult(0, time.perf_counter() - start, 0, f"{type(exc).__name__}: {exc}")


class RssSampler:
    """Peak resident memory of a process and its children, sampled in the background."""

    def __init__(self, pid: int, interval_s: float = 0.05):
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_level(url: str, export: str, clients: int, requests_per_client: int, max_tokens: int, deadline: float,
              server_pid: int, request_timeout: float) -> LevelResult:
    results: list[RequestResult] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(index: int) -> None:
        barrier.wait()
        for n in range(requests_per_client):
            if time.monotonic() > deadline:
                return
            result = stream_request(url, QUESTIONS[(index + n) % len(QUESTIONS)], max_tokens, request_timeout)
            with lock:
                results.append(result)

    with RssSampler(server_pid) as rss:
        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    return LevelResult(
        export=export, clients=clients, requests=len(results), errors=len(results) - len(ok), wall_s=round(wall, 3),
        tokens=tokens, tokens_per_s=round(tokens / wall, 2),
        ttft_p50_ms=round(percentile([r.ttft_s for r in ok], 50) * 1000, 1),
        ttft_p99_ms=round(percentile([r.ttft_s for r in ok], 99) * 1000, 1),
        latency_p50_ms=round(percentile([r.latency_s for r in ok], 50) * 1000, 1),
        latency_p99_ms=round(percentile([r.latency_s for r in ok], 99) * 1000, 1),
        server_peak_rss_mb=round(rss.peak / 2**20, 1),
        error_samples=sorted({r.error for r in results if r.error})[:3])


def load_test_export(folder: Path, levels: list[int], requests_per_client: int, max_tokens: int, time_limit_s: float,
                     options: ServingOptions, request_timeout: float) -> list[LevelResult]:
    label = f"{folder.parent.name}/{folder.name}"
    with tempfile.TemporaryDirectory(prefix="aira-opt-load-") as tmp:
        repo = Path(tmp) / "repository"
        name = write_repository(ExportFolder(folder), repo, "model", options, link=True).name
        http, grpc, metrics = free_ports(3)
        with TritonServer(repo, Ports(http, grpc, metrics), host="127.0.0.1", log_path=Path(tmp) / "server.log") as server:
            server.wait_ready(name, timeout_s=900)
            url = f"http://127.0.0.1:{http}/v2/models/{name}/generate_stream"
            warm = stream_request(url, QUESTIONS[0], max_tokens, request_timeout)  # first-run allocations
            if warm.error:
                raise SystemExit(f"{label}: warm-up request failed: {warm.error}")
            results = []
            for clients in levels:
                deadline = time.monotonic() + time_limit_s
                level = run_level(url, label, clients, requests_per_client, max_tokens, deadline, server.process.pid,
                                  request_timeout)
                results.append(level)
                print(f"  {label}: {clients:>2} clients  {level.tokens_per_s:7.2f} tok/s  TTFT p50 "
                      f"{level.ttft_p50_ms:.0f} ms  p99 {level.ttft_p99_ms:.0f} ms  errors {level.errors}  "
                      f"RSS {level.server_peak_rss_mb:.0f} MB", file=sys.stderr, flush=True)
    one = next((r.tokens_per_s for r in results if r.clients == 1), None)
    for r in results:
        r.speedup_vs_1 = round(r.tokens_per_s / one, 2) if one else None
    return results


def instruction_sets() -> str:
    """The vector extensions that decide which kernels ONNX Runtime picks on this CPU."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown instruction sets"
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile"]
    return " ".join(f for f in wanted if f in flags) or "no AVX2"


def markdown(results: list[LevelResult], command: str, machine: dict, max_tokens: int, goal_clients: int) -> str:
    lines = [f"Command: `{command}`", "",
             f"Machine: {machine.get('cpu', platform.processor())}, {machine.get('cores_logical', '?')} cores, "
             f"{machine.get('instruction_sets', '')}, copy bandwidth {machine.get('memory_bandwidth_gbps')} GB/s; "
             f"greedy, exactly {max_tokens} new tokens per request (ignore_eos), streaming, closed-loop clients.", "",
             "| export | clients | requests | errors | aggregate tokens/s | x one client | TTFT p50 ms | TTFT p99 ms "
             "| latency p50 ms | latency p99 ms | server peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.export} | {r.clients} | {r.requests} | {r.errors} | {r.tokens_per_s:.2f} | "
                     f"{r.speedup_vs_1 if r.speedup_vs_1 is not None else '-'} | {r.ttft_p50_ms:.0f} | "
                     f"{r.ttft_p99_ms:.0f} | {r.latency_p50_ms:.0f} | {r.latency_p99_ms:.0f} | "
                     f"{r.server_peak_rss_mb:.0f} |")
    lines.append("")
    for r in results:
        if r.clients == goal_clients and r.speedup_vs_1 is not None:
            verdict = "met" if r.speedup_vs_1 >= 3 and r.errors == 0 else "not met"
            lines.append(f"- Goal ({goal_clients} clients >= 3x one client's aggregate tokens/s, 0 errors) on "
                         f"{r.export}: {r.speedup_vs_1}x, {r.errors} errors: **{verdict}**")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", action="append", required=True, type=Path, help="export folder (repeatable)")
    parser.add_argument("--clients", default="1,4,8,16", help="concurrency levels")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per level before clients stop")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--queue-delay-us", type=int, default=ServingOptions.queue_delay_us)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    options = ServingOptions(max_batch_size=args.max_batch_size, queue_delay_us=args.queue_delay_us,
                             threads=args.threads)
    results: list[LevelResult] = []
    for folder in args.onnx:
        results += load_test_export(folder, levels, args.requests_per_client, args.max_tokens, args.time_limit,
                                    options, args.request_timeout)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    machine = {**machine_info(args.threads, probe_bandwidth_gbps()), "instruction_sets": instruction_sets()}
    text = markdown(results, command, machine, args.max_tokens, goal_clients=8)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"command": command, "machine": machine,
                                         "results": [asdict(r) for r in results]}, indent=2))


if __name__ == "__main__":
    main()
