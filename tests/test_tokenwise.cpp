// Token-wise uniform codec against a float64 scalar reference of ALGORITHMS.md section 3.
// Thresholds per bit width: every decoded element is within step/2 of the input, where step is
// the stored fp16 step (plus float rounding of the decode arithmetic, 1e-6 relative to the range).
#include <gtest/gtest.h>

#include <random>

#include "kvq/kvq.hpp"
#include "test_util.hpp"

namespace {

TEST(Tokenwise, DecodeWithinHalfAStepOfTheInput) {
    std::mt19937_64 rng(21);
    for (int bits : {2, 3, 4, 8})
        for (int g : {8, 32, 128}) {
            const int d = 128, B = 16, n = 16;
            kvq::TokenwiseCodec c(kvq::TokenwiseParams{d, bits, g});
            auto x = kvq::test::normal_vector(std::size_t(n) * d, rng, 2.0f);
            std::vector<std::uint8_t> block(c.layout(B).bytes());
            c.encode(x.data(), n, block.data(), B, 0);
            std::vector<float> y(x.size());
            c.decode(block.data(), B, 0, n, y.data());
            const auto L = c.layout(B);
            const auto* steps = reinterpret_cast<const kvq::half_t*>(block.data() + L.token_side_offset());
            for (int t = 0; t < n; ++t)
                for (int i = 0; i < d; ++i) {
                    const double step = kvq::half_to_float(steps[t * (d / g) + i / g]);
                    double lo = 1e30, hi = -1e30;
                    for (int j = i / g * g; j < (i / g + 1) * g; ++j) {
                        lo = std::min<double>(lo, x[t * d + j]);
                        hi = std::max<double>(hi, x[t * d + j]);
                    }
                    // fp16 step and min are rounded: the top code may fall short of max by up to
                    // (2^b - 1) * |step - fp16(step)| + |min - fp16(min)|, each within 2^-11 relative.
                    const double slack = ((1 << bits) - 1) * step * 1e-3 + std::fabs(lo) * 1e-3 + (hi - lo) * 1e-6;
                    ASSERT_LE(std::fabs(y[t * d + i] - x[t * d + i]), step / 2 + slack)
                        << "bits " << bits << " g " << g << " t " << t << " i " << i;
                }
        }
}

TEST(Tokenwise, ConstantGroupDecodesExactly) {
    const int d = 64;
    kvq::TokenwiseCodec c(kvq::TokenwiseParams{d, 2, 32});
    std::vector<float> x(d, 0.375f);  // fp16-representable, so the stored minimum is exact
    for (int i = 32; i < 64; ++i) x[i] = -7.25f;
    std::vector<std::uint8_t> block(c.layout(1).bytes());
    c.encode(x.data(), 1, block.data(), 1, 0);
    std::vector<float> y(d);
    c.decode(block.data(), 1, 0, 1, y.data());
    EXPECT_EQ(x, y);
}

TEST(Tokenwise, ScoreAndAccumulateMatchTheDecodedVectors) {
    std::mt19937_64 rng(22);
    for (int bits : {2, 3, 4, 8}) {
        const int d = 128, B = 32;
        kvq::TokenwiseCodec c(kvq::TokenwiseParams{d, bits, 32});
        auto x = kvq::test::normal_vector(std::size_t(B) * d, rng);
        std::vector<std::uint8_t> block(c.layout(B).bytes());
        c.encode(x.data(), B, block.data(), B, 0);
        std::vector<float> y(x.size());
        c.decode(block.data(), B, 0, B, y.data());
        auto q = kvq::test::normal_vector(d, rng), w = kvq::test::normal_vector(B, rng);
        kvq::PreparedQuery pq;
        c.prepare(q.data(), pq);
        std::vector<float> s(B - 3), acc(d, 0.0f);
        c.score(pq, block.data(), B, 3, B - 3, s.data());  // an offset range, as partial blocks use
        c.accumulate(block.data(), B, 3, B - 3, w.data(), acc.data());
        for (int t = 3; t < B; ++t) {
            const double ref = kvq::test::dot64(q.data(), &y[t * d], d);
            // float accumulation over d = 128 terms: error <= d * eps * sum|q_i y_i|, bounded loosely by 1e-4 * ||q||
            // ||y||
            EXPECT_NEAR(s[t - 3], ref, 1e-4 * kvq::test::norm64(q.data(), d) * kvq::test::norm64(&y[t * d], d));
        }
        for (int i = 0; i < d; ++i) {
            double ref = 0, mag = 0;
            for (int t = 3; t < B; ++t) {
                ref += double(w[t - 3]) * y[t * d + i];
                mag += std::fabs(double(w[t - 3]) * y[t * d + i]);
            }
            EXPECT_NEAR(acc[i], ref, 1e-5 * mag + 1e-6);
        }
    }
}

TEST(Tokenwise, BitsPerElementCountsScalesAndMins) {
    // int4 g32, d 128: 64 code bytes + 4 groups x (2 + 2) bytes = 80 bytes per token = 5 bits.
    kvq::TokenwiseCodec c(kvq::TokenwiseParams{128, 4, 32});
    EXPECT_DOUBLE_EQ(c.bits_per_element(64), 5.0);
    kvq::TokenwiseCodec c2(kvq::TokenwiseParams{128, 2, 32});
    EXPECT_DOUBLE_EQ(c2.bits_per_element(64), 3.0);  // KIVI-2 G32's 3.0 bits
    // QJL m = 256, outliers 8 (m_o 256), d 128, B 64: (32 + 32) code bytes + 4 norm bytes per token
    // + 2 groups x 8 id bytes per block = (64 * 68 + 16) * 8 / (64 * 128) bits.
    kvq::QjlKeyCodec q(kvq::QjlParams{128, 256, 256, 8});
    EXPECT_DOUBLE_EQ(q.bits_per_element(64), (64.0 * 68 + 16) * 8 / (64 * 128));
}

TEST(Tokenwise, RejectsNonFiniteAndOutOfRangeInput) {
    kvq::TokenwiseCodec c(kvq::TokenwiseParams{64, 4, 32});
    std::vector<float> x(64, 1.0f);
    x[9] = INFINITY;
    EXPECT_THROW(c.validate(x.data(), 1), kvq::Error);
    x[9] = 40000.0f;  // max - min would overflow the fp16 step
    EXPECT_THROW(c.validate(x.data(), 1), kvq::Error);
}

// tokenwise_code_by_reciprocal (the GPU encode's fast path) against the division formula of
// tokenwise_quantize_group: wherever it answers (not -1) it must give the same code, for a
// correctly rounded reciprocal and for reciprocals 1 ulp off either way (hardware approximations).
int code_by_division(float u, float step, int levels) {
    const float v = floorf(u / step + 0.5f);
    return v < 0.0f ? 0 : (v > static_cast<float>(levels) ? levels : static_cast<int>(v));
}

TEST(Tokenwise, ReciprocalCodeEqualsDivisionWhereItAnswers) {
    std::mt19937_64 rng(77);
    std::uniform_real_distribution<float> unit(0.0f, 1.0f);
    std::uniform_int_distribution<int> exp_d(-24, 10);
    long long checked = 0, boundary_answered = 0;
    for (int bits : {2, 4, 8}) {
        const int levels = (1 << bits) - 1;
        for (int trial = 0; trial < 20000; ++trial) {
            // fp16 steps from the subnormal minimum 2^-24 up to ~2^11.
            const float step = kvq::round_to_half(std::ldexp(1.0f + unit(rng), exp_d(rng)));
            ASSERT_GT(step, 0.0f);
            const float r0 = 1.0f / step;
            const float rs[3] = {r0, std::nextafter(r0, 0.0f), std::nextafter(r0, INFINITY)};
            std::vector<float> us;
            for (int i = 0; i < 8; ++i) us.push_back((unit(rng) * (levels + 4) - 2) * step);
            // Rounding boundaries u / step = n - 1/2 and the floats next to them.
            const int n = static_cast<int>(unit(rng) * (levels + 2)) - 1;
            float ub = (static_cast<float>(n) - 0.5f) * step;
            for (int k = 0; k < 4; ++k) ub = std::nextafter(ub, -INFINITY);
            for (int k = 0; k < 9; ++k, ub = std::nextafter(ub, INFINITY)) us.push_back(ub);
            us.push_back(1e30f);
            us.push_back(-1e30f);
            us.push_back(0.0f);
            us.push_back(INFINITY);
            us.push_back(-INFINITY);
            for (float u : us)
                for (float r : rs) {
                    const int fast = kvq::tokenwise_code_by_reciprocal(u, r, levels);
                    if (fast < 0) continue;
                    ++checked;
                    ASSERT_EQ(fast, code_by_division(u, step, levels))
                        << "u " << u << " step " << step << " r " << r << " levels " << levels;
                }
            // A value exactly on a boundary must never be answered from the reciprocal.
            const float on = (static_cast<float>(n) - 0.5f) * step;
            if (on / step == static_cast<float>(n) - 0.5f && kvq::tokenwise_code_by_reciprocal(on, r0, levels) >= 0 &&
                n >= 1 && n <= levels)
                ++boundary_answered;
        }
    }
    EXPECT_GT(checked, 1000000);
    EXPECT_EQ(boundary_answered, 0);
}

TEST(Tokenwise, ReciprocalCodeFallsBackRarely) {
    // For values spread uniformly over the code range the fraction of u * r + 1/2 is uniform, so the
    // fallback window (2^-12 on either side of an integer) catches p = 2^-11 of them. Tolerance:
    // 5 binomial standard errors.
    std::mt19937_64 rng(5);
    std::uniform_real_distribution<float> unit(0.0f, 1.0f);
    const int N = 1 << 22;
    long long fallbacks = 0;
    for (int i = 0; i < N; ++i) {
        const int levels = (i & 1) ? 15 : 3;
        const float step = kvq::round_to_half(0.01f + unit(rng));
        const float u = unit(rng) * levels * step;
        fallbacks += kvq::tokenwise_code_by_reciprocal(u, 1.0f / step, levels) < 0;
    }
    const double p = std::ldexp(1.0, -11), se = std::sqrt(p * (1 - p) / N);
    EXPECT_NEAR(double(fallbacks) / N, p, 5 * se);
}

}  // namespace
