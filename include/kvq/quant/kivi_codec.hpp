#pragma once
// KIVI (Liu et al. 2024; ALGORITHMS.md §3) on kvq blocks.
//   keys:   per-channel asymmetric b-bit quantization over groups of G = 32 consecutive tokens
//           (KiviKeyCodec, granularity 32: the cache encodes whole groups);
//   values: per-token asymmetric b-bit quantization in groups of 32 channels -- that is exactly
//           TokenwiseCodec{d, b, 32};
//   b in {2, 4}; full-precision residual R = 128: keys flushed in chunks of R (FlushMode::Chunk),
//   values a sliding window of R (FlushMode::Sliding). make_kivi() returns that configuration.
// For each (32-token group, channel) the key step and minimum are computed exactly as the token-wise
// codec does for a group (tokenwise_quantize_group on the channel's 32 values): step = fp16((max -
// min) / (2^b - 1)), lo = fp16(min), code = clamp(floor((x - lo)/step + 1/2), 0, 2^b - 1).
//
// KiviKeyCodec block layout (B tokens, B a multiple of 32, NG = B / 32 token groups):
// | section    | content                                                      | bytes          |
// |------------|--------------------------------------------------------------|----------------|
// | codes      | per token: d codes, b-bit LSB-first stream                     | B * d * b / 8  |
// | token side | none                                                         | 0              |
// | block side | fp16 step[NG][d], then fp16 min[NG][d]                         | NG * d * 4     |
// 2-bit, d = 128, B = 64: (64*32 + 2*128*4) bytes / (64*128) = 3.0 bits per element.
#include <algorithm>
#include <cstring>
#include <memory>

#include <Eigen/Core>

#include "kvq/cache/kv_cache.hpp"
#include "kvq/core/bitpack.hpp"
#include "kvq/core/half.hpp"
#include "kvq/core/validate.hpp"
#include "kvq/quant/codec.hpp"
#include "kvq/quant/tokenwise_codec.hpp"

namespace kvq {

inline constexpr int kKiviGroupTokens = 32;
inline constexpr int kKiviResidual = 128;

class KiviKeyCodec final : public Codec {
public:
    KiviKeyCodec(int head_dim, int bits)
        : d_(head_dim), bits_(bits), unpacker_(TokenwiseParams{head_dim, bits, head_dim}) {
        detail::check_head_dim(head_dim);
        KVQ_CHECK(bits == 2 || bits == 4, "KIVI bits must be 2 or 4, got ", bits);
    }
    int bits() const { return bits_; }

    CodecId id() const override { return CodecId::KiviKey; }
    std::string name() const override { return "kivi" + std::to_string(bits_) + "-key:G=32"; }
    int head_dim() const override { return d_; }
    int granularity() const override { return kKiviGroupTokens; }

    BlockLayout layout(int block_tokens) const override {
        detail::check_block_tokens(block_tokens, kKiviGroupTokens);
        BlockLayout l;
        l.block_tokens = static_cast<std::uint32_t>(block_tokens);
        l.code_bytes = static_cast<std::uint32_t>(packed_bytes(d_, bits_));
        l.token_side_bytes = 0;
        l.block_side_bytes = static_cast<std::uint32_t>((block_tokens / kKiviGroupTokens) * d_ * 4);
        return l;
    }

    void validate(const float* x, int n) const override {
        detail::check_finite_and_bounded(x, n, d_, kHalfMax / 2, "KIVI key input");
    }

    void encode(const float* x, int n, std::uint8_t* block, int block_tokens, int first) const override {
        const BlockLayout l = layout(block_tokens);
        KVQ_ASSERT(first % kKiviGroupTokens == 0 && n % kKiviGroupTokens == 0 && first + n <= block_tokens);
        half_t* steps = reinterpret_cast<half_t*>(block + l.block_side_offset());
        half_t* mins = steps + std::size_t(block_tokens / kKiviGroupTokens) * d_;
        std::uint8_t codes[kKiviGroupTokens * 1024];  // [channel][token] of one group
        float col[kKiviGroupTokens];
        std::uint8_t row[1024];
        for (int g0 = 0; g0 < n; g0 += kKiviGroupTokens) {
            const int grp = (first + g0) / kKiviGroupTokens;
            for (int c = 0; c < d_; ++c) {
                for (int t = 0; t < kKiviGroupTokens; ++t) col[t] = x[std::size_t(g0 + t) * d_ + c];
                tokenwise_quantize_group(col, kKiviGroupTokens, bits_, codes + c * kKiviGroupTokens,
                                         &steps[std::size_t(grp) * d_ + c], &mins[std::size_t(grp) * d_ + c]);
            }
            for (int t = 0; t < kKiviGroupTokens; ++t) {
                for (int c = 0; c < d_; ++c) row[c] = codes[c * kKiviGroupTokens + t];
                pack_codes(row, d_, bits_, block + std::size_t(first + g0 + t) * l.code_bytes);
            }
        }
    }

