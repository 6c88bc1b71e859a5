#pragma once
// QJL key scoring on the GPU over paged blocks: scores[h][t] = est(q_h, k_t) for every query head
// h and token t of a (batch 1) sequence, reading exactly the bytes kvq::QjlKeyCodec::encode writes
// (see the block layout table in kvq/quant/qjl_key_codec.hpp). Two launches on the caller's stream:
//
//  1. qjl_project_kernel (one CTA per query head): S q into the workspace, the query as fp32, and
//     (with outliers) S^T so that the per-group columns S[:, O] are contiguous.
//  2. qjl_score_plain_kernel (no outliers: one CTA per (KV head, token chunk)) or
//     qjl_score_outlier_kernel (persistent CTAs over (KV head, 32-token group) items); all query
//     heads of a KV head are scored by the same warp/CTA so codes are read from memory once; one
//     token per lane, 32-token groups per warp:
//     the signed sum over the sketch bits uses shared-memory nibble tables (16 entries per 4 sketch
//     rows, so that the 32 lanes of a warp, looking up the same nibble position of 32 tokens, never
//     conflict on a bank) and 16-byte code loads.
//     Without outliers the tables depend on the query only and are built once per CTA. With outliers
//     (per 32-token group, channel set O) each warp builds the group's tables exactly as the CPU
//     codec's score(): inlier projection = S q - S[:, O] q_O (first m rows), outlier projection =
//     S[:m_o, O] q_O; est = sqrt(pi/2)/m ||k_I|| sum_I + sqrt(pi/2)/m_o ||k_O|| sum_O.
//
// Tensor-core path (the default without outliers: exact_query == false, outliers == 0, block_tokens
// >= 16, sm_80+): step 1 is followed by detail::qjl_quantize_query_kernel (qjl_query.cuh), which
// turns S q into the int8 bit-sliced query record of each head (8 bit planes, s, usum), and step 2 is
// qjl_score_tc_kernel: one BMMA (AND + popcount, m16n8k256) per 16 tokens x 256 code bits x query
// head; A = the stored sign codes (row = token), B = the 8 planes of the head (column n = plane n):
//   T = sum_n w_n C[row][n] (w_n = 2^n, n < 7; w_7 = -128),  score = ((cs * ||k||) * float(2T - usum))
// with cs = float(sqrt(pi/2)/m) * s: the same float operations as QjlKeyCodec::score's bit-sliced
// path, and |score - exact| <= sqrt(pi/2)/m * ||k|| * m s / 2 (+ rounding). exact_query == true, any
// outliers, or blocks of fewer than 16 tokens (a BMMA step is 16 tokens of one block) take the exact
// float kernels above instead (a fallback, not a rejection; qjl_score_uses_tensor_path says which).
// On sm_90 the default (QjlScoreArgs::tc_pipelined) replaces qjl_score_tc_kernel with
// qjl_score_pipe_kernel: bulk copies of 64-token tiles through a per-warp shared-memory ring, started
// early as a programmatic dependent of the quantisation so that its first copies overlap it; the same
// preparation launches and bit-identical scores, 37.6 vs 40.9 us at 64k tokens x 32 heads on an H100.
// (Until round 6 the pipelined kernel came with a fused one-launch query preparation, which alone made
// it the slower one: bench/GPU_NOTES.md, rounds 3-6.)
//
// With tc_pipelined = false on sm_90, qjl_score_tc_kernel is a programmatic dependent of the
// quantisation (QjlScoreArgs::tc_pdl): its warps pull their first code lines into L1, then wait for the
// query records; 40.9 vs 42.1 us at 64k tokens x 32 heads on an H100 (round 6). In both, the
// quantisation is a programmatic dependent of the projection (it waits before reading S q).
// A denser projection kernel (one warp per 8 sketch rows) measured slower (46.1 us) and was removed.

// No stream is created, nothing synchronises with the host, every launch is checked: a graph can
// capture launch_qjl_score.
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

#include "kvq/core/half.hpp"
#include "kvq/cuda/check.cuh"
#include "kvq/cuda/mma.cuh"
#include "kvq/cuda/qjl_query.cuh"
#include "kvq/cuda/timeline.cuh"
#include "kvq/quant/codec.hpp"

namespace kvq::cuda {

enum class QueryType : std::uint8_t { F32 = 0, F16 = 1 };

struct QjlScoreArgs {
    // Codec parameters (set_qjl_codec fills these from a kvq::QjlKeyCodec).
    int head_dim = 0;
    int m = 0;                      // inlier sketch bits
    int m_outlier = 0;              // outlier sketch bits (0 when outliers == 0)
    int outliers = 0;               // outlier channels per 32-token group
    int sketch_rows = 0;            // rows of S: max(m, m_outlier)
    const float* sketch = nullptr;  // device, [sketch_rows][head_dim] row-major (QjlKeyCodec::sketch())
    BlockLayout layout{};           // QjlKeyCodec::layout(block_tokens)

    // Paged blocks: block id p lives at pool + p * block_bytes (block_bytes >= layout.bytes(),
    // a multiple of 16; pool 16-byte aligned).
    const std::uint8_t* pool = nullptr;
    std::size_t block_bytes = 0;
    // Page tables: pages[kv * page_stride + i] is the block of tokens [i*B, (i+1)*B) of KV head kv.
    const std::uint32_t* pages = nullptr;
    std::int64_t page_stride = 0;

    int n_kv_heads = 0;
    int n_q_heads = 0;  // a multiple of n_kv_heads; query head h reads KV head h / (n_q_heads / n_kv_heads)
    int n_tokens = 0;   // tokens per KV head (same for all heads)

    const void* query = nullptr;  // device [n_q_heads][query_stride] (fp32 or fp16 elements)
    QueryType query_type = QueryType::F32;
    std::int64_t query_stride = 0;  // 0 -> head_dim

    float* scores = nullptr;        // device [n_q_heads][score_stride]
    std::int64_t score_stride = 0;  // 0 -> n_tokens

