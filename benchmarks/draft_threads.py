"""How a target and its draft share the CPU: decode tokens/s of our loop with a draft model under three thread
arrangements, each in a process of its own (ONNX Runtime's process-wide pool cannot be undone in a process):

- `own-pools`: target and draft each with a pool of `--threads` threads (ONNX Runtime's default);
- `draft-one-thread`: the draft on the calling thread alone (the Python API's default);
- `shared-pool`: both on the process-wide pool (the CLI's choice).

Beside them, the plain loop (no draft). Greedy, batch 1, the first `--prompts` grounded prompts of
benchmarks/prompts/speculative.json.

    python benchmarks/draft_threads.py --target export/smollm2-135m/fp32 --draft export/smollm2-135m/int4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = Path(__file__).parent / "prompts" / "speculative.json"
MODES = ("plain", "own-pools", "draft-one-thread", "shared-pool")


def measure(mode: str, target: str, draft: str, threads: int, prompts: int, new_tokens: int) -> dict:
    """One arrangement, in this process: decode tokens/s over the prompts (wall clock, first to last token)."""
    import aira_opt
    from aira_opt.generation.generator import generate
    from aira_opt.runtime.ort import OrtDecoder

    with aira_opt.load(target, threads=threads, draft=None if mode == "plain" else draft,
                       shared_threads=mode == "shared-pool") as model:
        if mode == "own-pools":  # replace the one-thread draft with one on a pool of its own
            model.draft.deactivate()
            model.draft = OrtDecoder(draft, threads=threads).activate()
        texts = json.loads(PROMPTS.read_text())["grounded"][:prompts]
        ids = [model.prompt_ids(t["prompt"]) for t in texts]
        options = model.options(greedy=True, max_new_tokens=new_tokens)
        tokens = seconds = 0.0
        for i, prompt in enumerate([ids[0], *ids]):  # the first run warms up
            times: list[float] = []
            generate(model.runner, [prompt], options, model.prompt_format.stop_ids, model.prompt_format.pad_id,
                     on_token=lambda row, t: times.append(time.perf_counter()), draft=model.draft)
            if i and len(times) > 1:
                tokens, seconds = tokens + len(times) - 1, seconds + times[-1] - times[0]
    return {"mode": mode, "decode_tokens_per_s": round(tokens / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--mode", choices=MODES, default=None, help="run one arrangement here (used internally)")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.target, args.draft, args.threads, args.prompts, args.new_tokens)))
        return
    rows = []
    for mode in MODES:
        done = subprocess.run([sys.executable, __file__, "--mode", mode, "--target", args.target, "--draft",
                               args.draft, "--threads", str(args.threads), "--prompts", str(args.prompts),
                               "--new-tokens", str(args.new_tokens)], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{mode:18s} {rows[-1]['decode_tokens_per_s']:8.2f} tok/s", flush=True)


if __name__ == "__main__":
    main()
