#pragma once
// WKVQuant two-dimensional KV quantization (ALGORITHMS.md §2.2):
//   1. static per-channel smoothing  x~ = (x - delta) / s   (delta, s per layer, per K/V, over the
//      C = H_kv * d channels; calibrated offline, see kvq/calibration/kv_calibration.hpp);
//   2. dynamic token-wise b-bit quantization of x~ (WkvCodec = the token-wise codec, default g = d).
//
// Design: the smoothing is a property of the (layer, KV head) stream, but the Codec interface has
// no (layer, head) argument and one codec serves all streams of a KvCache. So the smoothing lives
// outside the block format, in WkvKvCache, a thin adapter around KvCache:
//   - append / decode_step / prefill smooth K (and/or V) before they reach the cache, so every token
//     the cache holds -- encoded blocks, the fp32 window and the exact current token of past-only
//     quantization -- is in smoothed coordinates. The block bytes are exactly the token-wise
//     codec's (docs/FORMAT.md); delta and s are kept once per layer in WkvParams.
//   - keys, route (b) of §2.2: the query is folded once, q' = q (.) s_K; then for every key j
//     <q', k~_j> = <q, k_j - delta_K> = <q, k_j> - <q, delta_K>. The term <q, delta_K> is the same
//     for every key, the current (exact, POQ) key included because it is smoothed the same way, so
//     softmax is unchanged. Scores handed back to the caller get <q, delta_K>/sqrt(d) added again so
//     that they are the raw q.k/sqrt(d) estimates.
//   - values: sum_j p_j v~_j = (sum_j p_j v_j - delta_V) / s_V because sum_j p_j = 1, so the output
//     is un-smoothed once: o = o~ (.) s_V + delta_V.
// The smoothing of K and of V can be switched independently (K/V codec mixing, e.g. QJL keys with
// WKV values: only V is smoothed). With delta = 0, s = 1 the adapter is the plain KvCache.
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "kvq/cache/attention.hpp"
#include "kvq/cache/kv_cache.hpp"
#include "kvq/calibration/wkv_params.hpp"
#include "kvq/core/error.hpp"
#include "kvq/quant/tokenwise_codec.hpp"

