#!/usr/bin/env bash
# The full CPU comparison on aira-2-1b1-random (22 layers, Aira-2-1B1's shape): our variants (kernels timed on this
# CPU at export), optimum's own dynamic int8, onnxruntime-genai's own builder output, llama.cpp's own conversion and
# quantizations, and PyTorch, in one `aira-opt bench` run; then the goals as ratios within that run.
#   benchmarks/run_cpu.sh [tag]      (results land in benchmarks/results/<date>-cpu[-tag].{json,md,png} and -goals.md)
set -euo pipefail
cd "$(dirname "$0")/.."
model=aira-2-1b1-random
dir=export/$model
# optimum (its int8 recipe and its runtime) pins transformers 4.57: it runs from an environment of its own.
optimum_python=${AIRA_OPT_OPTIMUM_PYTHON:-.venv-optimum/bin/python}
if [ ! -x "$optimum_python" ]; then
  python3 -m venv .venv-optimum
  .venv-optimum/bin/pip install -q torch==2.13.0 && .venv-optimum/bin/pip install -q -e '.[optimum]'
  optimum_python=.venv-optimum/bin/python
fi
export AIRA_OPT_OPTIMUM_PYTHON=$optimum_python
for precision in fp32 int8 int4; do
  [ -f "$dir/$precision/manifest.json" ] || aira-opt export --model $model --precision $precision
done
[ -f "$dir/fp32-fused/manifest.json" ] || aira-opt export --model $model --precision fp32 --fuse
[ -f "$dir/optimum-int8/manifest.json" ] || "$optimum_python" benchmarks/optimum_int8.py "$dir/fp32" "$dir/optimum-int8"
[ -f "$dir/ckpt/config.json" ] || python benchmarks/save_checkpoint.py $model "$dir/ckpt"
# llama.cpp: a wheel built for this CPU family (cached), then the same checkpoint through its own tools.
PYTHON=python benchmarks/build_llamacpp.sh > /dev/null
[ -f "$dir/gguf/model-Q4_K_M.gguf" ] || python benchmarks/make_gguf.py "$dir/ckpt" "$dir/gguf" > /dev/null
for precision in fp32 int4; do
  [ -f "$dir/genai-$precision/genai_config.json" ] || benchmarks/build_genai.sh "$dir/ckpt" "$dir/genai-$precision" $precision
done
stem=benchmarks/results/$(date +%Y-%m-%d)-cpu${1:+-$1}
aira-opt bench --model $model --threads "$(nproc)" --prompt-lengths 64 --new-tokens 64 --batch-sizes 1 \
  --warmup 1 --repeats 3 --backends torch,ort,optimum,genai,llamacpp \
  --onnx "$dir/fp32" --onnx "$dir/fp32-fused" --onnx "$dir/int8" --onnx "$dir/int4" --onnx "$dir/optimum-int8" \
  --genai "$dir/genai-fp32" --genai "$dir/genai-int4" \
  --gguf "$dir/gguf/model-f32.gguf" --gguf "$dir/gguf/model-Q8_0.gguf" --gguf "$dir/gguf/model-Q4_0.gguf" \
  --gguf "$dir/gguf/model-Q4_K_M.gguf" \
  --json "$stem.json" --markdown "$stem.md" --plot "$stem.png"
python benchmarks/cpu_goals.py "$stem.json" --markdown "$stem-goals.md"
