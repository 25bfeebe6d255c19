#!/usr/bin/env bash
# The multi-GPU tier and the data-parallel benchmark (issue 17), on one host
# with several GPUs:
#
#   scripts/multi-gpu.sh build      # here: the suite, bench_compare and launch for CUDA into .dev/
#   scripts/multi-gpu.sh run [N]    # on the GPU machine (repo root), N GPUs (default: all)
#
# run's knobs: TESTS=0 skips the tests; PROCS / PEER_PROCS: the process
# counts timed for ours / the peer (default "1 N" each); MODELS: the
# shapes (default "0.5B 1.5B").
#
# run: the distributed tests with a GPU per rank (NCCL; equivalence of
# N ranks x b4 with 1 x b8, a resume on another GPU count, failures), then
# the train step on 1 and N processes for the 0.5B and 1.5B shapes, ours
# (examples/launch.rs + bench_compare --suite lora-dp) and PyTorch DDP +
# peft (torchrun scripts/peers/ddp_lora.py), one table and the scaling.
# With the device tool:  kind=nvidia-h100-x2 (or -x4), carry=[".dev"].
# NVLink multicast stays off in every process (the machines' rule).
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out="${OUT:-.dev/multi-gpu}"
mkdir -p "$out"
case "${1:-}" in
  build)
    bash scripts/gpu-tests.sh build
    bash scripts/bench.sh build
    # shellcheck disable=SC1091
    source ../shared/cuda/toolkit.sh
    cargo build --release --features cuda --target-dir target/cuda --example launch
    objcopy --strip-debug target/cuda/release/examples/launch .dev/launch
    xz -T2 -f .dev/launch
    ;;
  run)
    n="${2:-$(nvidia-smi -L | wc -l)}"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/card.txt"
    for f in suite bench_compare launch; do xz -d -k -f ".dev/$f.xz"; chmod +x ".dev/$f"; done
    set +e
    [ "${TESTS:-1}" = 0 ] || METAL_CANDLE_TEST_DEVICE=cuda METAL_CANDLE_TEST_GPUS="$n" METAL_CANDLE_FIXTURES="$PWD/tests/fixtures" \
      timeout 300 bash .dev/on-device.sh .dev/suite --test-threads=1 --nocapture distributed 2>&1 | tee "$out/tests.log" | grep -E "^test |test result|worst|L2|NCCL rank"
    # A failed run leaves its row out of the table, not the rest of the runs.
    : > "$out/ours.jsonl"; : > "$out/peers.jsonl"
    for model in ${MODELS:-0.5B 1.5B}; do
      for p in ${PROCS:-1 $n}; do
        timeout 200 .dev/launch --nproc-per-node "$p" -- bash .dev/on-device.sh .dev/bench_compare --device cuda \
          --suite lora-dp --dp-model "$model" --repeats 5 2> >(grep -E "^rank|launch" | tee -a "$out/ranks.log" >&2) \
          | tee -a "$out/ours.jsonl"
        case " ${PEER_PROCS:-1 $n} " in *" $p "*) ;; *) continue ;; esac
        timeout 200 python3 -m torch.distributed.run --nproc-per-node "$p" scripts/peers/ddp_lora.py --model "$model" --repeats 5 \
          2> "$out/torchrun-$model-$p.err" | tee -a "$out/peers.jsonl"
      done
    done
    set -e
    python3 scripts/bench_table.py "$out/ours.jsonl" "$out/peers.jsonl" | tee "$out/table.md"
    python3 - "$out/ours.jsonl" "$out/peers.jsonl" <<'PY'
import json, re, sys
for path in sys.argv[1:]:
    rows = [json.loads(l) for l in open(path) if l.startswith("{")]
    by = {}
    for r in rows:
        m = re.match(r"(\S+) .*, (\d+) process", r["shape"])
        if m:
            by.setdefault(m.group(1), {})[int(m.group(2))] = r["value"]
    for model, v in by.items():
        if 1 in v:
            for p, x in sorted(v.items()):
                print(f"{rows[0]['impl']}: {model} {p} GPU(s) {x:,.0f} tok/s, scaling {x / v[1]:.2f}x")
PY
    ;;
  *)
    sed -n '2,14p' "$0"; exit 2 ;;
esac
