// GPU QJL scoring against the CPU codec: keys encoded on the CPU by kvq::QjlKeyCodec into paged
// blocks, the block bytes copied to the GPU in a shuffled page order, scored by
// kvq::cuda::launch_qjl_score and compared with QjlKeyCodec::score() per token.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "kvq/cuda/check.cuh"
#include "kvq/cuda/qjl_score.cuh"
// Eigen (inside the CPU codec) annotates defaulted members __host__ __device__; nvcc warns about it.
#if defined(__NVCC__)
#pragma nv_diag_suppress 20012
#pragma nv_diag_suppress 20013
#pragma nv_diag_suppress 20014
#pragma nv_diag_suppress 20015
#endif
#include "kvq/quant/qjl_key_codec.hpp"

namespace {

template <class T>
struct DeviceBuffer {
    T* p = nullptr;
    std::size_t n = 0;
    explicit DeviceBuffer(std::size_t count) : n(count) {
        KVQ_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(count, 1) * sizeof(T)));
    }
    ~DeviceBuffer() { cudaFree(p); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    void upload(const std::vector<T>& v) {
        KVQ_CUDA_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    }
    std::vector<T> download() const {
        std::vector<T> v(n);
        KVQ_CUDA_CHECK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
        return v;
    }
};

struct Case {
    int d, m, outliers, group, tokens, block_tokens;
    bool fp16_query = false;
    int m_outlier = 128;
};

std::string describe(const Case& c) {
    return "d=" + std::to_string(c.d) + " m=" + std::to_string(c.m) + " outliers=" + std::to_string(c.outliers) +
           " mo=" + std::to_string(c.m_outlier) + " G=" + std::to_string(c.group) + " T=" + std::to_string(c.tokens) +
           " B=" + std::to_string(c.block_tokens) + (c.fp16_query ? " fp16q" : "");
}

