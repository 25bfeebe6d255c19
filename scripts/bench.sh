#!/usr/bin/env bash
# The side-by-side benchmark: our bench binary and scripts/peers.py on the
# same machine in one run, then one table (scripts/bench_table.py).
#
#   scripts/bench.sh build          # here: build the CUDA bench binary into .dev/
#   scripts/bench.sh gpu [ARGS]     # on the GPU machine (repo root): run both, print the table
#   scripts/bench.sh cpu [ARGS]     # this machine: CPU rows, ours and peers
#
# ARGS go to both sides (e.g. --suite generation --quick --repeats 3).
# With the device tool:  carry=[".dev"]  command: bash scripts/bench.sh gpu
set -euo pipefail
cd "$(dirname "$0")/.."
cmd="${1:-}"; shift || true
out="${OUT:-.dev/bench-out}"
mkdir -p "$out"

case "$cmd" in
  build)
    # shellcheck disable=SC1091
    source ../shared/cuda/toolkit.sh
    cargo build --release --features cuda --target-dir target/cuda --example bench_compare
    mkdir -p .dev
    cp ../shared/cuda/on-device.sh .dev/
    # Debug info off the copy that travels: the carry limit is 64 MiB.
    objcopy --strip-debug target/cuda/release/examples/bench_compare .dev/bench_compare
    xz -T2 -f .dev/bench_compare
    ls -la .dev/bench_compare.xz
    ;;
  gpu)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
    python3 -c "import torch, transformers; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}')" | tee -a "$out/card.txt"
    bash .dev/on-device.sh .dev/bench_compare.xz --device cuda "$@" | tee "$out/ours.jsonl"
    python3 scripts/peers.py --device cuda "$@" | tee "$out/peers.jsonl"
    python3 scripts/bench_table.py "$out/ours.jsonl" "$out/peers.jsonl" | tee "$out/table.md"
    ;;
  cpu)
    # PYTHON: an interpreter with torch, transformers and
    # sentence-transformers (default python3).
    py="${PYTHON:-python3}"
    lscpu | grep -E "Model name|^CPU\(s\)" | tee "$out/cpu.txt"
    echo "threads: ours $(nproc) (rayon/gemm: every core), torch $(nproc) (set_num_threads)" | tee -a "$out/cpu.txt"
    "$py" -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}')" | tee -a "$out/cpu.txt"
    "$py" scripts/peers.py --prepare-only "$@" >/dev/null
    # Optimised for every crate, ours included (the release profile).
    # FEATURES (e.g. avx512) and TARGET_DIR pick another build of ours.
    cargo run --release ${FEATURES:+--features "$FEATURES"} ${TARGET_DIR:+--target-dir "$TARGET_DIR"} \
      --example bench_compare -- --device cpu "$@" | tee "$out/ours.jsonl"
    "$py" scripts/peers.py --device cpu "$@" | tee "$out/peers.jsonl"
    python3 scripts/bench_table.py "$out/ours.jsonl" "$out/peers.jsonl" | tee "$out/table.md"
    ;;
  *)
    sed -n '2,12p' "$0"; exit 2 ;;
esac
