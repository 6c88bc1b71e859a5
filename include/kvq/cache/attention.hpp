#pragma once
// Attention over a KvCache: decode (one query token per query head) and prefill (a block of new
// tokens with causal masking), with the cache's past-only policy. GQA: query head h reads KV head
// h / (H_q / H_kv). Scores are scaled by 1/sqrt(d); softmax is fp32 with max subtraction; the
// probability sum and the output are accumulated in double across blocks so that long contexts
// lose no precision to summation order.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "kvq/cache/kv_cache.hpp"
#include "kvq/cpu/kernels.hpp"
#include "kvq/cpu/thread_pool.hpp"

namespace kvq {

namespace detail {
// Scratch of one attention task: one KV head, its G query heads, one chunk of the sequence.
struct AttentionTask {
    std::vector<PreparedQuery> pq;            // [G]
    std::vector<float> scores;                // [G][chunk length]
    std::vector<float> block_acc;             // [G][d]
    std::vector<double> acc;                  // [G][d]  un-normalised sum_p e^{s_p - mx} v_p
    std::vector<double> sum;                  // [G]     sum_p e^{s_p - mx}
    std::vector<float> mx;                    // [G]     chunk maximum (-inf for an empty chunk)
    std::vector<const std::uint8_t*> blocks;  // block addresses of the chunk (one pool lookup each)
};
}  // namespace detail

// Scratch reused across calls so that a decode step does not allocate once warmed up, plus the
// parallel settings. Work is split into tasks of (KV head, sequence chunk); every task scores its
// chunk for all G = H_q / H_kv query heads of the KV head while the key blocks are hot, keeps a
// partial softmax state (max, sum, acc) per query head, and the states are merged exactly:
//     M = max_c m_c,  sum = sum_c e^{m_c - M} sum_c,  acc = sum_c e^{m_c - M} acc_c.
struct AttentionWorkspace {
    // Runs the tasks; null: the calling thread runs them in order (no pool, no synchronisation).
    cpu::Executor* executor = nullptr;
    // Sequence chunks per KV head; 0: automatic (1 on one thread, else enough for 2 tasks per thread).
    int split = 0;

