// GPU benchmark: QJL key scoring over paged blocks (kvq::cuda::launch_qjl_score) against its
// memory floor and against cuBLAS fp16 q.K^T on the same tokens. Plain main() with CUDA events:
//   kvq-bench-gpu [--runs N] [--tokens T] [--no-cublas] [--timeline]
// Paths: "tc" = the default without outliers (int8 bit-sliced query, BMMA on tensor cores; on sm_90
// the pipelined bulk-copy kernel, QjlScoreArgs::tc_pipelined), "tc-direct" = the same scores from the
// direct-load kernel (tc_pipelined = false), "tc-plain" = that one with QjlScoreArgs::tc_pdl = false (no
// programmatic dependent launches), "exact" = exact_query = true (fp32 nibble tables), "exact+8o" = 8
// outliers (always exact). --timeline (builds with -DKVQ_TIMELINE): the CTA stamps of "tc" and
// "tc-direct" (the pipelined kernel stamps its warps 0-3 of 8; its exit is warp 0's loop end).
// For each shape: median of N (default 50) warmed-up runs, each run on the next of several copies
// of the inputs so that the working set exceeds the L2 cache (50 MB) where memory allows.
// Bytes counted (the floor): codes + norms + outlier ids (whole blocks) + page table + query +
// scores written; GB/s = bytes / median time; "% copy" relates it to the device-to-device
// cudaMemcpy bandwidth measured here (bytes read + written).
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "gpu_timeline.cuh"
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

#define CUBLAS_CHECK(expr)                                                                \
    do {                                                                                  \
        cublasStatus_t s_ = (expr);                                                       \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                \
            std::fprintf(stderr, "cuBLAS error %d in %s\n", static_cast<int>(s_), #expr); \
            std::exit(1);                                                                 \
        }                                                                                 \
    } while (0)

constexpr std::size_t kL2Exceed = 200ull << 20;  // rotate over at least this many bytes (L2 is 50 MB)

cudaStream_t g_stream = nullptr;

struct Timing {
    float median_us;  // per run, CUDA events between back-to-back runs (host launch cost included)
    float graph_us;   // per run, average over a CUDA graph replaying all runs (launch gaps removed)
};

// f(copy) enqueues one run on g_stream.
template <class F>
Timing time_runs(int runs, int copies, F&& f) {
    for (int i = 0; i < std::max(5, copies); ++i) f(i % copies);  // warm-up
    KVQ_CUDA_CHECK(cudaStreamSynchronize(g_stream));
    std::vector<cudaEvent_t> ev(runs + 1);
    for (auto& e : ev) KVQ_CUDA_CHECK(cudaEventCreate(&e));
    KVQ_CUDA_CHECK(cudaEventRecord(ev[0], g_stream));
    for (int r = 0; r < runs; ++r) {
        f(r % copies);
        KVQ_CUDA_CHECK(cudaEventRecord(ev[r + 1], g_stream));
    }
    KVQ_CUDA_CHECK(cudaStreamSynchronize(g_stream));
    std::vector<float> t(runs);
    for (int r = 0; r < runs; ++r) KVQ_CUDA_CHECK(cudaEventElapsedTime(&t[r], ev[r], ev[r + 1]));
    std::nth_element(t.begin(), t.begin() + runs / 2, t.end());
    Timing out{t[runs / 2] * 1000.f, 0.f};

    cudaGraph_t graph;
    cudaGraphExec_t exec;
    KVQ_CUDA_CHECK(cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeThreadLocal));
    for (int r = 0; r < runs; ++r) f(r % copies);
    KVQ_CUDA_CHECK(cudaStreamEndCapture(g_stream, &graph));
    KVQ_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    KVQ_CUDA_CHECK(cudaGraphLaunch(exec, g_stream));  // warm-up
    KVQ_CUDA_CHECK(cudaEventRecord(ev[0], g_stream));
    KVQ_CUDA_CHECK(cudaGraphLaunch(exec, g_stream));
    KVQ_CUDA_CHECK(cudaEventRecord(ev[1], g_stream));
    KVQ_CUDA_CHECK(cudaStreamSynchronize(g_stream));
    float ms = 0;
    KVQ_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[0], ev[1]));
    out.graph_us = ms * 1000.f / runs;
    KVQ_CUDA_CHECK(cudaGraphExecDestroy(exec));
    KVQ_CUDA_CHECK(cudaGraphDestroy(graph));
    for (auto& e : ev) KVQ_CUDA_CHECK(cudaEventDestroy(e));
    return out;
}

