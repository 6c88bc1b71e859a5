#pragma once
// Reference fp32 Llama-2 forward pass (one token at a time), written for clarity and bit-level
// agreement with karpathy/llama2.c run.c: same float accumulation orders, same RoPE formula,
// same softmax. It is the ground truth that quantized KV-cache backends are measured against.
//
// Attention is factored out behind AttentionBackend: the model computes q, k, v (post-RoPE) for
// a layer and hands them to the backend, which owns the KV cache and returns the attention
// output. Fp32AttentionBackend is the exact baseline; compressed caches implement the same API.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/io/llama2c.hpp"
#include "kvq/weights/w4_quant.hpp"

namespace kvq::model {

using io::LlamaConfig;
using io::LlamaWeights;

struct AttentionBackend {
    virtual ~AttentionBackend() = default;
    // Forget every cached position (start of a new sequence).
    virtual void reset() = 0;
    // one decode step for `layer` at position `pos`: q [n_heads*head_dim], k,v [n_kv_heads*head_dim]
    // (post-RoPE), out [n_heads*head_dim]. The backend appends k, v at `pos` and attends over 0..pos.
    virtual void decode(int layer, int pos, const float* q, const float* k, const float* v, float* out) = 0;
};

// ---- building blocks (free functions so that backends and tests can reuse them) ----

// out = weight * x / sqrt(mean(x^2) + eps); the sum of squares is accumulated in float, in order.
inline void rmsnorm(float* out, const float* x, const float* weight, int n, float eps) {
    float ss = 0.0f;
    for (int j = 0; j < n; ++j) ss += x[j] * x[j];
    ss /= static_cast<float>(n);
    ss += eps;
    ss = 1.0f / std::sqrt(ss);
    for (int j = 0; j < n; ++j) out[j] = weight[j] * (ss * x[j]);
}

// out[rows] = W[rows][cols] @ x[cols], each row a sequential float dot product.
inline void matvec(float* out, const float* w, const float* x, int rows, int cols) {
    for (int i = 0; i < rows; ++i) {
        const float* row = w + static_cast<std::size_t>(i) * static_cast<std::size_t>(cols);
        float acc = 0.0f;
        for (int j = 0; j < cols; ++j) acc += row[j] * x[j];
        out[i] = acc;
    }
}

// Same product with 8 independent partial sums per row (vectorizes; different float rounding from
// matvec). Used for the larger GGUF models, where speed matters more than matching run.c bit for bit.
inline void matvec_fast(float* out, const float* w, const float* x, int rows, int cols) {
    for (int i = 0; i < rows; ++i) {
        const float* row = w + static_cast<std::size_t>(i) * static_cast<std::size_t>(cols);
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int j = 0;
        for (; j + 8 <= cols; j += 8)
            for (int u = 0; u < 8; ++u) acc[u] += row[j + u] * x[j + u];
        float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (; j < cols; ++j) s += row[j] * x[j];
        out[i] = s;
    }
}

// In-place softmax with max subtraction (float, like run.c).
inline void softmax(float* x, int n) {
    float max_val = x[0];
    for (int i = 1; i < n; ++i)
        if (x[i] > max_val) max_val = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; ++i) {
        x[i] = std::exp(x[i] - max_val);
        sum += x[i];
    }
    for (int i = 0; i < n; ++i) x[i] /= sum;
}

// RoPE over adjacent pairs (x[i], x[i+1]) of a vector of n = heads*head_dim values; the pair's
// frequency depends on its offset inside the head: theta^-((i % head_dim) / head_dim).
inline void rope(float* x, int n, int head_dim, int pos, float theta) {
    for (int i = 0; i < n; i += 2) {
        const float freq = 1.0f / std::pow(theta, static_cast<float>(i % head_dim) / static_cast<float>(head_dim));
        const float angle = static_cast<float>(pos) * freq;
        const float c = std::cos(angle), s = std::sin(angle);
        const float x0 = x[i], x1 = x[i + 1];
        x[i] = x0 * c - x1 * s;
        x[i + 1] = x0 * s + x1 * c;
    }
}

