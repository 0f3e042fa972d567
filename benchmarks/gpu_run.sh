#!/usr/bin/env bash
# The GPU checks, on a lent GPU machine with CUDA PyTorch but without onnxruntime-gpu or our Python stack.
# Before it runs, the wheels it installs must be in /tmp/parts (onnxruntime-gpu, split: it is larger than what
# one call may carry) and .whl/ (transformers 4.57, tokenizers, huggingface_hub, optimum, optimum-onnx), and
# export/aira-tiny/fp16 must exist. It writes logs and JSON under $OUT. Each step runs on even if one fails.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo; echo "== $*"; }
run() { timeout "$1" "${@:2}" 2>&1 | grep -vE "Warning|warn\(|^\s*$" | tail -40; echo "   exit ${PIPESTATUS[0]}"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.version.cuda)"

step "install: onnxruntime-gpu (reassembled) + the optimum stack, into /tmp/site"
cat /tmp/parts/ort.part.* > /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl /tmp/parts/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import onnxruntime as o, transformers, optimum; o.preload_dlls(); print('onnxruntime', o.__version__, o.get_available_providers(), 'transformers', transformers.__version__)"

step "check: aira-tiny fp16 through our loop on CUDA vs PyTorch fp16 on the GPU"
[ -n "${SKIP_TINY:-}" ] || run 300 python3 -m aira_opt check --onnx export/aira-tiny/fp16 --provider cuda --baseline cuda-fp16 --json "$OUT/check-aira-tiny-fp16-cuda.json"

step "export: aira-2-1b1-random fp16 (22 layers) on this machine"
run 600 python3 -m aira_opt export --model aira-2-1b1-random --precision fp16 --output /tmp/r16 --force

step "check: aira-2-1b1-random fp16 on CUDA vs PyTorch fp16 on the GPU"
run 300 python3 -m aira_opt check --onnx /tmp/r16 --provider cuda --baseline cuda-fp16 --max-new-tokens 32 --json "$OUT/check-random-fp16-cuda.json"

step "bench: PyTorch fp16 vs our loop and optimum on CUDA (batch 1, 64-token prompt, 64 new tokens)"
run 600 python3 -m aira_opt bench --model aira-2-1b1-random --onnx /tmp/r16 --provider cuda --backends torch,ort,optimum \
  --prompt-lengths 64 --new-tokens 64 --batch-sizes 1 --warmup 1 --repeats 3 \
  --json "$OUT/bench-gpu.json" --markdown "$OUT/bench-gpu.md"
