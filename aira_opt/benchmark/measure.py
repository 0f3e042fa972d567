"""`bench`: latency and memory of every inference path, measured the same way in one invocation.

Every backend runs greedy on the same token ids for a fixed number of new tokens (eos ignored), in its own
child process, one after another, so each peak RSS is that backend's own. Decode speed is also shown as a
percentage of the memory-bandwidth bound: (weight bytes read per decode step) / (bandwidth measured now).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import queue as queue_module
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from aira_opt.benchmark.machine import machine_info, peak_gpu_mb, peak_rss_mb, probe_bandwidth_gbps
from aira_opt.benchmark.backends import RUNNERS, Job
from aira_opt.core.processes import source_tree_env
from aira_opt.core.progress import bar


@dataclass(frozen=True)
class Setting:
    batch_size: int
    prompt_length: int
    new_tokens: int


@dataclass
class BenchResult:
    backend: str
    label: str
    precision: str
    batch_size: int
    prompt_length: int
    new_tokens: int
    ttft_ms: float
    ttft_ms_min: float
    ttft_ms_max: float
    decode_tokens_per_s: float  # all sequences of the batch together
    decode_tokens_per_s_min: float
    decode_tokens_per_s_max: float
    decode_ms_p50: float  # one decode step (the whole batch)
    decode_ms_p90: float
    decode_ms_p99: float
    e2e_tokens_per_s: float
    peak_rss_mb: float
    size_mb: float
    peak_gpu_mb: float | None
    weight_mb_per_step: float
    load_s: float
    pct_of_bound: float | None = None  # vs the bandwidth of the memory the weights live in (host or GPU)
    device: str = "cpu"
    repeats: int = 0
    decode_steps: int = 0  # timed decode steps per run: new_tokens - 1 (the first token comes from the prefill)
    kernels: str = ""  # which kernels ran, where the backend chose (an autotuned export, llama.cpp's build)
    source: str = ""  # the file or folder the row ran (an export, a GGUF, an IR folder) or the --model spec
    acceptance_rate: float | None = None  # our loop speculating: proposals accepted, over the timed runs
    tokens_per_step: float | None = None  # our loop speculating: tokens per step of the target


@dataclass
class BenchReport:
    machine: dict[str, Any]
    settings: dict[str, Any]
    results: list[BenchResult] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"machine": self.machine, "settings": self.settings,
                "results": [asdict(r) for r in self.results], "skipped": self.skipped}


# The child process ---------------------------------------------------------------------------------------
def measure(job: Job, settings: Sequence[Setting], warmup: int, repeats: int, threads: int | None,
            prompts: dict[str, list[list[int]]], eos: int, pad: int) -> dict[str, Any]:
    """Body of a child process: activate the backend's runner once, then time every setting."""
    start = time.perf_counter()
    positions = max(s.prompt_length + s.new_tokens for s in settings)
    runner = RUNNERS[job.backend](job, threads, eos, pad, positions)
    runner.activate()
    load_s = time.perf_counter() - start
    rows = []
    for setting in settings:
        ids = np.array(prompts[prompt_key(setting)], dtype=np.int64)  # [B, P]
        for _ in range(warmup):
            runner.infer(ids, setting.new_tokens)
        runner.speculation.clear()  # the timed runs' acceptance only
        ttfts, steps_all, rates = [], [], []
        for _ in range(repeats):
            ttft, steps = runner.infer(ids, setting.new_tokens)
            ttfts.append(ttft)
            steps_all.extend(steps)
            rates.append(setting.batch_size * len(steps) / sum(steps) if steps else float("nan"))
        rows.append({"setting": asdict(setting), "ttft": ttfts, "steps": steps_all, "rates": rates,
                     "speculation": list(runner.speculation)})
    runner.deactivate()
    return {"rows": rows, "load_s": load_s, "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(),
            "device": runner.device, "size_bytes": runner.size_bytes, "weight_bytes": runner.weight_bytes,
            "kernels": runner.kernels}


def _error_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _child(queue: Any, *args: Any) -> None:
    try:
        queue.put(("ok", measure(*args)))
    except BaseException as exc:  # reported to the parent as a skipped row, not a crash of the whole bench
        queue.put(("error", _error_line(exc)))


