// WKVQuant KV path: exact algebra of the smoothing adapter (route (b) of ALGORITHMS.md §2.2)
// against float64 attention and against route (a) (dequantize fully), the current-key bug, past-only
// with an identity quantizer, and the paper's ablations in miniature on the synthetic workload.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "kvq/calibration/kv_calibration.hpp"
#include "kvq/eval/method_spec.hpp"
#include "kvq/kvq.hpp"
#include "kvq/quant/wkv_codec.hpp"
#include "kvq/workload/synthetic.hpp"
#include "test_util.hpp"

namespace {

struct Data {
    int T, Hq, H, d;
    std::vector<float> q, k, v;  // token-major
};

// Keys with a per-channel bias and a few outlier channels, as smoothing is meant for.
Data biased_data(int T, int Hq, int H, int d, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    Data x{T,
           Hq,
           H,
           d,
           kvq::test::normal_vector(std::size_t(T) * Hq * d, rng),
           kvq::test::normal_vector(std::size_t(T) * H * d, rng),
           kvq::test::normal_vector(std::size_t(T) * H * d, rng)};
    std::vector<float> bias = kvq::test::normal_vector(std::size_t(H) * d, rng);
    for (int t = 0; t < T; ++t)
        for (int c = 0; c < H * d; ++c) {
            x.k[std::size_t(t) * H * d + c] =
                x.k[std::size_t(t) * H * d + c] * (c % 17 == 3 ? 8.0f : 1.0f) + 2.0f * bias[c];
            x.v[std::size_t(t) * H * d + c] += bias[c];
        }
    for (float& q : x.q) q *= 0.5f;
    return x;
}

std::shared_ptr<kvq::WkvParams> random_params(int H, int d, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> shift(-3.0f, 3.0f), logs(-1.5f, 1.5f);
    auto P = std::make_shared<kvq::WkvParams>(kvq::WkvParams::identity(1, H, d));
    for (auto* v : {&P->layers[0].k_shift, &P->layers[0].v_shift})
        for (float& x : *v) x = shift(rng);
    for (auto* v : {&P->layers[0].k_scale, &P->layers[0].v_scale})
        for (float& x : *v) x = std::exp(logs(rng));
    return P;
}

kvq::CacheConfig config(int H, int d, int B, bool past_only, int window = 0) {
    kvq::CacheConfig c;
    c.n_kv_heads = H;
    c.head_dim = d;
    c.block_tokens = B;
    c.past_only = past_only;
    c.key_window = c.value_window = {window, kvq::FlushMode::Sliding};
    return c;
}

double max_rel(const std::vector<float>& a, const std::vector<double>& ref) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        num = std::max(num, std::fabs(double(a[i]) - ref[i]));
        den = std::max(den, std::fabs(ref[i]));
    }
    return num / den;
}

std::vector<float> run_wkv(kvq::WkvKvCache& cache, const Data& x, std::vector<float>* scores_last = nullptr) {
    std::vector<float> out(std::size_t(x.T) * x.Hq * x.d), sc(std::size_t(x.Hq) * x.T);
    kvq::AttentionWorkspace ws;
    for (int t = 0; t < x.T; ++t)
        cache.decode_step(0, &x.q[std::size_t(t) * x.Hq * x.d], x.Hq, &x.k[std::size_t(t) * x.H * x.d],
                          &x.v[std::size_t(t) * x.H * x.d], &out[std::size_t(t) * x.Hq * x.d], ws, sc.data());
    if (scores_last) *scores_last = sc;
    return out;
}

}  // namespace

