#!/usr/bin/env bash
# Builds the standalone flash-attention check (scripts/flash_check/flash_check.cu,
# which includes src/backend/kernels/flash_attn.cu) for sm_90 with the CUDA 13.0
# nvcc of ../shared/cuda/toolkit.sh, into $1 (default .dev/flash/flash_check).
# cudart is linked statically, so the binary needs only the driver on the GPU
# machine. Run from the repository root.
set -euo pipefail
out="${1:-.dev/flash/flash_check}"
if ! command -v nvcc >/dev/null; then
  # shellcheck disable=SC1091
  source ../shared/cuda/toolkit.sh
fi
mkdir -p "$(dirname "$out")"
nice nvcc -O3 -std=c++17 -arch=sm_90 -lineinfo -I src/backend/kernels \
  scripts/flash_check/flash_check.cu -o "$out"
echo "built $out"
