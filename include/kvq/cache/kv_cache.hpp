#pragma once
// KvCache: the KV cache of one sequence. Per (layer, KV head) it keeps a page table of encoded key
// blocks and one of value blocks (in pools that several sequences may share), plus the newest
// tokens in full precision (the window). The cache owns the policy:
//  - window: how many newest tokens stay fp32, and how they flush into blocks (Sliding: the oldest
//    tokens leave one encoding unit at a time; Chunk: once R tokens have gathered, all of them are
//    encoded at once, as KIVI/QJL do for keys). A codec that encodes tokens in groups (QJL with
//    outliers: 32) keeps up to group-1 extra tokens in the window until a group is complete.
//  - past-only quantization (WKVQuant POQ): in a decode or prefill step the current tokens' K/V are
//    used exact and enter the cache after the step; off, they are stored first and attention reads
//    them back through the codec.
// Appends validate everything and reserve every block before changing anything: a failed append
// leaves the cache as it was.
// State export/import (KvCacheState, state(), from_state(), swap()) is what persistence
// (kvq/io/cache_file.hpp) and migration between pools build on.
// Concurrency (docs/CONCURRENCY.md): const members may run concurrently with each other; append,
// clear and swap need exclusive access to this cache. Different caches may be appended to
// concurrently even when they share a BlockPool.
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "kvq/cache/block_pool.hpp"
#include "kvq/core/error.hpp"
#include "kvq/quant/codec.hpp"

namespace kvq {

enum class FlushMode : std::uint8_t { Sliding = 0, Chunk = 1 };

struct WindowPolicy {
    int tokens = 0;  // R: newest tokens kept in full precision (0 = encode as soon as possible)
    FlushMode mode = FlushMode::Sliding;
};

struct CacheConfig {
    int n_layers = 1;
    int n_kv_heads = 1;
    int head_dim = 128;
    int block_tokens = 64;  // B, a power of two
    WindowPolicy key_window{};
    WindowPolicy value_window{};
    bool past_only = true;
};

// Exact memory of one cache. Block bytes are whole blocks (the unused tail of the last block and
// the alignment padding count); the window is reported separately.
struct MemoryReport {
    std::size_t key_block_bytes = 0, value_block_bytes = 0;
    std::size_t window_bytes = 0;  // fp32 window, K and V
    std::size_t encoded_key_elements = 0, encoded_value_elements = 0;
    std::size_t window_elements = 0;
    double key_bits_per_element = 0, value_bits_per_element = 0;  // codec rate of a full block
    // All block bytes over all encoded elements (0 when nothing is encoded yet).
    double allocated_bits_per_element() const {
        const std::size_t e = encoded_key_elements + encoded_value_elements;
        return e ? 8.0 * double(key_block_bytes + value_block_bytes) / double(e) : 0.0;
    }
    double bits_per_element() const { return 0.5 * (key_bits_per_element + value_bits_per_element); }
};

// What attention reads of one (layer, head) stream.
struct StreamView {
    const Codec* codec = nullptr;
    const BlockPool* pool = nullptr;
    const std::uint32_t* pages = nullptr;  // block ids, in token order
    int block_tokens = 0;
    int encoded = 0;                // tokens [0, encoded) are in blocks
    const float* window = nullptr;  // tokens [encoded, encoded + window_tokens), row stride window_stride
    int window_tokens = 0;
    int window_stride = 0;
};

// A cache's contents, independent of pools and block ids: what state() exports and from_state()
// rebuilds. Shapes are in terms of the config (H = n_kv_heads, d = head_dim, B = block_tokens).
struct KvStreamState {
    int encoded = 0;                   // tokens [0, encoded) are in blocks
    std::vector<std::uint8_t> blocks;  // [H][ceil(encoded / B)][block bytes]: each head's pages in order
    std::vector<float> window;         // [tokens - encoded][H][d]: the fp32 window, oldest token first
};
struct KvLayerState {
    int tokens = 0;
    KvStreamState key, value;
};
struct KvCacheState {
    CacheConfig config;
    std::vector<KvLayerState> layers;  // [n_layers]
};

class KvCache {
public:
    KvCache(const CacheConfig& cfg, std::shared_ptr<const Codec> key_codec, std::shared_ptr<const Codec> value_codec,
            std::shared_ptr<BlockPool> key_pool = {}, std::shared_ptr<BlockPool> value_pool = {})
        : cfg_(cfg), kc_(std::move(key_codec)), vc_(std::move(value_codec)) {
        KVQ_CHECK(kc_ && vc_, "key and value codecs must be given");
        KVQ_CHECK(cfg.n_layers >= 1 && cfg.n_layers <= 4096, "n_layers must be in [1, 4096], got ", cfg.n_layers);
        KVQ_CHECK(cfg.n_kv_heads >= 1 && cfg.n_kv_heads <= 1024, "n_kv_heads must be in [1, 1024], got ",
                  cfg.n_kv_heads);
        KVQ_CHECK(kc_->head_dim() == cfg.head_dim && vc_->head_dim() == cfg.head_dim, "codec head_dim (",
                  kc_->head_dim(), ", ", vc_->head_dim(), ") differs from the cache's (", cfg.head_dim, ")");
        KVQ_CHECK(vc_->decodable(), "value codec ", vc_->name(), " cannot decode values");
        check_window(cfg.key_window, *kc_, "key");
        check_window(cfg.value_window, *vc_, "value");
        const BlockLayout kl = kc_->layout(cfg.block_tokens), vl = vc_->layout(cfg.block_tokens);
        kpool_ = key_pool ? std::move(key_pool) : std::make_shared<BlockPool>(kl);
        vpool_ = value_pool ? std::move(value_pool) : std::make_shared<BlockPool>(vl);
        KVQ_CHECK(kpool_->block_bytes() == kl.bytes() && vpool_->block_bytes() == vl.bytes(),
                  "pool block size does not match the codec layout");
        layers_.resize(cfg.n_layers);
        for (auto& L : layers_) {
            L.key.pages.resize(cfg.n_kv_heads);
            L.value.pages.resize(cfg.n_kv_heads);
        }
    }
    KvCache(const KvCache&) = delete;
    KvCache& operator=(const KvCache&) = delete;
    ~KvCache() { clear(); }