TEST(Wkv, SmoothedIdentityCacheEqualsFloat64Attention) {
    const Data x = biased_data(100, 4, 2, 64, 1);
    auto fp32 = std::make_shared<kvq::IdentityCodec>(x.d, kvq::StorageType::F32);
    for (bool poq : {true, false}) {
        kvq::WkvKvCache cache(config(x.H, x.d, 16, poq), fp32, fp32, random_params(x.H, x.d, 2));
        std::vector<float> scores;
        const std::vector<float> out = run_wkv(cache, x, &scores);
        std::vector<double> ref(out.size());
        kvq::reference_attention(x.q.data(), x.k.data(), x.v.data(), x.T, x.Hq, x.H, x.d, ref.data());
        EXPECT_LT(max_rel(out, ref), 2e-5) << "poq=" << poq;
        // Scores handed back are the raw q.k/sqrt(d) (the <q, delta_K> constant restored).
        const int t = x.T - 1;
        for (int hq = 0; hq < x.Hq; ++hq)
            for (int j = 0; j <= t; j += 7) {
                double s = 0;
                for (int c = 0; c < x.d; ++c)
                    s += double(x.q[(std::size_t(t) * x.Hq + hq) * x.d + c]) *
                         x.k[(std::size_t(j) * x.H + hq / 2) * x.d + c];
                s /= std::sqrt(double(x.d));
                EXPECT_NEAR(scores[std::size_t(hq) * x.T + j], s, 1e-3 * (1 + std::fabs(s)));
            }
    }
}

// Route (b) (folded query, output un-smoothed once) equals route (a): dequantize every past token
// fully, x^ = Q(x~) (.) s + delta, and attend in float64 with the current token exact.
TEST(Wkv, FoldedQueryEqualsFullDequantization) {
    const Data x = biased_data(90, 4, 2, 64, 3);
    auto P = random_params(x.H, x.d, 4);
    auto codec = std::make_shared<kvq::WkvCodec>(x.d, 4);
    kvq::WkvKvCache cache(config(x.H, x.d, 32, true), codec, codec, P);
    const std::vector<float> out = run_wkv(cache, x);
    // Route (a): the dequantized K, V of every token, from the cache's own blocks.
    const int T = x.T, H = x.H, d = x.d;
    std::vector<float> kh(x.k.size()), vh(x.v.size());
    for (int h = 0; h < H; ++h) {
        const kvq::StreamView ks = cache.cache().keys(0, h), vs = cache.cache().values(0, h);
        ASSERT_EQ(ks.encoded, T);
        std::vector<float> row(d);
        for (int t = 0; t < T; ++t) {
            const int B = ks.block_tokens;
            ks.codec->decode(ks.pool->data(ks.pages[t / B]), B, t % B, 1, row.data());
            for (int c = 0; c < d; ++c)
                kh[(std::size_t(t) * H + h) * d + c] =
                    row[c] * P->layers[0].k_scale[h * d + c] + P->layers[0].k_shift[h * d + c];
            vs.codec->decode(vs.pool->data(vs.pages[t / B]), B, t % B, 1, row.data());
            for (int c = 0; c < d; ++c)
                vh[(std::size_t(t) * H + h) * d + c] =
                    row[c] * P->layers[0].v_scale[h * d + c] + P->layers[0].v_shift[h * d + c];
        }
    }
    std::vector<double> ref(out.size());
    const int group = x.Hq / H;
    for (int t = 0; t < T; ++t)
        for (int hq = 0; hq < x.Hq; ++hq) {
            const int h = hq / group;
            std::vector<double> s(t + 1);
            double mx = -1e300;
            for (int j = 0; j <= t; ++j) {
                const float* kj = j == t ? &x.k[(std::size_t(j) * H + h) * d] : &kh[(std::size_t(j) * H + h) * d];
                double a = 0;
                for (int c = 0; c < d; ++c) a += double(x.q[(std::size_t(t) * x.Hq + hq) * d + c]) * kj[c];
                mx = std::max(mx, s[j] = a / std::sqrt(double(d)));
            }
            double sum = 0;
            for (int j = 0; j <= t; ++j) sum += (s[j] = std::exp(s[j] - mx));
            for (int c = 0; c < d; ++c) {
                double a = 0;
                for (int j = 0; j <= t; ++j)
                    a += s[j] * (j == t ? x.v[(std::size_t(j) * H + h) * d + c] : vh[(std::size_t(j) * H + h) * d + c]);
                ref[(std::size_t(t) * x.Hq + hq) * d + c] = a / sum;
            }
        }
    const double err = max_rel(out, ref);
    std::printf("[ wkv ] route (b) vs route (a): max rel diff %.3g\n", err);
    EXPECT_LT(err, 5e-5);
}

