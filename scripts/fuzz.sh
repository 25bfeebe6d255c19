#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for SECS seconds each (default 20), from
# the committed seeds (fuzz/seeds/<target>) plus the local corpus
# (fuzz/corpus/<target>, not committed). Needs the nightly toolchain and
# cargo-fuzz (`cargo install cargo-fuzz`). A crash stops the script (its
# input is in fuzz/artifacts/<target>/); logs go to fuzz/logs/.
# FUZZ_TARGET_DIR puts the build elsewhere than fuzz/target (CI keeps it
# between runs).
#
#   scripts/fuzz.sh            # 20 s per target (what CI runs)
#   scripts/fuzz.sh 600 gguf   # one target, 10 minutes
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-20}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
mkdir -p logs
dir=()
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then
  dir=(--target-dir "$FUZZ_TARGET_DIR")
fi
cargo +nightly fuzz build -a "${dir[@]}"
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  # -a: debug assertions and overflow checks; -rss_limit_mb: an input that
  # makes the library allocate gigabytes is a finding too.
  if ! cargo +nightly fuzz run -a "${dir[@]}" "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=4096 -timeout=20 -print_final_stats=1 \
      >"logs/$t.log" 2>&1; then
    tail -n 40 "logs/$t.log"
    echo "fuzz target $t failed: see fuzz/logs/$t.log and fuzz/artifacts/$t/" >&2
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "logs/$t.log" | grep -o '[0-9]*$' || echo '?')
  echo "$t: $runs executions in $secs s, no crash"
done
