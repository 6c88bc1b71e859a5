#pragma once
// KvCacheBackend: the Llama model's AttentionBackend on top of a compressed kvq::KvCache.
//
// The model hands over post-RoPE q, k, v of one layer at one position; decode() runs
// kvq::decode_step, so the cache's policy applies (past-only quantization: the current token is
// attended exactly and enters the cache after the step; windows; flush modes). With IdentityCodec
// F32 for keys and values it reproduces Fp32AttentionBackend up to float rounding (attend scales by
// a multiplication and accumulates values in double; the fp32 backend divides and sums in float).
//
// With WKVQuant smoothing parameters (second constructor) the cache is a WkvKvCache: keys and/or
// values are shifted and scaled per channel before the codec sees them and the query and output
// are folded back, so the model still hands over raw post-RoPE q, k, v.
#include <memory>
#include <optional>
#include <utility>

#include "kvq/cache/attention.hpp"
#include "kvq/cache/kv_cache.hpp"
#include "kvq/core/error.hpp"
#include "kvq/model/llama.hpp"
#include "kvq/quant/codec.hpp"
#include "kvq/quant/wkv_codec.hpp"

namespace kvq::model {

class KvCacheBackend : public AttentionBackend {
public:
    // `cache_config` supplies the block size, windows and past-only flag; its n_layers, n_kv_heads
    // and head_dim are overwritten from the model config.
    KvCacheBackend(const LlamaConfig& model_config, CacheConfig cache_config, std::shared_ptr<const Codec> key_codec,
                   std::shared_ptr<const Codec> value_codec)
        : n_heads_(checked_heads(model_config)) {
        plain_.emplace(with_model_shape(model_config, cache_config), std::move(key_codec), std::move(value_codec));
    }

    // WKVQuant: `params` (one entry per model layer, e.g. from kvq::calib::calibrate) smooth the
    // keys (smooth_keys) and/or the values (smooth_values) before they reach the codecs.
    KvCacheBackend(const LlamaConfig& model_config, CacheConfig cache_config, std::shared_ptr<const Codec> key_codec,
                   std::shared_ptr<const Codec> value_codec, std::shared_ptr<const WkvParams> params,
                   bool smooth_keys = true, bool smooth_values = true)
        : n_heads_(checked_heads(model_config)), smoothed_sides_(int(smooth_keys) + int(smooth_values)) {
        wkv_.emplace(with_model_shape(model_config, cache_config), std::move(key_codec), std::move(value_codec),
                     std::move(params), smooth_keys, smooth_values);
    }

    void reset() override { cache().clear(); }

    void decode(int layer, int pos, const float* q, const float* k, const float* v, float* out) override {
        KVQ_CHECK(layer >= 0 && layer < cache().config().n_layers, "KvCacheBackend: layer ", layer, " is outside [0, ",
                  cache().config().n_layers, ")");
        // Positions arrive strictly in order; anything else means the caller forgot reset().
        KVQ_CHECK(pos == cache().tokens(layer), "KvCacheBackend: layer ", layer, " got pos ", pos, " but holds ",
                  cache().tokens(layer), " positions (call reset() before a new sequence)");
        if (wkv_)
            wkv_->decode_step(layer, q, n_heads_, k, v, out, ws_);
        else
            decode_step(*plain_, layer, q, n_heads_, k, v, out, ws_);
    }

    // The block cache (inside the WKV wrapper for a smoothed method: it holds smoothed vectors).
    const KvCache& cache() const { return wkv_ ? wkv_->cache() : *plain_; }
    KvCache& cache() { return wkv_ ? wkv_->cache() : *plain_; }
    bool smoothed() const { return wkv_.has_value(); }
    MemoryReport memory() const { return cache().memory(); }
    // Bytes the cache really holds: whole blocks (K and V) plus the fp32 window. The per-layer
    // smoothing parameters (shift and scale per channel and layer, for each smoothed side) are
    // model constants, not cache state; parameter_bytes() reports them.
    std::size_t bytes_in_use() const {
        const MemoryReport r = cache().memory();
        return r.key_block_bytes + r.value_block_bytes + r.window_bytes;
    }
    std::size_t parameter_bytes() const {
        if (!wkv_) return 0;
        const WkvParams& p = wkv_->params();
        return std::size_t(p.n_layers) * p.n_kv_heads * p.head_dim * 2 * std::size_t(smoothed_sides_) * sizeof(float);
    }

private:
    static int checked_heads(const LlamaConfig& m) {
        KVQ_CHECK(m.n_heads > 0 && m.n_kv_heads > 0 && m.n_heads % m.n_kv_heads == 0,
                  "KvCacheBackend: n_heads = ", m.n_heads,
                  " is not a positive multiple of n_kv_heads = ", m.n_kv_heads);
        return m.n_heads;
    }
    static CacheConfig with_model_shape(const LlamaConfig& m, CacheConfig c) {
        c.n_layers = m.n_layers;
        c.n_kv_heads = m.n_kv_heads;
        c.head_dim = m.head_dim;
        return c;
    }

    int n_heads_;
    int smoothed_sides_ = 0;        // WKV: 1 or 2 of K / V smoothed
    std::optional<KvCache> plain_;  // exactly one of plain_ / wkv_ is set
    std::optional<WkvKvCache> wkv_;
    AttentionWorkspace ws_;
};

}  // namespace kvq::model
