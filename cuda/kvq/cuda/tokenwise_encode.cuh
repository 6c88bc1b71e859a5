#pragma once
// GPU token-wise encode straight into paged blocks, byte for byte the CPU codecs' format
// (docs/FORMAT.md): launch_tokenwise_encode writes kvq::TokenwiseCodec blocks (b = 2, 4, 8): QJL's
// values, the int-b baselines and, with the static shift/scale of a layer set, WKVQuant's 2-D codec
// (x~ = (x - shift) / scale, then token-wise; what WkvKvCache + WkvCodec store). The default kernel
// (TokenwiseEncodeArgs::vector_kernel) gives a thread 8 channels of a run of tokens and replaces the
// divisions by reciprocals with exact corrections; the reference kernel (vector_kernel = false) takes
// one warp per (token, KV head) row with kvq::tokenwise_quantize_group's arithmetic, operation for
// operation (IEEE division, no contraction). All write the CPU's bytes (tests compare them).
// Input, addressing and launcher rules: encode.cuh.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "kvq/cuda/encode_common.cuh"
#include "kvq/cuda/mma.cuh"

namespace kvq::cuda {
namespace detail {

// ---------------------------------------------------------------------------------------------
// Token-wise encode: one warp per (sequence, token, KV head) row, lane owns CPL = d/32 channels.
inline constexpr int kTwRowsPerWarp = 4;

template <int CPL, int BITS>
__global__ void __launch_bounds__(256) tw_encode_kernel(TokenwiseEncodeArgs a) {
    constexpr int R = kTwRowsPerWarp;
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * R;  // within the sequence
    const int nrows = a.n_tokens * a.n_kv_heads;
    if (row0 >= nrows) return;
    const int b = blockIdx.y, d = a.head_dim;
    float v[R][CPL];
    EncRow rr[R];
#pragma unroll
    for (int k = 0; k < R; ++k) {
        const int row = row0 + k < nrows ? row0 + k : row0;
        enc_load<CPL>(a, enc_x_offset(a, b, row / a.n_kv_heads, row % a.n_kv_heads) + lane * CPL, v[k]);
        rr[k] = enc_row(a, b, row / a.n_kv_heads, row % a.n_kv_heads);
    }
#pragma unroll
    for (int k = 0; k < R; ++k) {
        const int row = row0 + k;
        if (row >= nrows) break;
        const int h = row % a.n_kv_heads;
        if (a.shift != nullptr) {
#pragma unroll
            for (int i = 0; i < CPL; ++i) {
                const int c = h * d + lane * CPL + i;
                v[k][i] = __fdiv_rn(__fsub_rn(v[k][i], __ldg(a.shift + c)), __ldg(a.scale + c));
            }
        }
        // Group of g channels = GL lanes (g is a multiple of CPL, GL a power of two).
        const int GL = a.group / CPL;
        float lo = v[k][0], hi = v[k][0];
#pragma unroll
        for (int i = 1; i < CPL; ++i) {
            lo = v[k][i] < lo ? v[k][i] : lo;
            hi = v[k][i] > hi ? v[k][i] : hi;
        }
        for (int off = 1; off < GL; off <<= 1) {
            const float ol = __shfl_xor_sync(0xffffffffu, lo, off), oh = __shfl_xor_sync(0xffffffffu, hi, off);
            lo = ol < lo ? ol : lo;
            hi = oh > hi ? oh : hi;
        }
        constexpr int levels = (1 << BITS) - 1;
        const half_t step_h = enc_f2h(__fdiv_rn(__fsub_rn(hi, lo), static_cast<float>(levels)));
        const half_t lo_h = enc_f2h(lo);
        const float step = enc_h2f(step_h), lo_r = enc_h2f(lo_h);
        unsigned long long w = 0;
#pragma unroll
        for (int i = 0; i < CPL; ++i) {
            int c = 0;
            if (step > 0.0f) {
                const float q = floorf(__fadd_rn(__fdiv_rn(__fsub_rn(v[k][i], lo_r), step), 0.5f));
                c = q < 0.0f ? 0 : (q > static_cast<float>(levels) ? levels : static_cast<int>(q));
            }
            w |= static_cast<unsigned long long>(c) << (i * BITS);
        }
        const EncRow r = rr[k];
        std::uint8_t* codes = r.blk + std::size_t(r.tok) * a.layout.code_bytes;
        constexpr int LB = CPL * BITS;  // bits per lane
        if constexpr (LB == 4) {
            const unsigned o = __shfl_down_sync(0xffffffffu, static_cast<unsigned>(w), 1);
            if ((lane & 1) == 0) codes[lane / 2] = static_cast<std::uint8_t>(w | (o << 4));
        } else if constexpr (LB == 8) {
            codes[lane] = static_cast<std::uint8_t>(w);
        } else if constexpr (LB == 16) {
            reinterpret_cast<std::uint16_t*>(codes)[lane] = static_cast<std::uint16_t>(w);
        } else if constexpr (LB == 32) {
            reinterpret_cast<std::uint32_t*>(codes)[lane] = static_cast<std::uint32_t>(w);
        } else {
            reinterpret_cast<unsigned long long*>(codes)[lane] = w;
        }
        if (lane % GL == 0) {
            const int ng = d / a.group, grp = lane / GL;
            std::uint16_t* side = reinterpret_cast<std::uint16_t*>(r.blk + a.layout.token_side_offset());
            side[std::size_t(r.tok) * ng + grp] = step_h.bits;
            side[std::size_t(a.layout.block_tokens) * ng + std::size_t(r.tok) * ng + grp] = lo_h.bits;
        }
    }
}

// Token-wise encode, reciprocal path (TokenwiseEncodeArgs::reciprocal_codes): the same bytes with
// fewer instructions per row. Codes come from u * (1 / step) through kvq::tokenwise_code_by_reciprocal
// (exact except within 2^-12 of a rounding boundary, where the lane divides as above); 8 rows per
// warp with their loads issued together; the (token, head) of each row is stepped, not divided for.
inline constexpr int kTwFastRowsPerWarp = 8;

// The division formula for one value: the rare fallback, kept out of line.
__device__ __noinline__ int tw_code_by_division(float u, float step, int levels) {
    if (!(step > 0.0f)) return 0;
    const float q = floorf(__fadd_rn(__fdiv_rn(u, step), 0.5f));
    return q < 0.0f ? 0 : (q > static_cast<float>(levels) ? levels : static_cast<int>(q));
}

template <int CPL, int BITS>
__global__ void __launch_bounds__(256) tw_encode_fast_kernel(TokenwiseEncodeArgs a) {
    constexpr int R = kTwFastRowsPerWarp, D = 32 * CPL, levels = (1 << BITS) - 1;
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * R;  // row = token * H + head
    const int H = a.n_kv_heads, nrows = a.n_tokens * H;
    if (row0 >= nrows) return;
    const int b = blockIdx.y;
    const std::int64_t ts = a.x_token_stride ? a.x_token_stride : std::int64_t(H) * D;
    const std::int64_t bs = a.x_batch_stride ? a.x_batch_stride : ts * a.n_tokens;
    const int sh = __ffs(static_cast<int>(a.layout.block_tokens)) - 1;
    const int bmask = static_cast<int>(a.layout.block_tokens) - 1;
    const int pos_b = __ldg(a.pos0 + b);
    const std::uint32_t* pages_b = a.pages + std::size_t(b) * H * a.page_stride;
    const int GL = a.group / CPL;  // lanes per group (a power of two)
    const int ng = D / a.group, grp = lane / GL;
    const std::size_t side_off = a.layout.token_side_offset() + std::size_t(grp) * 2;
    const std::size_t mins_off = std::size_t(a.layout.block_tokens) * ng;  // in fp16 elements
    float v[R][CPL];
    std::uint8_t* codes[R];  // the row's code bytes
    std::uint16_t* side[R];  // the row's fp16 step of this lane's group; its minimum is mins_off further
    int head[R];
    auto load_rows = [&](auto f16_c) {
        constexpr bool F16 = decltype(f16_c)::value;
        using E = std::conditional_t<F16, __half, float>;
        // Pointers step from row to row: next head (+D elements, +page_stride entries), or next token
        // after the last head.
        int t = row0 / H, h = row0 - t * H;
        const E* p =
            static_cast<const E*>(a.x) + std::size_t(b) * bs + std::size_t(t) * ts + std::size_t(h) * D + lane * CPL;
        const std::uint32_t* pg = pages_b + std::size_t(h) * a.page_stride;
        const std::int64_t x_wrap = ts - std::int64_t(H - 1) * D, pg_wrap = -std::int64_t(H - 1) * a.page_stride;
#pragma unroll
        for (int k = 0; k < R; ++k) {
            if (row0 + k < nrows) {
                if constexpr (F16) {  // CPL halves: one 4, 8 or 16-byte load
                    __half2 hv[CPL / 2];
                    if constexpr (CPL == 2) {
                        hv[0] = __ldg(reinterpret_cast<const __half2*>(p));
                    } else if constexpr (CPL == 4) {
                        const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
                        hv[0] = *reinterpret_cast<const __half2*>(&u.x);
                        hv[1] = *reinterpret_cast<const __half2*>(&u.y);
                    } else {
                        const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
                        hv[0] = *reinterpret_cast<const __half2*>(&u.x);
                        hv[1] = *reinterpret_cast<const __half2*>(&u.y);
                        hv[2] = *reinterpret_cast<const __half2*>(&u.z);
                        hv[3] = *reinterpret_cast<const __half2*>(&u.w);
                    }
#pragma unroll
                    for (int i = 0; i < CPL / 2; ++i) {
                        const float2 f = __half22float2(hv[i]);
                        v[k][2 * i] = f.x;
                        v[k][2 * i + 1] = f.y;
                    }
                } else {  // CPL floats: 8, 16 or 32 bytes
                    if constexpr (CPL == 2) {
                        const float2 f = __ldg(reinterpret_cast<const float2*>(p));
                        v[k][0] = f.x, v[k][1] = f.y;
                    } else {
#pragma unroll
                        for (int i = 0; i < CPL; i += 4) {
                            const float4 f = __ldg(reinterpret_cast<const float4*>(p + i));
                            v[k][i] = f.x, v[k][i + 1] = f.y, v[k][i + 2] = f.z, v[k][i + 3] = f.w;
                        }
                    }
                }
                const int pos = pos_b + t, tok = pos & bmask;
                std::uint8_t* blk = a.pool + std::size_t(__ldg(pg + (pos >> sh))) * a.block_bytes;
                codes[k] = blk + std::size_t(tok) * a.layout.code_bytes;
                side[k] = reinterpret_cast<std::uint16_t*>(blk + side_off) + std::size_t(tok) * ng;
                head[k] = h;
            }
            const bool wrap = ++h == H;
            h = wrap ? 0 : h;
            t += wrap;
            p += wrap ? x_wrap : D;
            pg += wrap ? pg_wrap : a.page_stride;
        }
    };
    if (a.x_type == QueryType::F16)
        load_rows(std::true_type{});
    else
        load_rows(std::false_type{});
#pragma unroll
    for (int k = 0; k < R; ++k) {
        if (row0 + k >= nrows) break;
        if (a.shift != nullptr) {
#pragma unroll
            for (int i = 0; i < CPL; ++i) {
                const int c = head[k] * D + lane * CPL + i;
                v[k][i] = __fdiv_rn(__fsub_rn(v[k][i], __ldg(a.shift + c)), __ldg(a.scale + c));
            }
        }
        float lo = v[k][0], hi = v[k][0];
#pragma unroll
        for (int i = 1; i < CPL; ++i) {
            lo = v[k][i] < lo ? v[k][i] : lo;
            hi = v[k][i] > hi ? v[k][i] : hi;
        }
#pragma unroll
        for (int off = 1; off < 32; off <<= 1)
            if (off < GL) {
                const float ol = __shfl_xor_sync(0xffffffffu, lo, off), oh = __shfl_xor_sync(0xffffffffu, hi, off);
                lo = ol < lo ? ol : lo;
                hi = oh > hi ? oh : hi;
            }
        const half_t step_h = enc_f2h(__fdiv_rn(__fsub_rn(hi, lo), static_cast<float>(levels)));
        const half_t lo_h = enc_f2h(lo);
        const float step = enc_h2f(step_h), lo_r = enc_h2f(lo_h);
        // r within 1 ulp of 1 / step (what tokenwise_code_by_reciprocal needs): the hardware
        // approximation (<= 1 ulp for normal inputs; an fp16 step >= 2^-24 is normal in fp32) refined by
        // one Newton step. step == 0 or NaN gives r = 0: every code is 0, as the formula says;
        // step = inf gives NaN codes, hence the division.
        float r = 0.0f;
        if (step > 0.0f) {
            float r0;
            asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r0) : "f"(step));
            r = __fmaf_rn(r0, __fmaf_rn(-step, r0, 1.0f), r0);
        }
        unsigned long long w = 0;
        bool undecided = false;
#pragma unroll
        for (int i = 0; i < CPL; ++i) {
            const int c = tokenwise_code_by_reciprocal(__fsub_rn(v[k][i], lo_r), r, levels);
            undecided |= c < 0;
            w |= static_cast<unsigned long long>(c & levels) << (i * BITS);
        }
        if (undecided) {  // rare: within 2^-12 of a rounding boundary
            w = 0;
#pragma unroll
            for (int i = 0; i < CPL; ++i)
                w |= static_cast<unsigned long long>(tw_code_by_division(__fsub_rn(v[k][i], lo_r), step, levels))
                     << (i * BITS);
        }
        constexpr int LB = CPL * BITS;  // bits per lane
        if constexpr (LB == 4) {
            const unsigned o = __shfl_down_sync(0xffffffffu, static_cast<unsigned>(w), 1);
            if ((lane & 1) == 0) codes[k][lane / 2] = static_cast<std::uint8_t>(w | (o << 4));
        } else if constexpr (LB == 8) {
            codes[k][lane] = static_cast<std::uint8_t>(w);
        } else if constexpr (LB == 16) {
            reinterpret_cast<std::uint16_t*>(codes[k])[lane] = static_cast<std::uint16_t>(w);
        } else if constexpr (LB == 32) {
            reinterpret_cast<std::uint32_t*>(codes[k])[lane] = static_cast<std::uint32_t>(w);
        } else {
            reinterpret_cast<unsigned long long*>(codes[k])[lane] = w;
        }
        if ((lane & (GL - 1)) == 0) {
            side[k][0] = step_h.bits;
            side[k][mins_off] = lo_h.bits;
        }
    }
}

