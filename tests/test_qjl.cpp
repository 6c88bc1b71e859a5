// Statistical tests of the QJL estimator. Every tolerance is derived from the theory and stated:
// for Gaussian S each of the m terms is independent, so
//   E[est] = <q,k>,  Var[est] = ((pi/2) ||q||^2 ||k||^2 - <q,k>^2) / m.
// The stored norm is fp16, so the oracle mean is <q,k> * fp16(||k||) / ||k|| (a relative shift
// below 2^-11, applied exactly rather than absorbed into the tolerance).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "kvq/kvq.hpp"
#include "test_util.hpp"

namespace {
using kvq::test::dot64;
using kvq::test::norm64;

constexpr double kHalfPi = 1.57079632679489661923;

struct Sample {
    double mean = 0, var = 0, m4 = 0;
    int n = 0;
};

Sample moments(const std::vector<double>& x) {
    Sample s;
    s.n = static_cast<int>(x.size());
    for (double v : x) s.mean += v;
    s.mean /= s.n;
    for (double v : x) {
        s.var += (v - s.mean) * (v - s.mean);
        s.m4 += std::pow(v - s.mean, 4);
    }
    s.var /= s.n - 1;
    s.m4 /= s.n;
    return s;
}

// Scores of q against token `tok` of a block holding keys [n][d], one codec per trial seed.
std::vector<double> estimates(kvq::QjlParams p, const std::vector<float>& keys, int n_keys, int tok,
                              const std::vector<float>& q, int trials) {
    std::vector<double> est(trials);
    for (int t = 0; t < trials; ++t) {
        p.seed = 1000 + t;
        kvq::QjlKeyCodec c(p);
        const int B = 32;
        std::vector<std::uint8_t> block(c.layout(B).bytes());
        c.encode(keys.data(), n_keys, block.data(), B, 0);
        kvq::PreparedQuery pq;
        c.prepare(q.data(), pq);
        float s;
        c.score(pq, block.data(), B, tok, 1, &s);
        est[t] = s;
    }
    return est;
}

double half_ratio(double norm) { return norm == 0 ? 1.0 : kvq::round_to_half(float(norm)) / norm; }

TEST(QjlEstimator, UnbiasedWithTheoreticalVarianceForGaussianSketches) {
    const int d = 64, m = 64, trials = 4000;
    std::mt19937_64 rng(11);
    auto q = kvq::test::normal_vector(d, rng), k = kvq::test::normal_vector(d, rng);
    for (int c = 0; c < d; ++c) k[c] += 0.8f * q[c];  // a correlated pair: <q,k> far from 0
    kvq::QjlParams p{d, m, 32, 0, kvq::SketchKind::Gaussian, 0};
    const Sample s = moments(estimates(p, k, 1, 0, q, trials));
    const double ip = dot64(q.data(), k.data(), d), nq = norm64(q.data(), d), nk = norm64(k.data(), d);
    const double var = (kHalfPi * nq * nq * nk * nk - ip * ip) / m;
    const double mean = ip * half_ratio(nk);
    // Mean within 5 standard errors of the oracle.
    EXPECT_NEAR(s.mean, mean, 5 * std::sqrt(var / trials)) << "ip " << ip;
    // Sample variance within 5 standard errors; SE of a variance = sqrt((m4 - var^2) / n).
    const double var_theory = var * half_ratio(nk) * half_ratio(nk);
    EXPECT_NEAR(s.var, var_theory, 5 * std::sqrt((s.m4 - s.var * s.var) / trials));
    std::printf("  QJL m=%d: mean %.4f vs <q,k> %.4f; var %.4f vs theory %.4f\n", m, s.mean, ip, s.var, var_theory);
}

TEST(QjlEstimator, UnbiasedWithOutlierChannels) {
    const int d = 64, trials = 3000, n = 32;
    std::mt19937_64 rng(12);
    auto keys = kvq::test::normal_vector(std::size_t(n) * d, rng);
    for (int t = 0; t < n; ++t)
        for (int c : {3, 17, 40}) keys[t * d + c] *= 12.0f;  // three outlier channels
    auto q = kvq::test::normal_vector(d, rng);
    for (int c = 0; c < d; ++c) q[c] += 0.3f * keys[c];
    kvq::QjlParams p{d, 64, 64, 4, kvq::SketchKind::Gaussian, 0};
    const Sample s = moments(estimates(p, keys, n, 0, q, trials));
    // Oracle: the codec picks the 4 highest-energy channels; split q, k accordingly.
    std::vector<double> energy(d);
    for (int t = 0; t < n; ++t)
        for (int c = 0; c < d; ++c) energy[c] += double(keys[t * d + c]) * keys[t * d + c];
    std::vector<int> idx(d);
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + 4, idx.end(), [&](int a, int b) { return energy[a] > energy[b]; });
    std::vector<bool> out(d);
    for (int i = 0; i < 4; ++i) out[idx[i]] = true;
    double ip_i = 0, ip_o = 0, nk_i = 0, nk_o = 0, nq_i = 0, nq_o = 0;
    for (int c = 0; c < d; ++c) {
        const double pr = double(q[c]) * keys[c];
        (out[c] ? ip_o : ip_i) += pr;
        (out[c] ? nk_o : nk_i) += double(keys[c]) * keys[c];
        (out[c] ? nq_o : nq_i) += double(q[c]) * q[c];
    }
    nk_i = std::sqrt(nk_i);
    nk_o = std::sqrt(nk_o);
    // The two terms share sketch rows, so they are not independent: bound the variance by Cauchy-Schwarz,
    // Var[a+b] <= (sd_a + sd_b)^2.
    const double var_i = (kHalfPi * nq_i * nk_i * nk_i - ip_i * ip_i) / 64,
                 var_o = (kHalfPi * nq_o * nk_o * nk_o - ip_o * ip_o) / 64;
    const double sd = std::sqrt(var_i) + std::sqrt(var_o);
    const double mean = ip_i * half_ratio(nk_i) + ip_o * half_ratio(nk_o);
    EXPECT_NEAR(s.mean, mean, 5 * sd / std::sqrt(double(trials)));
    EXPECT_LE(s.var, sd * sd * 1.2);  // 1.2: five standard errors of a 3000-sample variance (~2.6% each)
}

