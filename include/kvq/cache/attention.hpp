#pragma once
// Attention over a KvCache: decode (one query token per query head) and prefill (a block of new
// tokens with causal masking), with the cache's past-only policy. GQA: query head h reads KV head
// h / (H_q / H_kv). Scores are scaled by 1/sqrt(d); softmax is fp32 with max subtraction; the
// probability sum and the output are accumulated in double across blocks so that long contexts
// lose no precision to summation order.
#include <cmath>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "kvq/cache/kv_cache.hpp"

namespace kvq {

// Scratch reused across calls so that a decode step does not allocate once warmed up.
struct AttentionWorkspace {
    std::vector<float> scores, block_acc;
    std::vector<double> acc;
    PreparedQuery pq;
};

// Exact tokens that are not (yet) in the cache: the current decode token, or the prompt in a
// past-only prefill. k, v: [n][H_kv][d] rows.
struct ExactTokens {
    const float* k = nullptr;
    const float* v = nullptr;
    int n = 0;
};

namespace detail {
inline float dot(const float* a, const float* b, int d) {
    return Eigen::Map<const Eigen::VectorXf>(a, d).dot(Eigen::Map<const Eigen::VectorXf>(b, d));
}

// Scores of query q against stream positions [0, visible): blocks through the codec, then the window.
inline void score_stream(const StreamView& s, int visible, const float* q, AttentionWorkspace& ws, float* out) {
    const int d = s.codec->head_dim(), B = s.block_tokens;
    const int from_blocks = std::min(visible, s.encoded);
    if (from_blocks > 0) s.codec->prepare(q, ws.pq);
    for (int p = 0; p < from_blocks; p += B)
        s.codec->score(ws.pq, s.pool->data(s.pages[p / B]), B, 0, std::min(B, from_blocks - p), out + p);
    for (int p = from_blocks; p < visible; ++p) out[p] = dot(q, s.window + std::size_t(p - s.encoded) * s.window_stride, d);
}

// acc[d] += sum_p w[p] * v_p over stream positions [0, visible).
inline void accumulate_stream(const StreamView& s, int visible, const float* w, AttentionWorkspace& ws) {
    const int d = s.codec->head_dim(), B = s.block_tokens;
    const int from_blocks = std::min(visible, s.encoded);
    ws.block_acc.resize(d);
    for (int p = 0; p < from_blocks; p += B) {
        std::fill(ws.block_acc.begin(), ws.block_acc.end(), 0.0f);
        s.codec->accumulate(s.pool->data(s.pages[p / B]), B, 0, std::min(B, from_blocks - p), w + p, ws.block_acc.data());
        for (int c = 0; c < d; ++c) ws.acc[c] += ws.block_acc[c];
    }
    for (int p = from_blocks; p < visible; ++p) {
        const float* row = s.window + std::size_t(p - s.encoded) * s.window_stride;
        for (int c = 0; c < d; ++c) ws.acc[c] += double(w[p]) * row[c];
    }
}
}  // namespace detail

// Attention of n_q_heads query vectors q [H_q][d] over the first `visible` tokens of `layer` plus
// the exact tokens extra[0, extra_visible). out: [H_q][d]. If scores_out is given it receives the
// pre-softmax scores q.k/sqrt(d), [H_q][visible + extra_visible].
inline void attend(const KvCache& cache, int layer, const float* q, int n_q_heads, int visible, const ExactTokens& extra,
                   int extra_visible, float* out, AttentionWorkspace& ws, float* scores_out = nullptr) {
    const CacheConfig& cfg = cache.config();
    const int H = cfg.n_kv_heads, d = cfg.head_dim;
    KVQ_CHECK(n_q_heads >= H && n_q_heads % H == 0, "query heads (", n_q_heads,
              ") must be a positive multiple of KV heads (", H, ")");
    KVQ_CHECK(visible >= 0 && visible <= cache.tokens(layer), "visible tokens ", visible, " out of range [0, ",
              cache.tokens(layer), "]");
    KVQ_CHECK(extra_visible >= 0 && extra_visible <= extra.n, "extra_visible ", extra_visible, " out of range");
    const int total = visible + extra_visible;
    KVQ_CHECK(total > 0, "attention over zero tokens");
    const int group = n_q_heads / H;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    ws.scores.resize(total);
    ws.acc.resize(d);
    for (int hq = 0; hq < n_q_heads; ++hq) {
        const int h = hq / group;
        const float* qh = q + std::size_t(hq) * d;
        const StreamView ks = cache.keys(layer, h), vs = cache.values(layer, h);
        float* s = ws.scores.data();
        detail::score_stream(ks, visible, qh, ws, s);
        for (int i = 0; i < extra_visible; ++i) s[visible + i] = detail::dot(qh, extra.k + (std::size_t(i) * H + h) * d, d);
        float mx = -std::numeric_limits<float>::infinity();
        for (int p = 0; p < total; ++p) {
            s[p] *= scale;
            mx = std::max(mx, s[p]);
        }
        if (scores_out) std::copy_n(s, total, scores_out + std::size_t(hq) * total);
        double sum = 0;
        for (int p = 0; p < total; ++p) {
            s[p] = std::exp(s[p] - mx);
            sum += s[p];
        }
        std::fill(ws.acc.begin(), ws.acc.end(), 0.0);
        detail::accumulate_stream(vs, visible, s, ws);
        for (int i = 0; i < extra_visible; ++i) {
            const float* row = extra.v + (std::size_t(i) * H + h) * d;
            for (int c = 0; c < d; ++c) ws.acc[c] += double(s[visible + i]) * row[c];
        }
        for (int c = 0; c < d; ++c) out[std::size_t(hq) * d + c] = static_cast<float>(ws.acc[c] / sum);
    }
}

// One decode step: q [H_q][d], k, v [H_kv][d] of the new token; out [H_q][d]. With past_only the
// new token is attended exactly and stored afterwards; otherwise it is stored first and read back
// through the codecs like every other token.
inline void decode_step(KvCache& cache, int layer, const float* q, int n_q_heads, const float* k, const float* v,
                        float* out, AttentionWorkspace& ws, float* scores_out = nullptr) {
    const int T = cache.tokens(layer);
    if (cache.config().past_only) {
        // Validate before attending so a rejected token changes neither the cache nor out.
        cache.key_codec().validate(k, cache.config().n_kv_heads);
        cache.value_codec().validate(v, cache.config().n_kv_heads);
        attend(cache, layer, q, n_q_heads, T, ExactTokens{k, v, 1}, 1, out, ws, scores_out);
        cache.append(layer, k, v, 1);
    } else {
        cache.append(layer, k, v, 1);
        attend(cache, layer, q, n_q_heads, T + 1, ExactTokens{}, 0, out, ws, scores_out);
    }
}

// Prefill of n tokens: q [n][H_q][d], k, v [n][H_kv][d]; out [n][H_q][d]. Causal: prompt token i
// sees the cached past and prompt tokens 0..i. Past-only (the default and WKVQuant's semantics):
// the prompt attends to its own K/V exactly and they are quantized into the cache afterwards.
inline void prefill(KvCache& cache, int layer, const float* q, int n_q_heads, const float* k, const float* v, int n,
                    float* out, AttentionWorkspace& ws) {
    const int T = cache.tokens(layer), d = cache.config().head_dim;
    if (cache.config().past_only) {
        cache.key_codec().validate(k, n * cache.config().n_kv_heads);
        cache.value_codec().validate(v, n * cache.config().n_kv_heads);
        for (int i = 0; i < n; ++i)
            attend(cache, layer, q + std::size_t(i) * n_q_heads * d, n_q_heads, T, ExactTokens{k, v, n}, i + 1,
                   out + std::size_t(i) * n_q_heads * d, ws);
        cache.append(layer, k, v, n);
    } else {
        cache.append(layer, k, v, n);
        for (int i = 0; i < n; ++i)
            attend(cache, layer, q + std::size_t(i) * n_q_heads * d, n_q_heads, T + i + 1, ExactTokens{}, 0,
                   out + std::size_t(i) * n_q_heads * d, ws);
    }
}

// Exact causal attention in float64 over full-precision K/V (the test oracle): q [T][H_q][d],
// k, v [T][H_kv][d], out [T][H_q][d].
inline void reference_attention(const float* q, const float* k, const float* v, int T, int n_q_heads, int n_kv_heads,
                                int d, double* out) {
    const int group = n_q_heads / n_kv_heads;
    std::vector<double> s(T);
    for (int t = 0; t < T; ++t)
        for (int hq = 0; hq < n_q_heads; ++hq) {
            const int h = hq / group;
            const float* qv = q + (std::size_t(t) * n_q_heads + hq) * d;
            double mx = -1e300;
            for (int j = 0; j <= t; ++j) {
                double dd = 0;
                for (int c = 0; c < d; ++c) dd += double(qv[c]) * k[(std::size_t(j) * n_kv_heads + h) * d + c];
                s[j] = dd / std::sqrt(double(d));
                mx = std::max(mx, s[j]);
            }
            double sum = 0;
            for (int j = 0; j <= t; ++j) sum += (s[j] = std::exp(s[j] - mx));
            double* o = out + (std::size_t(t) * n_q_heads + hq) * d;
            for (int c = 0; c < d; ++c) {
                double a = 0;
                for (int j = 0; j <= t; ++j) a += s[j] * v[(std::size_t(j) * n_kv_heads + h) * d + c];
                o[c] = a / sum;
            }
        }
}

}  // namespace kvq