// Token-wise encode, vector path (TokenwiseEncodeArgs::vector_kernel; groups of >= 8 channels). The
// previous kernels spend most of their instructions on work a whole warp repeats per row (shuffles,
// the step division, addressing) and on per-element divisions; this one is organised around the
// stores and amortises that work:
//  * A CTA takes one (sequence, KV head) and 8 * S * (256 / d) consecutive tokens, so the head's
//    smoothing constants are loaded once per thread and the tokens a warp finishes per step are
//    adjacent rows of the same block: their code bytes (and side data) form one contiguous segment.
//  * A thread owns 8 consecutive channels: one 16-byte load (fp16) per token, S tokens in flight per
//    thread; a group of g channels spans g / 8 lanes (shuffle rounds only above 8 channels).
//  * fp16 input: minimum and maximum in fp16 (exact: the conversion to fp32 preserves order), the
//    pair (min, -max) reduced as one half2; the minimum is then its own fp16 rounding, so x - lo >= 0.
//    min/max instructions treat -0 and +0 as they like, the CPU keeps the first of equal values: a
//    group whose minimum or maximum is zero redoes the reduction the CPU's way (rare, warp-uniform).
//  * (hi - lo) / L: q0 = (hi - lo) * RN(1/L), one FMA residual, one FMA correction; equal to the
//    division for every float in [2^-60, 2^100] and L = 3, 15, 255 (checked exhaustively on the CPU,
//    all ~1.3e9 floats of the range per L); outside that range the kernel divides.
//  * codes: tokenwise_code_by_reciprocal's decision with the clamp moved before the rounding (q in
//    [0, L], so only its |d| test is needed; fp16 input needs no clamp at all, see kNoClamp), and the
//    codes packed by adding the rounded floats' bits (each is bits(1.5 * 2^23) + code) shifted into
//    place and subtracting the constant part. Values within 2^-12 of a rounding boundary (about one
//    in 2^11 on random data) are recoded by division, out of the hot path.
//  * WKV smoothing (x - shift) / scale: CUDA's own division sequence (MUFU.RCP, one Newton step, q0,
//    one FMA residual and correction) with the reciprocal part done once per channel; correct
//    wherever the hardware's FCHK would pass. The kernel checks a smaller range, |x - shift| in
//    [2^-90, 2^90] (zero excluded: its sign needs the division; for fp16 input the upper bound comes
//    from |shift| <= 2^80 per channel) and |scale| in [2^-30, 2^30], and divides outside it.
//  * A warp's S * RPS tokens normally sit in one block (FULL): one page lookup, no bounds checks, and
//    store addresses that are the first token's plus constants.
inline constexpr int kTwVecWarps = 8;

