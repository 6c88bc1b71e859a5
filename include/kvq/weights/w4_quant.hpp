#pragma once
// 4-bit weight quantization with learnable weight clipping (ALGORITHMS.md §2.4, OmniQuant's LWC).
//
// A linear layer W [rows][cols] (out x in) is split along the input dimension into groups of g
// columns (g = 128 by default; g = 0 means one group per row, "per-channel"; a last group shorter
// than g takes the remaining columns, e.g. SmolLM2's 576 = 4*128 + 64). Every row-group has two
// clipping logits a, b, gamma = sigmoid(a), beta = sigmoid(b) (init a = b = 4), and
//     h = fp16((gamma max(W) - beta min(W)) / (2^bits - 1)),   z = -round(beta min(W) / h),
//     (h at least max(|gamma max|, |beta min|) / 15, see w4_group_quant)
//     code = clamp(round(W / h) + z, 0, 2^bits - 1),           W^ = (code - z) h.
// Round-to-nearest (RTN, the baseline) is gamma = beta = 1 exactly (no clipping).
// Storage (W4Matrix): two codes per byte (even column in the low nibble), each row starting on a
// byte, plus an fp16 step h and an fp16 zero z per row-group: 4 + 32/g bits per weight (4.25 at
// g = 128). h and z are rounded to fp16 *before* the codes are chosen, so that the stored codes
// are the round-to-nearest codes of the stored step (decode is consistent with encode).
//
// matvec(): y = W^ x straight from the packed codes: per row-group h (sum_i code_i x_i - z sum_i x_i);
// the group sums of x are shared by every row, so they are computed once per call.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/core/half.hpp"
#include "kvq/io/llama2c.hpp"

namespace kvq::wq {

inline constexpr int kW4Bits = 4;
inline constexpr int kW4Levels = (1 << kW4Bits) - 1;
// Floor on the step, for groups whose clipped range collapses (gamma max < beta min): keeps the step
// finite and positive.
inline constexpr float kW4MinStep = 1e-6f;

inline int w4_groups_per_row(int cols, int group) { return group <= 0 ? 1 : (cols + group - 1) / group; }
inline int w4_group_width(int group, int cols) { return group <= 0 ? cols : std::min(group, cols); }

inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Learnable clipping of one matrix: logits a, b per row-group, [rows][groups_per_row].
struct LwcParams {
    int rows = 0, cols = 0, group = 128;
    std::vector<float> a, b;
    int groups() const { return w4_groups_per_row(cols, group); }
    static LwcParams init(int rows, int cols, int group, float value = 4.0f) {
        KVQ_CHECK(rows >= 1 && cols >= 1 && group >= 0, "LWC params: bad shape rows=", rows, " cols=", cols,
                  " group=", group);
        LwcParams p;
        p.rows = rows;
        p.cols = cols;
        p.group = group;
        const std::size_t n = std::size_t(rows) * w4_groups_per_row(cols, group);
        p.a.assign(n, value);
        p.b.assign(n, value);
        return p;
    }
    void validate() const {
        KVQ_CHECK(rows >= 1 && cols >= 1 && group >= 0, "LWC params: bad shape rows=", rows, " cols=", cols,
                  " group=", group);
        const std::size_t n = std::size_t(rows) * groups();
        KVQ_CHECK(a.size() == n && b.size() == n, "LWC params: ", a.size(), " / ", b.size(), " logits for ", n,
                  " row-groups");
        for (std::size_t i = 0; i < n; ++i)
            KVQ_CHECK(std::isfinite(a[i]) && std::isfinite(b[i]) && std::fabs(a[i]) <= 1e4f && std::fabs(b[i]) <= 1e4f,
                      "LWC params: logit ", i, " is not finite or out of range (a=", a[i], ", b=", b[i], ")");
    }
};

// Step and zero of one group (fp16-rounded values as floats) from its min / max and gamma, beta.
// The step is at least max(|gamma max|, |beta min|) / 15: for a group that straddles zero this is
// implied by the formula; for a one-signed group (e.g. all weights equal) it keeps the grid
// anchored at zero, |z| <= 15, instead of a vanishing step and an unbounded zero point.
struct W4GroupQuant {
    float h = 1.0f, z = 0.0f;
};
enum class W4StepBranch { Range, GammaMax, BetaMin, Floor };  // which term set h (for gradients)
inline W4StepBranch w4_step_branch(double wmin, double wmax, double gamma, double beta) {
    const double range = gamma * wmax - beta * wmin, gm = std::fabs(gamma * wmax), bm = std::fabs(beta * wmin);
    const double best = std::max({range, gm, bm});
    if (best < double(kW4MinStep) * kW4Levels) return W4StepBranch::Floor;
    if (range >= gm && range >= bm) return W4StepBranch::Range;
    return gm >= bm ? W4StepBranch::GammaMax : W4StepBranch::BetaMin;
}
inline double w4_step_exact(double wmin, double wmax, double gamma, double beta) {
    switch (w4_step_branch(wmin, wmax, gamma, beta)) {
        case W4StepBranch::Range: return (gamma * wmax - beta * wmin) / kW4Levels;
        case W4StepBranch::GammaMax: return std::fabs(gamma * wmax) / kW4Levels;
        case W4StepBranch::BetaMin: return std::fabs(beta * wmin) / kW4Levels;
        default: return kW4MinStep;
    }
}
inline W4GroupQuant w4_group_quant(float wmin, float wmax, double gamma, double beta) {
    W4GroupQuant q;
    q.h = half_to_float(float_to_half(float(w4_step_exact(wmin, wmax, gamma, beta))));
    q.z = float(-std::nearbyint(beta * double(wmin) / double(q.h)));
    return q;
}
inline int w4_code(float w, const W4GroupQuant& q) {
    const double c = std::nearbyint(double(w) / double(q.h)) + double(q.z);
    return int(std::clamp(c, 0.0, double(kW4Levels)));
}

// Packed 4-bit matrix.
struct W4Matrix {
    int rows = 0, cols = 0, group = 128;
    std::vector<std::uint8_t> codes;  // [rows][row_bytes()]
    std::vector<half_t> step, zero;   // [rows][groups()]

