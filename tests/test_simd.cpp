// Every SIMD path against its scalar twin (run-time dispatch: AVX2 and AVX-512 variants are tested
// when the CPU has them), and the threaded / split-K decode attention against the serial one.
// Tolerances come from the arithmetic:
//  - QJL bit-sliced kernels are integer: all variants must agree exactly.
//  - QJL SIMD scores use an int8-quantized projection (step s = max|S q| / 127): per projection the
//    error is <= s/2, so |est_simd - est_scalar| <= sqrt(pi/2)/m * ||k|| * m * s/2, plus float
//    rounding of the two float sums (<= m u sum|p_j| for each, u = 2^-24).
//  - Float kernels with a different summation order: |a - b| <= 2 gamma_{n+4} * sum |terms|,
//    gamma_k = k u / (1 - k u).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "kvq/cpu/kernels.hpp"
#include "kvq/cpu/thread_pool.hpp"
#include "kvq/kvq.hpp"
#include "test_util.hpp"

namespace {

using kvq::cpu::SimdLevel;
constexpr double kU = 1.0 / 16777216.0;  // 2^-24

std::vector<SimdLevel> simd_levels() {
    std::vector<SimdLevel> v;
    const SimdLevel d = kvq::cpu::detected_simd_level();
    if (d >= SimdLevel::Avx2) v.push_back(SimdLevel::Avx2);
    if (d >= SimdLevel::Avx512) v.push_back(SimdLevel::Avx512);
    return v;
}

TEST(Simd, ForceScalarSwitch) {
    const SimdLevel before = kvq::cpu::simd_level();  // detected, or Scalar under KVQ_FORCE_SCALAR=1
    {
        kvq::cpu::ScopedSimdLimit s(SimdLevel::Scalar);
        EXPECT_EQ(kvq::cpu::simd_level(), SimdLevel::Scalar);
    }
    EXPECT_EQ(kvq::cpu::simd_level(), before);
    EXPECT_LE(static_cast<int>(before), static_cast<int>(kvq::cpu::detected_simd_level()));
    std::printf("detected SIMD level: %s\n", kvq::cpu::to_string(kvq::cpu::detected_simd_level()));
}

TEST(Simd, QjlBitslicedKernelsAreExact) {
    std::mt19937_64 rng(1);
    for (int words : {1, 2, 4, 8, 12, 16}) {
        for (int n : {1, 3, 7, 64, 65}) {
            std::vector<std::uint8_t> codes(std::size_t(n) * words * 8);
            for (auto& c : codes) c = static_cast<std::uint8_t>(rng());
            std::vector<std::uint64_t> planes(8 * words);
            for (auto& p : planes) p = rng();
            std::vector<std::int64_t> ref(n), got(n);
            kvq::cpu::qjl_bitsliced_scalar(codes.data(), n, words, planes.data(), ref.data());
            // Against the definition: sum_j bit_j * u_j with u_j the signed byte of the planes.
            for (int i = 0; i < n; ++i) {
                std::int64_t t = 0;
                for (int j = 0; j < 64 * words; ++j) {
                    if (!((codes[std::size_t(i) * words * 8 + j / 8] >> (j % 8)) & 1)) continue;
                    unsigned u = 0;
                    for (int k = 0; k < 8; ++k) u |= unsigned((planes[k * words + j / 64] >> (j % 64)) & 1) << k;
                    t += static_cast<std::int8_t>(u);
                }
                ASSERT_EQ(ref[i], t);
            }
#if KVQ_X86_SIMD
            const SimdLevel d = kvq::cpu::detected_simd_level();
            if (d >= SimdLevel::Avx2 && words % 4 == 0) {
                kvq::cpu::qjl_bitsliced_avx2(codes.data(), n, words, planes.data(), got.data());
                EXPECT_EQ(got, ref) << "avx2 words " << words << " n " << n;
            }
            if (d >= SimdLevel::Avx512 && words <= 8 && 8 % words == 0) {
                kvq::cpu::qjl_bitsliced_avx512(codes.data(), n, words, planes.data(), got.data());
                EXPECT_EQ(got, ref) << "avx512 words " << words << " n " << n;
            }
#endif
        }
    }
}

TEST(Simd, QjlScoresMatchScalarLutWithinQuantizationBound) {
    const int d = 128, B = 64;
    for (int m : {64, 128, 256, 512}) {
        kvq::QjlKeyCodec c(kvq::QjlParams{d, m, 256, 0});
        std::mt19937_64 rng(m);
        auto k = kvq::test::normal_vector(std::size_t(B) * d, rng);
        auto q = kvq::test::normal_vector(d, rng, 2.0f);
        std::vector<std::uint8_t> block(c.layout(B).bytes());
        c.encode(k.data(), B, block.data(), B, 0);
        kvq::PreparedQuery pq_ref;
        std::vector<float> ref(B);
        {
            kvq::cpu::ScopedSimdLimit s(SimdLevel::Scalar);
            c.prepare(q.data(), pq_ref);
            c.score(pq_ref, block.data(), B, 0, B, ref.data());
        }
        double abs_p = 0, amax = 0;
        for (int j = 0; j < m; ++j) {
            abs_p += std::fabs(pq_ref.data[j]);
            amax = std::max(amax, double(std::fabs(pq_ref.data[j])));
        }
        const double step = amax / 127;
        std::vector<std::vector<float>> per_level;
        for (SimdLevel lv : simd_levels()) {
            kvq::cpu::ScopedSimdLimit s(lv);
            if (!c.bitsliced_supported()) continue;
            kvq::PreparedQuery pq, pq_exact;
            c.prepare(q.data(), pq_exact);  // prepare() stays exact (the float LUT) at every level
            EXPECT_EQ(pq_exact.data, pq_ref.data);
            c.prepare_fast(q.data(), pq);
            std::vector<float> got(B);
            c.score(pq, block.data(), B, 3, B - 3, got.data() + 3);  // an offset range too
            c.score(pq, block.data(), B, 0, 3, got.data());
            double worst = 0, rms = 0;
            for (int t = 0; t < B; ++t) {
                const double nk = kvq::half_to_float(
                    reinterpret_cast<const kvq::half_t*>(block.data() + c.layout(B).token_side_offset())[t]);
                const double cin = std::sqrt(kvq::QjlKeyCodec::kHalfPi) / m;
                const double bound = cin * nk * (m * step / 2 + 2 * m * kU * abs_p) + 1e-6 * std::fabs(ref[t]);
                EXPECT_LE(std::fabs(got[t] - ref[t]), bound) << "m " << m << " level " << to_string(lv) << " t " << t;
                worst = std::max(worst, std::fabs(got[t] - ref[t]) / bound);
                rms += (got[t] - ref[t]) * (got[t] - ref[t]);
            }
            std::printf("QJL m=%d %s: worst error / bound %.3f, rms error %.4g\n", m, to_string(lv), worst,
                        std::sqrt(rms / B));
            // Bit-sliced scoring is integer up to the same final float operations: AVX2 and
            // AVX-512 (including the fused m = 256 kernel) must agree exactly.
            per_level.push_back(got);
        }
        for (std::size_t i = 1; i < per_level.size(); ++i) EXPECT_EQ(per_level[i], per_level[0]) << "m " << m;
    }
}

// Scalar reference: TokenwiseCodec::accumulate per weight vector (the pre-SIMD arithmetic).
TEST(Simd, TokenwiseGroupedAccumulateMatchesScalar) {
    const int d = 128, B = 64;
    for (int bits : {2, 4, 8}) {
        for (int group : {8, 16, 32, 128}) {
            kvq::TokenwiseCodec c(kvq::TokenwiseParams{d, bits, group});
            std::mt19937_64 rng(bits * 100 + group);
            auto x = kvq::test::normal_vector(std::size_t(B) * d, rng);
            std::vector<std::uint8_t> block(c.layout(B).bytes());
            c.encode(x.data(), B, block.data(), B, 0);
            std::vector<float> dec(std::size_t(B) * d);
            c.decode(block.data(), B, 0, B, dec.data());
            const kvq::BlockLayout l = c.layout(B);
            const auto* mins = reinterpret_cast<const kvq::half_t*>(block.data() + l.token_side_offset()) +
                               std::size_t(B) * (d / group);
            for (int G : {1, 3, 4, 8, 9}) {
                for (int first : {0, 5}) {
                    const int n = B - first - (first ? 2 : 0);
                    auto w = kvq::test::normal_vector(std::size_t(G) * B, rng);
                    auto acc0 = kvq::test::normal_vector(std::size_t(G) * d, rng);
                    std::vector<float> ref = acc0;
                    for (int g = 0; g < G; ++g)
                        c.accumulate(block.data(), B, first, n, w.data() + std::size_t(g) * B,
                                     ref.data() + std::size_t(g) * d);
                    for (SimdLevel lv : simd_levels()) {
                        kvq::cpu::ScopedSimdLimit s(lv);
                        std::vector<float> got = acc0;
                        std::vector<const float*> wp(G);
                        std::vector<float*> ap(G);
                        for (int g = 0; g < G; ++g) {
                            wp[g] = w.data() + std::size_t(g) * B;
                            ap[g] = got.data() + std::size_t(g) * d;
                        }
                        c.accumulate_group(block.data(), B, first, n, G, wp.data(), ap.data());
                        for (int g = 0; g < G; ++g)
                            for (int ch = 0; ch < d; ++ch) {
                                double mag = std::fabs(acc0[std::size_t(g) * d + ch]);
                                for (int i = 0; i < n; ++i) {
                                    const int tok = first + i;
                                    const double mn =
                                        kvq::half_to_float(mins[std::size_t(tok) * (d / group) + ch / group]);
                                    mag += std::fabs(w[std::size_t(g) * B + i]) *
                                           (std::fabs(dec[std::size_t(tok) * d + ch]) + 2 * std::fabs(mn));
                                }
                                const double gam = (n + 4) * kU / (1 - (n + 4) * kU);
                                ASSERT_LE(std::fabs(got[std::size_t(g) * d + ch] - ref[std::size_t(g) * d + ch]),
                                          2 * gam * mag)
                                    << "bits " << bits << " group " << group << " G " << G << " " << to_string(lv);
                            }
                    }
                }
            }
        }
    }
}

TEST(Simd, TokenwiseGroupedScoreMatchesScalar) {
    const int d = 128, B = 64;
    for (int bits : {2, 4, 8}) {
        for (int group : {8, 16, 32, 128}) {  // 8: AVX2 kernel only (AVX-512 needs group % 16 == 0)
            kvq::TokenwiseCodec c(kvq::TokenwiseParams{d, bits, group});
            std::mt19937_64 rng(bits * 10 + group);
            auto x = kvq::test::normal_vector(std::size_t(B) * d, rng);
            std::vector<std::uint8_t> block(c.layout(B).bytes());
            c.encode(x.data(), B, block.data(), B, 0);
            std::vector<float> dec(std::size_t(B) * d);
            c.decode(block.data(), B, 0, B, dec.data());
            const kvq::BlockLayout l = c.layout(B);
            const auto* mins = reinterpret_cast<const kvq::half_t*>(block.data() + l.token_side_offset()) +
                               std::size_t(B) * (d / group);
            for (int G : {1, 4, 9}) {
                auto q = kvq::test::normal_vector(std::size_t(G) * d, rng);
                std::vector<kvq::PreparedQuery> pq(G);
                std::vector<const kvq::PreparedQuery*> pp(G);
                std::vector<float> ref(std::size_t(G) * B), got(std::size_t(G) * B);
                std::vector<float*> op(G);
                for (int g = 0; g < G; ++g) {
                    c.prepare(q.data() + std::size_t(g) * d, pq[g]);
                    pp[g] = &pq[g];
                    c.score(pq[g], block.data(), B, 2, B - 2, ref.data() + std::size_t(g) * B);
                    op[g] = got.data() + std::size_t(g) * B;
                }
                for (SimdLevel lv : simd_levels()) {
                    kvq::cpu::ScopedSimdLimit s(lv);
                    c.score_group(pp.data(), G, block.data(), B, 2, B - 2, op.data());
                    for (int g = 0; g < G; ++g)
                        for (int i = 0; i < B - 2; ++i) {
                            double mag = 0;
                            for (int ch = 0; ch < d; ++ch) {
                                const double mn =
                                    kvq::half_to_float(mins[std::size_t(2 + i) * (d / group) + ch / group]);
                                mag += std::fabs(q[std::size_t(g) * d + ch]) *
                                       (std::fabs(dec[std::size_t(2 + i) * d + ch]) + 2 * std::fabs(mn));
                            }
                            const double gam = (d + 4) * kU / (1 - (d + 4) * kU);
                            ASSERT_LE(std::fabs(got[std::size_t(g) * B + i] - ref[std::size_t(g) * B + i]),
                                      2 * gam * mag)
                                << "bits " << bits << " group " << group << " " << to_string(lv);
                        }
                }
            }
        }
    }
}

TEST(Simd, Fp32GroupedDotAndAxpyMatchScalar) {
    const int d = 128, n = 37;
    std::mt19937_64 rng(5);
    auto K = kvq::test::normal_vector(std::size_t(n) * d, rng);
    for (int G : {1, 4, 9}) {
        auto q = kvq::test::normal_vector(std::size_t(G) * d, rng);
        auto w = kvq::test::normal_vector(std::size_t(G) * n, rng);
        std::vector<const float*> qp(G), wp(G);
        for (int g = 0; g < G; ++g) {
            qp[g] = q.data() + std::size_t(g) * d;
            wp[g] = w.data() + std::size_t(g) * n;
        }
        auto run = [&](std::vector<float>& s, std::vector<float>& acc) {
            s.assign(std::size_t(G) * n, 0.0f);
            acc.assign(std::size_t(G) * d, 0.0f);
            std::vector<float*> sp(G), ap(G);
            for (int g = 0; g < G; ++g) {
                sp[g] = s.data() + std::size_t(g) * n;
                ap[g] = acc.data() + std::size_t(g) * d;
            }
            kvq::cpu::f32_dot_group(K.data(), n, d, G, qp.data(), sp.data());
            kvq::cpu::f32_axpy_group(K.data(), n, d, G, wp.data(), ap.data());
        };
        std::vector<float> s_ref, a_ref;
        {
            kvq::cpu::ScopedSimdLimit s(SimdLevel::Scalar);
            run(s_ref, a_ref);
        }
        for (SimdLevel lv : simd_levels()) {
            kvq::cpu::ScopedSimdLimit s(lv);
            std::vector<float> sg, ag;
            run(sg, ag);
            const double gd = 2 * (d + 4) * kU, gn = 2 * (n + 4) * kU;
            for (int g = 0; g < G; ++g) {
                for (int i = 0; i < n; ++i) {
                    double mag = 0;
                    for (int c = 0; c < d; ++c) mag += std::fabs(q[std::size_t(g) * d + c] * K[std::size_t(i) * d + c]);
                    EXPECT_LE(std::fabs(sg[std::size_t(g) * n + i] - s_ref[std::size_t(g) * n + i]), gd * mag);
                }
                for (int c = 0; c < d; ++c) {
                    double mag = 0;
                    for (int i = 0; i < n; ++i) mag += std::fabs(w[std::size_t(g) * n + i] * K[std::size_t(i) * d + c]);
                    EXPECT_LE(std::fabs(ag[std::size_t(g) * d + c] - a_ref[std::size_t(g) * d + c]), gn * mag);
                }
            }
        }
    }
}

TEST(Simd, ExpShiftMatchesStdExp) {
    std::mt19937_64 rng(9);
    std::uniform_real_distribution<float> ud(-100.0f, 0.0f);
    const int n = 1001;
    std::vector<float> x(n);
    for (auto& v : x) v = ud(rng);
    x[0] = 0.0f;
    std::vector<float> ref = x;
    const double sref = kvq::cpu::exp_shift_scalar(ref.data(), n, 0.0f);
#if KVQ_X86_SIMD
    if (kvq::cpu::detected_simd_level() >= SimdLevel::Avx2) {
        std::vector<float> got = x;
        const double s = kvq::cpu::exp_shift_avx2(got.data(), n, 0.0f);
        for (int i = 0; i < n; ++i) {
            // Polynomial: a few ulp; below exp(-87.3) the SIMD path returns ~1e-38 instead of a
            // subnormal or 0 -- negligible next to the sum (>= 1).
            EXPECT_LE(std::fabs(got[i] - ref[i]), 4e-7 * ref[i] + 2e-38) << x[i];
        }
        EXPECT_NEAR(s, sref, 1e-6 * sref);
    }
#endif
}

// ---------------------------------------------------------------- threaded / split-K attention
struct AttnSetup {
    std::shared_ptr<kvq::KvCache> cache;
    std::vector<float> q, k_new, v_new;
    int Hq, H, d;
};

AttnSetup make_cache(bool qjl, int T, std::uint64_t seed) {
    const int H = 2, Hq = 8, d = 64, B = 16;
    std::shared_ptr<kvq::Codec> kc, vc;
    if (qjl) {
        kc = std::make_shared<kvq::QjlKeyCodec>(kvq::QjlParams{d, 128, 64, 0});
        vc = std::make_shared<kvq::TokenwiseCodec>(kvq::TokenwiseParams{d, 2, 32});
    } else {
        kc = vc = std::make_shared<kvq::IdentityCodec>(d, kvq::StorageType::F32);
    }
    kvq::CacheConfig cfg{1, H, d, B, kvq::WindowPolicy{7}, kvq::WindowPolicy{3}, true};  // K and V windows differ
    AttnSetup s{std::make_shared<kvq::KvCache>(cfg, kc, vc), {}, {}, {}, Hq, H, d};
    std::mt19937_64 rng(seed);
    auto k = kvq::test::normal_vector(std::size_t(T) * H * d, rng),
         v = kvq::test::normal_vector(std::size_t(T) * H * d, rng);
    s.cache->append(0, k.data(), v.data(), T);
    s.q = kvq::test::normal_vector(std::size_t(Hq) * d, rng);
    s.k_new = kvq::test::normal_vector(std::size_t(2) * H * d, rng);
    s.v_new = kvq::test::normal_vector(std::size_t(2) * H * d, rng);
    return s;
}

std::vector<float> attend(const AttnSetup& s, kvq::AttentionWorkspace& ws, std::vector<float>* scores = nullptr) {
    std::vector<float> out(std::size_t(s.Hq) * s.d);
    const int T = s.cache->tokens(0);
    if (scores) scores->assign(std::size_t(s.Hq) * (T + 2), 0.0f);
    kvq::attend(*s.cache, 0, s.q.data(), s.Hq, T, kvq::ExactTokens{s.k_new.data(), s.v_new.data(), 2}, 2, out.data(),
                ws, scores ? scores->data() : nullptr);
    return out;
}

TEST(ParallelAttention, SplitKMergeEqualsUnsplitAndThreadsEqualSerial) {
    kvq::cpu::ThreadPool pool(3);
    for (bool qjl : {false, true}) {
        for (int T : {5, 100, 333}) {
            const AttnSetup s = make_cache(qjl, T, 42 + T);
            kvq::AttentionWorkspace ws1;
            std::vector<float> sc1;
            const auto ref = attend(s, ws1, &sc1);
            double scale = 0;
            for (float x : ref) scale = std::max(scale, double(std::fabs(x)));
            for (int split : {2, 3, 7, 100}) {
                kvq::AttentionWorkspace ws;
                ws.split = split;
                std::vector<float> sc;
                const auto got = attend(s, ws, &sc);
                EXPECT_EQ(sc, sc1) << "scores do not depend on the split";
                for (std::size_t i = 0; i < ref.size(); ++i)
                    EXPECT_NEAR(got[i], ref[i], 2e-6 * scale) << "qjl " << qjl << " T " << T << " split " << split;
                // Threads: same tasks, same arithmetic -> bitwise equal to the serial run.
                kvq::AttentionWorkspace wst;
                wst.split = split;
                wst.executor = &pool;
                EXPECT_EQ(attend(s, wst), got);
            }
            kvq::AttentionWorkspace wsa;  // automatic split with 3 threads
            wsa.executor = &pool;
            const auto got = attend(s, wsa);
            for (std::size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 2e-6 * scale);
        }
    }
}

TEST(ParallelAttention, SimdAttentionMatchesScalarOnFp32Cache) {
    const AttnSetup s = make_cache(false, 300, 7);
    std::vector<float> ref;
    {
        kvq::cpu::ScopedSimdLimit lim(SimdLevel::Scalar);
        kvq::AttentionWorkspace ws;
        ref = attend(s, ws);
    }
    double scale = 0;
    for (float x : ref) scale = std::max(scale, double(std::fabs(x)));
    kvq::AttentionWorkspace ws;
    const auto got = attend(s, ws);
    for (std::size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-5 * scale);
}

TEST(ParallelAttention, ThreadPoolRunsEveryTaskAndPropagatesErrors) {
    kvq::cpu::ThreadPool pool(4);
    std::vector<int> hit(1000, 0);
    for (int rep = 0; rep < 20; ++rep) pool.parallel_for(1000, [&](int i) { hit[i]++; });
    for (int h : hit) EXPECT_EQ(h, 20);
    EXPECT_THROW(pool.parallel_for(10,
                                   [](int i) {
                                       if (i == 3) throw std::runtime_error("x");
                                   }),
                 std::runtime_error);
}

}  // namespace