template <bool F16>
inline constexpr int kTwVecSteps = F16 ? 8 : 4;  // tokens per lane; 16 / 32 bytes of input each

template <int D, int BITS, bool F16, bool WKV>
__global__ void __launch_bounds__(kTwVecWarps * 32, WKV ? 3 : 4) tw_encode_vec_kernel(TokenwiseEncodeArgs a) {
    constexpr int LPR = D / 8, RPS = 32 / LPR, S = kTwVecSteps<F16>, levels = (1 << BITS) - 1;
    constexpr float kL = static_cast<float>(levels), kRound = 12582912.0f;  // 1.5 * 2^23
    constexpr unsigned kRoundBits = 0x4B400000u;
    using E = std::conditional_t<F16, __half, float>;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sr = lane / LPR, cl = lane % LPR;  // row of the step, 8-channel slot in the row
    const int h = blockIdx.y, b = blockIdx.z, H = a.n_kv_heads;
    const int t0 = (blockIdx.x * kTwVecWarps + warp) * (S * RPS) + sr;
    if (t0 - sr >= a.n_tokens) return;  // whole warp past the end
    const std::int64_t ts = a.x_token_stride ? a.x_token_stride : std::int64_t(H) * D;
    const std::int64_t bs = a.x_batch_stride ? a.x_batch_stride : ts * a.n_tokens;
    const int lg = __ffs(a.group) - 1;  // group = 2^lg >= 8: lanes per group GL = 2^(lg - 3) <= LPR
    const int GL = 1 << (lg - 3), ng = D >> lg, grp = cl >> (lg - 3);
    const bool leader = (cl & (GL - 1)) == 0;
    const int sh_b = __ffs(static_cast<int>(a.layout.block_tokens)) - 1;
    const int bmask = static_cast<int>(a.layout.block_tokens) - 1;
    const int pos_b = __ldg(a.pos0 + b);
    const std::uint32_t* pg = a.pages + (std::size_t(b) * H + h) * a.page_stride;
    // Offsets inside a block fit 32 bits (BlockLayout sizes are 32-bit; the launcher takes this kernel
    // only for block_bytes < 2^32), so a row's addresses are one wide multiply-add and 32-bit offsets.
    const unsigned side_off = static_cast<unsigned>(a.layout.token_side_offset()) + grp * 2;
    const unsigned mins_off = a.layout.block_tokens * ng * 2;  // bytes from a step to its minimum
    const unsigned side_tok = ng * 2, code_lane = cl * BITS, bbytes = static_cast<unsigned>(a.block_bytes);

    // A warp's chunk of S * RPS tokens normally lies in one block and before the end: then (FULL) the
    // page is looked up once, no token needs a bounds check, and the step's store addresses are the
    // first token's plus constants.
    const int base = t0 - sr;
    const bool full =
        base + S * RPS <= a.n_tokens && ((pos_b + base) >> sh_b) == ((pos_b + base + S * RPS - 1) >> sh_b);
    auto run = [&](auto full_c) {
        constexpr bool FULL = decltype(full_c)::value;
        // Loads of all S tokens first (and their pages), so S * 16 or 32 bytes per lane are in flight.
        uint4 raw[S][F16 ? 1 : 2];
        std::uint32_t page[FULL ? 1 : S];
        // 64-bit address arithmetic once; per token one 64-bit add.
        const char* xp = static_cast<const char*>(a.x) +
                         (std::size_t(b) * bs + std::size_t(t0) * ts + std::size_t(h) * D + cl * 8) * sizeof(E);
        const std::size_t x_step = std::size_t(ts) * RPS * sizeof(E);
        if constexpr (FULL) page[0] = __ldg(pg + ((pos_b + base) >> sh_b));
#pragma unroll
        for (int s = 0; s < S; ++s) {
            const int t = t0 + s * RPS;
            if (FULL || t < a.n_tokens) {
                const uint4* p = reinterpret_cast<const uint4*>(xp + s * x_step);
                raw[s][0] = __ldcs(p);
                if constexpr (!F16) raw[s][1] = __ldcs(p + 1);
                if constexpr (!FULL) page[s] = __ldg(pg + ((pos_b + t) >> sh_b));
            } else {
                raw[s][0] = make_uint4(0, 0, 0, 0);
                if constexpr (!F16) raw[s][1] = make_uint4(0, 0, 0, 0);
                if constexpr (!FULL) page[s] = 0;
            }
        }
        // After the loads are issued: the smoothing constants of this thread's channels.
        [[maybe_unused]] float shf[8], scl[8], rsc[8];
        [[maybe_unused]] bool scale_ok = true;
        if constexpr (WKV) {
            const float* shp = a.shift + std::size_t(h) * D + cl * 8;
            const float* scp = a.scale + std::size_t(h) * D + cl * 8;
#pragma unroll
            for (int i = 0; i < 8; ++i) {  // once per thread; shift / scale need no particular alignment
                shf[i] = __ldg(shp + i);
                scl[i] = __ldg(scp + i);
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                float y0;  // the reciprocal part of __fdiv_rn's fast path, as its SASS does it
                asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y0) : "f"(scl[i]));
                rsc[i] = __fmaf_rn(y0, __fmaf_rn(-scl[i], y0, 1.0f), y0);
                scale_ok &= fabsf(scl[i]) >= 0x1p-30f && fabsf(scl[i]) <= 0x1p30f;
                if constexpr (F16) scale_ok &= fabsf(shf[i]) <= 0x1p80f;  // then |x - shift| < 2^90
            }
        }
        const unsigned tok0 = static_cast<unsigned>((pos_b + t0) & bmask);  // FULL: token s is tok0 + s RPS
        std::uint8_t* blk0 = a.pool + static_cast<unsigned long long>(page[0]) * bbytes;
