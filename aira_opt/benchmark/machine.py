"""The machine a benchmark ran on: CPU, memory, the bandwidth measured now, and this process's peak memory."""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from aira_opt.core.artifacts import library_versions
from aira_opt.core.cpu import cpu_model, instruction_sets


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

    info = {
        "cpu": cpu_model(), "instruction_sets": list(instruction_sets()), "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
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
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20