    // false (default): without outliers (and block_tokens >= 16), score with the int8 bit-sliced
    // query on tensor cores (see the top of this file; error bound there). true: the exact float
    // projection (nibble-table kernel), as QjlKeyCodec::prepare() + score().
    bool exact_query = false;
    // Tensor path only. true (default; sm_90, ignored below): qjl_project_kernel,
    // qjl_quantize_query_kernel, then qjl_score_pipe_kernel (bulk copies through per-warp shared-memory
    // rings) as a programmatic dependent of the quantisation; 37.6 vs 40.9 us at 64k tokens x 32 heads
    // on an H100 (bench/RESULTS.md, round 6). false: qjl_score_tc_kernel (direct loads) instead. Both
    // give bit-identical workspace contents and scores.
    bool tc_pipelined = true;
    // Pipelined tensor kernel only: at most this many CTAs (0: one 64-token tile per warp, up to the
    // resident limit). A small cap gives each warp a long run of tiles (ring wrap-around, page-id
    // batches, KV-head changes); the tests use it, and it is a tuning knob for benchmarks.
    int tc_max_ctas = 0;
    // Tensor path with tc_pipelined == false, sm_90+: the quantisation is a programmatic dependent
    // launch of the projection, and qjl_score_tc_kernel one of the quantisation, so its CTAs become
    // resident and pull their first code lines into L1 while the query is prepared; each waits
    // (griddepcontrol.wait) only before reading its predecessor's output. Bit-identical scores either
    // way; false: plain launches (the A/B baseline). The pipelined kernel is always launched this way.
    bool tc_pdl = true;
};

// Whether launch_qjl_score takes the tensor-core path for these arguments (on an sm_80+ device).
// Blocks of fewer than 16 tokens fall back to the exact kernel (no rejection).
inline bool qjl_score_uses_tensor_path(const QjlScoreArgs& a) {
    return !a.exact_query && a.outliers == 0 && a.layout.block_tokens >= 16;
}

// Copies the codec parameters and the layout of blocks of block_tokens tokens into args (the
// device sketch pointer stays the caller's job: upload codec.sketch()).
template <class QjlCodec>
void set_qjl_codec(QjlScoreArgs& a, const QjlCodec& codec, int block_tokens) {
    a.head_dim = codec.head_dim();
    a.m = codec.params().m;
    a.m_outlier = codec.outlier_bits();
    a.outliers = codec.params().outliers;
    a.sketch_rows = codec.sketch_rows();
    a.layout = codec.layout(block_tokens);
    if (a.block_bytes == 0) a.block_bytes = a.layout.bytes();
}

struct CheckResult {
    bool ok = true;
    std::string message;
    explicit operator bool() const { return ok; }
};

namespace detail {

inline constexpr int kQjlWarpsMax = 8;
inline constexpr double kQjlHalfPi = 1.57079632679489661923;
inline constexpr std::size_t kQjlSmemBudget = 96 * 1024;

KVQ_HD std::size_t ws_align(std::size_t n) { return (n + 255) & ~std::size_t(255); }

// Workspace sections (byte offsets, each 256-byte aligned):
//   proj  fp32 S q [n_q_heads][sketch_rows]
//   qf    fp32 q [n_q_heads][head_dim]
//   st    fp32 S^T [head_dim][sketch_rows]             (outliers > 0 only)
//   rec   QjlQueryLayout records [n_q_heads][record_words] (tensor path only; head h at
//         rec + h * QjlQueryLayout::of(m).record_bytes(): uint32 planes[8][words], float s, int32 usum)
//   projq fp32 u * s [n_q_heads][m]                     (tensor path only)
// Without outliers: rec = ws_align(n_q_heads * m * 4) + ws_align(n_q_heads * head_dim * 4).
struct QjlWorkspace {
    std::size_t proj = 0, qf = 0, st = 0, rec = 0, projq = 0, total = 0;
};
inline QjlWorkspace qjl_workspace_layout(const QjlScoreArgs& a) {
    QjlWorkspace w;
    w.proj = 0;
    w.qf = ws_align(std::size_t(a.n_q_heads) * a.sketch_rows * sizeof(float));
    w.st = w.qf + ws_align(std::size_t(a.n_q_heads) * a.head_dim * sizeof(float));
    w.rec = w.st + (a.outliers > 0 ? ws_align(std::size_t(a.head_dim) * a.sketch_rows * sizeof(float)) : 0);
    w.projq = w.rec;
    w.total = w.rec;
    if (qjl_score_uses_tensor_path(a) && a.m > 0) {
        w.projq = w.rec + ws_align(std::size_t(a.n_q_heads) * QjlQueryLayout::of(a.m).record_bytes());
        w.total = w.projq + ws_align(std::size_t(a.n_q_heads) * a.m * sizeof(float));
    }
    return w;
}

// 16 signed sums of 4 projections: entry e = sum_i (bit i of e ? +p_i : -p_i), written as four
// float4 quarters. Neighbouring threads write tables 64 bytes apart; rot (= thread index / 2) staggers
// the order of the quarters so that the 8 threads of a 128-bit store phase hit distinct banks.
__device__ __forceinline__ void qjl_build_table(float p0, float p1, float p2, float p3, float* dst, int rot) {
    const float a0 = -p0 - p1, a1 = p0 - p1, a2 = -p0 + p1, a3 = p0 + p1;
    const float b0 = -p2 - p3, b1 = p2 - p3, b2 = -p2 + p3, b3 = p2 + p3;
    float4* d4 = reinterpret_cast<float4*>(dst);
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        const int c = (s + rot) & 3;
        const float b = c == 0 ? b0 : (c == 1 ? b1 : (c == 2 ? b2 : b3));
        d4[c] = make_float4(a0 + b, a1 + b, a2 + b, a3 + b);
    }
}

__device__ __forceinline__ float qjl_load_query(const void* q, QueryType t, std::int64_t i) {
    if (t == QueryType::F32) return static_cast<const float*>(q)[i];
    return ::kvq::half_to_float(::kvq::half_t{static_cast<const std::uint16_t*>(q)[i]});
}

// Step 1: grid = (n_q_heads, ceil(rows / warps)); one warp per sketch row. proj[h][j] = <S_j, q_h>;
// qf[h] = q_h as fp32 (blockIdx.y == 0); st = S^T [d][rows] (grid-stride over all CTAs).
// static: internal linkage, so that several translation units may include this header.
static __global__ void qjl_project_kernel(QjlScoreArgs a, float* proj, float* qf, float* st) {
    qjl_pdl_launch_dependents();   // the quantisation may start; it waits for this grid before reading proj
    extern __shared__ float sq[];  // [d]
    const int h = blockIdx.x, d = a.head_dim, rows = a.sketch_rows;
    const std::int64_t qs = a.query_stride ? a.query_stride : d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        const float v = qjl_load_query(a.query, a.query_type, h * qs + c);
        sq[c] = v;
        if (blockIdx.y == 0) qf[std::size_t(h) * d + c] = v;
    }
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    const int j = blockIdx.y * nw + warp;
    if (j < rows) {
        const float* sr = a.sketch + std::size_t(j) * d;
        float s = 0.f;
        for (int c = lane; c < d; c += 32) s = fmaf(sr[c], sq[c], s);
#pragma unroll
        for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0) proj[std::size_t(h) * rows + j] = s;
    }
    if (st != nullptr) {
        const std::size_t n = std::size_t(d) * rows;
        const std::size_t cta = std::size_t(blockIdx.y) * gridDim.x + blockIdx.x;
        for (std::size_t i = cta * blockDim.x + threadIdx.x; i < n;
             i += std::size_t(gridDim.x) * gridDim.y * blockDim.x) {
            const std::size_t c = i / rows, jj = i % rows;
            st[i] = a.sketch[jj * d + c];
        }
    }
}

// Signed sum of the 8 nibble lookups of one code word (a tree, so the dependent chain is short).
__device__ __forceinline__ float qjl_word_sum(const float* L, std::uint32_t w) {
    const float v0 = L[0 * 16 + (w & 15)], v1 = L[1 * 16 + ((w >> 4) & 15)];
    const float v2 = L[2 * 16 + ((w >> 8) & 15)], v3 = L[3 * 16 + ((w >> 12) & 15)];
    const float v4 = L[4 * 16 + ((w >> 16) & 15)], v5 = L[5 * 16 + ((w >> 20) & 15)];
    const float v6 = L[6 * 16 + ((w >> 24) & 15)], v7 = L[7 * 16 + (w >> 28)];
    return ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7));
}

// Prefetches [p, p + bytes) into L1 (the code of this lane's token), so that its memory latency
// overlaps the table build.
__device__ __forceinline__ void qjl_prefetch_l1(const std::uint8_t* p, std::uint32_t bytes) {
    for (std::uint32_t o = 0; o < bytes; o += 64) tc::prefetch_l1(p + o);
    tc::prefetch_l1(p + bytes - 1);
}

// Calls f(word, word_index) for the n_words 32-bit words at p (16-byte loads when aligned).
template <class F>
__device__ __forceinline__ void qjl_for_words(const std::uint8_t* p, int w_begin, int w_end, bool aligned16, F&& f) {
    int w = w_begin;
    if (aligned16 && (w_begin & 3) == 0) {
        for (; w + 4 <= w_end; w += 4) {
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + w / 4);
            f(v.x, w);
            f(v.y, w + 1);
            f(v.z, w + 2);
            f(v.w, w + 3);
        }
    }
    for (; w < w_end; ++w) f(__ldg(reinterpret_cast<const std::uint32_t*>(p) + w), w);
}

