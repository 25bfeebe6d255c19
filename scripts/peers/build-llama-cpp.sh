#!/usr/bin/env bash
# Build llama.cpp (CPU only) from the llama-cpp-python source package, as a
# peer for fixtures and benchmarks. Nothing here is linked into the library.
#
#   scripts/peers/build-llama-cpp.sh        # idempotent; prints the bin folder
#
# - fetches llama-cpp-python==0.3.36 (sdist, pip, the registry) into
#   $PEERS (default ~/.cache/metal-candle/peers) and checks its SHA-256;
# - builds vendor/llama.cpp (ggml-org/llama.cpp@0c1e57098, per the package's
#   CHANGELOG) with CMake, Release, native CPU flags, no curl/openssl, no
#   tests/examples/server, into $LLAMA_BUILD (default
#   ~/.cache/metal-candle/llama.cpp-build): libllama + libggml*, llama-bench,
#   llama-quantize, llama-tokenize;
# - compiles scripts/peers/llamacpp_greedy.cpp against libllama into
#   $LLAMA_BUILD/bin/llamacpp_greedy.
#
# CMake comes from PATH, else a pinned `cmake` wheel in $PEERS/tools-venv.
# The machine is shared: the build runs under `nice -n 10` with
# $JOBS (default 2) jobs.
set -euo pipefail

VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMA_COMMIT=0c1e57098
CMAKE_PIN=3.31.6

HERE="$(cd "$(dirname "$0")" && pwd)"
DATA="${METAL_CANDLE_DATA:-$HOME/.cache/metal-candle}"
PEERS="${PEERS:-$DATA/peers}"
BUILD="${LLAMA_BUILD:-$DATA/llama.cpp-build}"
JOBS="${JOBS:-2}"
SDIST="$PEERS/llama_cpp_python-$VERSION.tar.gz"
SRC="$PEERS/llama_cpp_python-$VERSION/vendor/llama.cpp"

log() { echo "build-llama-cpp: $*" >&2; }

mkdir -p "$PEERS"
if [ ! -f "$SDIST" ]; then
    log "downloading llama-cpp-python==$VERSION (source package)"
    python3 -m pip download -q --disable-pip-version-check --no-deps \
        --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$PEERS"
fi
got="$(sha256sum "$SDIST" | cut -d' ' -f1)"
if [ "$got" != "$SHA256" ]; then
    log "SHA-256 mismatch for $SDIST: $got, expected $SHA256"
    exit 1
fi

# Unpack once (a marker file says the tree is complete).
if [ ! -f "$PEERS/llama_cpp_python-$VERSION/.unpacked" ]; then
    log "unpacking"
    rm -rf "$PEERS/llama_cpp_python-$VERSION"
    tar -xzf "$SDIST" -C "$PEERS"
    touch "$PEERS/llama_cpp_python-$VERSION/.unpacked"
fi

CMAKE="$(command -v cmake || true)"
if [ -z "$CMAKE" ]; then
    if [ ! -x "$PEERS/tools-venv/bin/cmake" ]; then
        log "no cmake on PATH: installing cmake==$CMAKE_PIN into $PEERS/tools-venv"
        python3 -m venv "$PEERS/tools-venv"
        "$PEERS/tools-venv/bin/pip" install -q --disable-pip-version-check "cmake==$CMAKE_PIN"
    fi
    CMAKE="$PEERS/tools-venv/bin/cmake"
fi

# Configure once; `cmake --build` is itself incremental.
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
    log "configuring into $BUILD"
    nice -n 10 "$CMAKE" -S "$SRC" -B "$BUILD" \
        -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON \
        -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON \
        -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
        -DLLAMA_BUILD_COMMIT="$LLAMA_COMMIT" -DLLAMA_BUILD_NUMBER=0 >&2
fi
log "building (nice -n 10, $JOBS jobs)"
nice -n 10 "$CMAKE" --build "$BUILD" -j "$JOBS" \
    --target llama llama-bench llama-quantize llama-tokenize >&2

# Our fixture program, linked against the libllama just built.
BIN="$BUILD/bin"
LIBS=(-L"$BIN" -lllama -lggml -lggml-base)
if [ "$HERE/llamacpp_greedy.cpp" -nt "$BIN/llamacpp_greedy" ] || [ "$BIN/libllama.so" -nt "$BIN/llamacpp_greedy" ]; then
    log "compiling llamacpp_greedy"
    nice -n 10 c++ -std=c++17 -O2 -Wall -Wextra \
        -I"$SRC/include" -I"$SRC/ggml/include" \
        "$HERE/llamacpp_greedy.cpp" -o "$BIN/llamacpp_greedy" \
        "${LIBS[@]}" -Wl,-rpath,"$BIN"
fi
echo "$BIN"
