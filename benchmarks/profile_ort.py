"""Where the time of one prefill or one decode step goes: ONNX Runtime's profiler, summed by op type.

    python benchmarks/profile_ort.py export/aira-2-1b1-random/fp32 [more folders] [--phase prefill|decode]
        [--threads 2] [--tokens 64]

prefill: one forward over `--tokens` prompt tokens (empty cache). decode: one token after a `--tokens`-long
cache, averaged over 10 profiled steps. Also counts the nodes each run executes (dispatch cost per step).
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

from aira_opt.core.contract import ORT_KV_DTYPES, DecoderContract
from aira_opt.runtime.providers import session_options

WARMUP, RUNS = 3, 10


def feeds_for(session: ort.InferenceSession, contract: DecoderContract, phase: str, tokens: int) -> dict:
    kv_dtype = ORT_KV_DTYPES[session.get_inputs()[3].type]
    rng = np.random.default_rng(0)
    if phase == "prefill":
        ids = rng.integers(5, 500, (1, tokens))                                   # input_ids: [1, T]
        past = np.zeros((1, contract.num_kv_heads, 0, contract.head_dim), kv_dtype)  # [1, kv, 0, D]
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(tokens)[None],
                **{n: past for n in contract.past_names()}}
    past = rng.standard_normal((1, contract.num_kv_heads, tokens, contract.head_dim)).astype(kv_dtype)
    return {"input_ids": np.array([[7]]), "attention_mask": np.ones((1, tokens + 1), np.int64),
            "position_ids": np.array([[tokens]]), **{n: past for n in contract.past_names()}}


def profile(folder: Path, phase: str, threads: int, tokens: int) -> str:
    opts = session_options(threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = f"/tmp/aira-opt-{phase}"
    session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    contract = DecoderContract.from_config_dict(json.loads((folder / "config.json").read_text()))
    feeds = feeds_for(session, contract, phase, tokens)
    runs = 1 if phase == "prefill" else RUNS
    for _ in range(WARMUP if phase == "decode" else 1):
        session.run(None, feeds)
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feeds)
    elapsed = (time.perf_counter() - start) / runs
    events = json.load(open(path := session.end_profiling()))
    os.remove(path)
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    total_runs = runs + (WARMUP if phase == "decode" else 1)
    per_run = len(kernels) // total_runs
    by_op: dict[str, float] = defaultdict(float)
    for event in kernels[-per_run * runs:]:  # the timed runs
        by_op[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    total = sum(by_op.values())
    top = ", ".join(f"{op} {ms:.1f} ms ({100 * ms / total:.0f}%)" for op, ms in sorted(by_op.items(), key=lambda x: -x[1])[:6])
    what = f"prefill of {tokens} tokens" if phase == "prefill" else f"decode step after {tokens} tokens"
    return f"{folder}: {what} {elapsed * 1000:.1f} ms (profiled), {per_run} nodes, kernels {total:.1f} ms: {top}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--phase", choices=["prefill", "decode"], default="prefill")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    for folder in args.folders:
        print(profile(folder, args.phase, args.threads, args.tokens))
