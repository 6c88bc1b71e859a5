#pragma once
// SIMD kernels of the CPU hot paths, each with a scalar twin that is always built. The codecs and
// attention pick a variant through kvq::cpu::simd_level(); tests/test_simd.cpp checks every SIMD
// variant against its scalar twin.
//
//  - qjl_bitsliced_*: T_i = sum_j bit_j(code_i) * u_j for an int8 query u (two's complement, bit
//    planes P_k = {j : bit k of u_j}), i.e. sum_k 2^k popcount(code & P_k) with weight -128 for
//    k = 7. Integer arithmetic: every variant returns exactly the same T.
//  - qjl_score4_vnni_t: the same integer sums for 4 query heads per code load (AVX-512 VNNI:
//    bits -> 0/1 bytes by mask, VPDPBUSD with the int8 queries); bitwise equal to the above.
//  - quantize_i8 / qjl_planes_from_i8 / qjl_outlier_proj: query preparation (exact twins).
//  - tw_accum_group_*: token-wise 2/4/8-bit dequantize-accumulate for G weight vectors at once
//    (a block's codes are expanded once, then G FMAs); tw_accum_group_rb_*: the register-blocked
//    variant for G = 4 / 8 (accumulators in registers over the block).
//  - tw_score_group_*: token-wise scoring of G queries (AVX-512 and AVX2).
//  - f32_dot_group_* / f32_axpy_group_*: fp32 keys / values, G query heads per pass.
//  - exp_shift_* / scale_max_*: s[i] = exp(s[i] - mx) and the sum (Cephes-style polynomial,
//    |rel err| < 3e-7; AVX2 and AVX-512), scaling and max.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kvq/core/half.hpp"
#include "kvq/cpu/dispatch.hpp"

namespace kvq::cpu {

// ---------------------------------------------------------------- QJL bit-sliced scoring
// codes: n keys, `words` uint64 each, contiguous; planes: [8][words].
inline void qjl_bitsliced_scalar(const std::uint8_t* codes, int n, int words, const std::uint64_t* planes,
                                 std::int64_t* T) {
    for (int i = 0; i < n; ++i) {
        std::int64_t t = 0;
        for (int w = 0; w < words; ++w) {
            std::uint64_t x;
            std::memcpy(&x, codes + (std::size_t(i) * words + w) * 8, 8);
            std::int64_t s = -std::int64_t(__builtin_popcountll(x & planes[7 * words + w]));
            for (int k = 6; k >= 0; --k) s = 2 * s + __builtin_popcountll(x & planes[k * words + w]);
            t += s;
        }
        T[i] = t;
    }
}

struct TwBlockView {
    const std::uint8_t* codes;  // token t at codes + t * code_bytes
    int code_bytes;
    const half_t* steps;  // [B][groups]
    const half_t* mins;   // [B][groups]
    int groups, group, bits, d;
};

// acc[g][c] += sum_i w[g][i] * (code_{first+i,c} * step + min): the reference arithmetic of
// TokenwiseCodec::accumulate, for G weight vectors.
inline void tw_accum_group_scalar(const TwBlockView& b, int first, int n, int G, const float* const* w,
                                  float* const* acc) {
    float v[1024];
    for (int i = 0; i < n; ++i) {
        const int tok = first + i;
        const std::uint8_t* code = b.codes + std::size_t(tok) * b.code_bytes;
        for (int c = 0; c < b.d; ++c) {
            const int bit = c * b.bits;
            unsigned x = code[bit >> 3] | (unsigned((bit >> 3) + 1 < b.code_bytes ? code[(bit >> 3) + 1] : 0) << 8);
            v[c] = float((x >> (bit & 7)) & ((1u << b.bits) - 1));
        }
        for (int g = 0; g < G; ++g)
            for (int gr = 0; gr < b.groups; ++gr) {
                const float a = w[g][i] * half_to_float(b.steps[std::size_t(tok) * b.groups + gr]);
                const float m = w[g][i] * half_to_float(b.mins[std::size_t(tok) * b.groups + gr]);
                for (int c = gr * b.group; c < (gr + 1) * b.group; ++c) acc[g][c] += a * v[c] + m;
            }
    }
}

inline void f32_dot_group_scalar(const float* K, int n, int d, int G, const float* const* q, float* const* out) {
    for (int i = 0; i < n; ++i)
        for (int g = 0; g < G; ++g) {
            float s = 0;
            for (int c = 0; c < d; ++c) s += q[g][c] * K[std::size_t(i) * d + c];
            out[g][i] = s;
        }
}

inline void f32_axpy_group_scalar(const float* V, int n, int d, int G, const float* const* w, float* const* acc) {
    for (int i = 0; i < n; ++i)
        for (int g = 0; g < G; ++g)
            for (int c = 0; c < d; ++c) acc[g][c] += w[g][i] * V[std::size_t(i) * d + c];
}

inline double exp_shift_scalar(float* s, int n, float mx) {
    double sum = 0;
    for (int i = 0; i < n; ++i) {
        s[i] = std::exp(s[i] - mx);
        sum += s[i];
    }
    return sum;
}

#if KVQ_X86_SIMD
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
// GCC 12 warns about _mm512_undefined_* inside its own intrinsics headers (a known false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
// ---------------------------------------------------------------- AVX-512
KVQ_TARGET_AVX512 inline void qjl_bitsliced_avx512(const std::uint8_t* codes, int n, int words,
                                                   const std::uint64_t* planes, std::int64_t* T) {
    // words in {1, 2, 4, 8}: 8 / words keys per register, planes repeated across the lanes.
    const int kpz = 8 / words;
    __m512i P[8];
    for (int k = 0; k < 8; ++k) {
        alignas(64) std::uint64_t rep[8];
        for (int l = 0; l < 8; ++l) rep[l] = planes[k * words + l % words];
        P[k] = _mm512_load_si512(rep);
    }
    alignas(64) std::int64_t lanes[8];
    for (int i = 0; i < n; i += kpz) {
        const int rem = std::min(kpz, n - i);
        const __mmask8 m = static_cast<__mmask8>((1u << (rem * words)) - 1u);
        const __m512i x = _mm512_maskz_loadu_epi64(m, codes + std::size_t(i) * words * 8);
        __m512i t = _mm512_sub_epi64(_mm512_setzero_si512(), _mm512_popcnt_epi64(_mm512_and_si512(x, P[7])));
#pragma GCC unroll 8
        for (int k = 6; k >= 0; --k)
            t = _mm512_add_epi64(_mm512_add_epi64(t, t), _mm512_popcnt_epi64(_mm512_and_si512(x, P[k])));
        if (words == 8) {
            T[i] = _mm512_reduce_add_epi64(t);
            continue;
        }
        _mm512_store_si512(lanes, t);
        for (int r = 0; r < rem; ++r) {
            std::int64_t s = 0;
            for (int w = 0; w < words; ++w) s += lanes[r * words + w];
            T[i + r] = s;
        }
    }
}

// Fused QJL scores for m = 256 (4 words per key, contiguous codes): out[i] = (cs * ||k_i||) *
// float(2 T_i - usum), the same float operations as the scalar formula, so results are identical.
// Eight keys per step: four registers of two keys, lane sums by unpack + 128-bit shuffles.
KVQ_TARGET_AVX512 inline void qjl_score_m256_avx512(const std::uint8_t* codes, int n, const std::uint64_t* planes,
                                                    const half_t* norms, float cs, std::int64_t usum, float* out) {
    __m512i P[8];
    for (int k = 0; k < 8; ++k) {
        alignas(64) std::uint64_t rep[8];
        for (int l = 0; l < 8; ++l) rep[l] = planes[k * 4 + l % 4];
        P[k] = _mm512_load_si512(rep);
    }
    auto dot2 = [&](const std::uint8_t* p) KVQ_TARGET_AVX512 {
        const __m512i x = _mm512_loadu_si512(p);
        __m512i t = _mm512_sub_epi64(_mm512_setzero_si512(), _mm512_popcnt_epi64(_mm512_and_si512(x, P[7])));
#pragma GCC unroll 8
        for (int k = 6; k >= 0; --k)
            t = _mm512_add_epi64(_mm512_add_epi64(t, t), _mm512_popcnt_epi64(_mm512_and_si512(x, P[k])));
        return t;
    };
    const __m512i us = _mm512_set1_epi64(usum);
    const __m256 vcs = _mm256_set1_ps(cs);
    const __m256i perm = _mm256_setr_epi32(0, 2, 1, 3, 4, 6, 5, 7);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const std::uint8_t* p = codes + std::size_t(i) * 32;
        const __m512i t0 = dot2(p), t1 = dot2(p + 64), t2 = dot2(p + 128), t3 = dot2(p + 192);
        const __m512i u0 = _mm512_add_epi64(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
        const __m512i u1 = _mm512_add_epi64(_mm512_unpacklo_epi64(t2, t3), _mm512_unpackhi_epi64(t2, t3));
        const __m512i v = _mm512_add_epi64(_mm512_shuffle_i64x2(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)),
                                           _mm512_shuffle_i64x2(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
        const __m256 f =
            _mm256_permutevar8x32_ps(_mm512_cvtepi64_ps(_mm512_sub_epi64(_mm512_add_epi64(v, v), us)), perm);
        const __m256 nk = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(norms + i)));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(vcs, nk), f));
    }
    if (i < n) {
        std::int64_t T[8];
        qjl_bitsliced_avx512(codes + std::size_t(i) * 32, n - i, 4, planes, T);
        for (int r = 0; r < n - i; ++r)
            out[i + r] = cs * half_to_float(norms[i + r]) * static_cast<float>(2 * T[r] - usum);
    }
}