// Step 2 without outliers. grid = (n_kv_heads, chunks); GT query heads per pass over the codes.
template <int GT>
__global__ void qjl_score_plain_kernel(QjlScoreArgs a, const float* proj, int chunk) {
    extern __shared__ float4 smem4[];
    float* lut = reinterpret_cast<float*>(smem4);  // [GT][m/4][16]
    const int kv = blockIdx.x, G = a.n_q_heads / a.n_kv_heads, ntab = a.m / 4, rows = a.sketch_rows;
    const int T = a.n_tokens, B = static_cast<int>(a.layout.block_tokens);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    const int t_begin = blockIdx.y * chunk, t_end = min(T, t_begin + chunk);
    const std::int64_t ss = a.score_stride ? a.score_stride : T;
    const std::uint32_t cb = a.layout.code_bytes;
    const bool al16 = (cb % 16) == 0;
    const std::size_t norm_off = a.layout.token_side_offset();
    const float c_in = static_cast<float>(1.2533141373155003 / a.m);  // sqrt(pi/2) / m
    const int nwords = a.m / 32;
    for (int h0 = 0; h0 < G; h0 += GT) {
        __syncthreads();
        for (int e = threadIdx.x; e < GT * ntab; e += blockDim.x) {
            const int hh = e / ntab, k = e % ntab;
            const float4 p = *reinterpret_cast<const float4*>(proj + std::size_t(kv * G + h0 + hh) * rows + 4 * k);
            qjl_build_table(p.x, p.y, p.z, p.w, lut + (std::size_t(hh) * ntab + k) * 16, threadIdx.x >> 1);
        }
        __syncthreads();
        for (int g = t_begin + warp * 32; g < t_end; g += nw * 32) {
            const int tok = g + lane;
            if (tok >= t_end) continue;
            const std::uint32_t page = __ldg(a.pages + kv * a.page_stride + tok / B);
            const int t = tok % B;
            const std::uint8_t* blk = a.pool + std::size_t(page) * a.block_bytes;
            float acc[GT];
#pragma unroll
            for (int i = 0; i < GT; ++i) acc[i] = 0.f;
            qjl_for_words(blk + std::size_t(t) * cb, 0, nwords, al16, [&](std::uint32_t w, int wi) {
                const float* L = lut + wi * 128;
#pragma unroll
                for (int i = 0; i < GT; ++i) acc[i] += qjl_word_sum(L + std::size_t(i) * ntab * 16, w);
            });
            const std::uint16_t nb = __ldg(reinterpret_cast<const unsigned short*>(blk + norm_off) + t);
            const float scale = c_in * ::kvq::half_to_float(::kvq::half_t{nb});
#pragma unroll
            for (int i = 0; i < GT; ++i) a.scores[std::size_t(kv * G + h0 + i) * ss + tok] = scale * acc[i];
        }
    }
}

// Step 2 with outliers: persistent CTAs; each warp takes 32-token groups (one group = one outlier
// channel set) of any KV head, and per query head builds that group's tables in its own
// shared-memory slice [(m + m_o)/4][16]. The correction t = S[:, O] q_O needs k_o columns of S per
// group and head: S^T is staged in shared memory once per CTA when it fits (st_in_smem), otherwise
// read from the workspace (L2).
static __global__ void qjl_score_outlier_kernel(QjlScoreArgs a, const float* proj, const float* qf, const float* st,
                                                int st_in_smem) {
    extern __shared__ float4 smem4[];
    const int ntab_in = a.m / 4, ntab = (a.m + a.m_outlier) / 4;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    const int G = a.n_q_heads / a.n_kv_heads, rows = a.sketch_rows, d = a.head_dim;
    float* smem = reinterpret_cast<float*>(smem4);
    const float* stp = st;
    if (st_in_smem) {
        const int n4 = d * rows / 4;
        for (int i = threadIdx.x; i < n4; i += blockDim.x) smem4[i] = reinterpret_cast<const float4*>(st)[i];
        stp = smem;
        smem += std::size_t(d) * rows;
        __syncthreads();
    }
    float* lut = smem + std::size_t(warp) * ntab * 16;
    const int T = a.n_tokens, B = static_cast<int>(a.layout.block_tokens), K = a.outliers;
    const std::int64_t ss = a.score_stride ? a.score_stride : T;
    const std::uint32_t cb = a.layout.code_bytes;
    const bool al16 = (cb % 16) == 0;
    const std::size_t norm_off = a.layout.token_side_offset(), ids_off = a.layout.block_side_offset();
    const float c_in = static_cast<float>(1.2533141373155003 / a.m);
    const float c_out = static_cast<float>(1.2533141373155003 / a.m_outlier);
    const int w_in = a.m / 32, w_all = (a.m + a.m_outlier) / 32;
    const int gph = (T + 31) / 32;
    const long long total = static_cast<long long>(gph) * a.n_kv_heads;
    for (long long item = static_cast<long long>(blockIdx.x) * nw + warp; item < total;
         item += static_cast<long long>(gridDim.x) * nw) {
        const int kv = static_cast<int>(item / gph), g = static_cast<int>(item % gph) * 32;
        // B is a multiple of 32 here: the whole group lies in one block.
        const std::uint32_t page = __ldg(a.pages + kv * a.page_stride + g / B);
        const std::uint8_t* blk = a.pool + std::size_t(page) * a.block_bytes;
        const std::uint8_t* ids = blk + ids_off + std::size_t((g % B) / 32) * K;
        int id[16];
#pragma unroll
        for (int o = 0; o < 16; ++o) id[o] = o < K ? int(__ldg(ids + o)) : 0;
        const int tok = g + lane;
        const bool valid = tok < T;
        const int t = tok % B;
        float n_in = 0.f, n_out = 0.f;
        if (valid) {
            qjl_prefetch_l1(blk + std::size_t(t) * cb, cb);
            const unsigned short* nrm = reinterpret_cast<const unsigned short*>(blk + norm_off);
            n_in = ::kvq::half_to_float(::kvq::half_t{__ldg(nrm + t)});
            n_out = ::kvq::half_to_float(::kvq::half_t{__ldg(nrm + B + t)});
        }
        for (int hh = 0; hh < G; ++hh) {
            const int h = kv * G + hh;
            float qo[16];
#pragma unroll
            for (int o = 0; o < 16; ++o) qo[o] = o < K ? qf[std::size_t(h) * d + id[o]] : 0.f;
            __syncwarp();
            for (int jq = lane; jq < rows / 4; jq += 32) {
                const int j = 4 * jq;
                float4 tj = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
                for (int o = 0; o < 16; ++o) {
                    if (o < K) {
                        const float4 s = *reinterpret_cast<const float4*>(stp + std::size_t(id[o]) * rows + j);
                        tj.x = fmaf(s.x, qo[o], tj.x);
                        tj.y = fmaf(s.y, qo[o], tj.y);
                        tj.z = fmaf(s.z, qo[o], tj.z);
                        tj.w = fmaf(s.w, qo[o], tj.w);
                    }
                }
                if (j < a.m) {
                    const float4 p = *reinterpret_cast<const float4*>(proj + std::size_t(h) * rows + j);
                    qjl_build_table(p.x - tj.x, p.y - tj.y, p.z - tj.z, p.w - tj.w, lut + std::size_t(jq) * 16,
                                    lane >> 1);
                }
                if (j < a.m_outlier)
                    qjl_build_table(tj.x, tj.y, tj.z, tj.w, lut + std::size_t(ntab_in + jq) * 16, lane >> 1);
            }
            __syncwarp();
            if (valid) {
                const std::uint8_t* code = blk + std::size_t(t) * cb;
                float acc_in = 0.f, acc_out = 0.f;
                qjl_for_words(code, 0, w_in, al16,
                              [&](std::uint32_t w, int wi) { acc_in += qjl_word_sum(lut + wi * 128, w); });
                qjl_for_words(code, w_in, w_all, al16,
                              [&](std::uint32_t w, int wi) { acc_out += qjl_word_sum(lut + wi * 128, w); });
                a.scores[std::size_t(h) * ss + tok] = c_in * n_in * acc_in + c_out * n_out * acc_out;
            }
        }
    }
    (void)ntab;
}

// T = sum_j b_j u_j of one BMMA row for the int8 bit-sliced query (qjl_query.cuh): the m16n8k256
// AND+POPC over the KS 256-bit steps gives, per lane, the popcounts of bit planes 2t and 2t + 1 for
// rows g and g + 8; weighted by 2^plane (-128 for plane 7) and summed over the quad, lanes with t even
// hold row g's sum and lanes with t odd row g + 8's.
template <int KS>
__device__ __forceinline__ int qjl_tc_bit_sum(const std::uint32_t (&av)[KS][4], const std::uint32_t (*b)[2], int wt0,
                                              int wt1, int t) {
    int c[4] = {0, 0, 0, 0};
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) tc::bmma_m16n8k256_popc(c, av[ks], b[ks]);
    const int x0 = c[0] * wt0 + c[1] * wt1, x1 = c[2] * wt0 + c[3] * wt1;
    int mine = (t & 1) ? x1 : x0;
    mine += __shfl_xor_sync(0xffffffffu, (t & 1) ? x0 : x1, 1);
    mine += __shfl_xor_sync(0xffffffffu, mine, 2);
    return mine;
}

