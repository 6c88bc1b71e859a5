#pragma once
// Forward and reverse pass, in float64, through one Llama block over a segment of T tokens
// (positions 0..T-1), for CRR calibration (ALGORITHMS.md §2.3):
//   X -> RMSNorm -> Q, K, V = linear (fake-quantized W, §2.4) -> RoPE(Q, K) -> K^, V^ = KV fake
//   quantization (WKVQuant smoothing delta, s + token-wise b-bit, §2.2) -> causal attention with
//   past-only quantization (query t sees K^_j, V^_j for j < t and the exact K_t, V_t) -> wo, residual
//   -> RMSNorm -> SwiGLU (w1, w3, w2), residual -> Y.
// The reverse pass gives dL/dX, the gradients w.r.t. the clipping logits a, b of the seven linears
// and w.r.t. delta, s of K and V.
//
// Rounding and the straight-through estimator (STE). The forward records, at the point where it
// is evaluated, every rounding residual rho = round(u) - u, every clamp decision and every group's
// argmin/argmax. The reverse pass is the exact gradient of the "frozen" surrogate in which those
// records are constants:  weights  W^ = W + h rho (inside the grid) or h (c - z~), z~ = -beta min/h
// + rho_z (clamped at c = 0 or 15);  KV  x^ = x + s Delta rho, Delta = (x~_max - x~_min)/(2^b - 1).
// At the recorded point the surrogate equals the real quantizer, and its derivative is OmniQuant's
// STE gradient. Forward(Frozen) evaluates the surrogate itself, which is what the finite-difference
// tests differentiate. The surrogate uses the exact step; the packed file rounds h to fp16 and the
// KV cache rounds Delta and min to fp16 (a relative 2^-11 difference, ignored in calibration).
#include <Eigen/Dense>
#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/io/llama2c.hpp"
#include "kvq/weights/w4_quant.hpp"

