#pragma once
// WkvParams: WKVQuant's static per-channel smoothing (shift delta, scale s) of every layer, for K
// and V (ALGORITHMS.md §2.2). Filled by kvq/calibration/kv_calibration.hpp, stored by
// kvq/io/kv_params_file.hpp, applied by WkvKvCache (kvq/quant/wkv_codec.hpp). Dependency-free so
// that the file reader (and its fuzz target) need nothing else.
#include <cmath>
#include <cstddef>
#include <vector>

#include "kvq/core/error.hpp"

namespace kvq {

// Static smoothing of one layer; every vector is [H_kv * d], channel c of KV head h at h * d + c.
struct WkvLayerParams {
    std::vector<float> k_shift, k_scale, v_shift, v_scale;
};

struct WkvParams {
    int n_layers = 0, n_kv_heads = 0, head_dim = 0;
    std::vector<WkvLayerParams> layers;

    int channels() const { return n_kv_heads * head_dim; }

    // delta = 0, s = 1 everywhere: the "none" calibration (plain token-wise quantization).
    static WkvParams identity(int n_layers, int n_kv_heads, int head_dim) {
        WkvParams p;
        p.n_layers = n_layers;
        p.n_kv_heads = n_kv_heads;
        p.head_dim = head_dim;
        KVQ_CHECK(n_layers >= 1 && n_layers <= 4096 && n_kv_heads >= 1 && n_kv_heads <= 1024 && head_dim >= 1 &&
                      head_dim <= 1024,
                  "WKV params: bad shape layers=", n_layers, " kv_heads=", n_kv_heads, " head_dim=", head_dim);
        const std::size_t C = std::size_t(n_kv_heads) * head_dim;
        p.layers.assign(n_layers, WkvLayerParams{std::vector<float>(C, 0.0f), std::vector<float>(C, 1.0f),
                                                 std::vector<float>(C, 0.0f), std::vector<float>(C, 1.0f)});
        return p;
    }

    // Throws kvq::Error on a shape mismatch, a non-finite value, or a scale outside [1e-6, 1e6].
    void validate() const {
        KVQ_CHECK(n_layers >= 1 && n_layers <= 4096 && n_kv_heads >= 1 && n_kv_heads <= 1024 && head_dim >= 1 &&
                      head_dim <= 1024,
                  "WKV params: bad shape layers=", n_layers, " kv_heads=", n_kv_heads, " head_dim=", head_dim);
        KVQ_CHECK(layers.size() == std::size_t(n_layers), "WKV params: ", layers.size(), " layers given, expected ",
                  n_layers);
        const std::size_t C = std::size_t(channels());
        for (int l = 0; l < n_layers; ++l) {
            const WkvLayerParams& L = layers[l];
            const std::vector<float>* vs[4] = {&L.k_shift, &L.k_scale, &L.v_shift, &L.v_scale};
            const char* names[4] = {"k_shift", "k_scale", "v_shift", "v_scale"};
            for (int i = 0; i < 4; ++i) {
                KVQ_CHECK(vs[i]->size() == C, "WKV params: layer ", l, " ", names[i], " has ", vs[i]->size(),
                          " channels, expected ", C);
                for (std::size_t c = 0; c < C; ++c) {
                    const float x = (*vs[i])[c];
                    KVQ_CHECK(std::isfinite(x), "WKV params: layer ", l, " ", names[i], "[", c, "] is not finite (", x,
                              ")");
                    if (i % 2 == 1)
                        KVQ_CHECK(x >= 1e-6f && x <= 1e6f, "WKV params: layer ", l, " ", names[i], "[", c, "] = ", x,
                                  " is outside [1e-6, 1e6]");
                    else
                        KVQ_CHECK(std::fabs(x) <= 1e6f, "WKV params: layer ", l, " ", names[i], "[", c, "] = ", x,
                                  " is outside [-1e6, 1e6]");
                }
            }
        }
    }
};

}  // namespace kvq
