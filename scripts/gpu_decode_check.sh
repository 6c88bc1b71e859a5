#!/usr/bin/env bash
# Device-machine check of the fused decode attention (tests + benchmark) without CMake: builds the
# decode test binary and the decode benchmark with nvcc directly (in parallel), runs the GPU tests
# of decode attention, then the benchmark. Used inside one `device` call; writes logs to $OUT.
#   bash scripts/gpu_decode_check.sh [bench args...]
set -uo pipefail
OUT=${OUT:-/tmp/kvq-gpu-out}
mkdir -p "$OUT" build-dev
FLAGS=(-std=c++20 -arch=sm_90 -O3 -Iinclude -Icuda -I/usr/include/eigen3 -diag-suppress 20012,20013,20014,20015)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
nvcc "${FLAGS[@]}" tests/gpu/test_decode_attention.cu -lgtest -lgtest_main -o build-dev/dec_test >"$OUT/build_test.log" 2>&1 &
p1=$!
nvcc "${FLAGS[@]}" -DKVQ_TC_NORMAL_A tests/gpu/test_decode_attention.cu -lgtest -lgtest_main -o build-dev/dec_test_normal >"$OUT/build_test_normal.log" 2>&1 &
p2=$!
nvcc "${FLAGS[@]}" bench/bench_gpu_decode.cu -o build-dev/bench_dec >"$OUT/build_bench.log" 2>&1 &
p3=$!
wait $p1 || { echo "test build failed"; tail -20 "$OUT/build_test.log"; }
./build-dev/dec_test --gtest_filter='DecodeAttentionGpu.TensorCore*' 2>&1 | tee "$OUT/tc_test.log" | grep -E "^\[decode\]|FAIL|OK \]|PASSED|Failure|gpu " | head -60
wait $p3 || { echo "bench build failed"; tail -20 "$OUT/build_bench.log"; }
wait $p2
if grep -q FAILED "$OUT/tc_test.log"; then
  echo "=== normal-A variant"
  ./build-dev/dec_test_normal --gtest_filter='DecodeAttentionGpu.TensorCore*' 2>&1 | grep -E "^\[decode\]|FAIL|PASSED" | head -30
fi
./build-dev/dec_test 2>&1 | tee "$OUT/all_test.log" | grep -E "FAILED|PASSED|^\[  FAILED" | head -20
./build-dev/bench_dec "$@" 2>&1 | tee "$OUT/bench.log" | grep -E "^\||device|copy" | head -60
