// GPU QJL scoring against the CPU codec: keys encoded on the CPU by kvq::QjlKeyCodec into paged
// blocks, the block bytes copied to the GPU in a shuffled page order, scored by
// kvq::cuda::launch_qjl_score and compared with QjlKeyCodec::score() per token (exact_query = true,
// and the fallback of small blocks), or, for the default tensor-core path (int8 bit-sliced query),
// checked step by step: the query record in the workspace against cpu::quantize_i8_scalar, the
// scores against a float64 evaluation of the record, and against the exact float64 estimator within
// the quantization bound.
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
#include "kvq/cpu/kernels.hpp"
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
void run_case(const Case& c, bool use_graph = false, bool exact_query = true) {
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
    a.exact_query = exact_query;  // compared with the exact CPU score below
    ASSERT_FALSE(kvq::cuda::qjl_score_uses_tensor_path(a)) << "run_case checks the exact path only";
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

// ---- Default path: int8 bit-sliced query on tensor cores -------------------------------------

struct TcCase {
    int d, m, group, tokens, block_tokens;
    int kv_heads = 2;
    bool fp16_query = false;
    bool zero_head = false;  // last query head all zeros (s = 0, u = 0, scores 0)
    bool direct = false;     // QjlScoreArgs::tc_pipelined = false: the direct-load qjl_score_tc_kernel
    int max_ctas = 0;        // QjlScoreArgs::tc_max_ctas: a small grid gives each warp many tiles
    bool plain = false;      // not pipelined, QjlScoreArgs::tc_pdl = false (a plain score launch)
};

std::string describe(const TcCase& c) {
    return "tc d=" + std::to_string(c.d) + " m=" + std::to_string(c.m) + " G=" + std::to_string(c.group) +
           " T=" + std::to_string(c.tokens) + " B=" + std::to_string(c.block_tokens) +
           " Hkv=" + std::to_string(c.kv_heads) + (c.fp16_query ? " fp16q" : "") + (c.zero_head ? " zero-head" : "") +
           (c.direct ? " direct" : "") + (c.max_ctas ? " max_ctas=" + std::to_string(c.max_ctas) : "") +
           (c.plain ? " plain-launch" : "");
}

// What a run leaves behind, for comparing the two tensor kernels bit for bit.
struct TcOutput {
    std::vector<float> scores;
    std::vector<std::uint8_t> proj, rec, projq;  // workspace sections
};

// Two launch paths of the same case must leave the same bytes: workspace sections and scores.
void expect_bit_identical(const TcOutput& x, const TcOutput& ref) {
    EXPECT_TRUE(x.proj == ref.proj) << "S q differs";
    EXPECT_TRUE(x.rec == ref.rec) << "query records differ";
    EXPECT_TRUE(x.projq == ref.projq) << "u * s differs";
    ASSERT_EQ(x.scores.size(), ref.scores.size());
    EXPECT_EQ(std::memcmp(x.scores.data(), ref.scores.data(), x.scores.size() * 4), 0) << "scores differ";
}

constexpr double kU = 1.0 / 16777216.0;  // 2^-24, fp32 unit roundoff

// Runs one case of the tensor path and checks (a) the query record, (b) the scores against a float64
// evaluation of that record, (c) the scores against the exact float64 estimator (see the top).
void run_tc_case(const TcCase& c, bool use_graph = false, TcOutput* out = nullptr) {
    SCOPED_TRACE(describe(c));
    const int H_kv = c.kv_heads, H_q = H_kv * c.group, d = c.d, m = c.m, T = c.tokens, B = c.block_tokens;
    kvq::QjlParams p;
    p.head_dim = d;
    p.m = m;
    p.outliers = 0;
    p.seed = 77 + d * 3 + m;
    const kvq::QjlKeyCodec codec(p);
    const kvq::BlockLayout layout = codec.layout(B);
    const std::size_t block_bytes = layout.bytes();
    const int pages_per_head = (T + B - 1) / B;
    const int n_blocks = pages_per_head * H_kv + 3;

    std::mt19937 rng(555 + T * 3 + d + m * 7 + c.group * 11 + B);
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<float> keys(std::size_t(H_kv) * std::max(T, 1) * d);
    for (std::size_t i = 0; i < keys.size(); ++i) keys[i] = ((i % d) % 29 == 3 ? 8.f : 1.f) * nd(rng);

    std::vector<std::uint8_t> pool(std::size_t(n_blocks) * block_bytes);
    for (auto& b : pool) b = static_cast<std::uint8_t>(rng());  // garbage wherever encode does not write
    std::vector<std::uint32_t> ids(n_blocks);
    std::iota(ids.begin(), ids.end(), 0u);
    std::shuffle(ids.begin(), ids.end(), rng);
    const std::int64_t page_stride = pages_per_head + 2;
    std::vector<std::uint32_t> pages(std::size_t(H_kv) * page_stride, 0xFFFFFFFFu);
    for (int h = 0; h < H_kv; ++h)
        for (int i = 0; i < pages_per_head; ++i) {
            const std::uint32_t id = ids[h * pages_per_head + i];
            pages[h * page_stride + i] = id;
            const int first = i * B, n = std::min(B, T - first);  // the last block is partly filled
            codec.encode(&keys[(std::size_t(h) * T + first) * d], n, &pool[std::size_t(id) * block_bytes], B, 0);
        }

    std::vector<float> q(std::size_t(H_q) * d);
    for (auto& v : q) v = nd(rng);
    if (c.zero_head)
        for (int ch = 0; ch < d; ++ch) q[std::size_t(H_q - 1) * d + ch] = 0.f;
    std::vector<std::uint16_t> q16(q.size());
    if (c.fp16_query)
        for (std::size_t i = 0; i < q.size(); ++i) {
            q16[i] = kvq::float_to_half(q[i]).bits;
            q[i] = kvq::half_to_float(kvq::half_t{q16[i]});
        }

    const std::int64_t score_stride = T + 3;
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
    // The default (pipelined on sm_90) unless told otherwise.
    a.tc_pipelined = !c.direct && !c.plain;
    a.tc_max_ctas = c.max_ctas;
    if (c.plain) a.tc_pdl = false;
    ASSERT_FALSE(a.exact_query);  // the default
    ASSERT_TRUE(kvq::cuda::qjl_score_uses_tensor_path(a));
    const auto ok = kvq::cuda::can_implement(a);
    ASSERT_TRUE(ok.ok) << ok.message;
    const std::size_t ws_bytes = kvq::cuda::qjl_score_workspace_bytes(a);
    // Record offset (documented in qjl_score.cuh, QjlWorkspace): after S q and q.
    const auto wl = kvq::cuda::detail::qjl_workspace_layout(a);
    const auto al = [](std::size_t n) { return (n + 255) / 256 * 256; };
    const std::size_t rec_off = al(std::size_t(H_q) * m * 4) + al(std::size_t(H_q) * d * 4);
    ASSERT_EQ(wl.rec, rec_off);
    const kvq::cuda::QjlQueryLayout QL = kvq::cuda::QjlQueryLayout::of(m);
    ASSERT_GE(ws_bytes, rec_off + H_q * QL.record_bytes());
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
        KVQ_CUDA_CHECK(cudaGraphLaunch(exec, stream));  // replayed twice: same result
        KVQ_CUDA_CHECK(cudaStreamSynchronize(stream));
        KVQ_CUDA_CHECK(cudaGraphExecDestroy(exec));
        KVQ_CUDA_CHECK(cudaGraphDestroy(graph));
    } else {
        kvq::cuda::launch_qjl_score(a, stream, ws.p, ws_bytes);
        KVQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
    KVQ_CUDA_CHECK(cudaStreamDestroy(stream));
    const std::vector<float> got = d_scores.download();
    const std::vector<std::uint8_t> wsh = ws.download();
    if (out != nullptr) {
        out->scores = got;
        out->proj.assign(wsh.begin(), wsh.begin() + std::size_t(H_q) * m * 4);
        out->rec.assign(wsh.begin() + wl.rec, wsh.begin() + wl.rec + std::size_t(H_q) * QL.record_bytes());
        out->projq.assign(wsh.begin() + wl.projq, wsh.begin() + wl.projq + std::size_t(H_q) * m * 4);
    }

    const std::vector<float>& S = codec.sketch();
    const double c64 = std::sqrt(1.57079632679489661923) / m;
    const float c_in = static_cast<float>(std::sqrt(1.57079632679489661923) / m);  // as QjlKeyCodec::score
    int bad = 0;
    auto fail = [&](const std::string& what) {
        if (++bad <= 8) ADD_FAILURE() << what;
    };
    double worst_b = 0, worst_c = 0;  // error / tolerance
    for (int h = 0; h < H_q; ++h) {
        const int kv = h / c.group;
        // (a) projection (workspace offset 0, [H_q][m] fp32) against float64 S q:
        //     |p32 - p64| <= (d/32 + 6) 2^-24 sum_c |S_jc q_c| (d/32 fmaf per lane + a 5-level tree).
        std::vector<float> proj(m);
        std::memcpy(proj.data(), wsh.data() + std::size_t(h) * m * 4, std::size_t(m) * 4);
        std::vector<double> p64(m);
        double proj_err_sum = 0;
        for (int j = 0; j < m; ++j) {
            double acc = 0, mag = 0;
            for (int ch = 0; ch < d; ++ch) {
                const double t = double(S[std::size_t(j) * d + ch]) * q[std::size_t(h) * d + ch];
                acc += t;
                mag += std::abs(t);
            }
            p64[j] = acc;
            const double err = std::abs(double(proj[j]) - acc);
            proj_err_sum += err;
            if (!(err <= (d / 32 + 6) * kU * mag))
                fail("head " + std::to_string(h) + " proj " + std::to_string(j) + ": gpu " + std::to_string(proj[j]) +
                     " f64 " + std::to_string(acc));
        }
        // (a) the record: rebuild u from the planes; s and u exactly as cpu::quantize_i8_scalar(proj).
        const std::uint8_t* rb = wsh.data() + rec_off + std::size_t(h) * QL.record_bytes();
        std::vector<std::uint32_t> rw(QL.record_words());
        std::memcpy(rw.data(), rb, QL.record_bytes());
        std::vector<std::int8_t> u_cpu(1024 + 64);
        std::int32_t usum_cpu = 0;
        const float s_cpu = kvq::cpu::quantize_i8_scalar(proj.data(), m, u_cpu.data(), &usum_cpu);
        float s_gpu;
        std::memcpy(&s_gpu, &rw[8 * QL.words], 4);
        const std::int32_t usum_gpu = static_cast<std::int32_t>(rw[8 * QL.words + 1]);
        EXPECT_EQ(std::memcmp(&s_gpu, &s_cpu, 4), 0) << "head " << h << " s gpu " << s_gpu << " cpu " << s_cpu;
        EXPECT_EQ(usum_gpu, usum_cpu) << "head " << h;
        std::vector<int> u(QL.words * 32);
        for (int j = 0; j < QL.words * 32; ++j) {
            unsigned byte = 0;
            for (int n = 0; n < 8; ++n) byte |= ((rw[std::size_t(n) * QL.words + j / 32] >> (j % 32)) & 1u) << n;
            u[j] = static_cast<std::int8_t>(byte);
            if (j >= m && byte != 0)
                fail("head " + std::to_string(h) + ": plane bit set beyond m at " + std::to_string(j));
            if (j < m && u[j] != u_cpu[j])
                fail("head " + std::to_string(h) + " u[" + std::to_string(j) + "] gpu " + std::to_string(u[j]) +
                     " cpu " + std::to_string(u_cpu[j]));
        }
        if (c.zero_head && h == H_q - 1) EXPECT_EQ(s_gpu, 0.f);
        const double s = s_gpu;
        const float cs = c_in * s_gpu;
        for (int t = 0; t < T; ++t) {
            const std::uint32_t id = pages[kv * page_stride + t / B];
            const std::uint8_t* blk = &pool[std::size_t(id) * block_bytes];
            const std::uint8_t* code = blk + layout.codes_offset() + std::size_t(t % B) * layout.code_bytes;
            std::uint16_t nb;
            std::memcpy(&nb, blk + layout.token_side_offset() + std::size_t(t % B) * 2, 2);
            const float nrm = kvq::half_to_float(kvq::half_t{nb});
            std::int64_t Tq = 0;
            double sum_exact = 0;
            for (int j = 0; j < m; ++j) {
                const bool bit = (code[j / 8] >> (j % 8)) & 1;
                if (bit) Tq += u[j];
                sum_exact += bit ? p64[j] : -p64[j];
            }
            const float g = got[std::size_t(h) * score_stride + t];
            const std::string where = "head " + std::to_string(h) + " token " + std::to_string(t);
            if (!std::isfinite(g)) {
                fail(where + ": not finite (unwritten?)");
                continue;
            }
            // (b) float64 of the record's formula. GPU: ((c_in * s) * ||k||) * float(2T - usum), four fp32
            //     roundings (c_in, cs, cs * norm, the last product; 2T - usum is exact): |err| <= 5 * 2^-24 |ref|.
            const double ref_b = c64 * s * double(nrm) * double(2 * Tq - usum_gpu);
            const double tol_b = 5 * kU * std::abs(ref_b);
            const double err_b = std::abs(double(g) - ref_b);
            worst_b = std::max(worst_b, tol_b > 0 ? err_b / tol_b : (err_b > 0 ? 1e30 : 0.0));
            if (!(err_b <= tol_b)) fail(where + ": gpu " + std::to_string(g) + " record f64 " + std::to_string(ref_b));
            // Same float operations as QjlKeyCodec::score's bit-sliced path: bitwise equal.
            const float host = (cs * nrm) * static_cast<float>(2 * Tq - usum_gpu);
            if (std::memcmp(&host, &g, 4) != 0)
                fail(where + ": gpu " + std::to_string(g) + " != host float formula " + std::to_string(host));
            // (c) exact float64 estimator sqrt(pi/2)/m ||k|| sum_j sign_j (S q)_j. Quantization bound
            //     sqrt(pi/2)/m ||k|| m s / 2, widened by the division's rounding in u (127 m s 2^-24),
            //     the measured fp32 projection error sum_j |p32 - p64|, and 5 * 2^-24 |gpu|.
            const double ref_c = c64 * double(nrm) * sum_exact;
            const double tol_c = c64 * double(nrm) * (m * s / 2 + 127.0 * m * s * kU + proj_err_sum) +
                                 5 * kU * std::abs(double(g)) + 1e-30;
            const double err_c = std::abs(double(g) - ref_c);
            worst_c = std::max(worst_c, err_c / tol_c);
            if (!(err_c <= tol_c))
                fail(where + ": gpu " + std::to_string(g) + " exact f64 " + std::to_string(ref_c) + " tol " +
                     std::to_string(tol_c));
        }
        for (std::int64_t t = T; t < score_stride; ++t) {
            std::uint32_t bits;
            std::memcpy(&bits, &got[std::size_t(h) * score_stride + t], 4);
            EXPECT_EQ(bits, 0xFFFFFFFFu) << "head " << h << " wrote past n_tokens at " << t;
        }
    }
    EXPECT_EQ(bad, 0) << bad << " failures; worst err/tol: record " << worst_b << ", exact " << worst_c;
}

TEST(QjlScoreGpu, TensorPathRandomShapes) {
    std::mt19937 rng(2026);
    const int ds[] = {64, 128, 256}, ms[] = {128, 256, 512}, gs[] = {1, 2, 4}, bs[] = {16, 32, 64, 128};
    for (int i = 0; i < 24; ++i) {
        TcCase c{ds[rng() % 3], ms[rng() % 3], gs[rng() % 3], 0, bs[rng() % 4]};
        c.tokens = 1 + 2 * static_cast<int>(rng() % 1500);  // odd counts, partial last blocks and steps
        c.kv_heads = 1 + static_cast<int>(rng() % 3);
        run_tc_case(c);
    }
}

TEST(QjlScoreGpu, TensorPathOddShapes) {
    run_tc_case({128, 96, 2, 513, 32});                   // m = 96: 12-byte codes, words past m/32 never loaded
    run_tc_case({64, 160, 4, 301, 16});                   // m = 160: 20-byte codes
    run_tc_case({128, 320, 1, 777, 64});                  // two 256-bit steps, the second partly used
    run_tc_case({128, 64, 1, 99, 16});                    // m = 64
    run_tc_case({128, 256, 8, 1001, 64});                 // G = 8, fragments in registers
    run_tc_case({128, 256, 3, 555, 32});                  // G = 3: fragments read from the records
    run_tc_case({256, 1024, 8, 300, 128});                // m = 1024, G = 8: record path
    run_tc_case({128, 768, 4, 257, 256});                 // three K steps, B = 256
    run_tc_case({128, 256, 1, 15, 16});                   // fewer tokens than one step
    run_tc_case({128, 256, 2, 1, 64});                    // one token
    run_tc_case({128, 256, 2, 0, 64});                    // no tokens: records only
    run_tc_case({128, 256, 4, 4099, 64, 3, true});        // fp16 query
    run_tc_case({128, 256, 2, 200, 64, 2, false, true});  // a zero query head
}

TEST(QjlScoreGpu, TensorPathCapturesInAGraph) {
    run_tc_case({128, 256, 1, 2000, 64}, true);
    run_tc_case({128, 96, 3, 333, 16}, true);
}

TEST(QjlScoreGpu, TensorPathDirectKernel) {
    // The direct-load kernel (project, quantize, qjl_score_tc_kernel): QjlScoreArgs::tc_pipelined = false.
    std::mt19937 rng(4242);
    const int ds[] = {64, 128, 256}, ms[] = {96, 256, 512}, gs[] = {1, 3, 8}, bs[] = {16, 64, 256};
    for (int i = 0; i < 8; ++i) {
        TcCase c{ds[rng() % 3], ms[rng() % 3], gs[rng() % 3], 1 + 2 * static_cast<int>(rng() % 1500), bs[rng() % 3]};
        c.direct = true;
        run_tc_case(c);
    }
    TcCase g{128, 256, 2, 999, 32};
    g.direct = true;
    run_tc_case(g, true);
}

TEST(QjlScoreGpu, TensorPathLongRunsPerWarp) {
    // One or a few CTAs: each warp streams dozens of tiles through its stage ring (wrap-around and
    // phase flips), refreshes its page-id batch (every 32 / nsub tiles), and crosses KV heads.
    const TcCase cases[] = {
        {128, 256, 1, 20001, 64, 2},  // nsub 1: > 32 tiles per warp at one CTA
        {128, 256, 4, 4099, 16, 3},   // nsub 4: batches of 8 tiles
        {64, 128, 2, 3001, 32, 3},    // nsub 2
        {128, 96, 3, 2500, 128, 2},   // m = 96 (4-byte rows), any-G fragments
        {128, 512, 8, 1500, 256, 3},  // two K steps, G = 8, 2 stages
        {256, 1024, 1, 700, 64, 2},   // four K steps, 2 stages
    };
    for (TcCase c : cases) {
        c.max_ctas = 1;
        run_tc_case(c);
        c.max_ctas = 3;
        run_tc_case(c);
    }
    TcCase g{128, 256, 2, 5000, 64, 2};
    g.max_ctas = 2;
    run_tc_case(g, true);  // graph replay with long runs
}

TEST(QjlScoreGpu, TensorPathPipelinedMatchesDirect) {
    // The same preparation launches, and both score kernels evaluate the same float expression:
    // bit-identical outputs.
    const TcCase cases[] = {
        {128, 256, 1, 4097, 64, 2}, {64, 96, 3, 333, 16, 2},     {256, 512, 4, 1001, 128, 1},
        {128, 320, 8, 257, 32, 2},  {128, 1024, 2, 130, 256, 1}, {128, 256, 2, 77, 64, 2, true},
    };
    for (const TcCase& c : cases) {
        TcCase l = c;
        l.direct = true;
        TcOutput po, lo;
        run_tc_case(c, false, &po);
        run_tc_case(l, false, &lo);
        SCOPED_TRACE(describe(c));
        expect_bit_identical(po, lo);
    }
}

TEST(QjlScoreGpu, TensorPathPdlMatchesPlainLaunch) {
    // The default launch (on sm_90 a programmatic dependent of the quantisation, QjlScoreArgs::tc_pdl)
    // changes only when the score kernel starts: workspace and scores bit-identical to a plain launch,
    // for every group-size path (registers and records) and K steps.
    const TcCase cases[] = {
        {128, 256, 1, 4097, 64, 2},  {64, 96, 3, 333, 16, 2},
        {256, 512, 4, 1001, 128, 1}, {128, 320, 8, 257, 32, 2},
        {128, 1024, 2, 130, 256, 1}, {128, 256, 2, 77, 64, 2, true},
        {128, 256, 1, 15, 16, 3},    {128, 1024, 8, 300, 128, 1},
        {128, 256, 2, 0, 64, 2},     {128, 256, 2, 200, 64, 2, false, true},
    };
    for (const TcCase& c : cases) {
        TcCase l = c, f = c;
        l.plain = true;
        f.direct = true;
        TcOutput lo, fo;
        run_tc_case(l, false, &lo);
        run_tc_case(f, false, &fo);
        SCOPED_TRACE(describe(f));
        expect_bit_identical(fo, lo);
    }
    TcCase g{128, 256, 1, 3000, 64, 2};
    g.direct = true;
    run_tc_case(g, true);  // graph capture of the programmatic dependent launch, replayed twice
    g.m = 96;
    g.group = 3;
    run_tc_case(g, true);
}

TEST(QjlScoreGpu, SmallBlocksFallBackToExact) {
    // exact_query = false, but blocks of 8 tokens cannot form a 16-token BMMA step: exact kernel.
    run_case({128, 256, 0, 2, 301, 8}, false, false);
    run_case({64, 128, 0, 1, 77, 8}, false, false);
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