// Scores of many independent random (q, k) pairs under `sketches` seeds. Gaussian and Haar-orthogonal
// sketches are rotation invariant, so for isotropic pairs the error over (S, pair) has the same law
// as over S for a fixed pair; sharing one sketch among 100 pairs keeps the test fast.
struct PairErrors {
    std::vector<double> err, bound_scale, sd;  // est - <q,k>; ||q|| ||k||; theoretical Gaussian sd
};
PairErrors pair_errors(kvq::SketchKind kind, int d, int m, int sketches, int pairs, std::uint64_t seed, float corr) {
    PairErrors r;
    std::mt19937_64 rng(seed);
    for (int s = 0; s < sketches; ++s) {
        kvq::QjlKeyCodec c(kvq::QjlParams{d, m, 32, 0, kind, seed * 1000 + s});
        std::vector<std::uint8_t> block(c.layout(1).bytes());
        kvq::PreparedQuery pq;
        for (int i = 0; i < pairs; ++i) {
            auto q = kvq::test::normal_vector(d, rng), k = kvq::test::normal_vector(d, rng);
            for (int ch = 0; ch < d; ++ch) k[ch] += corr * q[ch];
            c.encode(k.data(), 1, block.data(), 1, 0);
            c.prepare(q.data(), pq);
            float est;
            c.score(pq, block.data(), 1, 0, 1, &est);
            const double ip = dot64(q.data(), k.data(), d), nq = norm64(q.data(), d), nk = norm64(k.data(), d);
            r.err.push_back(est - ip);
            r.bound_scale.push_back(nq * nk);
            r.sd.push_back(std::sqrt((kHalfPi * nq * nq * nk * nk - ip * ip) / m));
        }
    }
    return r;
}