namespace kvq {

// x~ = (x - shift) / scale for n rows of C channels (x [n][C]).
inline void wkv_smooth_rows(const float* x, int n, const std::vector<float>& shift, const std::vector<float>& scale,
                            float* out) {
    const std::size_t C = shift.size();
    for (int t = 0; t < n; ++t)
        for (std::size_t c = 0; c < C; ++c) out[t * C + c] = (x[t * C + c] - shift[c]) / scale[c];
}

// The dynamic part: token-wise b-bit quantization of the smoothed vectors, group g (default d).
// Same block format as TokenwiseCodec (docs/FORMAT.md); only id() and name() differ.
class WkvCodec final : public Codec {
public:
    WkvCodec(int head_dim, int bits, int group = 0)
        : inner_(TokenwiseParams{head_dim, bits, group == 0 ? head_dim : group}) {}
    const TokenwiseCodec& inner() const { return inner_; }
    CodecId id() const override { return CodecId::Wkv; }
    std::string name() const override {
        return "wkv" + std::to_string(inner_.params().bits) + ":g=" + std::to_string(inner_.params().group);
    }
    int head_dim() const override { return inner_.head_dim(); }
    BlockLayout layout(int block_tokens) const override { return inner_.layout(block_tokens); }
    void validate(const float* x, int n) const override { inner_.validate(x, n); }
    void encode(const float* x, int n, std::uint8_t* block, int block_tokens, int first) const override {
        inner_.encode(x, n, block, block_tokens, first);
    }
    void prepare(const float* q, PreparedQuery& pq) const override { inner_.prepare(q, pq); }
    void score(const PreparedQuery& pq, const std::uint8_t* block, int block_tokens, int first, int n,
               float* out) const override {
        inner_.score(pq, block, block_tokens, first, n, out);
    }
    void accumulate(const std::uint8_t* block, int block_tokens, int first, int n, const float* w,
                    float* acc) const override {
        inner_.accumulate(block, block_tokens, first, n, w, acc);
    }
    void decode(const std::uint8_t* block, int block_tokens, int first, int n, float* out) const override {
        inner_.decode(block, block_tokens, first, n, out);
    }
    void score_group(const PreparedQuery* const* pq, int G, const std::uint8_t* block, int block_tokens, int first,
                     int n, float* const* out) const override {
        inner_.score_group(pq, G, block, block_tokens, first, n, out);
    }
    void accumulate_group(const std::uint8_t* block, int block_tokens, int first, int n, int G, const float* const* w,
                          float* const* acc) const override {
        inner_.accumulate_group(block, block_tokens, first, n, G, w, acc);
    }

private:
    TokenwiseCodec inner_;
};

// KvCache with WKVQuant's static smoothing applied around it (see the header comment).
class WkvKvCache {
public:
    // params: n_layers, n_kv_heads, head_dim must match cfg. smooth_keys / smooth_values select
    // which side the smoothing applies to (the other side is stored raw, e.g. for QJL keys).
    WkvKvCache(const CacheConfig& cfg, std::shared_ptr<const Codec> key_codec, std::shared_ptr<const Codec> value_codec,
               std::shared_ptr<const WkvParams> params, bool smooth_keys = true, bool smooth_values = true)
        : cache_(cfg, std::move(key_codec), std::move(value_codec)),
          p_(std::move(params)),
          sk_(smooth_keys),
          sv_(smooth_values) {
        KVQ_CHECK(p_ != nullptr, "WKV cache: no parameters given");
        p_->validate();
        KVQ_CHECK(p_->n_layers == cfg.n_layers && p_->n_kv_heads == cfg.n_kv_heads && p_->head_dim == cfg.head_dim,
                  "WKV cache: parameters are for layers=", p_->n_layers, " kv_heads=", p_->n_kv_heads,
                  " head_dim=", p_->head_dim, " but the cache has layers=", cfg.n_layers, " kv_heads=", cfg.n_kv_heads,
                  " head_dim=", cfg.head_dim);
    }

    KvCache& cache() { return cache_; }
    const KvCache& cache() const { return cache_; }
    const WkvParams& params() const { return *p_; }
    int tokens(int layer) const { return cache_.tokens(layer); }
    MemoryReport memory() const { return cache_.memory(); }

    // k, v: [n][H_kv][d] raw (post-RoPE) vectors.
    void append(int layer, const float* k, const float* v, int n) {
        const float* ks = smooth_k(layer, k, n);
        const float* vs = smooth_v(layer, v, n);
        cache_.append(layer, ks, vs, n);
    }

    // As kvq::decode_step on raw q, k, v; out [H_q][d] and scores_out (raw q.k/sqrt(d)) as there.
    void decode_step(int layer, const float* q, int n_q_heads, const float* k, const float* v, float* out,
                     AttentionWorkspace& ws, float* scores_out = nullptr) {
        const float* ks = smooth_k(layer, k, 1);
        const float* vs = smooth_v(layer, v, 1);
        const float* qf = fold_q(layer, q, 1, n_q_heads);
        kvq::decode_step(cache_, layer, qf, n_q_heads, ks, vs, out, ws, scores_out);
        unsmooth_out(layer, out, 1, n_q_heads);
        if (scores_out && sk_) restore_scores(layer, q, n_q_heads, cache_.tokens(layer), scores_out);
    }