// Grouped QJL scorer (AVX-512 VNNI): 4 query heads per pass, each key's codes loaded once.
//   T_g(i) = sum_j bit_j(code_i) * u_g[j]      (u_g: the int8 query of head g, 64 * words bytes)
//   out[g][i] = (cs[g] * ||k_i||) * float(2 T_g(i) - usum[g])
// A 64-bit code word becomes a mask (KMOVQ) and then 64 bytes of 0/1 (masked move of ones),
// shared by the 4 heads; VPDPBUSD multiplies those unsigned bytes by the signed query bytes and
// sums groups of 4 into int32 lanes. Per key and 256 bits: 4 expansions + 16 VPDPBUSD, against
// 4 x (8 AND + 8 VPOPCNTQ + 14 shift/add) for the bit-plane kernel. Integer arithmetic (|T| <=
// 127 * 1024), then the same float operations as the scalar formula: results are bitwise equal
// to qjl_bitsliced_* followed by that formula.
// Lane bookkeeping: per key the 4 accumulators (16 lanes each) are folded to one register of
// [128-bit lane][head] partial sums (unpack + add), 4 keys to one register [key][head]
// (128-bit shuffles), and 16 keys are transposed to [head][key] (VPERMT2D) before scaling.
// codes: key i at codes + i * stride; norms: fp16 [n]; W: words per key (template, 0 = runtime).
template <int W>
KVQ_TARGET_AVX512VNNI inline void qjl_score4_vnni_t(const std::uint8_t* codes, std::size_t stride, int n, int words_rt,
                                                    const std::int8_t* const* u, const half_t* norms, const float* cs,
                                                    const std::int32_t* usum, float* const* out) {
    const int words = W > 0 ? W : words_rt;
    const __m512i ones = _mm512_set1_epi8(1);
    const __m512i tr_lo = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i tr_hi = _mm512_add_epi32(tr_lo, _mm512_set1_epi32(2));
    auto key4 = [&](const std::uint8_t* p, const std::int8_t* const* uq) KVQ_TARGET_AVX512VNNI {
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
#pragma GCC unroll 16
        for (int w = 0; w < words; ++w) {
            std::uint64_t bits;
            std::memcpy(&bits, p + 8 * w, 8);
            const __m512i b = _mm512_maskz_mov_epi8(_cvtu64_mask64(bits), ones);
            a0 = _mm512_dpbusd_epi32(a0, b, _mm512_loadu_si512(uq[0] + 64 * w));
            a1 = _mm512_dpbusd_epi32(a1, b, _mm512_loadu_si512(uq[1] + 64 * w));
            a2 = _mm512_dpbusd_epi32(a2, b, _mm512_loadu_si512(uq[2] + 64 * w));
            a3 = _mm512_dpbusd_epi32(a3, b, _mm512_loadu_si512(uq[3] + 64 * w));
        }
        const __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
        const __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
        return _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
    };
    auto quad = [&](const std::uint8_t* p, std::size_t st, const std::int8_t* const* uq) KVQ_TARGET_AVX512VNNI {
        const __m512i r0 = key4(p, uq), r1 = key4(p + st, uq), r2 = key4(p + 2 * st, uq), r3 = key4(p + 3 * st, uq);
        const __m512i s01 = _mm512_add_epi32(_mm512_shuffle_i32x4(r0, r1, _MM_SHUFFLE(2, 0, 2, 0)),
                                             _mm512_shuffle_i32x4(r0, r1, _MM_SHUFFLE(3, 1, 3, 1)));
        const __m512i s23 = _mm512_add_epi32(_mm512_shuffle_i32x4(r2, r3, _MM_SHUFFLE(2, 0, 2, 0)),
                                             _mm512_shuffle_i32x4(r2, r3, _MM_SHUFFLE(3, 1, 3, 1)));
        return _mm512_add_epi32(_mm512_shuffle_i32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_i32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));  // lane 4k + g
    };
    // 16 keys: T as [head][key], scaled and stored under `m` (the first `cnt` keys).
    auto finish = [&](const __m512i f0, const __m512i f1, const __m512i f2, const __m512i f3, const half_t* nk16, int i,
                      __mmask16 m) KVQ_TARGET_AVX512VNNI {
        const __m512i m01 = _mm512_permutex2var_epi32(f0, tr_lo, f1), m23 = _mm512_permutex2var_epi32(f2, tr_lo, f3);
        const __m512i h01 = _mm512_permutex2var_epi32(f0, tr_hi, f1), h23 = _mm512_permutex2var_epi32(f2, tr_hi, f3);
        __m512i T[4];
        T[0] = _mm512_shuffle_i32x4(m01, m23, _MM_SHUFFLE(1, 0, 1, 0));
        T[1] = _mm512_shuffle_i32x4(m01, m23, _MM_SHUFFLE(3, 2, 3, 2));
        T[2] = _mm512_shuffle_i32x4(h01, h23, _MM_SHUFFLE(1, 0, 1, 0));
        T[3] = _mm512_shuffle_i32x4(h01, h23, _MM_SHUFFLE(3, 2, 3, 2));
        const __m512 nk = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(nk16)));
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) {
            const __m512 f =
                _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(T[g], T[g]), _mm512_set1_epi32(usum[g])));
            _mm512_mask_storeu_ps(out[g] + i, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(cs[g]), nk), f));
        }
    };
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const std::uint8_t* p = codes + std::size_t(i) * stride;
        const __m512i f0 = quad(p, stride, u), f1 = quad(p + 4 * stride, stride, u);
        const __m512i f2 = quad(p + 8 * stride, stride, u), f3 = quad(p + 12 * stride, stride, u);
        finish(f0, f1, f2, f3, norms + i, i, __mmask16(0xFFFF));
    }
    if (i < n) {
        // Tail: the remaining keys copied into a zero-padded 16-key buffer (a partial last block).
        const int rem = n - i;
        alignas(64) std::uint8_t buf[16 * 128] = {};
        half_t nb[16] = {};
        const std::size_t wb = 8 * std::size_t(words);
        for (int r = 0; r < rem; ++r) {
            std::memcpy(buf + r * wb, codes + std::size_t(i + r) * stride, wb);
            nb[r] = norms[i + r];
        }
        const __m512i f0 = quad(buf, wb, u), f1 = quad(buf + 4 * wb, wb, u);
        const __m512i f2 = quad(buf + 8 * wb, wb, u), f3 = quad(buf + 12 * wb, wb, u);
        finish(f0, f1, f2, f3, nb, i, __mmask16((1u << rem) - 1u));
    }
}

// Expands 16 codes starting at channel c (c % 16 == 0) to int32 lanes.
KVQ_TARGET_AVX512 inline __m512 tw_expand16_avx512(const std::uint8_t* code, int c, int bits) {
    if (bits == 2) {
        std::uint32_t x;
        std::memcpy(&x, code + c / 4, 4);
        const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        // VPERMPS reads the low 4 bits of each index lane: after the shift those are this code
        // and the next one's 2 bits, so a 16-entry table float(k & 3) does the mask and the
        // conversion in one op (exact: the table holds the 4 possible values).
        const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
        return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi32(int(x)), sh), table);
    }
    if (bits == 4) {
        std::uint64_t x;
        std::memcpy(&x, code + c / 2, 8);
        const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        const __m512i sh = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
        const __m512i v =
            _mm512_permutexvar_epi32(idx, _mm512_castsi128_si512(_mm_cvtsi64_si128(static_cast<long long>(x))));
        // Low 4 bits of each lane = the code: a float table k -> k replaces mask + convert.
        const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        return _mm512_permutexvar_ps(_mm512_srlv_epi32(v, sh), table);
    }
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(code + c))));
}

