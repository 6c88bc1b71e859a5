#pragma once
// SIMD kernels of the CPU hot paths, each with a scalar twin that is always built. The codecs and
// attention pick a variant through kvq::cpu::simd_level(); tests/test_simd.cpp checks every SIMD
// variant against its scalar twin.
//
//  - qjl_bitsliced_*: T_i = sum_j bit_j(code_i) * u_j for an int8 query u (two's complement, bit
//    planes P_k = {j : bit k of u_j}), i.e. sum_k 2^k popcount(code & P_k) with weight -128 for
//    k = 7. Integer arithmetic: every variant returns exactly the same T.
//  - tw_accum_group_*: token-wise 2/4/8-bit dequantize-accumulate for G weight vectors at once
//    (a block's codes are expanded once, then G FMAs).
//  - f32_dot_group_* / f32_axpy_group_*: fp32 keys / values, G query heads per pass.
//  - exp_shift_*: s[i] = exp(s[i] - mx) and the sum (Cephes-style polynomial, |rel err| < 3e-7).
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
        const __m256 f = _mm256_permutevar8x32_ps(_mm512_cvtepi64_ps(_mm512_sub_epi64(_mm512_add_epi64(v, v), us)), perm);
        const __m256 nk = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(norms + i)));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(vcs, nk), f));
    }
    if (i < n) {
        std::int64_t T[8];
        qjl_bitsliced_avx512(codes + std::size_t(i) * 32, n - i, 4, planes, T);
        for (int r = 0; r < n - i; ++r) out[i + r] = cs * half_to_float(norms[i + r]) * static_cast<float>(2 * T[r] - usum);
    }
}

// Expands 16 codes starting at channel c (c % 16 == 0) to int32 lanes.
KVQ_TARGET_AVX512 inline __m512 tw_expand16_avx512(const std::uint8_t* code, int c, int bits) {
    if (bits == 2) {
        std::uint32_t x;
        std::memcpy(&x, code + c / 4, 4);
        const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(x)), sh), _mm512_set1_epi32(3)));
    }
    if (bits == 4) {
        std::uint64_t x;
        std::memcpy(&x, code + c / 2, 8);
        const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        const __m512i sh = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
        const __m512i v = _mm512_permutexvar_epi32(idx, _mm512_castsi128_si512(_mm_cvtsi64_si128(static_cast<long long>(x))));
        return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(v, sh), _mm512_set1_epi32(15)));
    }
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(code + c))));
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
                    _mm512_mask_storeu_ps(coef + g * n + i, m, _mm512_mul_ps(wv, _mm512_maskz_loadu_ps(m, stT + gr * n + i)));
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
KVQ_TARGET_AVX2 inline void qjl_bitsliced_avx2(const std::uint8_t* codes, int n, int words,
                                               const std::uint64_t* planes, std::int64_t* T) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                         2, 3, 2, 3, 3, 4);
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    const __m256i zero = _mm256_setzero_si256();
    for (int i = 0; i < n; ++i) {
        __m256i tot = zero;
        for (int w = 0; w < words; w += 4) {
            const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + (std::size_t(i) * words + w) * 8));
            __m256i c[8];
            for (int k = 0; k < 8; ++k) {
                const __m256i y = _mm256_and_si256(x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(planes + k * words + w)));
                c[k] = _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(y, lo4)),
                                       _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(y, 4), lo4)));
            }
            __m256i low = c[4];  // planes 0..4 in bytes: <= 8 * 31
            for (int k = 3; k >= 0; --k) low = _mm256_add_epi8(_mm256_add_epi8(low, low), c[k]);
            const __m256i mid = _mm256_add_epi8(_mm256_add_epi8(c[6], c[6]), c[5]);  // planes 5, 6: <= 24
            const __m256i s = _mm256_sub_epi64(_mm256_add_epi64(_mm256_sad_epu8(low, zero),
                                                                _mm256_slli_epi64(_mm256_sad_epu8(mid, zero), 5)),
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
        return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(x)), sh), _mm256_set1_epi32(3)));
    }
    if (bits == 4) {
        std::uint32_t x;
        std::memcpy(&x, code + c / 2, 4);
        const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(x)), sh), _mm256_set1_epi32(15)));
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
#define KVQ_SWITCH_G(G, CALL)          \
    switch (G) {                       \
        case 1: CALL(1); break;        \
        case 2: CALL(2); break;        \
        case 3: CALL(3); break;        \
        case 4: CALL(4); break;        \
        case 5: CALL(5); break;        \
        case 6: CALL(6); break;        \
        case 7: CALL(7); break;        \
        default: CALL(8); break;       \
    }
inline void tw_accum_group_avx512(const TwBlockView& b, int first, int n, int G, const float* const* w,
                                  float* const* acc, float* scratch) {
#define KVQ_TW512(g)                                                                                   \
    (b.bits == 2 ? tw_accum_group_avx512_t<g, 2>(b, first, n, w, acc, scratch)                        \
                 : (b.bits == 4 ? tw_accum_group_avx512_t<g, 4>(b, first, n, w, acc, scratch)          \
                                : tw_accum_group_avx512_t<g, 8>(b, first, n, w, acc, scratch)))
    KVQ_SWITCH_G(G, KVQ_TW512)
#undef KVQ_TW512
}
inline void tw_score_group_avx512(const TwBlockView& b, int first, int n, int G, const float* const* q,
                                  float* const* out, float* scratch) {
#define KVQ_TWS(g)                                                                                    \
    (b.bits == 2 ? tw_score_group_avx512_t<g, 2>(b, first, n, q, out, scratch)                       \
                 : (b.bits == 4 ? tw_score_group_avx512_t<g, 4>(b, first, n, q, out, scratch)         \
                                : tw_score_group_avx512_t<g, 8>(b, first, n, q, out, scratch)))
    KVQ_SWITCH_G(G, KVQ_TWS)
#undef KVQ_TWS
}
inline void tw_accum_group_avx2(const TwBlockView& b, int first, int n, int G, const float* const* w,
                                float* const* acc, float* scratch) {
#define KVQ_TW256(g)                                                                                 \
    (b.bits == 2 ? tw_accum_group_avx2_t<g, 2>(b, first, n, w, acc, scratch)                        \
                 : (b.bits == 4 ? tw_accum_group_avx2_t<g, 4>(b, first, n, w, acc, scratch)          \
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
// s[i] *= scale; returns max_i s[i] (exact: multiplication and max are the same in every variant).
inline float scale_max(float* s, int n, float scale) {
#if KVQ_X86_SIMD
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
        if (l == SimdLevel::Avx512 && d % 16 == 0) { f32_dot_group_avx512(K, n, d, gb, q + g0, out + g0); continue; }
        if (l >= SimdLevel::Avx2 && d % 8 == 0) { f32_dot_group_avx2(K, n, d, gb, q + g0, out + g0); continue; }
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
        if (l == SimdLevel::Avx512 && d % 16 == 0) { f32_axpy_group_avx512(V, n, d, gb, w + g0, acc + g0); continue; }
        if (l >= SimdLevel::Avx2 && d % 8 == 0) { f32_axpy_group_avx2(V, n, d, gb, w + g0, acc + g0); continue; }
#endif
        (void)l;
        f32_axpy_group_scalar(V, n, d, gb, w + g0, acc + g0);
    }
}

}  // namespace kvq::cpu
