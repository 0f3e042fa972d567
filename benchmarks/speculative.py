"""Speculative decoding side by side: our loop (plain, prompt lookup, a draft export) against transformers' generate
(plain, prompt lookup) and llama.cpp (plain, its prompt-lookup draft class, a Q4_0 GGUF as the draft), on the
same prompt ids from benchmarks/prompts/speculative.json, greedy, batch 1, one process, one run.

Every backend is timed the same way, by the wall clock as its tokens arrive: decode tokens/s is (tokens - 1) /
(last token's time - first token's time), summed over the prompts of a set. `identical` counts the prompts whose
output equals the same backend's plain greedy output. A K sweep (fixed K, no adapting) shows the speedup against
K; `--cost-model DIR...` times a verify step of width K + 1 against a plain step on other exports (Aira-2-1B1's
shape, where random weights accept nothing and only the cost means something).

    python benchmarks/speculative.py --target export/smollm2-135m/fp32 --draft export/smollm2-135m/int4 \\
        --gguf-dir /tmp/smol-gguf --source smollm2-135m --out benchmarks/results/DATE-speculative-smollm2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import aira_opt
from aira_opt.benchmark.machine import machine_info, probe_bandwidth_gbps
from aira_opt.core.contract import position_ids_from_mask
from aira_opt.core.tables import text_table
from aira_opt.generation.generator import generate
from aira_opt.generation.speculative import DEFAULT_TOKENS, DRAFT, NGRAM
from aira_opt.runtime.ort import OrtDecoder

PROMPTS = Path(__file__).parent / "prompts" / "speculative.json"
Timed = tuple[list[int], list[float]]  # tokens; the start, then the wall-clock time the tokens arrived


def rate(runs: list[Timed]) -> float:
    """Decode tokens/s: tokens after the first over the time from the first to the last."""
    tokens = sum(len(t) - 1 for t, _ in runs if len(t) > 1)
    seconds = sum(times[-1] - times[1] for t, times in runs if len(t) > 1)
    return tokens / seconds if seconds > 0 else float("nan")


def ttft_ms(runs: list[Timed]) -> float:
    """Median time to the first token (prompt processing: the draft's prefill included)."""
    return float(np.median([times[1] - times[0] for _, times in runs])) * 1000


# Ours ----------------------------------------------------------------------------------------------------
def ours(model: aira_opt.Model, speculative: str, k: int | None, adaptive: bool = True) -> Callable:
    from dataclasses import replace

    def run(ids: list[int], new: int) -> tuple[list[int], list[float], dict | None]:
        options = model.options(greedy=True, max_new_tokens=new, speculative=speculative,
                                num_speculative_tokens=k if speculative != "off" else None)
        if options.speculation is not None and not adaptive:
            options = replace(options, speculation=replace(options.speculation, adaptive=False))
        times: list[float] = [time.perf_counter()]
        result = generate(model.runner, [ids], options, model.prompt_format.stop_ids,
                                       model.prompt_format.pad_id, on_token=lambda row, t: times.append(
                                           time.perf_counter()), draft=model.draft)
        return result.tokens[0], times, result.speculation
    return run


# transformers -----------------------------------------------------------------------------------------------
def transformers_run(loaded, stop_ids: list[int], pad: int, lookup: int | None, assistant=None) -> Callable:
    import torch

    from aira_opt.runtime.pytorch import HF_GREEDY, _timing_streamer

    def run(ids: list[int], new: int) -> tuple[list[int], list[float], None]:
        start = time.perf_counter()
        x = torch.tensor([ids])
        streamer = _timing_streamer()
        extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
        extra |= {"assistant_model": assistant} if assistant is not None else {}
        with torch.inference_mode():
            out = loaded.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, eos_token_id=stop_ids,
                                        pad_token_id=pad, streamer=streamer, **HF_GREEDY, **extra)
        tokens = out[0, len(ids):].tolist()
        # one put() per step after the prompt's; a step may bring several tokens: the last arrival is what counts
        return tokens, [start, streamer.times[1], streamer.times[-1]], None
    return run


def dynamic_int8_copy(model):
    """transformers' draft (`assistant_model`): the same model with PyTorch's dynamic int8 Linear layers, the
    cheaper copy of a model that PyTorch itself offers (no smaller model shares SmolLM2's tokenizer here)."""
    import copy

    import torch

    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