#pragma unroll
        for (int s = 0; s < S; ++s) {
            const int t = t0 + s * RPS;
            float v[8];
            float lo, hi;
            bool exact_minmax;
            if constexpr (F16 && !WKV) {
                __half2 hv[4];
                std::memcpy(hv, &raw[s][0], 16);
                const __half2 mn = __hmin2(__hmin2(hv[0], hv[1]), __hmin2(hv[2], hv[3]));
                const __half2 mx = __hmax2(__hmax2(hv[0], hv[1]), __hmax2(hv[2], hv[3]));
                // (min, -max) as one half2: sign flip and pairing by bit operations (PRMT, LOP3).
                unsigned mnu, mxu;
                std::memcpy(&mnu, &mn, 4);
                std::memcpy(&mxu, &mx, 4);
                mxu ^= 0x80008000u;
                const unsigned pl = __byte_perm(mnu, mxu, 0x5410), ph = __byte_perm(mnu, mxu, 0x7632);
                __half2 pl2, ph2;
                std::memcpy(&pl2, &pl, 4);
                std::memcpy(&ph2, &ph, 4);
                __half2 c = __hmin2(pl2, ph2);
#pragma unroll
                for (int off = 1; off < LPR; off <<= 1)
                    if (off < GL) c = __hmin2(c, __shfl_xor_sync(0xffffffffu, c, off));
                lo = __low2float(c);
                hi = -__high2float(c);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float2 f = __half22float2(hv[i]);
                    v[2 * i] = f.x, v[2 * i + 1] = f.y;
                }
                exact_minmax = !__any_sync(0xffffffffu, lo == 0.0f || hi == 0.0f);
            } else {
                float x[8];
                if constexpr (F16) {
                    __half2 hv[4];
                    std::memcpy(hv, &raw[s][0], 16);
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const float2 f = __half22float2(hv[i]);
                        x[2 * i] = f.x, x[2 * i + 1] = f.y;
                    }
                } else {
                    std::memcpy(x, &raw[s][0], 32);
                }
                if constexpr (WKV) {
                    bool ok = scale_ok;
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        const float u = __fsub_rn(x[i], shf[i]);
                        const float q0 = __fmul_rn(u, rsc[i]);
                        v[i] = __fmaf_rn(rsc[i], __fmaf_rn(-scl[i], q0, u), q0);
                        if constexpr (F16)
                            ok &= fabsf(u) >= 0x1p-90f;
                        else
                            ok &= fabsf(u) >= 0x1p-90f && fabsf(u) <= 0x1p90f;
                    }
                    if (!ok) {  // rare: the division itself (inline: a call would put v on the stack)
#pragma unroll
                        for (int i = 0; i < 8; ++i) v[i] = __fdiv_rn(__fsub_rn(x[i], shf[i]), scl[i]);
                    }
                } else {
#pragma unroll
                    for (int i = 0; i < 8; ++i) v[i] = x[i];
                }
                lo = v[0], hi = v[0];