// G = 4 variant of tw_score_group_avx512_t for runs of 16 tokens: the horizontal sums are done 16
// tokens x 4 heads at a time (per token the 4 accumulators folded to one register by unpack + add,
// 4 tokens by 128-bit shuffles, then a [token][head] -> [head][token] transpose), ~12 shuffle/add
// ops per token instead of 4 full reductions (~32). Same products, other summation order: the
// tolerance of tw_score_group_avx512_t (2 gamma_{d+4} sum |terms|) holds.
template <int BITS>
KVQ_TARGET_AVX512 inline void tw_score_group4_avx512_t(const TwBlockView& b, int first, int n, const float* const* q,
                                                       float* const* out, const float* stf, const float* mnf) {
    const __m512i tr_lo = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i tr_hi = _mm512_add_epi32(tr_lo, _mm512_set1_epi32(2));
    auto token = [&](int i) KVQ_TARGET_AVX512 {
        const std::uint8_t* code = b.codes + std::size_t(first + i) * b.code_bytes;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int c0 = 0; c0 < b.d; c0 += 16) {
            const int gr = c0 / b.group;
            const __m512 v = _mm512_fmadd_ps(tw_expand16_avx512(code, c0, BITS), _mm512_set1_ps(stf[i * b.groups + gr]),
                                             _mm512_set1_ps(mnf[i * b.groups + gr]));
            a0 = _mm512_fmadd_ps(v, _mm512_loadu_ps(q[0] + c0), a0);
            a1 = _mm512_fmadd_ps(v, _mm512_loadu_ps(q[1] + c0), a1);
            a2 = _mm512_fmadd_ps(v, _mm512_loadu_ps(q[2] + c0), a2);
            a3 = _mm512_fmadd_ps(v, _mm512_loadu_ps(q[3] + c0), a3);
        }
        const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
        const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
        return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t01), _mm512_castps_pd(t23))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t01), _mm512_castps_pd(t23))));
    };
    auto quad = [&](int i) KVQ_TARGET_AVX512 {
        const __m512 r0 = token(i), r1 = token(i + 1), r2 = token(i + 2), r3 = token(i + 3);
        const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(r0, r1, _MM_SHUFFLE(2, 0, 2, 0)),
                                         _mm512_shuffle_f32x4(r0, r1, _MM_SHUFFLE(3, 1, 3, 1)));
        const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(r2, r3, _MM_SHUFFLE(2, 0, 2, 0)),
                                         _mm512_shuffle_f32x4(r2, r3, _MM_SHUFFLE(3, 1, 3, 1)));
        return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));  // lane 4k + g
    };
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 f0 = quad(i), f1 = quad(i + 4), f2 = quad(i + 8), f3 = quad(i + 12);
        const __m512 m01 = _mm512_permutex2var_ps(f0, tr_lo, f1), m23 = _mm512_permutex2var_ps(f2, tr_lo, f3);
        const __m512 h01 = _mm512_permutex2var_ps(f0, tr_hi, f1), h23 = _mm512_permutex2var_ps(f2, tr_hi, f3);
        _mm512_storeu_ps(out[0] + i, _mm512_shuffle_f32x4(m01, m23, _MM_SHUFFLE(1, 0, 1, 0)));
        _mm512_storeu_ps(out[1] + i, _mm512_shuffle_f32x4(m01, m23, _MM_SHUFFLE(3, 2, 3, 2)));
        _mm512_storeu_ps(out[2] + i, _mm512_shuffle_f32x4(h01, h23, _MM_SHUFFLE(1, 0, 1, 0)));
        _mm512_storeu_ps(out[3] + i, _mm512_shuffle_f32x4(h01, h23, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    for (; i < n; ++i) {
        // Remaining tokens one by one: lanes 4 L + g of the folded register hold head g's partial sums.
        alignas(64) float l[16];
        _mm512_store_ps(l, token(i));
        for (int g = 0; g < 4; ++g) out[g][i] = (l[g] + l[4 + g]) + (l[8 + g] + l[12 + g]);
    }
}

// Token-wise scores for G queries (AVX-512): each token is dequantized once (code * step + min,
// 16 channels at a time) and dotted with all G queries. bits in {2,4,8}, group % 16 == 0.
// scratch: >= 2 * n * groups floats.
template <int G, int BITS>
KVQ_TARGET_AVX512 inline void tw_score_group_avx512_t(const TwBlockView& b, int first, int n, const float* const* q,
                                                      float* const* out, float* scratch) {
    const int ng = n * b.groups;
    float* stf = scratch;
    float* mnf = stf + ng;
    const half_t* st = b.steps + std::size_t(first) * b.groups;
    const half_t* mn = b.mins + std::size_t(first) * b.groups;
    int e = 0;
    for (; e + 16 <= ng; e += 16) {
        _mm512_storeu_ps(stf + e, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(st + e))));
        _mm512_storeu_ps(mnf + e, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mn + e))));
    }
    for (; e < ng; ++e) {
        stf[e] = half_to_float(st[e]);
        mnf[e] = half_to_float(mn[e]);
    }
    if constexpr (G == 4) return tw_score_group4_avx512_t<BITS>(b, first, n, q, out, stf, mnf);
    for (int i = 0; i < n; ++i) {
        const std::uint8_t* code = b.codes + std::size_t(first + i) * b.code_bytes;
        __m512 a[8];
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) a[g] = _mm512_setzero_ps();
        for (int c0 = 0; c0 < b.d; c0 += 16) {
            const int gr = c0 / b.group;
            const __m512 v = _mm512_fmadd_ps(tw_expand16_avx512(code, c0, BITS), _mm512_set1_ps(stf[i * b.groups + gr]),
                                             _mm512_set1_ps(mnf[i * b.groups + gr]));
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) a[g] = _mm512_fmadd_ps(v, _mm512_loadu_ps(q[g] + c0), a[g]);
        }
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) out[g][i] = _mm512_reduce_add_ps(a[g]);
    }
}

// Requires bits in {2,4,8}, group % 16 == 0, G <= 8. scratch: >= n * (2 * groups + G) floats.
// G and the bit width are template parameters so that the 2G accumulators stay in registers.
template <int G, int BITS>
KVQ_TARGET_AVX512 inline void tw_accum_group_avx512_t(const TwBlockView& b, int first, int n, const float* const* w,
                                                      float* const* acc, float* scratch) {
    const int ng = n * b.groups;
    float* stf = scratch;
    float* mnf = stf + ng;
    float* coef = mnf + ng;  // [G][n]
    const half_t* st = b.steps + std::size_t(first) * b.groups;
    const half_t* mn = b.mins + std::size_t(first) * b.groups;
    int e = 0;
    for (; e + 16 <= ng; e += 16) {
        _mm512_storeu_ps(stf + e, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(st + e))));
        _mm512_storeu_ps(mnf + e, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mn + e))));
    }
    for (; e < ng; ++e) {
        stf[e] = half_to_float(st[e]);
        mnf[e] = half_to_float(mn[e]);
    }
    float bias[8] = {};
    float* stT = coef + std::size_t(G) * n;  // [groups][n]
    float* mnT = stT + ng;
    for (int i = 0; i < n; ++i)
        for (int gr = 0; gr < b.groups; ++gr) {
            stT[gr * n + i] = stf[i * b.groups + gr];
            mnT[gr * n + i] = mnf[i * b.groups + gr];
        }
    for (int c0 = 0; c0 < b.d; c0 += 16) {
        const int gr = c0 / b.group;
        if (c0 % b.group == 0) {
            // coef[g][i] = w_g[i] * step_i, bias_g = sum_i w_g[i] * min_i (vectorised over i).
            for (int g = 0; g < G; ++g) {
                __m512 bs = _mm512_setzero_ps();
                for (int i = 0; i < n; i += 16) {
                    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
                    const __m512 wv = _mm512_maskz_loadu_ps(m, w[g] + i);
                    _mm512_mask_storeu_ps(coef + g * n + i, m,
                                          _mm512_mul_ps(wv, _mm512_maskz_loadu_ps(m, stT + gr * n + i)));
                    bs = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, mnT + gr * n + i), bs);
                }
                bias[g] = _mm512_reduce_add_ps(bs);
            }
        }
        __m512 a0[8], a1[8];
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) {
            a0[g] = _mm512_loadu_ps(acc[g] + c0);
            a1[g] = _mm512_setzero_ps();
        }
        const std::uint8_t* code = b.codes + std::size_t(first) * b.code_bytes;
        int i = 0;
        for (; i + 2 <= n; i += 2, code += 2 * b.code_bytes) {
            const __m512 v0 = tw_expand16_avx512(code, c0, BITS);
            const __m512 v1 = tw_expand16_avx512(code + b.code_bytes, c0, BITS);
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) {
                a0[g] = _mm512_fmadd_ps(v0, _mm512_set1_ps(coef[g * n + i]), a0[g]);
                a1[g] = _mm512_fmadd_ps(v1, _mm512_set1_ps(coef[g * n + i + 1]), a1[g]);
            }
        }
        if (i < n) {
            const __m512 v0 = tw_expand16_avx512(code, c0, BITS);
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) a0[g] = _mm512_fmadd_ps(v0, _mm512_set1_ps(coef[g * n + i]), a0[g]);
        }
        for (int g = 0; g < G; ++g)
            _mm512_storeu_ps(acc[g] + c0, _mm512_add_ps(_mm512_add_ps(a0[g], a1[g]), _mm512_set1_ps(bias[g])));
    }
}

