#!/usr/bin/env bash
# The whole test suite, as CI runs it (README command 2).
#
# Fast tier: tiny models and committed reference fixtures, no downloads.
# Real-model tier: the real weights from ../shared/models/ASSETS.md, fetched
# (pinned, SHA-256 checked) into the Hugging Face cache by
# scripts/fetch-models.sh and used offline. Set METAL_CANDLE_REAL_MODELS=0 to
# run the fast tier only.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${METAL_CANDLE_REAL_MODELS:-1}" = "1" ]; then
  python3 scripts/test_fetch_models.py
  scripts/fetch-models.sh
  export METAL_CANDLE_REAL_MODELS=1 HF_HUB_OFFLINE=1
else
  export METAL_CANDLE_REAL_MODELS=0
fi
cargo test "$@"
