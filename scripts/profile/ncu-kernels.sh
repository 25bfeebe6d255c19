#!/usr/bin/env bash
# Kernel census of one run of a CUDA binary under Nsight Compute: every
# kernel's GPU time, summed by name (scripts/profile/ncu_sum.py).
#
#   bash scripts/profile/ncu-kernels.sh .dev/bench_compare.xz --device cuda --suite lora-profile
#
# Run on the GPU machine (repo root). ncu replays each kernel, so profile a
# small program (one training step of two layers), not a benchmark loop.
set -euo pipefail
out="${OUT:-.dev}"
libs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for p in glob.glob(sp + "/nvidia/**/lib*.so*", recursive=True):
        dirs.add(os.path.dirname(p))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bin="$1"; shift
case "$bin" in
  *.xz) xz -d -k -f "$bin"; bin="${bin%.xz}"; chmod +x "$bin" ;;
esac
PROFILE_ONCE=1 ncu --metrics gpu__time_duration.sum --csv --print-units base \
  "$bin" "$@" > "$out/ncu.csv" 2> "$out/ncu.err" || { tail -20 "$out/ncu.err"; exit 1; }
python3 "$(dirname "$0")/ncu_sum.py" "$out/ncu.csv" | tee "$out/ncu-summary.txt"
