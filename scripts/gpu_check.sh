#!/usr/bin/env bash
# Device-machine check of the QJL score and fused decode kernels without CMake: builds the GPU test
# binaries and benchmarks with nvcc directly (in parallel), runs the tests, then the benchmarks.
# Meant for one `device` call; logs go to $OUT.
#   bash scripts/gpu_check.sh [--sanitize] [decode bench args...]
# --sanitize: after the tests, compute-sanitizer memcheck and racecheck on each test binary (the test
# that feeds CUDA a bad call on purpose is left out: the sanitizer counts that API error), then stop.
set -uo pipefail
# The device call returns a limited number of files: pack every log into one archive on exit.
trap 'cd "$OUT" && tar czf logs.tgz --remove-files *.log 2>/dev/null' EXIT
SANITIZE=0
if [[ "${1:-}" == "--sanitize" ]]; then SANITIZE=1; shift; fi
OUT=${OUT:-/tmp/kvq-gpu-out}
mkdir -p "$OUT" build-dev
FLAGS=(-std=c++20 -arch=sm_90 -O3 -Iinclude -Icuda -I/usr/include/eigen3 -diag-suppress 20012,20013,20014,20015)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
nvcc "${FLAGS[@]}" tests/gpu/test_qjl_score.cu -lgtest -lgtest_main -o build-dev/score_test >"$OUT/b1.log" 2>&1 &
nvcc "${FLAGS[@]}" tests/gpu/test_decode_attention.cu -lgtest -lgtest_main -o build-dev/dec_test >"$OUT/b2.log" 2>&1 &
nvcc "${FLAGS[@]}" bench/bench_gpu.cu -lcublas -o build-dev/bench_score >"$OUT/b3.log" 2>&1 &
nvcc "${FLAGS[@]}" bench/bench_gpu_decode.cu -o build-dev/bench_dec >"$OUT/b4.log" 2>&1 &
nvcc "${FLAGS[@]}" tests/gpu/test_encode.cu -lgtest -lgtest_main -o build-dev/enc_test >"$OUT/b5.log" 2>&1 &
nvcc "${FLAGS[@]}" bench/bench_gpu_encode.cu -lcublas -o build-dev/bench_enc >"$OUT/b6.log" 2>&1 &
wait
tail -n 3 "$OUT"/b*.log
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