def run_in_other_python(job: Job, *args: Any, timeout: float = 3600) -> tuple[str, Any]:
    """Run one job under another virtual environment's interpreter (optimum's, which pins transformers 4.57):
    the same aira_opt source, the job and its inputs as JSON on stdin, the measurement as JSON on stdout."""
    request = json.dumps({"job": asdict(job), "args": args})
    try:
        done = subprocess.run([job.python, "-m", "aira_opt.benchmark.measure"], input=request, capture_output=True,
                              text=True, env=source_tree_env(), timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "error", f"{type(exc).__name__}: {exc}"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return "error", f"{job.python}: {last}"
    status, payload = json.loads(lines[-1])  # ["ok", measurement] or ["error", line]
    return status, payload


def child_main() -> None:
    """`python -m aira_opt.benchmark.measure`: the other side of run_in_other_python."""
    request = json.loads(sys.stdin.read())
    job = Job(**request["job"])
    settings, warmup, repeats, threads, prompts, eos, pad = request["args"]
    try:
        reply = ["ok", measure(job, [Setting(**s) for s in settings], warmup, repeats, threads, prompts, eos, pad)]
    except Exception as exc:  # noqa: BLE001 - reported as a skipped row, like a failing spawn child
        reply = ["error", _error_line(exc)]
    print(json.dumps(reply))


def run_in_child(*args: Any, timeout: float = 3600) -> tuple[str, Any]:
    """Run one job in a fresh process; a child that dies without reporting is an error at once, not a hang."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child, args=(results, *args))
    proc.start()
    deadline = time.monotonic() + timeout
    status, payload = "error", f"no result within {timeout:.0f}s"
    try:
        while time.monotonic() < deadline:
            try:
                status, payload = results.get(timeout=1.0)
                break
            except queue_module.Empty:
                if not proc.is_alive():
                    try:  # it may have reported just before exiting
                        status, payload = results.get(timeout=1.0)
                    except queue_module.Empty:
                        status, payload = "error", f"child exited with code {proc.exitcode} without a result"
                    break
        proc.join(timeout=30)
    finally:  # also on Ctrl-C or SIGTERM in the parent: no benchmark child outlives bench
        if proc.is_alive():
            proc.kill()
    return status, payload


# Summaries ----------------------------------------------------------------------------------------------
def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")


def summarize(job: Job, payload: dict[str, Any], bandwidth_gbps: float,
              gpu_bandwidth_gbps: float | None = None) -> list[BenchResult]:
    device = payload.get("device", "cpu")
    if device == "cuda":
        bandwidth_gbps = gpu_bandwidth_gbps or float("nan")
    results = []
    for row in payload["rows"]:
        spec = row.get("speculation") or []
        proposed = sum(r["proposed"] for r in spec)
        acceptance = round(sum(r["accepted"] for r in spec) / proposed, 4) if proposed else None
        tokens_per_step = round(float(np.mean([r["tokens_per_step"] for r in spec])), 3) if spec else None
        s = Setting(**row["setting"])
        ttft = row["ttft"]
        steps = row["steps"]
        rates = row["rates"]
        rate = statistics.median(rates)
        per_step_s = statistics.median(steps) if steps else float("nan")
        total_time = statistics.median(ttft) + (s.new_tokens - 1) * per_step_s
        bound_steps = bandwidth_gbps * 1e9 / payload["weight_bytes"] if payload["weight_bytes"] else None
        results.append(BenchResult(
            backend=job.backend, label=job.label, precision=job.precision, batch_size=s.batch_size,
            prompt_length=s.prompt_length, new_tokens=s.new_tokens, ttft_ms=statistics.median(ttft) * 1000,
            ttft_ms_min=min(ttft) * 1000, ttft_ms_max=max(ttft) * 1000, decode_tokens_per_s=rate,
            decode_tokens_per_s_min=min(rates), decode_tokens_per_s_max=max(rates),
            decode_ms_p50=percentile_ms(steps, 50), decode_ms_p90=percentile_ms(steps, 90),
            decode_ms_p99=percentile_ms(steps, 99), e2e_tokens_per_s=s.batch_size * s.new_tokens / total_time,
            peak_rss_mb=payload["peak_rss_mb"], size_mb=payload["size_bytes"] / 1e6,
            peak_gpu_mb=payload.get("peak_gpu_mb"),
            weight_mb_per_step=payload["weight_bytes"] / 1e6, load_s=payload["load_s"],
            pct_of_bound=(100 * (rate / s.batch_size) / bound_steps) if bound_steps and bound_steps == bound_steps
            else None,
            repeats=len(ttft), decode_steps=len(steps) // max(len(ttft), 1), device=device,
            kernels=payload.get("kernels", ""), acceptance_rate=acceptance, tokens_per_step=tokens_per_step,
            source=job.folder or job.model_spec,
        ))
    return results


def prompt_key(setting: Setting) -> str:
    return f"{setting.batch_size}x{setting.prompt_length}"


def make_prompts(settings: Sequence[Setting], token_ids: np.ndarray, seed: int = 0) -> dict[str, list[list[int]]]:
    """Seeded random ids drawn from `token_ids` (the tokenizer's ordinary ids) per (batch, length): every backend
    gets exactly the same ones."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in settings:
        if prompt_key(s) not in out:
            out[prompt_key(s)] = rng.choice(token_ids, size=(s.batch_size, s.prompt_length)).tolist()
    return out


def run_bench(jobs: Sequence[Job], settings: Sequence[Setting], warmup: int, repeats: int, threads: int | None,
              token_ids: np.ndarray, eos: int, pad: int, skipped: list[dict[str, str]] | None = None,
              progress: Callable[[str], None] | None = None) -> BenchReport:
    bandwidth = probe_bandwidth_gbps()
    report = BenchReport(machine=machine_info(threads, bandwidth), settings={
        "settings": [asdict(s) for s in settings], "warmup": warmup, "repeats": repeats, "greedy": True,
        "eos_ignored": True, "prompts": "seeded random token ids, identical for every backend"},
        skipped=list(skipped or []))
    prompts = make_prompts(settings, token_ids)
    for job in bar(jobs, "bench backends"):
        if progress:
            progress(f"{job.label}: {len(settings)} setting(s) x ({warmup} warm-up + {repeats} timed)")
        if job.python:
            status, payload = run_in_other_python(job, [asdict(s) for s in settings], warmup, repeats, threads,
                                                  prompts, int(eos), int(pad))
        else:
            status, payload = run_in_child(job, settings, warmup, repeats, threads, prompts, eos, pad)
        if status != "ok":
            report.skipped.append({"backend": job.label, "reason": payload})
            continue
        report.results.extend(summarize(job, payload, bandwidth, report.machine.get("gpu_memory_bandwidth_gbps")))
    return report


if __name__ == "__main__":
    child_main()