// Token-wise dequantize-accumulate, register-blocked (AVX-512): the accumulators of G heads x CH
// 16-channel vectors stay in registers for the whole token range (CH = 4, i.e. 64 channels, for
// G = 4; CH = 2 for G = 8), so per token and 16 channels there is one code expansion shared by
// the G heads, then G FMAs whose coefficient is a broadcast memory operand, and no accumulator
// loads or stores. Coefficients w_g[i] * step(i, group) are tabulated once per call as
// coef[i][group][g], so that inside a 64-channel pass every broadcast has a constant offset
// (SPG = 16-channel vectors per group, a template parameter: the vectors of one group share one
// coefficient); the min terms sum_i w_g[i] * min(i, group) are summed once per call and added at
// the end. For groups * G == 16 (d 128, g 32, GQA 4) the table is built with permutes, 16
// coefficients per token in 4 vector ops; otherwise by a scalar loop.
// Requires bits in {2, 4, 8}, group % 16 == 0, d % (16 CH) == 0, G in {4, 8}, groups <= 64.
// scratch: >= n * groups * (2 + G) + 64 floats. Same arithmetic as tw_accum_group_avx512_t (one
// FMA per code and head, min term added once per call), different association: same tolerance.
template <int G, int BITS, int CH, int SPG>
KVQ_TARGET_AVX512 inline void tw_accum_group_rb_avx512_t(const TwBlockView& b, int first, int n, const float* const* w,
                                                         float* const* acc, float* scratch) {
    const int groups = b.groups, ng = n * groups;
    float* stf = scratch;
    float* mnf = stf + ng;
    float* coef = mnf + ng;  // [i][group][g]
    const half_t* st = b.steps + std::size_t(first) * groups;
    const half_t* mn = b.mins + std::size_t(first) * groups;
    alignas(64) float bias[64 * 8];  // [group][g]
    if (groups * G == 16) {
        // Token i's 16 coefficients: lane l = group * G + g -> w_g[i] (permute of the token's G
        // weights) times step(i, l / G) (permute of the token's fp16 steps, converted in
        // registers: staging them through memory stalled on store forwarding).
        alignas(64) std::int32_t iw[16], is[16];
        for (int l = 0; l < 16; ++l) iw[l] = l % G, is[l] = l / G;
        const __m512i idx_w = _mm512_load_si512(iw), idx_s = _mm512_load_si512(is);
        const __mmask8 mg = __mmask8((1u << groups) - 1u);
        __m512 bs = _mm512_setzero_ps();
        int i0 = 0;
        if constexpr (G == 4) {
            // 4 tokens per step: the 4 heads' weights transposed in registers (4x4), the 4 tokens'
            // steps / mins (16 fp16 each) converted once; per token then 3 permutes, mul, FMA.
            for (; i0 + 4 <= n; i0 += 4) {
                __m128 r0 = _mm_loadu_ps(w[0] + i0), r1 = _mm_loadu_ps(w[1] + i0);
                __m128 r2 = _mm_loadu_ps(w[2] + i0), r3 = _mm_loadu_ps(w[3] + i0);
                _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  // r_t = [w_0, w_1, w_2, w_3] of token i0 + t
                const __m512 s16 =
                    _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(st + std::size_t(i0) * 4)));
                const __m512 m16 =
                    _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mn + std::size_t(i0) * 4)));
                const __m128 rt[4] = {r0, r1, r2, r3};
#pragma GCC unroll 4
                for (int t = 0; t < 4; ++t) {
                    const __m512i ist = _mm512_add_epi32(idx_s, _mm512_set1_epi32(4 * t));
                    const __m512 wv = _mm512_permutexvar_ps(idx_w, _mm512_castps128_ps512(rt[t]));
                    _mm512_storeu_ps(coef + std::size_t(i0 + t) * 16,
                                     _mm512_mul_ps(wv, _mm512_permutexvar_ps(ist, s16)));
                    bs = _mm512_fmadd_ps(wv, _mm512_permutexvar_ps(ist, m16), bs);
                }
            }
        }
        for (; i0 < n; ++i0) {
            __m512 wt;
            if constexpr (G == 4)
                wt = _mm512_castps128_ps512(_mm_setr_ps(w[0][i0], w[1][i0], w[2][i0], w[3][i0]));
            else
                wt = _mm512_castps256_ps512(
                    _mm256_setr_ps(w[0][i0], w[1][i0], w[2][i0], w[3][i0], w[4][i0], w[5][i0], w[6][i0], w[7][i0]));
            const __m512 wv = _mm512_permutexvar_ps(idx_w, wt);
            const __m128 s4 = _mm_cvtph_ps(_mm_maskz_loadu_epi16(mg, st + std::size_t(i0) * groups));
            const __m128 m4 = _mm_cvtph_ps(_mm_maskz_loadu_epi16(mg, mn + std::size_t(i0) * groups));
            const __m512 sv = _mm512_permutexvar_ps(idx_s, _mm512_castps128_ps512(s4));
            const __m512 mv = _mm512_permutexvar_ps(idx_s, _mm512_castps128_ps512(m4));
            _mm512_storeu_ps(coef + std::size_t(i0) * 16, _mm512_mul_ps(wv, sv));
            bs = _mm512_fmadd_ps(wv, mv, bs);
        }
        _mm512_store_ps(bias, bs);
    } else {
        for (int e = 0; e < ng; ++e) {
            stf[e] = half_to_float(st[e]);
            mnf[e] = half_to_float(mn[e]);
        }
        std::fill_n(bias, groups * G, 0.0f);
        for (int i0 = 0; i0 < n; ++i0)
            for (int gr = 0; gr < groups; ++gr)
                for (int g = 0; g < G; ++g) {
                    coef[(std::size_t(i0) * groups + gr) * G + g] = w[g][i0] * stf[i0 * groups + gr];
                    bias[gr * G + g] += w[g][i0] * mnf[i0 * groups + gr];
                }
    }
    const std::uint8_t* codes = b.codes + std::size_t(first) * b.code_bytes;
    const std::size_t tstride = std::size_t(groups) * G;
    for (int c0 = 0; c0 < b.d; c0 += 16 * CH) {
        const int gbase = c0 / b.group;
        __m512 A[G][CH];
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
            for (int s = 0; s < CH; ++s) A[g][s] = _mm512_setzero_ps();
        const std::uint8_t* code = codes;
        const float* cf = coef + std::size_t(gbase) * G;
        for (int i = 0; i < n; ++i, code += b.code_bytes, cf += tstride) {
            __m512 v[CH];
#pragma GCC unroll 4
            for (int s = 0; s < CH; ++s) v[s] = tw_expand16_avx512(code, c0 + 16 * s, BITS);
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
                for (int s = 0; s < CH; ++s)
                    A[g][s] = _mm512_fmadd_ps(v[s], _mm512_set1_ps(cf[(s / SPG) * G + g]), A[g][s]);
        }
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
            for (int s = 0; s < CH; ++s) {
                float* a = acc[g] + c0 + 16 * s;
                const float bt = bias[(gbase + s / SPG) * G + g];
                _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), _mm512_add_ps(A[g][s], _mm512_set1_ps(bt))));
            }
    }
}