// The current-key bug: past keys scored in smoothed coordinates with the folded query, but the
// current (exact, past-only) key taken raw. Built by hand on top of kvq::attend; it must differ
// measurably from float64 attention, while the correct variant (current key smoothed too) matches.
TEST(Wkv, CurrentKeyBugIsDetected) {
    const Data x = biased_data(64, 2, 1, 64, 5);
    auto P = random_params(x.H, x.d, 6);
    const auto& L = P->layers[0];
    auto fp32 = std::make_shared<kvq::IdentityCodec>(x.d, kvq::StorageType::F32);
    kvq::KvCache cache(config(x.H, x.d, 16, true), fp32, fp32);
    const int T = x.T, d = x.d, Hq = x.Hq;
    std::vector<float> ks(x.k.size()), vs(x.v.size());
    kvq::wkv_smooth_rows(x.k.data(), T, L.k_shift, L.k_scale, ks.data());
    kvq::wkv_smooth_rows(x.v.data(), T, L.v_shift, L.v_scale, vs.data());
    cache.append(0, ks.data(), vs.data(), T - 1);  // the past
    const float* q = &x.q[std::size_t(T - 1) * Hq * d];
    std::vector<float> qf(std::size_t(Hq) * d);
    for (int hq = 0; hq < Hq; ++hq)
        for (int c = 0; c < d; ++c) qf[hq * d + c] = q[hq * d + c] * L.k_scale[c];
    const float* v_cur = &vs[std::size_t(T - 1) * d];
    std::vector<float> good(std::size_t(Hq) * d), bad(good.size());
    kvq::AttentionWorkspace ws;
    kvq::attend(cache, 0, qf.data(), Hq, T - 1, kvq::ExactTokens{&ks[std::size_t(T - 1) * d], v_cur, 1}, 1, good.data(),
                ws);
    kvq::attend(cache, 0, qf.data(), Hq, T - 1, kvq::ExactTokens{&x.k[std::size_t(T - 1) * d], v_cur, 1}, 1, bad.data(),
                ws);
    for (auto* o : {&good, &bad})
        for (int hq = 0; hq < Hq; ++hq)
            for (int c = 0; c < d; ++c) (*o)[hq * d + c] = (*o)[hq * d + c] * L.v_scale[c] + L.v_shift[c];
    std::vector<double> ref(std::size_t(T) * Hq * d);
    kvq::reference_attention(x.q.data(), x.k.data(), x.v.data(), T, Hq, x.H, d, ref.data());
    const std::vector<double> last(ref.end() - std::ptrdiff_t(Hq) * d, ref.end());
    const double eg = max_rel(good, last), eb = max_rel(bad, last);
    std::printf("[ wkv ] current key smoothed: max rel err %.3g; raw current key (bug): %.3g\n", eg, eb);
    EXPECT_LT(eg, 2e-5);
    EXPECT_GT(eb, 1e-2);
}