# llama.cpp ----------------------------------------------------------------------------------------------------
def llama_run(path: Path, threads: int, stop_ids: list[int], draft: object | None) -> Callable:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_batch=512, n_threads=threads, verbose=False,
                          draft_model=draft)

    def run(ids: list[int], new: int) -> tuple[list[int], list[float], None]:
        llm.reset()
        tokens, times = [], [time.perf_counter()]
        for token in llm.generate(ids, temp=0.0, reset=True):
            tokens.append(int(token))
            times.append(time.perf_counter())
            if token in stop_ids or len(tokens) >= new:
                break
        return tokens, times, None
    return run


def gguf_draft(path: Path, threads: int, k: int) -> object:
    """llama.cpp's own model as the draft (llama-cpp-python takes a draft as a Python object proposing ids):
    a second Llama on a smaller GGUF, greedy, reusing its cache across calls by prefix."""
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaDraftModel

    class GgufDraft(LlamaDraftModel):
        def __init__(self):
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_batch=512, n_threads=threads,
                                       verbose=False)

        def __call__(self, input_ids, **kwargs):
            out = []
            for token in self.llm.generate(input_ids.tolist(), temp=0.0, reset=True):
                out.append(int(token))
                if len(out) >= k:
                    break
            return np.array(out, dtype=np.intc)

    return GgufDraft()