// AVX-512 twins of scale_max_avx2 / exp_neg_avx2 / exp_shift_avx2: the same operations on 16
// lanes (same polynomial, same clamp; the sum is taken in 16 float lanes per <= 256 terms, then
// double), so the per-element results are bitwise those of the AVX2 variants.
KVQ_TARGET_AVX512 inline float scale_max_avx512(float* s, int n, float scale) {
    const __m512 sc = _mm512_set1_ps(scale);
    __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
        const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + i), sc);
        _mm512_mask_storeu_ps(s + i, k, v);
        m = _mm512_mask_max_ps(m, k, m, v);
    }
    return _mm512_reduce_max_ps(m);
}
KVQ_TARGET_AVX512 inline __m512 exp_neg_avx512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500E-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}
KVQ_TARGET_AVX512 inline double exp_shift_avx512(float* s, int n, float mx) {
    const __m512 m = _mm512_set1_ps(mx);
    double sum = 0;
    int i = 0;
    while (i + 16 <= n) {
        __m512 part = _mm512_setzero_ps();
        const int end = std::min(n, i + 256) & ~15;  // float partial sums of <= 256 terms, then double
        for (; i < end; i += 16) {
            const __m512 y = exp_neg_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + i), m));
            _mm512_storeu_ps(s + i, y);
            part = _mm512_add_ps(part, y);
        }
        sum += _mm512_reduce_add_ps(part);
    }
    if (i < n) {
        // Tail under a mask: the same polynomial as the full vectors.
        const __mmask16 k = __mmask16((1u << (n - i)) - 1u);
        const __m512 y = exp_neg_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), m));
        _mm512_mask_storeu_ps(s + i, k, y);
        sum += _mm512_reduce_add_ps(_mm512_maskz_mov_ps(k, y));
    }
    return sum;
}

// d % 16 == 0, G <= 8.
template <int G>
KVQ_TARGET_AVX512 inline void f32_dot_group_avx512_t(const float* K, int n, int d, const float* const* q,
                                                     float* const* out) {
    for (int i = 0; i < n; ++i) {
        const float* k = K + std::size_t(i) * d;
        __m512 a[8];
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) a[g] = _mm512_setzero_ps();
        for (int c = 0; c < d; c += 16) {
            const __m512 kv = _mm512_loadu_ps(k + c);
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) a[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q[g] + c), kv, a[g]);
        }
        for (int g = 0; g < G; ++g) out[g][i] = _mm512_reduce_add_ps(a[g]);
    }
}

template <int G>
KVQ_TARGET_AVX512 inline void f32_axpy_group_avx512_t(const float* V, int n, int d, const float* const* w,
                                                      float* const* acc) {
    for (int c = 0; c < d; c += 16) {
        __m512 a0[8], a1[8];
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) {
            a0[g] = _mm512_loadu_ps(acc[g] + c);
            a1[g] = _mm512_setzero_ps();
        }
        int i = 0;
        for (; i + 2 <= n; i += 2) {
            const __m512 v0 = _mm512_loadu_ps(V + std::size_t(i) * d + c);
            const __m512 v1 = _mm512_loadu_ps(V + std::size_t(i + 1) * d + c);
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) {
                a0[g] = _mm512_fmadd_ps(v0, _mm512_set1_ps(w[g][i]), a0[g]);
                a1[g] = _mm512_fmadd_ps(v1, _mm512_set1_ps(w[g][i + 1]), a1[g]);
            }
        }
        if (i < n) {
            const __m512 v0 = _mm512_loadu_ps(V + std::size_t(i) * d + c);
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) a0[g] = _mm512_fmadd_ps(v0, _mm512_set1_ps(w[g][i]), a0[g]);
        }
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) _mm512_storeu_ps(acc[g] + c, _mm512_add_ps(a0[g], a1[g]));
    }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // KVQ_X86_SIMD

#if KVQ_X86_SIMD
// ---------------------------------------------------------------- AVX2
KVQ_TARGET_AVX2 inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
// words % 4 == 0.
KVQ_TARGET_AVX2 inline void qjl_bitsliced_avx2(const std::uint8_t* codes, int n, int words, const std::uint64_t* planes,
                                               std::int64_t* T) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                         2, 3, 2, 3, 3, 4);
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    const __m256i zero = _mm256_setzero_si256();
    for (int i = 0; i < n; ++i) {
        __m256i tot = zero;
        for (int w = 0; w < words; w += 4) {
            const __m256i x =
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + (std::size_t(i) * words + w) * 8));
            __m256i c[8];
            for (int k = 0; k < 8; ++k) {
                const __m256i y =
                    _mm256_and_si256(x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(planes + k * words + w)));
                c[k] = _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(y, lo4)),
                                       _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(y, 4), lo4)));
            }
            __m256i low = c[4];  // planes 0..4 in bytes: <= 8 * 31
            for (int k = 3; k >= 0; --k) low = _mm256_add_epi8(_mm256_add_epi8(low, low), c[k]);
            const __m256i mid = _mm256_add_epi8(_mm256_add_epi8(c[6], c[6]), c[5]);  // planes 5, 6: <= 24
            const __m256i s = _mm256_sub_epi64(
                _mm256_add_epi64(_mm256_sad_epu8(low, zero), _mm256_slli_epi64(_mm256_sad_epu8(mid, zero), 5)),
                _mm256_slli_epi64(_mm256_sad_epu8(c[7], zero), 7));
            tot = _mm256_add_epi64(tot, s);
        }
        const __m128i h = _mm_add_epi64(_mm256_castsi256_si128(tot), _mm256_extracti128_si256(tot, 1));
        T[i] = _mm_cvtsi128_si64(h) + _mm_extract_epi64(h, 1);
    }
}

// Expands 8 codes starting at channel c (c % 8 == 0).
KVQ_TARGET_AVX2 inline __m256 tw_expand8_avx2(const std::uint8_t* code, int c, int bits) {
    if (bits == 2) {
        std::uint16_t x;
        std::memcpy(&x, code + c / 4, 2);
        const __m256i sh = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        return _mm256_cvtepi32_ps(
            _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(x)), sh), _mm256_set1_epi32(3)));
    }
    if (bits == 4) {
        std::uint32_t x;
        std::memcpy(&x, code + c / 2, 4);
        const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        return _mm256_cvtepi32_ps(
            _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(x)), sh), _mm256_set1_epi32(15)));
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(code + c))));
}

// Requires bits in {2,4,8}, group % 8 == 0, G <= 8.
template <int G, int BITS>
KVQ_TARGET_AVX2 inline void tw_accum_group_avx2_t(const TwBlockView& b, int first, int n, const float* const* w,
                                                  float* const* acc, float* scratch) {
    const int ng = n * b.groups;
    float* stf = scratch;
    float* mnf = stf + ng;
    float* coef = mnf + ng;
    const half_t* st = b.steps + std::size_t(first) * b.groups;
    const half_t* mn = b.mins + std::size_t(first) * b.groups;
    int e = 0;
    for (; e + 8 <= ng; e += 8) {
        _mm256_storeu_ps(stf + e, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st + e))));
        _mm256_storeu_ps(mnf + e, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + e))));
    }
    for (; e < ng; ++e) {
        stf[e] = half_to_float(st[e]);
        mnf[e] = half_to_float(mn[e]);
    }
    float bias[8] = {};
    float* stT = coef + std::size_t(G) * n;  // [groups][n]
    float* mnT = stT + ng;
    for (int i = 0; i < n; ++i)
        for (int gr = 0; gr < b.groups; ++gr) {
            stT[gr * n + i] = stf[i * b.groups + gr];
            mnT[gr * n + i] = mnf[i * b.groups + gr];
        }
    for (int c0 = 0; c0 < b.d; c0 += 8) {
        const int gr = c0 / b.group;
        if (c0 % b.group == 0) {
            for (int g = 0; g < G; ++g) {
                __m256 bs = _mm256_setzero_ps();
                int i = 0;
                for (; i + 8 <= n; i += 8) {
                    const __m256 wv = _mm256_loadu_ps(w[g] + i);
                    _mm256_storeu_ps(coef + g * n + i, _mm256_mul_ps(wv, _mm256_loadu_ps(stT + gr * n + i)));
                    bs = _mm256_fmadd_ps(wv, _mm256_loadu_ps(mnT + gr * n + i), bs);
                }
                float bt = hsum_avx2(bs);
                for (; i < n; ++i) {
                    coef[g * n + i] = w[g][i] * stT[gr * n + i];
                    bt += w[g][i] * mnT[gr * n + i];
                }
                bias[g] = bt;
            }
        }
        __m256 a0[8], a1[8];
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) {
            a0[g] = _mm256_loadu_ps(acc[g] + c0);
            a1[g] = _mm256_setzero_ps();
        }
        const std::uint8_t* code = b.codes + std::size_t(first) * b.code_bytes;
        int i = 0;
        for (; i + 2 <= n; i += 2, code += 2 * b.code_bytes) {
            const __m256 v0 = tw_expand8_avx2(code, c0, BITS);
            const __m256 v1 = tw_expand8_avx2(code + b.code_bytes, c0, BITS);
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) {
                a0[g] = _mm256_fmadd_ps(v0, _mm256_set1_ps(coef[g * n + i]), a0[g]);
                a1[g] = _mm256_fmadd_ps(v1, _mm256_set1_ps(coef[g * n + i + 1]), a1[g]);
            }
        }
        if (i < n) {
            const __m256 v0 = tw_expand8_avx2(code, c0, BITS);
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) a0[g] = _mm256_fmadd_ps(v0, _mm256_set1_ps(coef[g * n + i]), a0[g]);
        }
        for (int g = 0; g < G; ++g)
            _mm256_storeu_ps(acc[g] + c0, _mm256_add_ps(_mm256_add_ps(a0[g], a1[g]), _mm256_set1_ps(bias[g])));
    }
}