// Past-only with an identity quantizer is the full-precision cache: the stored tokens are the input
// bit for bit, and the decode outputs equal those of the store-first (POQ off) fp32 cache to fp32
// rounding of the summation order, and bit for bit when every token stays in the fp32 window.
TEST(Wkv, PastOnlyIdentityEqualsFullPrecision) {
    const Data x = biased_data(70, 4, 2, 32, 7);
    auto fp32 = std::make_shared<kvq::IdentityCodec>(x.d, kvq::StorageType::F32);
    auto P = std::make_shared<kvq::WkvParams>(kvq::WkvParams::identity(1, x.H, x.d));
    for (int window : {0, 1 << 10}) {
        kvq::WkvKvCache on(config(x.H, x.d, 16, true, window), fp32, fp32, P);
        kvq::WkvKvCache off(config(x.H, x.d, 16, false, window), fp32, fp32, P);
        const std::vector<float> a = run_wkv(on, x), b = run_wkv(off, x);
        double diff = 0;
        for (std::size_t i = 0; i < a.size(); ++i) diff = std::max(diff, double(std::fabs(a[i] - b[i])));
        std::printf("[ wkv ] POQ on vs off, identity codec, window=%d: max |diff| %.3g\n", window, diff);
        if (window > 0)
            EXPECT_EQ(diff, 0.0);
        else
            EXPECT_LT(diff, 1e-5);
        // Stored contents, bit for bit.
        for (int h = 0; h < x.H; ++h) {
            const kvq::StreamView ks = on.cache().keys(0, h);
            std::vector<float> row(x.d);
            for (int t = 0; t < x.T; ++t) {
                const float* src;
                if (t < ks.encoded) {
                    ks.codec->decode(ks.pool->data(ks.pages[t / ks.block_tokens]), ks.block_tokens, t % ks.block_tokens,
                                     1, row.data());
                    src = row.data();
                } else {
                    src = ks.window + std::size_t(t - ks.encoded) * ks.window_stride;
                }
                ASSERT_EQ(0, std::memcmp(src, &x.k[(std::size_t(t) * x.H + h) * x.d], x.d * sizeof(float)));
            }
        }
    }
}

TEST(Wkv, BadParamsAndInputThrow) {
    auto codec = std::make_shared<kvq::WkvCodec>(64, 4);
    auto P = std::make_shared<kvq::WkvParams>(kvq::WkvParams::identity(1, 2, 64));
    EXPECT_THROW(kvq::WkvKvCache(config(3, 64, 16, true), codec, codec, P), kvq::Error);  // shape
    auto Pn = std::make_shared<kvq::WkvParams>(*P);
    Pn->layers[0].k_scale[5] = 0.0f;
    EXPECT_THROW(kvq::WkvKvCache(config(2, 64, 16, true), codec, codec, Pn), kvq::Error);
    Pn->layers[0].k_scale[5] = std::nanf("");
    EXPECT_THROW(kvq::WkvKvCache(config(2, 64, 16, true), codec, codec, Pn), kvq::Error);
    EXPECT_THROW(kvq::WkvCodec(64, 5), kvq::Error);
    EXPECT_NEAR(kvq::WkvCodec(128, 4).bits_per_element(64), 4.25, 1e-9);  // fp16 step + min per token-head
    kvq::WkvKvCache cache(config(2, 64, 16, true), codec, codec, P);
    std::vector<float> k(128, 1.0f), v(128, 1.0f), q(128, 1.0f), out(128);
    k[3] = std::nanf("");
    kvq::AttentionWorkspace ws;
    EXPECT_THROW(cache.decode_step(0, q.data(), 2, k.data(), v.data(), out.data(), ws), kvq::Error);
    EXPECT_EQ(cache.tokens(0), 0);
}

// ---------------------------------------------------------------------------------------------
// Ablations in miniature (WKVQuant Table 4 style) on kvq-eval's synthetic generator, 4 bits, g = d:
// calibration on the first half of the tokens, attention error measured on the second half.