// First index of the maximum (ties -> lowest index), as run.c's argmax.
inline int argmax(std::span<const float> v) {
    KVQ_CHECK(!v.empty(), "argmax of an empty vector");
    std::size_t best = 0;
    for (std::size_t i = 1; i < v.size(); ++i)
        if (v[i] > v[best]) best = i;
    return static_cast<int>(best);
}

// Checks that a config is internally consistent (the reader already does this for files; this
// covers configs built by hand).
inline void validate_config(const LlamaConfig& c) {
    KVQ_CHECK(c.dim > 0 && c.hidden_dim > 0 && c.n_layers > 0 && c.n_heads > 0 && c.n_kv_heads > 0 &&
                  c.vocab_size > 0 && c.seq_len > 0,
              "llama config: non-positive field (dim=", c.dim, " hidden_dim=", c.hidden_dim, " n_layers=", c.n_layers,
              " n_heads=", c.n_heads, " n_kv_heads=", c.n_kv_heads, " vocab_size=", c.vocab_size,
              " seq_len=", c.seq_len, ")");
    KVQ_CHECK(c.dim % c.n_heads == 0 && c.head_dim == c.dim / c.n_heads, "llama config: head_dim = ", c.head_dim,
              " but dim / n_heads = ", c.dim, " / ", c.n_heads);
    KVQ_CHECK(c.head_dim % 2 == 0, "llama config: head_dim = ", c.head_dim, " is odd (RoPE needs pairs)");
    KVQ_CHECK(c.n_heads % c.n_kv_heads == 0, "llama config: n_heads = ", c.n_heads,
              " is not a multiple of n_kv_heads = ", c.n_kv_heads);
    KVQ_CHECK(c.rope_theta > 0.0f && std::isfinite(c.rope_theta), "llama config: rope_theta = ", c.rope_theta);
    KVQ_CHECK(c.norm_eps > 0.0f && std::isfinite(c.norm_eps), "llama config: norm_eps = ", c.norm_eps);
}

// ---- exact fp32 KV cache ----

class Fp32AttentionBackend : public AttentionBackend {
public:
    Fp32AttentionBackend(int n_layers, int n_heads, int n_kv_heads, int head_dim)
        : n_heads_(n_heads), n_kv_heads_(n_kv_heads), head_dim_(head_dim) {
        KVQ_CHECK(n_layers > 0 && n_heads > 0 && n_kv_heads > 0 && head_dim > 0 && n_heads % n_kv_heads == 0,
                  "Fp32AttentionBackend: bad shape n_layers=", n_layers, " n_heads=", n_heads,
                  " n_kv_heads=", n_kv_heads, " head_dim=", head_dim);
        keys_.resize(static_cast<std::size_t>(n_layers));
        values_.resize(static_cast<std::size_t>(n_layers));
    }
    explicit Fp32AttentionBackend(const LlamaConfig& c)
        : Fp32AttentionBackend(c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) {}

    void reset() override {
        for (auto& k : keys_) k.clear();
        for (auto& v : values_) v.clear();
    }

    // Cached positions of `layer`.
    int length(int layer) const { return static_cast<int>(keys_.at(checked_layer(layer)).size() / kv_dim()); }
    // Cached post-RoPE keys / values of `layer`, [length][n_kv_heads*head_dim].
    const std::vector<float>& keys(int layer) const { return keys_.at(checked_layer(layer)); }
    const std::vector<float>& values(int layer) const { return values_.at(checked_layer(layer)); }

