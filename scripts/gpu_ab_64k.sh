#!/usr/bin/env bash
# The short form of scripts/gpu_ab.sh for a device call with little time: only the 64k-token rows of
# the benchmarks, default and variants side by side, then every GPU test binary (default build first,
# then each opt-in macro's), so that a call cut short still brings the figures. Expects the binaries of `bash scripts/gpu_ab.sh --build-only` in build-dev/
# (built here if missing). Logs: $OUT/quick.tgz.
#   bash scripts/gpu_ab_64k.sh [--runs N]
set -uo pipefail
OUT=${OUT:-/tmp/kvq-gpu-out}
RUNS=20
if [[ "${1:-}" == "--runs" ]]; then RUNS=$2; fi
mkdir -p "$OUT/quick" build-dev
trap 'cd "$OUT" && tar czf quick.tgz --remove-files quick 2>/dev/null' EXIT
[[ -x build-dev/bench_dec_int3 ]] || KVQ_PREBUILT=1 bash scripts/gpu_ab.sh --build-only
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
rows() {  # name binary pattern args...: the binary's 64k rows matching pattern
    local name=$1 bin=$2 pat=$3
    shift 3
    ./build-dev/$bin --runs "$RUNS" --tokens 65536 "$@" >"$OUT/quick/$name.log" 2>&1
    grep -E "copy|device:" "$OUT/quick/$name.log" | head -2 | sed "s/^/$name: /"
    grep -E "^\|" "$OUT/quick/$name.log" | grep -E "$pat" | grep -E "\| 65536 \|" | sed "s/^/$name: /"
}
rows score bench_score "tc|exact \|" --no-cublas
rows dec bench_dec "tensor cores\]|fp16|score only"
rows dec_int3 bench_dec_int3 "tensor cores\]"
# The split-K planner picks 37 chunks of 1792 positions per head for WKV at batch 1 (3 waves of 396
# CTAs) and int4 at batch 8 (36 waves of 264); longer chunks for comparison (chunk_tokens).
rows dec_wkv_b1_c5632 bench_dec "WKV.*tensor cores\]" --cfg 2 --batch 1 --chunk 5632
rows dec_wkv_b1_c3328 bench_dec "WKV.*tensor cores\]" --cfg 2 --batch 1 --chunk 3328
rows dec_int4_b8_c65536 bench_dec "int4.*tensor cores\]" --cfg 1 --batch 8 --chunk 65536
rows dec_int4_b8_c8192 bench_dec "int4.*tensor cores\]" --cfg 1 --batch 8 --chunk 8192
rows dec_qjl_b1_c2048 bench_dec "QJL.*tensor cores\]" --cfg 0 --batch 1 --chunk 2048  # planner: 4096
rows dec_qjl_b1_c8192 bench_dec "QJL.*tensor cores\]" --cfg 0 --batch 1 --chunk 8192
rows dec_qjl_pdl bench_dec "QJL.*tensor cores\]" --cfg 0 --pdl  # DecodeAttentionArgs::tc_pdl
rows enc bench_enc "QJL m=256|int2|int4|WKV"
for t in score_test dec_test enc_test dec_test_int3; do
    ./build-dev/$t >"$OUT/quick/$t.log" 2>&1
    echo "$t: rc $? $(grep -cE '^\[       OK' "$OUT/quick/$t.log") ok, $(grep -E '^\[  PASSED|^\[  FAILED' "$OUT/quick/$t.log" | head -3 | tr '\n' ' ')"
done