TEST(QjlEstimator, BlockOrthogonalNoWorseThanGaussian) {
    const int d = 64;
    for (int m : {64, 128, 256}) {
        double mse[2], se[2];
        for (int kind = 0; kind < 2; ++kind) {
            const auto r = pair_errors(kind ? kvq::SketchKind::BlockOrthogonal : kvq::SketchKind::Gaussian, d, m, 30,
                                       100, 13, 0.5f);
            std::vector<double> sq;
            for (double e : r.err) sq.push_back(e * e);
            const Sample s = moments(sq);
            mse[kind] = s.mean;
            se[kind] = std::sqrt(s.var / s.n);
        }
        std::printf("  m=%d d=%d: MSE gaussian %.4f, block-orthogonal %.4f\n", m, d, mse[0], mse[1]);
        // "No worse": orthogonal MSE below Gaussian MSE plus 5 combined standard errors.
        EXPECT_LE(mse[1], mse[0] + 5 * std::hypot(se[0], se[1])) << "m " << m;
    }
}

// Paper (Lemma 3.5): |est - <q,k>| <= eps ||q|| ||k|| w.p. >= 1 - delta when
// m >= (4/3)(1 + eps) eps^-2 log(2/delta). Measured finding: for Gaussian S this constant is a few
// percent too small. At m = 256, delta = 0.05 the bound gives eps = 0.1486, but est is a sum of m
// i.i.d. terms with sd ~ sqrt(pi/2 / m) ||q|| ||k|| = 0.078 ||q|| ||k||, so by the CLT about 5.8% of
// draws exceed eps (not <= 5%). The test therefore checks (a) the Gaussian failure rate equals the
// CLT prediction (the estimator's law is right), (b) the paper's bound holds once eps is raised by
// 10%, and (c) block-orthogonal sketches satisfy the paper's bound as stated.
TEST(QjlEstimator, DistortionBoundHoldsAtStatedProbability) {
    const int d = 128, m = 256;
    const double delta = 0.05, L = 4.0 / 3.0 * std::log(2 / delta);
    const double eps = (L + std::sqrt(L * L + 4 * m * L)) / (2 * m);  // smallest eps the bound allows
    for (int kind = 0; kind < 2; ++kind) {
        const auto r = pair_errors(kind ? kvq::SketchKind::BlockOrthogonal : kvq::SketchKind::Gaussian, d, m, 20, 100,
                                   14 + kind, 0.0f);  // independent pairs: <q,k> ~ 0, the worst case
        const int n = static_cast<int>(r.err.size());
        int fail = 0, fail_wide = 0;
        double predicted = 0;
        for (int i = 0; i < n; ++i) {
            fail += std::fabs(r.err[i]) > eps * r.bound_scale[i];
            fail_wide += std::fabs(r.err[i]) > 1.1 * eps * r.bound_scale[i];
            predicted += std::erfc(eps * r.bound_scale[i] / r.sd[i] / std::sqrt(2.0));  // two-sided normal tail
        }
        predicted /= n;
        const double se = std::sqrt(n * delta * (1 - delta));  // binomial standard error at rate delta
        std::printf("  %s: eps %.4f, %d of %d outside (CLT predicts %.1f), %d outside 1.1 eps\n",
                    kind ? "orthogonal" : "gaussian", eps, fail, n, predicted * n, fail_wide);
        if (kind == 0) {
            EXPECT_NEAR(fail, predicted * n, 4 * std::sqrt(n * predicted * (1 - predicted)));
            EXPECT_LE(fail_wide, n * delta + 4 * se);
        } else {
            EXPECT_LE(fail, n * delta + 4 * se);
        }
    }
}

TEST(QjlCodec, SignBitsAreSignsOfTheProjection) {
    const int d = 128;
    std::mt19937_64 rng(15);
    auto keys = kvq::test::normal_vector(64 * d, rng);
    kvq::QjlParams p{d, 256, 128, 8, kvq::SketchKind::BlockOrthogonal, 99};
    kvq::QjlKeyCodec c(p);
    const auto L = c.layout(64);
    std::vector<std::uint8_t> block(L.bytes());
    c.encode(keys.data(), 64, block.data(), 64, 0);
    const auto& S = c.sketch();
    int checked = 0;
    for (int t = 0; t < 64; ++t) {
        const std::uint8_t* ids = block.data() + L.block_side_offset() + (t / 32) * 8;
        std::vector<float> kin(keys.begin() + t * d, keys.begin() + (t + 1) * d);
        for (int i = 0; i < 8; ++i) kin[ids[i]] = 0;
        for (int j = 0; j < 256; ++j) {
            const double pr = dot64(&S[j * d], kin.data(), d);
            if (std::fabs(pr) < 1e-4) continue;  // within float rounding of zero
            ASSERT_EQ(kvq::get_sign_bit(block.data() + t * L.code_bytes, j), pr > 0 ? 1 : 0) << t << " " << j;
            ++checked;
        }
        EXPECT_NEAR(kvq::half_to_float(reinterpret_cast<const kvq::half_t*>(block.data() + L.token_side_offset())[t]),
                    norm64(kin.data(), d), 2e-3 * norm64(kin.data(), d));  // fp16: relative 2^-11
    }
    EXPECT_GT(checked, 64 * 250);
}

