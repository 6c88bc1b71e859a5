#pragma once
// Warp-level tensor-core primitives (namespace kvq::cuda::tc, internal) used by the QJL scorer and the fused decode
// attention, with the fragment layouts written out once (PTX ISA, "Matrix fragments for mma.m16n8k*"). In every shape,
// lane = 4 * g + t with g = lane / 4 ("groupID") and t = lane % 4 ("threadID_in_group").
//
// bmma_m16n8k256_popc: C[16][8] += popc(A_row AND B_col) over 256 bits (BMMA on sm_80+; native on
// sm_90, SASS "BMMA.168256.AND.POPC").
//   a[0]: row g,     bits [32t, 32t+32)        a[1]: row g + 8, same bits
//   a[2]: row g,     bits [128+32t, 128+32t+32) a[3]: row g + 8, same bits
//   b[0]: col g,     bits [32t, 32t+32)        b[1]: col g, bits [128+32t, ...)
//   c[0], c[1]: row g, cols 2t, 2t+1           c[2], c[3]: row g + 8, cols 2t, 2t+1
// Bit i of a 32-bit register is element i of its range (LSB first).
//
// mma_m16n8k16_f16: D[16][8] (fp32) += A[16][16] (fp16) * B[16][8] (fp16).
//   a[0] = {A[g][2t], A[g][2t+1]}   a[1] = {A[g+8][2t], A[g+8][2t+1]}
//   a[2] = {A[g][2t+8], A[g][2t+9]} a[3] = {A[g+8][2t+8], A[g+8][2t+9]}
//   b[0] = {B[2t][g], B[2t+1][g]}   b[1] = {B[2t+8][g], B[2t+9][g]}
//   d[0], d[1]: row g, cols 2t, 2t+1; d[2], d[3]: row g + 8 (low half of a register = first element).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kvq::cuda::tc {

__device__ __forceinline__ void bmma_m16n8k256_popc(int c[4], const std::uint32_t a[4], const std::uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    (void)c, (void)a, (void)b;
    __trap();  // kvq::cuda requires sm_80 or newer (can_implement checks the device)
#endif
}

__device__ __forceinline__ void mma_m16n8k16_f16(float d[4], const std::uint32_t a[4], const std::uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    (void)d, (void)a, (void)b;
    __trap();
#endif
}

// {lo16(x), lo16(y)} and {hi16(x), hi16(y)}: one PRMT each.
__device__ __forceinline__ std::uint32_t prmt_lo(std::uint32_t x, std::uint32_t y) { return __byte_perm(x, y, 0x5410); }
__device__ __forceinline__ std::uint32_t prmt_hi(std::uint32_t x, std::uint32_t y) { return __byte_perm(x, y, 0x7632); }

// Two fp32 values as fp16 {lo, hi} (round to nearest even), packed in one register.
__device__ __forceinline__ std::uint32_t pack_half2(float lo, float hi) {
    std::uint32_t r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float half_lo_to_float(std::uint32_t h2) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(h2 & 0xFFFFu)));
}
__device__ __forceinline__ float half_hi_to_float(std::uint32_t h2) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(h2 >> 16)));
}

// The cache line of p into L1: a hint (no fault, no result) that lets a load issued later hit.
__device__ __forceinline__ void prefetch_l1(const void* p) { asm volatile("prefetch.global.L1 [%0];" ::"l"(p)); }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// sm_90 bulk copies (the async proxy) completing on a shared-memory mbarrier. A warp that stages
// whole contiguous ranges issues them from one lane: one instruction per range instead of one per
// 16 bytes and lane. dst, src and bytes must be multiples of 16.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define KVQ_TC_HAS_BULK_COPY 1
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(std::uint64_t* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// Makes initialised barriers visible to the async proxy (the bulk copies that complete on them).
__device__ __forceinline__ void fence_mbar_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Orders this thread's earlier generic-proxy shared-memory accesses before later async-proxy ones
// (a stage is overwritten by a bulk copy after the warp has read it).
__device__ __forceinline__ void fence_proxy_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// One arrival on `bar` that also expects `bytes` of bulk-copy completions in the current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(std::uint64_t* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, unsigned bytes, std::uint64_t* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     smem_addr(dst)),
                 "l"(src), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
}
// Blocks until the phase with parity `parity` of `bar` has completed.
__device__ __forceinline__ void mbar_wait(std::uint64_t* bar, unsigned parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n"
        "}\n" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
}
#endif

}  // namespace kvq::cuda::tc
