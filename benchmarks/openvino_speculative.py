"""OpenVINO GenAI's speculative decoding as a peer of benchmarks/speculative.py: `LLMPipeline` plain, with prompt
lookup (`prompt_lookup=True`, `num_assistant_tokens`, `max_ngram_size`) and with a draft model (`draft_model`), on the
same prompt ids, greedy, batch 1, timed by the wall clock as each token reaches a streamer.

Runs in an environment of its own (openvino-genai and optimum-intel move torch and transformers): make the IR
folders with optimum-intel, write the prompt ids with our tokenizer, then run this under that environment's python.

    optimum-cli export openvino --model CKPT --task text-generation-with-past --weight-format fp32 OV/fp32
    optimum-cli export openvino --model CKPT --task text-generation-with-past --weight-format int4 --group-size 32 \\
        --sym OV/int4
    python benchmarks/openvino_speculative.py --write-ids --target export/smollm2-135m/fp32 --ids ids.json
    OVENV/bin/python benchmarks/openvino_speculative.py --ids ids.json --ov-target OV/fp32 --ov-draft OV/int4 \\
        --out benchmarks/results/DATE-speculative-openvino.json

OpenVINO GenAI caches prompt prefixes: every prompt of a set differs, and the warm-up uses ids of its own.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROMPTS = Path(__file__).parent / "prompts" / "speculative.json"


def write_ids(target: str, out: Path) -> None:
    """Our prompt ids (the export's prompt format and tokenizer) and stop ids, for the other environment."""
    import aira_opt

    folder = aira_opt.ExportFolder(target)
    from aira_opt.source.prompts import prompt_ids

    sets = json.loads(PROMPTS.read_text())
    ids = {name: [prompt_ids(folder.tokenizer, p["prompt"], folder.prompt_format) for p in sets[name]]
           for name in ("grounded", "open")}
    out.write_text(json.dumps({"ids": ids, "stop_ids": list(folder.prompt_format.stop_ids)}))


def run(args: argparse.Namespace) -> None:
    import numpy as np
    import openvino as ov
    import openvino_genai as genai

    data = json.loads(Path(args.ids).read_text())
    threads = {"INFERENCE_NUM_THREADS": args.threads}
    if args.precision_hint:  # the CPU plugin computes in bf16 where the CPU has it, unless told f32
        threads["INFERENCE_PRECISION_HINT"] = args.precision_hint

    class Timing(genai.StreamerBase):
        def __init__(self):
            super().__init__()
            self.times: list[float] = []

        def write(self, token):  # one call per token, or a list of tokens after a verify step
            count = len(token) if isinstance(token, list) else 1
            self.times.extend([time.perf_counter()] * count)
            return genai.StreamingStatus.RUNNING

        def end(self):
            pass

    pipelines = {
        "openvino fp32": (genai.LLMPipeline(args.ov_target, "CPU", **threads), {}),
        "openvino fp32 + prompt lookup": (genai.LLMPipeline(args.ov_target, "CPU", prompt_lookup=True, **threads),
                                          {"num_assistant_tokens": args.k_ngram, "max_ngram_size": 3}),
        "openvino fp32 + draft int4": (genai.LLMPipeline(args.ov_target, "CPU", **threads,
                                                         draft_model=genai.draft_model(args.ov_draft, "CPU",
                                                                                       **threads)),
                                       {"num_assistant_tokens": args.k_draft}),
    }
    results = []
    outputs: dict[tuple[str, str], list[list[int]]] = {}
    for name in ("grounded", "open"):
        for label, (pipe, extra) in pipelines.items():
            def generate(ids: list[int], new: int) -> tuple[list[int], list[float]]:
                config = genai.GenerationConfig(max_new_tokens=new, do_sample=False,
                                                stop_token_ids=set(data["stop_ids"]), **extra)
                tensor = ov.Tensor(np.array([ids], dtype=np.int64))
                mask = ov.Tensor(np.ones((1, len(ids)), dtype=np.int64))
                streamer = Timing()
                start = time.perf_counter()
                out = pipe.generate(genai.TokenizedInputs(tensor, mask), config, streamer)
                return list(out.tokens[0]), [start, *streamer.times]

            generate(list(range(100, 140)), 8)  # warm-up on ids of its own (the prefix cache)
            timed = [generate(ids, args.max_new_tokens) for ids in data["ids"][name]]
            outputs[(name, label)] = [t for t, _ in timed]
            tokens = sum(len(t) - 1 for t, times in timed if len(times) > 2)
            seconds = sum(times[-1] - times[1] for t, times in timed if len(times) > 2)
            plain = outputs[(name, "openvino fp32")]
            results.append({"set": name, "label": label, "decode_tokens_per_s": round(tokens / seconds, 3),
                            "ttft_ms": round(float(np.median([times[1] - times[0] for _, times in timed])) * 1000, 1),
                            "identical": sum(a == b for a, b in zip(outputs[(name, label)], plain)),
                            "prompts": len(timed)})
            base = next(r for r in results if r["set"] == name and r["label"] == "openvino fp32")
            results[-1]["speedup"] = round(results[-1]["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
            print(f"{name:8s} {label:32s} {results[-1]['decode_tokens_per_s']:8.2f} tok/s  "
                  f"x{results[-1]['speedup']:.2f}  identical {results[-1]['identical']}/{len(timed)}", flush=True)
    report = {"openvino_genai": genai.__version__, "settings": vars(args), "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-ids", action="store_true", help="write the prompt ids (run in our environment)")
    parser.add_argument("--target", help="our export whose tokenizer and prompt format make the ids")
    parser.add_argument("--ids", required=True)
    parser.add_argument("--ov-target")
    parser.add_argument("--ov-draft")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--k-ngram", type=int, default=6)
    parser.add_argument("--k-draft", type=int, default=4)
    parser.add_argument("--precision-hint", default=None, help="f32: compute in fp32 (default: the plugin's choice)")
    parser.add_argument("--out", default="openvino-speculative.json")
    args = parser.parse_args()
    if args.write_ids:
        write_ids(args.target, Path(args.ids))
    else:
        run(args)


if __name__ == "__main__":
    main()