// AVX2 twin of tw_score_group_avx512_t: each token is dequantized once per 8 channels (code *
// step + min, one FMA) and dotted with the G queries. Requires bits in {2, 4, 8}, group % 8 == 0,
// G <= 8. scratch: >= 2 * n * groups floats. Tolerance as for the AVX-512 kernel (the dot is
// summed in 8 lanes instead of 16: a different order, the same bound 2 gamma_{d+4} sum|terms|).
template <int G, int BITS>
KVQ_TARGET_AVX2 inline void tw_score_group_avx2_t(const TwBlockView& b, int first, int n, const float* const* q,
                                                  float* const* out, float* scratch) {
    const int ng = n * b.groups;
    float* stf = scratch;
    float* mnf = stf + ng;
    const half_t* st = b.steps + std::size_t(first) * b.groups;
    const half_t* mn = b.mins + std::size_t(first) * b.groups;
    int e = 0;
    for (; e + 8 <= ng; e += 8) {
        _mm256_storeu_ps(stf + e, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st + e))));
        _mm256_storeu_ps(mnf + e, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + e))));
    }
    for (; e < ng; ++e) {
        stf[e] = half_to_float(st[e]);
        mnf[e] = half_to_float(mn[e]);
    }
    for (int i = 0; i < n; ++i) {
        const std::uint8_t* code = b.codes + std::size_t(first + i) * b.code_bytes;
        __m256 a[8];
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) a[g] = _mm256_setzero_ps();
        for (int c0 = 0; c0 < b.d; c0 += 8) {
            const int gr = c0 / b.group;
            const __m256 v = _mm256_fmadd_ps(tw_expand8_avx2(code, c0, BITS), _mm256_set1_ps(stf[i * b.groups + gr]),
                                             _mm256_set1_ps(mnf[i * b.groups + gr]));
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) a[g] = _mm256_fmadd_ps(v, _mm256_loadu_ps(q[g] + c0), a[g]);
        }
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) out[g][i] = hsum_avx2(a[g]);
    }
}

// d % 8 == 0, G <= 8.
template <int G>
KVQ_TARGET_AVX2 inline void f32_dot_group_avx2_t(const float* K, int n, int d, const float* const* q,
                                                 float* const* out) {
    for (int i = 0; i < n; ++i) {
        const float* k = K + std::size_t(i) * d;
        __m256 a[8];
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) a[g] = _mm256_setzero_ps();
        for (int c = 0; c < d; c += 8) {
            const __m256 kv = _mm256_loadu_ps(k + c);
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q[g] + c), kv, a[g]);
        }
        for (int g = 0; g < G; ++g) out[g][i] = hsum_avx2(a[g]);
    }
}

template <int G>
KVQ_TARGET_AVX2 inline void f32_axpy_group_avx2_t(const float* V, int n, int d, const float* const* w,
                                                  float* const* acc) {
    for (int c = 0; c < d; c += 8) {
        __m256 a0[8], a1[8];
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) {
            a0[g] = _mm256_loadu_ps(acc[g] + c);
            a1[g] = _mm256_setzero_ps();
        }
        int i = 0;
        for (; i + 2 <= n; i += 2) {
            const __m256 v0 = _mm256_loadu_ps(V + std::size_t(i) * d + c);
            const __m256 v1 = _mm256_loadu_ps(V + std::size_t(i + 1) * d + c);
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) {
                a0[g] = _mm256_fmadd_ps(v0, _mm256_set1_ps(w[g][i]), a0[g]);
                a1[g] = _mm256_fmadd_ps(v1, _mm256_set1_ps(w[g][i + 1]), a1[g]);
            }
        }
        if (i < n) {
            const __m256 v0 = _mm256_loadu_ps(V + std::size_t(i) * d + c);
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) a0[g] = _mm256_fmadd_ps(v0, _mm256_set1_ps(w[g][i]), a0[g]);
        }
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) _mm256_storeu_ps(acc[g] + c, _mm256_add_ps(a0[g], a1[g]));
    }
}

KVQ_TARGET_AVX2 inline float scale_max_avx2(float* s, int n, float scale) {
    const __m256 sc = _mm256_set1_ps(scale);
    __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(s + i), sc);
        _mm256_storeu_ps(s + i, v);
        m = _mm256_max_ps(m, v);
    }
    alignas(32) float l[8];
    _mm256_store_ps(l, m);
    float mx = l[0];
    for (int k = 1; k < 8; ++k) mx = std::max(mx, l[k]);
    for (; i < n; ++i) {
        s[i] *= scale;
        mx = std::max(mx, s[i]);
    }
    return mx;
}

KVQ_TARGET_AVX2 inline void add_f32_to_f64_avx2(double* acc, const float* x, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4)
        _mm256_storeu_pd(acc + i, _mm256_add_pd(_mm256_loadu_pd(acc + i), _mm256_cvtps_pd(_mm_loadu_ps(x + i))));
    for (; i < n; ++i) acc[i] += x[i];
}

// exp(x) for x <= 0 (x >= -87.3 is exact to the polynomial; below it the result is ~1e-38, not 0).
KVQ_TARGET_AVX2 inline __m256 exp_neg_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

KVQ_TARGET_AVX2 inline double exp_shift_avx2(float* s, int n, float mx) {
    const __m256 m = _mm256_set1_ps(mx);
    double sum = 0;
    int i = 0;
    while (i + 8 <= n) {
        __m256 part = _mm256_setzero_ps();
        const int end = std::min(n, i + 256) & ~7;  // float partial sums of <= 256 terms, then double
        for (; i < end; i += 8) {
            const __m256 y = exp_neg_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + i), m));
            _mm256_storeu_ps(s + i, y);
            part = _mm256_add_ps(part, y);
        }
        sum += hsum_avx2(part);
    }
    for (; i < n; ++i) {
        s[i] = std::exp(s[i] - mx);
        sum += s[i];
    }
    return sum;
}
#endif  // KVQ_X86_SIMD

#if KVQ_X86_SIMD
#define KVQ_SWITCH_G(G, CALL)    \
    switch (G) {                 \
        case 1: CALL(1); break;  \
        case 2: CALL(2); break;  \
        case 3: CALL(3); break;  \
        case 4: CALL(4); break;  \
        case 5: CALL(5); break;  \
        case 6: CALL(6); break;  \
        case 7: CALL(7); break;  \
        default: CALL(8); break; \
    }