    int groups() const { return w4_groups_per_row(cols, group); }
    std::size_t row_bytes() const { return (std::size_t(cols) + 1) / 2; }
    int code(int r, int c) const {
        const std::uint8_t byte = codes[std::size_t(r) * row_bytes() + std::size_t(c) / 2];
        return (c & 1) ? (byte >> 4) : (byte & 15);
    }
    std::size_t bytes() const { return codes.size() + 2 * sizeof(half_t) * step.size(); }
    // Bits per weight actually stored (codes incl. the pad nibble of odd rows, steps, zeros).
    double bits_per_weight() const { return 8.0 * double(bytes()) / (double(rows) * cols); }

    // Float matrix the packed codes stand for, [rows][cols].
    std::vector<float> dequantize() const {
        std::vector<float> w(std::size_t(rows) * cols);
        const int gw = w4_group_width(group, cols);
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < cols; ++c) {
                const std::size_t gi = std::size_t(r) * groups() + c / gw;
                w[std::size_t(r) * cols + c] = (float(code(r, c)) - half_to_float(zero[gi])) * half_to_float(step[gi]);
            }
        return w;
    }
};

// Quantizes w [rows][cols]; clip == nullptr is RTN (gamma = beta = 1).
inline W4Matrix quantize_w4(const float* w, int rows, int cols, int group, const LwcParams* clip = nullptr) {
    KVQ_CHECK(w != nullptr && rows >= 1 && cols >= 1 && group >= 0, "quantize_w4: bad shape rows=", rows,
              " cols=", cols, " group=", group);
    if (clip) {
        clip->validate();
        KVQ_CHECK(clip->rows == rows && clip->cols == cols && clip->group == group, "quantize_w4: clipping params for ",
                  clip->rows, "x", clip->cols, " g=", clip->group, " given for a ", rows, "x", cols, " g=", group,
                  " matrix");
    }
    W4Matrix m;
    m.rows = rows;
    m.cols = cols;
    m.group = group;
    const int G = m.groups(), gw = w4_group_width(group, cols);
    m.codes.assign(std::size_t(rows) * m.row_bytes(), 0);
    m.step.resize(std::size_t(rows) * G);
    m.zero.resize(std::size_t(rows) * G);
    for (int r = 0; r < rows; ++r) {
        const float* row = w + std::size_t(r) * cols;
        for (int g = 0; g < G; ++g) {
            const int c0 = g * gw, c1 = std::min(cols, c0 + gw);
            float lo = row[c0], hi = row[c0];
            for (int c = c0; c < c1; ++c) {
                KVQ_CHECK(std::isfinite(row[c]), "quantize_w4: weight [", r, "][", c, "] is not finite (", row[c], ")");
                lo = std::min(lo, row[c]);
                hi = std::max(hi, row[c]);
            }
            const std::size_t gi = std::size_t(r) * G + g;
            const double gamma = clip ? sigmoid(clip->a[gi]) : 1.0, beta = clip ? sigmoid(clip->b[gi]) : 1.0;
            const W4GroupQuant q = w4_group_quant(lo, hi, gamma, beta);
            m.step[gi] = float_to_half(q.h);
            m.zero[gi] = float_to_half(q.z);
            for (int c = c0; c < c1; ++c) {
                const auto code = static_cast<std::uint8_t>(w4_code(row[c], q));
                m.codes[std::size_t(r) * m.row_bytes() + std::size_t(c) / 2] |=
                    (c & 1) ? std::uint8_t(code << 4) : code;
            }
        }
    }
    return m;
}

