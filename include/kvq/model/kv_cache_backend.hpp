#pragma once
// KvCacheBackend: the Llama model's AttentionBackend on top of a compressed kvq::KvCache.
//
// The model hands over post-RoPE q, k, v of one layer at one position; decode() runs
// kvq::decode_step, so the cache's policy applies (past-only quantization: the current token is
// attended exactly and enters the cache after the step; windows; flush modes). With IdentityCodec
// F32 for keys and values it reproduces Fp32AttentionBackend up to float rounding (attend scales by
// a multiplication and accumulates values in double; the fp32 backend divides and sums in float).
#include <memory>
#include <utility>

#include "kvq/cache/attention.hpp"
#include "kvq/cache/kv_cache.hpp"
#include "kvq/core/error.hpp"
#include "kvq/model/llama.hpp"
#include "kvq/quant/codec.hpp"

namespace kvq::model {

class KvCacheBackend : public AttentionBackend {
public:
    // `cache_config` supplies the block size, windows and past-only flag; its n_layers, n_kv_heads
    // and head_dim are overwritten from the model config.
    KvCacheBackend(const LlamaConfig& model_config, CacheConfig cache_config, std::shared_ptr<const Codec> key_codec,
                   std::shared_ptr<const Codec> value_codec)
        : n_heads_(model_config.n_heads),
          cache_(with_model_shape(model_config, cache_config), std::move(key_codec), std::move(value_codec)) {
        KVQ_CHECK(model_config.n_heads % model_config.n_kv_heads == 0, "KvCacheBackend: n_heads = ",
                  model_config.n_heads, " is not a multiple of n_kv_heads = ", model_config.n_kv_heads);
    }

    void reset() override { cache_.clear(); }

    void decode(int layer, int pos, const float* q, const float* k, const float* v, float* out) override {
        KVQ_CHECK(layer >= 0 && layer < cache_.config().n_layers, "KvCacheBackend: layer ", layer,
                  " is outside [0, ", cache_.config().n_layers, ")");
        // Positions arrive strictly in order; anything else means the caller forgot reset().
        KVQ_CHECK(pos == cache_.tokens(layer), "KvCacheBackend: layer ", layer, " got pos ", pos, " but holds ",
                  cache_.tokens(layer), " positions (call reset() before a new sequence)");
        decode_step(cache_, layer, q, n_heads_, k, v, out, ws_);
    }

    const KvCache& cache() const { return cache_; }
    KvCache& cache() { return cache_; }
    MemoryReport memory() const { return cache_.memory(); }
    // Bytes the cache really holds: whole blocks (K and V) plus the fp32 window.
    std::size_t bytes_in_use() const {
        const MemoryReport r = cache_.memory();
        return r.key_block_bytes + r.value_block_bytes + r.window_bytes;
    }

private:
    static CacheConfig with_model_shape(const LlamaConfig& m, CacheConfig c) {
        c.n_layers = m.n_layers;
        c.n_kv_heads = m.n_kv_heads;
        c.head_dim = m.head_dim;
        return c;
    }

    int n_heads_;
    KvCache cache_;
    AttentionWorkspace ws_;
};

}  // namespace kvq::model