namespace kvq::calib {

using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;  // [tokens][channels]

// ---------------------------------------------------------------- weight fake quantization

// Records of one matrix (see the header comment).
struct WeightQuantTape {
    std::vector<double> h, rho_z, wmin, wmax;  // per row-group
    std::vector<wq::W4StepBranch> branch;      // per row-group
    std::vector<double> rho;                   // per weight (inside the grid)
    std::vector<signed char> clamp;            // per weight: -1 inside, else the clamped code 0 or 15
};

// W^ of W [rows][cols] with logits a, b per row-group; frozen: evaluate the recorded surrogate.
inline Mat fake_quant_weight(const Mat& W, int group, const std::vector<double>& a, const std::vector<double>& b,
                             WeightQuantTape& t, bool frozen) {
    const int rows = int(W.rows()), cols = int(W.cols()), G = wq::w4_groups_per_row(cols, group),
              gw = wq::w4_group_width(group, cols);
    KVQ_CHECK(a.size() == std::size_t(rows) * G && b.size() == a.size(), "fake_quant_weight: ", a.size(),
              " logits for ", rows, "x", G, " row-groups");
    const std::size_t NG = std::size_t(rows) * G;
    if (!frozen) {
        t.h.assign(NG, 0);
        t.rho_z.assign(NG, 0);
        t.wmin.assign(NG, 0);
        t.wmax.assign(NG, 0);
        t.branch.assign(NG, wq::W4StepBranch::Range);
        t.rho.assign(std::size_t(rows) * cols, 0);
        t.clamp.assign(std::size_t(rows) * cols, -1);
    }
    Mat out(rows, cols);
    for (int r = 0; r < rows; ++r)
        for (int g = 0; g < G; ++g) {
            const std::size_t gi = std::size_t(r) * G + g;
            const int c0 = g * gw, c1 = std::min(cols, c0 + gw);
            const double gamma = wq::sigmoid(a[gi]), beta = wq::sigmoid(b[gi]);
            if (!frozen) {
                double lo = W(r, c0), hi = W(r, c0);
                for (int c = c0; c < c1; ++c) lo = std::min(lo, W(r, c)), hi = std::max(hi, W(r, c));
                t.wmin[gi] = lo;
                t.wmax[gi] = hi;
                t.branch[gi] = wq::w4_step_branch(lo, hi, gamma, beta);
            }
            const double lo = t.wmin[gi], hi = t.wmax[gi];
            double h = 0;
            switch (t.branch[gi]) {  // the recorded branch, also when frozen
                case wq::W4StepBranch::Range: h = (gamma * hi - beta * lo) / wq::kW4Levels; break;
                case wq::W4StepBranch::GammaMax: h = gamma * std::fabs(hi) / wq::kW4Levels; break;
                case wq::W4StepBranch::BetaMin: h = beta * std::fabs(lo) / wq::kW4Levels; break;
                default: h = wq::kW4MinStep;
            }
            if (!frozen) {
                const double z = -std::nearbyint(beta * lo / h);
                t.h[gi] = h;
                t.rho_z[gi] = z + beta * lo / h;
                for (int c = c0; c < c1; ++c) {
                    const double u = W(r, c) / h, code = std::nearbyint(u) + z;
                    const std::size_t i = std::size_t(r) * cols + c;
                    t.rho[i] = std::nearbyint(u) - u;
                    t.clamp[i] = code < 0 ? 0 : (code > wq::kW4Levels ? wq::kW4Levels : -1);
                }
            }
            const double zt = -beta * lo / h + t.rho_z[gi];
            for (int c = c0; c < c1; ++c) {
                const std::size_t i = std::size_t(r) * cols + c;
                out(r, c) = t.clamp[i] < 0 ? W(r, c) + h * t.rho[i] : h * (double(t.clamp[i]) - zt);
            }
        }
    return out;
}

// Gradients of the logits from dL/dW^ (accumulated into da, db).
inline void fake_quant_weight_backward(const Mat& W, int group, const std::vector<double>& a,
                                       const std::vector<double>& b, const WeightQuantTape& t, const Mat& dWq,
                                       std::vector<double>& da, std::vector<double>& db) {
    const int rows = int(W.rows()), cols = int(W.cols()), G = wq::w4_groups_per_row(cols, group),
              gw = wq::w4_group_width(group, cols);
    da.resize(a.size(), 0.0);
    db.resize(b.size(), 0.0);
    for (int r = 0; r < rows; ++r)
        for (int g = 0; g < G; ++g) {
            const std::size_t gi = std::size_t(r) * G + g;
            const int c0 = g * gw, c1 = std::min(cols, c0 + gw);
            const double gamma = wq::sigmoid(a[gi]), beta = wq::sigmoid(b[gi]), lo = t.wmin[gi], hi = t.wmax[gi];
            double dh = 0, dbeta = 0;
            for (int c = c0; c < c1; ++c) {
                const std::size_t i = std::size_t(r) * cols + c;
                if (t.clamp[i] < 0) {
                    dh += dWq(r, c) * t.rho[i];  // W + h rho
                } else {                         // h c + beta min - h rho_z
                    dh += dWq(r, c) * (double(t.clamp[i]) - t.rho_z[gi]);
                    dbeta += dWq(r, c) * lo;
                }
            }
            double dgamma = 0;
            switch (t.branch[gi]) {
                case wq::W4StepBranch::Range:
                    dgamma = dh * hi / wq::kW4Levels;
                    dbeta -= dh * lo / wq::kW4Levels;
                    break;
                case wq::W4StepBranch::GammaMax: dgamma = dh * std::fabs(hi) / wq::kW4Levels; break;
                case wq::W4StepBranch::BetaMin: dbeta += dh * std::fabs(lo) / wq::kW4Levels; break;
                default: break;
            }
            da[gi] += dgamma * gamma * (1 - gamma);
            db[gi] += dbeta * beta * (1 - beta);
        }
}

// ---------------------------------------------------------------- KV fake quantization

struct KvQuantTape {
    std::vector<double> rho;      // [T][C]
    std::vector<int> imin, imax;  // [T][groups]: channel of the group's min / max of x~
};

// X^ of X [T][C]: x~ = (x - shift) / scale, token-wise b-bit groups of g channels, back to x.
inline Mat fake_quant_kv(const Mat& X, const std::vector<double>& shift, const std::vector<double>& scale, int bits,
                         int group, KvQuantTape& t, bool frozen) {
    const int T = int(X.rows()), C = int(X.cols()), NG = C / group;
    const double L = double((1 << bits) - 1);
    if (!frozen) {
        t.rho.assign(std::size_t(T) * C, 0);
        t.imin.assign(std::size_t(T) * NG, 0);
        t.imax.assign(std::size_t(T) * NG, 0);
    }
    Mat out(T, C);
    std::vector<double> xt(static_cast<std::size_t>(group));
    for (int i = 0; i < T; ++i)
        for (int g = 0; g < NG; ++g) {
            const std::size_t gi = std::size_t(i) * NG + g;
            for (int c = 0; c < group; ++c) xt[c] = (X(i, g * group + c) - shift[g * group + c]) / scale[g * group + c];
            if (!frozen) {
                t.imin[gi] = int(std::min_element(xt.begin(), xt.end()) - xt.begin());
                t.imax[gi] = int(std::max_element(xt.begin(), xt.end()) - xt.begin());
            }
            const double lo = xt[t.imin[gi]], step = (xt[t.imax[gi]] - lo) / L;
            for (int c = 0; c < group; ++c) {
                const int ch = g * group + c;
                const std::size_t e = std::size_t(i) * C + ch;
                if (!frozen) {
                    const double u = step > 0 ? (xt[c] - lo) / step : 0.0;
                    t.rho[e] = std::nearbyint(u) - u;
                }
                out(i, ch) = X(i, ch) + scale[ch] * step * t.rho[e];
            }
        }
    return out;
}

// dL/dX^ -> dX (accumulated), dshift, dscale (accumulated).
inline void fake_quant_kv_backward(const Mat& X, const std::vector<double>& shift, const std::vector<double>& scale,
                                   int bits, int group, const KvQuantTape& t, const Mat& dXq, Mat& dX,
                                   std::vector<double>& dshift, std::vector<double>& dscale) {
    const int T = int(X.rows()), C = int(X.cols()), NG = C / group;
    const double L = double((1 << bits) - 1);
    for (int i = 0; i < T; ++i)
        for (int g = 0; g < NG; ++g) {
            const std::size_t gi = std::size_t(i) * NG + g;
            const int cm = g * group + t.imin[gi], cM = g * group + t.imax[gi];
            const double xm = (X(i, cm) - shift[cm]) / scale[cm], xM = (X(i, cM) - shift[cM]) / scale[cM];
            const double step = (xM - xm) / L;
            double dstep = 0;
            for (int c = g * group; c < (g + 1) * group; ++c) {
                const double rho = t.rho[std::size_t(i) * C + c], gr = dXq(i, c);
                dX(i, c) += gr;
                dscale[c] += gr * step * rho;
                dstep += gr * scale[c] * rho;
            }
            // step = (x~_M - x~_m) / L, x~_j = (x_j - shift_j) / scale_j
            const double dxM = dstep / L, dxm = -dstep / L;
            for (auto [ch, dxt, xt] : {std::tuple{cM, dxM, xM}, std::tuple{cm, dxm, xm}}) {
                dX(i, ch) += dxt / scale[ch];
                dshift[ch] -= dxt / scale[ch];
                dscale[ch] -= dxt * xt / scale[ch];
            }
        }
}

// ---------------------------------------------------------------- components

// Y = g (.) X / sqrt(mean(X^2) + eps) per row; r[i] = the row's 1/sqrt(...) (kept for backward).
inline Mat rmsnorm_fwd(const Mat& X, const Eigen::VectorXd& g, double eps, std::vector<double>& r) {
    const int T = int(X.rows()), n = int(X.cols());
    r.resize(std::size_t(T));
    Mat Y(T, n);
    for (int i = 0; i < T; ++i) {
        r[i] = 1.0 / std::sqrt(X.row(i).squaredNorm() / n + eps);
        for (int j = 0; j < n; ++j) Y(i, j) = g[j] * X(i, j) * r[i];
    }
    return Y;
}
inline Mat rmsnorm_bwd(const Mat& X, const Eigen::VectorXd& g, const std::vector<double>& r, const Mat& dY) {
    const int T = int(X.rows()), n = int(X.cols());
    Mat dX(T, n);
    for (int i = 0; i < T; ++i) {
        double s = 0;
        for (int j = 0; j < n; ++j) s += dY(i, j) * g[j] * X(i, j);
        for (int j = 0; j < n; ++j) dX(i, j) = r[i] * g[j] * dY(i, j) - r[i] * r[i] * r[i] / n * X(i, j) * s;
    }
    return dX;
}

// RoPE over adjacent pairs, row i at position i (sign -1: the inverse rotation = the backward pass).
inline void rope_apply(Mat& X, int head_dim, double theta, double sign = 1.0) {
    for (int i = 0; i < X.rows(); ++i)
        for (int c = 0; c < X.cols(); c += 2) {
            const double ang = sign * i * std::pow(theta, -double(c % head_dim) / head_dim);
            const double cs = std::cos(ang), sn = std::sin(ang), x0 = X(i, c), x1 = X(i, c + 1);
            X(i, c) = x0 * cs - x1 * sn;
            X(i, c + 1) = x0 * sn + x1 * cs;
        }
}

// Causal attention with past-only quantization: query i attends to Kp/Vp (the quantized cache) for
// j < i and to K/V (exact) at j = i. Q [T][H*d], K.. [T][Hkv*d]; P [H][T][T] kept for backward.
inline Mat attention_fwd(const Mat& Q, const Mat& K, const Mat& V, const Mat& Kp, const Mat& Vp, int n_heads,
                         int n_kv_heads, int d, std::vector<double>& P) {
    const int T = int(Q.rows()), grp = n_heads / n_kv_heads;
    const double isd = 1.0 / std::sqrt(double(d));
    P.assign(std::size_t(n_heads) * T * T, 0.0);
    Mat O = Mat::Zero(T, Q.cols());
    for (int h = 0; h < n_heads; ++h) {
        const int qo = h * d, ko = (h / grp) * d;
        for (int i = 0; i < T; ++i) {
            double* p = &P[(std::size_t(h) * T + i) * T];
            double mx = -1e300;
            for (int j = 0; j <= i; ++j) {
                const Mat& KK = j < i ? Kp : K;
                p[j] = Q.row(i).segment(qo, d).dot(KK.row(j).segment(ko, d)) * isd;
                mx = std::max(mx, p[j]);
            }
            double s = 0;
            for (int j = 0; j <= i; ++j) s += (p[j] = std::exp(p[j] - mx));
            for (int j = 0; j <= i; ++j) {
                p[j] /= s;
                const Mat& VV = j < i ? Vp : V;
                O.row(i).segment(qo, d) += p[j] * VV.row(j).segment(ko, d);
            }
        }
    }
    return O;
}
// dO -> dQ, dK, dV (exact current tokens), dKp, dVp (the cached, quantized past).
inline void attention_bwd(const Mat& Q, const Mat& K, const Mat& V, const Mat& Kp, const Mat& Vp, int n_heads,
                          int n_kv_heads, int d, const std::vector<double>& P, const Mat& dO, Mat& dQ, Mat& dK, Mat& dV,
                          Mat& dKp, Mat& dVp) {
    const int T = int(Q.rows()), grp = n_heads / n_kv_heads;
    const double isd = 1.0 / std::sqrt(double(d));
    dQ = Mat::Zero(T, Q.cols());
    dK = dV = dKp = dVp = Mat::Zero(T, K.cols());
    std::vector<double> dp(static_cast<std::size_t>(T));
    for (int h = 0; h < n_heads; ++h) {
        const int qo = h * d, ko = (h / grp) * d;
        for (int i = 0; i < T; ++i) {
            const double* p = &P[(std::size_t(h) * T + i) * T];
            double pdp = 0;
            for (int j = 0; j <= i; ++j) {
                const Mat& VV = j < i ? Vp : V;
                dp[j] = dO.row(i).segment(qo, d).dot(VV.row(j).segment(ko, d));
                pdp += p[j] * dp[j];
                (j < i ? dVp : dV).row(j).segment(ko, d) += p[j] * dO.row(i).segment(qo, d);
            }
            for (int j = 0; j <= i; ++j) {
                const double ds = p[j] * (dp[j] - pdp) * isd;
                const Mat& KK = j < i ? Kp : K;
                dQ.row(i).segment(qo, d) += ds * KK.row(j).segment(ko, d);
                (j < i ? dKp : dK).row(j).segment(ko, d) += ds * Q.row(i).segment(qo, d);
            }
        }
    }
}

inline Mat swiglu_fwd(const Mat& A, const Mat& B) {  // silu(A) (.) B
    return A.binaryExpr(B, [](double a, double b) { return a / (1 + std::exp(-a)) * b; });
}
inline void swiglu_bwd(const Mat& A, const Mat& B, const Mat& dY, Mat& dA, Mat& dB) {
    dA = Mat(A.rows(), A.cols());
    dB = Mat(A.rows(), A.cols());
    for (Eigen::Index i = 0; i < A.size(); ++i) {
        const double a = A.data()[i], sg = 1 / (1 + std::exp(-a));
        dB.data()[i] = dY.data()[i] * a * sg;
        dA.data()[i] = dY.data()[i] * B.data()[i] * sg * (1 + a * (1 - sg));
    }
}

// ---------------------------------------------------------------- the block

// One layer's weights in float64.
struct BlockWeights {
    int dim = 0, hidden = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
    double eps = 1e-5, theta = 10000;
    Eigen::VectorXd rms_att, rms_ffn;
    std::array<Mat, wq::kBlockLinears> W;  // wq wk wv wo w1 w2 w3, [out][in]

