#pragma once
// KV calibration without a model (WKVQuant's smoothing parameters, ALGORITHMS.md §2.2):
//
//   calibrate_stats(): the "2-D without learning" initialisation, per channel c of every KV head:
//       delta_c = (max_c + min_c) / 2,   s_c = (max_c - min_c) / 2 normalised to mean 1 over the d
//       channels of the head (a constant channel gets 1e-3 of the head's mean half-range; a head
//       whose channels are all constant gets s = 1).
//   calibrate_opt(): refines delta, s of one layer with Adam to minimise the mean absolute error of
//       the attention output  o_i = sum_{j<=t_i} softmax_j(q_i . K^_j / sqrt(d)) V^_j  against the
//       exact output, over calibration queries q_i at positions t_i (causal; all calibration tokens
//       quantized), where X^ = Q((X - delta) / s) (.) s + delta and Q is the token-wise b-bit
//       quantizer of WkvCodec. Gradients by hand, with a straight-through estimator through the
//       rounding: writing Q(x~) = x~ + r Delta(x~) with r = (Q(x~) - x~)/Delta held constant,
//           X^ = X + s (.) r Delta(x~),  Delta = (max_G x~ - min_G x~) / (2^b - 1) per token group G,
//       so the gradient reaches s directly and (delta, s) through the group's max and min.
//       Parametrisation: delta = delta0 + s0 (.) eta, s = s0 (.) exp(sigma) from the stats
//       initialisation (delta0, s0), so one Adam step size fits channels of every magnitude. The
//       best parameters seen (by the real quantized loss, the initial ones included) are returned,
//       so on the calibration data opt is never worse than stats.
// No queries in the data: the keys serve as queries (as kvq-eval does for dumps without q).
// Every entry point validates shapes and finiteness and throws kvq::Error.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/core/half.hpp"
#include "kvq/quant/tokenwise_codec.hpp"
#include "kvq/quant/wkv_codec.hpp"

namespace kvq::calib {

// Calibration data of one layer, token-major: k, v [T][H_kv][d]; q [T][H_q][d] or empty.
struct KvCalibData {
    int n_kv_heads = 0, head_dim = 0, tokens = 0, n_q_heads = 0;
    std::vector<float> k, v, q;

