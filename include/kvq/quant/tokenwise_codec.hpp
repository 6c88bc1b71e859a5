#pragma once
// Token-wise asymmetric uniform quantization: b bits, groups of g consecutive channels, an fp16
// step and an fp16 minimum per (token, group). Used for QJL's values, WKVQuant's dynamic step, the
// int-b baselines (llama.cpp q4_1 family, HF QuantizedCache) -- keys and values alike.
//   step = fp16((max - min) / (2^b - 1)), lo = fp16(min),
//   code = clamp(floor((x - lo) / step + 1/2), 0, 2^b - 1)   (code = 0 when step == 0)
//   x^   = code * step + lo
// The stored (fp16-rounded) step and minimum are the ones used for coding, so decode is
// consistent with encode; a constant group decodes to fp16(min).
//
// Block layout (B tokens, G = d / g groups):
// | section    | content                                      | bytes        |
// |------------|----------------------------------------------|--------------|
// | codes      | per token: d codes, b-bit LSB-first stream    | B * d * b / 8 |
// | token side | fp16 step[B][G], then fp16 min[B][G]          | B * 4 * G    |
// | block side | none                                          | 0            |
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include <Eigen/Core>

#include "kvq/core/bitpack.hpp"
#include "kvq/core/half.hpp"
#include "kvq/core/validate.hpp"
#include "kvq/cpu/kernels.hpp"
#include "kvq/quant/codec.hpp"

namespace kvq {

struct TokenwiseParams {
    int head_dim = 128;
    int bits = 4;    // 2, 3, 4 or 8
    int group = 32;  // channels per group; divides head_dim
};

// Shared by the CPU codec and the CUDA kernels: quantize one group of g values.
KVQ_HD void tokenwise_quantize_group(const float* x, int g, int bits, std::uint8_t* codes, half_t* step_out,
                                     half_t* min_out) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < g; ++i) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
    }
    const int levels = (1 << bits) - 1;
    const half_t step_h = float_to_half((hi - lo) / static_cast<float>(levels));
    const half_t lo_h = float_to_half(lo);
    const float step = half_to_float(step_h), lo_r = half_to_float(lo_h);
    for (int i = 0; i < g; ++i) {
        int c = 0;
        if (step > 0.0f) {
            const float v = floorf((x[i] - lo_r) / step + 0.5f);
            c = v < 0.0f ? 0 : (v > static_cast<float>(levels) ? levels : static_cast<int>(v));
        }
        codes[i] = static_cast<std::uint8_t>(c);
    }
    *step_out = step_h;
    *min_out = lo_h;
}

// The code of one value, u = x - lo (already rounded as above), from r = 1 / step instead of a
// division: the integer n nearest to q = u * r is the division formula's code (clamped) unless q lies
// within 2^-12 of n +- 1/2; there it returns -1 and the caller divides. Why it is exact elsewhere, for
// r within 1 ulp of 1/step (correctly rounded, or a 1-ulp hardware reciprocal after a Newton step):
// |q - u / step| <= 1.5 * 2^-23 |u / step|, so for |q| <= 512 the formula's quotient fl(u / step)
// differs from q by less than 2^-13, and its fl(quotient + 1/2) from q + 1/2 by less than 2^-13 +
// 2^-15 (ulp <= 2^-14 below 1024): with q in [n - 1/2 + 2^-12, n + 1/2 - 2^-12] its floor is n. For
// |q| > 512 both clamp to the same end. NaN returns -1. n comes from the 1.5 * 2^23 rounding trick
// (no float-to-int conversion: those run at a quarter of the rate on GPUs). Tested against the formula
// on random and boundary inputs (test_tokenwise.cpp); used by the GPU token-wise encode.
KVQ_HD int tokenwise_code_by_reciprocal(float u, float r, int levels) {
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: x + kRound rounds x to an integer, |x| < 2^22
#if defined(__CUDA_ARCH__)
    const float q = __fmul_rn(u, r);
    const float t = __fadd_rn(fminf(fmaxf(q, -1024.0f), 1024.0f), kRound);
    const float d = __fsub_rn(q, __fsub_rn(t, kRound));
    const int n = __float_as_int(t) - __float_as_int(kRound);
#else
    const float q = u * r;
    const float t = std::fmin(std::fmax(q, -1024.0f), 1024.0f) + kRound;
    const float d = q - (t - kRound);
    int n;
    std::memcpy(&n, &t, sizeof n);
    n -= 0x4B400000;  // the bits of kRound
#endif
    // Selects, not branches: the GPU runs this per element. NaN fails both tests.
    const bool decided = (fabsf(q) > 512.0f) | (fabsf(d) <= 0.5f - 0x1p-12f);
    const int c = n < 0 ? 0 : (n > levels ? levels : n);
    return decided ? c : -1;
}

