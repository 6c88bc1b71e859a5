// Reverse pass through one Llama block (kvq/calibration/block_grad.hpp) against central finite
// differences in float64, per component and for the whole block. Quantizers are differentiated
// through their recorded ("frozen") surrogate, whose exact gradient is the STE gradient (see the
// header); the tests also check that the surrogate equals the real quantizer where it was recorded.
//
// Accuracy: central differences with step 1e-6 on losses of magnitude <= 1e2 have rounding error
// ~1e-16 * 1e2 / 1e-6 = 1e-8 and truncation error ~1e-12, so every analytic gradient must agree
// with its finite difference to a relative error (over the whole gradient vector) below 1e-6.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "kvq/calibration/block_grad.hpp"

namespace {

using kvq::calib::Mat;

constexpr double kStep = 1e-6;
constexpr double kRelTol = 1e-6;

Mat randn(int r, int c, std::mt19937_64& rng, double sigma = 1.0) {
    std::normal_distribution<double> nd(0, sigma);
    Mat m(r, c);
    for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = nd(rng);
    return m;
}

// Central difference of f at every coordinate of x (x restored afterwards).
std::vector<double> numeric_grad(std::vector<double>& x, const std::function<double()>& f) {
    std::vector<double> g(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
        const double x0 = x[i];
        x[i] = x0 + kStep;
        const double fp = f();
        x[i] = x0 - kStep;
        const double fm = f();
        x[i] = x0;
        g[i] = (fp - fm) / (2 * kStep);
    }
    return g;
}
std::vector<double> numeric_grad(Mat& X, const std::function<double()>& f) {
    std::vector<double> x(X.data(), X.data() + X.size());
    return numeric_grad(x, [&] {
        std::copy(x.begin(), x.end(), X.data());
        return f();
    });
}
double rel_err(const std::vector<double>& num, const std::vector<double>& ana) {
    double n = 0, d = 0;
    for (std::size_t i = 0; i < num.size(); ++i) {
        n += (num[i] - ana[i]) * (num[i] - ana[i]);
        d += num[i] * num[i];
    }
    return std::sqrt(n / std::max(d, 1e-300));
}
std::vector<double> flat(const Mat& m) { return {m.data(), m.data() + m.size()}; }
double dot(const Mat& a, const Mat& b) { return a.cwiseProduct(b).sum(); }

TEST(BlockGrad, WeightFakeQuantMatchesFiniteDifferences) {
    std::mt19937_64 rng(1);
    const int rows = 5, cols = 20, group = 8;  // 3 groups per row, the last one 4 wide
    const Mat W = randn(rows, cols, rng, 0.1), G = randn(rows, cols, rng);
    std::uniform_real_distribution<double> u(-1, 5);
    std::vector<double> a(rows * 3), b(rows * 3);
    for (auto& x : a) x = u(rng);
    for (auto& x : b) x = u(rng);
    kvq::calib::WeightQuantTape t;
    const Mat real = kvq::calib::fake_quant_weight(W, group, a, b, t, false);
    int clamped = 0;
    for (auto c : t.clamp) clamped += c >= 0;
    EXPECT_GT(clamped, 5);  // gamma, beta < 1 clip the extremes: both branches are exercised
    // The surrogate equals the real quantizer where it was recorded.
    kvq::calib::WeightQuantTape t2 = t;
    EXPECT_LT((kvq::calib::fake_quant_weight(W, group, a, b, t2, true) - real).cwiseAbs().maxCoeff(), 1e-15);
    // ... and real values are on the grid: W^ / h + z is an integer in [0, 15].
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) {
            const std::size_t gi = std::size_t(r) * 3 + c / group;
            const double z = t.rho_z[gi] - kvq::wq::sigmoid(b[gi]) * t.wmin[gi] / t.h[gi];
            const double code = real(r, c) / t.h[gi] + z;
            EXPECT_NEAR(code, std::nearbyint(code), 1e-9);
            EXPECT_GE(code, -1e-9);
            EXPECT_LE(code, 15 + 1e-9);
        }
    std::vector<double> da, db;
    kvq::calib::fake_quant_weight_backward(W, group, a, b, t, G, da, db);
    const auto loss = [&] { return dot(kvq::calib::fake_quant_weight(W, group, a, b, t2, true), G); };
    EXPECT_LT(rel_err(numeric_grad(a, loss), da), kRelTol);
    EXPECT_LT(rel_err(numeric_grad(b, loss), db), kRelTol);
}

