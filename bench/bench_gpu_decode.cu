// GPU benchmark: fused decode attention over paged quantized blocks
// (kvq::cuda::launch_decode_attention) against its memory floor and against a straightforward fp16
// split-K decode attention kernel written here (not cuBLAS): fp16 K and V [batch][H][T][d], one
// warp per 8-token step with fp32 online softmax, the same combine kernel as the fused path.
//   kvq-bench-gpu-decode [--runs N] [--tokens T] [--batch B] [--cfg C]   (filters for profiling; default
//   all; C: 0 = QJL + int2, 1 = int4 K + V, 2 = WKV int4); --chunk C: DecodeAttentionArgs::chunk_tokens
//   (positions per CTA of the tensor-core kernel, a multiple of 256; also the split of the CUDA-core and
//   fp16 rows) instead of the planners' choice; --sweep: after each tensor-core row, the same call at
//   chunk_tokens 256 .. T (one "sweep:" line each, graph us), the data behind the planner's cost model
//   (dec_plan); --timeline (builds with -DKVQ_TIMELINE): the per-CTA stamps of each tensor-core row's call
// H_q = H_kv = 32, d = 128, block 64 tokens, no window and no current token (all tokens in blocks),
// fp32 query and output. Median of N (default 30) warmed-up runs with CUDA events, each run on the
// next of several copies of the inputs (working set > 200 MB, L2 is 50 MB) where memory allows;
// "graph us" replays all runs from one CUDA graph. Bytes: whole key and value blocks + both page
// tables + query + output + the split-K partials (written and read back); fp16: K + V + query +
// output + partials. "% copy" relates bytes / graph time to the device-to-device cudaMemcpy
// bandwidth measured in the same binary (read + write counted).
// Every configuration the tensor-core kernel takes (QJL keys, token-wise int4 keys, WKV int4 keys) gets
// four rows: "[tensor cores]" (the default call: bulk-copy staging, launches overlapped as programmatic
// dependents), "[tensor cores, per-lane cp.async]", "[tensor cores, no PDL]" (plain stream order) and
// "[CUDA cores]" (cuda_core_only, the previous kernel), side by side.
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
#include "kvq/cuda/decode_attention.cuh"
#if defined(__NVCC__)
#pragma nv_diag_suppress 20012
#pragma nv_diag_suppress 20013
#pragma nv_diag_suppress 20014
#pragma nv_diag_suppress 20015
#endif
#include "kvq/quant/qjl_key_codec.hpp"
#include "kvq/quant/tokenwise_codec.hpp"

namespace {

constexpr std::size_t kL2Exceed = 200ull << 20;
cudaStream_t g_stream = nullptr;

struct Timing {
    float median_us = 0, graph_us = 0;
};

template <class F>
Timing time_runs(int runs, int copies, F&& f) {
    for (int i = 0; i < std::max(5, copies); ++i) f(i % copies);
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
    KVQ_CUDA_CHECK(cudaGraphLaunch(exec, g_stream));
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
    want = std::clamp<std::size_t>(want, 1, 32);
    const std::size_t fit = std::max<std::size_t>(1, (free_b / 2) / std::max<std::size_t>(per_copy_alloc, 1));
    return static_cast<int>(std::min(want, fit));
}

double copy_bandwidth_gbs(int runs) {
    const std::size_t n = 1ull << 30;
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

// pool block i = proto block (i % distinct), 16-byte words.
__global__ void tile_blocks(const uint4* proto, int distinct, std::size_t words_per_block, uint4* pool,
                            std::size_t n_blocks) {
    const std::size_t n = n_blocks * words_per_block;
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x) {
        const std::size_t blk = i / words_per_block, w = i % words_per_block;
        pool[i] = proto[(blk % distinct) * words_per_block + w];
    }
}

__global__ void fill_half(__half* p, std::size_t n, std::uint32_t seed) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x) {
        std::uint32_t x = static_cast<std::uint32_t>(i) * 2654435761u ^ seed;
        x ^= x >> 15;
        x *= 2246822519u;
        x ^= x >> 13;
        p[i] = __float2half((static_cast<float>(x & 0xFFFF) / 65536.f - 0.5f) * 3.f);
    }
}