    void validate() const {
        KVQ_CHECK(n_kv_heads >= 1 && n_kv_heads <= 1024, "calibration data: n_kv_heads must be in [1, 1024], got ",
                  n_kv_heads);
        KVQ_CHECK(head_dim >= 1 && head_dim <= 1024, "calibration data: head_dim must be in [1, 1024], got ", head_dim);
        KVQ_CHECK(tokens >= 2 && tokens <= (1 << 24), "calibration data: need at least 2 tokens, got ", tokens);
        const std::size_t n = std::size_t(tokens) * n_kv_heads * head_dim;
        KVQ_CHECK(k.size() == n, "calibration data: keys have ", k.size(), " values, expected T*H_kv*d = ", tokens, "*",
                  n_kv_heads, "*", head_dim, " = ", n);
        KVQ_CHECK(v.size() == n, "calibration data: values have ", v.size(), " values, expected ", n);
        if (!q.empty() || n_q_heads != 0) {
            KVQ_CHECK(n_q_heads >= n_kv_heads && n_q_heads % n_kv_heads == 0 && n_q_heads <= 4096,
                      "calibration data: n_q_heads (", n_q_heads, ") must be a multiple of n_kv_heads (", n_kv_heads,
                      ")");
            KVQ_CHECK(q.size() == std::size_t(tokens) * n_q_heads * head_dim, "calibration data: queries have ",
                      q.size(), " values, expected T*H_q*d = ", std::size_t(tokens) * n_q_heads * head_dim);
        }
        const auto finite = [](const std::vector<float>& x, const char* what) {
            for (std::size_t i = 0; i < x.size(); ++i)
                KVQ_CHECK(std::isfinite(x[i]), "calibration data: ", what, " has a non-finite value (", x[i],
                          ") at index ", i);
        };
        finite(k, "keys");
        finite(v, "values");
        finite(q, "queries");
    }
};

namespace detail {
inline void stats_one(const std::vector<float>& x, int T, int H, int d, std::vector<float>& shift,
                      std::vector<float>& scale) {
    const std::size_t C = std::size_t(H) * d;
    std::vector<float> lo(C, std::numeric_limits<float>::infinity()), hi(C, -std::numeric_limits<float>::infinity());
    for (int t = 0; t < T; ++t)
        for (std::size_t c = 0; c < C; ++c) {
            lo[c] = std::min(lo[c], x[t * C + c]);
            hi[c] = std::max(hi[c], x[t * C + c]);
        }
    shift.assign(C, 0.0f);
    scale.assign(C, 1.0f);
    for (int h = 0; h < H; ++h) {
        double mean = 0;
        for (int c = 0; c < d; ++c) {
            const std::size_t i = std::size_t(h) * d + c;
            shift[i] = 0.5f * (hi[i] + lo[i]);
            mean += 0.5 * (double(hi[i]) - lo[i]);
        }
        mean /= d;
        if (!(mean > 0)) continue;  // every channel constant: s = 1
        for (int c = 0; c < d; ++c) {
            const std::size_t i = std::size_t(h) * d + c;
            const double half = std::max(0.5 * (double(hi[i]) - lo[i]), 1e-3 * mean);
            scale[i] = static_cast<float>(half / mean);
        }
    }
}
}  // namespace detail

// Statistics initialisation of one layer (see the header comment).
inline WkvLayerParams calibrate_stats(const KvCalibData& data) {
    data.validate();
    WkvLayerParams p;
    detail::stats_one(data.k, data.tokens, data.n_kv_heads, data.head_dim, p.k_shift, p.k_scale);
    detail::stats_one(data.v, data.tokens, data.n_kv_heads, data.head_dim, p.v_shift, p.v_scale);
    return p;
}

struct OptOptions {
    int bits = 4;   // of the token-wise quantizer being calibrated for
    int group = 0;  // its channel group (0: head_dim)
    int iterations = 60;
    float lr = 2e-2f;           // Adam step on eta and sigma (relative units, see the header)
    int queries_per_head = 32;  // calibration query positions per query head, evenly spaced in [T/4, T)
    bool smooth_keys = true, smooth_values = true;             // which side is optimised (the other is left as given)
    std::function<void(int iteration, double loss)> progress;  // optional
};

struct OptReport {
    double initial_loss = 0, best_loss = 0;
    int best_iteration = 0;       // 0: the initial parameters
    std::vector<double> history;  // real quantized loss at each evaluated point
};

namespace detail {

// The calibration objective of one layer. evaluate() returns the mean absolute attention-output
// error with the real quantizer; with grad != nullptr it also returns the STE gradient with
// respect to (k_shift, k_scale, v_shift, v_scale). If frozen != nullptr its r values are used
// instead of the quantizer's (the smooth surrogate whose exact gradient the STE gradient is; tests
// compare it with finite differences); if r_out != nullptr the r values used are stored there.
class Objective {
public:
    Objective(const KvCalibData& data, int bits, int group, int queries_per_head) : D(data), bits_(bits) {
        data.validate();
        const int d = data.head_dim;
        group_ = group == 0 ? d : group;
        KVQ_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "calibration bits must be 2, 3, 4 or 8, got ",
                  bits);
        KVQ_CHECK(group_ >= 1 && d % group_ == 0, "calibration group ", group_, " does not divide head_dim ", d);
        KVQ_CHECK(queries_per_head >= 1 && queries_per_head <= (1 << 20), "queries_per_head must be >= 1, got ",
                  queries_per_head);
        Hq_ = data.q.empty() ? data.n_kv_heads : data.n_q_heads;
        const int T = data.tokens, lo = T / 4;
        const int n = std::min(queries_per_head, T - lo);
        for (int i = 0; i < n; ++i) pos_.push_back(lo + int((long long)(T - lo) * i / n));
        // Exact outputs.
        ref_.resize(std::size_t(pos_.size()) * Hq_ * d);
        std::vector<float> p;
        for (std::size_t i = 0; i < pos_.size(); ++i)
            for (int hq = 0; hq < Hq_; ++hq) {
                const float* q = query(pos_[i], hq);
                const int h = hq / (Hq_ / D.n_kv_heads);
                std::vector<double> o(d, 0.0);
                attend_one(q, h, D.k.data(), D.v.data(), pos_[i], p, o.data());
                for (int c = 0; c < d; ++c) ref_[(i * Hq_ + hq) * d + c] = o[c];
            }
    }

