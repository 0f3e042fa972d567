#!/usr/bin/env bash
# Build onnxruntime-genai's own ONNX folder from a local checkpoint with its model builder.
# The builder needs transformers 5 and onnxruntime-genai: it runs in this environment when it has both (the
# default install has transformers 5; `pip install 'aira-opt[genai]'` adds the runtime). In an environment
# pinned to transformers 4.57 (the `optimum` extra) it falls back to a virtual environment of its own
# (.genai-venv, made on first use).
#   benchmarks/build_genai.sh CHECKPOINT_DIR OUTPUT_DIR [fp32|int4]
set -euo pipefail
ckpt=${1:?checkpoint folder}; out=${2:?output folder}; precision=${3:-int4}
python=python3
if ! $python -c "import onnxruntime_genai, transformers, sys; sys.exit(int(transformers.__version__.split('.')[0]) < 5)" 2>/dev/null; then
  venv=${GENAI_VENV:-.genai-venv}
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.13.0
    "$venv/bin/pip" install -q 'transformers>=5' onnxruntime-genai==0.18.0 onnx onnx_ir onnxscript safetensors protobuf
  fi
  python="$venv/bin/python"
fi
extra=()
if [ "$precision" = int4 ]; then
  # genai's CPU int4 recipe as in the reference table: block 32, accuracy level 4 (int8 compute).
  extra=(--extra_options int4_block_size=32 int4_accuracy_level=4)
fi
"$python" -m onnxruntime_genai.models.builder -m "$ckpt" -o "$out" -p "$precision" -e cpu \
  -c "$out.cache" "${extra[@]}"
rm -rf "$out.cache"
