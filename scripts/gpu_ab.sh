#!/usr/bin/env bash
# One device call for A/B runs of the opt-in tuning macros against the default build:
#   1. variant builds in the background (bench + test binary per macro);
#   2. scripts/gpu_check.sh: the default build's GPU tests and all three benchmarks;
#   3. each variant's tests, then its benchmark rows at 64k tokens (batch 1 and 8).
#   bash scripts/gpu_ab.sh [--runs N]
#   bash scripts/gpu_ab.sh --build-only   (build every binary here, e.g. to carry them: KVQ_PREBUILT=1)
# Variants (macro: what it changes; where it is described):
#   KVQ_TC_INT_3CTA=1      int4 K + V decode (d 128, G 1) at 3 CTAs per SM instead of 2 (decode_attention_tc.cuh)
# (Earlier variants, decided and removed: KVQ_TC_LEAN became the default QJL decode tile body,
# KVQ_QJL_ENC_2CTA measured slower; bench/GPU_NOTES.md round 4.)
# Logs go to $OUT (packed into logs.tgz by gpu_check.sh and ab.tgz here).
set -uo pipefail
OUT=${OUT:-/tmp/kvq-gpu-out}
RUNS=20 BUILD_ONLY=0
if [[ "${1:-}" == "--runs" ]]; then RUNS=$2; fi
if [[ "${1:-}" == "--build-only" ]]; then BUILD_ONLY=1; fi
mkdir -p "$OUT/ab" build-dev
trap 'cd "$OUT" && tar czf ab.tgz --remove-files ab 2>/dev/null' EXIT
source "$(dirname "$0")/gpu_build.sh"
build dec_test_int3 tests/gpu/test_decode_attention.cu -DKVQ_TC_INT_3CTA=1 -lgtest -lgtest_main &
build bench_dec_int3 bench/bench_gpu_decode.cu -DKVQ_TC_INT_3CTA=1 &
if ((BUILD_ONLY)); then
    wait
    exec bash scripts/gpu_check.sh --build-only
fi
bash scripts/gpu_check.sh --runs "$RUNS" 2>&1 | tee "$OUT/ab/default.log" | grep -E "PASSED|FAILED|device:" | head -20
wait
for t in dec_test_int3; do
    [[ -x build-dev/$t ]] || continue
    ./build-dev/$t 2>&1 | tee "$OUT/ab/$t.log" | grep -E "FAILED|PASSED|Failure" | head -10 | sed "s/^/$t: /"
done
row() { grep -E "^\|" | grep -E "$1" | grep -E "\| 65536 \|"; }
variant() {  # binary row-pattern: the variant's benchmark at 64k tokens, its matching rows
    [[ -x build-dev/$1 ]] || return 0
    ./build-dev/$1 --runs "$RUNS" --tokens 65536 >"$OUT/ab/$1.log" 2>&1
    row "$2" <"$OUT/ab/$1.log" | sed "s/^/$1: /"
}
echo "== default (gpu_check.sh) vs variants, 64k tokens, graph us in column 5"
row "tensor cores\]" <"$OUT/ab/default.log" | sed "s/^/default: /"
variant bench_dec_int3 "tensor cores\]"
