// CPU benchmarks for the WKVQuant and KIVI paths next to the fp32 reference cache, in one binary:
//   encode:  KvCache / WkvKvCache append of T tokens (1 KV head, d = 128, block 64), tokens/s;
//            WKV includes the per-channel smoothing, KIVI the residual policy (keys chunked by 128,
//            values sliding).
//   decode:  one decode-attention query (kvq::attend, 1 query head) over a cache of T tokens,
//            T in {4096, 32768}; WKV through WkvKvCache::decode_step-equivalent work (query fold,
//            attention over the smoothed cache, output un-smoothing).
//   kvq-bench-wkv --benchmark_min_time=0.2
#include <benchmark/benchmark.h>

#include <memory>
#include <random>

#include "bench_util.hpp"
#include "kvq/kvq.hpp"
#include "kvq/quant/kivi_codec.hpp"
#include "kvq/quant/wkv_codec.hpp"

namespace {

constexpr int kD = 128, kB = 64;

using kvq::bench::randn;

enum Kind { Fp32 = 0, Wkv4 = 1, Kivi2 = 2, Kivi4 = 3 };
const char* kNames[] = {"fp32", "wkv4", "kivi2", "kivi4"};

struct Setup {
    kvq::CacheConfig cfg;
    std::shared_ptr<const kvq::Codec> kc, vc;
    std::shared_ptr<const kvq::WkvParams> params;  // Wkv4 only
};

Setup make(Kind kind) {
    Setup s;
    s.cfg.head_dim = kD;
    s.cfg.block_tokens = kB;
    if (kind == Fp32) {
        s.kc = s.vc = std::make_shared<kvq::IdentityCodec>(kD, kvq::StorageType::F32);
    } else if (kind == Wkv4) {
        s.kc = s.vc = std::make_shared<kvq::WkvCodec>(kD, 4);
        auto P = std::make_shared<kvq::WkvParams>(kvq::WkvParams::identity(1, 1, kD));
        for (int c = 0; c < kD; ++c)
            P->layers[0].k_shift[c] = 0.1f * (c % 5), P->layers[0].k_scale[c] = 1.0f + 0.01f * c;
        s.params = P;
    } else {
        const kvq::KiviConfig k = kvq::make_kivi(kD, kind == Kivi2 ? 2 : 4);
        s.kc = k.key_codec;
        s.vc = k.value_codec;
        s.cfg.key_window = k.key_window;
        s.cfg.value_window = k.value_window;
    }
    return s;
}

void BM_Encode(benchmark::State& st) {
    const Kind kind = Kind(st.range(0));
    const int T = int(st.range(1));
    const Setup s = make(kind);
    const std::vector<float> k = randn(std::size_t(T) * kD, 1), v = randn(std::size_t(T) * kD, 2);
    for (auto _ : st) {
        if (kind == Wkv4) {
            kvq::WkvKvCache c(s.cfg, s.kc, s.vc, s.params);
            c.append(0, k.data(), v.data(), T);
            benchmark::DoNotOptimize(c.tokens(0));
        } else {
            kvq::KvCache c(s.cfg, s.kc, s.vc);
            c.append(0, k.data(), v.data(), T);
            benchmark::DoNotOptimize(c.tokens(0));
        }
    }
    st.SetItemsProcessed(st.iterations() * T);
    st.SetLabel(kNames[kind]);
}

void BM_DecodeAttention(benchmark::State& st) {
    const Kind kind = Kind(st.range(0));
    const int T = int(st.range(1));
    const Setup s = make(kind);
    const std::vector<float> k = randn(std::size_t(T) * kD, 1), v = randn(std::size_t(T) * kD, 2), q = randn(kD, 3);
    std::vector<float> out(kD), qf(kD);
    kvq::AttentionWorkspace ws;
    std::unique_ptr<kvq::WkvKvCache> w;
    std::unique_ptr<kvq::KvCache> c;
    if (kind == Wkv4) {
        w = std::make_unique<kvq::WkvKvCache>(s.cfg, s.kc, s.vc, s.params);
        w->append(0, k.data(), v.data(), T);
    } else {
        c = std::make_unique<kvq::KvCache>(s.cfg, s.kc, s.vc);
        c->append(0, k.data(), v.data(), T);
    }
    for (auto _ : st) {
        if (w) {  // WkvKvCache::decode_step's work without growing the cache
            const kvq::WkvLayerParams& P = w->params().layers[0];
            for (int i = 0; i < kD; ++i) qf[i] = q[i] * P.k_scale[i];
            kvq::attend(w->cache(), 0, qf.data(), 1, T, kvq::ExactTokens{}, 0, out.data(), ws);
            for (int i = 0; i < kD; ++i) out[i] = out[i] * P.v_scale[i] + P.v_shift[i];
        } else {
            kvq::attend(*c, 0, q.data(), 1, T, kvq::ExactTokens{}, 0, out.data(), ws);
        }
        benchmark::DoNotOptimize(out.data());
    }
    st.SetItemsProcessed(st.iterations() * T);
    const kvq::MemoryReport m = w ? w->memory() : c->memory();
    st.counters["bits_per_elem"] = m.bits_per_element();
    st.SetLabel(kNames[kind]);
}

void args(benchmark::internal::Benchmark* b) {
    for (int kind : {Fp32, Wkv4, Kivi2, Kivi4})
        for (int T : {4096, 32768}) b->Args({kind, T});
}

}  // namespace

BENCHMARK(BM_Encode)->Apply(args)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_DecodeAttention)->Apply(args)->Unit(benchmark::kMicrosecond);
BENCHMARK_MAIN();