namespace {

struct Ablation {
    kvq::workload::SyntheticSpec spec;
    std::vector<float> k, v, q;  // token-major
    std::vector<double> ref;     // float64 outputs [T][Hq][d]
    kvq::calib::KvCalibData calib;
};

std::vector<float> token_major(const std::vector<float>& x, int H, int T, int d) {
    std::vector<float> out(x.size());
    for (int h = 0; h < H; ++h)
        for (int t = 0; t < T; ++t)
            std::copy_n(&x[(std::size_t(h) * T + t) * d], d, &out[(std::size_t(t) * H + h) * d]);
    return out;
}

const Ablation& ablation() {
    static const Ablation a = [] {
        Ablation a;
        a.spec.layers = 1;
        a.spec.kv_heads = 2;
        a.spec.q_heads = 4;
        a.spec.tokens = 384;
        const auto L = kvq::workload::generate_layer(a.spec, 0);
        const int T = a.spec.tokens, H = a.spec.kv_heads, Hq = a.spec.q_heads, d = a.spec.head_dim;
        a.k = token_major(L.k, H, T, d);
        a.v = token_major(L.v, H, T, d);
        a.q = token_major(L.q, Hq, T, d);
        a.ref.resize(std::size_t(T) * Hq * d);
        kvq::reference_attention(a.q.data(), a.k.data(), a.v.data(), T, Hq, H, d, a.ref.data());
        const int Tc = T / 2;
        a.calib.n_kv_heads = H;
        a.calib.n_q_heads = Hq;
        a.calib.head_dim = d;
        a.calib.tokens = Tc;
        a.calib.k.assign(a.k.begin(), a.k.begin() + std::ptrdiff_t(Tc) * H * d);
        a.calib.v.assign(a.v.begin(), a.v.begin() + std::ptrdiff_t(Tc) * H * d);
        a.calib.q.assign(a.q.begin(), a.q.begin() + std::ptrdiff_t(Tc) * Hq * d);
        return a;
    }();
    return a;
}

// Relative L2 attention-output error over the second half of the decode steps. Keys always go
// through the WKV codec; values through it too, or stay fp32 (the key path's effect alone).
double attn_error(const kvq::WkvLayerParams& lp, bool poq, bool quantize_values) {
    const Ablation& a = ablation();
    const int T = a.spec.tokens, H = a.spec.kv_heads, Hq = a.spec.q_heads, d = a.spec.head_dim;
    auto P = std::make_shared<kvq::WkvParams>(kvq::WkvParams::identity(1, H, d));
    P->layers[0] = lp;
    std::shared_ptr<const kvq::Codec> codec = std::make_shared<kvq::WkvCodec>(d, 4);
    std::shared_ptr<const kvq::Codec> vcodec = codec;
    if (!quantize_values) vcodec = std::make_shared<kvq::IdentityCodec>(d, kvq::StorageType::F32);
    kvq::WkvKvCache cache(config(H, d, 64, poq), codec, vcodec, P, true, quantize_values);
    std::vector<float> out(std::size_t(Hq) * d);
    kvq::AttentionWorkspace ws;
    double num = 0, den = 0;
    for (int t = 0; t < T; ++t) {
        cache.decode_step(0, &a.q[std::size_t(t) * Hq * d], Hq, &a.k[std::size_t(t) * H * d],
                          &a.v[std::size_t(t) * H * d], out.data(), ws);
        if (t < T / 2) continue;
        for (int i = 0; i < Hq * d; ++i) {
            const double r = a.ref[std::size_t(t) * Hq * d + i], e = out[i] - r;
            num += e * e;
            den += r * r;
        }
    }
    return std::sqrt(num / den);
}

}  // namespace

