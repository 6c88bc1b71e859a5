#pragma once
// Identity codec: keys/values stored unquantized as fp32, fp16 or bf16 (the reference cache).
// Block layout: codes = B x d elements of the storage type, no side data.
#include "kvq/core/half.hpp"
#include "kvq/core/validate.hpp"
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
            if (type_ == StorageType::F32) reinterpret_cast<float*>(block)[e] = x[i];
            else if (type_ == StorageType::F16) reinterpret_cast<half_t*>(block)[e] = float_to_half(x[i]);
            else reinterpret_cast<bf16_t*>(block)[e] = float_to_bf16(x[i]);
        }
    }
    void prepare(const float* q, PreparedQuery& pq) const override { pq.q.assign(q, q + d_); }
    void score(const PreparedQuery& pq, const std::uint8_t* block, int, int first, int n, float* out) const override {
        float row[1024];
        for (int i = 0; i < n; ++i) {
            load(block, first + i, row);
            float s = 0;
            for (int c = 0; c < d_; ++c) s += pq.q[c] * row[c];
            out[i] = s;
        }
    }
    void accumulate(const std::uint8_t* block, int, int first, int n, const float* w, float* acc) const override {
        float row[1024];
        for (int i = 0; i < n; ++i) {
            load(block, first + i, row);
            for (int c = 0; c < d_; ++c) acc[c] += w[i] * row[c];
        }
    }
    void decode(const std::uint8_t* block, int, int first, int n, float* out) const override {
        for (int i = 0; i < n; ++i) load(block, first + i, out + std::size_t(i) * d_);
    }

private:
    void load(const std::uint8_t* block, int tok, float* row) const {
        const std::size_t e0 = std::size_t(tok) * d_;
        for (int c = 0; c < d_; ++c) {
            if (type_ == StorageType::F32) row[c] = reinterpret_cast<const float*>(block)[e0 + c];
            else if (type_ == StorageType::F16) row[c] = half_to_float(reinterpret_cast<const half_t*>(block)[e0 + c]);
            else row[c] = bf16_to_float(reinterpret_cast<const bf16_t*>(block)[e0 + c]);
        }
    }
    int d_;
    StorageType type_;
};

}  // namespace kvq