    const CacheConfig& config() const { return cfg_; }
    const Codec& key_codec() const { return *kc_; }
    const Codec& value_codec() const { return *vc_; }
    int tokens(int layer) const { return layers_[check_layer(layer)].tokens; }

    // k, v: [n][n_kv_heads][head_dim] (post-RoPE keys). Strong guarantee: on error nothing changes.
    void append(int layer, const float* k, const float* v, int n) {
        Layer& L = layers_[check_layer(layer)];
        KVQ_CHECK(n >= 0, "append of a negative token count ", n);
        if (n == 0) return;
        KVQ_CHECK(k && v, "null key or value pointer");
        const int H = cfg_.n_kv_heads;
        kc_->validate(k, n * H);
        vc_->validate(v, n * H);
        const int fk = flush_count(L.key, n, cfg_.key_window, kc_->granularity());
        const int fv = flush_count(L.value, n, cfg_.value_window, vc_->granularity());
        const std::uint64_t need_k = std::uint64_t(H) * (blocks_for(L.key.encoded + fk) - blocks_for(L.key.encoded));
        const std::uint64_t need_v =
            std::uint64_t(H) * (blocks_for(L.value.encoded + fv) - blocks_for(L.value.encoded));
        // Reserved atomically, so that other sequences appending to a shared pool at the same time
        // cannot take the blocks between the check and the flush.
        BlockPool::Reservation rk, rv;
        if (kpool_ == vpool_) {
            KVQ_CHECK(kpool_->try_reserve(need_k + need_v, rk), "block pool too small: append needs ", need_k + need_v,
                      " blocks, ", kpool_->available(), " available");
        } else {
            KVQ_CHECK(kpool_->try_reserve(need_k, rk), "key block pool too small: needs ", need_k, " blocks, ",
                      kpool_->available(), " available");
            KVQ_CHECK(vpool_->try_reserve(need_v, rv), "value block pool too small: needs ", need_v, " blocks, ",
                      vpool_->available(), " available");
        }
        // Nothing below can fail.
        push_window(L.key, k, n);
        push_window(L.value, v, n);
        flush(L.key, fk, *kc_, *kpool_, rk);
        flush(L.value, fv, *vc_, *vpool_, kpool_ == vpool_ ? rk : rv);
        L.tokens += n;
    }

    StreamView keys(int layer, int head) const {
        return view(layers_[check_layer(layer)].key, check_head(head), *kc_, *kpool_);
    }
    StreamView values(int layer, int head) const {
        return view(layers_[check_layer(layer)].value, check_head(head), *vc_, *vpool_);
    }

