#!/usr/bin/env bash
# Build llama.cpp's C++ `llama-server` and `llama-bench` from the llama.cpp sources vendored in the
# llama-cpp-python sdist, for benchmarks only (tidemind never depends on it). The binaries are
# cached: a second run prints the server's path at once; llama-bench lies next to it.
#
# usage: benchmarks/build_llama_server.sh [CACHE_DIR]     (default ~/.cache/tidemind-bench)
# prints: the path of the llama-server binary (last line of stdout)
# needs: pip (the ordinary client, to fetch the sdist), cmake, a C++ compiler; ~10 minutes on 2 cores
# GGML_NATIVE=ON compiles for this CPU. On CPUs with AMX, llama.cpp's AMX code crashed in generation
# on one of our machine kinds: TIDEMIND_LLAMA_NO_AMX=1 (or an AMX CPU, detected here) builds
# without it (GGML_AMX_TILE/INT8/BF16 off). TIDEMIND_LLAMA_ISA=avx2 builds for the AVX2 machine kind
# on any x86 CPU (GGML_NATIVE off: AVX, AVX2, BMI2, FMA, F16C; no AVX-512), to compare with
# tidemind's avx2 kernels (TIDEMIND_CPU_ISA=avx2); give it its own cache directory.
set -euo pipefail

CACHE_DIR="${1:-${TIDEMIND_BENCH_CACHE:-$HOME/.cache/tidemind-bench}}"
SERVER="$CACHE_DIR/llama-server"
if [[ -x "$SERVER" && -x "$CACHE_DIR/llama-bench" ]]; then
    echo "$SERVER"
    exit 0
fi
mkdir -p "$CACHE_DIR/sdist"
SDIST=$(ls "$CACHE_DIR"/sdist/llama_cpp_python-*.tar.gz 2>/dev/null | sort -V | tail -n 1 || true)
if [[ -z "$SDIST" ]]; then
    python -m pip download --no-binary :all: --no-deps llama-cpp-python -d "$CACHE_DIR/sdist" >&2
    SDIST=$(ls "$CACHE_DIR"/sdist/llama_cpp_python-*.tar.gz | sort -V | tail -n 1)
fi
SRC="$CACHE_DIR/$(basename "$SDIST" .tar.gz)"
[[ -d "$SRC" ]] || tar xzf "$SDIST" -C "$CACHE_DIR"
ISA_FLAGS=(-DGGML_NATIVE=ON)
BUILD="$SRC/build"
case "${TIDEMIND_LLAMA_ISA:-native}" in
    native) ;;
    avx2) ISA_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                     -DGGML_AVX512=OFF) && BUILD="$SRC/build-avx2" ;;
    *) echo "TIDEMIND_LLAMA_ISA must be native or avx2, not ${TIDEMIND_LLAMA_ISA}" >&2 && exit 2 ;;
esac
if [[ "${TIDEMIND_LLAMA_NO_AMX:-0}" == 1 ]] || grep -qw amx_tile /proc/cpuinfo; then
    ISA_FLAGS+=(-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi
# The sdist has no .git: version facts come from its CHANGELOG (see serve_vs_llamacpp.py).
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF "${ISA_FLAGS[@]}" >&2
cmake --build "$BUILD" --target llama-server llama-bench -j "$(nproc)" >&2
cp "$BUILD/bin/llama-bench" "$CACHE_DIR/llama-bench.tmp" && mv "$CACHE_DIR/llama-bench.tmp" "$CACHE_DIR/llama-bench"
cp "$BUILD/bin/llama-server" "$SERVER.tmp" && mv "$SERVER.tmp" "$SERVER"
echo "${TIDEMIND_LLAMA_ISA:-native}: ${ISA_FLAGS[*]}" > "$CACHE_DIR/llama-build-flags.txt"  # the benchmarks record it
echo "$SERVER"
