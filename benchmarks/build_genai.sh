#!/usr/bin/env bash
# Build onnxruntime-genai's own ONNX folder from a local checkpoint with its model builder.
# The builder needs transformers 5, which optimum-onnx's pin (<4.58) excludes, so it runs in its own
# virtual environment (.genai-venv, made on first use). The runtime (onnxruntime-genai) lives in the main
# environment: pip install 'aira-opt[genai]'.
#   benchmarks/build_genai.sh CHECKPOINT_DIR OUTPUT_DIR [fp32|int4]
set -euo pipefail
ckpt=${1:?checkpoint folder}; out=${2:?output folder}; precision=${3:-int4}
venv=${GENAI_VENV:-.genai-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q 'transformers>=5' onnxruntime-genai==0.18.0 onnx onnx_ir onnxscript safetensors protobuf
fi
extra=()
if [ "$precision" = int4 ]; then
  # genai's CPU int4 recipe as in the reference table: block 32, accuracy level 4 (int8 compute).
  extra=(--extra_options int4_block_size=32 int4_accuracy_level=4)
fi
"$venv/bin/python" -m onnxruntime_genai.models.builder -m "$ckpt" -o "$out" -p "$precision" -e cpu \
  -c "$out.cache" "${extra[@]}"
rm -rf "$out.cache"