TEST(BlockGrad, KvFakeQuantMatchesFiniteDifferences) {
    std::mt19937_64 rng(2);
    const int T = 6, C = 8, group = 4, bits = 4;
    Mat X = randn(T, C, rng);
    const Mat G = randn(T, C, rng);
    std::vector<double> shift(C), scale(C);
    std::uniform_real_distribution<double> u(0.5, 2.0);
    for (int c = 0; c < C; ++c) shift[c] = 0.3 * u(rng) - 0.4, scale[c] = u(rng);
    kvq::calib::KvQuantTape t;
    const Mat real = kvq::calib::fake_quant_kv(X, shift, scale, bits, group, t, false);
    // Real: each smoothed group lies on its 16-level grid.
    for (int i = 0; i < T; ++i)
        for (int g = 0; g < 2; ++g) {
            double lo = 1e9, hi = -1e9;
            for (int c = g * 4; c < g * 4 + 4; ++c) {
                const double xt = (X(i, c) - shift[c]) / scale[c];
                lo = std::min(lo, xt), hi = std::max(hi, xt);
            }
            for (int c = g * 4; c < g * 4 + 4; ++c) {
                const double k = ((real(i, c) - shift[c]) / scale[c] - lo) / ((hi - lo) / 15);
                EXPECT_NEAR(k, std::nearbyint(k), 1e-9);
            }
        }
    kvq::calib::KvQuantTape t2 = t;
    EXPECT_LT((kvq::calib::fake_quant_kv(X, shift, scale, bits, group, t2, true) - real).cwiseAbs().maxCoeff(), 1e-14);
    Mat dX = Mat::Zero(T, C);
    std::vector<double> dsh(C, 0.0), dsc(C, 0.0);
    kvq::calib::fake_quant_kv_backward(X, shift, scale, bits, group, t, G, dX, dsh, dsc);
    const auto loss = [&] { return dot(kvq::calib::fake_quant_kv(X, shift, scale, bits, group, t2, true), G); };
    EXPECT_LT(rel_err(numeric_grad(shift, loss), dsh), kRelTol);
    EXPECT_LT(rel_err(numeric_grad(scale, loss), dsc), kRelTol);
    EXPECT_LT(rel_err(numeric_grad(X, loss), flat(dX)), kRelTol);
}

TEST(BlockGrad, RmsNormRopeSwigluMatchFiniteDifferences) {
    std::mt19937_64 rng(3);
    Mat X = randn(5, 12, rng);
    const Mat G = randn(5, 12, rng);
    Eigen::VectorXd g = Eigen::VectorXd::Random(12).array() + 1.5;
    std::vector<double> r;
    kvq::calib::rmsnorm_fwd(X, g, 1e-5, r);
    const Mat dX = kvq::calib::rmsnorm_bwd(X, g, r, G);
    EXPECT_LT(rel_err(numeric_grad(X, [&] { return dot(kvq::calib::rmsnorm_fwd(X, g, 1e-5, r), G); }), flat(dX)),
              kRelTol);
    // RoPE: a rotation per position; backward = the inverse rotation.
    const auto rope = [&] {
        Mat Y = X;
        kvq::calib::rope_apply(Y, 4, 10000.0);
        return dot(Y, G);
    };
    Mat dR = G;
    kvq::calib::rope_apply(dR, 4, 10000.0, -1.0);
    EXPECT_LT(rel_err(numeric_grad(X, rope), flat(dR)), kRelTol);
    Mat B = randn(5, 12, rng), dA, dB;
    kvq::calib::swiglu_bwd(X, B, G, dA, dB);
    const auto sw = [&] { return dot(kvq::calib::swiglu_fwd(X, B), G); };
    EXPECT_LT(rel_err(numeric_grad(X, sw), flat(dA)), kRelTol);
    EXPECT_LT(rel_err(numeric_grad(B, sw), flat(dB)), kRelTol);
}

TEST(BlockGrad, PastOnlyAttentionMatchesFiniteDifferences) {
    std::mt19937_64 rng(4);
    const int T = 6, H = 4, Hkv = 2, d = 4;
    Mat Q = randn(T, H * d, rng), K = randn(T, Hkv * d, rng), V = randn(T, Hkv * d, rng);
    Mat Kp = randn(T, Hkv * d, rng), Vp = randn(T, Hkv * d, rng);  // a "quantized" past unlike K, V
    const Mat G = randn(T, H * d, rng);
    std::vector<double> P;
    kvq::calib::attention_fwd(Q, K, V, Kp, Vp, H, Hkv, d, P);
    Mat dQ, dK, dV, dKp, dVp;
    kvq::calib::attention_bwd(Q, K, V, Kp, Vp, H, Hkv, d, P, G, dQ, dK, dV, dKp, dVp);
    const auto loss = [&] { return dot(kvq::calib::attention_fwd(Q, K, V, Kp, Vp, H, Hkv, d, P), G); };
    EXPECT_LT(rel_err(numeric_grad(Q, loss), flat(dQ)), kRelTol);
    EXPECT_LT(rel_err(numeric_grad(K, loss), flat(dK)), kRelTol);
    EXPECT_LT(rel_err(numeric_grad(V, loss), flat(dV)), kRelTol);
    EXPECT_LT(rel_err(numeric_grad(Kp, loss), flat(dKp)), kRelTol);
    EXPECT_LT(rel_err(numeric_grad(Vp, loss), flat(dVp)), kRelTol);
    // Past-only: the exact K, V only enter at j = i (the diagonal), the cached past never at j = i;
    // the last token's cached entry is never read.
    EXPECT_EQ(dKp.row(T - 1).cwiseAbs().maxCoeff(), 0.0);
    EXPECT_EQ(dVp.row(T - 1).cwiseAbs().maxCoeff(), 0.0);
    // (K_0 is only seen by query 0, whose softmax over one key has no gradient; K_2 is seen by query 2.)
    EXPECT_GT(dK.row(2).cwiseAbs().maxCoeff(), 0.0);
}