#pragma unroll
                for (int i = 1; i < 8; ++i) lo = fminf(lo, v[i]), hi = fmaxf(hi, v[i]);
#pragma unroll
                for (int off = 1; off < LPR; off <<= 1)
                    if (off < GL) {
                        lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
                        hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
                    }
                exact_minmax = !__any_sync(0xffffffffu, lo == 0.0f || hi == 0.0f);
            }
            if (!exact_minmax) {
                // A zero minimum or maximum: the CPU's order (first of equal values in channel order; the
                // butterfly keeps the lower lane's on ties, so the group's first lane gets the CPU's).
                lo = v[0], hi = v[0];
#pragma unroll
                for (int i = 1; i < 8; ++i) {
                    lo = v[i] < lo ? v[i] : lo;
                    hi = v[i] > hi ? v[i] : hi;
                }
#pragma unroll
                for (int off = 1; off < LPR; off <<= 1)
                    if (off < GL) {
                        const float ol = __shfl_xor_sync(0xffffffffu, lo, off);
                        const float oh = __shfl_xor_sync(0xffffffffu, hi, off);
                        lo = ol < lo ? ol : lo;
                        hi = oh > hi ? oh : hi;
                    }
            }
            const float diff = __fsub_rn(hi, lo);
            float stepf;
            if (diff >= 0x1p-60f && diff <= 0x1p100f) {
                const float q0 = __fmul_rn(diff, 1.0f / kL);
                stepf = __fmaf_rn(__fmaf_rn(-kL, q0, diff), 1.0f / kL, q0);
            } else {
                stepf = __fdiv_rn(diff, kL);  // zero (either sign), tiny, huge or NaN
            }
            const half_t step_h = enc_f2h(stepf), lo_h = enc_f2h(lo);
            const float step = enc_h2f(step_h), lo_r = enc_h2f(lo_h);
            float r = 0.0f;  // as in tw_encode_fast_kernel: within 1 ulp of 1 / step
            if (step > 0.0f) {
                float r0;
                asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r0) : "f"(step));
                r = __fmaf_rn(r0, __fmaf_rn(-step, r0, 1.0f), r0);
            }
            // fp16 without smoothing: lo_r == lo <= every value, so q >= 0; and with a normal fp16 step
            // (relative error <= 2^-11) q <= (hi - lo) r <= L (1 + 2^-11 + 2^-21) < L + 1/2, so
            // round(q) <= L: no clamps. A subnormal step (a group narrower than ~2^-14 L) divides.
            constexpr bool kNoClamp = F16 && !WKV;
            const bool step_ok = (step >= (kNoClamp ? 0x1p-14f : 0.0f) && step < INFINITY) || !(step > 0.0f);
            float worst = step_ok ? 0.0f : 1.0f;  // else every value divides
            unsigned wv[BITS == 8 ? 2 : 1] = {};
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                float q = __fmul_rn(__fsub_rn(v[i], lo_r), r);
                if constexpr (!kNoClamp) q = fminf(fmaxf(q, 0.0f), kL);
                const float tr = __fadd_rn(q, kRound);
                worst = fmaxf(worst, fabsf(__fsub_rn(q, __fsub_rn(tr, kRound))));
                constexpr int per_word = 32 / BITS < 8 ? 32 / BITS : 8;
                wv[i / per_word] += __float_as_uint(tr) << ((i % per_word) * BITS);
            }
            unsigned long long w;
            {
                constexpr int per_word = 32 / BITS < 8 ? 32 / BITS : 8;
                unsigned cst = 0;
                for (int i = 0; i < per_word; ++i) cst += kRoundBits << (i * BITS);
                if constexpr (BITS == 8)
                    w = static_cast<unsigned long long>(wv[0] - cst) |
                        (static_cast<unsigned long long>(wv[1] - cst) << 32);
                else
                    w = wv[0] - cst;
            }
            if (worst > 0.5f - 0x1p-12f) {
                // Rare (about one value in 2^11 on random data): redo the values within 2^-12 of a rounding
                // boundary (all of them when step_ok fails) by division; only those fields change. With
                // step_ok every code above is in [0, L], so no field spilled into its neighbour.
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const float u = __fsub_rn(v[i], lo_r);
                    float q = __fmul_rn(u, r);
                    if constexpr (!kNoClamp) q = fminf(fmaxf(q, 0.0f), kL);
                    const float dd = __fsub_rn(q, __fsub_rn(__fadd_rn(q, kRound), kRound));
                    if (!step_ok || fabsf(dd) > 0.5f - 0x1p-12f) {
                        const unsigned long long c = static_cast<unsigned>(tw_code_by_division(u, step, levels));
                        w = (w & ~(static_cast<unsigned long long>(levels) << (i * BITS))) | (c << (i * BITS));
                    }
                }
            }
            if (FULL || t < a.n_tokens) {
                const unsigned tok = FULL ? tok0 + s * RPS : static_cast<unsigned>((pos_b + t) & bmask);
                std::uint8_t* blk = FULL ? blk0 : a.pool + static_cast<unsigned long long>(page[s]) * bbytes;
                std::uint8_t* codes = blk + (tok * (D * BITS / 8) + code_lane);
                if constexpr (BITS == 2)
                    *reinterpret_cast<std::uint16_t*>(codes) = static_cast<std::uint16_t>(w);
                else if constexpr (BITS == 4)
                    *reinterpret_cast<std::uint32_t*>(codes) = static_cast<std::uint32_t>(w);
                else
                    *reinterpret_cast<unsigned long long*>(codes) = w;
                if (leader) {
                    std::uint8_t* side = blk + (side_off + tok * side_tok);
                    *reinterpret_cast<std::uint16_t*>(side) = step_h.bits;
                    *reinterpret_cast<std::uint16_t*>(side + mins_off) = lo_h.bits;
                }
            }
        }
    };
    if (full)
        run(std::true_type{});
    else
        run(std::false_type{});
}

}  // namespace detail