    std::vector<detail::AttentionTask> tasks;
    std::vector<float> scores;  // unused; kept for source compatibility
    std::vector<float> block_acc;
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

// Blocks come from a pool in page-table order, not one stream: prefetch the next block's bytes
// while the current one is processed so that the hardware streams never restart cold.
inline void prefetch_bytes(const std::uint8_t* p, std::size_t bytes) {
    for (std::size_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
}

// Positions [a, b) of KV head h for query heads q_heads [G][d]: scores (scaled, into t.scores and
// scores_out), chunk max, exponentials, sum and un-normalised value accumulation.
inline void attention_task(const StreamView& ks, const StreamView& vs, int visible, const ExactTokens& extra, int H,
                           int h, int G, const float* q_heads, float scale, int a, int b, int total, AttentionTask& t,
                           float* scores_out, int hq0) {
    const int d = ks.codec->head_dim(), B = ks.block_tokens, len = b - a;
    t.pq.resize(G);
    t.scores.resize(std::size_t(G) * std::max(len, 1));
    t.block_acc.resize(std::size_t(G) * d);
    t.acc.assign(std::size_t(G) * d, 0.0);
    t.sum.assign(G, 0.0);
    t.mx.assign(G, -std::numeric_limits<float>::infinity());
    if (len <= 0) return;
    const PreparedQuery* pqs[64];
    float* outs[64];
    const float* ws[64];
    float* baccs[64];
    // Keys: blocks, then the fp32 window, then the exact extra tokens.
    const int kb_end = std::min(visible, ks.encoded);
    if (a < kb_end) {
        for (int g = 0; g < G; ++g) {
            ks.codec->prepare_fast(q_heads + std::size_t(g) * d, t.pq[g]);
            pqs[g] = &t.pq[g];
        }
        const std::size_t kbytes = ks.pool->block_bytes();
        const int kend = std::min(b, kb_end);
        // BlockPool::data() takes a shared lock: resolve each block once, not per use.
        t.blocks.clear();
        for (int p = a; p < kend; p += B) t.blocks.push_back(ks.pool->data(ks.pages[p / B]));
        if (cpu::simd_level() == cpu::SimdLevel::Scalar) {
            // Scalar paths keep per-query tables (QJL: a 32 KiB byte LUT): query heads outer over
            // spans of ~1024 tokens, so one table stays in L1 and the span's keys in L2.
            const int span = std::max(B, 1024 / B * B);
            for (int s0 = a; s0 < kend; s0 += span)
                for (int g = 0; g < G; ++g)
                    for (int p = s0; p < std::min(kend, s0 + span); p += B)
                        ks.codec->score(*pqs[g], t.blocks[(p - a) / B], B, 0, std::min(B, kb_end - p),
                                        t.scores.data() + std::size_t(g) * len + (p - a));
        } else {
            for (int p = a; p < kend; p += B) {
                const std::size_t bi = std::size_t(p - a) / B;
                if (p + B < kend) prefetch_bytes(t.blocks[bi + 1], kbytes);
                for (int g = 0; g < G; ++g) outs[g] = t.scores.data() + std::size_t(g) * len + (p - a);
                ks.codec->score_group(pqs, G, t.blocks[bi], B, 0, std::min(B, kb_end - p), outs);
            }
        }
    }
    for (int g = 0; g < G; ++g) {
        const float* qh = q_heads + std::size_t(g) * d;
        float* s = t.scores.data() + std::size_t(g) * len;
        for (int p = std::max(a, kb_end); p < std::min(b, visible); ++p)
            s[p - a] = dot(qh, ks.window + std::size_t(p - ks.encoded) * ks.window_stride, d);
        for (int p = std::max(a, visible); p < b; ++p)
            s[p - a] = dot(qh, extra.k + (std::size_t(p - visible) * H + h) * d, d);
        const float mx = cpu::scale_max(s, len, scale);
        if (scores_out) std::copy_n(s, len, scores_out + std::size_t(hq0 + g) * total + a);
        t.mx[g] = mx;
        t.sum[g] = cpu::exp_shift(s, len, mx);
        ws[g] = s;
        baccs[g] = t.block_acc.data() + std::size_t(g) * d;
    }
    // Values: blocks (float over spans of kFlushBlocks blocks, double across spans), then window
    // and extra tokens. A float span sums <= kFlushBlocks * B terms per channel (relative rounding
    // <= kFlushBlocks * B * 2^-24 of sum |w v|, ~1.5e-5 at 4 x 64); the flush used to be per block.
    constexpr int kFlushBlocks = 4;
    const int vb_end = std::min(visible, vs.encoded);
    const int vend = std::min(b, vb_end);
    const std::size_t vbytes = vs.pool->block_bytes();
    t.blocks.clear();
    for (int p = a; p < vend; p += B) t.blocks.push_back(vs.pool->data(vs.pages[p / B]));
    std::fill(t.block_acc.begin(), t.block_acc.end(), 0.0f);
    for (int p = a, nb = 0; p < vend; p += B) {
        const std::size_t bi = std::size_t(p - a) / B;
        if (p + B < vend) prefetch_bytes(t.blocks[bi + 1], vbytes);
        const float* wp[64];
        for (int g = 0; g < G; ++g) wp[g] = ws[g] + (p - a);
        vs.codec->accumulate_group(t.blocks[bi], B, 0, std::min(B, vb_end - p), G, wp, baccs);
        if (++nb == kFlushBlocks || p + B >= vend) {
            cpu::add_f32_to_f64(t.acc.data(), t.block_acc.data(), static_cast<int>(t.acc.size()));
            std::fill(t.block_acc.begin(), t.block_acc.end(), 0.0f);
            nb = 0;
        }
    }
    for (int p = std::max(a, vb_end); p < b; ++p) {
        const float* row = p < visible ? vs.window + std::size_t(p - vs.encoded) * vs.window_stride
                                       : extra.v + (std::size_t(p - visible) * H + h) * d;
        for (int g = 0; g < G; ++g) {
            const double wv = ws[g][p - a];
            double* acc = t.acc.data() + std::size_t(g) * d;
            for (int c = 0; c < d; ++c) acc[c] += wv * row[c];
        }
    }
}
}  // namespace detail

// Attention of n_q_heads query vectors q [H_q][d] over the first `visible` tokens of `layer` plus
// the exact tokens extra[0, extra_visible). out: [H_q][d]. If scores_out is given it receives the
// pre-softmax scores q.k/sqrt(d), [H_q][visible + extra_visible]. Parallel over (KV head, chunk)
// tasks through ws.executor when set (see AttentionWorkspace).
inline void attend(const KvCache& cache, int layer, const float* q, int n_q_heads, int visible,
                   const ExactTokens& extra, int extra_visible, float* out, AttentionWorkspace& ws,
                   float* scores_out = nullptr) {
    const CacheConfig& cfg = cache.config();
    const int H = cfg.n_kv_heads, d = cfg.head_dim, B = cfg.block_tokens;
    KVQ_CHECK(n_q_heads >= H && n_q_heads % H == 0, "query heads (", n_q_heads,
              ") must be a positive multiple of KV heads (", H, ")");
    KVQ_CHECK(n_q_heads / H <= 64, "at most 64 query heads per KV head, got ", n_q_heads / H);
    KVQ_CHECK(visible >= 0 && visible <= cache.tokens(layer), "visible tokens ", visible, " out of range [0, ",
              cache.tokens(layer), "]");
    KVQ_CHECK(extra_visible >= 0 && extra_visible <= extra.n, "extra_visible ", extra_visible, " out of range");
    const int total = visible + extra_visible;
    KVQ_CHECK(total > 0, "attention over zero tokens");
    const int G = n_q_heads / H;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    const int threads = ws.executor ? std::max(1, ws.executor->concurrency()) : 1;
    const int nblocks = (total + B - 1) / B;
    int C = ws.split > 0 ? ws.split : (threads == 1 ? 1 : std::max(1, (2 * threads + H - 1) / H));
    C = std::max(1, std::min(C, nblocks));
    const int chunk = (nblocks + C - 1) / C * B;  // a multiple of B: chunks start on block boundaries
    if (ws.tasks.size() < std::size_t(H) * C) ws.tasks.resize(std::size_t(H) * C);
    auto run = [&](int task) {
        const int h = task / C, c = task % C;
        const int a = std::min(total, c * chunk), b = std::min(total, a + chunk);
        detail::attention_task(cache.keys(layer, h), cache.values(layer, h), visible, extra, H, h, G,
                               q + std::size_t(h) * G * d, scale, a, b, total, ws.tasks[task], scores_out, h * G);
    };
    if (ws.executor && H * C > 1)
        ws.executor->parallel_for(H * C, run);
    else
        for (int task = 0; task < H * C; ++task) run(task);
    // Exact merge of the chunk states.
    for (int h = 0; h < H; ++h)
        for (int g = 0; g < G; ++g) {
            float M = -std::numeric_limits<float>::infinity();
            for (int c = 0; c < C; ++c) M = std::max(M, ws.tasks[std::size_t(h) * C + c].mx[g]);
            double sum = 0;
            float* o = out + (std::size_t(h) * G + g) * d;
            double accd[1024];
            std::fill_n(accd, d, 0.0);
            for (int c = 0; c < C; ++c) {
                const detail::AttentionTask& t = ws.tasks[std::size_t(h) * C + c];
                if (t.sum[g] == 0.0) continue;  // empty chunk
                const double f = c == 0 && C == 1 ? 1.0 : std::exp(double(t.mx[g]) - double(M));
                sum += f * t.sum[g];
                const double* acc = t.acc.data() + std::size_t(g) * d;
                for (int e = 0; e < d; ++e) accd[e] += f * acc[e];
            }
            for (int e = 0; e < d; ++e) o[e] = static_cast<float>(accd[e] / sum);
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