    double evaluate(const WkvLayerParams& P, WkvLayerParams* grad, const std::vector<float>* frozen_rk = nullptr,
                    const std::vector<float>* frozen_rv = nullptr, std::vector<float>* rk_out = nullptr,
                    std::vector<float>* rv_out = nullptr) const {
        const int T = D.tokens, H = D.n_kv_heads, d = D.head_dim;
        const std::size_t C = std::size_t(H) * d, N = std::size_t(T) * C;
        std::vector<float> kh(N), vh(N), rk(N), rv(N), dk(std::size_t(T) * H * (d / group_)), dv(dk.size());
        quantize(D.k, P.k_shift, P.k_scale, frozen_rk, kh, rk, dk);
        quantize(D.v, P.v_shift, P.v_scale, frozen_rv, vh, rv, dv);
        if (rk_out) *rk_out = rk;
        if (rv_out) *rv_out = rv;
        std::vector<double> gK, gV;
        if (grad) {
            gK.assign(N, 0.0);
            gV.assign(N, 0.0);
        }
        const double norm = 1.0 / (double(pos_.size()) * Hq_ * d);
        const double sc = 1.0 / std::sqrt(double(d));
        double loss = 0;
        std::vector<float> p;
        std::vector<double> o(d), go(d);
        for (std::size_t i = 0; i < pos_.size(); ++i)
            for (int hq = 0; hq < Hq_; ++hq) {
                const float* q = query(pos_[i], hq);
                const int h = hq / (Hq_ / H), t = pos_[i];
                std::fill(o.begin(), o.end(), 0.0);
                attend_one(q, h, kh.data(), vh.data(), t, p, o.data());
                const double* r = ref_.data() + (i * Hq_ + hq) * d;
                for (int c = 0; c < d; ++c) {
                    const double e = o[c] - r[c];
                    loss += std::fabs(e) * norm;
                    go[c] = (e > 0 ? 1.0 : (e < 0 ? -1.0 : 0.0)) * norm;
                }
                if (!grad) continue;
                double go_o = 0;
                for (int c = 0; c < d; ++c) go_o += go[c] * o[c];
                for (int j = 0; j <= t; ++j) {
                    const float* vj = vh.data() + std::size_t(j) * C + std::size_t(h) * d;
                    double a = 0;
                    for (int c = 0; c < d; ++c) a += go[c] * vj[c];
                    const double pj = p[j];
                    const double gs = pj * (a - go_o) * sc;
                    double* gk = gK.data() + std::size_t(j) * C + std::size_t(h) * d;
                    double* gv = gV.data() + std::size_t(j) * C + std::size_t(h) * d;
                    for (int c = 0; c < d; ++c) {
                        gv[c] += pj * go[c];
                        gk[c] += gs * q[c];
                    }
                }
            }
        if (grad) {
            grad->k_shift.assign(C, 0.0f);
            grad->k_scale.assign(C, 0.0f);
            grad->v_shift.assign(C, 0.0f);
            grad->v_scale.assign(C, 0.0f);
            chain(D.k, P.k_shift, P.k_scale, rk, dk, gK, grad->k_shift, grad->k_scale);
            chain(D.v, P.v_shift, P.v_scale, rv, dv, gV, grad->v_shift, grad->v_scale);
        }
        return loss;
    }

private:
    const float* query(int t, int hq) const {
        const int d = D.head_dim;
        if (D.q.empty()) return D.k.data() + (std::size_t(t) * D.n_kv_heads + hq) * d;
        return D.q.data() + (std::size_t(t) * D.n_q_heads + hq) * d;
    }
    // o += softmax(q . K_j / sqrt(d), j <= t) V_j for KV head h of token-major K, V; p gets the probabilities.
    void attend_one(const float* q, int h, const float* K, const float* V, int t, std::vector<float>& p,
                    double* o) const {
        const int d = D.head_dim;
        const std::size_t C = std::size_t(D.n_kv_heads) * d;
        const double sc = 1.0 / std::sqrt(double(d));
        p.resize(t + 1);
        std::vector<double> s(t + 1);
        double mx = -1e300;
        for (int j = 0; j <= t; ++j) {
            const float* kj = K + j * C + std::size_t(h) * d;
            double a = 0;
            for (int c = 0; c < d; ++c) a += double(q[c]) * kj[c];
            s[j] = a * sc;
            mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (int j = 0; j <= t; ++j) sum += (s[j] = std::exp(s[j] - mx));
        for (int j = 0; j <= t; ++j) {
            p[j] = static_cast<float>(s[j] / sum);
            const float* vj = V + j * C + std::size_t(h) * d;
            const double pj = s[j] / sum;
            for (int c = 0; c < d; ++c) o[c] += pj * vj[c];
        }
    }
    // Xh = X + s (.) r Delta per (token, head, group); Delta = (max - min)/(2^b-1) of x~ in float.
    void quantize(const std::vector<float>& X, const std::vector<float>& shift, const std::vector<float>& scale,
                  const std::vector<float>* frozen, std::vector<float>& Xh, std::vector<float>& r,
                  std::vector<float>& delta) const {
        const int T = D.tokens, H = D.n_kv_heads, d = D.head_dim, G = d / group_;
        const std::size_t C = std::size_t(H) * d;
        const float levels = float((1 << bits_) - 1);
        std::vector<float> xt(group_);
        std::uint8_t codes[1024];
        for (int t = 0; t < T; ++t)
            for (int h = 0; h < H; ++h)
                for (int g = 0; g < G; ++g) {
                    const std::size_t base = std::size_t(t) * C + std::size_t(h) * d + std::size_t(g) * group_;
                    const std::size_t pb = std::size_t(h) * d + std::size_t(g) * group_;
                    float lo = std::numeric_limits<float>::infinity(), hi = -lo;
                    for (int i = 0; i < group_; ++i) {
                        xt[i] = (X[base + i] - shift[pb + i]) / scale[pb + i];
                        lo = std::min(lo, xt[i]);
                        hi = std::max(hi, xt[i]);
                    }
                    const float Dl = (hi - lo) / levels;
                    delta[(std::size_t(t) * H + h) * G + g] = Dl;
                    if (!frozen) {  // r from the real quantizer (fp16 step and minimum, as WkvCodec)
                        half_t st, mn;
                        tokenwise_quantize_group(xt.data(), group_, bits_, codes, &st, &mn);
                        const float stf = half_to_float(st), mnf = half_to_float(mn);
                        for (int i = 0; i < group_; ++i) {
                            const float xq = codes[i] * stf + mnf;
                            r[base + i] = Dl > 0 ? (xq - xt[i]) / Dl : 0.0f;
                            // Exactly the codec's dequantized value (also when Dl == 0).
                            Xh[base + i] = xq * scale[pb + i] + shift[pb + i];
                        }
                    } else {
                        for (int i = 0; i < group_; ++i) {
                            r[base + i] = (*frozen)[base + i];
                            Xh[base + i] = X[base + i] + scale[pb + i] * r[base + i] * Dl;
                        }
                    }
                }
    }
    void chain(const std::vector<float>& X, const std::vector<float>& shift, const std::vector<float>& scale,
               const std::vector<float>& r, const std::vector<float>& delta, const std::vector<double>& gX,
               std::vector<float>& g_shift, std::vector<float>& g_scale) const {
        const int T = D.tokens, H = D.n_kv_heads, d = D.head_dim, G = d / group_;
        const std::size_t C = std::size_t(H) * d;
        const double levels = double((1 << bits_) - 1);
        std::vector<double> gs(C, 0.0), gd(C, 0.0);
        for (int t = 0; t < T; ++t)
            for (int h = 0; h < H; ++h)
                for (int g = 0; g < G; ++g) {
                    const std::size_t base = std::size_t(t) * C + std::size_t(h) * d + std::size_t(g) * group_;
                    const std::size_t pb = std::size_t(h) * d + std::size_t(g) * group_;
                    const double Dl = delta[(std::size_t(t) * H + h) * G + g];
                    double A = 0;
                    int imax = 0, imin = 0;
                    float lo = std::numeric_limits<float>::infinity(), hi = -lo;
                    for (int i = 0; i < group_; ++i) {
                        const double G_ = gX[base + i];
                        gs[pb + i] += G_ * Dl * r[base + i];
                        A += G_ * scale[pb + i] * r[base + i];
                        const float xt = (X[base + i] - shift[pb + i]) / scale[pb + i];
                        if (xt > hi) hi = xt, imax = i;
                        if (xt < lo) lo = xt, imin = i;
                    }
                    if (imax == imin || !(Dl > 0)) continue;
                    // dDelta/dx~_max = 1/L, dDelta/dx~_min = -1/L; dx~/ddelta = -1/s, dx~/ds = -x~/s.
                    const double a = A / levels;
                    const std::size_t cM = pb + imax, cm = pb + imin;
                    gd[cM] += a * (-1.0 / scale[cM]);
                    gs[cM] += a * (-double(hi) / scale[cM]);
                    gd[cm] -= a * (-1.0 / scale[cm]);
                    gs[cm] -= a * (-double(lo) / scale[cm]);
                }
        for (std::size_t c = 0; c < C; ++c) {
            g_shift[c] = static_cast<float>(gd[c]);
            g_scale[c] = static_cast<float>(gs[c]);
        }
    }

    const KvCalibData& D;
    int bits_, group_ = 0, Hq_ = 0;
    std::vector<int> pos_;
    std::vector<double> ref_;
};

}  // namespace detail

// Adam refinement of one layer from `init` (normally calibrate_stats(data)).
inline WkvLayerParams calibrate_opt(const KvCalibData& data, const WkvLayerParams& init, const OptOptions& opt = {},
                                    OptReport* report = nullptr) {
    data.validate();
    const std::size_t C = std::size_t(data.n_kv_heads) * data.head_dim;
    {
        WkvParams chk;
        chk.n_layers = 1;
        chk.n_kv_heads = data.n_kv_heads;
        chk.head_dim = data.head_dim;
        chk.layers = {init};
        chk.validate();
    }
    KVQ_CHECK(opt.iterations >= 0 && opt.iterations <= 100000, "calibration iterations must be in [0, 1e5], got ",
              opt.iterations);
    KVQ_CHECK(std::isfinite(opt.lr) && opt.lr > 0 && opt.lr < 10, "calibration learning rate must be in (0, 10), got ",
              opt.lr);
    const detail::Objective obj(data, opt.bits, opt.group, opt.queries_per_head);
    // theta = [eta_k, sigma_k, eta_v, sigma_v], each [C]
    std::vector<double> th(4 * C, 0.0), m(4 * C, 0.0), v2(4 * C, 0.0);
    const auto params_of = [&](const std::vector<double>& t) {
        WkvLayerParams P = init;
        for (std::size_t c = 0; c < C; ++c) {
            P.k_shift[c] = static_cast<float>(init.k_shift[c] + init.k_scale[c] * t[c]);
            P.k_scale[c] = static_cast<float>(init.k_scale[c] * std::exp(t[C + c]));
            P.v_shift[c] = static_cast<float>(init.v_shift[c] + init.v_scale[c] * t[2 * C + c]);
            P.v_scale[c] = static_cast<float>(init.v_scale[c] * std::exp(t[3 * C + c]));
        }
        return P;
    };
    WkvLayerParams best = init, grad;
    OptReport rep;
    const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
    for (int it = 0; it <= opt.iterations; ++it) {
        const WkvLayerParams P = params_of(th);
        const bool last = it == opt.iterations;
        const double loss = obj.evaluate(P, last ? nullptr : &grad);
        rep.history.push_back(loss);
        if (it == 0) rep.initial_loss = rep.best_loss = loss;
        if (loss < rep.best_loss) {
            rep.best_loss = loss;
            rep.best_iteration = it;
            best = P;
        }
        if (opt.progress) opt.progress(it, loss);
        if (last) break;
        for (std::size_t c = 0; c < C; ++c) {
            const double g[4] = {opt.smooth_keys ? double(grad.k_shift[c]) * init.k_scale[c] : 0.0,
                                 opt.smooth_keys ? double(grad.k_scale[c]) * P.k_scale[c] : 0.0,
                                 opt.smooth_values ? double(grad.v_shift[c]) * init.v_scale[c] : 0.0,
                                 opt.smooth_values ? double(grad.v_scale[c]) * P.v_scale[c] : 0.0};
            for (int k = 0; k < 4; ++k) {
                const std::size_t i = k * C + c;
                m[i] = b1 * m[i] + (1 - b1) * g[k];
                v2[i] = b2 * v2[i] + (1 - b2) * g[k] * g[k];
                const double mh = m[i] / (1 - std::pow(b1, it + 1)), vh = v2[i] / (1 - std::pow(b2, it + 1));
                th[i] -= opt.lr * mh / (std::sqrt(vh) + eps);
                if (k % 2 == 1) th[i] = std::clamp(th[i], -5.0, 5.0);  // s within e^+-5 of the stats value
            }
        }
    }
    if (report) *report = rep;
    return best;
}

enum class CalibMode { None, Stats, Opt };

// Parameters of every layer: none (delta = 0, s = 1), stats, or stats refined by opt.
inline WkvParams calibrate(const std::vector<KvCalibData>& layers, CalibMode mode, const OptOptions& opt = {}) {
    KVQ_CHECK(!layers.empty(), "calibration needs at least one layer");
    const int H = layers[0].n_kv_heads, d = layers[0].head_dim;
    WkvParams P = WkvParams::identity(int(layers.size()), H, d);
    for (std::size_t l = 0; l < layers.size(); ++l) {
        layers[l].validate();
        KVQ_CHECK(layers[l].n_kv_heads == H && layers[l].head_dim == d, "calibration layer ", l,
                  " has kv_heads=", layers[l].n_kv_heads, " head_dim=", layers[l].head_dim, ", layer 0 has ", H, ", ",
                  d);
        if (mode == CalibMode::None) continue;
        P.layers[l] = calibrate_stats(layers[l]);
        if (mode == CalibMode::Opt) P.layers[l] = calibrate_opt(layers[l], P.layers[l], opt);
    }
    P.validate();
    return P;
}

}  // namespace kvq::calib