inline CheckResult can_implement(const TokenwiseEncodeArgs& a) {
    const char* who = "kvq::cuda::launch_tokenwise_encode";
    CheckResult r = detail::enc_check_target(a, who);
    if (!r.ok) return r;
    auto fail = [&](std::string msg) { return CheckResult{false, std::string(who) + ": " + std::move(msg)}; };
    const int d = a.head_dim, cpl = d / 32;
    if (a.bits != 2 && a.bits != 4 && a.bits != 8) return fail("bits must be 2, 4 or 8 (3-bit codes stay on the CPU)");
    if (a.group < cpl || a.group > d || d % a.group != 0 || (a.group & (a.group - 1)) != 0)
        return fail("group must be a power of two in [head_dim / 32, head_dim]");
    if (a.layout.code_bytes != std::uint32_t(d * a.bits / 8) ||
        a.layout.token_side_bytes != std::uint32_t(4 * (d / a.group)) || a.layout.block_side_bytes != 0)
        return fail("layout does not match the token-wise parameters (use set_tokenwise_codec)");
    if ((a.shift == nullptr) != (a.scale == nullptr)) return fail("shift and scale must be given together");
    if (std::int64_t(a.n_tokens) * a.n_kv_heads >= (std::int64_t(1) << 31) - 256)
        return fail("n_tokens * n_kv_heads must stay below 2^31");
    return {};
}

