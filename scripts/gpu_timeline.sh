#!/usr/bin/env bash
# Device-machine timeline of the tensor-core decode and score kernels at 64k tokens x 32 heads: builds
# the two benchmarks with -DKVQ_TIMELINE (kvq/cuda/timeline.cuh: per-CTA %globaltimer stamps) and prints
# when CTAs start, get their first data, stop streaming and exit (bench/gpu_timeline.cuh). Full outputs
# in $OUT.
#   bash scripts/gpu_timeline.sh [--build-only]
# With KVQ_PREBUILT=1, binaries already in build-dev/ are not rebuilt (see gpu_build.sh).
set -uo pipefail
OUT=${OUT:-/tmp/kvq-gpu-out}
mkdir -p "$OUT" build-dev
source "$(dirname "$0")/gpu_build.sh"
build bench_dec_tl bench/bench_gpu_decode.cu -DKVQ_TIMELINE &
build bench_score_tl bench/bench_gpu.cu -lcublas -DKVQ_TIMELINE &
wait
if [[ "${1:-}" == "--build-only" ]]; then exit 0; fi
for cfg in 0 1 2; do
  for batch in 1 8; do
    ./build-dev/bench_dec_tl --cfg $cfg --batch $batch --tokens 65536 --runs 10 --timeline \
      >"$OUT/timeline_dec_cfg${cfg}_b$batch.txt" 2>&1
    grep -E "^timeline|tensor cores\]" "$OUT/timeline_dec_cfg${cfg}_b$batch.txt"
  done
done
for T in 4096 65536; do
  ./build-dev/bench_score_tl --tokens $T --runs 20 --no-cublas --timeline >"$OUT/timeline_score_$T.txt" 2>&1
  grep -E "^timeline|^\| tc" "$OUT/timeline_score_$T.txt"
done