class TokenwiseCodec final : public Codec {
public:
    explicit TokenwiseCodec(const TokenwiseParams& p) : p_(p) {
        detail::check_head_dim(p.head_dim);
        KVQ_CHECK(p.bits == 2 || p.bits == 3 || p.bits == 4 || p.bits == 8,
                  "token-wise codec bits must be 2, 3, 4 or 8, got ", p.bits);
        KVQ_CHECK(p.group >= 1 && p.group <= p.head_dim && p.head_dim % p.group == 0,
                  "token-wise group size must divide head_dim (", p.head_dim, "), got ", p.group);
        groups_ = p.head_dim / p.group;
    }
    const TokenwiseParams& params() const { return p_; }

    CodecId id() const override { return CodecId::Tokenwise; }
    std::string name() const override { return "int" + std::to_string(p_.bits) + ":g=" + std::to_string(p_.group); }
    int head_dim() const override { return p_.head_dim; }

    BlockLayout layout(int block_tokens) const override {
        detail::check_block_tokens(block_tokens, 1);
        BlockLayout l;
        l.block_tokens = static_cast<std::uint32_t>(block_tokens);
        l.code_bytes = static_cast<std::uint32_t>(packed_bytes(p_.head_dim, p_.bits));
        l.token_side_bytes = static_cast<std::uint32_t>(4 * groups_);
        return l;
    }

    void validate(const float* x, int n) const override {
        // (max - min) of a group must stay in fp16 range too, hence half of 65504.
        detail::check_finite_and_bounded(x, n, p_.head_dim, kHalfMax / 2, "token-wise input");
    }

    void encode(const float* x, int n, std::uint8_t* block, int block_tokens, int first) const override {
        const BlockLayout l = layout(block_tokens);
        half_t* steps = reinterpret_cast<half_t*>(block + l.token_side_offset());
        half_t* mins = steps + std::size_t(block_tokens) * groups_;
        std::uint8_t codes[1024];
        for (int t = 0; t < n; ++t) {
            const int tok = first + t;
            for (int g = 0; g < groups_; ++g)
                tokenwise_quantize_group(x + std::size_t(t) * p_.head_dim + g * p_.group, p_.group, p_.bits,
                                         codes + g * p_.group, &steps[std::size_t(tok) * groups_ + g],
                                         &mins[std::size_t(tok) * groups_ + g]);
            pack_codes(codes, p_.head_dim, p_.bits, block + std::size_t(tok) * l.code_bytes);
        }
    }

    void prepare(const float* q, PreparedQuery& pq) const override {
        pq.q.assign(q, q + p_.head_dim);
        pq.data.assign(groups_, 0.0f);  // per-group sum of q, for the min term
        for (int g = 0; g < groups_; ++g)
            for (int i = 0; i < p_.group; ++i) pq.data[g] += q[g * p_.group + i];
    }