    // data: per token group of the current block, q (.) step and <q, min>; computed in score().
    void prepare(const float* q, PreparedQuery& pq) const override { pq.q.assign(q, q + d_); }

    void score(const PreparedQuery& pq, const std::uint8_t* block, int block_tokens, int first, int n,
               float* out) const override {
        const BlockLayout l = layout(block_tokens);
        const half_t* steps = reinterpret_cast<const half_t*>(block + l.block_side_offset());
        const half_t* mins = steps + std::size_t(block_tokens / kKiviGroupTokens) * d_;
        pq.scratch.resize(d_);
        float* qs = pq.scratch.data();
        float codes[1024];
        int cur = -1;
        float qmin = 0;
        for (int i = 0; i < n; ++i) {
            const int tok = first + i, grp = tok / kKiviGroupTokens;
            if (grp != cur) {
                cur = grp;
                qmin = 0;
                for (int c = 0; c < d_; ++c) {
                    qs[c] = pq.q[c] * half_to_float(steps[std::size_t(grp) * d_ + c]);
                    qmin += pq.q[c] * half_to_float(mins[std::size_t(grp) * d_ + c]);
                }
            }
            unpacker_.unpack(block + std::size_t(tok) * l.code_bytes, codes);
            out[i] = Eigen::Map<const Eigen::VectorXf>(qs, d_).dot(Eigen::Map<const Eigen::VectorXf>(codes, d_)) + qmin;
        }
    }

    void accumulate(const std::uint8_t* block, int block_tokens, int first, int n, const float* w,
                    float* acc) const override {
        const BlockLayout l = layout(block_tokens);
        const half_t* steps = reinterpret_cast<const half_t*>(block + l.block_side_offset());
        const half_t* mins = steps + std::size_t(block_tokens / kKiviGroupTokens) * d_;
        float codes[1024], sc[1024];
        int i = 0;
        while (i < n) {  // per token group: acc += step (.) sum_i w_i code_i + min * sum_i w_i
            const int grp = (first + i) / kKiviGroupTokens;
            const int end = std::min(n, (grp + 1) * kKiviGroupTokens - first);
            std::fill(sc, sc + d_, 0.0f);
            float wsum = 0;
            for (; i < end; ++i) {
                unpacker_.unpack(block + std::size_t(first + i) * l.code_bytes, codes);
                for (int c = 0; c < d_; ++c) sc[c] += w[i] * codes[c];
                wsum += w[i];
            }
            for (int c = 0; c < d_; ++c)
                acc[c] += half_to_float(steps[std::size_t(grp) * d_ + c]) * sc[c] +
                          half_to_float(mins[std::size_t(grp) * d_ + c]) * wsum;
        }
    }

    void decode(const std::uint8_t* block, int block_tokens, int first, int n, float* out) const override {
        const BlockLayout l = layout(block_tokens);
        const half_t* steps = reinterpret_cast<const half_t*>(block + l.block_side_offset());
        const half_t* mins = steps + std::size_t(block_tokens / kKiviGroupTokens) * d_;
        for (int i = 0; i < n; ++i) {
            const int tok = first + i, grp = tok / kKiviGroupTokens;
            float* o = out + std::size_t(i) * d_;
            unpacker_.unpack(block + std::size_t(tok) * l.code_bytes, o);
            for (int c = 0; c < d_; ++c)
                o[c] = o[c] * half_to_float(steps[std::size_t(grp) * d_ + c]) +
                       half_to_float(mins[std::size_t(grp) * d_ + c]);
        }
    }

private:
    int d_, bits_;
    TokenwiseCodec unpacker_;  // only for its table-driven unpack()
};

// KIVI's codecs and window policies (R = residual, KIVI default 128).
struct KiviConfig {
    std::shared_ptr<const Codec> key_codec, value_codec;
    WindowPolicy key_window, value_window;
};

inline KiviConfig make_kivi(int head_dim, int bits, int residual = kKiviResidual) {
    KVQ_CHECK(residual >= 0 && residual % kKiviGroupTokens == 0, "KIVI residual must be a multiple of 32, got ",
              residual);
    KiviConfig k;
    k.key_codec = std::make_shared<KiviKeyCodec>(head_dim, bits);
    k.value_codec = std::make_shared<TokenwiseCodec>(TokenwiseParams{head_dim, bits, 32});
    k.key_window = {residual, FlushMode::Chunk};
    k.value_window = {residual, FlushMode::Sliding};
    return k;
}

}  // namespace kvq