inline void launch_tokenwise_encode(const TokenwiseEncodeArgs& a, cudaStream_t stream, void* /*workspace*/ = nullptr,
                                    std::size_t /*workspace_bytes*/ = 0) {
    const CheckResult ok = can_implement(a);
    KVQ_CHECK(ok.ok, ok.message);
    const std::size_t rows = std::size_t(a.n_tokens) * a.n_kv_heads;
    if (rows == 0) return;
    if (a.vector_kernel && a.group >= 8 && a.block_bytes < (std::size_t(1) << 32)) {
        const bool f16 = a.x_type == QueryType::F16, wkv = a.shift != nullptr;
        const int rps = 256 / a.head_dim, steps = f16 ? detail::kTwVecSteps<true> : detail::kTwVecSteps<false>;
        const int per_cta = detail::kTwVecWarps * steps * rps;
        const dim3 grid(static_cast<unsigned>((a.n_tokens + per_cta - 1) / per_cta),
                        static_cast<unsigned>(a.n_kv_heads), static_cast<unsigned>(a.batch));
        auto go = [&](auto kernel) {
            kernel<<<grid, detail::kTwVecWarps * 32, 0, stream>>>(a);
            KVQ_CUDA_CHECK_LAUNCH("tw_encode_vec_kernel");
        };
        auto with_in = [&](auto d_c, auto bits_c) {
            constexpr int Dc = decltype(d_c)::value, Bc = decltype(bits_c)::value;
            if (f16)
                wkv ? go(detail::tw_encode_vec_kernel<Dc, Bc, true, true>)
                    : go(detail::tw_encode_vec_kernel<Dc, Bc, true, false>);
            else
                wkv ? go(detail::tw_encode_vec_kernel<Dc, Bc, false, true>)
                    : go(detail::tw_encode_vec_kernel<Dc, Bc, false, false>);
        };
        auto with_d = [&](auto d_c) {
            switch (a.bits) {
                case 2: with_in(d_c, std::integral_constant<int, 2>{}); break;
                case 4: with_in(d_c, std::integral_constant<int, 4>{}); break;
                default: with_in(d_c, std::integral_constant<int, 8>{}); break;
            }
        };
        switch (a.head_dim) {
            case 64: with_d(std::integral_constant<int, 64>{}); break;
            case 128: with_d(std::integral_constant<int, 128>{}); break;
            default: with_d(std::integral_constant<int, 256>{}); break;
        }
        return;
    }
    const std::size_t per_cta = 8 * (a.reciprocal_codes ? detail::kTwFastRowsPerWarp : detail::kTwRowsPerWarp);
    const dim3 blocks(static_cast<unsigned>((rows + per_cta - 1) / per_cta), static_cast<unsigned>(a.batch));
    auto go = [&](auto kernel) {
        kernel<<<blocks, 256, 0, stream>>>(a);
        KVQ_CUDA_CHECK_LAUNCH("tw_encode_kernel");
    };
    auto with_bits = [&](auto cpl_c) {
        constexpr int C = decltype(cpl_c)::value;
        switch (a.bits) {
            case 2:
                a.reciprocal_codes ? go(detail::tw_encode_fast_kernel<C, 2>) : go(detail::tw_encode_kernel<C, 2>);
                break;
            case 4:
                a.reciprocal_codes ? go(detail::tw_encode_fast_kernel<C, 4>) : go(detail::tw_encode_kernel<C, 4>);
                break;
            default:
                a.reciprocal_codes ? go(detail::tw_encode_fast_kernel<C, 8>) : go(detail::tw_encode_kernel<C, 8>);
                break;
        }
    };
    switch (a.head_dim) {
        case 64: with_bits(std::integral_constant<int, 2>{}); break;
        case 128: with_bits(std::integral_constant<int, 4>{}); break;
        default: with_bits(std::integral_constant<int, 8>{}); break;
    }
}

}  // namespace kvq::cuda
