// KIVI on kvq blocks: per-channel key codec (groups of 32 tokens) against a float64 model of the
// quantizer, bits per element, and the residual policy (keys flushed in chunks of R = 128, values a
// sliding window of R) with token counts checked at every step.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "kvq/kvq.hpp"
#include "kvq/quant/kivi_codec.hpp"
#include "test_util.hpp"

namespace {
kvq::CacheConfig kivi_config(const kvq::KiviConfig& k, int H, int d, int B) {
    kvq::CacheConfig c;
    c.n_kv_heads = H;
    c.head_dim = d;
    c.block_tokens = B;
    c.key_window = k.key_window;
    c.value_window = k.value_window;
    return c;
}
}  // namespace

TEST(Kivi, KeyCodecQuantizesPerChannelOver32Tokens) {
    const int d = 64, B = 64;
    std::mt19937_64 rng(11);
    std::vector<float> x = kvq::test::normal_vector(std::size_t(B) * d, rng);
    for (int t = 0; t < B; ++t) x[t * d + 5] = 3.0f;  // a constant channel decodes exactly
    for (int bits : {2, 4}) {
        kvq::KiviKeyCodec codec(d, bits);
        EXPECT_EQ(codec.granularity(), 32);
        std::vector<std::uint8_t> block(codec.layout(B).bytes());
        codec.encode(x.data(), 32, block.data(), B, 0);
        codec.encode(x.data() + 32 * d, 32, block.data(), B, 32);
        std::vector<float> dec(std::size_t(B) * d);
        codec.decode(block.data(), B, 0, B, dec.data());
        for (int g = 0; g < 2; ++g)
            for (int c = 0; c < d; ++c) {
                float lo = 1e30f, hi = -1e30f;
                for (int t = g * 32; t < g * 32 + 32; ++t)
                    lo = std::min(lo, x[t * d + c]), hi = std::max(hi, x[t * d + c]);
                const double step = (hi - lo) / ((1 << bits) - 1);
                for (int t = g * 32; t < g * 32 + 32; ++t)
                    ASSERT_LE(std::fabs(dec[t * d + c] - x[t * d + c]), 0.5 * step * 1.01 + 2e-3 * std::fabs(hi) + 1e-6)
                        << "bits " << bits << " token " << t << " channel " << c;
            }
        for (int t = 0; t < B; ++t) EXPECT_EQ(dec[t * d + 5], 3.0f);
        // score and accumulate agree with decode.
        std::vector<float> q = kvq::test::normal_vector(d, rng), w = kvq::test::normal_vector(B, rng);
        kvq::PreparedQuery pq;
        codec.prepare(q.data(), pq);
        std::vector<float> s(B - 3), acc(d, 0.0f);
        codec.score(pq, block.data(), B, 3, B - 3, s.data());
        codec.accumulate(block.data(), B, 3, B - 3, w.data(), acc.data());
        for (int i = 0; i < B - 3; ++i) EXPECT_NEAR(s[i], kvq::test::dot64(q.data(), &dec[(3 + i) * d], d), 1e-3);
        for (int c = 0; c < d; ++c) {
            double a = 0;
            for (int i = 0; i < B - 3; ++i) a += double(w[i]) * dec[(3 + i) * d + c];
            EXPECT_NEAR(acc[c], a, 1e-3);
        }
    }
    // 2-bit, d = 128, B = 64: 3.0 bits per element (ALGORITHMS.md §3); 4-bit: 5.0.
    EXPECT_DOUBLE_EQ(kvq::KiviKeyCodec(128, 2).bits_per_element(64), 3.0);
    EXPECT_DOUBLE_EQ(kvq::KiviKeyCodec(128, 4).bits_per_element(64), 5.0);
    EXPECT_THROW(kvq::KiviKeyCodec(128, 3), kvq::Error);
    EXPECT_THROW(kvq::KiviKeyCodec(128, 2).layout(16), kvq::Error);  // block smaller than a group
}

TEST(Kivi, ResidualFlushAndWindowTokenCounts) {
    const int H = 2, d = 64, B = 64, R = kvq::kKiviResidual;
    double err[2];
    for (int bits : {2, 4}) {
        const kvq::KiviConfig kv = kvq::make_kivi(d, bits);
        kvq::KvCache cache(kivi_config(kv, H, d, B), kv.key_codec, kv.value_codec);
        std::mt19937_64 rng(3);
        const int T = 600;
        std::vector<float> k = kvq::test::normal_vector(std::size_t(T) * H * d, rng),
                           v = kvq::test::normal_vector(k.size(), rng);
        std::vector<float> q = kvq::test::normal_vector(std::size_t(T) * H * d, rng), out(std::size_t(H) * d);
        kvq::AttentionWorkspace ws;
        for (int t = 0; t < T; ++t) {
            kvq::decode_step(cache, 0, &q[std::size_t(t) * H * d], H, &k[std::size_t(t) * H * d],
                             &v[std::size_t(t) * H * d], out.data(), ws);
            const int n = t + 1;
            // Keys: once R tokens have gathered in the residual, all R are encoded at once.
            const int k_enc = (n / R) * R, v_enc = std::max(0, n - R);
            for (int h = 0; h < H; ++h) {
                const kvq::StreamView ks = cache.keys(0, h), vs = cache.values(0, h);
                ASSERT_EQ(ks.encoded, k_enc) << "step " << n;
                ASSERT_EQ(ks.window_tokens, n - k_enc) << "step " << n;
                ASSERT_EQ(vs.encoded, v_enc) << "step " << n;
                ASSERT_EQ(vs.window_tokens, n - v_enc) << "step " << n;
            }
            ASSERT_LT(cache.keys(0, 0).window_tokens, R);
        }
        // Attention through the whole cache stays close to float64 (2-bit, so loosely).
        std::vector<double> ref(std::size_t(T) * H * d);
        kvq::reference_attention(q.data(), k.data(), v.data(), T, H, H, d, ref.data());
        double num = 0, den = 0;
        for (int c = 0; c < H * d; ++c) {
            const double r = ref[std::size_t(T - 1) * H * d + c];
            num += (out[c] - r) * (out[c] - r);
            den += r * r;
        }
        err[bits / 4] = std::sqrt(num / den);
        std::printf("[ kivi ] %d-bit, last step attn_rel_err %.3g\n", bits, err[bits / 4]);
    }
    EXPECT_LT(err[1], 0.25);
    EXPECT_LT(err[1], 0.5 * err[0]);
}