    void decode(int layer, int pos, const float* q, const float* k, const float* v, float* out) override {
        const std::size_t l = checked_layer(layer);
        // Positions arrive strictly in order; anything else means the caller forgot reset().
        KVQ_CHECK(pos == length(layer), "Fp32AttentionBackend: layer ", layer, " got pos ", pos, " but holds ",
                  length(layer), " positions (call reset() before a new sequence)");
        const std::size_t kvd = kv_dim();
        keys_[l].insert(keys_[l].end(), k, k + kvd);
        values_[l].insert(values_[l].end(), v, v + kvd);

        const int group = n_heads_ / n_kv_heads_;  // query heads sharing one K/V head
        const float scale = std::sqrt(static_cast<float>(head_dim_));
        scores_.resize(static_cast<std::size_t>(pos) + 1);
        for (int h = 0; h < n_heads_; ++h) {
            const float* qh = q + static_cast<std::size_t>(h) * head_dim_;
            const std::size_t kv_off = static_cast<std::size_t>(h / group) * head_dim_;
            for (int t = 0; t <= pos; ++t) {
                const float* kt = keys_[l].data() + static_cast<std::size_t>(t) * kvd + kv_off;
                float dot = 0.0f;
                for (int i = 0; i < head_dim_; ++i) dot += qh[i] * kt[i];
                scores_[static_cast<std::size_t>(t)] = dot / scale;  // divide, as run.c does
            }
            softmax(scores_.data(), pos + 1);
            float* oh = out + static_cast<std::size_t>(h) * head_dim_;
            for (int i = 0; i < head_dim_; ++i) oh[i] = 0.0f;
            for (int t = 0; t <= pos; ++t) {  // accumulate over time, outer loop, like run.c
                const float* vt = values_[l].data() + static_cast<std::size_t>(t) * kvd + kv_off;
                const float a = scores_[static_cast<std::size_t>(t)];
                for (int i = 0; i < head_dim_; ++i) oh[i] += a * vt[i];
            }
        }
    }

private:
    std::size_t kv_dim() const { return static_cast<std::size_t>(n_kv_heads_) * head_dim_; }
    std::size_t checked_layer(int layer) const {
        KVQ_CHECK(layer >= 0 && static_cast<std::size_t>(layer) < keys_.size(), "Fp32AttentionBackend: layer ", layer,
                  " is outside [0, ", keys_.size(), ")");
        return static_cast<std::size_t>(layer);
    }

    int n_heads_, n_kv_heads_, head_dim_;
    std::vector<std::vector<float>> keys_, values_;  // per layer, grown one position at a time
    std::vector<float> scores_;                      // scratch, [pos+1]
};

// ---- the model ----

class LlamaModel {
public:
    // Called once per layer per forward() with the post-RoPE q, k, v just before attention.
    using QkvObserver = std::function<void(int layer, int pos, const float* q, const float* k, const float* v)>;

    LlamaModel(LlamaConfig config, LlamaWeights weights) : c_(config), w_(std::move(weights)) {
        validate_config(c_);
        const std::size_t dim = c_.dim, hid = c_.hidden_dim, kvd = c_.kv_dim(), vocab = c_.vocab_size;
        auto expect = [](const std::vector<float>& t, std::size_t n, const char* name, int layer) {
            KVQ_CHECK(t.size() == n, "LlamaModel: tensor ", name, " (layer ", layer, ") has ", t.size(),
                      " values, expected ", n);
        };
        expect(w_.token_embedding, vocab * dim, "token_embedding", -1);
        KVQ_CHECK(w_.layers.size() == static_cast<std::size_t>(c_.n_layers), "LlamaModel: ", w_.layers.size(),
                  " layer weight sets for n_layers = ", c_.n_layers);
        for (int l = 0; l < c_.n_layers; ++l) {
            const auto& L = w_.layers[static_cast<std::size_t>(l)];
            expect(L.rms_att, dim, "rms_att", l);
            expect(L.wq, dim * dim, "wq", l);
            expect(L.wk, kvd * dim, "wk", l);
            expect(L.wv, kvd * dim, "wv", l);
            expect(L.wo, dim * dim, "wo", l);
            expect(L.rms_ffn, dim, "rms_ffn", l);
            expect(L.w1, hid * dim, "w1", l);
            expect(L.w2, dim * hid, "w2", l);
            expect(L.w3, hid * dim, "w3", l);
        }
        expect(w_.rms_final, dim, "rms_final", -1);
        if (!c_.shared_classifier) expect(w_.wcls, vocab * dim, "wcls", -1);
        // A shared config with a separate wcls (or vice versa) would silently use the wrong matrix.
        KVQ_CHECK(c_.shared_classifier == w_.wcls.empty(), "LlamaModel: shared_classifier = ", c_.shared_classifier,
                  " but wcls has ", w_.wcls.size(), " values");
    }