inline void tw_accum_group_avx512(const TwBlockView& b, int first, int n, int G, const float* const* w,
                                  float* const* acc, float* scratch) {
#define KVQ_TW512(g)                                                                          \
    (b.bits == 2 ? tw_accum_group_avx512_t<g, 2>(b, first, n, w, acc, scratch)                \
                 : (b.bits == 4 ? tw_accum_group_avx512_t<g, 4>(b, first, n, w, acc, scratch) \
                                : tw_accum_group_avx512_t<g, 8>(b, first, n, w, acc, scratch)))
    KVQ_SWITCH_G(G, KVQ_TW512)
#undef KVQ_TW512
}
// Register-blocked variant (tw_accum_group_rb_avx512_t): G in {4, 8}, d % 64 == 0 (G = 4) or
// d % 32 == 0 (G = 8).
inline bool tw_accum_rb_supported(const TwBlockView& b, int G) {
    return (b.bits == 2 || b.bits == 4 || b.bits == 8) && b.group % 16 == 0 && (G == 4 || G == 8) &&
           b.d % (G == 4 ? 64 : 32) == 0 && b.groups <= 64 &&
           (b.group == 16 || b.group == 32 || b.group % (G == 4 ? 64 : 32) == 0);
}
// Picks the channels-per-group specialisation (SPG <= CH) of tw_accum_group_rb_avx512_t; spelled
// out with if constexpr so that no instantiation holds two identical branches.
template <int G, int BITS, int CH>
inline void tw_accum_group_rb_avx512_spg(const TwBlockView& b, int first, int n, const float* const* w,
                                         float* const* acc, float* scratch, int spg) {
    if constexpr (CH >= 4) {
        if (spg == 1)
            tw_accum_group_rb_avx512_t<G, BITS, CH, 1>(b, first, n, w, acc, scratch);
        else if (spg == 2)
            tw_accum_group_rb_avx512_t<G, BITS, CH, 2>(b, first, n, w, acc, scratch);
        else
            tw_accum_group_rb_avx512_t<G, BITS, CH, 4>(b, first, n, w, acc, scratch);
    } else if constexpr (CH == 2) {
        if (spg == 1)
            tw_accum_group_rb_avx512_t<G, BITS, CH, 1>(b, first, n, w, acc, scratch);
        else
            tw_accum_group_rb_avx512_t<G, BITS, CH, 2>(b, first, n, w, acc, scratch);
    } else {
        tw_accum_group_rb_avx512_t<G, BITS, CH, 1>(b, first, n, w, acc, scratch);
    }
}
template <int G, int CH>
inline void tw_accum_group_rb_avx512_g(const TwBlockView& b, int first, int n, const float* const* w, float* const* acc,
                                       float* scratch) {
    const int spg = std::min(b.group / 16, CH);
    if (b.bits == 2)
        tw_accum_group_rb_avx512_spg<G, 2, CH>(b, first, n, w, acc, scratch, spg);
    else if (b.bits == 4)
        tw_accum_group_rb_avx512_spg<G, 4, CH>(b, first, n, w, acc, scratch, spg);
    else
        tw_accum_group_rb_avx512_spg<G, 8, CH>(b, first, n, w, acc, scratch, spg);
}
inline void tw_accum_group_rb_avx512(const TwBlockView& b, int first, int n, int G, const float* const* w,
                                     float* const* acc, float* scratch) {
    if (G == 4)
        tw_accum_group_rb_avx512_g<4, 4>(b, first, n, w, acc, scratch);
    else
        tw_accum_group_rb_avx512_g<8, 2>(b, first, n, w, acc, scratch);
}
inline void tw_score_group_avx512(const TwBlockView& b, int first, int n, int G, const float* const* q,
                                  float* const* out, float* scratch) {
#define KVQ_TWS(g)                                                                            \
    (b.bits == 2 ? tw_score_group_avx512_t<g, 2>(b, first, n, q, out, scratch)                \
                 : (b.bits == 4 ? tw_score_group_avx512_t<g, 4>(b, first, n, q, out, scratch) \
                                : tw_score_group_avx512_t<g, 8>(b, first, n, q, out, scratch)))
    KVQ_SWITCH_G(G, KVQ_TWS)
#undef KVQ_TWS
}
inline void tw_score_group_avx2(const TwBlockView& b, int first, int n, int G, const float* const* q, float* const* out,
                                float* scratch) {
#define KVQ_TWS2(g)                                                                         \
    (b.bits == 2 ? tw_score_group_avx2_t<g, 2>(b, first, n, q, out, scratch)                \
                 : (b.bits == 4 ? tw_score_group_avx2_t<g, 4>(b, first, n, q, out, scratch) \
                                : tw_score_group_avx2_t<g, 8>(b, first, n, q, out, scratch)))
    KVQ_SWITCH_G(G, KVQ_TWS2)
#undef KVQ_TWS2
}
inline void tw_accum_group_avx2(const TwBlockView& b, int first, int n, int G, const float* const* w, float* const* acc,
                                float* scratch) {
#define KVQ_TW256(g)                                                                        \
    (b.bits == 2 ? tw_accum_group_avx2_t<g, 2>(b, first, n, w, acc, scratch)                \
                 : (b.bits == 4 ? tw_accum_group_avx2_t<g, 4>(b, first, n, w, acc, scratch) \
                                : tw_accum_group_avx2_t<g, 8>(b, first, n, w, acc, scratch)))
    KVQ_SWITCH_G(G, KVQ_TW256)
#undef KVQ_TW256
}
inline void f32_dot_group_avx512(const float* K, int n, int d, int G, const float* const* q, float* const* out) {
#define KVQ_F(g) f32_dot_group_avx512_t<g>(K, n, d, q, out)
    KVQ_SWITCH_G(G, KVQ_F)
#undef KVQ_F
}
inline void f32_dot_group_avx2(const float* K, int n, int d, int G, const float* const* q, float* const* out) {
#define KVQ_F(g) f32_dot_group_avx2_t<g>(K, n, d, q, out)
    KVQ_SWITCH_G(G, KVQ_F)
#undef KVQ_F
}
inline void f32_axpy_group_avx512(const float* V, int n, int d, int G, const float* const* w, float* const* acc) {
#define KVQ_F(g) f32_axpy_group_avx512_t<g>(V, n, d, w, acc)
    KVQ_SWITCH_G(G, KVQ_F)
#undef KVQ_F
}
inline void f32_axpy_group_avx2(const float* V, int n, int d, int G, const float* const* w, float* const* acc) {
#define KVQ_F(g) f32_axpy_group_avx2_t<g>(V, n, d, w, acc)
    KVQ_SWITCH_G(G, KVQ_F)
#undef KVQ_F
}
#undef KVQ_SWITCH_G
#endif  // KVQ_X86_SIMD

// ---------------------------------------------------------------- dispatchers
#if KVQ_X86_SIMD
// Requires has_avx512_vnni() and words in [1, 16] (see qjl_score4_vnni_t).
inline void qjl_score4_vnni(const std::uint8_t* codes, std::size_t stride, int n, int words,
                            const std::int8_t* const* u, const half_t* norms, const float* cs, const std::int32_t* usum,
                            float* const* out) {
    if (words == 4) return qjl_score4_vnni_t<4>(codes, stride, n, 4, u, norms, cs, usum, out);
    return qjl_score4_vnni_t<0>(codes, stride, n, words, u, norms, cs, usum, out);
}
#endif

// Symmetric int8 quantization of a projection, as QjlKeyCodec::prepare_fast does it:
// s = max|p| / 127, u_j = clamp(lrint(p_j / s), -127, 127) (0 when s = 0), bytes [m, ceil(m/64)*64)
// zero. Returns s; *usum = sum_j u_j. The AVX-512 variant does the same IEEE operations (division,
// round to nearest even), so every variant gives identical bytes.
inline float quantize_i8_scalar(const float* p, int m, std::int8_t* u, std::int32_t* usum) {
    float amax = 0;
    for (int j = 0; j < m; ++j) amax = std::max(amax, std::fabs(p[j]));
    const float sc = amax > 0 ? amax / 127.0f : 0.0f;
    std::int32_t sum = 0;
    for (int j = 0; j < m; ++j) {
        int v = sc > 0 ? static_cast<int>(std::lrint(p[j] / sc)) : 0;
        v = std::clamp(v, -127, 127);
        sum += v;
        u[j] = static_cast<std::int8_t>(v);
    }
    for (int j = m; j < (m + 63) / 64 * 64; ++j) u[j] = 0;
    *usum = sum;
    return sc;
}
#if KVQ_X86_SIMD
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // _mm512_reduce_*: see the AVX-512 section
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
KVQ_TARGET_AVX512 inline float quantize_i8_avx512(const float* p, int m, std::int8_t* u, std::int32_t* usum) {
    __m512 mx = _mm512_setzero_ps();
    for (int j = 0; j < m; j += 16) {
        const __mmask16 k = m - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (m - j)) - 1u);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(k, p + j)));
    }
    const float amax = _mm512_reduce_max_ps(mx);
    const float sc = amax > 0 ? amax / 127.0f : 0.0f;
    const int mp = (m + 63) / 64 * 64;
    if (!(sc > 0)) {
        std::memset(u, 0, std::size_t(mp));
        *usum = 0;
        return sc;
    }
    const __m512 vs = _mm512_set1_ps(sc);
    __m512i sum = _mm512_setzero_si512();
    for (int j = 0; j < mp; j += 16) {
        const __mmask16 k = m - j >= 16 ? __mmask16(0xFFFF) : (m > j ? __mmask16((1u << (m - j)) - 1u) : __mmask16(0));
        // Default MXCSR rounding = round to nearest even, as std::lrint; |p / s| <= 127 up to rounding.
        __m512i v = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(k, p + j), vs));
        v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
        sum = _mm512_add_epi32(sum, v);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(u + j), _mm512_cvtepi32_epi8(v));
    }
    *usum = _mm512_reduce_add_epi32(sum);
    return sc;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif
