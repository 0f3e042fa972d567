"""ONNX Runtime's thread pools, as one process has them. A session normally gets a pool of its own. Sessions that
take turns, a target and its draft model, share the process's one pool instead: two pools fight over the cores,
since each spins after its work while the other session runs. Once that shared pool exists, ONNX Runtime refuses
any session with a pool of its own, so from then on every session of the process is put on it (its size is the
first caller's)."""

from __future__ import annotations

import os
from typing import Any

_shared_pool: int | None = None  # the shared pool's size, once it exists


def make_shared_pool(threads: int | None) -> None:
    """Create the process's shared pool (once; later calls keep the first size)."""
    global _shared_pool
    if _shared_pool is None:
        from onnxruntime.capi import _pybind_state

        size = threads or os.cpu_count() or 1
        try:
            _pybind_state.set_global_thread_pool_sizes(size, 1)
        except Exception:  # noqa: BLE001 - onnxruntime's Fail: the pools exist already (made by another caller)
            pass
        _shared_pool = size


def session_threads(options: Any, threads: int | None = None, shared: bool = False) -> Any:
    """Set an onnxruntime.SessionOptions' threads: `threads` intra-op threads in a pool of its own, or the shared
    pool (asked for, or already made in this process). Returns the options."""
    if shared:
        make_shared_pool(threads)
    if _shared_pool is not None:
        options.use_per_session_threads = False
    elif threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return options
