"""`bench`: latency and memory of every inference path, measured the same way in one invocation.

Every backend runs greedy on the same token ids for a fixed number of new tokens (eos ignored), in its own
child process, one after another, so each peak RSS is that backend's own. Decode speed is also shown as a
percentage of the memory-bandwidth bound: (weight bytes read per decode step) / (bandwidth measured now).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = ("torch", "ort", "optimum", "genai", "trt")


@dataclass(frozen=True)
class Setting:
    batch_size: int
    prompt_length: int
    new_tokens: int


@dataclass(frozen=True)
class Job:
    """One backend on one model, run for every setting in its own process."""

    backend: str
    label: str  # what the table shows, e.g. "ort int4"
    precision: str
    target: str  # model spec (torch), export folder (ort/optimum), genai folder, engine path
    model_spec: str = ""
    num_layers: int | None = None
    provider: str = "cpu"  # ONNX Runtime provider for the ort and optimum backends


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


@dataclass
class BenchReport:
    machine: dict[str, Any]
    settings: dict[str, Any]
    results: list[BenchResult] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"machine": self.machine, "settings": self.settings,
                "results": [asdict(r) for r in self.results], "skipped": self.skipped}


# The machine and its memory bandwidth -------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_bandwidth_gbps(megabytes: int = 512, repeats: int = 3) -> float:
    """Best-of-N numpy copy of a large array, counting bytes read + written (GB/s, 1e9 bytes)."""
    src = np.ones(megabytes * (1 << 20) // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def probe_gpu_bandwidth_gbps(megabytes: int = 1024, repeats: int = 5) -> float | None:
    """Best-of-N device-to-device copy on GPU 0 through PyTorch, bytes read + written (None without CUDA)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    src = torch.empty(megabytes * (1 << 20), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * megabytes * (1 << 20) / best / 1e9


def machine_info(threads: int | None, bandwidth_gbps: float) -> dict[str, Any]:
    import psutil

    from aira_opt.artifacts import library_versions

    info = {
        "cpu": cpu_model(), "cores_logical": os.cpu_count(), "cores_physical": psutil.cpu_count(logical=False),
        "threads": threads or os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "platform": platform.platform(), "memory_bandwidth_gbps": round(bandwidth_gbps, 2),
        "versions": library_versions(), "gpu": None,
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    gpu_bandwidth = probe_gpu_bandwidth_gbps() if info["gpu"] else None
    info["gpu_memory_bandwidth_gbps"] = round(gpu_bandwidth, 1) if gpu_bandwidth else None
    return info


# Weight bytes read per decode step --------------------------------------------------------------------
def onnx_weight_bytes(folder: Path) -> tuple[int, int]:
    """(bytes on disk of the ONNX files, weight bytes read per decode step).

    Per step every weight is read once for the whole batch, except lookup tables (the embedding): tensors only
    ever read as a Gather's table, one row per token. Found by use, not by name, so other builders' graphs
    (onnxruntime-genai's) are measured the same way.
    """
    import onnx

    from aira_opt.artifacts import folder_size_bytes

    model = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False)
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    other_uses = {i for n in model.graph.node for k, i in enumerate(n.input) if n.op_type != "Gather" or k > 0}
    read_per_step = 0
    for init in model.graph.initializer:
        if init.name in tables and init.name not in other_uses:
            continue
        n = int(np.prod(init.dims)) if init.dims else 1
        read_per_step += n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return folder_size_bytes(Path(folder)), read_per_step


# Child-process runners ----------------------------------------------------------------------------------
def _timing_streamer(cuda: bool = False):
    from transformers.generation.streamers import BaseStreamer

    class TimingStreamer(BaseStreamer):
        """Timestamps each put(): the first is the prompt, then one per generated step. On CUDA it waits for
        the GPU first, so a timestamp means the token really exists."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            if cuda:
                import torch

                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

        def end(self):
            pass

    return TimingStreamer()


def _hf_generate_timings(model: Any, ids: np.ndarray, new_tokens: int, pad_id: int,
                         device: str = "cpu") -> tuple[float, list[float]]:
    import torch

    x = torch.from_numpy(ids).to(device)
    streamer = _timing_streamer(cuda=device == "cuda")
    with torch.inference_mode():
        model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, repetition_penalty=1.0, pad_token_id=pad_id, streamer=streamer,
                       temperature=None, top_k=None, top_p=None)
    t = streamer.times
    return t[1] - t[0], list(np.diff(t[1:]))


def peak_rss_mb() -> float:
    """This process's own peak resident memory. VmHWM belongs to the current address space; ru_maxrss on Linux
    keeps the parent's high-water mark across fork + exec, which would charge the parent's memory to a child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float | None:
    """Peak GPU memory PyTorch's allocator handed out in this process (None without CUDA in use)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def genai_threads(threads: int | None) -> dict[str, int]:
    """onnxruntime-genai session options: bench's --threads (all cores when not given), one inter-op thread."""
    return {"intra_op_num_threads": threads or os.cpu_count() or 1, "inter_op_num_threads": 1}


def _run_job(job: Job, settings: Sequence[Setting], warmup: int, repeats: int, threads: int | None,
             prompts: dict[str, list[list[int]]], eos: int, pad: int) -> dict[str, Any]:
    """Body of a child process: load the backend once, then time every setting."""
    start = time.perf_counter()
    size_bytes = weight_bytes = 0
    device = "cpu" if job.provider == "cpu" else "cuda"  # where the weights live; torch and trt decide below
    if job.backend == "torch":
        import torch

        from aira_opt.specs import load_model

        if threads:
            torch.set_num_threads(threads)
        loaded = load_model(job.model_spec, num_layers=job.num_layers)
        model = loaded.model
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":  # the GPU baseline is fp16, as users run it there
            model = model.half().to(device)
        params = list(model.parameters())
        size_bytes = sum(p.numel() * p.element_size() for p in params)
        emb = model.get_input_embeddings().weight
        weight_bytes = size_bytes - emb.numel() * emb.element_size()

        def run(ids: np.ndarray, n: int) -> tuple[float, list[float]]:
            return _hf_generate_timings(model, ids, n, pad, device)
    elif job.backend == "optimum":
        from optimum.onnxruntime import ORTModelForCausalLM

        from aira_opt.runtime import PROVIDERS, session_options

        size_bytes, weight_bytes = onnx_weight_bytes(Path(job.target))
        model = ORTModelForCausalLM.from_pretrained(job.target, use_cache=True, use_io_binding=device == "cuda",
                                                    provider=PROVIDERS[job.provider][0],
                                                    session_options=session_options(threads))

        def run(ids: np.ndarray, n: int) -> tuple[float, list[float]]:
            return _hf_generate_timings(model, ids, n, pad, device)
    elif job.backend in ("ort", "trt"):
        from aira_opt.generation import GenerateOptions, generate
        from aira_opt.runtime import OrtDecoder
        from aira_opt.sampling import SamplingSettings

        if job.backend == "ort":
            size_bytes, weight_bytes = onnx_weight_bytes(Path(job.target))
            decoder: Any = OrtDecoder(Path(job.target), provider=job.provider, threads=threads).activate()
        else:
            from aira_opt.engines import PLAN_FILE, TrtDecoder

            size_bytes = weight_bytes = (Path(job.target) / PLAN_FILE).stat().st_size
            decoder = TrtDecoder(Path(job.target)).activate()
            device = "cuda"

        def run(ids: np.ndarray, n: int) -> tuple[float, list[float]]:
            opts = GenerateOptions(max_new_tokens=n, ignore_eos=True,
                                   sampling=SamplingSettings(do_sample=False, repetition_penalty=1.0))
            result = generate(decoder, [list(r) for r in ids], opts, eos, pad)
            return result.prefill_seconds, result.decode_seconds
    elif job.backend == "genai":
        import onnxruntime_genai as og

        size_bytes, weight_bytes = onnx_weight_bytes(Path(job.target))
        config = og.Config(job.target)
        # The same thread settings as every other backend: left to its folder's defaults, onnxruntime-genai ran
        # with half the speed here (int4: 14.2 vs 26.2 tokens/s with 2 threads set), an unfair comparison.
        config.overlay(json.dumps({"model": {"decoder": {"session_options": genai_threads(threads)}}}))
        model = og.Model(config)

        def run(ids: np.ndarray, n: int) -> tuple[float, list[float]]:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=ids.shape[1] + n, min_length=ids.shape[1] + n, do_sample=False,
                                      batch_size=ids.shape[0])
            gen = og.Generator(model, params)
            t0 = time.perf_counter()
            gen.append_tokens(ids.astype(np.int32))
            t1 = time.perf_counter()
            steps = []
            while not gen.is_done() and len(steps) < n - 1:
                s = time.perf_counter()
                gen.generate_next_token()
                steps.append(time.perf_counter() - s)
            return t1 - t0, steps
    else:
        raise ValueError(f"backend {job.backend} cannot run here")
    load_s = time.perf_counter() - start

    rows = []
    for setting in settings:
        ids = np.array(prompts[f"{setting.batch_size}x{setting.prompt_length}"], dtype=np.int64)
        for _ in range(warmup):
            run(ids, setting.new_tokens)
        ttfts, steps_all, rates = [], [], []
        for _ in range(repeats):
            ttft, steps = run(ids, setting.new_tokens)
            ttfts.append(ttft)
            steps_all.extend(steps)
            rates.append(setting.batch_size * len(steps) / sum(steps) if steps else float("nan"))
        rows.append({"setting": asdict(setting), "ttft": ttfts, "steps": steps_all, "rates": rates})
    return {"rows": rows, "load_s": load_s, "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(),
            "device": device, "size_bytes": size_bytes,
            "weight_bytes": weight_bytes}


