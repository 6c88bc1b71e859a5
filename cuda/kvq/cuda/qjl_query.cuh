#pragma once
// The int8 bit-sliced QJL query, on the GPU: the device twin of QjlKeyCodec::prepare_fast's SIMD
// preparation (kvq/quant/qjl_key_codec.hpp, cpu::quantize_i8_scalar). From the projection p = S q
// (m floats per query head, qjl_project_kernel), per head:
//   s = max_j |p_j| / 127,  u_j = clamp(rint(p_j / s), -127, 127)  (s = 0 -> u = 0),  usum = sum_j u_j,
// stored as 8 bit planes (plane n, bit j = bit n of the byte u_j), so that for a key with sign bits b
//   T = sum_j b_j u_j = sum_{n<7} 2^n popc(b & P_n) - 128 popc(b & P_7),
//   est = sqrt(pi/2)/m * s * ||k|| * (2T - usum)
// exactly as the CPU's bit-sliced scorer. |est - est_exact| <= sqrt(pi/2)/m * ||k|| * m s / 2.
// Also written: the dequantized projection u_j * s (for paths that score with float tables, so that
// every GPU path scores with the same quantized query).
//
// Per-head record (QjlQueryLayout, 16-byte aligned):
//   uint32 planes[8][words]   words = ceil(m / 256) * 8 (zero beyond m: 256-bit tensor-core steps)
//   float  s, int32 usum, 2 x uint32 zero
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace kvq::cuda {

struct QjlQueryLayout {
    int m = 0;
    int words = 0;  // per plane
    __host__ __device__ static QjlQueryLayout of(int m) { return {m, (m + 255) / 256 * 8}; }
    __host__ __device__ std::size_t record_words() const { return std::size_t(8) * words + 4; }
    __host__ __device__ std::size_t record_bytes() const { return record_words() * 4; }
};

namespace detail {

// Programmatic dependent launch (sm_90): the query preparation lets the score kernel start early
// (its page-table reads and code copies do not depend on the query), and the score kernel waits
// for the preparation's results only where it first reads them. Both are no-ops when the launch
// carries no programmatic dependency.
__device__ __forceinline__ void qjl_pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void qjl_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// grid: query heads; block: ceil(m / 32) warps (m <= 1024). proj [heads][m] -> rec [heads][record_words],
// projq [heads][m] (u * s). This grid may be a programmatic dependent of the projection: it waits for
// it before reading proj. early_trigger: the launch after this one (a programmatic dependent that waits
// for this grid before it reads the records) may start at once, i.e. during the projection; else only
// after this grid's wait.
static __global__ void qjl_quantize_query_kernel(const float* proj, int m, std::uint32_t* rec, float* projq,
                                                 bool early_trigger) {
    __shared__ float s_max[32];
    __shared__ int s_sum[32];
    const QjlQueryLayout L = QjlQueryLayout::of(m);
    const int h = blockIdx.x, j = threadIdx.x, lane = j % 32, warp = j / 32, nw = blockDim.x / 32;
    if (early_trigger) qjl_pdl_launch_dependents();
    qjl_pdl_wait();
    if (!early_trigger) qjl_pdl_launch_dependents();
    const float p = j < m ? proj[std::size_t(h) * m + j] : 0.f;
    float mx = fabsf(p);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    if (lane == 0) s_max[warp] = mx;
    __syncthreads();
    float amax = 0.f;
    for (int w = 0; w < nw; ++w) amax = fmaxf(amax, s_max[w]);
    const float s = amax > 0.f ? __fdiv_rn(amax, 127.0f) : 0.f;
    int u = 0;
    if (s > 0.f && j < m) u = min(127, max(-127, __float2int_rn(__fdiv_rn(p, s))));
    int sum = u;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) s_sum[warp] = sum;
    std::uint32_t* r = rec + std::size_t(h) * L.record_words();
    const unsigned byte = static_cast<unsigned>(u) & 0xFFu;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
        const std::uint32_t word = __ballot_sync(0xffffffffu, (byte >> n) & 1u);
        if (lane == 0) r[std::size_t(n) * L.words + warp] = word;
    }
    // Zero words beyond the last warp (up to the 256-bit step).
    for (int e = j; e < 8 * L.words; e += blockDim.x)
        if (e % L.words >= nw) r[e] = 0u;
    if (j < m) projq[std::size_t(h) * m + j] = static_cast<float>(u) * s;
    __syncthreads();
    if (j == 0) {
        int total = 0;
        for (int w = 0; w < nw; ++w) total += s_sum[w];
        r[8 * L.words] = __float_as_uint(s);
        r[8 * L.words + 1] = static_cast<std::uint32_t>(total);
        r[8 * L.words + 2] = 0u;
        r[8 * L.words + 3] = 0u;
    }
}

}  // namespace detail
}  // namespace kvq::cuda