int copies_for(std::size_t bytes, std::size_t per_copy_alloc) {
    std::size_t free_b = 0, total_b = 0;
    KVQ_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    std::size_t want = (kL2Exceed + bytes - 1) / std::max<std::size_t>(bytes, 1);
    want = std::clamp<std::size_t>(want, 1, 64);
    const std::size_t fit = std::max<std::size_t>(1, (free_b / 2) / std::max<std::size_t>(per_copy_alloc, 1));
    return static_cast<int>(std::min(want, fit));
}

double copy_bandwidth_gbs(int runs) {
    const std::size_t n = 1ull << 30;  // 1 GiB each way
    void *a, *b;
    KVQ_CUDA_CHECK(cudaMalloc(&a, n));
    KVQ_CUDA_CHECK(cudaMalloc(&b, n));
    KVQ_CUDA_CHECK(cudaMemset(a, 1, n));
    const float us = time_runs(runs, 1, [&](int) {
                         KVQ_CUDA_CHECK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, g_stream));
                     }).median_us;
    KVQ_CUDA_CHECK(cudaFree(a));
    KVQ_CUDA_CHECK(cudaFree(b));
    return 2.0 * n / (us * 1e-6) / 1e9;
}

struct Row {
    const char* path;
    int outliers, T;
    Timing qjl;
    double qjl_bytes;
    Timing blas;
    double blas_bytes;
};

}  // namespace