    static BlockWeights from(const io::LlamaConfig& c, const io::LlamaLayerWeights& L) {
        BlockWeights b;
        b.dim = c.dim;
        b.hidden = c.hidden_dim;
        b.n_heads = c.n_heads;
        b.n_kv_heads = c.n_kv_heads;
        b.head_dim = c.head_dim;
        b.eps = c.norm_eps;
        b.theta = c.rope_theta;
        b.rms_att = Eigen::Map<const Eigen::VectorXf>(L.rms_att.data(), c.dim).cast<double>();
        b.rms_ffn = Eigen::Map<const Eigen::VectorXf>(L.rms_ffn.data(), c.dim).cast<double>();
        for (int i = 0; i < wq::kBlockLinears; ++i) {
            const auto [r, k] = wq::block_linear_shape(c, i);
            const std::vector<float>& w = wq::block_linear(L, i);
            KVQ_CHECK(w.size() == std::size_t(r) * k, "BlockWeights: ", wq::kLinearNames[i], " has ", w.size(),
                      " values, expected ", r, "x", k);
            b.W[i] =
                Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(w.data(), r, k)
                    .cast<double>();
        }
        return b;
    }
    int kv_dim() const { return n_kv_heads * head_dim; }
};

// What is quantized in a forward pass.
struct BlockQuant {
    bool weights = false;
    int w_group = 128;
    bool kv = false;
    int kv_bits = 4, kv_group = 0;  // 0: head_dim
};

// The calibrated parameters of one block (float64 while optimising).
struct BlockParams {
    std::array<std::vector<double>, wq::kBlockLinears> a, b;
    std::vector<double> k_shift, k_scale, v_shift, v_scale;

