#!/usr/bin/env bash
# The GPU test tier: the integration suite (tests/suite) built with
# `--features cuda` here, run on the GPU machine with every test on CUDA.
#
#   scripts/gpu-tests.sh build     # here: build tests/suite for CUDA into .dev/suite.xz
#   scripts/gpu-tests.sh run       # on the GPU machine (repo root): run it, print a summary
#
# With the device tool:  carry=[".dev"]  command: bash scripts/gpu-tests.sh run
# The last run's summary is kept in docs/gpu-test-results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  build)
    # shellcheck disable=SC1091
    source ../shared/cuda/toolkit.sh
    bin=$(cargo test --release --features cuda --target-dir target/cuda --test suite --no-run \
            --message-format=json 2>/dev/null \
          | python3 -c "import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get('reason') == 'compiler-artifact' and m.get('executable') and m['target']['name'] == 'suite':
        print(m['executable'])")
    [ -n "$bin" ] || { echo "build failed: rerun cargo test --release --features cuda --target-dir target/cuda --test suite --no-run" >&2; exit 1; }
    mkdir -p .dev
    cp ../shared/cuda/on-device.sh .dev/
    # Debug info off the copy that travels: the carry limit is 64 MiB.
    objcopy --strip-debug "$bin" .dev/suite
    xz -T2 -f .dev/suite
    ls -la .dev/suite.xz
    ;;
  run)
    out="${OUT:-.dev}"
    card=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)
    set +e
    METAL_CANDLE_TEST_DEVICE=cuda METAL_CANDLE_FIXTURES="$PWD/tests/fixtures" \
      bash .dev/on-device.sh .dev/suite.xz --test-threads=1 2>&1 | tee "$out/gpu-tests.log"
    rc=${PIPESTATUS[0]}
    set -e
    summary=$(grep -E "^test result:" "$out/gpu-tests.log" | tail -1)
    {
      echo "card: $card"
      echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
      echo "result: $summary"
      echo "failed tests:"; grep -E "^test .* FAILED$" "$out/gpu-tests.log" || echo "  none"
    } | tee "$out/gpu-summary.txt"
    exit "$rc"
    ;;
  *) sed -n '2,10p' "$0"; exit 2 ;;
esac