// fp16 baseline: grid (chunks, H, batch), 256 threads; warp w takes 8-token steps
// t0 + 8 (w + 8 i); lane holds D/32 consecutive channels (4 for d = 128: one 8-byte load per row).
template <int D>
__global__ void __launch_bounds__(256) fp16_decode_partial(const __half* K, const __half* V, const float* q, int T,
                                                           int chunk, int n_chunks, float* part_ml, float* part_acc) {
    constexpr int C = D / 32;
    static_assert(C == 4, "the baseline is written for d = 128");
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, H = gridDim.y;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const std::size_t head = std::size_t(b) * H + h;
    const __half* Kh = K + head * std::size_t(T) * D;
    const __half* Vh = V + head * std::size_t(T) * D;
    float qv[C];
    const float scale = rsqrtf(static_cast<float>(D));
    for (int j = 0; j < C; ++j) qv[j] = q[head * D + lane * C + j] * scale;
    float m = -INFINITY, l = 0.f, acc[C] = {0.f, 0.f, 0.f, 0.f};
    const int c_begin = c * chunk, c_end = min(T, c_begin + chunk);
    for (int t0 = c_begin + warp * 8; t0 < c_end; t0 += 64) {
        float s[8];
        uint2 kr[8];
#pragma unroll
        for (int i = 0; i < 8; ++i)
            kr[i] = t0 + i < c_end ? __ldg(reinterpret_cast<const uint2*>(Kh + std::size_t(t0 + i) * D) + lane)
                                   : make_uint2(0, 0);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&kr[i].x));
            const float2 bb = __half22float2(*reinterpret_cast<const __half2*>(&kr[i].y));
            s[i] = qv[0] * a.x + qv[1] * a.y + qv[2] * bb.x + qv[3] * bb.y;
        }
#pragma unroll
        for (int off = 16; off > 0; off /= 2)
#pragma unroll
            for (int i = 0; i < 8; ++i) s[i] += __shfl_xor_sync(0xffffffffu, s[i], off);
        float mx = m;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            if (t0 + i >= c_end) s[i] = -INFINITY;
            mx = fmaxf(mx, s[i]);
        }
        const float corr = __expf(m - mx);
        l *= corr;
#pragma unroll
        for (int j = 0; j < C; ++j) acc[j] *= corr;
        m = mx;
        uint2 vr[8];
#pragma unroll
        for (int i = 0; i < 8; ++i)
            vr[i] = t0 + i < c_end ? __ldg(reinterpret_cast<const uint2*>(Vh + std::size_t(t0 + i) * D) + lane)
                                   : make_uint2(0, 0);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float p = __expf(s[i] - m);
            l += p;
            const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&vr[i].x));
            const float2 bb = __half22float2(*reinterpret_cast<const __half2*>(&vr[i].y));
            acc[0] = fmaf(p, a.x, acc[0]);
            acc[1] = fmaf(p, a.y, acc[1]);
            acc[2] = fmaf(p, bb.x, acc[2]);
            acc[3] = fmaf(p, bb.y, acc[3]);
        }
    }
    // Merge the 8 warps.
    __shared__ float sm[8], sl[8], sacc[8][D];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
    for (int j = 0; j < C; ++j) sacc[warp][lane * C + j] = acc[j];
    __syncthreads();
    if (threadIdx.x < D) {
        float M = -INFINITY;
        for (int w = 0; w < 8; ++w) M = fmaxf(M, sm[w]);
        float L = 0.f, o = 0.f;
        for (int w = 0; w < 8; ++w) {
            const float e = sm[w] == -INFINITY ? 0.f : __expf(sm[w] - M);
            L += e * sl[w];
            o += e * sacc[w][threadIdx.x];
        }
        part_acc[(head * n_chunks + c) * D + threadIdx.x] = o;
        if (threadIdx.x == 0) {
            part_ml[(head * n_chunks + c) * 2] = M;
            part_ml[(head * n_chunks + c) * 2 + 1] = L;
        }
    }
}

