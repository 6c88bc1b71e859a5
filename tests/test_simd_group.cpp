// Grouped (GQA) SIMD kernels added for issue 7's targets, each against its scalar twin:
//  - QJL VNNI group scorer (4 query heads per code load): integer sums, then the same float
//    formula as score() -> bitwise equal to score() per head with the same (fast) preparation.
//  - int8 query quantization: the AVX-512 variant performs the same IEEE division and rounding as
//    std::lrint -> identical bytes.
//  - QJL with outliers, fast path: per 32-token group the inlier / outlier projections are int8
//    quantized (steps s_I, s_O); |fast - exact| <= c_I ||k_I|| m s_I / 2 + c_O ||k_O|| m_o s_O / 2
//    plus float rounding of the exact path's two signed sums (<= m u sum|p|, each) and of the
//    FMA-based projection (<= k_o u sum_o |S_jo q_o| per projection, bounded by 4 u |p|max m).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "kvq/cpu/kernels.hpp"
#include "kvq/kvq.hpp"
#include "test_util.hpp"

namespace {

using kvq::cpu::SimdLevel;
constexpr double kU = 1.0 / 16777216.0;  // 2^-24

TEST(SimdGroup, QuantizeI8VariantsAreIdentical) {
    std::mt19937_64 rng(3);
    for (int m : {32, 64, 96, 256, 1024}) {
        for (float sigma : {0.0f, 1e-3f, 1.0f, 40.0f}) {
            auto p = kvq::test::normal_vector(m, rng, sigma);
            std::int8_t a[1024 + 64], b[1024 + 64];
            std::int32_t sa = 0, sb = 0;
            const float fa = kvq::cpu::quantize_i8_scalar(p.data(), m, a, &sa);
            ASSERT_EQ(sigma == 0.0f, fa == 0.0f);
            for (int j = 0; j < m && fa > 0; ++j) {
                ASSERT_LE(std::fabs(a[j] * double(fa) - p[j]), 0.5 * fa * (1 + 1e-6)) << j;
            }
#if KVQ_X86_SIMD
            if (kvq::cpu::detected_simd_level() == SimdLevel::Avx512) {
                const float fb = kvq::cpu::quantize_i8_avx512(p.data(), m, b, &sb);
                EXPECT_EQ(fa, fb);
                EXPECT_EQ(sa, sb);
                for (int j = 0; j < (m + 63) / 64 * 64; ++j) ASSERT_EQ(a[j], b[j]) << "m " << m << " j " << j;
            }
#endif
        }
    }
}

TEST(SimdGroup, QjlVnniGroupScoresEqualPerHeadScores) {
    if (!kvq::cpu::has_avx512_vnni()) GTEST_SKIP() << "no AVX-512 VNNI";
    const int d = 128, B = 64;
    for (int m : {64, 128, 256, 512, 1024}) {
        kvq::QjlKeyCodec c(kvq::QjlParams{d, m, 256, 0});
        std::mt19937_64 rng(m + 1);
        auto k = kvq::test::normal_vector(std::size_t(B) * d, rng);
        std::vector<std::uint8_t> block(c.layout(B).bytes());
        c.encode(k.data(), B, block.data(), B, 0);
        for (int G : {1, 3, 4, 8, 9}) {
            auto q = kvq::test::normal_vector(std::size_t(G) * d, rng, 3.0f);
            std::vector<kvq::PreparedQuery> pq(G);
            std::vector<const kvq::PreparedQuery*> pp(G);
            for (int g = 0; g < G; ++g) {
                c.prepare_fast(q.data() + std::size_t(g) * d, pq[g]);
                pp[g] = &pq[g];
            }
            for (auto [first, n] : {std::pair{0, 64}, std::pair{5, 40}, std::pair{3, 13}, std::pair{63, 1}}) {
                std::vector<float> ref(std::size_t(G) * n), got(std::size_t(G) * n, -1.0f);
                std::vector<float*> op(G);
                for (int g = 0; g < G; ++g) {
                    // Per head through the VPOPCNTQ kernels (score()), the pre-VNNI path.
                    c.score(pq[g], block.data(), B, first, n, ref.data() + std::size_t(g) * n);
                    op[g] = got.data() + std::size_t(g) * n;
                }
                c.score_group(pp.data(), G, block.data(), B, first, n, op.data());
                EXPECT_EQ(got, ref) << "m " << m << " G " << G << " first " << first << " n " << n;
            }
        }
    }
}

TEST(SimdGroup, QjlOutlierFastScoresWithinQuantizationBound) {
    if (!kvq::cpu::has_avx512_vnni()) GTEST_SKIP() << "no AVX-512 VNNI";
    const int d = 128, B = 64;
    for (auto [m, mo, ko] : {std::tuple{256, 256, 8}, std::tuple{512, 128, 8}, std::tuple{96, 32, 3}}) {
        kvq::QjlKeyCodec c(kvq::QjlParams{d, m, mo, ko});
        std::mt19937_64 rng(m + mo + ko);
        auto k = kvq::test::normal_vector(std::size_t(B) * d, rng);
        for (int t = 0; t < B; ++t) k[std::size_t(t) * d + 7] *= 20, k[std::size_t(t) * d + 50] *= 10;  // outliers
        std::vector<std::uint8_t> block(c.layout(B).bytes());
        c.encode(k.data(), B, block.data(), B, 0);
        const kvq::BlockLayout l = c.layout(B);
        const auto* nin = reinterpret_cast<const kvq::half_t*>(block.data() + l.token_side_offset());
        const auto* nout = nin + B;
        const std::uint8_t* ids = block.data() + l.block_side_offset();
        for (int G : {1, 4, 5}) {
            auto q = kvq::test::normal_vector(std::size_t(G) * d, rng, 2.0f);
            std::vector<kvq::PreparedQuery> pq(G), pe(G);
            std::vector<const kvq::PreparedQuery*> pp(G);
            for (int g = 0; g < G; ++g) {
                c.prepare_fast(q.data() + std::size_t(g) * d, pq[g]);
                c.prepare(q.data() + std::size_t(g) * d, pe[g]);
                pp[g] = &pq[g];
            }
            for (auto [first, n] : {std::pair{0, 64}, std::pair{5, 50}, std::pair{33, 7}}) {
                std::vector<float> got(std::size_t(G) * n), one(n), ref(n);
                std::vector<float*> op(G);
                for (int g = 0; g < G; ++g) op[g] = got.data() + std::size_t(g) * n;
                c.score_group(pp.data(), G, block.data(), B, first, n, op.data());
                for (int g = 0; g < G; ++g) {
                    c.score(pe[g], block.data(), B, first, n, ref.data());  // exact float path
                    c.score(pq[g], block.data(), B, first, n, one.data());  // fast path, one head
                    std::vector<float> pin(c.sketch_rows()), pout(c.sketch_rows());
                    for (int i = 0; i < n; ++i) {
                        const int tok = first + i;
                        kvq::cpu::qjl_outlier_proj_scalar(c.sketch_t_for_tests(), c.sketch_rows(), ids + tok / 32 * ko,
                                                          ko, q.data() + std::size_t(g) * d, pe[g].data.data(), m,
                                                          pin.data(), pout.data());
                        double ai = 0, ao = 0, si = 0, so = 0;
                        for (int j = 0; j < m; ++j)
                            ai = std::max(ai, double(std::fabs(pin[j]))), si += std::fabs(pin[j]);
                        for (int j = 0; j < mo; ++j)
                            ao = std::max(ao, double(std::fabs(pout[j]))), so += std::fabs(pout[j]);
                        const double ci = std::sqrt(kvq::QjlKeyCodec::kHalfPi) / m,
                                     co = std::sqrt(kvq::QjlKeyCodec::kHalfPi) / mo;
                        const double ki = kvq::half_to_float(nin[tok]), kout = kvq::half_to_float(nout[tok]);
                        const double bound =
                            ci * ki * (m * (ai / 127) / 2 * (1 + 1e-5) + 2 * m * kU * si + 4 * ko * kU * m * ai) +
                            co * kout * (mo * (ao / 127) / 2 * (1 + 1e-5) + 2 * mo * kU * so + 4 * ko * kU * mo * ao) +
                            1e-6 * std::fabs(ref[i]);
                        EXPECT_LE(std::fabs(got[std::size_t(g) * n + i] - ref[i]), bound)
                            << "m " << m << " mo " << mo << " G " << G << " tok " << tok;
                        EXPECT_EQ(one[i], got[std::size_t(g) * n + i]) << "score() and score_group() agree";
                    }
                }
            }
        }
    }
}

}  // namespace

