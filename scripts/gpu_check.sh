#!/usr/bin/env bash
# Device-machine check of the QJL score and fused decode kernels without CMake: builds the GPU test
# binaries and benchmarks with nvcc directly (in parallel), runs the tests, then the benchmarks.
# Meant for one `device` call; logs go to $OUT.
#   bash scripts/gpu_check.sh [--sanitize] [decode bench args...]
#   bash scripts/gpu_check.sh --build-only   (on any machine with nvcc: build the binaries and stop)
# --sanitize: after the tests, compute-sanitizer memcheck and racecheck on each test binary (the test
# that feeds CUDA a bad call on purpose is left out: the sanitizer counts that API error), then stop.
# Binaries already in build-dev/ that load (KVQ_PREBUILT=1, e.g. built here with --build-only and
# carried to the device) are not rebuilt: device time is the scarce resource, CPU time is not.
set -uo pipefail
# The device call returns a limited number of files: pack every log into one archive on exit.
trap 'cd "$OUT" && tar czf logs.tgz --remove-files *.log 2>/dev/null' EXIT
SANITIZE=0 BUILD_ONLY=0
if [[ "${1:-}" == "--sanitize" ]]; then SANITIZE=1; shift; fi
if [[ "${1:-}" == "--build-only" ]]; then BUILD_ONLY=1; shift; fi
OUT=${OUT:-/tmp/kvq-gpu-out}
mkdir -p "$OUT" build-dev
source "$(dirname "$0")/gpu_build.sh"
build score_test tests/gpu/test_qjl_score.cu -lgtest -lgtest_main &
build dec_test tests/gpu/test_decode_attention.cu -lgtest -lgtest_main &
build bench_score bench/bench_gpu.cu -lcublas &
build bench_dec bench/bench_gpu_decode.cu &
build enc_test tests/gpu/test_encode.cu -lgtest -lgtest_main &
build bench_enc bench/bench_gpu_encode.cu -lcublas &
wait
if ((BUILD_ONLY)); then exit 0; fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for t in score_test dec_test enc_test; do
  ./build-dev/$t 2>&1 | tee "$OUT/$t.log" | grep -E "FAILED|PASSED|Failure" | head -20
done
if ((SANITIZE)); then
  for t in score_test dec_test enc_test; do
    for tool in memcheck racecheck; do
      compute-sanitizer --tool $tool --error-exitcode 3 ./build-dev/$t --gtest_filter=-*CudaErrors* \
        >"$OUT/san_${tool}_$t.log" 2>&1
      echo "$tool $t: rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/san_${tool}_$t.log" | tail -1)"
    done
  done
  exit 0
fi
./build-dev/bench_score 2>&1 | tee "$OUT/bench_score.log" | grep -E "^\||device|copy" | head -60
./build-dev/bench_enc 2>&1 | tee "$OUT/bench_enc.log" | grep -E "^\||device|copy" | head -80
./build-dev/bench_dec "$@" 2>&1 | tee "$OUT/bench_dec.log" | grep -E "^\||device|copy" | head -120