    void score(const PreparedQuery& pq, const std::uint8_t* block, int block_tokens, int first, int n,
               float* out) const override {
        const BlockLayout l = layout(block_tokens);
        const half_t* steps = reinterpret_cast<const half_t*>(block + l.token_side_offset());
        const half_t* mins = steps + std::size_t(block_tokens) * groups_;
        float codes[1024];
        for (int i = 0; i < n; ++i) {
            const int tok = first + i;
            unpack(block + std::size_t(tok) * l.code_bytes, codes);
            float s = 0;
            for (int g = 0; g < groups_; ++g) {
                const float dot = Eigen::Map<const Eigen::VectorXf>(pq.q.data() + g * p_.group, p_.group)
                                      .dot(Eigen::Map<const Eigen::VectorXf>(codes + g * p_.group, p_.group));
                s += half_to_float(steps[std::size_t(tok) * groups_ + g]) * dot +
                     half_to_float(mins[std::size_t(tok) * groups_ + g]) * pq.data[g];
            }
            out[i] = s;
        }
    }

    void accumulate(const std::uint8_t* block, int block_tokens, int first, int n, const float* w,
                    float* acc) const override {
        const BlockLayout l = layout(block_tokens);
        const half_t* steps = reinterpret_cast<const half_t*>(block + l.token_side_offset());
        const half_t* mins = steps + std::size_t(block_tokens) * groups_;
        float codes[1024];
        for (int i = 0; i < n; ++i) {
            const int tok = first + i;
            unpack(block + std::size_t(tok) * l.code_bytes, codes);
            for (int g = 0; g < groups_; ++g) {
                const float a = w[i] * half_to_float(steps[std::size_t(tok) * groups_ + g]);
                const float b = w[i] * half_to_float(mins[std::size_t(tok) * groups_ + g]);
                for (int c = g * p_.group; c < (g + 1) * p_.group; ++c) acc[c] += a * codes[c] + b;
            }
        }
    }

    // AVX-512 / AVX2 (run-time dispatch) for 2, 4 and 8 bits: each token is dequantized once and dotted
    // with all G queries. Equals score() up to float rounding (per channel code * step + min,
    // then the dot, instead of step * dot + min * sum q).
    void score_group(const PreparedQuery* const* pq, int G, const std::uint8_t* block, int block_tokens, int first,
                     int n, float* const* out) const override {
#if KVQ_X86_SIMD
        const cpu::SimdLevel lv = cpu::simd_level();
        const bool avx512 = lv == cpu::SimdLevel::Avx512 && p_.group % 16 == 0;
        const bool avx2 = lv >= cpu::SimdLevel::Avx2 && p_.group % 8 == 0;
        if ((p_.bits == 2 || p_.bits == 4 || p_.bits == 8) && (avx512 || avx2) && n > 0) {
            const BlockLayout l = layout(block_tokens);
            const half_t* steps = reinterpret_cast<const half_t*>(block + l.token_side_offset());
            const cpu::TwBlockView v{block + l.codes_offset(),
                                     static_cast<int>(l.code_bytes),
                                     steps,
                                     steps + std::size_t(block_tokens) * groups_,
                                     groups_,
                                     p_.group,
                                     p_.bits,
                                     p_.head_dim};
            thread_local std::vector<float> scratch;
            scratch.resize(std::size_t(n) * 2 * groups_ + 16);
            for (int g0 = 0; g0 < G; g0 += 8) {
                const float* q[8];
                const int gb = std::min(8, G - g0);
                for (int g = 0; g < gb; ++g) q[g] = pq[g0 + g]->q.data();
                if (avx512)
                    cpu::tw_score_group_avx512(v, first, n, gb, q, out + g0, scratch.data());
                else
                    cpu::tw_score_group_avx2(v, first, n, gb, q, out + g0, scratch.data());
            }
            return;
        }
#endif
        Codec::score_group(pq, G, block, block_tokens, first, n, out);
    }

