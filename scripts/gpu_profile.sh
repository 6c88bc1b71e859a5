#!/usr/bin/env bash
# Device-machine profile (Nsight Compute) of the QJL encode, score and fused decode kernels at
# 64k tokens x 32 heads, batch 1: one launch each, full section set, text reports in $OUT.
#   bash scripts/gpu_profile.sh
set -uo pipefail
trap 'cd "$OUT" && tar czf logs.tgz --remove-files *.log *.txt 2>/dev/null' EXIT
OUT=${OUT:-/tmp/kvq-gpu-out}
mkdir -p "$OUT" build-dev
FLAGS=(-std=c++20 -arch=sm_90 -O3 -lineinfo -Iinclude -Icuda -I/usr/include/eigen3 -diag-suppress 20012,20013,20014,20015)
nvcc "${FLAGS[@]}" bench/bench_gpu.cu -lcublas -o build-dev/bench_score >"$OUT/b3.log" 2>&1 &
nvcc "${FLAGS[@]}" bench/bench_gpu_decode.cu -o build-dev/bench_dec >"$OUT/b4.log" 2>&1 &
nvcc "${FLAGS[@]}" bench/bench_gpu_encode.cu -lcublas -o build-dev/bench_enc >"$OUT/b6.log" 2>&1 &
wait
NCU=(ncu --clock-control none --set full --launch-skip 2 --launch-count 1)
prof() {  # name kernel-regex command...
  local name=$1 k=$2; shift 2
  "${NCU[@]}" -k "regex:$k" "$@" >"$OUT/ncu_$name.txt" 2>&1
  grep -E "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Executed Ipc Active|Issue Slots Busy|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|No Eligible|Theoretical Occupancy|Block Limit" "$OUT/ncu_$name.txt" | head -24 | sed "s/^/$name: /"
}
prof enc_qjl qjl_encode_kernel ./build-dev/bench_enc --runs 3 --batch 1 --tokens 65536
prof enc_tw tw_encode_kernel ./build-dev/bench_enc --runs 3 --batch 1 --tokens 65536
prof dec_tc decode_tc_kernel ./build-dev/bench_dec --runs 3 --batch 1 --tokens 65536
prof score_tc qjl_score_tc_kernel ./build-dev/bench_score --runs 3 --tokens 65536 --no-cublas