// Step 2, tensor-core path (no outliers, blocks >= 16 tokens). grid = (token chunks, n_kv_heads),
// kQjlTcWarps warps per CTA. Each warp takes U 16-token steps of its CTA's chunk at a time (warps
// interleaved, so the CTA reads its chunk front to back): first all loads of the U steps (one
// warp-uniform page-table load per step, the step lies in one block since 16 divides B; two 8-byte
// code loads per lane and 256-bit K step, each 8 lanes reading 256 contiguous bytes, plus the norm
// of the row the lane writes), then U x G x KS BMMAs. Lane roles (lane = 4 g + t): A rows g, g + 8
// are tokens p + g, p + g + 8; K bits [32t, 32t+32) of step ks are code word 8 ks + 2t, bits
// [128 + 32t, ...) word 8 ks + 2t + 1, for A and B alike (an allowed permutation of K). Words at or
// beyond m/32 are not loaded (zero; the planes are zero there too), so no byte past a token's code
// is read. After the quad reduction lane t = 0 holds row g, lane t = 1 row g + 8.
// GT > 0: G == GT query heads, their B fragments in registers; GT == 0: any G, fragments read from
// the records (L1) per use. Every head of the KV head is scored from one load of the codes.
inline constexpr int kQjlTcWarps = 4;
template <int KS>
__host__ __device__ constexpr int qjl_tc_unroll() {
    return KS == 1 ? 4 : (KS == 2 ? 2 : 1);
}

// PDL (QjlScoreArgs::tc_pdl): launched as a programmatic dependent of the quantisation; each warp
// pulls the page ids and codes of its first U steps into L1, then waits for the records (read
// through L2 after the wait). PDL = false is the default kernel.
template <int KS, int GT, bool PDL = false>
__global__ void __launch_bounds__(kQjlTcWarps * 32, KS == 1 && GT <= 4 ? 8 : 4)
    qjl_score_tc_kernel(QjlScoreArgs a, const std::uint32_t* rec, float c_in, int chunk) {
    constexpr int U = qjl_tc_unroll<KS>();
    constexpr int GR = GT > 0 ? GT : 1;
    const int kv = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int G = GT > 0 ? GT : a.n_q_heads / a.n_kv_heads;
    const int T = a.n_tokens, B = static_cast<int>(a.layout.block_tokens), bsh = __ffs(B) - 1;
    const int nwords = a.m / 32;
    const bool v8 = (a.m % 64) == 0;  // code rows 8-byte aligned, words come in pairs
    const std::size_t cb = a.layout.code_bytes, norm_off = a.layout.token_side_offset();
    const QjlQueryLayout QL = QjlQueryLayout::of(a.m);
    const std::size_t rw = QL.record_words();
    const std::uint32_t* rec0 = rec + std::size_t(kv) * G * rw;
    const std::int64_t ss = a.score_stride ? a.score_stride : T;
    float* out0 = a.scores + std::size_t(kv) * G * ss;
    const std::uint32_t* pg = a.pages + std::int64_t(kv) * a.page_stride;
    const int c_begin = blockIdx.x * chunk, c_end = min(T, c_begin + chunk);
    const int wt0 = 1 << (2 * t), wt1 = 2 * t + 1 < 7 ? (1 << (2 * t + 1)) : -128;
    const int row = g + 8 * (t & 1);  // the row whose score this lane writes (t < 2)
    if (threadIdx.x == 0) {
        KVQ_TIMELINE_STAMP(0, KVQ_TIMELINE_SMID());
        KVQ_TIMELINE_STAMP(1, KVQ_TIMELINE_NOW());
    }

    if constexpr (PDL) {
        const int p0 = c_begin + warp * 16 * U;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int p = p0 + 16 * u;
            if (p < c_end) {  // warp-uniform
                const std::uint8_t* blk = a.pool + std::size_t(__ldg(pg + (p >> bsh))) * a.block_bytes;
                const int tb = p & (B - 1);
                const std::uint8_t* r0 = blk + std::size_t(tb + g) * cb;
#pragma unroll
                for (int ks = 0; ks < KS; ++ks) {
                    if (8 * ks + 2 * t < nwords) {
                        tc::prefetch_l1(r0 + 4 * (8 * ks + 2 * t));
                        tc::prefetch_l1(r0 + 8 * cb + 4 * (8 * ks + 2 * t));
                    }
                }
                tc::prefetch_l1(blk + norm_off + 2 * (tb + row));
            }
        }
        qjl_pdl_wait();
    }
    if (threadIdx.x == 0) KVQ_TIMELINE_STAMP(12, KVQ_TIMELINE_NOW());  // the query records may be read
    auto ldrec = [](const std::uint32_t* p) { return PDL ? __ldcg(p) : __ldg(p); };
    auto ldrec2 = [](const std::uint32_t* p) {
        return PDL ? __ldcg(reinterpret_cast<const uint2*>(p)) : __ldg(reinterpret_cast<const uint2*>(p));
    };
    std::uint32_t bq[GR][KS][2];
    float cs[GR];
    int usum[GR];
#pragma unroll
    for (int hh = 0; hh < GR; ++hh) {
        if constexpr (GT > 0) {
            const std::uint32_t* r = rec0 + hh * rw;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                const uint2 b = ldrec2(r + std::size_t(g) * QL.words + 8 * ks + 2 * t);
                bq[hh][ks][0] = b.x;
                bq[hh][ks][1] = b.y;
            }
            cs[hh] = c_in * __uint_as_float(ldrec(r + 8 * QL.words));
            usum[hh] = static_cast<int>(ldrec(r + 8 * QL.words + 1));
        }
    }

    for (int p0 = c_begin + warp * 16 * U; p0 < c_end; p0 += kQjlTcWarps * 16 * U) {
        std::uint32_t av[U][KS][4];
        float nrm[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int p = p0 + 16 * u;
            nrm[u] = 0.f;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) av[u][ks][0] = av[u][ks][1] = av[u][ks][2] = av[u][ks][3] = 0u;
            if (p < c_end) {  // warp-uniform
                const std::uint32_t page = __ldg(pg + (p >> bsh));
                const std::uint8_t* blk = a.pool + std::size_t(page) * a.block_bytes;
                const int tb = p & (B - 1);
                const std::uint8_t* r0 = blk + std::size_t(tb + g) * cb;
                const std::uint8_t* r1 = r0 + 8 * cb;
#pragma unroll
                for (int ks = 0; ks < KS; ++ks) {
                    const int w0 = 8 * ks + 2 * t;
                    if (v8) {
                        if (w0 < nwords) {
                            const uint2 lo = __ldg(reinterpret_cast<const uint2*>(r0 + 4 * w0));
                            const uint2 hi = __ldg(reinterpret_cast<const uint2*>(r1 + 4 * w0));
                            av[u][ks][0] = lo.x;
                            av[u][ks][1] = hi.x;
                            av[u][ks][2] = lo.y;
                            av[u][ks][3] = hi.y;
                        }
                    } else {
                        const std::uint32_t* q0 = reinterpret_cast<const std::uint32_t*>(r0);
                        const std::uint32_t* q1 = reinterpret_cast<const std::uint32_t*>(r1);
                        if (w0 < nwords) {
                            av[u][ks][0] = __ldg(q0 + w0);
                            av[u][ks][1] = __ldg(q1 + w0);
                        }
                        if (w0 + 1 < nwords) {
                            av[u][ks][2] = __ldg(q0 + w0 + 1);
                            av[u][ks][3] = __ldg(q1 + w0 + 1);
                        }
                    }
                }
                nrm[u] = ::kvq::half_to_float(
                    ::kvq::half_t{__ldg(reinterpret_cast<const unsigned short*>(blk + norm_off) + tb + row)});
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int p = p0 + 16 * u;
            if (p >= c_end) break;  // warp-uniform
            const int tok = p + row;
            const bool store = t < 2 && tok < c_end;
            auto score_head = [&](int hh, const std::uint32_t(*b)[2], float csh, int ush) {
                const int mine = qjl_tc_bit_sum<KS>(av[u], b, wt0, wt1, t);
                if (store) out0[std::size_t(hh) * ss + tok] = (csh * nrm[u]) * static_cast<float>(2 * mine - ush);
            };
            if constexpr (GT > 0) {
#pragma unroll
                for (int hh = 0; hh < GR; ++hh) score_head(hh, bq[hh], cs[hh], usum[hh]);
            } else {
                for (int hh = 0; hh < G; ++hh) {
                    const std::uint32_t* r = rec0 + hh * rw;
                    std::uint32_t b[KS][2];
#pragma unroll
                    for (int ks = 0; ks < KS; ++ks) {
                        const uint2 v = ldrec2(r + std::size_t(g) * QL.words + 8 * ks + 2 * t);
                        b[ks][0] = v.x;
                        b[ks][1] = v.y;
                    }
                    score_head(hh, b, c_in * __uint_as_float(ldrec(r + 8 * QL.words)),
                               static_cast<int>(ldrec(r + 8 * QL.words + 1)));
                }
            }
        }
        if (p0 == c_begin + warp * 16 * U && lane == 0) KVQ_TIMELINE_STAMP(2 + warp, KVQ_TIMELINE_NOW());
    }