// Bit planes of an int8 query (two's complement): planes[k * words + j / 64] bit j % 64 = bit k
// of u[j], for j < 64 * words (u zero-padded). Pure bit moves: every variant is identical.
inline void qjl_planes_from_i8_scalar(const std::int8_t* u, int words, std::uint64_t* planes) {
    std::fill_n(planes, 8 * words, std::uint64_t{0});
    for (int j = 0; j < 64 * words; ++j) {
        const unsigned bits = static_cast<unsigned>(u[j]) & 0xFFu;
        for (int k = 0; k < 8; ++k)
            if ((bits >> k) & 1u) planes[k * words + j / 64] |= std::uint64_t{1} << (j % 64);
    }
}
#if KVQ_X86_SIMD
KVQ_TARGET_AVX512 inline void qjl_planes_from_i8_avx512(const std::int8_t* u, int words, std::uint64_t* planes) {
    for (int w = 0; w < words; ++w) {
        const __m512i x = _mm512_loadu_si512(u + 64 * w);
        for (int k = 0; k < 8; ++k)
            planes[k * words + w] =
                _cvtmask64_u64(_mm512_test_epi8_mask(x, _mm512_set1_epi8(static_cast<char>(1u << k))));
    }
}
#endif
inline void qjl_planes_from_i8(const std::int8_t* u, int words, std::uint64_t* planes) {
#if KVQ_X86_SIMD
    if (simd_level() == SimdLevel::Avx512) return qjl_planes_from_i8_avx512(u, words, planes);
#endif
    qjl_planes_from_i8_scalar(u, words, planes);
}

// QJL with outliers, per 32-token group: p_out[j] = sum_o S[j][ids[o]] q[ids[o]] (j < rows, from
// the columns of S = rows of S^T), p_in[j] = sq[j] - p_out[j] (j < m). The scalar variant is the
// exact path's arithmetic; the AVX-512 one uses FMA (differences ~ k u |p|, far below the int8
// step that follows on the fast path).
inline void qjl_outlier_proj_scalar(const float* sketch_t, int rows, const std::uint8_t* ids, int k, const float* q,
                                    const float* sq, int m, float* p_in, float* p_out) {
    std::fill(p_out, p_out + rows, 0.0f);
    for (int o = 0; o < k; ++o) {
        const float qo = q[ids[o]];
        const float* col = sketch_t + std::size_t(ids[o]) * rows;
        for (int j = 0; j < rows; ++j) p_out[j] += col[j] * qo;
    }
    for (int j = 0; j < m; ++j) p_in[j] = sq[j] - p_out[j];
}
#if KVQ_X86_SIMD
// rows % 16 == 0, m % 16 == 0 (QJL sizes are multiples of 32).
KVQ_TARGET_AVX512 inline void qjl_outlier_proj_avx512(const float* sketch_t, int rows, const std::uint8_t* ids, int k,
                                                      const float* q, const float* sq, int m, float* p_in,
                                                      float* p_out) {
    for (int j = 0; j < rows; j += 16) {
        __m512 a = _mm512_setzero_ps();
        for (int o = 0; o < k; ++o)
            a = _mm512_fmadd_ps(_mm512_loadu_ps(sketch_t + std::size_t(ids[o]) * rows + j), _mm512_set1_ps(q[ids[o]]),
                                a);
        _mm512_storeu_ps(p_out + j, a);
        if (j < m) _mm512_storeu_ps(p_in + j, _mm512_sub_ps(_mm512_loadu_ps(sq + j), a));
    }
}
#endif
inline void qjl_outlier_proj(const float* sketch_t, int rows, const std::uint8_t* ids, int k, const float* q,
                             const float* sq, int m, float* p_in, float* p_out) {
#if KVQ_X86_SIMD
    if (simd_level() == SimdLevel::Avx512 && rows % 16 == 0 && m % 16 == 0)
        return qjl_outlier_proj_avx512(sketch_t, rows, ids, k, q, sq, m, p_in, p_out);
#endif
    qjl_outlier_proj_scalar(sketch_t, rows, ids, k, q, sq, m, p_in, p_out);
}

inline float quantize_i8(const float* p, int m, std::int8_t* u, std::int32_t* usum) {
#if KVQ_X86_SIMD
    if (simd_level() == SimdLevel::Avx512) return quantize_i8_avx512(p, m, u, usum);
#endif
    return quantize_i8_scalar(p, m, u, usum);
}

// s[i] *= scale; returns max_i s[i] (exact: multiplication and max are the same in every variant).
inline float scale_max(float* s, int n, float scale) {
#if KVQ_X86_SIMD
    if (simd_level() == SimdLevel::Avx512) return scale_max_avx512(s, n, scale);
    if (simd_level() >= SimdLevel::Avx2) return scale_max_avx2(s, n, scale);
#endif
    float mx = -std::numeric_limits<float>::infinity();
    for (int i = 0; i < n; ++i) {
        s[i] *= scale;
        mx = std::max(mx, s[i]);
    }
    return mx;
}

// acc[i] += x[i] in double (exact conversion; same result in every variant).
inline void add_f32_to_f64(double* acc, const float* x, int n) {
#if KVQ_X86_SIMD
    if (simd_level() >= SimdLevel::Avx2) return add_f32_to_f64_avx2(acc, x, n);
#endif
    for (int i = 0; i < n; ++i) acc[i] += x[i];
}

inline double exp_shift(float* s, int n, float mx) {
#if KVQ_X86_SIMD
    if (simd_level() == SimdLevel::Avx512) return exp_shift_avx512(s, n, mx);
    if (simd_level() >= SimdLevel::Avx2) return exp_shift_avx2(s, n, mx);
#endif
    return exp_shift_scalar(s, n, mx);
}

// Grouped fp32 kernels, G arbitrary (batches of 8).
inline void f32_dot_group(const float* K, int n, int d, int G, const float* const* q, float* const* out) {
    const SimdLevel l = simd_level();
    for (int g0 = 0; g0 < G; g0 += 8) {
        const int gb = std::min(8, G - g0);
#if KVQ_X86_SIMD
        if (l == SimdLevel::Avx512 && d % 16 == 0) {
            f32_dot_group_avx512(K, n, d, gb, q + g0, out + g0);
            continue;
        }
        if (l >= SimdLevel::Avx2 && d % 8 == 0) {
            f32_dot_group_avx2(K, n, d, gb, q + g0, out + g0);
            continue;
        }
#endif
        (void)l;
        f32_dot_group_scalar(K, n, d, gb, q + g0, out + g0);
    }
}
inline void f32_axpy_group(const float* V, int n, int d, int G, const float* const* w, float* const* acc) {
    const SimdLevel l = simd_level();
    for (int g0 = 0; g0 < G; g0 += 8) {
        const int gb = std::min(8, G - g0);
#if KVQ_X86_SIMD
        if (l == SimdLevel::Avx512 && d % 16 == 0) {
            f32_axpy_group_avx512(V, n, d, gb, w + g0, acc + g0);
            continue;
        }
        if (l >= SimdLevel::Avx2 && d % 8 == 0) {
            f32_axpy_group_avx2(V, n, d, gb, w + g0, acc + g0);
            continue;
        }
#endif
        (void)l;
        f32_axpy_group_scalar(V, n, d, gb, w + g0, acc + g0);
    }
}

}  // namespace kvq::cpu
