"""A/B/A/B: the preallocated in-place KV cache vs the growing (Concat) cache, same fused graph, our loop.

    python benchmarks/kv_cache_ab.py export/aira-2-1b1-random/int4 [--prompt 1024] [--new 64] [--threads 2]

Both arms run the same GroupQueryAttention graph; only the cache handling differs (OrtDecoder.in_place_cache).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from aira_opt.generation.generator import GenerateOptions, generate
from aira_opt.runtime.ort import OrtDecoder
from aira_opt.generation.sampling import GREEDY


def run(decoder: OrtDecoder, prompt: list[int], new: int, in_place: bool) -> tuple[float, float]:
    decoder.in_place_cache = in_place
    options = GenerateOptions(max_new_tokens=new, sampling=GREEDY,
                              ignore_eos=True)
    result = generate(decoder, [prompt], options, eos_id=-1, pad_id=0)
    return result.ttft_ms, result.decode_tokens_per_s


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    prompt = np.random.default_rng(0).integers(5, 500, args.prompt).tolist()
    with OrtDecoder(args.folder, threads=args.threads) as decoder:
        if not decoder.in_place_cache:
            raise SystemExit(f"{args.folder} is not a fused export; the in-place cache needs one")
        run(decoder, prompt, 4, True)  # warm-up
        print(f"{args.folder}: prompt {args.prompt}, {args.new} new tokens, {args.threads} threads")
        for arm in ("growing", "in-place", "growing", "in-place"):
            ttft, tps = run(decoder, prompt, args.new, arm == "in-place")
            print(f"  {arm:9s} TTFT {ttft:7.1f} ms  decode {tps:6.2f} tok/s")