#if defined(KVQ_TIMELINE)
    if (lane == 0) KVQ_TIMELINE_STAMP(6 + warp, KVQ_TIMELINE_NOW());
    __syncthreads();
    if (threadIdx.x == 0) {
        KVQ_TIMELINE_STAMP(10, KVQ_TIMELINE_NOW());
        KVQ_TIMELINE_STAMP(11, c_end > c_begin ? c_end - c_begin : 0);
    }
#endif
}

// Step 2, tensor-core path, pipelined (QjlScoreArgs::tc_pipelined on sm_90; otherwise the
// kernel above). The work is a list of 64-token tiles (KV head major); each warp takes a contiguous
// run of them and streams them through its own ring of `stages` shared-memory buffers filled by bulk
// copies (cp.async.bulk, completion on one mbarrier per stage), refilled as soon as the warp has
// scored a tile. The round-2 kernel spent ~8 instructions per token and exposed one page-table load
// and its dependent code loads per 16 tokens; here one lane issues a tile's copies (a 64-token tile
// of a block of >= 64 tokens is one contiguous range of codes and one of norms), the page ids of the
// next 32 / nsub tiles come from one load per lane a batch ahead, and stages - 1 tiles stay in flight
// while a tile is scored. A tile spans nsub = 64 / min(B, 64) blocks: sub-block i (lane i issues it)
// is copied only when it holds a token below n_tokens, so no page past the sequence is read, and a
// 16-token step never straddles a copied and an uncopied sub-block. The copies and page reads are
// issued before griddepcontrol.wait, so they overlap the query preparation.
// Stage layout: codes [64][code_bytes], then norms [64] fp16. The fragments, their K permutation and
// the score arithmetic are qjl_score_tc_kernel's (bit-identical scores).
inline constexpr int kQjlPipeWarps = 8;
inline constexpr int kQjlPipeTile = 64;
inline constexpr int kQjlPipeMaxStages = 4;
inline constexpr int kQjlPipeBarBytes = kQjlPipeWarps * kQjlPipeMaxStages * 8;

// 3 CTAs per SM (80 registers) where the B fragments are few; 2 (128) for the large G x K-step shapes
// and the any-G kernel from 3 K steps, which spill at 80.
template <int KS, int GT>
__global__ void __launch_bounds__(kQjlPipeWarps * 32, (GT > 0 ? GT * KS : 2 * KS) <= 4 ? 3 : 2)
    qjl_score_pipe_kernel(QjlScoreArgs a, const std::uint32_t* rec, float c_in, int stages) {
#if defined(KVQ_TC_HAS_BULK_COPY)
    extern __shared__ __align__(16) std::uint8_t qjl_pipe_smem[];
    constexpr int GR = GT > 0 ? GT : 1;
    constexpr unsigned kFull = 0xffffffffu;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int G = GT > 0 ? GT : a.n_q_heads / a.n_kv_heads;
    const int T = a.n_tokens, B = static_cast<int>(a.layout.block_tokens), bsh = __ffs(B) - 1;
    const int cb = static_cast<int>(a.layout.code_bytes), nwords = a.m / 32;
    const bool v8 = (a.m % 64) == 0;  // code rows 8-byte aligned, words come in pairs
    // Powers of two: sub = 2^ssh tokens per sub-block, nsub = 2^nsh sub-blocks per tile, per tiles per batch.
    const int sub = B < kQjlPipeTile ? B : kQjlPipeTile, nsub = kQjlPipeTile / sub, per = 32 / nsub;
    const int ssh = __ffs(sub) - 1, nsh = __ffs(nsub) - 1, psh = __ffs(per) - 1;
    const unsigned sub_code = static_cast<unsigned>(sub * cb), sub_norm = static_cast<unsigned>(sub * 2);
    const int norms_at = kQjlPipeTile * cb, stage_bytes = norms_at + 2 * kQjlPipeTile, cb16 = 16 * cb;
    const std::size_t norm_off = a.layout.token_side_offset();
    std::uint64_t* bars = reinterpret_cast<std::uint64_t*>(qjl_pipe_smem) + warp * kQjlPipeMaxStages;
    std::uint8_t* ring = qjl_pipe_smem + kQjlPipeBarBytes + warp * stages * stage_bytes;

    const long long tph = (T + kQjlPipeTile - 1) / kQjlPipeTile;  // tiles per KV head
    const long long items = tph * a.n_kv_heads;
    const long long nwt = static_cast<long long>(gridDim.x) * kQjlPipeWarps;
    const long long wg = static_cast<long long>(blockIdx.x) * kQjlPipeWarps + warp;
    const long long i0 = wg * items / nwt;
    const int n = static_cast<int>((wg + 1) * items / nwt - i0);
    if (threadIdx.x == 0) {  // --timeline stamps (KVQ_TIMELINE builds only): warps 0-3 of the 8
        KVQ_TIMELINE_STAMP(0, KVQ_TIMELINE_SMID());
        KVQ_TIMELINE_STAMP(1, KVQ_TIMELINE_NOW());
        KVQ_TIMELINE_STAMP(11, static_cast<unsigned long long>(n > 0 ? n : 0) * kQjlPipeTile * kQjlPipeWarps);
    }
    if (n <= 0) return;  // warp-uniform; no CTA-wide barrier below

    if (lane == 0) {
        for (int s = 0; s < stages; ++s) tc::mbar_init(bars + s, 1);
        tc::fence_mbar_init();
    }
    __syncwarp();

    // Page ids of batch b (tiles [b * per, (b + 1) * per) of this warp): lane L holds sub-block
    // L % nsub of tile b * per + L / nsub (0 where there is none).
    auto load_batch = [&](int b) -> std::uint32_t {
        const int k = (b << psh) + (lane >> nsh);
        if (k >= n) return 0u;
        const long long item = i0 + k;
        const int kv = static_cast<int>(item / tph);
        const int tok = static_cast<int>(item % tph) * kQjlPipeTile + ((lane & (nsub - 1)) << ssh);
        if (tok >= T) return 0u;
        return __ldg(a.pages + static_cast<std::int64_t>(kv) * a.page_stride + (tok >> bsh));
    };
    std::uint32_t pb_cur = load_batch(0), pb_next = load_batch(1);
    // Issue cursor (tiles are issued in order 0, 1, ..., n - 1).
    int is_tile = static_cast<int>(i0 % tph), is_stage = 0;
    auto issue = [&](int k) {
        const int kb = k & (per - 1);
        if (kb == 0 && k > 0) {
            pb_cur = pb_next;
            pb_next = load_batch((k >> psh) + 1);
        }
        const std::uint32_t pid = __shfl_sync(kFull, pb_cur, (kb << nsh) + (lane & (nsub - 1)));
        const int t0 = is_tile * kQjlPipeTile;
        const int nvs = min(nsub, (T - t0 + sub - 1) >> ssh);
        std::uint8_t* st = ring + is_stage * stage_bytes;
        std::uint64_t* bar = bars + is_stage;
        if (lane == 0) {
            tc::fence_proxy_async_smem();  // the warp's reads of this stage (synced) come first
            tc::mbar_arrive_expect_tx(bar, static_cast<unsigned>(nvs) * (sub_code + sub_norm));
        }
        if (lane < nvs) {
            const std::uint8_t* blk = a.pool + std::size_t(pid) * a.block_bytes;
            const int tb = (t0 + (lane << ssh)) & (B - 1);
            tc::bulk_g2s(st + lane * sub_code, blk + std::size_t(tb) * cb, sub_code, bar);
            tc::bulk_g2s(st + norms_at + lane * sub_norm, blk + norm_off + std::size_t(tb) * 2, sub_norm, bar);
        }
        if (++is_stage == stages) is_stage = 0;
        if (++is_tile == tph) is_tile = 0;
    };
    const int pre = n < stages ? n : stages;
    for (int k = 0; k < pre; ++k) issue(k);

    // The records are written by the preparation kernel while this grid may already run: read them
    // after the wait, and through L2 (__ldcg), since the non-coherent path (__ldg) assumes data that
    // is read-only for the whole kernel.
    qjl_pdl_wait();
    if (threadIdx.x == 0) KVQ_TIMELINE_STAMP(12, KVQ_TIMELINE_NOW());  // the query records may be read

    const QjlQueryLayout QL = QjlQueryLayout::of(a.m);
    const std::size_t rw = QL.record_words();
    const std::int64_t ss = a.score_stride ? a.score_stride : T;
    const int wt0 = 1 << (2 * t), wt1 = 2 * t + 1 < 7 ? (1 << (2 * t + 1)) : -128;
    const int row = g + 8 * (t & 1);  // the row whose score this lane writes (t < 2)
    std::uint32_t bq[GR][KS][2];
    float cs[GR];
    int usum[GR];
    int frag_kv = -1;
    int kv = static_cast<int>(i0 / tph), tile = static_cast<int>(i0 % tph), stage = 0;
    unsigned parity = 0;
    for (int k = 0; k < n; ++k) {
        const std::uint32_t* rec0 = rec + std::size_t(kv) * G * rw;
        if constexpr (GT > 0) {
            if (kv != frag_kv) {  // warp-uniform
                frag_kv = kv;
#pragma unroll
                for (int hh = 0; hh < GR; ++hh) {
                    const std::uint32_t* r = rec0 + hh * rw;
#pragma unroll
                    for (int ks = 0; ks < KS; ++ks) {
                        const uint2 b =
                            __ldcg(reinterpret_cast<const uint2*>(r + std::size_t(g) * QL.words + 8 * ks + 2 * t));
                        bq[hh][ks][0] = b.x;
                        bq[hh][ks][1] = b.y;
                    }
                    cs[hh] = c_in * __uint_as_float(__ldcg(r + 8 * QL.words));
                    usum[hh] = static_cast<int>(__ldcg(r + 8 * QL.words + 1));
                }
            }
        }
        const std::uint8_t* st = ring + stage * stage_bytes;
        tc::mbar_wait(bars + stage, parity);
        if (k == 0 && lane == 0 && warp < 4) KVQ_TIMELINE_STAMP(2 + warp, KVQ_TIMELINE_NOW());
        const int t0 = tile * kQjlPipeTile;
        float* out = a.scores + std::size_t(kv) * G * ss + (t0 + row);  // + hh * ss + 16 u
        const std::uint8_t* fr = st + g * cb;                           // + (16 u) cb: row g of step u
        const unsigned short* nr = reinterpret_cast<const unsigned short*>(st + norms_at) + row;
#pragma unroll
        for (int u = 0; u < kQjlPipeTile / 16; ++u) {
            const int p = t0 + 16 * u;
            if (p >= T) break;  // warp-uniform
            std::uint32_t av[KS][4];
            const std::uint8_t* r0 = fr + u * cb16;
            const std::uint8_t* r1 = r0 + 8 * cb;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                const int w0 = 8 * ks + 2 * t;
                av[ks][0] = av[ks][1] = av[ks][2] = av[ks][3] = 0u;
                if (v8) {
                    if (w0 < nwords) {
                        const uint2 lo = *reinterpret_cast<const uint2*>(r0 + 4 * w0);
                        const uint2 hi = *reinterpret_cast<const uint2*>(r1 + 4 * w0);
                        av[ks][0] = lo.x;
                        av[ks][1] = hi.x;
                        av[ks][2] = lo.y;
                        av[ks][3] = hi.y;
                    }
                } else {
                    const std::uint32_t* q0 = reinterpret_cast<const std::uint32_t*>(r0);
                    const std::uint32_t* q1 = reinterpret_cast<const std::uint32_t*>(r1);
                    if (w0 < nwords) {
                        av[ks][0] = q0[w0];
                        av[ks][1] = q1[w0];
                    }
                    if (w0 + 1 < nwords) {
                        av[ks][2] = q0[w0 + 1];
                        av[ks][3] = q1[w0 + 1];
                    }
                }
            }
            // Hardware conversion: exact, as kvq::half_to_float (whose subnormal branches cost here).
            const float nrm = __half2float(__ushort_as_half(nr[16 * u]));
            const bool store = t < 2 && p + row < T;
            auto score_head = [&](int hh, const std::uint32_t(*b)[2], float csh, int ush) {
                const int mine = qjl_tc_bit_sum<KS>(av, b, wt0, wt1, t);
                if (store) out[std::size_t(hh) * ss + 16 * u] = (csh * nrm) * static_cast<float>(2 * mine - ush);
            };
            if constexpr (GT > 0) {
#pragma unroll
                for (int hh = 0; hh < GR; ++hh) score_head(hh, bq[hh], cs[hh], usum[hh]);
            } else {
                for (int hh = 0; hh < G; ++hh) {
                    const std::uint32_t* r = rec0 + hh * rw;
                    std::uint32_t b[KS][2];
#pragma unroll
                    for (int ks = 0; ks < KS; ++ks) {
                        const uint2 v =
                            __ldcg(reinterpret_cast<const uint2*>(r + std::size_t(g) * QL.words + 8 * ks + 2 * t));
                        b[ks][0] = v.x;
                        b[ks][1] = v.y;
                    }
                    score_head(hh, b, c_in * __uint_as_float(__ldcg(r + 8 * QL.words)),
                               static_cast<int>(__ldcg(r + 8 * QL.words + 1)));
                }
            }
        }
        __syncwarp();  // every lane has read this stage before it is refilled
        if (k + stages < n) issue(k + stages);
        if (++stage == stages) stage = 0, parity ^= 1u;
        if (++tile == tph) tile = 0, ++kv;
    }
    if (lane == 0 && warp < 4) KVQ_TIMELINE_STAMP(6 + warp, KVQ_TIMELINE_NOW());
    if (threadIdx.x == 0) KVQ_TIMELINE_STAMP(10, KVQ_TIMELINE_NOW());  // warp 0's end (no CTA barrier)
