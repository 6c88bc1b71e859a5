#!/usr/bin/env bash
# Device-machine profile (Nsight Compute) at 64k tokens x 32 heads, batch 1:
#  1. every kernel of one fused decode call (QJL keys + int2 values: projection, query quantisation,
#     tensor-core kernel, tail, combine) with the speed-of-light, launch and occupancy sections, so the
#     fixed costs around the main kernel are visible;
#  2. the full section set for one launch each of the tensor-core decode, the tensor-core score, the
#     QJL encode and the token-wise encode kernels.
# Text reports in $OUT (packed into logs.tgz); a summary on stdout.
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
NCU=(ncu --clock-control none)
KEYS="Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Executed Ipc Active|Issue Slots Busy|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|No Eligible|Theoretical Occupancy|Block Limit|Grid Size|Dynamic Shared"
# One decode call: its five launches, light sections.
"${NCU[@]}" --section SpeedOfLight --section LaunchStats --section Occupancy \
  -k "regex:qjl_project|qjl_quantize|decode_" --launch-count 5 \
  ./build-dev/bench_dec --runs 3 --batch 1 --tokens 65536 >"$OUT/ncu_dec_pipeline.txt" 2>&1
grep -E "^  [a-z_]+.*\(|Duration|Grid Size|DRAM Throughput" "$OUT/ncu_dec_pipeline.txt" | head -40 | sed "s/^/pipeline: /"
prof() {  # name kernel-regex command...
  local name=$1 k=$2; shift 2
  "${NCU[@]}" --set full --launch-skip 2 --launch-count 1 -k "regex:$k" "$@" >"$OUT/ncu_$name.txt" 2>&1
  grep -E "$KEYS" "$OUT/ncu_$name.txt" | head -24 | sed "s/^/$name: /"
  # the stall reasons of the warp-state section, one line each
  grep -E "Stall|stall" "$OUT/ncu_$name.txt" | head -12 | sed "s/^/$name: /"
}
prof dec_tc decode_tc_kernel ./build-dev/bench_dec --runs 3 --batch 1 --tokens 65536
prof score_tc qjl_score_tc_kernel ./build-dev/bench_score --runs 3 --tokens 65536 --no-cublas
prof enc_qjl qjl_encode_kernel ./build-dev/bench_enc --runs 3 --batch 1 --tokens 65536