    const LlamaConfig& config() const { return c_; }
    const LlamaWeights& weights() const { return w_; }
    void set_qkv_observer(QkvObserver observer) { observer_ = std::move(observer); }
    // Use matvec_fast (8 partial sums) instead of run.c's sequential dot products.
    void set_fast_matvec(bool on) { fast_matvec_ = on; }
    bool fast_matvec() const { return fast_matvec_; }
    // Run the seven linear layers of every block on packed 4-bit weights (kvq/weights/w4_quant.hpp);
    // nullptr returns to the fp32 weights. Embedding, norms and classifier stay fp32.
    void set_w4(std::shared_ptr<const wq::W4Model> w4) {
        if (w4) {
            KVQ_CHECK(w4->layers.size() == std::size_t(c_.n_layers), "LlamaModel::set_w4: ", w4->layers.size(),
                      " quantized layers for n_layers = ", c_.n_layers);
            for (int l = 0; l < c_.n_layers; ++l)
                for (int i = 0; i < wq::kBlockLinears; ++i) {
                    const auto [r, k] = wq::block_linear_shape(c_, i);
                    const wq::W4Matrix& m = w4->layers[std::size_t(l)].m[i];
                    KVQ_CHECK(m.rows == r && m.cols == k, "LlamaModel::set_w4: layer ", l, " ", wq::kLinearNames[i],
                              " is ", m.rows, "x", m.cols, ", the model needs ", r, "x", k);
                }
        }
        w4_ = std::move(w4);
    }
    const wq::W4Model* w4() const { return w4_.get(); }

    // Logits [vocab_size] for `token` at position `pos`; the backend must already hold 0..pos-1.
    std::vector<float> forward(int token, int pos, AttentionBackend& backend) const {
        KVQ_CHECK(token >= 0 && token < c_.vocab_size, "LlamaModel::forward: token ", token, " is outside [0, ",
                  c_.vocab_size, ")");
        KVQ_CHECK(pos >= 0 && pos < c_.seq_len, "LlamaModel::forward: pos ", pos,
                  " is outside [0, seq_len = ", c_.seq_len, ")");
        const int dim = c_.dim, hid = c_.hidden_dim, kvd = c_.kv_dim();
        auto matvec = [this](float* o, const float* w, const float* x, int rows, int cols) {
            if (fast_matvec_)
                model::matvec_fast(o, w, x, rows, cols);
            else
                model::matvec(o, w, x, rows, cols);
        };
        // Block linear i (wq wk wv wo w1 w2 w3) of layer l: packed 4-bit when set_w4 gave weights.
        auto linear = [&](int l, int i, float* o, const std::vector<float>& w, const float* x, int rows, int cols) {
            if (w4_)
                wq::matvec(o, w4_->layers[static_cast<std::size_t>(l)].m[i], x);
            else
                matvec(o, w.data(), x, rows, cols);
        };
        const float* emb = w_.token_embedding.data() + static_cast<std::size_t>(token) * dim;
        std::vector<float> x(emb, emb + dim);  // residual stream
        std::vector<float> xb(dim), xb2(dim), q(dim), k(kvd), v(kvd), att(dim), hb(hid), hb2(hid);

        for (int l = 0; l < c_.n_layers; ++l) {
            const auto& L = w_.layers[static_cast<std::size_t>(l)];
            // Attention block: pre-norm, projections, RoPE on q and k, backend attention, wo.
            rmsnorm(xb.data(), x.data(), L.rms_att.data(), dim, c_.norm_eps);
            linear(l, 0, q.data(), L.wq, xb.data(), dim, dim);
            linear(l, 1, k.data(), L.wk, xb.data(), kvd, dim);
            linear(l, 2, v.data(), L.wv, xb.data(), kvd, dim);
            rope(q.data(), dim, c_.head_dim, pos, c_.rope_theta);
            rope(k.data(), kvd, c_.head_dim, pos, c_.rope_theta);
            if (observer_) observer_(l, pos, q.data(), k.data(), v.data());
            backend.decode(l, pos, q.data(), k.data(), v.data(), att.data());
            linear(l, 3, xb2.data(), L.wo, att.data(), dim, dim);
            for (int i = 0; i < dim; ++i) x[i] += xb2[i];

            // SwiGLU FFN: w2(silu(w1 x) * w3 x).
            rmsnorm(xb.data(), x.data(), L.rms_ffn.data(), dim, c_.norm_eps);
            linear(l, 4, hb.data(), L.w1, xb.data(), hid, dim);
            linear(l, 6, hb2.data(), L.w3, xb.data(), hid, dim);
            for (int i = 0; i < hid; ++i) {
                const float silu = hb[i] * (1.0f / (1.0f + std::exp(-hb[i])));
                hb[i] = silu * hb2[i];
            }
            linear(l, 5, xb.data(), L.w2, hb.data(), dim, hid);
            for (int i = 0; i < dim; ++i) x[i] += xb[i];
        }

        rmsnorm(x.data(), x.data(), w_.rms_final.data(), dim, c_.norm_eps);  // in place, as run.c
        std::vector<float> logits(static_cast<std::size_t>(c_.vocab_size));
        matvec(logits.data(), w_.classifier().data(), x.data(), c_.vocab_size, dim);
        return logits;
    }