    MemoryReport memory() const {
        MemoryReport r;
        const std::size_t d = cfg_.head_dim;
        for (const Layer& L : layers_) {
            for (int h = 0; h < cfg_.n_kv_heads; ++h) {
                r.key_block_bytes += L.key.pages[h].size() * kpool_->block_bytes();
                r.value_block_bytes += L.value.pages[h].size() * vpool_->block_bytes();
            }
            r.encoded_key_elements += std::size_t(L.key.encoded) * cfg_.n_kv_heads * d;
            r.encoded_value_elements += std::size_t(L.value.encoded) * cfg_.n_kv_heads * d;
            r.window_elements += std::size_t(window_count(L.key) + window_count(L.value)) * cfg_.n_kv_heads * d;
        }
        r.window_bytes = r.window_elements * sizeof(float);
        r.key_bits_per_element = kc_->bits_per_element(cfg_.block_tokens);
        r.value_bits_per_element = vc_->bits_per_element(cfg_.block_tokens);
        return r;
    }

    // Returns every block to its pool and forgets all tokens.
    void clear() {
        for (Layer& L : layers_) {
            release(L.key, *kpool_);
            release(L.value, *vpool_);
            L.tokens = 0;
        }
    }

    std::shared_ptr<const Codec> key_codec_ptr() const { return kc_; }
    std::shared_ptr<const Codec> value_codec_ptr() const { return vc_; }
    std::shared_ptr<BlockPool> key_pool() const { return kpool_; }
    std::shared_ptr<BlockPool> value_pool() const { return vpool_; }

    // Exports the whole contents: config, token counts, every block's bytes in page order and the
    // fp32 windows. from_state(state(), same codecs) gives a cache that behaves identically.
    KvCacheState state() const {
        KvCacheState st;
        st.config = cfg_;
        st.layers.resize(layers_.size());
        for (std::size_t l = 0; l < layers_.size(); ++l) {
            st.layers[l].tokens = layers_[l].tokens;
            export_stream(layers_[l].key, *kpool_, st.layers[l].key);
            export_stream(layers_[l].value, *vpool_, st.layers[l].value);
        }
        return st;
    }

    // Rebuilds a cache from st with the given codecs (and pools, as in the constructor). Validates
    // everything first -- the config (as the constructor does), per layer: 0 <= encoded <= tokens,
    // encoded a multiple of the codec's granularity, sizes of blocks and window, a window that the
    // window policy can leave behind after an append, window values the codec accepts -- then
    // reserves all blocks at once. Throws kvq::Error on any mismatch; the pools are then unchanged.
    // Block bytes are copied as given: codec-specific checks of their contents are the caller's
    // (kvq/io/codec_registry.hpp has them for files).
    static std::unique_ptr<KvCache> from_state(const KvCacheState& st, std::shared_ptr<const Codec> key_codec,
                                               std::shared_ptr<const Codec> value_codec,
                                               std::shared_ptr<BlockPool> key_pool = {},
                                               std::shared_ptr<BlockPool> value_pool = {}) {
        auto c = std::make_unique<KvCache>(st.config, std::move(key_codec), std::move(value_codec), std::move(key_pool),
                                           std::move(value_pool));
        KVQ_CHECK(st.layers.size() == std::size_t(st.config.n_layers), "cache state has ", st.layers.size(),
                  " layers, its config ", st.config.n_layers);
        std::uint64_t need_k = 0, need_v = 0;
        for (std::size_t l = 0; l < st.layers.size(); ++l) {
            const KvLayerState& L = st.layers[l];
            KVQ_CHECK(L.tokens >= 0, "layer ", l, ": negative token count ", L.tokens);
            need_k += c->check_stream_state(L.key, L.tokens, *c->kc_, c->cfg_.key_window, "key", l);
            need_v += c->check_stream_state(L.value, L.tokens, *c->vc_, c->cfg_.value_window, "value", l);
        }
        BlockPool::Reservation rk, rv;
        if (c->kpool_ == c->vpool_) {
            KVQ_CHECK(c->kpool_->try_reserve(need_k + need_v, rk), "block pool too small: the state needs ",
                      need_k + need_v, " blocks, ", c->kpool_->available(), " available");
        } else {
            KVQ_CHECK(c->kpool_->try_reserve(need_k, rk), "key block pool too small: the state needs ", need_k,
                      " blocks, ", c->kpool_->available(), " available");
            KVQ_CHECK(c->vpool_->try_reserve(need_v, rv), "value block pool too small: the state needs ", need_v,
                      " blocks, ", c->vpool_->available(), " available");
        }
        for (std::size_t l = 0; l < st.layers.size(); ++l) {
            Layer& L = c->layers_[l];
            c->import_stream(st.layers[l].key, *c->kpool_, rk, L.key);
            c->import_stream(st.layers[l].value, *c->vpool_, c->kpool_ == c->vpool_ ? rk : rv, L.value);
            L.tokens = st.layers[l].tokens;
        }
        return c;
    }