#else
    (void)a, (void)rec, (void)c_in, (void)stages;
    __trap();  // the host selects this kernel on sm_90+ only
#endif
}

// kernel<<<grid, threads, smem, stream>>>(args...) as a programmatic dependent of the previous launch
// on the stream (sm_90; the kernel must griddepcontrol.wait before reading that launch's outputs).
template <class... P, class... A>
inline void qjl_launch_dependent(void (*kernel)(P...), dim3 grid, int threads, std::size_t smem, cudaStream_t stream,
                                 A... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    KVQ_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
}

inline int qjl_pick_gt(int G, int m) {
    for (int gt : {8, 4, 2}) {
        if (G % gt == 0 && std::size_t(gt) * 16 * m <= kQjlSmemBudget) return gt;
    }
    return 1;
}

// Launches qjl_score_tc_kernel<KS, GT>: KS = ceil(m / 256) K steps; GT = G when G is 1, 2, 4 or 8
// and its fragments fit in 16 registers x 2 (G * KS <= 16), else 0 (any G, fragments from L1).
// Chunks of whole warp tiles, about 8 CTAs per SM in all (T = 4k x 32 heads: 512 CTAs; 64k: 1024).
// pdl: as a programmatic dependent of the previous launch (the quantisation), PDL = true.
template <int KS>
inline void qjl_launch_tc_ks(const QjlScoreArgs& a, const std::uint32_t* rec, bool pdl, int sms, cudaStream_t stream) {
    const int G = a.n_q_heads / a.n_kv_heads;
    const int tile = 16 * qjl_tc_unroll<KS>();
    const long long tiles = static_cast<long long>((a.n_tokens + tile - 1) / tile) * a.n_kv_heads;
    const long long target = 8LL * (sms > 0 ? sms : 1);
    long long per_cta = (tiles + target - 1) / target;
    per_cta = (per_cta + kQjlTcWarps - 1) / kQjlTcWarps * kQjlTcWarps;
    if (per_cta < kQjlTcWarps) per_cta = kQjlTcWarps;
    const long long chunk_ll = per_cta * tile;
    const int chunk = chunk_ll > (1LL << 30) ? (1 << 30) : static_cast<int>(chunk_ll);
    const dim3 grid(static_cast<unsigned>((a.n_tokens + chunk - 1) / chunk), static_cast<unsigned>(a.n_kv_heads));
    const float c_in = static_cast<float>(std::sqrt(kQjlHalfPi) / a.m);  // as QjlKeyCodec::score
    auto go = [&](auto kernel, auto pdl_kernel, const char* name) {
        if (!pdl) {
            kernel<<<grid, kQjlTcWarps * 32, 0, stream>>>(a, rec, c_in, chunk);
            KVQ_CUDA_CHECK_LAUNCH(name);
            return;
        }
        qjl_launch_dependent(pdl_kernel, grid, kQjlTcWarps * 32, 0, stream, a, rec, c_in, chunk);
        KVQ_CUDA_CHECK_LAUNCH(name);
    };
    if (G == 1)
        go(qjl_score_tc_kernel<KS, 1>, qjl_score_tc_kernel<KS, 1, true>, "qjl_score_tc_kernel<G=1>");
    else if (G == 2)
        go(qjl_score_tc_kernel<KS, 2>, qjl_score_tc_kernel<KS, 2, true>, "qjl_score_tc_kernel<G=2>");
    else if (G == 4)
        go(qjl_score_tc_kernel<KS, 4>, qjl_score_tc_kernel<KS, 4, true>, "qjl_score_tc_kernel<G=4>");
    else if (G == 8 && KS <= 2)
        go(qjl_score_tc_kernel<KS, (KS <= 2 ? 8 : 0)>, qjl_score_tc_kernel<KS, (KS <= 2 ? 8 : 0), true>,
           "qjl_score_tc_kernel<G=8>");
    else
        go(qjl_score_tc_kernel<KS, 0>, qjl_score_tc_kernel<KS, 0, true>, "qjl_score_tc_kernel<any G>");
}

