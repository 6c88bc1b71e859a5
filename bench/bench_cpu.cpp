// CPU benchmarks of the foundation (one thread): QJL encode and scoring next to the fp32 Eigen
// dot-product baseline, and decode attention over an fp32 identity cache next to a QJL cache, with
// a STREAM-like read bandwidth measured in the same run so every row can state the fraction of
// bandwidth its bytes would take. Counters: keys/s or tokens/s, and bytes/s of encoded data read.
//   kvq-bench-cpu --benchmark_min_time=0.5
#include <benchmark/benchmark.h>

#include <Eigen/Dense>
#include <memory>
#include <random>

#include "kvq/kvq.hpp"

namespace {

constexpr int kD = 128, kM = 256;

std::vector<float> randn(std::size_t n, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> nd(0, 1);
    std::vector<float> v(n);
    for (auto& x : v) x = nd(rng);
    return v;
}

// Sums a 512 MiB array: read bandwidth of one thread, the ceiling for memory-bound rows below.
void BM_ReadBandwidth(benchmark::State& st) {
    const std::size_t n = std::size_t(1) << 27;
    std::vector<float> a(n, 1.0f);
    for (auto _ : st) {
        Eigen::Map<Eigen::VectorXf> m(a.data(), n);
        benchmark::DoNotOptimize(m.sum());
    }
    st.SetBytesProcessed(st.iterations() * n * sizeof(float));
}

// Baseline: scores of one query against T fp32 keys, K [T][d] times q (Eigen GEMV).
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

// QJL scoring: one prepared query against T encoded keys.
void BM_QjlScores(benchmark::State& st) {
    const int T = static_cast<int>(st.range(0)), B = 64;
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
        c->prepare(q.data(), pq);
        for (int b = 0; b < T / B; ++b) c->score(pq, pool.data(ids[b]), B, 0, B, &s[std::size_t(b) * B]);
        benchmark::DoNotOptimize(s.data());
    }
    st.counters["keys/s"] = benchmark::Counter(double(T) * st.iterations(), benchmark::Counter::kIsRate);
    st.SetBytesProcessed(st.iterations() * std::size_t(T) / B * pool.block_bytes());
}

// Decode attention, 8 KV heads and 32 query heads (GQA 4), over a cache of T tokens:
// method 0 = fp32 identity K and V; 1 = QJL keys (m 256, no outliers) + int2 g32 values;
// 2 = QJL keys with 8 outlier channels (m_o 256, official default) + int2 values.
void BM_DecodeAttention(benchmark::State& st) {
    const int T = static_cast<int>(st.range(0)), method = static_cast<int>(st.range(1));
    const int H = 8, Hq = 32, B = 64;
    std::shared_ptr<kvq::Codec> kc, vc;
    if (method == 0) {
        kc = vc = std::make_shared<kvq::IdentityCodec>(kD, kvq::StorageType::F32);
    } else {
        kc = qjl(method == 2 ? 8 : 0);
        vc = std::make_shared<kvq::TokenwiseCodec>(kvq::TokenwiseParams{kD, 2, 32});
    }
    kvq::KvCache cache(kvq::CacheConfig{1, H, kD, B, {}, {}, true}, kc, vc);
    const int chunk = 1024;
    auto k = randn(std::size_t(chunk) * H * kD, 6), v = randn(std::size_t(chunk) * H * kD, 7);
    for (int t = 0; t < T; t += chunk) cache.append(0, k.data(), v.data(), chunk);
    auto q = randn(std::size_t(Hq) * kD, 8);
    std::vector<float> out(std::size_t(Hq) * kD);
    kvq::AttentionWorkspace ws;
    for (auto _ : st) {
        kvq::attend(cache, 0, q.data(), Hq, T, kvq::ExactTokens{}, 0, out.data(), ws);
        benchmark::DoNotOptimize(out.data());
    }
    const auto m = cache.memory();
    st.counters["cache_MB"] = double(m.key_block_bytes + m.value_block_bytes) / 1e6;
    // Every query head reads its KV head's blocks once (GQA re-reads them Hq/H times on this path).
    st.SetBytesProcessed(st.iterations() * (m.key_block_bytes + m.value_block_bytes) * (Hq / H));
}

}  // namespace

BENCHMARK(BM_ReadBandwidth)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Fp32Scores)->Arg(4096)->Arg(32768)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_QjlScores)->Args({4096, 0})->Args({32768, 0})->Args({4096, 8})->Args({32768, 8})->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_QjlEncode)->Args({4096, 0})->Args({32768, 0})->Args({4096, 8})->Args({32768, 8})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DecodeAttention)->ArgsProduct({{4096, 32768}, {0, 1, 2}})->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();