def _child(queue: Any, *args: Any) -> None:
    try:
        queue.put(("ok", _run_job(*args)))
    except BaseException as exc:  # reported to the parent as a skipped row, not a crash of the whole bench
        queue.put(("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))


def run_in_child(*args: Any, timeout: float = 3600) -> tuple[str, Any]:
    """Run one job in a fresh process; a child that dies without reporting is an error at once, not a hang."""
    import queue as queue_module

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child, args=(results, *args))
    proc.start()
    deadline = time.monotonic() + timeout
    status, payload = "error", f"no result within {timeout:.0f}s"
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
        ))
    return results


def make_prompts(settings: Sequence[Setting], vocab: int, seed: int = 0) -> dict[str, list[list[int]]]:
    """Seeded random token ids per (batch, length): every backend gets exactly the same ones."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in settings:
        key = f"{s.batch_size}x{s.prompt_length}"
        if key not in out:
            out[key] = rng.integers(5, vocab, size=(s.batch_size, s.prompt_length)).tolist()
    return out


def run_bench(jobs: Sequence[Job], settings: Sequence[Setting], warmup: int, repeats: int, threads: int | None,
              vocab: int, eos: int, pad: int, skipped: list[dict[str, str]] | None = None,
              progress: Callable[[str], None] | None = None) -> BenchReport:
    from aira_opt.progress import bar

    bandwidth = probe_bandwidth_gbps()
    report = BenchReport(machine=machine_info(threads, bandwidth), settings={
        "settings": [asdict(s) for s in settings], "warmup": warmup, "repeats": repeats, "greedy": True,
        "eos_ignored": True, "prompts": "seeded random token ids, identical for every backend"},
        skipped=list(skipped or []))
    prompts = make_prompts(settings, vocab)
    for job in bar(jobs, "bench backends"):
        if progress:
            progress(f"{job.label}: {len(settings)} setting(s) x ({warmup} warm-up + {repeats} timed)")
        status, payload = run_in_child(job, settings, warmup, repeats, threads, prompts, eos, pad)
        if status != "ok":
            report.skipped.append({"backend": job.label, "reason": payload})
            continue
        report.results.extend(summarize(job, payload, bandwidth, report.machine.get("gpu_memory_bandwidth_gbps")))
    return report


# Output -------------------------------------------------------------------------------------------------
HEADERS = ["backend", "B", "prompt", "new", "TTFT ms", "x torch", "decode tok/s", "x torch", "% of bound",
           "p50 ms", "p90 ms", "p99 ms", "peak RSS MB", "size MB"]


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
            r.decode_ms_p50, r.decode_ms_p90, r.decode_ms_p99, r.peak_rss_mb, r.size_mb,
        ])
    return rows


def render_text(report: BenchReport) -> str:
    from aira_opt.tables import text_table

    m = report.machine
    head = (f"{m['cpu']} | {m['threads']} threads | {m['memory_gb']} GB | memory bandwidth "
            f"{m['memory_bandwidth_gbps']} GB/s (copy, read+write)"
            + (f" | GPU {m['gpu']}, {m.get('gpu_memory_bandwidth_gbps')} GB/s copy" if m["gpu"] else ""))
    lines = [head, text_table(HEADERS, table_rows(report))]
    lines += [f"skipped {s['backend']}: {s['reason']}" for s in report.skipped]
    lines.append("x torch: TTFT is torch's / this (higher is faster); decode is this / torch's. "
                 "% of bound: decode steps/s over bandwidth / weight bytes per step.")
    return "\n".join(lines)


def render_markdown(report: BenchReport, command: str = "") -> str:
    from aira_opt.tables import markdown_table

    m = report.machine
    out = [f"Machine: {m['cpu']}, {m['threads']} threads, {m['memory_gb']} GB, measured copy bandwidth "
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


def write_outputs(report: BenchReport, json_path: Path | None, markdown_path: Path | None, plot_path: Path | None,
                  command: str = "") -> None:
    if json_path:
        json_path.write_text(json.dumps({**report.to_json(), "command": command}, indent=2) + "\n")
    if markdown_path:
        markdown_path.write_text(render_markdown(report, command))
    if plot_path:
        render_plot(report, plot_path)