// A random block: dim 16, 4 heads of 4 (2 KV heads), hidden 24; weight groups of 8 (w2: 3 groups).
struct RandomBlock {
    kvq::calib::BlockWeights w;
    explicit RandomBlock(std::mt19937_64& rng) {
        w.dim = 16, w.hidden = 24, w.n_heads = 4, w.n_kv_heads = 2, w.head_dim = 4;
        w.rms_att = Eigen::VectorXd::Random(16).array() * 0.3 + 1.0;
        w.rms_ffn = Eigen::VectorXd::Random(16).array() * 0.3 + 1.0;
        const int shapes[7][2] = {{16, 16}, {8, 16}, {8, 16}, {16, 16}, {24, 16}, {16, 24}, {24, 16}};
        for (int i = 0; i < 7; ++i) w.W[i] = randn(shapes[i][0], shapes[i][1], rng, 0.35);
    }
};

TEST(BlockGrad, WholeQuantizedBlockMatchesFiniteDifferences) {
    std::mt19937_64 rng(5);
    RandomBlock rb(rng);
    const int T = 7;
    Mat X = randn(T, 16, rng);
    const Mat G = randn(T, 16, rng);
    kvq::calib::BlockQuant q;
    q.weights = true, q.w_group = 8, q.kv = true, q.kv_bits = 4;
    kvq::calib::BlockParams p = kvq::calib::BlockParams::init(rb.w, 8);
    std::uniform_real_distribution<double> u(-1, 5), us(0.5, 2.0);
    for (auto* v : p.all())
        for (double& x : *v) x = u(rng);
    for (int c = 0; c < 8; ++c) {
        p.k_shift[c] = 0.2 * us(rng) - 0.3, p.v_shift[c] = 0.2 * us(rng) - 0.3;
        p.k_scale[c] = us(rng), p.v_scale[c] = us(rng);
    }
    kvq::calib::BlockTape t;
    const Mat Y = kvq::calib::block_forward(rb.w, &p, q, X, t);
    kvq::calib::BlockParams grad = p.zeros_like();
    const Mat dX = kvq::calib::block_backward(rb.w, &p, q, t, G, &grad);
    kvq::calib::BlockTape tf = t;  // frozen records for the finite differences
    EXPECT_LT((kvq::calib::block_forward(rb.w, &p, q, X, tf, true) - Y).cwiseAbs().maxCoeff(), 1e-13);
    const auto loss = [&] { return dot(kvq::calib::block_forward(rb.w, &p, q, X, tf, true), G); };
    auto all = p.all(), gall = grad.all();
    const char* names[] = {"a_wq", "a_wk", "a_wv", "a_wo", "a_w1", "a_w2",    "a_w3",    "b_wq",    "b_wk",
                           "b_wv", "b_wo", "b_w1", "b_w2", "b_w3", "k_shift", "k_scale", "v_shift", "v_scale"};
    for (std::size_t i = 0; i < all.size(); ++i) {
        const std::vector<double> num = numeric_grad(*all[i], loss);
        EXPECT_LT(rel_err(num, *gall[i]), kRelTol) << names[i];
        double mx = 0;
        for (double x : num) mx = std::max(mx, std::fabs(x));
        EXPECT_GT(mx, 1e-4) << names[i] << ": the parameter does not reach the loss";
    }
    EXPECT_LT(rel_err(numeric_grad(X, loss), flat(dX)), kRelTol);
}

TEST(BlockGrad, FullPrecisionBlockInputGradient) {
    std::mt19937_64 rng(6);
    RandomBlock rb(rng);
    Mat X = randn(5, 16, rng);
    const Mat G = randn(5, 16, rng);
    kvq::calib::BlockTape t;
    kvq::calib::block_forward(rb.w, nullptr, {}, X, t);
    const Mat dX = kvq::calib::block_backward(rb.w, nullptr, {}, t, G, nullptr);
    const auto loss = [&] { return dot(kvq::calib::block_forward(rb.w, nullptr, {}, X, t), G); };
    EXPECT_LT(rel_err(numeric_grad(X, loss), flat(dX)), kRelTol);
}

}  // namespace