    // SIMD (AVX2 / AVX-512, run-time dispatch) for 2, 4 and 8 bits: a block's codes are expanded
    // once per 8 or 16 channels and FMA'd into all G accumulators; the min term is summed per group
    // (sum_i w_i min_i) and added once. Same arithmetic as accumulate() up to float rounding
    // (summation order). Other bit widths, group sizes, or a forced scalar: the generic path.
    void accumulate_group(const std::uint8_t* block, int block_tokens, int first, int n, int G, const float* const* w,
                          float* const* acc) const override {
#if KVQ_X86_SIMD
        const cpu::SimdLevel lv = cpu::simd_level();
        const bool bits_ok = p_.bits == 2 || p_.bits == 4 || p_.bits == 8;
        const bool avx512 = lv == cpu::SimdLevel::Avx512 && p_.group % 16 == 0;
        const bool avx2 = lv >= cpu::SimdLevel::Avx2 && p_.group % 8 == 0;
        if (bits_ok && (avx512 || avx2) && n > 0) {
            const BlockLayout l = layout(block_tokens);
            const half_t* steps = reinterpret_cast<const half_t*>(block + l.token_side_offset());
            const cpu::TwBlockView v{block + l.codes_offset(),
                                     static_cast<int>(l.code_bytes),
                                     steps,
                                     steps + std::size_t(block_tokens) * groups_,
                                     groups_,
                                     p_.group,
                                     p_.bits,
                                     p_.head_dim};
            thread_local std::vector<float> scratch;
            scratch.resize(std::size_t(n) * std::max(4 * groups_ + 8, 10 * groups_) + 32);
            for (int g0 = 0; g0 < G; g0 += 8) {
                const int gb = std::min(8, G - g0);
                // Register-blocked kernel where it applies (accumulators stay in registers over the
                // token range), else the per-16-channel kernel.
                if (avx512 && cpu::tw_accum_rb_supported(v, gb))
                    cpu::tw_accum_group_rb_avx512(v, first, n, gb, w + g0, acc + g0, scratch.data());
                else if (avx512)
                    cpu::tw_accum_group_avx512(v, first, n, gb, w + g0, acc + g0, scratch.data());
                else
                    cpu::tw_accum_group_avx2(v, first, n, gb, w + g0, acc + g0, scratch.data());
            }
            return;
        }
#endif
        Codec::accumulate_group(block, block_tokens, first, n, G, w, acc);
    }

    void decode(const std::uint8_t* block, int block_tokens, int first, int n, float* out) const override {
        const BlockLayout l = layout(block_tokens);
        const half_t* steps = reinterpret_cast<const half_t*>(block + l.token_side_offset());
        const half_t* mins = steps + std::size_t(block_tokens) * groups_;
        for (int i = 0; i < n; ++i) {
            const int tok = first + i;
            float* o = out + std::size_t(i) * p_.head_dim;
            unpack(block + std::size_t(tok) * l.code_bytes, o);
            for (int g = 0; g < groups_; ++g) {
                const float st = half_to_float(steps[std::size_t(tok) * groups_ + g]);
                const float mn = half_to_float(mins[std::size_t(tok) * groups_ + g]);
                for (int c = g * p_.group; c < (g + 1) * p_.group; ++c) o[c] = o[c] * st + mn;
            }
        }
    }

    // Expands one token's d codes to floats; for 2 and 4 bits a byte expands through a 256-entry
    // table (one 16- or 8-byte copy per byte instead of a shift, mask and convert per code).
    void unpack(const std::uint8_t* code, float* out) const {
        const int d = p_.head_dim;
        if (p_.bits == 8) {
            for (int c = 0; c < d; ++c) out[c] = code[c];
        } else if (p_.bits == 4) {
            static const auto table = make_table<4>();
            for (int i = 0; i < d / 2; ++i) std::memcpy(out + 2 * i, table[code[i]].data(), 2 * sizeof(float));
        } else if (p_.bits == 2) {
            static const auto table = make_table<2>();
            for (int i = 0; i < d / 4; ++i) std::memcpy(out + 4 * i, table[code[i]].data(), 4 * sizeof(float));
        } else {
            for (int c = 0; c < d; ++c) out[c] = static_cast<float>(get_code(code, c, p_.bits));
        }
    }

private:
    template <int Bits>
    static std::array<std::array<float, 8 / Bits>, 256> make_table() {
        std::array<std::array<float, 8 / Bits>, 256> t{};
        for (int v = 0; v < 256; ++v)
            for (int j = 0; j < 8 / Bits; ++j) t[v][j] = static_cast<float>((v >> (Bits * j)) & ((1 << Bits) - 1));
        return t;
    }

    TokenwiseParams p_;
    int groups_ = 1;
};

}  // namespace kvq
