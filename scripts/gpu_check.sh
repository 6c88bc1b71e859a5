#!/usr/bin/env bash
# Device-machine check of the QJL score and fused decode kernels without CMake: builds the GPU test
# binaries and benchmarks with nvcc directly (in parallel), runs the tests, then the benchmarks.
# Meant for one `device` call; logs go to $OUT.   bash scripts/gpu_check.sh [decode bench args...]
set -uo pipefail
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
tail -3 "$OUT"/b*.log
for t in score_test dec_test enc_test; do
  ./build-dev/$t 2>&1 | tee "$OUT/$t.log" | grep -E "FAILED|PASSED|Failure" | head -20
done
./build-dev/bench_score 2>&1 | tee "$OUT/bench_score.log" | grep -E "^\||device|copy" | head -40
./build-dev/bench_enc 2>&1 | tee "$OUT/bench_enc.log" | grep -E "^\||device|copy" | head -30
./build-dev/bench_dec "$@" 2>&1 | tee "$OUT/bench_dec.log" | grep -E "^\||device|copy" | head -60
