#!/usr/bin/env bash
# The short form of scripts/gpu_ab.sh for a device call with little time: only the 64k-token rows of
# the benchmarks, then every GPU test binary, so that a call cut short still brings the figures.
# Expects the binaries of `bash scripts/gpu_ab.sh --build-only` in build-dev/ (built here if missing).
# Logs: $OUT/quick.tgz.
#   bash scripts/gpu_ab_64k.sh [--runs N]
set -uo pipefail
OUT=${OUT:-/tmp/kvq-gpu-out}
RUNS=20
if [[ "${1:-}" == "--runs" ]]; then RUNS=$2; fi
mkdir -p "$OUT/quick" build-dev
trap 'cd "$OUT" && tar czf quick.tgz --remove-files quick 2>/dev/null' EXIT
for b in bench_score bench_dec bench_enc score_test dec_test enc_test; do
    [[ -x build-dev/$b ]] || {
        KVQ_PREBUILT=1 bash scripts/gpu_ab.sh --build-only
        break
    }
done
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
rows enc bench_enc "QJL m=256|int2|int4|WKV"
for t in score_test dec_test enc_test; do
    ./build-dev/$t >"$OUT/quick/$t.log" 2>&1
    echo "$t: rc $? $(grep -cE '^\[       OK' "$OUT/quick/$t.log") ok, $(grep -E '^\[  PASSED|^\[  FAILED' "$OUT/quick/$t.log" | head -3 | tr '\n' ' ')"
done
# Nsight Compute of the WKV batch-1 decode kernel (69% of copy at batch 1 vs 89% at batch 8, round 5).
if command -v ncu >/dev/null; then
    ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats -k regex:decode_tc --launch-skip 2 --launch-count 1 \
        ./build-dev/bench_dec --runs 2 --batch 1 --tokens 65536 --cfg 2 >"$OUT/quick/ncu_wkv_b1.txt" 2>&1
    grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Grid Size|Waves Per SM|Block Limit|Warp Cycles Per Issued|Dynamic Shared" \
        "$OUT/quick/ncu_wkv_b1.txt" | head -20 | sed "s/^/ncu_wkv_b1: /"
fi