TEST(QjlCodec, SameSeedSameBytesDifferentSeedDifferentBytes) {
    const int d = 64;
    std::mt19937_64 rng(16);
    auto keys = kvq::test::normal_vector(32 * d, rng);
    auto encode = [&](std::uint64_t seed) {
        kvq::QjlKeyCodec c(kvq::QjlParams{d, 128, 64, 4, kvq::SketchKind::BlockOrthogonal, seed});
        std::vector<std::uint8_t> b(c.layout(32).bytes());
        c.encode(keys.data(), 32, b.data(), 32, 0);
        return b;
    };
    EXPECT_EQ(encode(5), encode(5));
    EXPECT_NE(encode(5), encode(6));
}

TEST(QjlCodec, ZeroKeysAndNoOutliersNeverGiveNaN) {
    const int d = 64;
    for (int outliers : {0, 4}) {
        kvq::QjlKeyCodec c(kvq::QjlParams{d, 64, 64, outliers, kvq::SketchKind::BlockOrthogonal, 1});
        std::vector<float> keys(32 * d, 0.0f);
        for (int c2 = 0; c2 < 4; ++c2) keys[5 * d + c2] = 3.0f;  // token 5: all energy in 4 channels
        std::vector<std::uint8_t> b(c.layout(32).bytes());
        c.encode(keys.data(), 32, b.data(), 32, 0);
        std::mt19937_64 rng(17);
        auto q = kvq::test::normal_vector(d, rng);
        kvq::PreparedQuery pq;
        c.prepare(q.data(), pq);
        float s[32];
        c.score(pq, b.data(), 32, 0, 32, s);
        for (int t = 0; t < 32; ++t) {
            ASSERT_TRUE(std::isfinite(s[t])) << "outliers " << outliers << " token " << t;
            if (t != 5) {
                EXPECT_EQ(s[t], 0.0f);
            }
        }
    }
}

TEST(QjlCodec, RejectsBadParametersAndInput) {
    EXPECT_THROW(kvq::QjlKeyCodec(kvq::QjlParams{128, 100, 64, 0}), kvq::Error);   // m % 32
    EXPECT_THROW(kvq::QjlKeyCodec(kvq::QjlParams{128, 32, 64, 0}), kvq::Error);    // m < 64
    EXPECT_THROW(kvq::QjlKeyCodec(kvq::QjlParams{128, 2048, 64, 0}), kvq::Error);  // m > 1024
    EXPECT_THROW(kvq::QjlKeyCodec(kvq::QjlParams{128, 256, 64, 17}), kvq::Error);  // outliers > 16
    EXPECT_THROW(kvq::QjlKeyCodec(kvq::QjlParams{100, 256, 64, 8}), kvq::Error);   // d % 8
    EXPECT_THROW(kvq::QjlKeyCodec(kvq::QjlParams{512, 256, 64, 8}), kvq::Error);   // d > 256
    kvq::QjlKeyCodec c(kvq::QjlParams{64, 64, 64, 8});
    EXPECT_THROW(c.layout(16), kvq::Error);  // outlier groups of 32 do not fit a 16-token block
    std::vector<float> k(64, 1.0f);
    k[7] = NAN;
    EXPECT_THROW(c.validate(k.data(), 1), kvq::Error);
    k[7] = 1e5f;  // norm beyond fp16
    EXPECT_THROW(c.validate(k.data(), 1), kvq::Error);
}

}  // namespace
