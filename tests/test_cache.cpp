// The paged cache and attention: identity caches against float64 attention, window/flush policy,
// memory accounting, and the strong guarantee on bad input.
#include <gtest/gtest.h>

#include <random>

#include "kvq/kvq.hpp"
#include "test_util.hpp"

namespace {

struct Data {
    int T, Hq, H, d;
    std::vector<float> q, k, v;  // [T][H][d]
};
Data random_data(int T, int Hq, int H, int d, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    Data x{T,
           Hq,
           H,
           d,
           kvq::test::normal_vector(std::size_t(T) * Hq * d, rng),
           kvq::test::normal_vector(std::size_t(T) * H * d, rng),
           kvq::test::normal_vector(std::size_t(T) * H * d, rng)};
    return x;
}

// Runs token-by-token decode over all of x, returning outputs [T][Hq][d].
std::vector<float> run_decode(kvq::KvCache& cache, const Data& x, int layer = 0) {
    std::vector<float> out(std::size_t(x.T) * x.Hq * x.d);
    kvq::AttentionWorkspace ws;
    for (int t = 0; t < x.T; ++t)
        kvq::decode_step(cache, layer, &x.q[std::size_t(t) * x.Hq * x.d], x.Hq, &x.k[std::size_t(t) * x.H * x.d],
                         &x.v[std::size_t(t) * x.H * x.d], &out[std::size_t(t) * x.Hq * x.d], ws);
    return out;
}

std::vector<double> reference(const Data& x) {
    std::vector<double> ref(std::size_t(x.T) * x.Hq * x.d);
    kvq::reference_attention(x.q.data(), x.k.data(), x.v.data(), x.T, x.Hq, x.H, x.d, ref.data());
    return ref;
}

std::shared_ptr<kvq::Codec> fp32(int d) { return std::make_shared<kvq::IdentityCodec>(d, kvq::StorageType::F32); }

TEST(Cache, Fp32IdentityDecodeMatchesFloat64Attention) {
    for (int d : {64, 128, 256, 40})
        for (int group : {1, 2, 4})
            for (bool poq : {true, false}) {
                const int H = 2, T = 150;
                const Data x = random_data(T, H * group, H, d, 31 + d + group);
                kvq::CacheConfig cfg{1, H, d, 16, {}, {}, poq};
                kvq::KvCache cache(cfg, fp32(d), fp32(d));
                const auto out = run_decode(cache, x);
                // float32 scores and softmax against float64: relative error a few float eps * sqrt(d).
                EXPECT_LE(kvq::test::rel_err(out, reference(x)), 1e-6) << "d " << d << " group " << group;
            }
}

TEST(Cache, PrefillEqualsDecodeAndReference) {
    const int d = 64, H = 2, Hq = 6, T = 70;
    const Data x = random_data(T, Hq, H, d, 33);
    for (bool poq : {true, false}) {
        kvq::KvCache cache(kvq::CacheConfig{1, H, d, 32, {5, kvq::FlushMode::Sliding}, {}, poq}, fp32(d), fp32(d));
        std::vector<float> out(std::size_t(T) * Hq * d);
        kvq::AttentionWorkspace ws;
        // A prompt of 40 tokens, then 30 decode steps.
        kvq::prefill(cache, 0, x.q.data(), Hq, x.k.data(), x.v.data(), 40, out.data(), ws);
        for (int t = 40; t < T; ++t)
            kvq::decode_step(cache, 0, &x.q[std::size_t(t) * Hq * d], Hq, &x.k[std::size_t(t) * H * d],
                             &x.v[std::size_t(t) * H * d], &out[std::size_t(t) * Hq * d], ws);
        EXPECT_LE(kvq::test::rel_err(out, reference(x)), 1e-6);
        EXPECT_EQ(cache.tokens(0), T);
    }
}

TEST(Cache, QuantizedPrefillIsExactUnderPastOnlyAndNotWithout) {
    const int d = 64, H = 1, T = 48;
    const Data x = random_data(T, H, H, d, 34);
    auto int2 = std::make_shared<kvq::TokenwiseCodec>(kvq::TokenwiseParams{d, 2, 32});
    double err[2];
    for (int poq = 0; poq < 2; ++poq) {
        kvq::KvCache cache(kvq::CacheConfig{1, H, d, 16, {}, {}, poq == 1}, int2, int2);
        std::vector<float> out(std::size_t(T) * d);
        kvq::AttentionWorkspace ws;
        kvq::prefill(cache, 0, x.q.data(), H, x.k.data(), x.v.data(), T, out.data(), ws);
        err[poq] = kvq::test::rel_err(out, reference(x));
    }
    EXPECT_LE(err[1], 1e-6);  // a fresh prompt under POQ attends only to exact K/V
    EXPECT_GT(err[0], 1e-2);  // without POQ it reads 2-bit K/V back
}

TEST(Cache, WindowAndFlushPolicies) {
    const int d = 64, H = 1;
    const Data x = random_data(300, 1, H, d, 35);
    auto int4 = std::make_shared<kvq::TokenwiseCodec>(kvq::TokenwiseParams{d, 4, 32});
    auto qjl = std::make_shared<kvq::QjlKeyCodec>(kvq::QjlParams{d, 64, 64, 4});
    // Sliding window of 8, granularity 1: exactly 8 newest tokens stay fp32.
    {
        kvq::KvCache c(kvq::CacheConfig{1, H, d, 16, {8}, {8}, true}, int4, int4);
        for (int t = 0; t < 20; ++t) {
            c.append(0, &x.k[t * d], &x.v[t * d], 1);
            EXPECT_EQ(c.keys(0, 0).window_tokens, std::min(t + 1, 8));
            EXPECT_EQ(c.keys(0, 0).encoded, std::max(0, t + 1 - 8));
        }
    }
    // QJL with outliers encodes whole 32-token groups: with R = 0 up to 31 tokens wait in the window.
    // Chunk window of 128 for keys (KIVI / QJL official), sliding 128 for values.
    {
        kvq::KvCache c(kvq::CacheConfig{1, H, d, 64, {128, kvq::FlushMode::Chunk}, {128}, true}, qjl, int4);
        for (int t = 0; t < 300; ++t) {
            c.append(0, &x.k[t * d], &x.v[t * d], 1);
            const int n = t + 1;
            EXPECT_EQ(c.keys(0, 0).encoded, n / 128 * 128) << n;
            EXPECT_EQ(c.keys(0, 0).window_tokens, n % 128) << n;
            EXPECT_EQ(c.values(0, 0).window_tokens, std::min(n, 128)) << n;
        }
    }
    {
        kvq::KvCache c(kvq::CacheConfig{1, H, d, 64, {}, {}, true}, qjl, int4);
        c.append(0, x.k.data(), x.v.data(), 70);
        EXPECT_EQ(c.keys(0, 0).encoded, 64);
        EXPECT_EQ(c.keys(0, 0).window_tokens, 6);
        EXPECT_EQ(c.values(0, 0).encoded, 70);
    }
}

TEST(Cache, MemoryAccountingEqualsAllocatedBytes) {
    const int d = 128, H = 4, L = 3, B = 32;
    auto qjl = std::make_shared<kvq::QjlKeyCodec>(kvq::QjlParams{d, 256, 128, 8});
    auto int2 = std::make_shared<kvq::TokenwiseCodec>(kvq::TokenwiseParams{d, 2, 32});
    auto kpool = std::make_shared<kvq::BlockPool>(qjl->layout(B));
    auto vpool = std::make_shared<kvq::BlockPool>(int2->layout(B));
    kvq::KvCache cache(kvq::CacheConfig{L, H, d, B, {16}, {16}, true}, qjl, int2, kpool, vpool);
    const Data x = random_data(200, H, H, d, 36);
    for (int l = 0; l < L; ++l) cache.append(l, x.k.data(), x.v.data(), 100 + 30 * l);
    const auto m = cache.memory();
    EXPECT_EQ(m.key_block_bytes, kpool->bytes_in_use());
    EXPECT_EQ(m.value_block_bytes, vpool->bytes_in_use());
    std::size_t kblocks = 0, vblocks = 0, win = 0;
    for (int l = 0; l < L; ++l) {
        const int n = 100 + 30 * l;
        const int kenc = (n - 16) / 32 * 32, venc = n - 16;
        kblocks += H * ((kenc + B - 1) / B);
        vblocks += H * ((venc + B - 1) / B);
        win += std::size_t(H) * d * ((n - kenc) + (n - venc)) * 4;
    }
    EXPECT_EQ(m.key_block_bytes, kblocks * qjl->layout(B).bytes());
    EXPECT_EQ(m.value_block_bytes, vblocks * int2->layout(B).bytes());
    EXPECT_EQ(m.window_bytes, win);
    EXPECT_DOUBLE_EQ(m.value_bits_per_element, 3.0);
    cache.clear();
    EXPECT_EQ(kpool->bytes_in_use(), 0u);
    EXPECT_EQ(vpool->bytes_in_use(), 0u);
}

TEST(Cache, BadInputThrowsAndLeavesTheCacheUnchanged) {
    const int d = 64, H = 2;
    auto int4 = std::make_shared<kvq::TokenwiseCodec>(kvq::TokenwiseParams{d, 4, 32});
    auto pool = std::make_shared<kvq::BlockPool>(int4->layout(16), 4);  // room for 4 blocks only
    kvq::KvCache cache(kvq::CacheConfig{2, H, d, 16, {}, {}, true}, int4, int4, pool, pool);
    Data x = random_data(40, H, H, d, 37);
    cache.append(0, x.k.data(), x.v.data(), 10);
    const auto before = cache.memory();
    auto expect_unchanged = [&] {
        EXPECT_EQ(cache.tokens(0), 10);
        EXPECT_EQ(cache.memory().key_block_bytes, before.key_block_bytes);
        EXPECT_EQ(cache.memory().window_bytes, before.window_bytes);
        EXPECT_EQ(pool->blocks_in_use(), 4u);
    };
    Data bad = x;
    bad.k[3 * H * d + 5] = NAN;  // token 3 of a 5-token append
    EXPECT_THROW(cache.append(0, &bad.k[0], &bad.v[0], 5), kvq::Error);
    expect_unchanged();
    bad = x;
    bad.v[7] = -INFINITY;
    EXPECT_THROW(cache.append(0, &bad.k[0], &bad.v[0], 1), kvq::Error);
    expect_unchanged();
    EXPECT_THROW(cache.append(0, &x.k[0], &x.v[0], 30), kvq::Error);  // needs more blocks than the pool has
    expect_unchanged();
    EXPECT_THROW(cache.append(2, &x.k[0], &x.v[0], 1), kvq::Error);  // layer out of range
    EXPECT_THROW(cache.keys(0, 2), kvq::Error);                      // head out of range
    EXPECT_THROW(pool->data(4), kvq::Error);                         // block id out of range
    std::vector<float> q(std::size_t(3) * d), out(std::size_t(3) * d);
    kvq::AttentionWorkspace ws;
    EXPECT_THROW(kvq::decode_step(cache, 0, q.data(), 3, x.k.data(), x.v.data(), out.data(), ws), kvq::Error);  // 3 % 2
    bad = x;
    bad.k[0] = NAN;
    q.resize(std::size_t(2) * d);
    EXPECT_THROW(kvq::decode_step(cache, 0, q.data(), 2, bad.k.data(), bad.v.data(), out.data(), ws), kvq::Error);
    expect_unchanged();
    // Unsupported shapes and mismatched codecs.
    EXPECT_THROW(kvq::KvCache(kvq::CacheConfig{1, H, 128, 16}, int4, int4), kvq::Error);
    EXPECT_THROW(kvq::KvCache(kvq::CacheConfig{1, H, d, 24}, int4, int4), kvq::Error);  // B not a power of two
    auto qjl = std::make_shared<kvq::QjlKeyCodec>(kvq::QjlParams{d, 64, 64, 0});
    EXPECT_THROW(kvq::KvCache(kvq::CacheConfig{1, H, d, 16}, int4, qjl), kvq::Error);  // QJL cannot hold values
}

TEST(Cache, QjlAttentionErrorFallsAsSketchGrows) {
    // Keys with per-channel bias and 4 large outlier channels; 4 heads, 3 seeds each.
    const int d = 128, H = 4, T = 256;
    std::mt19937_64 rng(38);
    Data x = random_data(T, H, H, d, 39);
    for (int h = 0; h < H; ++h)
        for (int c = 0; c < d; ++c) {
            const float bias = std::normal_distribution<float>(0, 1)(rng), scale = (c % 37 == 5) ? 10.0f : 1.0f;
            for (int t = 0; t < T; ++t)
                x.k[(std::size_t(t) * H + h) * d + c] = scale * (x.k[(std::size_t(t) * H + h) * d + c] + bias);
        }
    const auto ref = reference(x);
    auto fp = fp32(d);
    double prev = 1e9;
    for (int m : {64, 128, 256, 512, 1024}) {
        double err = 0;
        for (std::uint64_t seed : {1, 2, 3}) {
            auto qjl = std::make_shared<kvq::QjlKeyCodec>(
                kvq::QjlParams{d, m, 128, 4, kvq::SketchKind::BlockOrthogonal, seed});
            kvq::KvCache cache(kvq::CacheConfig{1, H, d, 64, {}, {}, true}, qjl, fp);
            err += kvq::test::rel_err(run_decode(cache, x), ref) / 3;
        }
        std::printf("  QJL m=%4d: attention rel err %.4f\n", m, err);
        // Estimator sd scales as 1/sqrt(m): doubling m should cut the error by ~0.71; require < 0.9x.
        EXPECT_LT(err, 0.9 * prev) << "m " << m;
        prev = err;
    }
}

}  // namespace
