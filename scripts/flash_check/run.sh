#!/usr/bin/env bash
# On the GPU machine, from the folder holding flash_check and torch_sdpa.py:
# the check table and timings, compute-sanitizer (memcheck, racecheck) on the
# small shapes, PyTorch's sdpa timings, then a short table. Writes logs to
# $OUT when set.
set -u
cd "$(dirname "$0")"
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
./flash_check 2>&1 | tee "$out/check.txt"
echo "flash_check exit: ${PIPESTATUS[0]}"
san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$san" ]; then
  "$san" --tool memcheck --leak-check no ./flash_check --small >"$out/memcheck.txt" 2>&1
  echo "memcheck exit $?: $(grep -E 'ERROR SUMMARY' "$out/memcheck.txt" | tail -1)"
  "$san" --tool racecheck ./flash_check --small >"$out/racecheck.txt" 2>&1
  echo "racecheck exit $?: $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$out/racecheck.txt" | tail -1)"
else
  echo "compute-sanitizer not found"
fi
python3 torch_sdpa.py 2>&1 | tee "$out/torch.txt"
echo "================ summary"
grep -E "^device|FAIL|PASS" "$out/check.txt"
grep -E "^TIME" "$out/check.txt"
grep -E "^TORCH" "$out/torch.txt"
