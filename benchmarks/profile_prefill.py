"""Where prefill time goes: ONNX Runtime's profiler over one 64-token prefill, summed by op type.

    python benchmarks/profile_prefill.py export/aira-2-1b1-random/fp32 [more folders] [--threads 2] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from aira_opt.contract import DecoderContract
from aira_opt.runtime import ORT_DTYPES, session_options


def profile(folder: Path, threads: int, tokens: int) -> str:
    opts = session_options(threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = "/tmp/aira-opt-prefill"
    session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    contract = DecoderContract.from_config_dict(json.loads((folder / "config.json").read_text()))
    ids = np.random.default_rng(0).integers(5, 500, (1, tokens))  # input_ids: [1, T]
    kv_dtype = ORT_DTYPES[session.get_inputs()[3].type]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(tokens)[None],
             **{n: np.zeros((1, contract.num_kv_heads, 0, contract.head_dim), kv_dtype) for n in contract.past_names()}}
    session.run(None, feeds)  # warm-up
    start = time.perf_counter()
    session.run(None, feeds)
    elapsed = time.perf_counter() - start
    events = json.load(open(path := session.end_profiling()))
    os.remove(path)
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    by_op: dict[str, float] = defaultdict(float)
    for event in kernels[len(kernels) // 2:]:  # the timed run
        by_op[event["args"]["op_name"]] += event["dur"] / 1000
    total = sum(by_op.values())
    top = ", ".join(f"{op} {ms:.0f} ms ({100 * ms / total:.0f}%)" for op, ms in sorted(by_op.items(), key=lambda x: -x[1])[:6])
    return f"{folder}: prefill of {tokens} tokens {elapsed * 1000:.0f} ms, kernels {total:.0f} ms: {top}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    for folder in args.folders:
        print(profile(folder, args.threads, args.tokens))
