// CPU benchmarks: QJL encode and scoring next to the fp32 dot-product baseline, and decode
// attention (d 128, 8 KV heads, 32 query heads, one decode step) over fp32, int8, QJL + int2
// and WKV 4-bit caches on 1 and 2 threads, with a STREAM-like read bandwidth measured in the same
// run so every row states the fraction of the bandwidth its bytes take (counter bw_frac, against the bandwidth
// of the same thread count, from wall time). Arg "simd": 0 forces the scalar paths
// (kvq::cpu::set_simd_limit), 1 uses run-time dispatch (AVX2 / AVX-512).
//   kvq-bench-cpu --benchmark_min_time=0.2 --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
// Bytes moved per decode step = all key and value blocks of the layer, read once (attention groups
// the 4 query heads of a KV head, so a block is no longer re-read per query head).
#include <benchmark/benchmark.h>

#include <Eigen/Dense>
#include <chrono>
#include <map>
#include <memory>
#include <random>

#include "bench_util.hpp"
#include "kvq/cpu/thread_pool.hpp"
#include "kvq/kvq.hpp"

namespace {

constexpr int kD = 128, kM = 256;

using kvq::bench::randn;

kvq::cpu::ThreadPool& pool(int threads) {
    static kvq::cpu::ThreadPool p1(1), p2(2);
    return threads == 1 ? p1 : p2;
}

double g_bandwidth[3] = {0, 0, 0};  // best measured read bandwidth (bytes/s, wall) for 1 and 2 threads

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Sums a 512 MiB array split over `threads` threads: the read-bandwidth ceiling for the rows below.
void BM_ReadBandwidth(benchmark::State& st) {
    const int threads = static_cast<int>(st.range(0));
    const std::size_t n = std::size_t(1) << 27;
    static std::vector<float> a(n, 1.0f);
    float sums[2] = {0, 0};
    for (auto _ : st) {
        const auto t0 = std::chrono::steady_clock::now();
        pool(threads).parallel_for(threads, [&](int t) {
            sums[t] = Eigen::Map<Eigen::VectorXf>(a.data() + n / threads * t, n / threads).sum();
        });
        benchmark::DoNotOptimize(sums);
        g_bandwidth[threads] = std::max(g_bandwidth[threads], double(n * sizeof(float)) / seconds_since(t0));
    }
    st.SetBytesProcessed(st.iterations() * n * sizeof(float));
}

// Baseline: scores of one query against T fp32 keys, K [T][d] times q (Eigen GEMV, SSE2 at -O2).
void BM_Fp32Scores(benchmark::State& st) {
    const int T = static_cast<int>(st.range(0));
    auto k = randn(std::size_t(T) * kD, 1), q = randn(kD, 2);
    std::vector<float> s(T);
    using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    Eigen::Map<const RowMat> K(k.data(), T, kD);
    Eigen::Map<const Eigen::VectorXf> Q(q.data(), kD);
    for (auto _ : st) {
        Eigen::Map<Eigen::VectorXf>(s.data(), T).noalias() = K * Q;
        benchmark::DoNotOptimize(s.data());
    }
    st.counters["keys/s"] = benchmark::Counter(double(T) * st.iterations(), benchmark::Counter::kIsRate);
    st.SetBytesProcessed(st.iterations() * std::size_t(T) * kD * 4);
}

std::shared_ptr<kvq::QjlKeyCodec> qjl(int outliers) {
    return std::make_shared<kvq::QjlKeyCodec>(kvq::QjlParams{kD, kM, 256, outliers});
}

// QJL encode of T keys into blocks of 64 (the whole GEMM + sign packing + outlier selection).
void BM_QjlEncode(benchmark::State& st) {
    const int T = static_cast<int>(st.range(0)), B = 64;
    auto c = qjl(static_cast<int>(st.range(1)));
    auto k = randn(std::size_t(T) * kD, 3);
    kvq::BlockPool pool(c->layout(B));
    std::vector<std::uint32_t> ids;
    for (int b = 0; b < T / B; ++b) ids.push_back(pool.allocate());
    for (auto _ : st)
        for (int b = 0; b < T / B; ++b) c->encode(&k[std::size_t(b) * B * kD], B, pool.data(ids[b]), B, 0);
    st.counters["tokens/s"] = benchmark::Counter(double(T) * st.iterations(), benchmark::Counter::kIsRate);
}

// QJL scoring: one prepared query against T encoded keys. Args: T, outliers, simd.
void BM_QjlScores(benchmark::State& st) {
    const int T = static_cast<int>(st.range(0)), B = 64;
    kvq::cpu::ScopedSimdLimit lim(st.range(2) ? kvq::cpu::SimdLevel::Avx512 : kvq::cpu::SimdLevel::Scalar);
    auto c = qjl(static_cast<int>(st.range(1)));
    auto k = randn(std::size_t(T) * kD, 4), q = randn(kD, 5);
    kvq::BlockPool pool(c->layout(B));
    std::vector<std::uint32_t> ids;
    for (int b = 0; b < T / B; ++b) {
        ids.push_back(pool.allocate());
        c->encode(&k[std::size_t(b) * B * kD], B, pool.data(ids[b]), B, 0);
    }
    std::vector<float> s(T);
    kvq::PreparedQuery pq;
    for (auto _ : st) {
        c->prepare_fast(q.data(), pq);  // what decode attention uses (int8 bit-sliced query with SIMD)
        for (int b = 0; b < T / B; ++b) c->score(pq, pool.data(ids[b]), B, 0, B, &s[std::size_t(b) * B]);
        benchmark::DoNotOptimize(s.data());
    }
    st.counters["keys/s"] = benchmark::Counter(double(T) * st.iterations(), benchmark::Counter::kIsRate);
    st.SetBytesProcessed(st.iterations() * std::size_t(T) / B * pool.block_bytes());
}

// Caches are built once per (T, method) and shared by the thread / simd variants.
// method 0 = fp32 identity K and V; 1 = int8 g32 K and V (token-wise); 2 = QJL keys (m 256, no
// outliers) + int2 g32 values; 3 = QJL keys with 8 outlier channels (m_o 256) + int2 values;
// 4 = WKV 4-bit K and V (WkvCodec, g = d: the blocks attention reads; the static smoothing of
// WkvKvCache is an O(H d) fold of q and out per step, outside the cache scan).
kvq::KvCache& cache_for(int T, int method) {
    static std::map<std::pair<int, int>, std::unique_ptr<kvq::KvCache>> caches;
    auto& slot = caches[{T, method}];
    if (slot) return *slot;
    caches.clear();  // keep one cache alive at a time (the 131k fp32 cache is 1 GiB)
    const int H = 8, B = 64;
    std::shared_ptr<kvq::Codec> kc, vc;
    if (method == 0) {
        kc = vc = std::make_shared<kvq::IdentityCodec>(kD, kvq::StorageType::F32);
    } else if (method == 1) {
        kc = vc = std::make_shared<kvq::TokenwiseCodec>(kvq::TokenwiseParams{kD, 8, 32});
    } else if (method == 4) {
        kc = vc = std::make_shared<kvq::WkvCodec>(kD, 4);
    } else {
        kc = qjl(method == 3 ? 8 : 0);
        vc = std::make_shared<kvq::TokenwiseCodec>(kvq::TokenwiseParams{kD, 2, 32});
    }
    auto cache = std::make_unique<kvq::KvCache>(kvq::CacheConfig{1, H, kD, B, {}, {}, true}, kc, vc);
    const int chunk = 1024;
    auto k = randn(std::size_t(chunk) * H * kD, 6), v = randn(std::size_t(chunk) * H * kD, 7);
    for (int t = 0; t < T; t += chunk) cache->append(0, k.data(), v.data(), chunk);
    auto& ref = caches[{T, method}];
    ref = std::move(cache);
    return *ref;
}

// Decode attention, 8 KV heads and 32 query heads (GQA 4), over a cache of T tokens.
// Args: T, method (see cache_for), threads, simd.
void BM_DecodeAttention(benchmark::State& st) {
    const int T = static_cast<int>(st.range(0)), method = static_cast<int>(st.range(1));
    const int threads = static_cast<int>(st.range(2));
    kvq::cpu::ScopedSimdLimit lim(st.range(3) ? kvq::cpu::SimdLevel::Avx512 : kvq::cpu::SimdLevel::Scalar);
    const int Hq = 32;
    kvq::KvCache& cache = cache_for(T, method);
    auto q = randn(std::size_t(Hq) * kD, 8);
    std::vector<float> out(std::size_t(Hq) * kD);
    kvq::AttentionWorkspace ws;
    ws.executor = threads > 1 ? &pool(threads) : nullptr;
    double wall = 0;
    for (auto _ : st) {
        const auto t0 = std::chrono::steady_clock::now();
        kvq::attend(cache, 0, q.data(), Hq, T, kvq::ExactTokens{}, 0, out.data(), ws);
        benchmark::DoNotOptimize(out.data());
        wall += seconds_since(t0);
    }
    const auto m = cache.memory();
    const double bytes = double(m.key_block_bytes + m.value_block_bytes);
    st.counters["cache_MB"] = bytes / 1e6;
    st.counters["wall_ms"] = 1e3 * wall / double(st.iterations());
    // Fraction of the measured read bandwidth (same thread count) that the cache's bytes take.
    if (g_bandwidth[threads] > 0)
        st.counters["bw_frac"] = bytes / (wall / double(st.iterations())) / g_bandwidth[threads];
    st.SetBytesProcessed(static_cast<std::int64_t>(bytes * double(st.iterations())));
}

}  // namespace

BENCHMARK(BM_ReadBandwidth)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Fp32Scores)->Arg(4096)->Arg(32768)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_QjlScores)->ArgsProduct({{32768}, {0, 8}, {0, 1}})->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_QjlEncode)->Args({32768, 0})->Args({32768, 8})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DecodeAttention)
    ->ArgNames({"T", "method", "threads", "simd"})
    ->ArgsProduct({{4096}, {0, 1, 2, 3, 4}, {1, 2}, {1}})
    ->ArgsProduct({{32768}, {0, 1, 2, 3, 4}, {1, 2}, {0, 1}})
    ->ArgsProduct({{131072}, {0, 1, 2, 3, 4}, {1, 2}, {1}})
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime();
BENCHMARK_MAIN();