# The cost of a verify step ----------------------------------------------------------------------------------
def verify_cost(folder: Path, threads: int, widths: list[int], context: int = 128, repeats: int = 8) -> dict:
    """Median seconds of one step over `width` new positions after a `context`-token prefill, over a plain
    (width 1) step's."""
    seconds = {}
    with OrtDecoder(folder, threads=threads) as decoder:
        for width in widths:
            samples = []
            for _ in range(repeats + 1):
                cache = decoder.empty_cache(1, context + max(widths))
                mask = np.ones((1, context), np.int64)
                _, cache = decoder.step(np.full((1, context), 100), mask, position_ids_from_mask(mask, context), cache)
                mask = np.ones((1, context + width), np.int64)
                out, _ = decoder.step(np.full((1, width), 101), mask, position_ids_from_mask(mask, width), cache,
                                      all_logits=True)
                samples.append(out.seconds)
            seconds[width] = float(np.median(samples[1:]))
    return {"folder": str(folder), "ms": {w: round(s * 1000, 3) for w, s in seconds.items()},
            "ratio": {w: round(s / seconds[1], 3) for w, s in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, required=True, help="our fp32 export")
    parser.add_argument("--draft", type=Path, required=True, help="our int4 export (the draft, and an int4 target)")
    parser.add_argument("--target-fused", type=Path, default=None, help="our fp32 export with --fuse (in-place cache)")
    parser.add_argument("--source", default=None, help="the --model spec of transformers' rows (default: none)")
    parser.add_argument("--gguf-dir", type=Path, default=None, help="model-f32.gguf and model-Q4_0.gguf (make_gguf.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--k-ngram", type=int, default=DEFAULT_TOKENS[NGRAM],
                        help="proposals per step of prompt lookup, ours and the peers' [default: ours]")
    parser.add_argument("--k-draft", type=int, default=DEFAULT_TOKENS[DRAFT],
                        help="proposals per step of a draft model, ours and llama.cpp's [default: ours]")
    parser.add_argument("--sweep", default="1,2,3,4,6,8", help="K values of the sweep (fixed K)")
    parser.add_argument("--sweep-prompts", type=int, default=10)
    parser.add_argument("--cost-model", type=Path, nargs="*", default=[])
    parser.add_argument("--only", nargs="*", default=[],
                        help="run only the rows whose label contains one of these (and their plain baselines)")
    parser.add_argument("--out", type=Path, required=True, help="path prefix: writes .json, .md, .png")
    args = parser.parse_args()

    sets = json.loads(PROMPTS.read_text())
    results, sweep = [], []
    # One process for the whole benchmark: a target and its draft share ONNX Runtime's process-wide thread pool.
    with aira_opt.load(args.target, threads=args.threads, draft=args.draft, shared_threads=True) as target, \
            aira_opt.load(args.draft, threads=args.threads) as int4, \
            (aira_opt.load(args.target_fused, threads=args.threads, draft=args.draft, shared_threads=True)
             if args.target_fused
             else contextlib.nullcontext()) as fused:
        fmt = target.prompt_format
        ids = {name: [target.prompt_ids(p["prompt"]) for p in sets[name]] for name in ("grounded", "open")}
        rows: list[tuple[str, str, str, Callable]] = [  # (label, family, plain baseline label, run)
            ("ours fp32", "ours", "ours fp32", ours(target, "off", None)),
            ("ours fp32 + ngram", "ours", "ours fp32", ours(target, "ngram", args.k_ngram)),
            ("ours fp32 + draft int4", "ours", "ours fp32", ours(target, "draft", args.k_draft)),
            *([] if fused is None else [
                ("ours fp32-fused", "ours", "ours fp32-fused", ours(fused, "off", None)),
                ("ours fp32-fused + ngram", "ours", "ours fp32-fused", ours(fused, "ngram", args.k_ngram)),
                ("ours fp32-fused + draft int4", "ours", "ours fp32-fused", ours(fused, "draft", args.k_draft))]),
            ("ours int4", "ours", "ours int4", ours(int4, "off", None)),
            ("ours int4 + ngram", "ours", "ours int4", ours(int4, "ngram", args.k_ngram)),
        ]
        if args.source:
            import torch

            from aira_opt.source.models import load_model

            torch.set_num_threads(args.threads)
            loaded = load_model(args.source)
            stops = list(fmt.stop_ids)
            rows += [("transformers fp32", "transformers", "transformers fp32",
                      transformers_run(loaded, stops, fmt.pad_id, None)),
                     ("transformers fp32 + prompt lookup", "transformers", "transformers fp32",
                      transformers_run(loaded, stops, fmt.pad_id, args.k_ngram)),
                     ("transformers fp32 + assistant int8", "transformers", "transformers fp32",
                      transformers_run(loaded, stops, fmt.pad_id, None, dynamic_int8_copy(loaded.model)))]
        if args.gguf_dir:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            f32, q4 = args.gguf_dir / "model-f32.gguf", args.gguf_dir / "model-Q4_0.gguf"
            stops = list(fmt.stop_ids)
            rows += [("llama.cpp f32", "llama.cpp", "llama.cpp f32", llama_run(f32, args.threads, stops, None)),
                     ("llama.cpp f32 + prompt lookup", "llama.cpp", "llama.cpp f32",
                      llama_run(f32, args.threads, stops, LlamaPromptLookupDecoding(max_ngram_size=3,
                                                                                   num_pred_tokens=args.k_ngram))),
                     ("llama.cpp f32 + draft Q4_0", "llama.cpp", "llama.cpp f32",
                      llama_run(f32, args.threads, stops, gguf_draft(q4, args.threads, args.k_draft))),
                     ("llama.cpp Q4_0", "llama.cpp", "llama.cpp Q4_0", llama_run(q4, args.threads, stops, None)),
                     ("llama.cpp Q4_0 + prompt lookup", "llama.cpp", "llama.cpp Q4_0",
                      llama_run(q4, args.threads, stops, LlamaPromptLookupDecoding(max_ngram_size=3,
                                                                                  num_pred_tokens=args.k_ngram)))]
        if args.only:
            wanted = [row for row in rows if any(o in row[0] for o in args.only)]
            baselines = {row[2] for row in wanted}
            rows = [row for row in rows if row in wanted or row[0] in baselines]
        outputs: dict[tuple[str, str], list[list[int]]] = {}
        for name in ("grounded", "open"):
            for label, family, baseline, run in rows:
                run(ids[name][0], 8)  # warm-up
                timed, records = [], []
                for prompt in ids[name]:
                    tokens, times, record = run(prompt, args.max_new_tokens)
                    timed.append((tokens, times))
                    records += [record] if record else []
                outputs[(name, label)] = [t for t, _ in timed]
                plain = outputs[(name, baseline)]
                proposed = sum(r["proposed"] for r in records)
                results.append({
                    "set": name, "label": label, "family": family, "baseline": baseline,
                    "decode_tokens_per_s": round(rate(timed), 3), "ttft_ms": round(ttft_ms(timed), 1),
                    "tokens": sum(len(t) for t, _ in timed),
                    "identical": sum(a == b for a, b in zip(outputs[(name, label)], plain)),
                    "prompts": len(timed),
                    "acceptance_rate": round(sum(r["accepted"] for r in records) / proposed, 4) if proposed else None,
                    "tokens_per_step": round(np.mean([r["tokens_per_step"] for r in records]), 3) if records else None,
                })
                base = next(r for r in results if r["set"] == name and r["label"] == baseline)
                results[-1]["speedup"] = round(results[-1]["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
                print(f"{name:8s} {label:36s} {results[-1]['decode_tokens_per_s']:8.2f} tok/s  "
                      f"x{results[-1]['speedup']:.2f}  identical {results[-1]['identical']}/{len(timed)}", flush=True)
        grounded = ids["grounded"][:args.sweep_prompts]
        plain_rate = rate([ours(target, "off", None)(p, args.max_new_tokens)[:2] for p in grounded]) if args.sweep \
            else float("nan")
        for method, model in (("draft", target), ("ngram", target)):
            for k in [int(v) for v in args.sweep.split(",") if v]:
                runs = [ours(model, method, k, adaptive=False)(p, args.max_new_tokens) for p in grounded]
                speed = rate([r[:2] for r in runs])
                sweep.append({"method": method, "k": k, "decode_tokens_per_s": round(speed, 3),
                              "speedup": round(speed / plain_rate, 3)})
                print(f"sweep {method} K={k}: x{sweep[-1]['speedup']:.2f}", flush=True)
    costs = [verify_cost(folder, args.threads, [1, 2, 3, 5, 9]) for folder in args.cost_model]
    machine = machine_info(args.threads, probe_bandwidth_gbps())
    report = {"machine": machine, "command": "python " + " ".join(__import__("sys").argv),
              "settings": {"max_new_tokens": args.max_new_tokens, "k_ngram": args.k_ngram, "k_draft": args.k_draft,
                           "threads": args.threads,
                           "greedy": True, "batch": 1},
              "results": results, "sweep": sweep, "verify_cost": costs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    table = text_table(["set", "backend", "decode tok/s", "speedup", "ttft ms", "identical", "acceptance",
                        "tokens/step"],
                       [(r["set"], r["label"], r["decode_tokens_per_s"], f"{r['speedup']:.2f}x", r["ttft_ms"],
                         f"{r['identical']}/{r['prompts']}", r["acceptance_rate"] if r["acceptance_rate"] is not None
                         else "-", r["tokens_per_step"] or "-") for r in results])
    lines = [f"# Speculative decoding, {machine.get('cpu', '')}", "", f"`{report['command']}`", "", "```", table, "```"]
    if costs:
        lines += ["", "Verify step cost (width K + 1 over a plain step):", "", "```",
                  text_table(["export", *[f"w={w}" for w in costs[0]["ratio"]]],
                             [(c["folder"], *c["ratio"].values()) for c in costs]), "```"]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print("\n".join(lines))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [r for r in report["results"] if r["label"] != r["baseline"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, max(4.8, 0.32 * len(bars) + 1.5)))
    for method in ("draft", "ngram"):
        points = [r for r in report["sweep"] if r["method"] == method]
        left.plot([p["k"] for p in points], [p["speedup"] for p in points], marker="o",
                  label=f"ours fp32 + {method} (fixed K)")
    left.axhline(1.0, color="grey", lw=0.8)
    left.set(xlabel="K (proposed tokens per verify step)", ylabel="decode speedup over the plain loop",
             title="grounded prompts: speedup against K")
    left.legend()
    labels = [f"{r['label']} [{r['set']}]" for r in bars]
    colors = ["tab:blue" if r["family"] == "ours" else "tab:orange" for r in bars]
    right.barh(labels, [r["speedup"] for r in bars], color=colors)
    right.axvline(1.0, color="grey", lw=0.8)
    right.set(xlabel="decode speedup over the same backend's plain greedy loop",
              title="ours (blue) and the peers (orange)")
    right.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"Speculative decoding, greedy, batch 1: {report['machine'].get('cpu', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