    // Greedy decoding as run.c does it: reset the backend, feed the prompt, then take argmax;
    // at most `steps` forward calls (capped at seq_len, as run.c caps -n); stop early when the
    // generated token equals stop_token (run.c stops on BOS = 1; pass -1 to never stop).
    // Returns prompt + generated tokens (the stop token is not included).
    std::vector<int> generate_greedy(std::span<const int> prompt, int steps, AttentionBackend& backend,
                                     int stop_token = 1) const {
        KVQ_CHECK(!prompt.empty(), "generate_greedy: empty prompt (start with BOS = 1)");
        KVQ_CHECK(steps > 0, "generate_greedy: steps = ", steps);
        if (steps > c_.seq_len) steps = c_.seq_len;
        backend.reset();
        std::vector<int> seq(prompt.begin(), prompt.end());
        int token = prompt[0];
        for (int pos = 0; pos < steps; ++pos) {
            const std::vector<float> logits = forward(token, pos, backend);
            const auto next_pos = static_cast<std::size_t>(pos) + 1;
            if (next_pos < prompt.size()) {  // still teacher-forcing the prompt
                token = prompt[next_pos];
                continue;
            }
            const int next = argmax(logits);
            if (next == stop_token) break;
            seq.push_back(next);
            token = next;
        }
        return seq;
    }

    // Teacher-forced negative log-likelihood, summed over the tokens.size()-1 predictions:
    // sum_t -log softmax(forward(tokens[t], t))[tokens[t+1]]. The log-softmax is evaluated in
    // double from the float logits. Perplexity = exp(nll / (tokens.size() - 1)).
    double sequence_nll(std::span<const int> tokens, AttentionBackend& backend) const {
        KVQ_CHECK(tokens.size() >= 2, "sequence_nll: need at least 2 tokens, got ", tokens.size());
        KVQ_CHECK(tokens.size() <= static_cast<std::size_t>(c_.seq_len), "sequence_nll: ", tokens.size(),
                  " tokens exceed seq_len = ", c_.seq_len);
        for (int t : tokens)  // check the targets too, not only the inputs forward() sees
            KVQ_CHECK(t >= 0 && t < c_.vocab_size, "sequence_nll: token ", t, " is outside [0, ", c_.vocab_size, ")");
        backend.reset();
        double nll = 0.0;
        for (std::size_t pos = 0; pos + 1 < tokens.size(); ++pos) {
            const std::vector<float> logits = forward(tokens[pos], static_cast<int>(pos), backend);
            double max_logit = -std::numeric_limits<double>::infinity();
            for (float z : logits) max_logit = std::max(max_logit, static_cast<double>(z));
            double sum = 0.0;
            for (float z : logits) sum += std::exp(static_cast<double>(z) - max_logit);
            const double log_z = max_logit + std::log(sum);
            nll += log_z - static_cast<double>(logits[static_cast<std::size_t>(tokens[pos + 1])]);
        }
        return nll;
    }

private:
    LlamaConfig c_;
    LlamaWeights w_;
    QkvObserver observer_;
    bool fast_matvec_ = false;
    std::shared_ptr<const wq::W4Model> w4_;
};

}  // namespace kvq::model
