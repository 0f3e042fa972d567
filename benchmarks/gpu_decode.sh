#!/usr/bin/env bash
# Issue 15's GPU measurement, prepared for the next lent GPU (not yet run: no GPU was lent when it was written).
# It assumes what benchmarks/gpu_run.sh sets up (onnxruntime-gpu reassembled from /tmp/parts into /tmp/site with
# the transformers stack) and, for the genai rows, onnxruntime-genai-cuda's wheel in .whl/ and genai folders
# built beforehand by benchmarks/build_genai.sh. Every step runs on even if one fails; logs and JSON go to $OUT.
#
#   bash benchmarks/gpu_run.sh            # installs, then checks the standard-op fp16 (the earlier run)
#   bash benchmarks/gpu_decode.sh         # this script
#
# Rows: PyTorch fp16 eager; our loop on the standard-op fp16 graph; on fp16-cuda (fused: GroupQueryAttention,
# RotaryEmbedding, SkipSimplifiedLayerNormalization, packed projections, a KV cache preallocated at capacity
# and written in place); on int4-cuda (MatMulNBits, fp16 activations); optimum on CUDA; onnxruntime-genai-cuda.
# Batch 1, 8 and 32; 64-token prompt; 64 new tokens. The bench table's "% of bound" column is decode steps/s
# over the GPU's measured copy bandwidth / weight bytes per step (the machine line names that bandwidth).
# Not in it yet: PyTorch with a static cache and torch.compile (no bench runner for it) and CUDA graph capture.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
step() { echo; echo "== $*"; }
run() { timeout "$1" "${@:2}" 2>&1 | grep -vE "Warning|warn\(|^\s*$" | tail -40; echo "   exit ${PIPESTATUS[0]}"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/onnxruntime_genai_cuda-*.whl 2>&1 | tail -1

step "export: aira-2-1b1-random fp16-cuda and int4-cuda (22 layers)"
run 600 python3 -m aira_opt export --model aira-2-1b1-random --precision fp16-cuda --output /tmp/r16c --force
run 600 python3 -m aira_opt export --model aira-2-1b1-random --precision int4-cuda --output /tmp/r4c --force
[ -d /tmp/r16 ] || run 600 python3 -m aira_opt export --model aira-2-1b1-random --precision fp16 --output /tmp/r16

step "check: the fused graphs on CUDA vs PyTorch fp16 on the GPU"
for folder in /tmp/r16c /tmp/r4c; do
  run 300 python3 -m aira_opt check --onnx "$folder" --provider cuda --baseline cuda-fp16 --max-new-tokens 32 \
    --json "$OUT/check-$(basename "$folder").json"
done

step "bench: batch 1, 8, 32"
GENAI=(); for g in /tmp/genai-fp16 /tmp/genai-int4; do [ -d "$g" ] && GENAI+=(--genai "$g"); done
run 600 python3 -m aira_opt bench --model aira-2-1b1-random --provider cuda --backends torch,ort,optimum,genai \
  --onnx /tmp/r16 --onnx /tmp/r16c --onnx /tmp/r4c "${GENAI[@]}" \
  --prompt-lengths 64 --new-tokens 64 --batch-sizes 1,8,32 --warmup 1 --repeats 3 \
  --json "$OUT/bench-gpu-decode.json" --markdown "$OUT/bench-gpu-decode.md"
