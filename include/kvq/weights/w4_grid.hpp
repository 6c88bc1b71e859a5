#pragma once
// Gradient-free clipping baseline for 4-bit weights (issue 6's "grid search"): for every row-group,
// the symmetric clipping strength alpha = gamma = beta is picked from a grid {1, ..., lowest} as
// the one whose quantized group has the smallest squared weight error sum_c (W^_c - W_c)^2. It
// needs no data and no gradients (as the MSE clipping searches of GPTQ/AWQ-style tools), and
// alpha = 1 is in the grid, so no group ends worse than round-to-nearest.
//
// The result is ordinary LwcParams (a = b = logit(alpha), alpha = 1 stored as a = b = 1e4, whose
// sigmoid is exactly 1.0 in double), so a grid-searched model is quantized, stored and run exactly
// like an LWC/CRR-calibrated one. Candidates are scored with the very gamma quantize_w4 will use
// (sigmoid of the float logit), so the chosen clipping is the argmin of what gets stored.
#include <cmath>
#include <limits>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/weights/w4_quant.hpp"

namespace kvq::wq {

inline constexpr int kW4GridSteps = 13;  // alpha = 1, 0.975, ..., 0.70
inline constexpr double kW4GridLowest = 0.70;

// The float logit quantize_w4 reads for a clipping strength alpha in (0, 1].
inline float w4_clip_logit(double alpha) {
    return alpha >= 1.0 ? 1e4f : static_cast<float>(std::log(alpha / (1.0 - alpha)));
}

// Squared error of one group w[0, n) quantized with gamma = beta = sigmoid(logit).
inline double w4_group_sq_error(const float* w, int n, float lo, float hi, float logit) {
    const double g = sigmoid(logit);
    const W4GroupQuant q = w4_group_quant(lo, hi, g, g);
    const double h = half_to_float(float_to_half(q.h)), z = half_to_float(float_to_half(q.z));
    double e = 0;
    for (int c = 0; c < n; ++c) {
        const double d = (double(w4_code(w[c], q)) - z) * h - double(w[c]);
        e += d * d;
    }
    return e;
}

// Clipping logits for w [rows][cols] (group as quantize_w4), one grid search per row-group.
inline LwcParams grid_search_clipping(const float* w, int rows, int cols, int group, int steps = kW4GridSteps,
                                      double lowest = kW4GridLowest) {
    KVQ_CHECK(steps >= 1 && steps <= 1000, "W4 grid search: steps must be in [1, 1000], got ", steps);
    KVQ_CHECK(lowest > 0.0 && lowest <= 1.0, "W4 grid search: lowest alpha must be in (0, 1], got ", lowest);
    LwcParams p = LwcParams::init(rows, cols, group);
    const int G = p.groups(), gw = w4_group_width(group, cols);
    std::vector<float> logits(static_cast<std::size_t>(steps));
    for (int s = 0; s < steps; ++s)
        logits[std::size_t(s)] = w4_clip_logit(steps == 1 ? 1.0 : 1.0 - (1.0 - lowest) * s / (steps - 1));
    for (int r = 0; r < rows; ++r)
        for (int g = 0; g < G; ++g) {
            const int c0 = g * gw, n = std::min(cols, c0 + gw) - c0;
            const float* x = w + std::size_t(r) * cols + c0;
            float lo = x[0], hi = x[0];
            for (int c = 0; c < n; ++c) {
                KVQ_CHECK(std::isfinite(x[c]), "W4 grid search: weight [", r, "][", c0 + c, "] is not finite (", x[c],
                          ")");
                lo = std::min(lo, x[c]);
                hi = std::max(hi, x[c]);
            }
            double best = std::numeric_limits<double>::infinity();
            float best_logit = logits[0];
            for (float lg : logits) {
                const double e = w4_group_sq_error(x, n, lo, hi, lg);
                if (e < best) best = e, best_logit = lg;  // ties keep the weaker clipping
            }
            const std::size_t gi = std::size_t(r) * G + g;
            p.a[gi] = p.b[gi] = best_logit;
        }
    return p;
}

// Grid-searched clipping for every block linear of a model (what quantize_model takes).
inline std::vector<LwcLayer> grid_search_model(const io::LlamaConfig& c, const io::LlamaWeights& w, int group) {
    KVQ_CHECK(w.layers.size() == std::size_t(c.n_layers), "grid_search_model: ", w.layers.size(),
              " layers, config has ", c.n_layers);
    std::vector<LwcLayer> clip(std::size_t(c.n_layers));
    for (int l = 0; l < c.n_layers; ++l)
        for (int i = 0; i < kBlockLinears; ++i) {
            const auto [r, k] = block_linear_shape(c, i);
            const std::vector<float>& W = block_linear(w.layers[std::size_t(l)], i);
            KVQ_CHECK(W.size() == std::size_t(r) * k, "grid_search_model: layer ", l, " ", kLinearNames[i], " has ",
                      W.size(), " values, expected ", r, "x", k);
            clip[std::size_t(l)].m[i] = grid_search_clipping(W.data(), r, k, group);
        }
    return clip;
}

}  // namespace kvq::wq
