// KV calibration: the statistics initialisation, the hand-written STE gradient of the opt objective
// against finite differences, the versioned parameter file, and bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>

#include "kvq/calibration/kv_calibration.hpp"
#include "kvq/io/kv_params_file.hpp"
#include "test_util.hpp"

namespace {
kvq::calib::KvCalibData small_data(int T, int H, int Hq, int d, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    kvq::calib::KvCalibData D;
    D.n_kv_heads = H;
    D.n_q_heads = Hq;
    D.head_dim = d;
    D.tokens = T;
    D.k = kvq::test::normal_vector(std::size_t(T) * H * d, rng);
    D.v = kvq::test::normal_vector(std::size_t(T) * H * d, rng);
    D.q = kvq::test::normal_vector(std::size_t(T) * Hq * d, rng, 0.7f);
    for (int t = 0; t < T; ++t)
        for (int c = 0; c < H * d; ++c) {
            D.k[std::size_t(t) * H * d + c] =
                D.k[std::size_t(t) * H * d + c] * (c % 5 == 1 ? 6.0f : 1.0f) + 0.3f * (c % 7);
            D.v[std::size_t(t) * H * d + c] += 0.2f * (c % 3);
        }
    return D;
}
}  // namespace

TEST(Calibration, StatsAreMidRangeAndNormalisedHalfRange) {
    kvq::calib::KvCalibData D;
    D.n_kv_heads = 1;
    D.head_dim = 4;
    D.tokens = 3;
    // channel ranges [0, 2], [-4, 4], [1, 1] (constant), [10, 14]
    D.k = {0, -4, 1, 10, 2, 4, 1, 12, 1, 0, 1, 14};
    D.v = D.k;
    const kvq::WkvLayerParams p = kvq::calib::calibrate_stats(D);
    const float half[4] = {1, 4, 0, 2};
    const float mean = (1 + 4 + 0 + 2) / 4.0f;
    const float expect_shift[4] = {1, 0, 1, 12};
    for (int c = 0; c < 4; ++c) {
        EXPECT_FLOAT_EQ(p.k_shift[c], expect_shift[c]);
        EXPECT_NEAR(p.k_scale[c], std::max(half[c], 1e-3f * mean) / mean, 1e-6);
    }
    double m = 0;
    for (float s : p.k_scale) m += s;
    EXPECT_NEAR(m / 4, 1.0, 1e-3);  // mean 1 (up to the floor of the constant channel)
}

// The STE gradient is the exact gradient of the surrogate X^ = X + s (.) r Delta(x~) with r frozen:
// compare with central finite differences of that surrogate.
TEST(Calibration, SteGradientMatchesFiniteDifferences) {
    const kvq::calib::KvCalibData D = small_data(40, 2, 4, 16, 5);
    kvq::WkvLayerParams P = kvq::calib::calibrate_stats(D);
    std::mt19937_64 rng(9);
    std::uniform_real_distribution<float> u(-0.2f, 0.2f);
    for (auto* v : {&P.k_shift, &P.v_shift})
        for (float& x : *v) x += u(rng);
    for (auto* v : {&P.k_scale, &P.v_scale})
        for (float& x : *v) x *= std::exp(u(rng));
    const kvq::calib::detail::Objective obj(D, 3, 8, 12);
    std::vector<float> rk, rv;
    kvq::WkvLayerParams g;
    obj.evaluate(P, nullptr, nullptr, nullptr, &rk, &rv);
    const double base = obj.evaluate(P, &g, &rk, &rv);
    EXPECT_GT(base, 0);
    int checked = 0;
    double worst = 0;
    for (int which = 0; which < 4; ++which) {
        std::vector<float>& prm = which == 0 ? P.k_shift : which == 1 ? P.k_scale : which == 2 ? P.v_shift : P.v_scale;
        const std::vector<float>& gr = which == 0   ? g.k_shift
                                       : which == 1 ? g.k_scale
                                       : which == 2 ? g.v_shift
                                                    : g.v_scale;
        for (std::size_t c = 0; c < prm.size(); c += 3) {
            const float x0 = prm[c], h = 2e-3f * std::max(1.0f, std::fabs(x0));
            prm[c] = x0 + h;
            const double fp = obj.evaluate(P, nullptr, &rk, &rv);
            prm[c] = x0 - h;
            const double fm = obj.evaluate(P, nullptr, &rk, &rv);
            prm[c] = x0;
            const double fd = (fp - fm) / (double(x0 + h) - double(x0 - h));
            const double err = std::fabs(fd - gr[c]) / (std::fabs(fd) + std::fabs(gr[c]) + 1e-4);
            worst = std::max(worst, err);
            EXPECT_LT(err, 0.05) << "param " << which << " channel " << c << ": fd " << fd << " analytic " << gr[c];
            ++checked;
        }
    }
    std::printf("[ calib ] STE gradient vs finite differences: %d coordinates, worst relative mismatch %.3g\n", checked,
                worst);
}