TEST(Wkv, AblationsInMiniature) {
    const Ablation& a = ablation();
    const int H = a.spec.kv_heads, d = a.spec.head_dim;
    const kvq::WkvLayerParams none = kvq::WkvParams::identity(1, H, d).layers[0];
    const kvq::WkvLayerParams stats = kvq::calib::calibrate_stats(a.calib);
    kvq::calib::OptOptions oo;
    oo.iterations = 30;
    oo.queries_per_head = 64;
    kvq::calib::OptReport rep;
    const kvq::WkvLayerParams opt = kvq::calib::calibrate_opt(a.calib, stats, oo, &rep);
    // Key path (values fp32): what smoothing is for -- per-channel bias and outlier channels.
    const double k_none = attn_error(none, true, false), k_stats = attn_error(stats, true, false),
                 k_opt = attn_error(opt, true, false), k_stats_off = attn_error(stats, false, false),
                 k_opt_off = attn_error(opt, false, false);
    // K4 V4 (the synthetic values are flat Gaussians: their per-token error is the floor here).
    const double kv_none = attn_error(none, true, true), kv_stats = attn_error(stats, true, true),
                 kv_opt = attn_error(opt, true, true), kv_stats_off = attn_error(stats, false, true);
    std::printf(
        "[ ablation ] synthetic T=%d, 2 KV / 4 query heads, d=%d; calibrated on the first half, attn_rel_err on the\n"
        "[ ablation ] second half; 4 bits, g=d (per-token-only = the same token-wise codec, delta=0, s=1)\n",
        a.spec.tokens, d);
    std::printf("[ ablation ]                         K4 (V fp32)        K4 V4\n");
    std::printf("[ ablation ]   per-token only        %.4e         %.4e\n", k_none, kv_none);
    std::printf("[ ablation ]   2-D stats             %.4e         %.4e\n", k_stats, kv_stats);
    std::printf("[ ablation ]   2-D opt               %.4e         %.4e\n", k_opt, kv_opt);
    std::printf("[ ablation ]   2-D stats, POQ off    %.4e         %.4e\n", k_stats_off, kv_stats_off);
    std::printf("[ ablation ]   2-D opt, POQ off      %.4e\n", k_opt_off);
    std::printf("[ ablation ]   opt calibration loss (MAE) %.4e -> %.4e (best iteration %d of %d)\n", rep.initial_loss,
                rep.best_loss, rep.best_iteration, oo.iterations);
    EXPECT_LT(k_stats, 0.5 * k_none);    // 2-D beats per-token-only (measured ratio ~0.27)
    EXPECT_LT(kv_stats, 0.8 * kv_none);  // also with 4-bit values (~0.56)
    EXPECT_LT(k_opt, 0.9 * k_stats);     // calibrated (opt) beats stats (~0.79)
    EXPECT_LT(rep.best_loss, 0.95 * rep.initial_loss);
    EXPECT_LE(k_stats, k_stats_off);  // POQ on is no worse than off
    EXPECT_LE(k_opt, k_opt_off);
    EXPECT_LE(kv_stats, kv_stats_off);
}