// y[rows] = W^ x[cols] from the packed codes. Float accumulation: 8 partial sums over the pairs of
// a group (vectorizes), then h (acc - z sum(x)) per group.
inline void matvec(float* y, const W4Matrix& m, const float* x) {
    const int G = m.groups(), gw = w4_group_width(m.group, m.cols);
    thread_local std::vector<float> xsum;
    xsum.assign(std::size_t(G), 0.0f);
    for (int g = 0; g < G; ++g)
        for (int c = g * gw; c < std::min(m.cols, (g + 1) * gw); ++c) xsum[std::size_t(g)] += x[c];
    const std::size_t rb = m.row_bytes();
    for (int r = 0; r < m.rows; ++r) {
        const std::uint8_t* row = m.codes.data() + std::size_t(r) * rb;
        float out = 0.0f;
        for (int g = 0; g < G; ++g) {
            const int c0 = g * gw, c1 = std::min(m.cols, c0 + gw);  // c0 is even when gw is even
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int c = c0;
            if ((c0 & 1) == 0) {
                for (; c + 8 <= c1; c += 8) {
                    const std::uint8_t* b = row + c / 2;
                    for (int u = 0; u < 4; ++u) {
                        acc[2 * u] += float(b[u] & 15) * x[c + 2 * u];
                        acc[2 * u + 1] += float(b[u] >> 4) * x[c + 2 * u + 1];
                    }
                }
            }
            float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
            for (; c < c1; ++c) s += float((c & 1) ? (row[c / 2] >> 4) : (row[c / 2] & 15)) * x[c];
            const std::size_t gi = std::size_t(r) * G + g;
            out += half_to_float(m.step[gi]) * (s - half_to_float(m.zero[gi]) * xsum[std::size_t(g)]);
        }
        y[r] = out;
    }
}

// ---- a whole Llama model ----

// The seven linear layers of a block, in this order everywhere (files, clipping params).
inline constexpr int kBlockLinears = 7;
inline constexpr const char* kLinearNames[kBlockLinears] = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};
inline const std::vector<float>& block_linear(const io::LlamaLayerWeights& L, int i) {
    const std::vector<float>* m[kBlockLinears] = {&L.wq, &L.wk, &L.wv, &L.wo, &L.w1, &L.w2, &L.w3};
    return *m[i];
}
// rows x cols of linear i for a config.
inline std::pair<int, int> block_linear_shape(const io::LlamaConfig& c, int i) {
    const int d = c.dim, kv = c.kv_dim(), h = c.hidden_dim;
    const std::pair<int, int> s[kBlockLinears] = {{d, d}, {kv, d}, {kv, d}, {d, d}, {h, d}, {d, h}, {h, d}};
    return s[i];
}

struct W4Layer {
    W4Matrix m[kBlockLinears];
};
// The block linears of every layer in 4 bits (embedding, norms and classifier stay fp32).
struct W4Model {
    int group = 128;
    std::vector<W4Layer> layers;
    std::size_t bytes() const {
        std::size_t n = 0;
        for (const auto& L : layers)
            for (const auto& m : L.m) n += m.bytes();
        return n;
    }
    double bits_per_weight() const {
        double w = 0;
        for (const auto& L : layers)
            for (const auto& m : L.m) w += double(m.rows) * m.cols;
        return 8.0 * double(bytes()) / w;
    }
};
// Clipping logits of every block linear of every layer.
struct LwcLayer {
    LwcParams m[kBlockLinears];
};

// clip: empty = RTN; else one LwcLayer per layer.
inline W4Model quantize_model(const io::LlamaConfig& c, const io::LlamaWeights& w, int group,
                              const std::vector<LwcLayer>& clip = {}) {
    KVQ_CHECK(w.layers.size() == std::size_t(c.n_layers), "quantize_model: ", w.layers.size(), " layers, config has ",
              c.n_layers);
    KVQ_CHECK(clip.empty() || clip.size() == std::size_t(c.n_layers), "quantize_model: clipping params for ",
              clip.size(), " layers, model has ", c.n_layers);
    W4Model M;
    M.group = group;
    M.layers.resize(std::size_t(c.n_layers));
    for (int l = 0; l < c.n_layers; ++l)
        for (int i = 0; i < kBlockLinears; ++i) {
            const auto [r, k] = block_linear_shape(c, i);
            const std::vector<float>& W = block_linear(w.layers[std::size_t(l)], i);
            KVQ_CHECK(W.size() == std::size_t(r) * k, "quantize_model: layer ", l, " ", kLinearNames[i], " has ",
                      W.size(), " values, expected ", r, "x", k);
            M.layers[std::size_t(l)].m[i] =
                quantize_w4(W.data(), r, k, group, clip.empty() ? nullptr : &clip[std::size_t(l)].m[i]);
        }
    return M;
}

}  // namespace kvq::wq