    static BlockParams init(const BlockWeights& w, int w_group, double logit = 4.0) {
        BlockParams p;
        for (int i = 0; i < wq::kBlockLinears; ++i) {
            const std::size_t n = std::size_t(w.W[i].rows()) * wq::w4_groups_per_row(int(w.W[i].cols()), w_group);
            p.a[i].assign(n, logit);
            p.b[i].assign(n, logit);
        }
        p.k_shift.assign(std::size_t(w.kv_dim()), 0.0);
        p.v_shift = p.k_shift;
        p.k_scale.assign(std::size_t(w.kv_dim()), 1.0);
        p.v_scale = p.k_scale;
        return p;
    }
    // Zeros of the same shape (gradient accumulator).
    BlockParams zeros_like() const {
        BlockParams z = *this;
        for (auto* v : z.all()) std::fill(v->begin(), v->end(), 0.0);
        return z;
    }
    std::vector<std::vector<double>*> all() {
        std::vector<std::vector<double>*> v;
        for (auto& x : a) v.push_back(&x);
        for (auto& x : b) v.push_back(&x);
        for (auto* x : {&k_shift, &k_scale, &v_shift, &v_scale}) v.push_back(x);
        return v;
    }
};

// Everything the reverse pass needs from one forward pass.
struct BlockTape {
    Mat X, xn1, Q, K, V, Kp, Vp, att, Y1, xn2, H1, H3, Hs;
    std::vector<double> r1, r2, P;
    std::array<Mat, wq::kBlockLinears> Wq;  // the (fake-quantized) weights used
    std::array<WeightQuantTape, wq::kBlockLinears> wtape;
    KvQuantTape ktape, vtape;
};

// Y = block(X). params may be null when nothing is quantized. frozen: evaluate the surrogate
// recorded in `tape` by an earlier non-frozen call (finite-difference checks); tape is overwritten
// with this pass's activations either way.
inline Mat block_forward(const BlockWeights& w, const BlockParams* p, const BlockQuant& q, const Mat& X, BlockTape& t,
                         bool frozen = false) {
    KVQ_CHECK(X.cols() == w.dim && X.rows() >= 1, "block_forward: input is ", X.rows(), "x", X.cols(),
              ", dim = ", w.dim);
    KVQ_CHECK(!(q.weights || q.kv) || p != nullptr, "block_forward: quantization without parameters");
    const int kvg = q.kv_group == 0 ? w.head_dim : q.kv_group;
    KVQ_CHECK(w.kv_dim() % kvg == 0, "block_forward: KV group ", kvg, " does not divide ", w.kv_dim());
    for (int i = 0; i < wq::kBlockLinears; ++i)
        t.Wq[i] = q.weights ? fake_quant_weight(w.W[i], q.w_group, p->a[i], p->b[i], t.wtape[i], frozen) : w.W[i];
    t.X = X;
    t.xn1 = rmsnorm_fwd(X, w.rms_att, w.eps, t.r1);
    t.Q = t.xn1 * t.Wq[0].transpose();
    t.K = t.xn1 * t.Wq[1].transpose();
    t.V = t.xn1 * t.Wq[2].transpose();
    rope_apply(t.Q, w.head_dim, w.theta);
    rope_apply(t.K, w.head_dim, w.theta);
    if (q.kv) {
        t.Kp = fake_quant_kv(t.K, p->k_shift, p->k_scale, q.kv_bits, kvg, t.ktape, frozen);
        t.Vp = fake_quant_kv(t.V, p->v_shift, p->v_scale, q.kv_bits, kvg, t.vtape, frozen);
    } else {
        t.Kp = t.K;
        t.Vp = t.V;
    }
    t.att = attention_fwd(t.Q, t.K, t.V, t.Kp, t.Vp, w.n_heads, w.n_kv_heads, w.head_dim, t.P);
    t.Y1 = X + t.att * t.Wq[3].transpose();
    t.xn2 = rmsnorm_fwd(t.Y1, w.rms_ffn, w.eps, t.r2);
    t.H1 = t.xn2 * t.Wq[4].transpose();
    t.H3 = t.xn2 * t.Wq[6].transpose();
    t.Hs = swiglu_fwd(t.H1, t.H3);
    return t.Y1 + t.Hs * t.Wq[5].transpose();
}

// Reverse pass: dY -> dX (returned); parameter gradients accumulated into *grad when given.
inline Mat block_backward(const BlockWeights& w, const BlockParams* p, const BlockQuant& q, const BlockTape& t,
                          const Mat& dY, BlockParams* grad) {
    const int kvg = q.kv_group == 0 ? w.head_dim : q.kv_group;
    std::array<Mat, wq::kBlockLinears> dW;
    const bool want_w = grad && q.weights;
    // FFN: Y = Y1 + Hs W2^T
    Mat dY1 = dY;
    if (want_w) dW[5] = dY.transpose() * t.Hs;
    const Mat dHs = dY * t.Wq[5];
    Mat dH1, dH3;
    swiglu_bwd(t.H1, t.H3, dHs, dH1, dH3);
    if (want_w) {
        dW[4] = dH1.transpose() * t.xn2;
        dW[6] = dH3.transpose() * t.xn2;
    }
    const Mat dxn2 = dH1 * t.Wq[4] + dH3 * t.Wq[6];
    dY1 += rmsnorm_bwd(t.Y1, w.rms_ffn, t.r2, dxn2);
    // attention: Y1 = X + att Wo^T
    Mat dX = dY1;
    if (want_w) dW[3] = dY1.transpose() * t.att;
    const Mat datt = dY1 * t.Wq[3];
    Mat dQ, dK, dV, dKp, dVp;
    attention_bwd(t.Q, t.K, t.V, t.Kp, t.Vp, w.n_heads, w.n_kv_heads, w.head_dim, t.P, datt, dQ, dK, dV, dKp, dVp);
    if (q.kv) {
        std::vector<double> dks(t.K.cols(), 0.0), dkc(t.K.cols(), 0.0), dvs(t.K.cols(), 0.0), dvc(t.K.cols(), 0.0);
        fake_quant_kv_backward(t.K, p->k_shift, p->k_scale, q.kv_bits, kvg, t.ktape, dKp, dK, dks, dkc);
        fake_quant_kv_backward(t.V, p->v_shift, p->v_scale, q.kv_bits, kvg, t.vtape, dVp, dV, dvs, dvc);
        if (grad)
            for (std::size_t c = 0; c < dks.size(); ++c) {
                grad->k_shift[c] += dks[c];
                grad->k_scale[c] += dkc[c];
                grad->v_shift[c] += dvs[c];
                grad->v_scale[c] += dvc[c];
            }
    } else {
        dK += dKp;
        dV += dVp;
    }
    rope_apply(dQ, w.head_dim, w.theta, -1.0);
    rope_apply(dK, w.head_dim, w.theta, -1.0);
    if (want_w) {
        dW[0] = dQ.transpose() * t.xn1;
        dW[1] = dK.transpose() * t.xn1;
        dW[2] = dV.transpose() * t.xn1;
    }
    const Mat dxn1 = dQ * t.Wq[0] + dK * t.Wq[1] + dV * t.Wq[2];
    dX += rmsnorm_bwd(t.X, w.rms_att, t.r1, dxn1);
    if (want_w)
        for (int i = 0; i < wq::kBlockLinears; ++i)
            fake_quant_weight_backward(w.W[i], q.w_group, p->a[i], p->b[i], t.wtape[i], dW[i], grad->a[i], grad->b[i]);
    return dX;
}

}  // namespace kvq::calib