TEST(Calibration, OptNeverWorseThanStatsOnCalibrationData) {
    const kvq::calib::KvCalibData D = small_data(64, 1, 2, 32, 6);
    const kvq::WkvLayerParams s = kvq::calib::calibrate_stats(D);
    kvq::calib::OptOptions oo;
    oo.iterations = 15;
    kvq::calib::OptReport rep;
    const kvq::WkvLayerParams o = kvq::calib::calibrate_opt(D, s, oo, &rep);
    EXPECT_LE(rep.best_loss, rep.initial_loss);
    EXPECT_EQ(rep.history.size(), 16u);
    const kvq::calib::detail::Objective obj(D, 4, 0, oo.queries_per_head);
    EXPECT_NEAR(obj.evaluate(o, nullptr), rep.best_loss, 1e-9);
    const kvq::WkvParams all = kvq::calib::calibrate({D, D}, kvq::calib::CalibMode::Stats);
    EXPECT_EQ(all.n_layers, 2);
    EXPECT_EQ(all.layers[1].k_shift, s.k_shift);
}

TEST(Calibration, ParameterFileRoundTripAndBadFiles) {
    const kvq::calib::KvCalibData D = small_data(16, 2, 2, 8, 7);
    kvq::WkvParams P = kvq::calib::calibrate({D, D, D}, kvq::calib::CalibMode::Stats);
    const std::string path = ::testing::TempDir() + "kvq_test_params.kvqp";
    kvq::io::save_wkv_params(path, P);
    const kvq::WkvParams Q = kvq::io::load_wkv_params(path, 3, 2, 8);
    for (int l = 0; l < 3; ++l) {
        EXPECT_EQ(Q.layers[l].k_shift, P.layers[l].k_shift);
        EXPECT_EQ(Q.layers[l].v_scale, P.layers[l].v_scale);
    }
    // Another model's shape.
    EXPECT_THROW(kvq::io::load_wkv_params(path, 4, 2, 8), kvq::Error);
    EXPECT_THROW(kvq::io::load_wkv_params(path, 3, 2, 16), kvq::Error);
    std::vector<std::uint8_t> b = kvq::io::serialize_wkv_params(P);
    EXPECT_NO_THROW(kvq::io::parse_wkv_params(b.data(), b.size()));
    // Truncated at every length.
    for (std::size_t n = 0; n < b.size(); n += 7) EXPECT_THROW(kvq::io::parse_wkv_params(b.data(), n), kvq::Error);
    // A flipped byte (checksum), wrong magic, wrong version, trailing bytes.
    for (std::size_t at : {std::size_t(0), std::size_t(8), std::size_t(40), b.size() - 1}) {
        std::vector<std::uint8_t> c = b;
        c[at] ^= 0x10;
        EXPECT_THROW(kvq::io::parse_wkv_params(c.data(), c.size()), kvq::Error) << "byte " << at;
    }
    std::vector<std::uint8_t> longer = b;
    longer.push_back(0);
    EXPECT_THROW(kvq::io::parse_wkv_params(longer.data(), longer.size()), kvq::Error);
    // NaN parameters are refused on save, and on load even with a valid checksum.
    kvq::WkvParams bad = P;
    bad.layers[1].v_scale[3] = std::nanf("");
    EXPECT_THROW(kvq::io::serialize_wkv_params(bad), kvq::Error);
    {
        std::vector<std::uint8_t> c = b;
        const float nan = std::nanf("");
        std::memcpy(&c[24 + 4 * 5], &nan, 4);
        const std::uint64_t h = kvq::io::detail::fnv1a64(c.data(), c.size() - 8);
        for (int i = 0; i < 8; ++i) c[c.size() - 8 + i] = std::uint8_t(h >> (8 * i));
        EXPECT_THROW(kvq::io::parse_wkv_params(c.data(), c.size()), kvq::Error);
    }
    {
        std::ofstream f(path, std::ios::binary | std::ios::trunc);
        f.write(reinterpret_cast<const char*>(b.data()), 100);
    }
    EXPECT_THROW(kvq::io::load_wkv_params(path), kvq::Error);
    EXPECT_THROW(kvq::io::load_wkv_params(path + ".missing"), kvq::Error);
    std::remove(path.c_str());
}

TEST(Calibration, BadCalibrationDataThrows) {
    kvq::calib::KvCalibData D = small_data(16, 2, 4, 8, 8);
    EXPECT_NO_THROW(kvq::calib::calibrate_stats(D));
    kvq::calib::KvCalibData w = D;
    w.k.pop_back();  // wrong shape
    EXPECT_THROW(kvq::calib::calibrate_stats(w), kvq::Error);
    w = D;
    w.n_q_heads = 3;  // not a multiple of H_kv
    EXPECT_THROW(kvq::calib::calibrate_opt(w, kvq::calib::calibrate_stats(D)), kvq::Error);
    w = D;
    w.v[17] = std::nanf("");
    EXPECT_THROW(kvq::calib::calibrate_stats(w), kvq::Error);
    w = D;
    w.q[3] = INFINITY;
    EXPECT_THROW(kvq::calib::calibrate(std::vector<kvq::calib::KvCalibData>{w}, kvq::calib::CalibMode::Opt),
                 kvq::Error);
    w = D;
    w.head_dim = 16;  // layer shapes disagree
    w.tokens = 8;
    EXPECT_THROW(kvq::calib::calibrate({D, w}, kvq::calib::CalibMode::Stats), kvq::Error);
    // Initial parameters of another shape.
    kvq::WkvLayerParams p = kvq::calib::calibrate_stats(D);
    p.k_scale.pop_back();
    EXPECT_THROW(kvq::calib::calibrate_opt(D, p), kvq::Error);
}