int main(int argc, char** argv) {
    int runs = 50, only_tokens = 0;
    bool blas_on = true, timeline = false;
    for (int i = 1; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--runs") && i + 1 < argc)
            runs = std::max(1, std::atoi(argv[++i]));
        else if (!std::strcmp(argv[i], "--tokens") && i + 1 < argc)
            only_tokens = std::atoi(argv[++i]);
        else if (!std::strcmp(argv[i], "--no-cublas"))
            blas_on = false;
        else if (!std::strcmp(argv[i], "--timeline"))  // builds with -DKVQ_TIMELINE (see the top)
            timeline = true;
        else {
            std::fprintf(stderr, "usage: %s [--runs N] [--tokens T] [--no-cublas] [--timeline]\n", argv[0]);
            return 2;
        }
    }

    int dev = 0, driver = 0, runtime = 0;
    cudaDeviceProp prop{};
    KVQ_CUDA_CHECK(cudaGetDevice(&dev));
    KVQ_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    KVQ_CUDA_CHECK(cudaDriverGetVersion(&driver));
    KVQ_CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
    std::printf("device: %s, %d SMs, L2 %d MB, CUDA driver %d, runtime %d\n", prop.name, prop.multiProcessorCount,
                prop.l2CacheSize >> 20, driver, runtime);
    KVQ_CUDA_CHECK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
    const double copy_gbs = copy_bandwidth_gbs(20);
    std::printf("device-to-device cudaMemcpy (1 GiB, read+write counted): %.0f GB/s\n\n", copy_gbs);

    const int H = 32, d = 128, m = 256, B = 64;
    cublasHandle_t blas;
    CUBLAS_CHECK(cublasCreate(&blas));
    CUBLAS_CHECK(cublasSetStream(blas, g_stream));
    void* blas_ws;
    const std::size_t blas_ws_bytes = 32u << 20;
    KVQ_CUDA_CHECK(cudaMalloc(&blas_ws, blas_ws_bytes));
    CUBLAS_CHECK(cublasSetWorkspace(blas, blas_ws, blas_ws_bytes));
    std::vector<Row> rows;
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.f, 1.f);

    for (int outliers : {0, 8}) {
        kvq::QjlParams p;
        p.head_dim = d;
        p.m = m;
        p.m_outlier = 256;
        p.outliers = outliers;
        const kvq::QjlKeyCodec codec(p);
        const kvq::BlockLayout layout = codec.layout(B);
        const std::size_t bb = layout.bytes();
        // 64 distinct real blocks encoded on the CPU, tiled over the pool (the kernel's speed does not
        // depend on the bit values; the GPU tests check correctness).
        const int distinct = 64;
        std::vector<std::uint8_t> proto(distinct * bb);
        {
            std::vector<float> keys(std::size_t(B) * d);
            for (int b = 0; b < distinct; ++b) {
                for (int i = 0; i < B * d; ++i) keys[i] = ((i % d) % 29 == 3 ? 8.f : 1.f) * nd(rng);
                codec.encode(keys.data(), B, &proto[b * bb], B, 0);
            }
        }
        float* d_sketch;
        KVQ_CUDA_CHECK(cudaMalloc(&d_sketch, codec.sketch().size() * 4));
        KVQ_CUDA_CHECK(cudaMemcpy(d_sketch, codec.sketch().data(), codec.sketch().size() * 4, cudaMemcpyHostToDevice));
        std::vector<float> q(std::size_t(H) * d);
        for (auto& v : q) v = nd(rng);
        float* d_q;
        KVQ_CUDA_CHECK(cudaMalloc(&d_q, q.size() * 4));
        KVQ_CUDA_CHECK(cudaMemcpy(d_q, q.data(), q.size() * 4, cudaMemcpyHostToDevice));

        for (int T : {4096, 16384, 65536}) {
            if (only_tokens && T != only_tokens) continue;
            const int pages_per_head = T / B, n_blocks = pages_per_head * H;
            const std::size_t pool_bytes = std::size_t(n_blocks) * bb;
            const double qjl_bytes = double(pool_bytes) + double(n_blocks) * 4 + double(H) * d * 4 + double(H) * T * 4;
            const int copies = copies_for(std::size_t(qjl_bytes), pool_bytes + std::size_t(H) * T * 4 + n_blocks * 4);
            std::vector<std::uint8_t> pool(pool_bytes);
            for (int i = 0; i < n_blocks; ++i) std::memcpy(&pool[i * bb], &proto[(i % distinct) * bb], bb);
            struct Copy {
                std::uint8_t* pool;
                std::uint32_t* pages;
                float* scores;
            };
            std::vector<Copy> cs(copies);
            std::vector<std::uint32_t> ids(n_blocks);
            for (auto& c : cs) {
                KVQ_CUDA_CHECK(cudaMalloc(&c.pool, pool_bytes));
                KVQ_CUDA_CHECK(cudaMalloc(&c.pages, n_blocks * 4));
                KVQ_CUDA_CHECK(cudaMalloc(&c.scores, std::size_t(H) * T * 4));
                KVQ_CUDA_CHECK(cudaMemcpy(c.pool, pool.data(), pool_bytes, cudaMemcpyHostToDevice));
                std::iota(ids.begin(), ids.end(), 0u);
                std::shuffle(ids.begin(), ids.end(), rng);  // pages in shuffled order
                KVQ_CUDA_CHECK(cudaMemcpy(c.pages, ids.data(), n_blocks * 4, cudaMemcpyHostToDevice));
            }
            struct Variant {
                const char* path;
                bool exact;
                bool pipelined;
                Timing t;
                bool plain = false;
            };
            std::vector<Variant> variants;
            if (outliers == 0)
                variants = {{"tc", false, true, {}},
                            {"tc-direct", false, false, {}},
                            {"tc-plain", false, false, {}, true},
                            {"exact", true, false, {}}};
            else
                variants = {{"exact+8o", true, false, {}}};
            for (Variant& v : variants) {
                kvq::cuda::QjlScoreArgs a;
                kvq::cuda::set_qjl_codec(a, codec, B);
                a.sketch = d_sketch;
                a.block_bytes = bb;
                a.page_stride = pages_per_head;
                a.n_kv_heads = H;
                a.n_q_heads = H;
                a.n_tokens = T;
                a.query = d_q;
                a.pool = cs[0].pool;
                a.pages = cs[0].pages;
                a.scores = cs[0].scores;
                a.exact_query = v.exact;
                a.tc_pipelined = v.pipelined;
                if (v.plain) a.tc_pdl = false;
                const std::size_t ws_bytes = kvq::cuda::qjl_score_workspace_bytes(a);
                void* ws;
                KVQ_CUDA_CHECK(cudaMalloc(&ws, ws_bytes));
                v.t = time_runs(runs, copies, [&](int c) {
                    a.pool = cs[c].pool;
                    a.pages = cs[c].pages;
                    a.scores = cs[c].scores;
                    kvq::cuda::launch_qjl_score(a, g_stream, ws, ws_bytes);
                });
                KVQ_CUDA_CHECK(cudaDeviceSynchronize());
#if defined(KVQ_TIMELINE)
                if (timeline && (std::strcmp(v.path, "tc") == 0 || std::strcmp(v.path, "tc-direct") == 0)) {
                    for (int rep = 0; rep < 2; ++rep) {  // the second launch's stamps (the first warms up)
                        kvq_bench::clear_timeline();
                        a.pool = cs[rep % copies].pool;
                        a.pages = cs[rep % copies].pages;
                        a.scores = cs[rep % copies].scores;
                        kvq::cuda::launch_qjl_score(a, g_stream, ws, ws_bytes);
                        KVQ_CUDA_CHECK(cudaStreamSynchronize(g_stream));
                    }
                    std::printf("timeline: score %s, T %d, graph %.1f us\n", v.path, T, v.t.graph_us);
                    kvq_bench::print_timeline(0, double(bb) / B, "records ready after entry", false);
                }
#else
                (void)timeline;
#endif
                KVQ_CUDA_CHECK(cudaFree(ws));
            }
            for (auto& c : cs) {
                KVQ_CUDA_CHECK(cudaFree(c.pool));
                KVQ_CUDA_CHECK(cudaFree(c.pages));
                KVQ_CUDA_CHECK(cudaFree(c.scores));
            }

            // cuBLAS fp16 baseline: scores_h [T] = K_h [T][d] q_h, fp16 inputs, fp32 accumulate and output.
            if (!blas_on) {
                for (const Variant& v : variants)
                    rows.push_back({v.path, outliers, T, v.t, qjl_bytes, Timing{0.f, 0.f}, 0.0});
                continue;
            }
            const std::size_t kbytes = std::size_t(H) * T * d * 2;
            const double blas_bytes = double(kbytes) + double(H) * d * 2 + double(H) * T * 4;
            const int bcopies = copies_for(std::size_t(blas_bytes), kbytes + std::size_t(H) * T * 4);
            std::vector<__half*> K(bcopies);
            std::vector<float*> S(bcopies);
            __half* d_qh;
            {
                std::vector<__half> kh(std::size_t(H) * T * d), qh(q.size());
                std::vector<__half> pattern(1 << 20);
                for (auto& v : pattern) v = __float2half(nd(rng));
                for (std::size_t i = 0; i < kh.size(); ++i)
                    kh[i] = pattern[(i * 7 + i / pattern.size()) % pattern.size()];
                for (std::size_t i = 0; i < q.size(); ++i) qh[i] = __float2half(q[i]);
                KVQ_CUDA_CHECK(cudaMalloc(&d_qh, qh.size() * 2));
                KVQ_CUDA_CHECK(cudaMemcpy(d_qh, qh.data(), qh.size() * 2, cudaMemcpyHostToDevice));
                for (int c = 0; c < bcopies; ++c) {
                    KVQ_CUDA_CHECK(cudaMalloc(&K[c], kbytes));
                    KVQ_CUDA_CHECK(cudaMalloc(&S[c], std::size_t(H) * T * 4));
                    KVQ_CUDA_CHECK(cudaMemcpy(K[c], kh.data(), kbytes, cudaMemcpyHostToDevice));
                }
            }
            const float one = 1.f, zero = 0.f;
            const Timing blas_us = time_runs(runs, bcopies, [&](int c) {
                // Column-major: K_h is d x T (ld d); C (T x 1) = K_h^T (T x d) * q_h (d x 1).
                CUBLAS_CHECK(cublasGemmStridedBatchedEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, T, 1, d, &one, K[c], CUDA_R_16F,
                                                        d, std::int64_t(T) * d, d_qh, CUDA_R_16F, d, d, &zero, S[c],
                                                        CUDA_R_32F, T, T, H, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            });
            KVQ_CUDA_CHECK(cudaDeviceSynchronize());
            for (int c = 0; c < bcopies; ++c) {
                KVQ_CUDA_CHECK(cudaFree(K[c]));
                KVQ_CUDA_CHECK(cudaFree(S[c]));
            }
            KVQ_CUDA_CHECK(cudaFree(d_qh));
            for (const Variant& v : variants)
                rows.push_back({v.path, outliers, T, v.t, qjl_bytes, blas_us, blas_bytes});
            std::printf("done: outliers=%d T=%d (copies qjl %d, cublas %d)\n", outliers, T, copies, bcopies);
        }
        KVQ_CUDA_CHECK(cudaFree(d_sketch));
        KVQ_CUDA_CHECK(cudaFree(d_q));
    }

    std::printf(
        "\nQJL score, batch 1, H_q = H_kv = %d, d = %d, m = %d (m_o = 256 with outliers), B = %d; median of %d runs\n",
        H, d, m, B, runs);
    std::printf("copy bandwidth %.0f GB/s\n", copy_gbs);
    std::printf(
        "QJL bytes: codes + norms + ids (whole blocks) + page table + fp32 query + fp32 scores; cuBLAS bytes:\n"
        "fp16 K + fp16 q + fp32 scores. us = median per run, CUDA events, back-to-back runs; graph us = mean\n"
        "per run replaying all runs from one CUDA graph (no host launch cost). GB/s and %% copy use graph us.\n"
        "path: tc = int8 bit-sliced query on tensor cores (default: project, quantize, pipelined BMMA kernel\n"
        "as its programmatic dependent), tc-direct = the direct-load BMMA kernel (tc_pipelined = false),\n"
        "tc-plain = that one with tc_pdl = false, exact = exact_query, exact+8o = 8 outliers.\n\n");
    std::printf(
        "| path | outliers | T | QJL us | QJL graph us | QJL MB | QJL GB/s | %% copy | floor us | cuBLAS us | "
        "cuBLAS graph us | cuBLAS MB | cuBLAS GB/s | speedup (graph) |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (const Row& r : rows) {
        const double gbs = r.qjl_bytes / (r.qjl.graph_us * 1e-6) / 1e9;
        if (r.blas_bytes > 0) {
            const double bgbs = r.blas_bytes / (r.blas.graph_us * 1e-6) / 1e9;
            std::printf(
                "| %s | %d | %d | %.1f | %.1f | %.2f | %.0f | %.0f%% | %.1f | %.1f | %.1f | %.1f | %.0f | %.2fx |\n",
                r.path, r.outliers, r.T, r.qjl.median_us, r.qjl.graph_us, r.qjl_bytes / 1e6, gbs,
                100.0 * gbs / copy_gbs, r.qjl_bytes / (copy_gbs * 1e9) * 1e6, r.blas.median_us, r.blas.graph_us,
                r.blas_bytes / 1e6, bgbs, r.blas.graph_us / r.qjl.graph_us);
        } else {
            std::printf("| %s | %d | %d | %.1f | %.1f | %.2f | %.0f | %.0f%% | %.1f | - | - | - | - | - |\n", r.path,
                        r.outliers, r.T, r.qjl.median_us, r.qjl.graph_us, r.qjl_bytes / 1e6, gbs,
                        100.0 * gbs / copy_gbs, r.qjl_bytes / (copy_gbs * 1e9) * 1e6);
        }
    }
    // Compact summary: graph us and % of copy bandwidth per path, one line per T.
    std::printf("\ncompact (graph us / %% copy; copy %.0f GB/s):\n", copy_gbs);
    std::printf("%8s %18s %18s %18s %18s %14s\n", "T", "tc", "tc-direct", "exact", "exact+8o", "cuBLAS fp16");
    std::vector<int> Ts;
    for (const Row& r : rows)
        if (std::find(Ts.begin(), Ts.end(), r.T) == Ts.end()) Ts.push_back(r.T);
    for (int T : Ts) {
        std::printf("%8d", T);
        double blas_us = 0;
        for (const char* path : {"tc", "tc-direct", "exact", "exact+8o"}) {
            const Row* f = nullptr;
            for (const Row& r : rows)
                if (r.T == T && !std::strcmp(r.path, path)) f = &r;
            if (!f) {
                std::printf(" %18s", "-");
                continue;
            }
            const double gbs = f->qjl_bytes / (f->qjl.graph_us * 1e-6) / 1e9;
            char cell[64];
            std::snprintf(cell, sizeof cell, "%.1f us / %.0f%%", f->qjl.graph_us, 100.0 * gbs / copy_gbs);
            std::printf(" %18s", cell);
            if (f->blas_bytes > 0) blas_us = f->blas.graph_us;
        }
        if (blas_us > 0)
            std::printf(" %11.1f us\n", blas_us);
        else
            std::printf(" %14s\n", "-");
    }
    CUBLAS_CHECK(cublasDestroy(blas));
    KVQ_CUDA_CHECK(cudaFree(blas_ws));
    KVQ_CUDA_CHECK(cudaStreamDestroy(g_stream));
    return 0;
}
