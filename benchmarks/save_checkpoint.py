"""Save a model spec as a transformers checkpoint folder (for peers that build from a checkpoint, like
onnxruntime-genai's model builder).  Usage: python benchmarks/save_checkpoint.py SPEC OUT_DIR [--num-layers N]"""

from __future__ import annotations

import argparse
from pathlib import Path

from aira_opt.source.models import load_model

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("output", type=Path)
    parser.add_argument("--num-layers", type=int, default=None)
    args = parser.parse_args()
    loaded = load_model(args.spec, num_layers=args.num_layers)
    loaded.model.save_pretrained(args.output, safe_serialization=True)
    loaded.tokenizer.save_pretrained(args.output)
    print(f"saved {loaded.name} to {args.output}")
