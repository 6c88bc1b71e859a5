#pragma once
// Shared by the GPU encode kernels (tokenwise_encode.cuh, qjl_encode.cuh): the argument structs, their
// checks, and the row addressing of the paged target (docs/FORMAT.md; encode.cuh says how rows map
// to blocks).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kvq/core/half.hpp"
#include "kvq/cuda/check.cuh"
#include "kvq/cuda/qjl_score.cuh"
#include "kvq/quant/codec.hpp"
#include "kvq/quant/tokenwise_codec.hpp"

namespace kvq::cuda {

struct EncodeTarget {
    int head_dim = 0;  // 64, 128 or 256
    int n_kv_heads = 0;
    int batch = 0;
    int n_tokens = 0;                   // tokens per sequence in this call
    const void* x = nullptr;            // device, see the header comment
    QueryType x_type = QueryType::F32;  // fp32 or fp16 elements
    std::int64_t x_token_stride = 0;    // elements between tokens; 0 -> n_kv_heads * head_dim
    std::int64_t x_batch_stride = 0;    // elements between sequences; 0 -> n_tokens * token stride
    const int* pos0 = nullptr;          // device [batch]: first stream position written
    BlockLayout layout{};
    std::uint8_t* pool = nullptr;  // block p at pool + p * block_bytes
    std::size_t block_bytes = 0;
    const std::uint32_t* pages = nullptr;  // [batch][n_kv_heads][page_stride]
    std::int64_t page_stride = 0;
};

struct TokenwiseEncodeArgs : EncodeTarget {
    int bits = 0, group = 0;
    // Optional WKV static smoothing of this layer, device [n_kv_heads][head_dim] each (both or none).
    const float* shift = nullptr;
    const float* scale = nullptr;
    // The same bytes from a kernel that codes by reciprocal with an exact fallback and takes 8 rows
    // per warp (tested on the H100; 9-13% faster than the division kernel for int2/int4, slower for WKV).
    bool reciprocal_codes = false;
    // Default: the same bytes from tw_encode_vec_kernel (tokenwise_encode.cuh says how: a thread per 8 channels,
    // 16-byte loads with 8 tokens in flight per thread, adjacent tokens' codes stored together, no
    // per-element division, ~80 instructions per d = 128 row). H100, 64k tokens x 32 heads, fp16 in:
    // int2 242 us (87% of copy bandwidth), int4 267 us, WKV int4 g128 393 us, against 1016 / 1062 /
    // 1100 us for the division kernel. Groups of fewer than 8 channels keep the kernel that
    // reciprocal_codes selects; false selects it everywhere (A/B runs).
    bool vector_kernel = true;
};

struct QjlEncodeArgs : EncodeTarget {
    int m = 0, m_outlier = 0, outliers = 0, sketch_rows = 0;
    const float* sketch = nullptr;  // device [sketch_rows][head_dim] (QjlKeyCodec::sketch())
    // fp16 input without outliers runs qjl_encode_f16_kernel (qjl_encode.cuh); true keeps the previous
    // kernel (every shape) for comparison. The bytes are the same either way.
    bool legacy_kernel = false;
};

template <class TokCodec>
void set_tokenwise_codec(TokenwiseEncodeArgs& a, const TokCodec& c, int block_tokens) {
    a.head_dim = c.params().head_dim;
    a.bits = c.params().bits;
    a.group = c.params().group;
    a.layout = c.layout(block_tokens);
    if (a.block_bytes == 0) a.block_bytes = a.layout.bytes();
}
template <class QjlCodec>
void set_qjl_codec(QjlEncodeArgs& a, const QjlCodec& c, int block_tokens) {
    a.head_dim = c.head_dim();
    a.m = c.params().m;
    a.m_outlier = c.outlier_bits();
    a.outliers = c.params().outliers;
    a.sketch_rows = c.sketch_rows();
    a.layout = c.layout(block_tokens);
    if (a.block_bytes == 0) a.block_bytes = a.layout.bytes();
}

namespace detail {

inline CheckResult enc_check_target(const EncodeTarget& a, const char* who) {
    auto fail = [&](std::string msg) { return CheckResult{false, std::string(who) + ": " + std::move(msg)}; };
    const int d = a.head_dim;
    if (d != 64 && d != 128 && d != 256) return fail("head_dim must be 64, 128 or 256, got " + std::to_string(d));
    if (a.n_kv_heads <= 0 || a.n_kv_heads > 65535) return fail("n_kv_heads must be in [1, 65535]");
    if (a.batch <= 0 || a.batch > 65535) return fail("batch must be in [1, 65535]");
    if (a.n_tokens < 0 || a.n_tokens > (1 << 26)) return fail("n_tokens must be in [0, 2^26]");
    const std::int64_t ts = a.x_token_stride ? a.x_token_stride : std::int64_t(a.n_kv_heads) * d;
    if (ts < std::int64_t(a.n_kv_heads) * d || ts % 8 != 0)
        return fail("x_token_stride must be 0 or a multiple of 8 of at least n_kv_heads * head_dim");
    if (a.x_batch_stride != 0 && (a.x_batch_stride < ts * a.n_tokens || a.x_batch_stride % 8 != 0))
        return fail("x_batch_stride must be 0 or a multiple of 8 of at least n_tokens * token stride");
    const std::uint32_t B = a.layout.block_tokens;
    if (B == 0 || (B & (B - 1)) != 0) return fail("layout.block_tokens must be a power of two");
    if (a.block_bytes < a.layout.bytes() || a.block_bytes % 16 != 0)
        return fail("block_bytes must be a multiple of 16 and at least layout.bytes()");
    if (a.page_stride < 0) return fail("page_stride must be >= 0");
    if (a.n_tokens > 0 && (!a.x || !a.pos0 || !a.pool || !a.pages)) return fail("x, pos0, pool and pages must be set");
    if (reinterpret_cast<std::uintptr_t>(a.pool) % 16 != 0 || reinterpret_cast<std::uintptr_t>(a.x) % 16 != 0)
        return fail("pool and x must be 16-byte aligned");
    return {};
}

struct EncRow {
    std::uint8_t* blk;
    int tok;
};

__device__ __forceinline__ EncRow enc_row(const EncodeTarget& a, int b, int t, int h) {
    const int pos = __ldg(a.pos0 + b) + t;
    const int B = static_cast<int>(a.layout.block_tokens), sh = __ffs(B) - 1;
    const std::uint32_t page = __ldg(a.pages + (std::size_t(b) * a.n_kv_heads + h) * a.page_stride + (pos >> sh));
    return EncRow{a.pool + std::size_t(page) * a.block_bytes, pos & (B - 1)};
}

template <int CPL>
__device__ __forceinline__ void enc_load(const EncodeTarget& a, std::size_t off, float v[CPL]) {
    if (a.x_type == QueryType::F32) {
        const float* p = static_cast<const float*>(a.x) + off;
#pragma unroll
        for (int i = 0; i < CPL; i += 2) {
            const float2 f = __ldg(reinterpret_cast<const float2*>(p + i));
            v[i] = f.x;
            v[i + 1] = f.y;
        }
    } else {
        const __half* p = static_cast<const __half*>(a.x) + off;
#pragma unroll
        for (int i = 0; i < CPL; i += 2) {
            const __half2 f = __ldg(reinterpret_cast<const __half2*>(p + i));
            v[i] = __low2float(f);
            v[i + 1] = __high2float(f);
        }
    }
}

__device__ __forceinline__ std::size_t enc_x_offset(const EncodeTarget& a, int b, int t, int h) {
    const std::int64_t ts = a.x_token_stride ? a.x_token_stride : std::int64_t(a.n_kv_heads) * a.head_dim;
    const std::int64_t bs = a.x_batch_stride ? a.x_batch_stride : ts * a.n_tokens;
    return std::size_t(b) * bs + std::size_t(t) * ts + std::size_t(h) * a.head_dim;
}

// fp32 -> fp16 bits, round to nearest even: the hardware conversion, bit-identical to
// kvq::float_to_half for every finite input (inputs are validated finite).
__device__ __forceinline__ half_t enc_f2h(float f) { return half_t{__half_as_ushort(__float2half_rn(f))}; }
__device__ __forceinline__ float enc_h2f(half_t h) { return __half2float(__ushort_as_half(h.bits)); }

}  // namespace detail
}  // namespace kvq::cuda
