#!/usr/bin/env bash
# llama.cpp for the `bench --backends llamacpp` peer: builds llama-cpp-python from its source distribution with
# native CPU flags (PyPI has no CPU wheel), caches the wheel per version and per instruction-set family, installs it
# into the running Python, and keeps the source distribution (its convert_hf_to_gguf.py converts checkpoints).
#   benchmarks/build_llamacpp.sh                 prints the folder holding the sdist and the wheel
#   benchmarks/build_llamacpp.sh --cached-only   installs a wheel already built for this CPU family, else exits 3
# The cache lives beside the user's model cache (AIRA_OPT_CACHE, else XDG_CACHE_HOME/aira-opt, else ~/.cache/aira-opt),
# so CI and later runs on a machine of the same family skip the build (it takes about 11 minutes on 2 cores).
set -euo pipefail
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
python=${PYTHON:-python}
cache=${AIRA_OPT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/aira-opt}
# A native build uses every instruction the build machine has: the wheel is only reused where the same ones exist.
isa=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' \
  | grep -E '^(avx2|fma|f16c|avx512f|avx512bw|avx512vl|avx512_vnni|avx512_bf16|avx_vnni|amx_tile|amx_int8|amx_bf16)$' \
  | sort | tr '\n' '-' | sed 's/-$//')
pyver=$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
folder=$cache/llama-cpp-python/$version-$pyver-$(printf '%s' "$isa" | sha1sum | cut -c1-12)
if [ "${1:-}" = --cached-only ] && ! ls "$folder"/llama_cpp_python-*.whl > /dev/null 2>&1; then
  echo "no llama-cpp-python $version wheel cached for this CPU ($isa) in $folder" >&2
  exit 3
fi
mkdir -p "$folder"
if ! ls "$folder"/llama_cpp_python-*.tar.gz > /dev/null 2>&1; then
  "$python" -m pip download -q --no-deps --no-binary :all: -d "$folder" "llama-cpp-python==$version" >&2
fi
if ! ls "$folder"/llama_cpp_python-*.whl > /dev/null 2>&1; then
  echo "building llama-cpp-python $version for: $isa (about 11 minutes on 2 cores)" >&2
  tmp=$(mktemp -d "$folder/build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$python" -m pip wheel -q --no-deps -w "$tmp" "$folder"/llama_cpp_python-*.tar.gz >&2
  mv "$tmp"/llama_cpp_python-*.whl "$folder"/
  printf '%s\n' "$isa" > "$folder/instruction-sets.txt"
fi
"$python" -m pip install -q "$folder"/llama_cpp_python-*.whl >&2
echo "$folder"
