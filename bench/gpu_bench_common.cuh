#pragma once
// Timing and bandwidth helpers for the CUDA benchmarks (bench/bench_gpu*.cu).
//  * time_runs: median of `runs` warmed-up runs timed with CUDA events (back-to-back on one stream),
//    plus the per-run time of one CUDA graph replaying all runs (no host launch cost). Run r uses
//    input copy r % copies, so the working set rotates through more memory than the L2 holds.
//  * copy_bandwidth_gbs: device-to-device cudaMemcpyAsync of 1 GiB, bytes read + written.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvq/cuda/check.cuh"

namespace kvq_bench {

inline constexpr std::size_t kL2Exceed = 200ull << 20;

struct Timing {
    float median_us = 0, graph_us = 0;
};

template <class F>
Timing time_runs(cudaStream_t stream, int runs, int copies, F&& f) {
    for (int i = 0; i < std::max(5, copies); ++i) f(i % copies);
    KVQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<cudaEvent_t> ev(runs + 1);
    for (auto& e : ev) KVQ_CUDA_CHECK(cudaEventCreate(&e));
    KVQ_CUDA_CHECK(cudaEventRecord(ev[0], stream));
    for (int r = 0; r < runs; ++r) {
        f(r % copies);
        KVQ_CUDA_CHECK(cudaEventRecord(ev[r + 1], stream));
    }
    KVQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<float> t(runs);
    for (int r = 0; r < runs; ++r) KVQ_CUDA_CHECK(cudaEventElapsedTime(&t[r], ev[r], ev[r + 1]));
    std::nth_element(t.begin(), t.begin() + runs / 2, t.end());
    Timing out{t[runs / 2] * 1000.f, 0.f};
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    KVQ_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    for (int r = 0; r < runs; ++r) f(r % copies);
    KVQ_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    KVQ_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    KVQ_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    KVQ_CUDA_CHECK(cudaEventRecord(ev[0], stream));
    KVQ_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    KVQ_CUDA_CHECK(cudaEventRecord(ev[1], stream));
    KVQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    float ms = 0;
    KVQ_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[0], ev[1]));
    out.graph_us = ms * 1000.f / runs;
    KVQ_CUDA_CHECK(cudaGraphExecDestroy(exec));
    KVQ_CUDA_CHECK(cudaGraphDestroy(graph));
    for (auto& e : ev) KVQ_CUDA_CHECK(cudaEventDestroy(e));
    return out;
}

// How many input copies to rotate: enough to exceed kL2Exceed bytes, at most what half the free
// memory holds.
inline int copies_for(std::size_t bytes, std::size_t per_copy_alloc) {
    std::size_t free_b = 0, total_b = 0;
    KVQ_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    std::size_t want = (kL2Exceed + bytes - 1) / std::max<std::size_t>(bytes, 1);
    want = std::clamp<std::size_t>(want, 1, 32);
    const std::size_t fit = std::max<std::size_t>(1, (free_b / 2) / std::max<std::size_t>(per_copy_alloc, 1));
    return static_cast<int>(std::min(want, fit));
}

inline double copy_bandwidth_gbs(cudaStream_t stream, int runs) {
    const std::size_t n = 1ull << 30;
    void *a, *b;
    KVQ_CUDA_CHECK(cudaMalloc(&a, n));
    KVQ_CUDA_CHECK(cudaMalloc(&b, n));
    KVQ_CUDA_CHECK(cudaMemset(a, 1, n));
    const float us = time_runs(stream, runs, 1, [&](int) {
                         KVQ_CUDA_CHECK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, stream));
                     }).median_us;
    KVQ_CUDA_CHECK(cudaFree(a));
    KVQ_CUDA_CHECK(cudaFree(b));
    return 2.0 * n / (us * 1e-6) / 1e9;
}

// Deterministic pseudo-random fp16 values in [-1.5, 1.5) * amp.
__global__ void fill_half_kernel(__half* p, std::size_t n, std::uint32_t seed, float amp) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x) {
        std::uint32_t x = static_cast<std::uint32_t>(i) * 2654435761u ^ seed;
        x ^= x >> 15;
        x *= 2246822519u;
        x ^= x >> 13;
        p[i] = __float2half((static_cast<float>(x & 0xFFFF) / 65536.f - 0.5f) * 3.f * amp);
    }
}
inline void fill_half(cudaStream_t s, __half* p, std::size_t n, std::uint32_t seed, float amp = 1.f) {
    fill_half_kernel<<<2048, 256, 0, s>>>(p, n, seed, amp);
    KVQ_CUDA_CHECK_LAUNCH("fill_half_kernel");
}

}  // namespace kvq_bench
