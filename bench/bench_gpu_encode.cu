// GPU benchmark: encode of keys/values straight into paged blocks (cuda/kvq/cuda/encode.cuh).
//   kvq-bench-gpu-encode [--runs N] [--batch B] [--tokens T]   (default: batch 1 and 8, all T)
// H_kv = 32, d = 128, block 64 tokens, batch 1 and 8, T in {4096, 16384, 65536} tokens per sequence
// appended at once (prefill), pages shuffled. Paths: QJL m = 256 keys (fp16 and fp32 input; fp16
// also through the previous kernel, QjlEncodeArgs::legacy_kernel), QJL m = 256 with 8 outliers
// (m_o = 256), token-wise int2 g32 (QJL's values) and int4 g32, WKV int4 g128 with the static
// smoothing. Bytes = input read + whole blocks written + page table. fp16
// baseline in the same binary: appending the same tokens to an fp16 cache is a copy of the fp16
// input (cudaMemcpyAsync, read + write counted). Median of N warmed-up runs (CUDA events); "graph
// us" replays all runs from one CUDA graph; inputs and pools rotate over copies (> 200 MB).
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

#include "gpu_bench_common.cuh"
#include "kvq/cuda/check.cuh"
#include "kvq/cuda/encode.cuh"
#if defined(__NVCC__)
#pragma nv_diag_suppress 20012
#pragma nv_diag_suppress 20013
#pragma nv_diag_suppress 20014
#pragma nv_diag_suppress 20015
#endif
#include "kvq/quant/qjl_key_codec.hpp"
#include "kvq/quant/tokenwise_codec.hpp"

namespace {

__global__ void half_to_float_kernel(const __half* in, float* out, std::size_t n) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x)
        out[i] = __half2float(in[i]);
}

struct Row {
    std::string name;
    int batch, T;
    kvq_bench::Timing t;
    double bytes;
};

}  // namespace