// Runs one case: CPU encode into shuffled pages, GPU score, per-score comparison with the CPU codec.
void run_case(const Case& c, bool use_graph = false) {
    SCOPED_TRACE(describe(c));
    const int H_kv = 2, H_q = H_kv * c.group, d = c.d, T = c.tokens, B = c.block_tokens;
    kvq::QjlParams p;
    p.head_dim = d;
    p.m = c.m;
    p.m_outlier = c.m_outlier;
    p.outliers = c.outliers;
    p.seed = 1234 + d * 7 + c.m;
    const kvq::QjlKeyCodec codec(p);
    const kvq::BlockLayout layout = codec.layout(B);
    const std::size_t block_bytes = layout.bytes();
    const int G = codec.granularity();
    const int pages_per_head = (T + B - 1) / B;
    const int n_blocks = pages_per_head * H_kv + 3;  // a few unused blocks in the pool

    std::mt19937 rng(99 + T + d + c.m + c.outliers + c.group);
    std::normal_distribution<float> nd(0.f, 1.f);
    // Keys with a few heavy channels, as real keys have; encoded in whole granules (the tokens
    // past T of the last group are encoded but never scored).
    const int T_enc = (T + G - 1) / G * G;
    std::vector<float> keys(std::size_t(H_kv) * T_enc * d);
    for (int h = 0; h < H_kv; ++h)
        for (int t = 0; t < T_enc; ++t)
            for (int ch = 0; ch < d; ++ch) {
                const float scale = (ch % 29 == 3) ? 8.f : 1.f;
                keys[(std::size_t(h) * T_enc + t) * d + ch] = scale * nd(rng);
            }

    // Pool with garbage everywhere (bytes the codec does not write must not matter), pages shuffled.
    std::vector<std::uint8_t> pool(std::size_t(n_blocks) * block_bytes);
    for (auto& b : pool) b = static_cast<std::uint8_t>(rng());
    std::vector<std::uint32_t> ids(n_blocks);
    std::iota(ids.begin(), ids.end(), 0u);
    std::shuffle(ids.begin(), ids.end(), rng);
    const std::int64_t page_stride = pages_per_head + 1;
    std::vector<std::uint32_t> pages(std::size_t(H_kv) * page_stride, 0xFFFFFFFFu);
    for (int h = 0; h < H_kv; ++h)
        for (int i = 0; i < pages_per_head; ++i) {
            const std::uint32_t id = ids[h * pages_per_head + i];
            pages[h * page_stride + i] = id;
            const int first = i * B, n = std::min(B, T_enc - first);
            codec.encode(&keys[(std::size_t(h) * T_enc + first) * d], n, &pool[std::size_t(id) * block_bytes], B, 0);
        }

    // Queries (rounded to fp16 first when the fp16 path is tested, so both sides see the same q).
    std::vector<float> q(std::size_t(H_q) * d);
    for (auto& v : q) v = nd(rng);
    std::vector<std::uint16_t> q16(q.size());
    if (c.fp16_query)
        for (std::size_t i = 0; i < q.size(); ++i) {
            q16[i] = kvq::float_to_half(q[i]).bits;
            q[i] = kvq::half_to_float(kvq::half_t{q16[i]});
        }

    // CPU reference.
    std::vector<float> ref(std::size_t(H_q) * T);
    kvq::PreparedQuery pq;
    for (int h = 0; h < H_q; ++h) {
        const int kv = h / c.group;
        codec.prepare(&q[std::size_t(h) * d], pq);
        for (int i = 0; i < pages_per_head; ++i) {
            const std::uint32_t id = pages[kv * page_stride + i];
            const int first = i * B, n = std::min(B, T - first);
            codec.score(pq, &pool[std::size_t(id) * block_bytes], B, 0, n, &ref[std::size_t(h) * T + first]);
        }
    }

    // GPU.
    const std::int64_t score_stride = T + 5;
    DeviceBuffer<float> d_sketch(codec.sketch().size());
    d_sketch.upload(codec.sketch());
    DeviceBuffer<std::uint8_t> d_pool(pool.size());
    d_pool.upload(pool);
    DeviceBuffer<std::uint32_t> d_pages(pages.size());
    d_pages.upload(pages);
    DeviceBuffer<float> d_q(q.size());
    DeviceBuffer<std::uint16_t> d_q16(q16.size());
    if (c.fp16_query)
        d_q16.upload(q16);
    else
        d_q.upload(q);
    DeviceBuffer<float> d_scores(std::size_t(H_q) * score_stride);
    KVQ_CUDA_CHECK(cudaMemset(d_scores.p, 0xFF, d_scores.n * sizeof(float)));  // poison: NaN

    kvq::cuda::QjlScoreArgs a;
    kvq::cuda::set_qjl_codec(a, codec, B);
    a.sketch = d_sketch.p;
    a.pool = d_pool.p;
    a.block_bytes = block_bytes;
    a.pages = d_pages.p;
    a.page_stride = page_stride;
    a.n_kv_heads = H_kv;
    a.n_q_heads = H_q;
    a.n_tokens = T;
    a.query = c.fp16_query ? static_cast<const void*>(d_q16.p) : static_cast<const void*>(d_q.p);
    a.query_type = c.fp16_query ? kvq::cuda::QueryType::F16 : kvq::cuda::QueryType::F32;
    a.scores = d_scores.p;
    a.score_stride = score_stride;
    const auto ok = kvq::cuda::can_implement(a);
    ASSERT_TRUE(ok.ok) << ok.message;
    const std::size_t ws_bytes = kvq::cuda::qjl_score_workspace_bytes(a);
    DeviceBuffer<std::uint8_t> ws(ws_bytes);
    KVQ_CUDA_CHECK(cudaMemset(ws.p, 0xFF, ws_bytes));

    cudaStream_t stream;
    KVQ_CUDA_CHECK(cudaStreamCreate(&stream));
    if (use_graph) {
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        KVQ_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
        kvq::cuda::launch_qjl_score(a, stream, ws.p, ws_bytes);
        KVQ_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
        KVQ_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
        KVQ_CUDA_CHECK(cudaGraphLaunch(exec, stream));
        KVQ_CUDA_CHECK(cudaStreamSynchronize(stream));
        KVQ_CUDA_CHECK(cudaGraphExecDestroy(exec));
        KVQ_CUDA_CHECK(cudaGraphDestroy(graph));
    } else {
        kvq::cuda::launch_qjl_score(a, stream, ws.p, ws_bytes);
        KVQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
    KVQ_CUDA_CHECK(cudaStreamDestroy(stream));
    const std::vector<float> got = d_scores.download();

    int bad = 0;
    double worst = 0;
    for (int h = 0; h < H_q; ++h) {
        const int kv = h / c.group;
        double qn = 0;
        for (int ch = 0; ch < d; ++ch) qn += double(q[std::size_t(h) * d + ch]) * q[std::size_t(h) * d + ch];
        qn = std::sqrt(qn);
        for (int t = 0; t < T; ++t) {
            double kn = 0;
            const float* k = &keys[(std::size_t(kv) * T_enc + t) * d];
            for (int ch = 0; ch < d; ++ch) kn += double(k[ch]) * k[ch];
            const double tol = 1e-4 * qn * std::sqrt(kn);
            const float g = got[std::size_t(h) * score_stride + t], r = ref[std::size_t(h) * T + t];
            const double err = std::abs(double(g) - r);
            worst = std::max(worst, err / (qn * std::sqrt(kn)));
            if (!(err <= tol) && ++bad <= 5)
                ADD_FAILURE() << "head " << h << " token " << t << ": gpu " << g << " cpu " << r << " tol " << tol;
        }
        // The padding between rows (score_stride > T) must stay untouched.
        for (std::int64_t t = T; t < score_stride; ++t) {
            std::uint32_t bits;
            std::memcpy(&bits, &got[std::size_t(h) * score_stride + t], 4);
            EXPECT_EQ(bits, 0xFFFFFFFFu) << "head " << h << " wrote past n_tokens at " << t;
        }
    }
    EXPECT_EQ(bad, 0) << bad << " scores out of tolerance; worst relative error " << worst;
}

TEST(QjlScoreGpu, MatchesCpuCodecAcrossShapes) {
    for (int d : {64, 128, 256})
        for (int m : {64, 256, 512})
            for (int outliers : {0, 8})
                for (int group : {1, 4}) {
                    const int B = 64;
                    for (int T : {1, 37, 64 * 5 + 17}) run_case({d, m, outliers, group, T, B});
                }
}

TEST(QjlScoreGpu, LargeAndSmallBlocks) {
    // Blocks smaller than a warp (B = 8, 16: one warp spans several pages) without outliers, and
    // large blocks, a long sequence, m_o above and below m.
    run_case({128, 256, 0, 1, 1001, 8});
    run_case({128, 256, 0, 4, 999, 16});
    run_case({128, 96, 0, 2, 513, 32});  // m/8 = 12 bytes: no 16-byte alignment
    run_case({128, 256, 8, 1, 4097, 256});
    run_case({128, 256, 8, 4, 3001, 128, false, 256});
    run_case({64, 64, 4, 8, 700, 64, false, 512});
    run_case({256, 512, 16, 1, 300, 32, false, 32});
    run_case({128, 1024, 0, 8, 400, 64});  // LUT cap: fewer heads per pass
    run_case({128, 1024, 8, 2, 400, 64, false, 1024});
}

TEST(QjlScoreGpu, Fp16Query) {
    run_case({128, 256, 0, 4, 333, 64, true});
    run_case({128, 256, 8, 1, 333, 64, true});
}

TEST(QjlScoreGpu, CapturesInAGraph) {
    run_case({128, 256, 0, 1, 200, 64}, true);
    run_case({128, 256, 8, 4, 200, 64}, true);
}

TEST(QjlScoreGpu, RejectsBadArguments) {
    kvq::QjlParams p;
    p.head_dim = 128;
    p.m = 256;
    p.outliers = 8;
    const kvq::QjlKeyCodec codec(p);
    kvq::cuda::QjlScoreArgs a;
    kvq::cuda::set_qjl_codec(a, codec, 64);
    float dummy_f = 0;
    a.sketch = &dummy_f;
    a.query = &dummy_f;
    a.n_kv_heads = 2;
    a.n_q_heads = 3;  // not a multiple
    a.n_tokens = 0;
    EXPECT_FALSE(kvq::cuda::can_implement(a).ok);
    a.n_q_heads = 4;
    a.page_stride = 0;
    EXPECT_TRUE(kvq::cuda::can_implement(a).ok) << kvq::cuda::can_implement(a).message;
    a.m = 128;  // layout no longer matches
    EXPECT_FALSE(kvq::cuda::can_implement(a).ok);
    a.m = 256;
    a.block_bytes = 8;
    EXPECT_FALSE(kvq::cuda::can_implement(a).ok);
    a.block_bytes = a.layout.bytes();
    EXPECT_THROW(kvq::cuda::launch_qjl_score(a, nullptr, nullptr, 0), kvq::Error);  // no workspace
}

TEST(QjlScoreGpu, CudaErrorsBecomeKvqErrors) {
    EXPECT_THROW(KVQ_CUDA_CHECK(cudaMemcpy(nullptr, reinterpret_cast<void*>(8), 16, cudaMemcpyDeviceToDevice)),
                 kvq::Error);
    cudaGetLastError();
}

}  // namespace
