#!/usr/bin/env bash
# One device call for A/B runs of opt-in tuning macros against the default build:
#   1. scripts/gpu_check.sh: the default build's GPU tests and all three benchmarks;
#   2. the default's tensor-core decode rows at 64k tokens (batch 1 and 8), the baseline a variant's
#      rows are compared with.
#   bash scripts/gpu_ab.sh [--runs N]
#   bash scripts/gpu_ab.sh --build-only   (build every binary here, e.g. to carry them: KVQ_PREBUILT=1)
# Variants: none open. A variant adds its builds (bench + test binary with -DMACRO=...) in the
# background before gpu_check.sh, then its tests and its 64k rows after the default's.
# (Earlier variants, decided and removed: KVQ_TC_LEAN became the default QJL decode tile body,
# KVQ_QJL_ENC_2CTA and the 3-CTA int4 decode measured slower; bench/GPU_NOTES.md, docs/CUDA.md.)
# Logs go to $OUT (packed into logs.tgz by gpu_check.sh and ab.tgz here).
set -uo pipefail
OUT=${OUT:-/tmp/kvq-gpu-out}
RUNS=20 BUILD_ONLY=0
if [[ "${1:-}" == "--runs" ]]; then RUNS=$2; fi
if [[ "${1:-}" == "--build-only" ]]; then BUILD_ONLY=1; fi
if ((BUILD_ONLY)); then exec bash scripts/gpu_check.sh --build-only; fi
mkdir -p "$OUT/ab" build-dev
trap 'cd "$OUT" && tar czf ab.tgz --remove-files ab 2>/dev/null' EXIT
bash scripts/gpu_check.sh --runs "$RUNS" 2>&1 | tee "$OUT/ab/default.log" | grep -E "PASSED|FAILED|device:" | head -20
row() { grep -E "^\|" | grep -E "$1" | grep -E "\| 65536 \|"; }
echo "== default (gpu_check.sh), 64k tokens, graph us in column 5"
row "tensor cores\]" <"$OUT/ab/default.log" | sed "s/^/default: /"
