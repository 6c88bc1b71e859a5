#pragma once
// Profiling aid, compiled in only with -DKVQ_TIMELINE (the benchmarks' --timeline): instrumented
// kernels stamp %globaltimer (ns, one clock for all SMs) at fixed points of each CTA, so that a
// benchmark can show when CTAs start, get their first data, stop streaming and exit — what ncu's
// kernel-wide averages hide (bench/GPU_NOTES.md, round 6: the decode's ~8 us merge at the end of
// every CTA). Without the macro KVQ_TIMELINE_STAMP expands to nothing and its arguments are not
// evaluated. The stamps of the last launch of any instrumented kernel are kept, per linear CTA index:
//   [0] SM id  [1] entry  [2 + w] warp w's first data (w < 4)  [6 + w] warp w's loop end
//   [10] exit  [11] positions of the CTA  [12] a kernel-specific phase (see the kernel)
#include <cuda_runtime.h>

#if defined(KVQ_TIMELINE)
namespace kvq::cuda::detail {
inline constexpr int kTimelineCtas = 32768, kTimelineFields = 16;
__device__ unsigned long long kvq_timeline[kTimelineCtas][kTimelineFields];
__device__ __forceinline__ unsigned long long timeline_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ unsigned timeline_smid() {
    unsigned s;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(s));
    return s;
}
__device__ __forceinline__ void timeline_stamp(int field, unsigned long long v) {
    const unsigned cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    if (cta < unsigned(kTimelineCtas)) kvq_timeline[cta][field] = v;
}
}  // namespace kvq::cuda::detail
#define KVQ_TIMELINE_STAMP(field, value) ::kvq::cuda::detail::timeline_stamp(field, value)
#define KVQ_TIMELINE_NOW() ::kvq::cuda::detail::timeline_now()
#define KVQ_TIMELINE_SMID() ::kvq::cuda::detail::timeline_smid()
#else
#define KVQ_TIMELINE_STAMP(field, value) ((void)0)
#endif