    // Exchanges the whole contents (config, codecs, pools, tokens) of two caches; never throws.
    // With from_state this replaces a cache's contents only once the new ones are complete.
    void swap(KvCache& other) noexcept {
        std::swap(cfg_, other.cfg_);
        kc_.swap(other.kc_);
        vc_.swap(other.vc_);
        kpool_.swap(other.kpool_);
        vpool_.swap(other.vpool_);
        layers_.swap(other.layers_);
    }

private:
    struct Stream {
        std::vector<std::vector<std::uint32_t>> pages;  // [head] -> block ids
        int encoded = 0;
        std::vector<float> window;  // [start + w][H][d]; tokens before `start` were flushed
        int start = 0;
    };
    struct Layer {
        Stream key, value;
        int tokens = 0;
    };

    int check_layer(int layer) const {
        KVQ_CHECK(layer >= 0 && layer < cfg_.n_layers, "layer ", layer, " out of range [0, ", cfg_.n_layers, ")");
        return layer;
    }
    int check_head(int head) const {
        KVQ_CHECK(head >= 0 && head < cfg_.n_kv_heads, "KV head ", head, " out of range [0, ", cfg_.n_kv_heads, ")");
        return head;
    }
    static void check_window(const WindowPolicy& w, const Codec& c, const char* what) {
        KVQ_CHECK(w.tokens >= 0 && w.tokens <= (1 << 20), what, " window must be in [0, 2^20] tokens, got ", w.tokens);
        if (w.mode == FlushMode::Chunk)
            KVQ_CHECK(w.tokens % c.granularity() == 0, what, " chunk window (", w.tokens,
                      ") must be a multiple of the codec's encoding granularity (", c.granularity(), ")");
    }
    std::uint64_t blocks_for(int tokens) const {
        return (std::uint64_t(tokens) + cfg_.block_tokens - 1) / cfg_.block_tokens;
    }
    int stride() const { return cfg_.n_kv_heads * cfg_.head_dim; }
    int window_count(const Stream& s) const { return static_cast<int>(s.window.size() / stride()) - s.start; }

    // Tokens to encode after n more arrive; always a multiple of the codec's granularity.
    int flush_count(const Stream& s, int n, const WindowPolicy& p, int gran) const {
        return flush_count_for(window_count(s) + n, p, gran);
    }
    static int flush_count_for(int w, const WindowPolicy& p, int gran) {
        if (p.mode == FlushMode::Chunk && p.tokens > 0) return w >= p.tokens ? (w / gran) * gran : 0;
        const int excess = w - p.tokens;
        return excess >= gran ? (excess / gran) * gran : 0;
    }

    void push_window(Stream& s, const float* x, int n) {
        if (s.start > 0 && s.start >= window_count(s)) {  // compact: amortised O(1) per token
            s.window.erase(s.window.begin(), s.window.begin() + std::size_t(s.start) * stride());
            s.start = 0;
        }
        s.window.insert(s.window.end(), x, x + std::size_t(n) * stride());
    }

    void flush(Stream& s, int count, const Codec& codec, BlockPool& pool, BlockPool::Reservation& res) {
        if (count == 0) return;
        const int B = cfg_.block_tokens, d = cfg_.head_dim, H = cfg_.n_kv_heads;
        // Scratch kept across appends: a decode step flushes one token, and must not allocate for it.
        std::vector<float>& rows = flush_rows_;
        rows.resize(std::size_t(count) * d);
        for (int h = 0; h < H; ++h) {
            const float* src = s.window.data() + std::size_t(s.start) * stride() + std::size_t(h) * d;
            for (int t = 0; t < count; ++t)
                std::copy_n(src + std::size_t(t) * stride(), d, rows.data() + std::size_t(t) * d);
            int done = 0;
            while (done < count) {
                const int pos = s.encoded + done;
                if (pos % B == 0) s.pages[h].push_back(res.allocate());
                const int n = std::min(count - done, B - pos % B);
                codec.encode(rows.data() + std::size_t(done) * d, n, pool.data(s.pages[h].back()), B, pos % B);
                done += n;
            }
        }
        s.encoded += count;
        s.start += count;
    }