// Stages per warp: as many as fit 72 KB per CTA (3 CTAs per SM at m = 256), 2 to 4.
inline int qjl_pipe_stages(const QjlScoreArgs& a) {
    const int stage_bytes = kQjlPipeTile * static_cast<int>(a.layout.code_bytes) + 2 * kQjlPipeTile;
    const int s = (72 * 1024) / (kQjlPipeWarps * stage_bytes);
    return s < 2 ? 2 : (s > kQjlPipeMaxStages ? kQjlPipeMaxStages : s);
}
inline std::size_t qjl_pipe_smem_bytes(const QjlScoreArgs& a, int stages) {
    const std::size_t stage_bytes = std::size_t(kQjlPipeTile) * a.layout.code_bytes + 2 * kQjlPipeTile;
    return kQjlPipeBarBytes + std::size_t(kQjlPipeWarps) * stages * stage_bytes;
}

// Launches qjl_score_pipe_kernel<KS, GT> (GT chosen as for qjl_score_tc_kernel) as a programmatic
// dependent of the previous launch on the stream (the query preparation). Grid: enough CTAs for
// one tile per warp, at most what is resident at once (each warp then owns a contiguous run of
// tiles; the split is exact to one tile).
template <int KS>
inline void qjl_launch_pipe_ks(const QjlScoreArgs& a, const std::uint32_t* rec, int sms, cudaStream_t stream) {
    const int G = a.n_q_heads / a.n_kv_heads;
    const int stages = qjl_pipe_stages(a);
    const std::size_t smem = qjl_pipe_smem_bytes(a, stages);
    const long long items = static_cast<long long>((a.n_tokens + kQjlPipeTile - 1) / kQjlPipeTile) * a.n_kv_heads;
    const float c_in = static_cast<float>(std::sqrt(kQjlHalfPi) / a.m);  // as QjlKeyCodec::score
    auto go = [&](auto kernel, const char* name) {
        KVQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
        int per_sm = 0;
        KVQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kQjlPipeWarps * 32, smem));
        if (per_sm < 1) per_sm = 1;
        long long ctas = (items + kQjlPipeWarps - 1) / kQjlPipeWarps;
        const long long resident = static_cast<long long>(sms > 0 ? sms : 1) * per_sm;
        if (ctas > resident) ctas = resident;
        if (a.tc_max_ctas > 0 && ctas > a.tc_max_ctas) ctas = a.tc_max_ctas;
        qjl_launch_dependent(kernel, dim3(static_cast<unsigned>(ctas)), kQjlPipeWarps * 32, smem, stream, a, rec, c_in,
                             stages);
        KVQ_CUDA_CHECK_LAUNCH(name);
    };
    if (G == 1)
        go(qjl_score_pipe_kernel<KS, 1>, "qjl_score_pipe_kernel<G=1>");
    else if (G == 2)
        go(qjl_score_pipe_kernel<KS, 2>, "qjl_score_pipe_kernel<G=2>");
    else if (G == 4)
        go(qjl_score_pipe_kernel<KS, 4>, "qjl_score_pipe_kernel<G=4>");
    else if (G == 8 && KS <= 2)
        go(qjl_score_pipe_kernel<KS, (KS <= 2 ? 8 : 0)>, "qjl_score_pipe_kernel<G=8>");
    else
        go(qjl_score_pipe_kernel<KS, 0>, "qjl_score_pipe_kernel<any G>");
}

inline void qjl_launch_pipe(const QjlScoreArgs& a, const std::uint32_t* rec, int sms, cudaStream_t stream) {
    switch ((a.m + 255) / 256) {
        case 1: qjl_launch_pipe_ks<1>(a, rec, sms, stream); break;
        case 2: qjl_launch_pipe_ks<2>(a, rec, sms, stream); break;
        case 3: qjl_launch_pipe_ks<3>(a, rec, sms, stream); break;
        default: qjl_launch_pipe_ks<4>(a, rec, sms, stream); break;
    }
}

inline void qjl_launch_tc(const QjlScoreArgs& a, const std::uint32_t* rec, bool pdl, int sms, cudaStream_t stream) {
    switch ((a.m + 255) / 256) {
        case 1: qjl_launch_tc_ks<1>(a, rec, pdl, sms, stream); break;
        case 2: qjl_launch_tc_ks<2>(a, rec, pdl, sms, stream); break;
        case 3: qjl_launch_tc_ks<3>(a, rec, pdl, sms, stream); break;
        default: qjl_launch_tc_ks<4>(a, rec, pdl, sms, stream); break;
    }
}

}  // namespace detail

inline CheckResult can_implement(const QjlScoreArgs& a) {
    auto fail = [](std::string msg) { return CheckResult{false, "kvq::cuda::launch_qjl_score: " + std::move(msg)}; };
    if (a.head_dim < 8 || a.head_dim > 256 || a.head_dim % 8 != 0)
        return fail("head_dim must be a multiple of 8 in [8, 256], got " + std::to_string(a.head_dim));
    if (a.m < 32 || a.m > 1024 || a.m % 32 != 0)
        return fail("m must be a multiple of 32 in [32, 1024], got " + std::to_string(a.m));
    if (a.outliers < 0 || a.outliers > 16 || a.outliers >= a.head_dim)
        return fail("outliers must be in [0, 16] and below head_dim, got " + std::to_string(a.outliers));
    if (a.outliers > 0 && (a.m_outlier < 32 || a.m_outlier > 1024 || a.m_outlier % 32 != 0))
        return fail("m_outlier must be a multiple of 32 in [32, 1024], got " + std::to_string(a.m_outlier));
    if (a.outliers == 0 && a.m_outlier != 0) return fail("m_outlier must be 0 without outliers");
    const int rows = a.outliers > 0 ? (a.m > a.m_outlier ? a.m : a.m_outlier) : a.m;
    if (a.sketch_rows != rows) return fail("sketch_rows must be max(m, m_outlier) = " + std::to_string(rows));
    const BlockLayout& l = a.layout;
    const std::uint32_t B = l.block_tokens;
    if (B == 0 || (B & (B - 1)) != 0) return fail("layout.block_tokens must be a power of two");
    if (a.outliers > 0 && B % 32 != 0) return fail("with outliers, block_tokens must be a multiple of 32");
    if (l.code_bytes != std::uint32_t(a.m + a.m_outlier) / 8 || l.token_side_bytes != (a.outliers > 0 ? 4u : 2u) ||
        l.block_side_bytes != (a.outliers > 0 ? B / 32 * std::uint32_t(a.outliers) : 0u))
        return fail("layout does not match the QJL parameters (use set_qjl_codec)");
    if (a.block_bytes < l.bytes() || a.block_bytes % 16 != 0)
        return fail("block_bytes must be a multiple of 16 and at least layout.bytes() = " + std::to_string(l.bytes()));
    if (a.n_kv_heads <= 0 || a.n_q_heads <= 0 || a.n_q_heads % a.n_kv_heads != 0)
        return fail("n_q_heads must be a positive multiple of n_kv_heads");
    if (a.n_kv_heads > 65535) return fail("n_kv_heads must be <= 65535 (a grid dimension)");
    // The tensor-core path (qjl_score_uses_tensor_path) accepts every shape accepted here: m any
    // multiple of 32 up to 1024 (words past m are neither loaded nor set in the query planes), any
    // group size; blocks of fewer than 16 tokens are not rejected but fall back to the exact kernel.
    if (a.n_tokens < 0) return fail("n_tokens must be >= 0");
    if (a.n_tokens > (1 << 30)) return fail("n_tokens must be <= 2^30");
    const std::int64_t n_pages = (std::int64_t(a.n_tokens) + B - 1) / B;
    if (a.page_stride < n_pages && a.n_kv_heads > 1) return fail("page_stride is smaller than the page count");
    if (a.score_stride != 0 && a.score_stride < a.n_tokens) return fail("score_stride must be >= n_tokens");
    if (a.query_stride != 0 && a.query_stride < a.head_dim) return fail("query_stride must be >= head_dim");
    if (!a.sketch || !a.query) return fail("sketch and query must be device pointers");
    if (a.n_tokens > 0 && (!a.pool || !a.pages || !a.scores)) return fail("pool, pages and scores must be set");
    if (reinterpret_cast<std::uintptr_t>(a.pool) % 16 != 0) return fail("pool must be 16-byte aligned");
    return {};
}