int main(int argc, char** argv) {
    int runs = 20, only_batch = 0, only_tokens = 0;
    for (int i = 1; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--runs") && i + 1 < argc)
            runs = std::max(1, std::atoi(argv[++i]));
        else if (!std::strcmp(argv[i], "--batch") && i + 1 < argc)
            only_batch = std::atoi(argv[++i]);
        else if (!std::strcmp(argv[i], "--tokens") && i + 1 < argc)
            only_tokens = std::atoi(argv[++i]);
        else {
            std::fprintf(stderr, "usage: %s [--runs N] [--batch B] [--tokens T]\n", argv[0]);
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
    cudaStream_t stream;
    KVQ_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    const double copy_gbs = kvq_bench::copy_bandwidth_gbs(stream, 20);
    std::printf("device-to-device cudaMemcpy (1 GiB, read+write counted): %.0f GB/s\n", copy_gbs);

    const int H = 32, d = 128, B = 64;
    std::mt19937 rng(3);
    kvq::QjlParams qp;
    qp.head_dim = d;
    qp.m = 256;
    qp.outliers = 0;
    const kvq::QjlKeyCodec qjl(qp);
    qp.outliers = 8;
    qp.m_outlier = 256;
    const kvq::QjlKeyCodec qjlo(qp);
    const kvq::TokenwiseCodec int2(kvq::TokenwiseParams{d, 2, 32}), int4(kvq::TokenwiseParams{d, 4, 32}),
        wkv4(kvq::TokenwiseParams{d, 4, d});
    float *d_sketch, *d_shift, *d_scale;
    KVQ_CUDA_CHECK(cudaMalloc(&d_sketch, qjlo.sketch().size() * 4));
    KVQ_CUDA_CHECK(cudaMemcpy(d_sketch, qjlo.sketch().data(), qjlo.sketch().size() * 4, cudaMemcpyHostToDevice));
    std::vector<float> shift(std::size_t(H) * d), scale(shift.size());
    for (std::size_t i = 0; i < shift.size(); ++i) {
        shift[i] = 0.01f * float(i % 13) - 0.06f;
        scale[i] = 0.5f + 0.02f * float(i % 41);
    }
    KVQ_CUDA_CHECK(cudaMalloc(&d_shift, shift.size() * 4));
    KVQ_CUDA_CHECK(cudaMalloc(&d_scale, shift.size() * 4));
    KVQ_CUDA_CHECK(cudaMemcpy(d_shift, shift.data(), shift.size() * 4, cudaMemcpyHostToDevice));
    KVQ_CUDA_CHECK(cudaMemcpy(d_scale, scale.data(), scale.size() * 4, cudaMemcpyHostToDevice));

    struct Path {
        std::string name;
        int kind;  // 0 QJL, 1 token-wise, 2 WKV
        const kvq::Codec* codec;
        bool f32;
        bool reciprocal = false;  // token-wise: TokenwiseEncodeArgs::reciprocal_codes
        bool legacy = false;      // QJL: QjlEncodeArgs::legacy_kernel (the previous kernel, for comparison)
        bool vec = false;         // token-wise: TokenwiseEncodeArgs::vector_kernel
    };
    const std::vector<Path> paths = {
        {"QJL m=256 (fp16 in)", 0, &qjl, false},
        {"QJL m=256 (fp16 in), legacy kernel", 0, &qjl, false, false, true},
        {"QJL m=256 (fp32 in)", 0, &qjl, true},
        {"QJL m=256, 8 outliers m_o=256 (fp16 in)", 0, &qjlo, false},
        {"int2 g32 values (fp16 in), division kernel", 1, &int2, false},
        {"int2 g32 values (fp16 in), reciprocal codes", 1, &int2, false, true},
        {"int4 g32 (fp16 in), division kernel", 1, &int4, false},
        {"int4 g32 (fp16 in), reciprocal codes", 1, &int4, false, true},
        {"WKV int4 g128 + smoothing (fp16 in), division kernel", 2, &wkv4, false},
        {"WKV int4 g128 + smoothing (fp16 in), reciprocal codes", 2, &wkv4, false, true},
        {"int2 g32 values (fp16 in), vector kernel", 1, &int2, false, false, false, true},
        {"int4 g32 (fp16 in), vector kernel", 1, &int4, false, false, false, true},
        {"int4 g32 (fp32 in), vector kernel", 1, &int4, true, false, false, true},
        {"WKV int4 g128 + smoothing (fp16 in), vector kernel", 2, &wkv4, false, false, false, true}};
    std::vector<Row> rows;
    for (int batch : {1, 8})
        for (int T : {4096, 16384, 65536}) {
            if (only_batch > 0 && batch != only_batch) continue;
            if (only_tokens > 0 && T != only_tokens) continue;
            const std::size_t elems = std::size_t(batch) * T * H * d;
            const int pages = T / B;
            const std::size_t n_blocks = std::size_t(batch) * H * pages;
            std::vector<int> pos0(batch, 0);
            int* d_pos0;
            KVQ_CUDA_CHECK(cudaMalloc(&d_pos0, batch * sizeof(int)));
            KVQ_CUDA_CHECK(cudaMemcpy(d_pos0, pos0.data(), batch * sizeof(int), cudaMemcpyHostToDevice));
            for (const Path& p : paths) {
                const std::size_t in_bytes = elems * (p.f32 ? 4 : 2);
                const std::size_t bb = p.codec->layout(B).bytes();
                const double bytes = double(in_bytes) + double(n_blocks) * bb + double(n_blocks) * 4;
                const int copies = kvq_bench::copies_for(std::size_t(bytes), in_bytes + n_blocks * bb + n_blocks * 4);
                struct Copy {
                    void* x;
                    std::uint8_t* pool;
                    std::uint32_t* pages;
                };
                std::vector<Copy> cs(copies);
                std::vector<std::uint32_t> ids(n_blocks);
                __half* tmp = nullptr;
                if (p.f32) KVQ_CUDA_CHECK(cudaMalloc(&tmp, elems * 2));
                for (int c = 0; c < copies; ++c) {
                    KVQ_CUDA_CHECK(cudaMalloc(&cs[c].x, in_bytes));
                    KVQ_CUDA_CHECK(cudaMalloc(&cs[c].pool, n_blocks * bb));
                    KVQ_CUDA_CHECK(cudaMalloc(&cs[c].pages, n_blocks * 4));
                    if (p.f32) {
                        kvq_bench::fill_half(stream, tmp, elems, 17u + c);
                        half_to_float_kernel<<<2048, 256, 0, stream>>>(tmp, static_cast<float*>(cs[c].x), elems);
                        KVQ_CUDA_CHECK_LAUNCH("half_to_float_kernel");
                    } else {
                        kvq_bench::fill_half(stream, static_cast<__half*>(cs[c].x), elems, 17u + c);
                    }
                    std::iota(ids.begin(), ids.end(), 0u);
                    std::shuffle(ids.begin(), ids.end(), rng);
                    KVQ_CUDA_CHECK(cudaMemcpy(cs[c].pages, ids.data(), n_blocks * 4, cudaMemcpyHostToDevice));
                }
                KVQ_CUDA_CHECK(cudaStreamSynchronize(stream));
                if (tmp) KVQ_CUDA_CHECK(cudaFree(tmp));
                kvq_bench::Timing t;
                if (p.kind == 0) {
                    kvq::cuda::QjlEncodeArgs a;
                    kvq::cuda::set_qjl_codec(a, static_cast<const kvq::QjlKeyCodec&>(*p.codec), B);
                    a.n_kv_heads = H;
                    a.batch = batch;
                    a.n_tokens = T;
                    a.x_type = p.f32 ? kvq::cuda::QueryType::F32 : kvq::cuda::QueryType::F16;
                    a.pos0 = d_pos0;
                    a.page_stride = pages;
                    a.sketch = d_sketch;
                    a.legacy_kernel = p.legacy;
                    t = kvq_bench::time_runs(stream, runs, copies, [&](int c) {
                        a.x = cs[c].x;
                        a.pool = cs[c].pool;
                        a.pages = cs[c].pages;
                        kvq::cuda::launch_qjl_encode(a, stream);
                    });
                } else {
                    kvq::cuda::TokenwiseEncodeArgs a;
                    kvq::cuda::set_tokenwise_codec(a, static_cast<const kvq::TokenwiseCodec&>(*p.codec), B);
                    a.n_kv_heads = H;
                    a.batch = batch;
                    a.n_tokens = T;
                    a.x_type = p.f32 ? kvq::cuda::QueryType::F32 : kvq::cuda::QueryType::F16;
                    a.pos0 = d_pos0;
                    a.page_stride = pages;
                    a.reciprocal_codes = p.reciprocal;
                    a.vector_kernel = p.vec;
                    if (p.kind == 2) {
                        a.shift = d_shift;
                        a.scale = d_scale;
                    }
                    t = kvq_bench::time_runs(stream, runs, copies, [&](int c) {
                        a.x = cs[c].x;
                        a.pool = cs[c].pool;
                        a.pages = cs[c].pages;
                        kvq::cuda::launch_tokenwise_encode(a, stream);
                    });
                    if (p.vec) {  // the bytes must be the division kernel's (the tests' check, on bench data)
                        const std::size_t pool_bytes = n_blocks * bb;
                        std::uint8_t* ref_pool;
                        KVQ_CUDA_CHECK(cudaMalloc(&ref_pool, pool_bytes));
                        kvq::cuda::TokenwiseEncodeArgs r = a;
                        r.vector_kernel = false;
                        r.x = cs[0].x;
                        r.pool = ref_pool;
                        r.pages = cs[0].pages;
                        kvq::cuda::launch_tokenwise_encode(r, stream);
                        std::vector<std::uint8_t> h_ref(pool_bytes), h_got(pool_bytes);
                        KVQ_CUDA_CHECK(
                            cudaMemcpyAsync(h_ref.data(), ref_pool, pool_bytes, cudaMemcpyDeviceToHost, stream));
                        KVQ_CUDA_CHECK(
                            cudaMemcpyAsync(h_got.data(), cs[0].pool, pool_bytes, cudaMemcpyDeviceToHost, stream));
                        KVQ_CUDA_CHECK(cudaStreamSynchronize(stream));
                        KVQ_CUDA_CHECK(cudaFree(ref_pool));
                        std::size_t diff = 0;
                        for (std::size_t i = 0; i < pool_bytes; ++i) diff += h_ref[i] != h_got[i];
                        std::printf(
                            "device check: %s, batch %d T %d: %s the division kernel's bytes (%zu of %zu differ)\n",
                            p.name.c_str(), batch, T, diff ? "DIFFERS FROM" : "equal to", diff, pool_bytes);
                    }
                }
                KVQ_CUDA_CHECK(cudaStreamSynchronize(stream));
                rows.push_back({p.name, batch, T, t, bytes});
                for (auto& c : cs) {
                    KVQ_CUDA_CHECK(cudaFree(c.x));
                    KVQ_CUDA_CHECK(cudaFree(c.pool));
                    KVQ_CUDA_CHECK(cudaFree(c.pages));
                }
            }
            {  // fp16 baseline: the same tokens appended to an fp16 cache = a copy of the fp16 input.
                const std::size_t in_bytes = elems * 2;
                const int copies = kvq_bench::copies_for(2 * in_bytes, 2 * in_bytes);
                std::vector<void*> src(copies), dst(copies);
                for (int c = 0; c < copies; ++c) {
                    KVQ_CUDA_CHECK(cudaMalloc(&src[c], in_bytes));
                    KVQ_CUDA_CHECK(cudaMalloc(&dst[c], in_bytes));
                    kvq_bench::fill_half(stream, static_cast<__half*>(src[c]), elems, 5u + c);
                }
                const kvq_bench::Timing t = kvq_bench::time_runs(stream, runs, copies, [&](int c) {
                    KVQ_CUDA_CHECK(cudaMemcpyAsync(dst[c], src[c], in_bytes, cudaMemcpyDeviceToDevice, stream));
                });
                KVQ_CUDA_CHECK(cudaStreamSynchronize(stream));
                rows.push_back({"fp16 cache append (copy of the fp16 input)", batch, T, t, 2.0 * in_bytes});
                for (int c = 0; c < copies; ++c) {
                    KVQ_CUDA_CHECK(cudaFree(src[c]));
                    KVQ_CUDA_CHECK(cudaFree(dst[c]));
                }
            }
            KVQ_CUDA_CHECK(cudaFree(d_pos0));
            std::printf("done: batch %d T %d\n", batch, T);
            std::fflush(stdout);
        }
    KVQ_CUDA_CHECK(cudaFree(d_sketch));
    KVQ_CUDA_CHECK(cudaFree(d_shift));
    KVQ_CUDA_CHECK(cudaFree(d_scale));

    std::printf("\nEncode into paged blocks, H_kv = %d, d = %d, B = %d; median of %d runs; copy %.0f GB/s\n", H, d, B,
                runs, copy_gbs);
    std::printf(
        "| path | batch | T | us | graph us | MB | GB/s | %% copy | floor us "
        "|\n|---|---|---|---|---|---|---|---|---|\n");
    for (const Row& r : rows) {
        const double gbs = r.bytes / (r.t.graph_us * 1e-6) / 1e9;
        std::printf("| %s | %d | %d | %.1f | %.1f | %.1f | %.0f | %.0f%% | %.1f |\n", r.name.c_str(), r.batch, r.T,
                    r.t.median_us, r.t.graph_us, r.bytes / 1e6, gbs, 100.0 * gbs / copy_gbs,
                    r.bytes / (copy_gbs * 1e9) * 1e6);
    }
    KVQ_CUDA_CHECK(cudaStreamDestroy(stream));
    return 0;
}