TEST(Wkv, MethodSpecsWkvKiviAndMixing) {
    using kvq::calib::CalibMode;
    using kvq::eval::make_method;
    using kvq::eval::parse_kv_spec;
    kvq::eval::Method m = make_method("wkv:bits=4", 128);
    EXPECT_EQ(m.key_codec->id(), kvq::CodecId::Wkv);
    EXPECT_EQ(m.key_codec->name(), "wkv4:g=128");
    EXPECT_TRUE(m.smooth_keys && m.smooth_values && m.past_only);
    EXPECT_EQ(m.key_calib, CalibMode::Stats);
    m = make_method("wkv:bits=2,g=32,calib=opt,poq=off", 128);
    EXPECT_EQ(m.value_codec->name(), "wkv2:g=32");
    EXPECT_EQ(m.value_calib, CalibMode::Opt);
    EXPECT_FALSE(m.cache_config(1, 1, 64).past_only);
    EXPECT_EQ(m.calib_bits, 2);
    EXPECT_EQ(m.calib_group, 32);
    EXPECT_EQ(parse_kv_spec("wkv:poq=off,calib=none,bits=04").canonical(), "wkv:bits=4,calib=none,poq=off");
    m = make_method("kivi:bits=2", 128);
    EXPECT_EQ(m.key_codec->id(), kvq::CodecId::KiviKey);
    EXPECT_EQ(m.value_codec->name(), "int2:g=32");
    EXPECT_EQ(m.key_window.tokens, 128);
    EXPECT_EQ(m.key_window.mode, kvq::FlushMode::Chunk);
    EXPECT_EQ(m.value_window.tokens, 128);
    EXPECT_EQ(m.value_window.mode, kvq::FlushMode::Sliding);
    EXPECT_EQ(make_method("kivi:bits=4,window=64", 128).key_window.tokens, 64);
    m = make_method("k=qjl:m=256;v=wkv:bits=4", 128);
    EXPECT_TRUE(m.mixed);
    EXPECT_EQ(m.key_codec->id(), kvq::CodecId::Qjl);
    EXPECT_EQ(m.value_codec->id(), kvq::CodecId::Wkv);
    EXPECT_FALSE(m.smooth_keys);
    EXPECT_TRUE(m.smooth_values);
    EXPECT_EQ(m.canonical(), "k=qjl:m=256;v=wkv:bits=4");
    EXPECT_EQ(parse_kv_spec(m.canonical()), parse_kv_spec("k=qjl:m=0256;v=wkv:bits=4"));
    m = make_method("k=kivi:bits=2;v=int4:window=16", 128);
    EXPECT_EQ(m.key_window.tokens, 128);
    EXPECT_EQ(m.value_window.tokens, 16);
    EXPECT_FALSE(make_method("k=int4:poq=off;v=int2", 128).past_only);
    for (const char* bad : {"wkv:bits=5", "wkv:g=7", "wkv:g=0", "wkv:calib=foo", "k=int4", "k=int4;x=int2",
                            "k=int4;v=int2;v=int2", "k=int4:poq=on;v=int2:poq=off", "kivi:bits=3", "kivi:window=100",
                            "kivi:kflush=chunk", "k=;v=int2", "int4:poq=maybe"})
        EXPECT_THROW(make_method(bad, 128), kvq::Error) << bad;
    // A mixed method runs: QJL keys raw, WKV values smoothed.
    m = make_method("k=qjl:m=256;v=wkv:bits=4", 64);
    const Data x = biased_data(80, 2, 1, 64, 12);
    auto P = random_params(1, 64, 13);
    kvq::WkvKvCache cache(m.cache_config(1, 1, 32), m.key_codec, m.value_codec, P, m.smooth_keys, m.smooth_values);
    const std::vector<float> out = run_wkv(cache, x);
    std::vector<double> ref(out.size());
    kvq::reference_attention(x.q.data(), x.k.data(), x.v.data(), x.T, x.Hq, x.H, x.d, ref.data());
    EXPECT_LT(kvq::test::rel_err(out, ref), 0.5);
}

// Prefill through the adapter: exact under past-only (the prompt attends to its own K/V), then the
// decode steps read the prompt back through the quantized, smoothed cache.
TEST(Wkv, PrefillIsExactUnderPastOnly) {
    const Data x = biased_data(48, 4, 2, 64, 21);
    auto codec = std::make_shared<kvq::WkvCodec>(x.d, 4);
    kvq::WkvKvCache cache(config(x.H, x.d, 16, true), codec, codec, random_params(x.H, x.d, 22));
    std::vector<float> out(std::size_t(x.T) * x.Hq * x.d);
    kvq::AttentionWorkspace ws;
    cache.prefill(0, x.q.data(), x.Hq, x.k.data(), x.v.data(), x.T, out.data(), ws);
    std::vector<double> ref(out.size());
    kvq::reference_attention(x.q.data(), x.k.data(), x.v.data(), x.T, x.Hq, x.H, x.d, ref.data());
    EXPECT_LT(max_rel(out, ref), 2e-5);
    EXPECT_EQ(cache.tokens(0), x.T);
    EXPECT_EQ(cache.cache().keys(0, 0).encoded, x.T);
}