    // As kvq::prefill: q [n][H_q][d], k, v [n][H_kv][d]; out [n][H_q][d].
    void prefill(int layer, const float* q, int n_q_heads, const float* k, const float* v, int n, float* out,
                 AttentionWorkspace& ws) {
        const float* ks = smooth_k(layer, k, n);
        const float* vs = smooth_v(layer, v, n);
        const float* qf = fold_q(layer, q, n, n_q_heads);
        kvq::prefill(cache_, layer, qf, n_q_heads, ks, vs, n, out, ws);
        unsmooth_out(layer, out, n, n_q_heads);
    }

private:
    int H() const { return cache_.config().n_kv_heads; }
    int d() const { return cache_.config().head_dim; }
    const WkvLayerParams& L(int layer) const {
        KVQ_CHECK(layer >= 0 && layer < p_->n_layers, "layer ", layer, " out of range [0, ", p_->n_layers, ")");
        return p_->layers[layer];
    }
    const float* smooth_k(int layer, const float* k, int n) {
        if (!sk_) return k;
        KVQ_CHECK(k != nullptr, "null key pointer");
        kbuf_.resize(std::size_t(n) * H() * d());
        wkv_smooth_rows(k, n, L(layer).k_shift, L(layer).k_scale, kbuf_.data());
        return kbuf_.data();
    }
    const float* smooth_v(int layer, const float* v, int n) {
        if (!sv_) return v;
        KVQ_CHECK(v != nullptr, "null value pointer");
        vbuf_.resize(std::size_t(n) * H() * d());
        wkv_smooth_rows(v, n, L(layer).v_shift, L(layer).v_scale, vbuf_.data());
        return vbuf_.data();
    }
    // q' = q (.) s_K for n tokens of H_q heads; KV head of query head hq is hq / (H_q / H_kv).
    const float* fold_q(int layer, const float* q, int n, int n_q_heads) {
        if (!sk_) return q;
        KVQ_CHECK(n_q_heads >= H() && n_q_heads % H() == 0, "query heads (", n_q_heads,
                  ") must be a positive multiple of KV heads (", H(), ")");
        const int group = n_q_heads / H(), D = d();
        const std::vector<float>& s = L(layer).k_scale;
        qbuf_.resize(std::size_t(n) * n_q_heads * D);
        for (int t = 0; t < n; ++t)
            for (int hq = 0; hq < n_q_heads; ++hq) {
                const std::size_t o = (std::size_t(t) * n_q_heads + hq) * D;
                const float* sh = s.data() + std::size_t(hq / group) * D;
                for (int c = 0; c < D; ++c) qbuf_[o + c] = q[o + c] * sh[c];
            }
        return qbuf_.data();
    }
    void unsmooth_out(int layer, float* out, int n, int n_q_heads) const {
        if (!sv_) return;
        const int group = n_q_heads / H(), D = d();
        const WkvLayerParams& P = L(layer);
        for (int t = 0; t < n; ++t)
            for (int hq = 0; hq < n_q_heads; ++hq) {
                float* o = out + (std::size_t(t) * n_q_heads + hq) * D;
                const std::size_t base = std::size_t(hq / group) * D;
                for (int c = 0; c < D; ++c) o[c] = o[c] * P.v_scale[base + c] + P.v_shift[base + c];
            }
    }
    // scores_out [H_q][total] holds <q', k~>/sqrt(d) = (<q, k> - <q, delta_K>)/sqrt(d): add the constant back.
    void restore_scores(int layer, const float* q, int n_q_heads, int total, float* scores) const {
        const int group = n_q_heads / H(), D = d();
        const std::vector<float>& delta = L(layer).k_shift;
        const double scale = 1.0 / std::sqrt(double(D));
        for (int hq = 0; hq < n_q_heads; ++hq) {
            double c0 = 0;
            const float* qh = q + std::size_t(hq) * D;
            const float* dh = delta.data() + std::size_t(hq / group) * D;
            for (int c = 0; c < D; ++c) c0 += double(qh[c]) * dh[c];
            const float add = static_cast<float>(c0 * scale);
            for (int j = 0; j < total; ++j) scores[std::size_t(hq) * total + j] += add;
        }
    }

    KvCache cache_;
    std::shared_ptr<const WkvParams> p_;
    bool sk_, sv_;
    std::vector<float> kbuf_, vbuf_, qbuf_;
};

}  // namespace kvq