namespace {
TEST(SimdGroup, QjlPlanesVariantsAreIdentical) {
    std::mt19937_64 rng(11);
    for (int words : {1, 4, 16}) {
        std::vector<std::int8_t> u(64 * words);
        for (auto& x : u) x = static_cast<std::int8_t>(static_cast<int>(rng() % 255) - 127);
        std::vector<std::uint64_t> a(8 * words), b(8 * words);
        kvq::cpu::qjl_planes_from_i8_scalar(u.data(), words, a.data());
#if KVQ_X86_SIMD
        if (kvq::cpu::detected_simd_level() == kvq::cpu::SimdLevel::Avx512) {
            kvq::cpu::qjl_planes_from_i8_avx512(u.data(), words, b.data());
            EXPECT_EQ(a, b) << "words " << words;
        }
#endif
    }
}
}  // namespace

namespace {
// AVX-512 softmax helpers: scale + max is exact (same multiplications and max in every variant);
// exp: the same Cephes polynomial as the AVX2 variant, so against std::exp the AVX2 test's bound
// holds (4e-7 relative; below exp(-87.3) ~1e-38 instead of 0), for full vectors and the masked tail.
TEST(SimdGroup, Avx512ScaleMaxAndExpMatchScalar) {
#if KVQ_X86_SIMD
    if (kvq::cpu::detected_simd_level() != kvq::cpu::SimdLevel::Avx512) GTEST_SKIP() << "no AVX-512";
    std::mt19937_64 rng(21);
    std::uniform_real_distribution<float> ud(-100.0f, 20.0f);
    for (int n : {1, 15, 16, 17, 300, 1001}) {
        std::vector<float> x(n);
        for (auto& v : x) v = ud(rng);
        std::vector<float> a = x, b = x;
        float ma = -std::numeric_limits<float>::infinity();
        for (auto& v : a) v *= 0.125f, ma = std::max(ma, v);
        const float mb = kvq::cpu::scale_max_avx512(b.data(), n, 0.125f);
        EXPECT_EQ(ma, mb);
        EXPECT_EQ(a, b);
        const double sref = kvq::cpu::exp_shift_scalar(a.data(), n, ma);
        const double s = kvq::cpu::exp_shift_avx512(b.data(), n, mb);
        for (int i = 0; i < n; ++i) EXPECT_LE(std::fabs(b[i] - a[i]), 4e-7 * a[i] + 2e-38) << i;
        EXPECT_NEAR(s, sref, 1e-6 * sref);
    }
#else
    GTEST_SKIP();
#endif
}
}  // namespace