struct Row {
    std::string name;
    int batch, T;
    Timing t;
    double bytes;
};

void print_rows(const std::vector<Row>& rows, double copy_gbs) {
    std::printf(
        "| path | batch | T | us | graph us | MB | GB/s | %% copy | floor us "
        "|\n|---|---|---|---|---|---|---|---|---|\n");
    for (const Row& r : rows) {
        const double gbs = r.bytes / (r.t.graph_us * 1e-6) / 1e9;
        std::printf("| %s | %d | %d | %.1f | %.1f | %.1f | %.0f | %.0f%% | %.1f |\n", r.name.c_str(), r.batch, r.T,
                    r.t.median_us, r.t.graph_us, r.bytes / 1e6, gbs, 100.0 * gbs / copy_gbs,
                    r.bytes / (copy_gbs * 1e9) * 1e6);
    }
}

}  // namespace

int main(int argc, char** argv) {
    int runs = 30, only_tokens = 0, only_batch = 0, only_cfg = -1, chunk_tokens = 0;
    bool sweep = false, timeline = false;
    for (int i = 1; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--runs") && i + 1 < argc)
            runs = std::max(1, std::atoi(argv[++i]));
        else if (!std::strcmp(argv[i], "--tokens") && i + 1 < argc)
            only_tokens = std::atoi(argv[++i]);
        else if (!std::strcmp(argv[i], "--batch") && i + 1 < argc)
            only_batch = std::atoi(argv[++i]);
        else if (!std::strcmp(argv[i], "--cfg") && i + 1 < argc)
            only_cfg = std::atoi(argv[++i]);
        else if (!std::strcmp(argv[i], "--chunk") && i + 1 < argc)
            chunk_tokens = std::atoi(argv[++i]);
        else if (!std::strcmp(argv[i], "--sweep"))
            sweep = true;
        else if (!std::strcmp(argv[i], "--timeline"))
            timeline = true;
        else {
            std::fprintf(stderr,
                         "usage: %s [--runs N] [--tokens T] [--batch B] [--cfg 0|1|2] [--chunk C] [--sweep] "
                         "[--timeline]\n",
                         argv[0]);
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
    std::printf("device-to-device cudaMemcpy (1 GiB, read+write counted): %.0f GB/s\n", copy_gbs);

    const int H = 32, d = 128, B = 64, m = 256;
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<Row> rows;

    kvq::QjlParams qp;
    qp.head_dim = d;
    qp.m = m;
    qp.outliers = 0;
    const kvq::QjlKeyCodec qjl(qp);
    const kvq::TokenwiseCodec int2v(kvq::TokenwiseParams{d, 2, 32}), int4(kvq::TokenwiseParams{d, 4, 32});
    // WKVQuant K and V: 4-bit token-wise g = d on smoothed vectors; the smoothing is folded into the
    // query (k_scale) and the output (v_scale, v_shift) by the kernel.
    const kvq::TokenwiseCodec wkv4(kvq::TokenwiseParams{d, 4, d});
    std::vector<float> ksc(std::size_t(H) * d), vsc(ksc.size()), vsh(ksc.size());
    for (std::size_t i = 0; i < ksc.size(); ++i) {
        ksc[i] = 0.5f + 0.01f * float(i % 97);
        vsc[i] = 0.7f + 0.01f * float(i % 53);
        vsh[i] = 0.001f * float(i % 31) - 0.01f;
    }
    float *d_ksc, *d_vsc, *d_vsh;
    KVQ_CUDA_CHECK(cudaMalloc(&d_ksc, ksc.size() * 4));
    KVQ_CUDA_CHECK(cudaMalloc(&d_vsc, ksc.size() * 4));
    KVQ_CUDA_CHECK(cudaMalloc(&d_vsh, ksc.size() * 4));
    KVQ_CUDA_CHECK(cudaMemcpy(d_ksc, ksc.data(), ksc.size() * 4, cudaMemcpyHostToDevice));
    KVQ_CUDA_CHECK(cudaMemcpy(d_vsc, vsc.data(), ksc.size() * 4, cudaMemcpyHostToDevice));
    KVQ_CUDA_CHECK(cudaMemcpy(d_vsh, vsh.data(), ksc.size() * 4, cudaMemcpyHostToDevice));
    float* d_sketch;
    KVQ_CUDA_CHECK(cudaMalloc(&d_sketch, qjl.sketch().size() * 4));
    KVQ_CUDA_CHECK(cudaMemcpy(d_sketch, qjl.sketch().data(), qjl.sketch().size() * 4, cudaMemcpyHostToDevice));

    // 64 distinct real blocks per codec (encoded on the CPU), tiled over the pools.
    const int distinct = 64;
    auto make_proto = [&](const kvq::Codec& codec) {
        const std::size_t bb = codec.layout(B).bytes();
        std::vector<std::uint8_t> proto(distinct * bb);
        std::vector<float> x(std::size_t(B) * d);
        for (int b = 0; b < distinct; ++b) {
            for (auto& v : x) v = nd(rng);
            codec.encode(x.data(), B, &proto[b * bb], B, 0);
        }
        std::uint8_t* dp;
        KVQ_CUDA_CHECK(cudaMalloc(&dp, proto.size()));
        KVQ_CUDA_CHECK(cudaMemcpy(dp, proto.data(), proto.size(), cudaMemcpyHostToDevice));
        return dp;
    };

    for (int cfg = 0; cfg < 3; ++cfg) {
        if (only_cfg >= 0 && cfg != only_cfg) continue;
        const kvq::Codec& kc = cfg == 0 ? static_cast<const kvq::Codec&>(qjl) : (cfg == 1 ? int4 : wkv4);
        const kvq::TokenwiseCodec& vc = cfg == 0 ? int2v : (cfg == 1 ? int4 : wkv4);
        const std::string name =
            cfg == 0 ? "QJL m=256 K + int2 V" : (cfg == 1 ? "int4 K + int4 V" : "WKV int4 g128 K + V");
        std::uint8_t* kproto = make_proto(kc);
        std::uint8_t* vproto = make_proto(vc);
        const std::size_t kbb = kc.layout(B).bytes(), vbb = vc.layout(B).bytes();
        for (int batch : {1, 8})
            for (int T : {4096, 16384, 65536}) {
                if ((only_tokens > 0 && T != only_tokens) || (only_batch > 0 && batch != only_batch)) continue;
                const int pages = T / B;
                const std::size_t n_blocks = std::size_t(batch) * H * pages;
                std::vector<int> lens(batch, T);
                int* d_len;
                KVQ_CUDA_CHECK(cudaMalloc(&d_len, batch * sizeof(int)));
                KVQ_CUDA_CHECK(cudaMemcpy(d_len, lens.data(), batch * sizeof(int), cudaMemcpyHostToDevice));
                float *d_q, *d_out;
                std::vector<float> q(std::size_t(batch) * H * d);
                for (auto& v : q) v = 0.3f * nd(rng);
                KVQ_CUDA_CHECK(cudaMalloc(&d_q, q.size() * 4));
                KVQ_CUDA_CHECK(cudaMalloc(&d_out, q.size() * 4));
                KVQ_CUDA_CHECK(cudaMemcpy(d_q, q.data(), q.size() * 4, cudaMemcpyHostToDevice));

                kvq::cuda::DecodeAttentionArgs a;
                a.head_dim = d;
                a.n_q_heads = H;
                a.n_kv_heads = H;
                a.batch = batch;
                a.max_tokens = T;
                if (cfg == 0) {
                    kvq::cuda::set_qjl_keys(a, qjl, B);
                    a.sketch = d_sketch;
                } else if (cfg == 1) {
                    kvq::cuda::set_tokenwise_keys(a, int4, B);
                } else {
                    kvq::cuda::set_tokenwise_keys(a, wkv4, B);
                    a.k_scale = d_ksc;
                    a.v_scale = d_vsc;
                    a.v_shift = d_vsh;
                }
                kvq::cuda::set_tokenwise_values(a, vc, B);
                a.page_stride = pages;
                a.n_tokens = a.k_encoded = a.v_encoded = d_len;
                a.query = d_q;
                a.out = d_out;
                a.max_window_tokens = 0;        // every token is in blocks
                a.chunk_tokens = chunk_tokens;  // 0: the planner's split
                const std::size_t ws_bytes = kvq::cuda::decode_attention_workspace_bytes(a);
                const int n_chunks = kvq::cuda::detail::dec_chunks(a);  // the fp16 baseline's split
                const int n_parts = kvq::cuda::detail::dec_plan(a).n_parts;
                const double partial_bytes = 2.0 * batch * H * n_parts * (d + 2) * 4.0;
                const double bytes =
                    double(n_blocks) * (kbb + vbb) + 2.0 * n_blocks * 4 + 2.0 * q.size() * 4 + partial_bytes;
                const int copies = copies_for(std::size_t(bytes), n_blocks * (kbb + vbb + 8));
                struct Copy {
                    std::uint8_t *kpool, *vpool;
                    std::uint32_t *kpages, *vpages;
                };
                std::vector<Copy> cs(copies);
                std::vector<std::uint32_t> ids(n_blocks);
                for (auto& c : cs) {
                    KVQ_CUDA_CHECK(cudaMalloc(&c.kpool, n_blocks * kbb));
                    KVQ_CUDA_CHECK(cudaMalloc(&c.vpool, n_blocks * vbb));
                    KVQ_CUDA_CHECK(cudaMalloc(&c.kpages, n_blocks * 4));
                    KVQ_CUDA_CHECK(cudaMalloc(&c.vpages, n_blocks * 4));
                    tile_blocks<<<1024, 256, 0, g_stream>>>(reinterpret_cast<const uint4*>(kproto), distinct, kbb / 16,
                                                            reinterpret_cast<uint4*>(c.kpool), n_blocks);
                    KVQ_CUDA_CHECK_LAUNCH("tile_blocks");
                    tile_blocks<<<1024, 256, 0, g_stream>>>(reinterpret_cast<const uint4*>(vproto), distinct, vbb / 16,
                                                            reinterpret_cast<uint4*>(c.vpool), n_blocks);
                    KVQ_CUDA_CHECK_LAUNCH("tile_blocks");
                    std::iota(ids.begin(), ids.end(), 0u);
                    std::shuffle(ids.begin(), ids.end(), rng);
                    KVQ_CUDA_CHECK(cudaMemcpy(c.kpages, ids.data(), n_blocks * 4, cudaMemcpyHostToDevice));
                    std::shuffle(ids.begin(), ids.end(), rng);
                    KVQ_CUDA_CHECK(cudaMemcpy(c.vpages, ids.data(), n_blocks * 4, cudaMemcpyHostToDevice));
                }
                void* ws;
                KVQ_CUDA_CHECK(cudaMalloc(&ws, ws_bytes));
                KVQ_CUDA_CHECK(cudaDeviceSynchronize());
                // One launch_decode_attention per run on the next copy of the pools; w: the call's workspace
                // (nullptr: its own, allocated here).
                auto time_decode = [&](kvq::cuda::DecodeAttentionArgs x, void* w) {
                    const std::size_t wb = kvq::cuda::decode_attention_workspace_bytes(x);
                    void* own = nullptr;
                    if (w == nullptr) KVQ_CUDA_CHECK(cudaMalloc(&own, wb));
                    const Timing tt = time_runs(runs, copies, [&](int c) {
                        x.key_pool = cs[c].kpool;
                        x.value_pool = cs[c].vpool;
                        x.key_pages = cs[c].kpages;
                        x.value_pages = cs[c].vpages;
                        kvq::cuda::launch_decode_attention(x, g_stream, w ? w : own, wb);
                    });
                    KVQ_CUDA_CHECK(cudaDeviceSynchronize());
                    if (own) KVQ_CUDA_CHECK(cudaFree(own));
                    return tt;
                };
                const Timing t = time_decode(a, ws);
#if defined(KVQ_TIMELINE)
                if (timeline && kvq::cuda::detail::dec_plan(a).tc) {
                    const auto pl = kvq::cuda::detail::dec_plan(a);
                    for (int rep = 0; rep < 2; ++rep) {  // the second launch's stamps (the first warms up)
                        kvq_bench::clear_timeline();
                        kvq::cuda::DecodeAttentionArgs x = a;
                        x.key_pool = cs[rep % copies].kpool;
                        x.value_pool = cs[rep % copies].vpool;
                        x.key_pages = cs[rep % copies].kpages;
                        x.value_pages = cs[rep % copies].vpages;
                        kvq::cuda::launch_decode_attention(x, g_stream, ws, ws_bytes);
                        KVQ_CUDA_CHECK(cudaStreamSynchronize(g_stream));
                    }
                    std::printf("timeline: %s batch %d T %d, %d chunks of %d; graph %.1f us\n", name.c_str(), batch, T,
                                pl.n_main, pl.chunk, t.graph_us);
                    kvq_bench::print_timeline(pl.n_main * H * batch, double(kbb + vbb) / B,
                                              "merge: sums staged after end", true);
                }
#else
                (void)timeline;
#endif
                rows.push_back(
                    {name + (kvq::cuda::detail::dec_plan(a).tc ? " [tensor cores]" : ""), batch, T, t, bytes});
                if (sweep && kvq::cuda::detail::dec_plan(a).tc) {
                    const auto pl = kvq::cuda::detail::dec_plan(a);
                    std::printf("sweep: %s batch %d T %d planner chunk %d: %.1f us\n", name.c_str(), batch, T, pl.chunk,
                                t.graph_us);
                    for (int ch : {256, 512, 768, 1024, 1536, 2048, 2816, 3328, 4096, 5632, 8192, 11008, 16384, 22016,
                                   32768, 65536}) {
                        if (ch > T) break;
                        kvq::cuda::DecodeAttentionArgs as = a;
                        as.chunk_tokens = ch;
                        const Timing tt = time_decode(as, nullptr);
                        const int nm = (T + ch - 1) / ch;
                        const double sbytes = bytes - partial_bytes +
                                              2.0 * batch * H * kvq::cuda::detail::dec_plan(as).n_parts * (d + 2) * 4.0;
                        std::printf("sweep: %s batch %d T %d chunk %d: %d CTAs, %.1f us, %.0f%% copy\n", name.c_str(),
                                    batch, T, ch, nm * batch * H, tt.graph_us,
                                    100.0 * sbytes / (tt.graph_us * 1e3) / copy_gbs);
                    }
                }
                if (!sweep && kvq::cuda::detail::dec_plan(a).tc) {
                    // The same call with per-lane cp.async staging instead of bulk copies (same workspace).
                    kvq::cuda::DecodeAttentionArgs ab = a;
                    ab.tc_bulk_staging = false;
                    const Timing bt = time_decode(ab, ws);
                    rows.push_back({name + " [tensor cores, per-lane cp.async]", batch, T, bt, bytes});
                    // The same call in plain stream order (no programmatic dependent launches).
                    kvq::cuda::DecodeAttentionArgs ap = a;
                    ap.pdl = false;
                    const Timing pt = time_decode(ap, ws);
                    rows.push_back({name + " [tensor cores, no PDL]", batch, T, pt, bytes});
                }
                if (!sweep && kvq::cuda::detail::dec_plan(a).tc) {
                    // The same call on the CUDA-core kernel, for comparison.
                    kvq::cuda::DecodeAttentionArgs ac = a;
                    ac.cuda_core_only = true;
                    const Timing ct = time_decode(ac, nullptr);
                    rows.push_back({name + " [CUDA cores]", batch, T, ct,
                                    bytes - partial_bytes + 2.0 * batch * H * n_chunks * (d + 2) * 4.0});
                }
                if (cfg == 0 && !sweep) {
                    // Reference point: the scores alone (qjl_score.cuh, fp32 scores written) on the same key pools.
                    kvq::cuda::QjlScoreArgs sa;
                    kvq::cuda::set_qjl_codec(sa, qjl, B);
                    sa.sketch = d_sketch;
                    sa.block_bytes = kbb;
                    sa.page_stride = pages;
                    sa.n_kv_heads = batch * H;
                    sa.n_q_heads = batch * H;
                    sa.n_tokens = T;
                    sa.query = d_q;
                    float* scores;
                    KVQ_CUDA_CHECK(cudaMalloc(&scores, std::size_t(batch) * H * T * 4));
                    sa.scores = scores;
                    sa.pool = cs[0].kpool;
                    sa.pages = cs[0].kpages;
                    const std::size_t sws_bytes = kvq::cuda::qjl_score_workspace_bytes(sa);
                    void* sws;
                    KVQ_CUDA_CHECK(cudaMalloc(&sws, sws_bytes));
                    const Timing st = time_runs(runs, copies, [&](int c) {
                        sa.pool = cs[c].kpool;
                        sa.pages = cs[c].kpages;
                        kvq::cuda::launch_qjl_score(sa, g_stream, sws, sws_bytes);
                    });
                    KVQ_CUDA_CHECK(cudaDeviceSynchronize());
                    rows.push_back({"(QJL score only, qjl_score.cuh)", batch, T, st,
                                    double(n_blocks) * (kbb + 4) + q.size() * 4.0 + double(batch) * H * T * 4});
                    KVQ_CUDA_CHECK(cudaFree(scores));
                    KVQ_CUDA_CHECK(cudaFree(sws));
                }
                {
                    const kvq::cuda::detail::DecPlan pl = kvq::cuda::detail::dec_plan(a);
                    const int G = a.n_q_heads / a.n_kv_heads;
                    if (pl.tc)
                        std::printf(
                            "done: %s batch %d T %d (copies %d, chunks %d; tensor cores: %d chunks of %d, %d stages, "
                            "%zu B shared memory per CTA, %d CTAs per SM)\n",
                            name.c_str(), batch, T, copies, n_chunks, pl.n_main, pl.chunk,
                            kvq::cuda::detail::tc_pick_stages(a), kvq::cuda::detail::tc_smem_bytes(a, G),
                            kvq::cuda::detail::tc_ctas_per_sm(a));
                    else
                        std::printf("done: %s batch %d T %d (copies %d, chunks %d)\n", name.c_str(), batch, T, copies,
                                    n_chunks);
                }
                for (auto& c : cs) {
                    KVQ_CUDA_CHECK(cudaFree(c.kpool));
                    KVQ_CUDA_CHECK(cudaFree(c.vpool));
                    KVQ_CUDA_CHECK(cudaFree(c.kpages));
                    KVQ_CUDA_CHECK(cudaFree(c.vpages));
                }
                KVQ_CUDA_CHECK(cudaFree(ws));

                if (cfg == 0 && !sweep) {
                    // fp16 baseline on the same shape (same chunking and combine kernel).
                    const std::size_t kvbytes = std::size_t(batch) * H * T * d * 2;
                    const double fbytes =
                        2.0 * kvbytes + 2.0 * q.size() * 4 + 2.0 * batch * H * n_chunks * (d + 2) * 4.0;
                    const int fcopies = copies_for(std::size_t(fbytes), 2 * kvbytes);
                    std::vector<__half*> K(fcopies), V(fcopies);
                    for (int c = 0; c < fcopies; ++c) {
                        KVQ_CUDA_CHECK(cudaMalloc(&K[c], kvbytes));
                        KVQ_CUDA_CHECK(cudaMalloc(&V[c], kvbytes));
                        fill_half<<<2048, 256, 0, g_stream>>>(K[c], kvbytes / 2, 11u + c);
                        KVQ_CUDA_CHECK_LAUNCH("fill_half");
                        fill_half<<<2048, 256, 0, g_stream>>>(V[c], kvbytes / 2, 977u + c);
                        KVQ_CUDA_CHECK_LAUNCH("fill_half");
                    }
                    const int chunk = kvq::cuda::detail::dec_chunk(a);
                    float *ml, *pacc;
                    KVQ_CUDA_CHECK(cudaMalloc(&ml, std::size_t(batch) * H * n_chunks * 2 * 4));
                    KVQ_CUDA_CHECK(cudaMalloc(&pacc, std::size_t(batch) * H * n_chunks * d * 4));
                    KVQ_CUDA_CHECK(cudaDeviceSynchronize());
                    const Timing ft = time_runs(runs, fcopies, [&](int c) {
                        fp16_decode_partial<128><<<dim3(n_chunks, H, batch), 256, 0, g_stream>>>(
                            K[c], V[c], d_q, T, chunk, n_chunks, ml, pacc);
                        KVQ_CUDA_CHECK_LAUNCH("fp16_decode_partial");
                        kvq::cuda::detail::decode_combine_kernel<<<dim3(H, batch), d, 0, g_stream>>>(a, chunk, n_chunks,
                                                                                                     0, ml, pacc);
                        KVQ_CUDA_CHECK_LAUNCH("decode_combine_kernel");
                    });
                    KVQ_CUDA_CHECK(cudaDeviceSynchronize());
                    rows.push_back({"fp16 K+V (own split-K kernel)", batch, T, ft, fbytes});
                    for (int c = 0; c < fcopies; ++c) {
                        KVQ_CUDA_CHECK(cudaFree(K[c]));
                        KVQ_CUDA_CHECK(cudaFree(V[c]));
                    }
                    KVQ_CUDA_CHECK(cudaFree(ml));
                    KVQ_CUDA_CHECK(cudaFree(pacc));
                }
                KVQ_CUDA_CHECK(cudaFree(d_len));
                KVQ_CUDA_CHECK(cudaFree(d_q));
                KVQ_CUDA_CHECK(cudaFree(d_out));
            }
        KVQ_CUDA_CHECK(cudaFree(kproto));
        KVQ_CUDA_CHECK(cudaFree(vproto));
    }
    KVQ_CUDA_CHECK(cudaFree(d_sketch));
    KVQ_CUDA_CHECK(cudaFree(d_ksc));
    KVQ_CUDA_CHECK(cudaFree(d_vsc));
    KVQ_CUDA_CHECK(cudaFree(d_vsh));

    std::printf(
        "\nFused decode attention, H_q = H_kv = %d, d = %d, B = %d, fp32 q/out; median of %d runs; copy %.0f GB/s\n", H,
        d, B, runs, copy_gbs);
    print_rows(rows, copy_gbs);
    KVQ_CUDA_CHECK(cudaStreamDestroy(g_stream));
    return 0;
}