    void export_stream(const Stream& s, const BlockPool& pool, KvStreamState& out) const {
        out.encoded = s.encoded;
        const std::size_t bb = pool.block_bytes();
        std::size_t pages = 0;
        for (const auto& pg : s.pages) pages += pg.size();
        out.blocks.resize(pages * bb);
        std::size_t at = 0;
        for (const auto& pg : s.pages)
            for (std::uint32_t id : pg) {
                std::memcpy(out.blocks.data() + at, pool.data(id), bb);
                at += bb;
            }
        const auto first = s.window.begin() + std::ptrdiff_t(s.start) * stride();
        out.window.assign(first, s.window.end());
    }

    // Validates one stream of a state against this (empty) cache; returns the blocks it needs.
    std::uint64_t check_stream_state(const KvStreamState& s, int tokens, const Codec& c, const WindowPolicy& p,
                                     const char* what, std::size_t layer) const {
        KVQ_CHECK(s.encoded >= 0 && s.encoded <= tokens, "layer ", layer, " ", what, ": encoded tokens ", s.encoded,
                  " out of range [0, ", tokens, "]");
        KVQ_CHECK(s.encoded % c.granularity() == 0, "layer ", layer, " ", what, ": encoded tokens ", s.encoded,
                  " not a multiple of the codec's granularity ", c.granularity());
        const int w = tokens - s.encoded;
        KVQ_CHECK(s.window.size() == std::size_t(w) * std::size_t(stride()), "layer ", layer, " ", what,
                  ": window has ", s.window.size(), " floats, expected ", std::size_t(w) * std::size_t(stride()));
        KVQ_CHECK(flush_count_for(w, p, c.granularity()) == 0, "layer ", layer, " ", what, ": a window of ", w,
                  " tokens is not one the window policy (", p.tokens, " tokens, ",
                  p.mode == FlushMode::Chunk ? "chunk" : "sliding", ") leaves behind");
        const std::uint64_t pages = blocks_for(s.encoded);
        const std::uint64_t bytes = pages * std::uint64_t(cfg_.n_kv_heads) * c.layout(cfg_.block_tokens).bytes();
        KVQ_CHECK(s.blocks.size() == bytes, "layer ", layer, " ", what, ": block data has ", s.blocks.size(),
                  " bytes, expected ", bytes);
        if (w > 0) c.validate(s.window.data(), w * cfg_.n_kv_heads);
        return pages * std::uint64_t(cfg_.n_kv_heads);
    }

    void import_stream(const KvStreamState& in, BlockPool& pool, BlockPool::Reservation& res, Stream& s) {
        const std::size_t bb = pool.block_bytes();
        const std::size_t per_head = std::size_t(blocks_for(in.encoded));
        std::size_t at = 0;
        for (auto& pg : s.pages) {
            pg.reserve(per_head);
            for (std::size_t i = 0; i < per_head; ++i) {
                pg.push_back(res.allocate());
                std::memcpy(pool.data(pg.back()), in.blocks.data() + at, bb);
                at += bb;
            }
        }
        s.encoded = in.encoded;
        s.window = in.window;
        s.start = 0;
    }

    void release(Stream& s, BlockPool& pool) {
        for (auto& pg : s.pages) {
            for (std::uint32_t id : pg) pool.release(id);
            pg.clear();
        }
        s.encoded = 0;
        s.window.clear();
        s.start = 0;
    }

    StreamView view(const Stream& s, int head, const Codec& c, const BlockPool& pool) const {
        StreamView v;
        v.codec = &c;
        v.pool = &pool;
        v.pages = s.pages[head].data();
        v.block_tokens = cfg_.block_tokens;
        v.encoded = s.encoded;
        v.window_tokens = window_count(s);
        // No window: null (an empty vector's data() may be null, and offsetting null is UB).
        v.window = v.window_tokens > 0
                       ? s.window.data() + std::size_t(s.start) * stride() + std::size_t(head) * cfg_.head_dim
                       : nullptr;
        v.window_stride = stride();
        return v;
    }

    CacheConfig cfg_;
    std::shared_ptr<const Codec> kc_, vc_;
    std::shared_ptr<BlockPool> kpool_, vpool_;
    std::vector<Layer> layers_;
    std::vector<float> flush_rows_;  // [count][d] gather buffer of flush(), reused
};

}  // namespace kvq