inline std::size_t qjl_score_workspace_bytes(const QjlScoreArgs& a) { return detail::qjl_workspace_layout(a).total; }

// Scores all query heads against n_tokens keys. Asynchronous on `stream`; throws kvq::Error on
// invalid arguments, a too small workspace, or a launch error.
inline void launch_qjl_score(const QjlScoreArgs& a, cudaStream_t stream, void* workspace, std::size_t workspace_bytes) {
    const CheckResult ok = can_implement(a);
    KVQ_CHECK(ok.ok, ok.message);
    const detail::QjlWorkspace w = detail::qjl_workspace_layout(a);
    KVQ_CHECK(workspace_bytes >= w.total && workspace != nullptr, "kvq::cuda::launch_qjl_score: workspace of ",
              workspace_bytes, " bytes is below qjl_score_workspace_bytes() = ", w.total);
    KVQ_CHECK(reinterpret_cast<std::uintptr_t>(workspace) % 256 == 0, "workspace must be 256-byte aligned");
    auto* base = static_cast<std::uint8_t*>(workspace);
    float* proj = reinterpret_cast<float*>(base + w.proj);
    float* qf = reinterpret_cast<float*>(base + w.qf);
    float* st = a.outliers > 0 ? reinterpret_cast<float*>(base + w.st) : nullptr;

    int dev = 0, sms = 0, cc_major = 0;
    KVQ_CUDA_CHECK(cudaGetDevice(&dev));
    KVQ_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    KVQ_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, dev));
    const bool tensor = qjl_score_uses_tensor_path(a) && cc_major >= 8;  // BMMA needs sm_80+

    const bool pipelined = tensor && a.tc_pipelined && cc_major >= 9;
    {
        const dim3 pgrid(a.n_q_heads, (a.sketch_rows + 7) / 8);
        detail::qjl_project_kernel<<<pgrid, 256, a.head_dim * sizeof(float), stream>>>(a, proj, qf, st);
        KVQ_CUDA_CHECK_LAUNCH("qjl_project_kernel");
    }
    if (tensor) {
        auto* rec = reinterpret_cast<std::uint32_t*>(base + w.rec);
        auto* projq = reinterpret_cast<float*>(base + w.projq);
        // proj rows are sketch_rows = m floats apart without outliers, as the kernel expects.
        // The pipelined kernel may start during the projection (its CTAs fit only as the projection's
        // leave; it issues copies, then waits): 7.8 vs 8.8 us at 4k tokens x 32 heads, equal at 64k.
        const bool early = pipelined;
        if ((a.tc_pdl || pipelined) && cc_major >= 9)
            detail::qjl_launch_dependent(detail::qjl_quantize_query_kernel, dim3(a.n_q_heads), 32 * ((a.m + 31) / 32),
                                         0, stream, static_cast<const float*>(proj), a.m, rec, projq, early);
        else
            detail::qjl_quantize_query_kernel<<<a.n_q_heads, 32 * ((a.m + 31) / 32), 0, stream>>>(proj, a.m, rec, projq,
                                                                                                  early);
        KVQ_CUDA_CHECK_LAUNCH("qjl_quantize_query_kernel");
        if (a.n_tokens == 0) return;
        if (pipelined) {  // always a programmatic dependent of the quantisation
            detail::qjl_launch_pipe(a, rec, sms, stream);
            return;
        }
        detail::qjl_launch_tc(a, rec, a.tc_pdl && cc_major >= 9, sms, stream);
        return;
    }
    if (a.n_tokens == 0) return;

    const int groups = (a.n_tokens + 31) / 32;
    auto chunk_for = [&](int nw) {
        // About 1024 CTAs in all; each warp at least one 32-token group.
        const long long total = static_cast<long long>(groups) * a.n_kv_heads;
        long long per_cta = (total + 1023) / 1024;
        per_cta = ((per_cta + nw - 1) / nw) * nw;
        if (per_cta < nw) per_cta = nw;
        return static_cast<int>(per_cta * 32);
    };
    if (a.outliers == 0) {
        const int G = a.n_q_heads / a.n_kv_heads;
        const int gt = detail::qjl_pick_gt(G, a.m);
        const int nw = detail::kQjlWarpsMax;
        const int chunk = chunk_for(nw);
        const dim3 grid(a.n_kv_heads, (a.n_tokens + chunk - 1) / chunk);
        const std::size_t smem = std::size_t(gt) * a.m * 16;
        auto launch = [&](auto kernel, const char* name) {
            if (smem > 48 * 1024)
                KVQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
            kernel<<<grid, nw * 32, smem, stream>>>(a, proj, chunk);
            KVQ_CUDA_CHECK_LAUNCH(name);
        };
        switch (gt) {
            case 8: launch(detail::qjl_score_plain_kernel<8>, "qjl_score_plain_kernel<8>"); break;
            case 4: launch(detail::qjl_score_plain_kernel<4>, "qjl_score_plain_kernel<4>"); break;
            case 2: launch(detail::qjl_score_plain_kernel<2>, "qjl_score_plain_kernel<2>"); break;
            default: launch(detail::qjl_score_plain_kernel<1>, "qjl_score_plain_kernel<1>"); break;
        }
    } else {
        const std::size_t per_warp = std::size_t(a.m + a.m_outlier) / 4 * 16 * sizeof(float);
        const std::size_t st_bytes = std::size_t(a.head_dim) * a.sketch_rows * sizeof(float);
        int smem_optin = 0;
        KVQ_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
        const long long items = static_cast<long long>(groups) * a.n_kv_heads;
        int nw = 0, st_in_smem = 0, ctas_per_sm = 1;
        std::size_t smem = 0;
        // S^T in shared memory, one CTA per SM, when at least 4 warps' tables fit beside it.
        if (st_bytes + 4 * per_warp <= std::size_t(smem_optin)) {
            nw = static_cast<int>((std::size_t(smem_optin) - st_bytes) / per_warp);
            nw = nw > 12 ? 12 : nw;
            st_in_smem = 1;
            smem = st_bytes + nw * per_warp;
        } else {
            nw = static_cast<int>(detail::kQjlSmemBudget / per_warp);
            nw = nw < 1 ? 1 : (nw > detail::kQjlWarpsMax ? detail::kQjlWarpsMax : nw);
            smem = per_warp * nw;
        }
        if (smem > 48 * 1024)
            KVQ_CUDA_CHECK(cudaFuncSetAttribute(detail::qjl_score_outlier_kernel,
                                                cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
        KVQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, detail::qjl_score_outlier_kernel,
                                                                     nw * 32, smem));
        if (ctas_per_sm < 1) ctas_per_sm = 1;
        long long ctas = (items + nw - 1) / nw;
        if (ctas > static_cast<long long>(sms) * ctas_per_sm) ctas = static_cast<long long>(sms) * ctas_per_sm;
        detail::qjl_score_outlier_kernel<<<static_cast<unsigned>(ctas), nw * 32, smem, stream>>>(a, proj, qf, st,
                                                                                                 st_in_smem);
        KVQ_CUDA_CHECK_LAUNCH("qjl_score_outlier_kernel");
    }
}

}  // namespace kvq::cuda
