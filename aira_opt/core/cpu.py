"""The CPU this process runs on: its name, the instruction sets that decide which kernels are fastest, and its
last-level cache (a timing probe must not fit in it)."""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path

# The x86 features ONNX Runtime's and llama.cpp's CPU kernels dispatch on.
KERNEL_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                   "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "sve")
INT8_DOT_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")  # a u8 x s8 dot without 16-bit saturation


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@cache
def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@cache
def instruction_sets() -> tuple[str, ...]:
    """The kernel-relevant features this CPU reports, in KERNEL_FEATURES' order."""
    flags: set[str] = set()
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    return tuple(f for f in KERNEL_FEATURES if f in flags)


def has_int8_dot() -> bool:
    """Whether int8 GEMMs get a saturation-free u8 x s8 dot product (VNNI, AMX, Arm dotprod). Without one, x86
    int8 kernels pair products into 16 bits (vpmaddubsw), so int8 weights must stay within 7 bits."""
    return any(f in instruction_sets() for f in INT8_DOT_FEATURES)


def last_level_cache_bytes() -> int:
    """The largest cache CPU 0 reports (0 when unknown)."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes, default=0)


def machine_key(threads: int | None = None) -> str:
    """What kernel timings depend on: CPU model, instruction sets, threads."""
    return f"{cpu_model()} [{' '.join(instruction_sets()) or 'baseline'}] x{threads or os.cpu_count()}"
