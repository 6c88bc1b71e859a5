#pragma once
// Identity codec: keys/values stored unquantized as fp32, fp16 or bf16 (the reference cache).
// Block layout: codes = B x d elements of the storage type, no side data.
#include <Eigen/Core>

#include "kvq/core/half.hpp"
#include "kvq/core/validate.hpp"
#include "kvq/cpu/kernels.hpp"
#include "kvq/quant/codec.hpp"

namespace kvq {

enum class StorageType : std::uint8_t { F32 = 0, F16 = 1, BF16 = 2 };

class IdentityCodec final : public Codec {
public:
    IdentityCodec(int head_dim, StorageType type) : d_(head_dim), type_(type) { detail::check_head_dim(head_dim); }

    StorageType storage() const { return type_; }
    CodecId id() const override { return CodecId::Identity; }
    std::string name() const override {
        return type_ == StorageType::F32 ? "fp32" : (type_ == StorageType::F16 ? "fp16" : "bf16");
    }
    int head_dim() const override { return d_; }
    BlockLayout layout(int block_tokens) const override {
        detail::check_block_tokens(block_tokens, 1);
        BlockLayout l;
        l.block_tokens = static_cast<std::uint32_t>(block_tokens);
        l.code_bytes = static_cast<std::uint32_t>(d_ * (type_ == StorageType::F32 ? 4 : 2));
        return l;
    }
    void validate(const float* x, int n) const override {
        detail::check_finite_and_bounded(x, n, d_, type_ == StorageType::F16 ? kHalfMax : 3.0e38f, "input");
    }
    void encode(const float* x, int n, std::uint8_t* block, int, int first) const override {
        for (int i = 0; i < n * d_; ++i) {
            const std::size_t e = std::size_t(first) * d_ + i;
            if (type_ == StorageType::F32)
                reinterpret_cast<float*>(block)[e] = x[i];
            else if (type_ == StorageType::F16)
                reinterpret_cast<half_t*>(block)[e] = float_to_half(x[i]);
            else
                reinterpret_cast<bf16_t*>(block)[e] = float_to_bf16(x[i]);
        }
    }
    void prepare(const float* q, PreparedQuery& pq) const override { pq.q.assign(q, q + d_); }
    void score(const PreparedQuery& pq, const std::uint8_t* block, int, int first, int n, float* out) const override {
        float buf[1024];
        const Eigen::Map<const Eigen::VectorXf> q(pq.q.data(), d_);
        for (int i = 0; i < n; ++i) out[i] = q.dot(Eigen::Map<const Eigen::VectorXf>(row(block, first + i, buf), d_));
    }
    void accumulate(const std::uint8_t* block, int, int first, int n, const float* w, float* acc) const override {
        float buf[1024];
        for (int i = 0; i < n; ++i) {
            const float* r = row(block, first + i, buf);
            for (int c = 0; c < d_; ++c) acc[c] += w[i] * r[c];
        }
    }
    // fp32 storage with SIMD: each key / value row is loaded once for all G query heads.
    void score_group(const PreparedQuery* const* pq, int G, const std::uint8_t* block, int block_tokens, int first,
                     int n, float* const* out) const override {
        if (type_ != StorageType::F32 || cpu::simd_level() == cpu::SimdLevel::Scalar || G > 8)
            return Codec::score_group(pq, G, block, block_tokens, first, n, out);
        const float* q[8];
        for (int g = 0; g < G; ++g) q[g] = pq[g]->q.data();
        cpu::f32_dot_group(reinterpret_cast<const float*>(block) + std::size_t(first) * d_, n, d_, G, q, out);
    }
    void accumulate_group(const std::uint8_t* block, int block_tokens, int first, int n, int G, const float* const* w,
                          float* const* acc) const override {
        if (type_ != StorageType::F32 || cpu::simd_level() == cpu::SimdLevel::Scalar)
            return Codec::accumulate_group(block, block_tokens, first, n, G, w, acc);
        cpu::f32_axpy_group(reinterpret_cast<const float*>(block) + std::size_t(first) * d_, n, d_, G, w, acc);
    }
    void decode(const std::uint8_t* block, int, int first, int n, float* out) const override {
        for (int i = 0; i < n; ++i) load(block, first + i, out + std::size_t(i) * d_);
    }

private:
    // Token tok as floats: a pointer into the block for fp32, else converted into buf.
    const float* row(const std::uint8_t* block, int tok, float* buf) const {
        if (type_ == StorageType::F32) return reinterpret_cast<const float*>(block) + std::size_t(tok) * d_;
        load(block, tok, buf);
        return buf;
    }
    void load(const std::uint8_t* block, int tok, float* row) const {
        const std::size_t e0 = std::size_t(tok) * d_;
        for (int c = 0; c < d_; ++c) {
            if (type_ == StorageType::F32)
                row[c] = reinterpret_cast<const float*>(block)[e0 + c];
            else if (type_ == StorageType::F16)
                row[c] = half_to_float(reinterpret_cast<const half_t*>(block)[e0 + c]);
            else
                row[c] = bf16_to_float(reinterpret_cast<const bf16_t*>(block)[e0 + c]);
        }
    }
    int d_;
    StorageType type_;
};

}  // namespace kvq
