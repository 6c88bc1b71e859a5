#pragma once
// Fused decode attention on the GPU over paged quantized blocks: one query token per query head,
// a batch of sequences, each with its own length, page tables and full-precision window, reading
// exactly the bytes the CPU codecs write (kvq::QjlKeyCodec without outliers, kvq::TokenwiseCodec,
// kvq::WkvCodec with its static smoothing folded into the query and the output: k_scale, v_scale,
// v_shift).
// Semantics are those of kvq::attend (cache/attention.hpp): scores q.k / sqrt(d), fp32 softmax
// with max subtraction over [encoded blocks | window | optional exact current token], output the
// probability-weighted sum of the values (dequantized from their blocks, or the window's fp32 rows).
//
// Per sequence b, position p in [0, n_tokens[b]) is a key from the key blocks when p < k_encoded[b],
// else the window row p - k_encoded[b]; likewise for values with v_encoded[b] (key and value windows
// may differ, as in kvq::KvCache). With cur_k/cur_v set, position n_tokens[b] is the exact current
// token (past-only decode).
//
// QJL scores use the int8-quantized projection of the query (qjl_query.cuh), the arithmetic of the
// CPU decode scorer (QjlKeyCodec::prepare_fast, used by kvq::attend), so that GPU and CPU decode
// agree to fp32 rounding; against the exact estimator that adds at most sqrt(pi/2)/m ||k|| m s / 2
// to a score (s: the query's int8 step).
//
// Launches on the caller's stream (no host synchronisation, no stream creation, every launch
// checked; capturable in a CUDA graph):
//  0. (QJL keys) qjl_project_kernel from qjl_score.cuh: S q for every (sequence, query head), then
//     qjl_quantize_query_kernel: its int8 record.
//  1a. When detail::tc_supported() (QJL or token-wise int 2/4/8 keys incl. WKV, int2/4/8 values,
//     G <= 4, see decode_attention_tc.cuh; DecodeAttentionArgs::cuda_core_only turns it off):
//     decode_tc_kernel on tensor cores over the encoded positions [0, E), E = min(k_encoded,
//     v_encoded, n_tokens) rounded down to 16; the CUDA-core kernel below then does only the rest
//     (windows, current token) in "tail" mode.
//  1. decode_partial_kernel, grid (chunks, KV heads, batch), 256 threads: split-K over the sequence.
//     A CTA takes a chunk of positions and GT query heads of one KV head (all G heads of the group
//     share one read of the codes when G <= 8). Tiles of 256 positions: one thread per position
//     scores it for the GT heads (QJL: the nibble tables of qjl_score.cuh, built once per CTA;
//     token-wise int keys: per-group dot products with the fp16 step/min), then an fp32 online
//     softmax (running max and sum per head, accumulators rescaled per tile), then the value sum:
//     a thread owns 8 channels of one position slot and accumulates GT x 8 floats. The chunk's
//     (max, sum, acc[d]) per head goes to the workspace.
//  2. decode_combine_kernel, grid (query heads, batch): merges the chunks exactly,
//     M = max m_i, out = sum_i e^{m_i - M} acc_i / sum_i e^{m_i - M} l_i. After the tensor-core
//     kernel with a single tail chunk (max_window_tokens <= 4080), the tail's CTAs do this merge
//     themselves and there is no third launch.
// On sm_90 (DecodeAttentionArgs::pdl) the quantisation, the tensor-core kernel (QJL keys) and the
// single merging tail chunk are programmatic dependent launches of the launch before them: each
// becomes resident early and waits (griddepcontrol.wait) only before it reads its predecessor's
// output; a dependent that reads the caller's data is never launched ahead of the call's first
// launch.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kvq/core/half.hpp"
#include "kvq/cuda/check.cuh"
#include "kvq/cuda/mma.cuh"
#include "kvq/cuda/qjl_score.cuh"
#include "kvq/quant/codec.hpp"

namespace kvq::cuda {

enum class KeyFormat : std::uint8_t { Qjl = 0, Tokenwise = 1 };

struct DecodeAttentionArgs {
    int head_dim = 0;   // 64, 128 or 256
    int n_q_heads = 0;  // per sequence; a multiple of n_kv_heads
    int n_kv_heads = 0;
    int batch = 0;
    int max_tokens = 0;  // host-side upper bound of n_tokens[b] (+1 with a current token): sizes the grid

    // Keys.
    KeyFormat key_format = KeyFormat::Qjl;
    int qjl_m = 0;                    // QJL: sketch bits (no outliers)
    const float* sketch = nullptr;    // QJL: device [m][head_dim] (QjlKeyCodec::sketch())
    int key_bits = 0, key_group = 0;  // token-wise keys
    BlockLayout key_layout{};
    const std::uint8_t* key_pool = nullptr;  // block p at key_pool + p * key_block_bytes
    std::size_t key_block_bytes = 0;
    const std::uint32_t* key_pages = nullptr;  // [batch][n_kv_heads][page_stride]

    // Values (token-wise int b).
    int value_bits = 0, value_group = 0;
    BlockLayout value_layout{};
    const std::uint8_t* value_pool = nullptr;
    std::size_t value_block_bytes = 0;
    const std::uint32_t* value_pages = nullptr;  // [batch][n_kv_heads][page_stride]
    std::int64_t page_stride = 0;

    // Per sequence (device arrays of batch entries).
    const int* n_tokens = nullptr;   // cached tokens (blocks + window)
    const int* k_encoded = nullptr;  // of which in key blocks
    const int* v_encoded = nullptr;  // of which in value blocks
    // Windows: row of position p, KV head h at k_window[b] + (p - k_encoded[b]) * window_stride + h * d.
    const float* const* k_window = nullptr;  // device array of batch pointers (may be null if no window)
    const float* const* v_window = nullptr;
    std::int64_t window_stride = 0;  // 0 -> n_kv_heads * head_dim

    // Optional exact current token (past-only): [batch][n_kv_heads][d] fp32, both or neither.
    const float* cur_k = nullptr;
    const float* cur_v = nullptr;

    const float* query = nullptr;  // device [batch][n_q_heads][d] fp32
    float* out = nullptr;          // device [batch][n_q_heads][d] fp32

    // WKVQuant static smoothing (kvq::WkvKvCache): every cached key/value (blocks, windows, current
    // token) is in smoothed coordinates x~ = (x - shift) / scale. Keys: the query is folded,
    // q' = q (.) k_scale (token-wise keys only; the constant <q, k_shift> cancels in softmax).
    // Values: out = out~ (.) v_scale + v_shift. Device [n_kv_heads][head_dim] each, or null.
    const float* k_scale = nullptr;
    const float* v_scale = nullptr;
    const float* v_shift = nullptr;

    int chunk_tokens = 0;  // split-K chunk (multiple of 256); 0 -> chosen from the shape
    // Host-side upper bound of n_tokens[b] - min(k_encoded[b], v_encoded[b]) over the batch (the
    // full-precision windows); -1 = unknown. Only sizes the grid of the tail launch (tensor-core path).
    int max_window_tokens = -1;
    bool cuda_core_only = false;  // skip the tensor-core kernel (A/B comparisons, tests)
    // The tensor-core kernel stages its tiles with sm_90 bulk copies + mbarriers when blocks hold >= 64
    // tokens (decode_attention_tc.cuh); false: per-lane 16-byte cp.async (A/B comparisons, tests).
    // Bulk staging is 1.16x faster at 64k tokens, batch 1, and 1.29x at batch 8 (H100, bench/RESULTS.md).
    bool tc_bulk_staging = true;
    // sm_90: the launches of a call overlap as programmatic dependents (PDL): the query quantisation
    // waits for the projection inside its CTAs, the tensor-core kernel issues its first tile copies
    // during the quantisation (QJL keys; it waits for the records before it reads them), and the single
    // tail chunk does its own positions during the tensor-core kernel and waits only before merging the
    // parts. H100, 64k tokens x 32 heads, batch 1: QJL 76.4 vs 80.0 us, WKV 131.6 vs 133.9, int4 144.6
    // vs 147.2 (bench/RESULTS.md, round 6). false: plain stream order (A/B comparisons, tests).
    bool pdl = true;
};

// Fills the key fields from a codec (QjlKeyCodec without outliers or TokenwiseCodec).
template <class QjlCodec>
void set_qjl_keys(DecodeAttentionArgs& a, const QjlCodec& codec, int block_tokens) {
    a.key_format = KeyFormat::Qjl;
    a.qjl_m = codec.params().m;
    a.key_layout = codec.layout(block_tokens);
    if (codec.params().outliers > 0) a.qjl_m = -1;  // rejected by can_implement
    if (a.key_block_bytes == 0) a.key_block_bytes = a.key_layout.bytes();
}
template <class TokCodec>
void set_tokenwise_keys(DecodeAttentionArgs& a, const TokCodec& codec, int block_tokens) {
    a.key_format = KeyFormat::Tokenwise;
    a.key_bits = codec.params().bits;
    a.key_group = codec.params().group;
    a.key_layout = codec.layout(block_tokens);
    if (a.key_block_bytes == 0) a.key_block_bytes = a.key_layout.bytes();
}
template <class TokCodec>
void set_tokenwise_values(DecodeAttentionArgs& a, const TokCodec& codec, int block_tokens) {
    a.value_bits = codec.params().bits;
    a.value_group = codec.params().group;
    a.value_layout = codec.layout(block_tokens);
    if (a.value_block_bytes == 0) a.value_block_bytes = a.value_layout.bytes();
}

}  // namespace kvq::cuda

#include "kvq/cuda/decode_attention_tc.cuh"

namespace kvq::cuda {
namespace detail {

inline constexpr int kDecThreads = 256;
inline constexpr int kDecTile = 256;  // positions per tile (one per thread when scoring)

inline int dec_chunk(const DecodeAttentionArgs& a) {
    if (a.chunk_tokens > 0) return a.chunk_tokens;
    // About 8 CTAs per SM of 132 in all, at least one tile per chunk.
    const long long heads = static_cast<long long>(a.batch) * a.n_kv_heads;
    long long want = (1056 + heads - 1) / heads;
    if (want < 1) want = 1;
    long long chunk = (static_cast<long long>(a.max_tokens) + want - 1) / want;
    chunk = (chunk + kDecTile - 1) / kDecTile * kDecTile;
    if (chunk < kDecTile) chunk = kDecTile;
    return static_cast<int>(chunk);
}
inline int dec_chunks(const DecodeAttentionArgs& a) {
    const int c = dec_chunk(a);
    return a.max_tokens <= 0 ? 1 : (a.max_tokens + c - 1) / c;
}

// How the work is split: the tensor-core kernel over [0, E) plus the CUDA-core kernel over the tail
// (tc), or the CUDA-core kernel over everything.
struct DecPlan {
    bool tc = false;
    int chunk = 0, n_main = 0;       // tc: positions per CTA of the tensor-core kernel, its chunks
    int tail_chunk = 0, n_tail = 0;  // CUDA-core chunks (all of them without tc)
    int n_parts = 0;                 // partial slots per head
};
inline constexpr int kTcTailChunk = 4096;
inline DecPlan dec_plan(const DecodeAttentionArgs& a) {
    DecPlan p;
    p.tc = !a.cuda_core_only && tc_supported(a);
    if (!p.tc) {
        p.tail_chunk = dec_chunk(a);
        p.n_tail = dec_chunks(a);
        p.n_parts = p.n_tail;
        return p;
    }
    if (a.chunk_tokens > 0) {
        p.chunk = a.chunk_tokens;
    } else {
        // Chunks per (sequence, KV head) from a cost model fitted to a sweep of every candidate on an
        // H100 (bench_gpu_decode --sweep, 3 configurations x batch 1 / 8 x T 4k / 16k / 64k; refitted in
        // round 6, after the warps' merge lost its ~8 us of shared-memory CAS loops: it picks the fastest
        // chunk in 17 of 18 and is 0.6% off in the last). The busiest SM runs k = ceil(CTAs / SMs) CTAs,
        // cps at a time; a round of c CTAs of L positions costs max(c, 2.5) L bytes_per_position (one CTA
        // alone streams at about 1 / 2.5 of an SM's share of bandwidth) plus 150 KB of streaming (a CTA's
        // start and drain: the first tiles' latency, the last tiles' spread, the merge). The per-chunk
        // term of round 5 (20 KB) fits the new sweep worse at every value tried and is gone.
        int dev = 0, sms = 132;
        if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        if (sms <= 0) sms = 132;
        const long long cps = std::max(1, tc_ctas_per_sm(a));
        const long long heads = static_cast<long long>(a.batch) * a.n_kv_heads, T = a.max_tokens > 0 ? a.max_tokens : 1;
        const double bpp = double(a.key_block_bytes) / double(a.key_layout.block_tokens) +
                           double(a.value_block_bytes) / double(a.value_layout.block_tokens);
        constexpr double kSoloShare = 2.5, kRoundBytes = 150e3;
        long long best_chunk = 0;
        double best_cost = 0;
        for (long long want = 1; want <= 64; ++want) {
            const long long chunk = std::max<long long>(256, ((T + want - 1) / want + 255) / 256 * 256);
            const long long nch = (T + chunk - 1) / chunk, k = (heads * nch + sms - 1) / sms;
            const double round = double(std::min(chunk, T)) * bpp;
            double cost = double(k / cps) * (std::max(double(cps), kSoloShare) * round + kRoundBytes);
            if (k % cps) cost += std::max(double(k % cps), kSoloShare) * round + kRoundBytes;
            if (best_chunk == 0 || cost < best_cost) {  // ties: the larger chunk (found first)
                best_cost = cost;
                best_chunk = chunk;
            }
            if (chunk == 256) break;
        }
        p.chunk = static_cast<int>(best_chunk);
    }
    p.n_main = a.max_tokens <= 0 ? 1 : (a.max_tokens + p.chunk - 1) / p.chunk;
    long long tail = a.max_window_tokens >= 0 ? static_cast<long long>(a.max_window_tokens) + 16 : a.max_tokens;
    if (tail > a.max_tokens) tail = a.max_tokens;
    p.tail_chunk = kTcTailChunk;
    p.n_tail = tail <= 0 ? 1 : static_cast<int>((tail + kTcTailChunk - 1) / kTcTailChunk);
    p.n_parts = p.n_main + p.n_tail;
    return p;
}

struct DecWorkspace {
    std::size_t proj = 0, qf = 0, projq = 0, qrec = 0, ml = 0, acc = 0, total = 0;
};
inline DecWorkspace dec_workspace_layout(const DecodeAttentionArgs& a) {
    DecWorkspace w;
    const std::size_t heads = std::size_t(a.batch) * a.n_q_heads;
    const std::size_t nc = static_cast<std::size_t>(dec_plan(a).n_parts);
    const std::size_t m = a.qjl_m > 0 ? std::size_t(a.qjl_m) : 0;
    std::size_t off = 0;
    if (a.key_format == KeyFormat::Qjl) {
        w.proj = off;
        off += ws_align(heads * m * sizeof(float));
        w.qf = off;
        off += ws_align(heads * a.head_dim * sizeof(float));
        w.projq = off;
        off += ws_align(heads * m * sizeof(float));
        w.qrec = off;
        off += ws_align(heads * QjlQueryLayout::of(static_cast<int>(m)).record_bytes());
    }
    w.ml = off;
    off += ws_align(heads * nc * 2 * sizeof(float));
    w.acc = off;
    off += ws_align(heads * nc * a.head_dim * sizeof(float));
    w.total = off;
    return w;
}

// Small unsigned integer c (< 2^23) to float without I2F (quarter-rate): bits of 2^23 + c, minus 2^23.
__device__ __forceinline__ float dec_u2f(std::uint32_t c) { return __uint_as_float(0x4B000000u | c) - 8388608.0f; }

// 8 codes of a b-bit LSB-first stream starting at code index 8u (byte u*BITS), raw.
template <int BITS>
struct DecUnit {
    using type = std::conditional_t<BITS == 2, unsigned short, std::conditional_t<BITS == 4, std::uint32_t, uint2>>;
};
template <int BITS>
__device__ __forceinline__ typename DecUnit<BITS>::type dec_raw_unit(const std::uint8_t* codes, int u) {
    return __ldg(reinterpret_cast<const typename DecUnit<BITS>::type*>(codes) + u);
}
template <int BITS>
__device__ __forceinline__ void dec_expand(typename DecUnit<BITS>::type r, float v[8]) {
    if constexpr (BITS == 2) {
        const std::uint32_t w = r;
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = dec_u2f((w >> (2 * j)) & 3u);
    } else if constexpr (BITS == 4) {
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = dec_u2f((r >> (4 * j)) & 15u);
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            v[j] = dec_u2f((r.x >> (8 * j)) & 255u);
            v[4 + j] = dec_u2f((r.y >> (8 * j)) & 255u);
        }
    }
}
template <int BITS>
__device__ __forceinline__ void dec_load_unit(const std::uint8_t* codes, int u, float v[8]) {
    dec_expand<BITS>(dec_raw_unit<BITS>(codes, u), v);
}

__device__ __forceinline__ float dec_half(const std::uint8_t* p, std::size_t i) {
    return ::kvq::half_to_float(::kvq::half_t{__ldg(reinterpret_cast<const unsigned short*>(p) + i)});
}

// Token-wise int key score of token t of a block against the GT queries in shared memory.
template <int GT, int BITS>
__device__ __forceinline__ void dec_score_tokenwise(const std::uint8_t* blk, const BlockLayout& l, int t, int d, int g,
                                                    const float* qs, const float* qsum, float* s) {
    const int ng = d / g;
    const std::uint8_t* codes = blk + std::size_t(t) * l.code_bytes;
    const std::uint8_t* side = blk + l.token_side_offset();
#pragma unroll
    for (int i = 0; i < GT; ++i) s[i] = 0.f;
    for (int grp = 0; grp < ng; ++grp) {
        float dot[GT];
#pragma unroll
        for (int i = 0; i < GT; ++i) dot[i] = 0.f;
        for (int u = grp * g / 8; u < (grp + 1) * g / 8; ++u) {
            float v[8];
            dec_load_unit<BITS>(codes, u, v);
#pragma unroll
            for (int i = 0; i < GT; ++i) {
                const float4 q0 = *reinterpret_cast<const float4*>(qs + i * d + 8 * u);
                const float4 q1 = *reinterpret_cast<const float4*>(qs + i * d + 8 * u + 4);
                dot[i] = fmaf(q0.x, v[0], dot[i]);
                dot[i] = fmaf(q0.y, v[1], dot[i]);
                dot[i] = fmaf(q0.z, v[2], dot[i]);
                dot[i] = fmaf(q0.w, v[3], dot[i]);
                dot[i] = fmaf(q1.x, v[4], dot[i]);
                dot[i] = fmaf(q1.y, v[5], dot[i]);
                dot[i] = fmaf(q1.z, v[6], dot[i]);
                dot[i] = fmaf(q1.w, v[7], dot[i]);
            }
        }
        const float st = dec_half(side, std::size_t(t) * ng + grp);
        const float mn = dec_half(side, std::size_t(l.block_tokens) * ng + std::size_t(t) * ng + grp);
#pragma unroll
        for (int i = 0; i < GT; ++i) s[i] += st * dot[i] + mn * qsum[i * ng + grp];
    }
}

// Exact merge of the partials of query head hq of sequence b into a.out, by the whole block (every
// thread calls it; threads ch < head_dim own one output channel each; blockDim.x <= 256 and a
// multiple of 32). s_e, s_l: 256 floats of shared memory each, s_m: one. The parts' (m, l) pairs are
// staged by one load per thread and their weights e^{m_i - M} computed once per part, so the channel
// sums are independent loads (unrolled). Batches of blockDim.x parts; with one batch the sums are
// those of M = max m_i, out = sum_i e^{m_i - M} acc_i / sum_i e^{m_i - M} l_i in order.
__device__ __forceinline__ void dec_merge_head(const DecodeAttentionArgs& a, int hq, int b, int n_parts, int used,
                                               const float* part_ml, const float* part_acc, float* s_e, float* s_l,
                                               float* s_m) {
    const int d = a.head_dim, ch = threadIdx.x, nb = blockDim.x;
    const std::size_t head = std::size_t(b) * a.n_q_heads + hq;
    const float* ml = part_ml + head * n_parts * 2;
    const float* acc = part_acc + head * n_parts * d + ch;
    float M = -INFINITY, L = 0.f, o = 0.f;
    for (int base = 0; base < used; base += nb) {
        const int cnt = min(nb, used - base);
        float mi = -INFINITY, li = 0.f;
        if (ch < cnt) {
            const float2 v = *reinterpret_cast<const float2*>(ml + 2 * (base + ch));
            mi = v.x;
            li = v.y;
        }
        // The batch's maximum (a warp reduction, then across warps through s_e).
        float bm = mi;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, off));
        __syncthreads();  // the previous batch's (or head's) s_e / s_l / s_m are consumed
        if ((ch & 31) == 0) s_e[ch / 32] = bm;
        __syncthreads();
        if (ch == 0) {
            float x = s_e[0];
            for (int w = 1; w < nb / 32; ++w) x = fmaxf(x, s_e[w]);
            *s_m = x;
        }
        __syncthreads();
        const float Mn = fmaxf(M, *s_m);
        if (Mn == -INFINITY) continue;  // every part so far empty (uniform across the block)
        if (ch < cnt) {
            s_e[ch] = mi == -INFINITY ? 0.f : expf(mi - Mn);
            s_l[ch] = li;
        }
        __syncthreads();
        if (M != Mn) {  // rescale what the earlier batches summed (M = -inf: nothing yet)
            const float f = M == -INFINITY ? 0.f : expf(M - Mn);
            L *= f;
            o *= f;
        }
        M = Mn;
        if (ch < d) {
#pragma unroll 8
            for (int i = 0; i < cnt; ++i) {  // loads unconditional (in the workspace), so they overlap
                const float e = s_e[i], v = acc[std::size_t(base + i) * d];
                if (e != 0.f) {  // empty parts (m = -inf) leave no term, whatever their acc holds
                    L = fmaf(e, s_l[i], L);
                    o = fmaf(e, v, o);
                }
            }
        }
    }
    if (ch < d) {
        float r = L > 0.f ? o / L : 0.f;
        if (a.v_scale != nullptr) {
            const std::size_t c = std::size_t(hq / (a.n_q_heads / a.n_kv_heads)) * d + ch;
            r = fmaf(r, __ldg(a.v_scale + c), __ldg(a.v_shift + c));
        }
        a.out[head * d + ch] = r;
    }
}

// Stage: exact merge of the partials. grid (n_q_heads, batch), head_dim threads. With used_all, every
// one of the n_parts slots was written (empty ones as max -inf, sum 0); otherwise the first
// ceil(total / chunk). Not launched when the tail kernel merges (one tail chunk, tensor-core path;
// measured 0.4-1.9 us faster at batch 1 on an H100, bench/RESULTS.md round 5).
__global__ void decode_combine_kernel(DecodeAttentionArgs a, int chunk, int n_parts, int used_all, const float* part_ml,
                                      const float* part_acc) {
    __shared__ float s_e[256], s_l[256], s_m;
    const int b = blockIdx.y;
    const int total = __ldg(a.n_tokens + b) + (a.cur_k != nullptr ? 1 : 0);
    const int used = used_all ? n_parts : min(n_parts, (total + chunk - 1) / chunk);
    dec_merge_head(a, blockIdx.x, b, n_parts, used, part_ml, part_acc, s_e, s_l, &s_m);
}

// Stage: split-K partial attention. See the header comment.
template <int GT, KeyFormat KF, int KBITS, int VBITS, int CPT>
__global__ void __launch_bounds__(kDecThreads, GT == 1 ? 3 : (GT == 8 ? 1 : 2))
    decode_partial_kernel(DecodeAttentionArgs a, const float* proj, int chunk, float* part_ml, float* part_acc,
                          int part_offset, int n_parts, int tail) {
    extern __shared__ float4 dec_smem4[];
    float* smem = reinterpret_cast<float*>(dec_smem4);
    const int d = a.head_dim, G = a.n_q_heads / a.n_kv_heads;
    const int kv = blockIdx.y, b = blockIdx.z, c = blockIdx.x;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int m = a.qjl_m, ntab = m / 4;
    const int kg = a.key_group > 0 ? a.key_group : 8, kng = d / kg;
    // Shared memory: q [GT][d] | qsum [GT][kng] or lut [GT][ntab][16] | p [GT][tile] | red [2][GT][8] |
    // accbuf [kDecThreads * 8]
    float* qs = smem;
    float* lut = qs + GT * d;
    float* qsum = lut;
    const int aux = KF == KeyFormat::Qjl ? GT * ntab * 16 : GT * kng;
    float* ps = lut + ((aux + 3) & ~3);
    float* red = ps + GT * kDecTile;
    float* accbuf = red + 2 * GT * 8;

    const int n_tok = __ldg(a.n_tokens + b);
    const bool has_cur = a.cur_k != nullptr;
    const int total = n_tok + (has_cur ? 1 : 0);
    const int k_enc = __ldg(a.k_encoded + b), v_enc = __ldg(a.v_encoded + b);
    // Tail mode: the positions the tensor-core kernel leaves, [E, total) (decode_attention_tc.cuh).
    const int start = tail ? (min(n_tok, min(k_enc, v_enc)) & ~15) : 0;
    const int c_begin = start + c * chunk, c_end = min(total, c_begin + chunk);
    const std::int64_t ws = a.window_stride ? a.window_stride : std::int64_t(a.n_kv_heads) * d;
    const float* kwin = (a.k_window != nullptr && k_enc < n_tok) ? a.k_window[b] + std::size_t(kv) * d : nullptr;
    const float* vwin = (a.v_window != nullptr && v_enc < n_tok) ? a.v_window[b] + std::size_t(kv) * d : nullptr;
    const float* ck = has_cur ? a.cur_k + (std::size_t(b) * a.n_kv_heads + kv) * d : nullptr;
    const float* cv = has_cur ? a.cur_v + (std::size_t(b) * a.n_kv_heads + kv) * d : nullptr;
    const std::uint32_t* kpages = a.key_pages + (std::size_t(b) * a.n_kv_heads + kv) * a.page_stride;
    const std::uint32_t* vpages = a.value_pages + (std::size_t(b) * a.n_kv_heads + kv) * a.page_stride;
    const int KB = static_cast<int>(a.key_layout.block_tokens), VB = static_cast<int>(a.value_layout.block_tokens);
    const float scale = 1.0f / sqrtf(static_cast<float>(d));
    const int ksh = __ffs(KB) - 1, vsh = __ffs(VB) - 1;  // block sizes are powers of two
    // Values: a thread owns CPT channels (one value group) of position slots slot, slot + NT, ...
    const int U = d / CPT, NT = kDecThreads / U, unit = tid % U, slot = tid / U;
    const int vng = d / a.value_group;
    const int vgrp = unit * CPT / a.value_group;

    for (int h0 = 0; h0 < G; h0 += GT) {
        const int hq0 = kv * G + h0;  // first query head of this pass (within the sequence)
        const std::size_t head_base = std::size_t(b) * a.n_q_heads + hq0;
        if (c_begin >= c_end) {
            // Empty chunk (shorter sequence in the batch): neutral partials.
            for (int i = tid; i < GT; i += kDecThreads) {
                part_ml[((head_base + i) * n_parts + part_offset + c) * 2] = -INFINITY;
                part_ml[((head_base + i) * n_parts + part_offset + c) * 2 + 1] = 0.f;
            }
            for (int i = tid; i < GT * d; i += kDecThreads)
                part_acc[((head_base + i / d) * n_parts + part_offset + c) * d + i % d] = 0.f;
            continue;
        }
        __syncthreads();
        for (int i = tid; i < GT * d; i += kDecThreads)
            qs[i] = a.k_scale != nullptr ? a.query[head_base * d + i] * __ldg(a.k_scale + std::size_t(kv) * d + i % d)
                                         : a.query[head_base * d + i];
        if constexpr (KF == KeyFormat::Qjl) {
            for (int e = tid; e < GT * ntab; e += kDecThreads) {
                const int hh = e / ntab, k = e % ntab;
                const float4 p = *reinterpret_cast<const float4*>(proj + (head_base + hh) * m + 4 * k);
                qjl_build_table(p.x, p.y, p.z, p.w, lut + (std::size_t(hh) * ntab + k) * 16, tid >> 1);
            }
        }
        __syncthreads();
        if constexpr (KF == KeyFormat::Tokenwise) {
            for (int e = tid; e < GT * kng; e += kDecThreads) {
                const int hh = e / kng, grp = e % kng;
                float s = 0.f;
                for (int i = 0; i < kg; ++i) s += qs[hh * d + grp * kg + i];
                qsum[e] = s;
            }
            __syncthreads();
        }

        // acc: probability-weighted codes (times step); macc: probability-weighted minimum of this
        // thread's value group: sum_p w_p (c_p st_p + mn_p) = sum_p (w_p st_p) c_p + sum_p w_p mn_p.
        float m_run[GT], l_run[GT], acc[GT][CPT], macc[GT];
#pragma unroll
        for (int i = 0; i < GT; ++i) {
            m_run[i] = -INFINITY;
            l_run[i] = 0.f;
            macc[i] = 0.f;
#pragma unroll
            for (int j = 0; j < CPT; ++j) acc[i][j] = 0.f;
        }

        {  // Prefetch (L1) the key row of this thread's position in the first tile.
            const int pn = c_begin + tid;
            if (pn < c_end && pn < k_enc) {
                const int t = (pn & (KB - 1));
                const std::uint8_t* blk = a.key_pool + std::size_t(__ldg(kpages + (pn >> ksh))) * a.key_block_bytes;
                qjl_prefetch_l1(blk + std::size_t(t) * a.key_layout.code_bytes, a.key_layout.code_bytes);
            }
        }
        for (int t0 = c_begin; t0 < c_end; t0 += kDecTile) {
            const int tn = min(kDecTile, c_end - t0);
            // 0. Prefetch (L1) this thread's position's value row and side data, to overlap with scoring.
            if (tid < tn && t0 + tid < v_enc) {
                const int p = t0 + tid, t = (p & (VB - 1));
                const std::uint8_t* blk = a.value_pool + std::size_t(__ldg(vpages + (p >> vsh))) * a.value_block_bytes;
                qjl_prefetch_l1(blk + std::size_t(t) * a.value_layout.code_bytes, a.value_layout.code_bytes);
                const std::uint8_t* side = blk + a.value_layout.token_side_offset();
                tc::prefetch_l1(side + std::size_t(t) * vng * 2);
                tc::prefetch_l1(side + (std::size_t(VB) * vng + std::size_t(t) * vng) * 2);
            }
            // 1. Scores: one position per thread.
            {
                const int p = t0 + tid;
                float s[GT];
#pragma unroll
                for (int i = 0; i < GT; ++i) s[i] = -INFINITY;
                if (tid < tn) {
                    if (p < k_enc) {
                        const std::uint32_t page = __ldg(kpages + (p >> ksh));
                        const int t = (p & (KB - 1));
                        const std::uint8_t* blk = a.key_pool + std::size_t(page) * a.key_block_bytes;
                        if constexpr (KF == KeyFormat::Qjl) {
                            const std::uint32_t cb = a.key_layout.code_bytes;
                            float sacc[GT];
#pragma unroll
                            for (int i = 0; i < GT; ++i) sacc[i] = 0.f;
                            qjl_for_words(blk + std::size_t(t) * cb, 0, m / 32, (cb % 16) == 0,
                                          [&](std::uint32_t w, int wi) {
                                              const float* L = lut + wi * 128;
#pragma unroll
                                              for (int i = 0; i < GT; ++i)
                                                  sacc[i] += qjl_word_sum(L + std::size_t(i) * ntab * 16, w);
                                          });
                            const float cn = static_cast<float>(1.2533141373155003 / m) *
                                             dec_half(blk + a.key_layout.token_side_offset(), t);
#pragma unroll
                            for (int i = 0; i < GT; ++i) s[i] = cn * sacc[i];
                        } else {
                            dec_score_tokenwise<GT, KBITS>(blk, a.key_layout, t, d, kg, qs, qsum, s);
                        }
                    } else {
                        const float* row = p < n_tok ? kwin + std::size_t(p - k_enc) * ws : ck;
#pragma unroll
                        for (int i = 0; i < GT; ++i) s[i] = 0.f;
                        for (int ch = 0; ch < d; ch += 4) {
                            const float4 k4 = *reinterpret_cast<const float4*>(row + ch);
#pragma unroll
                            for (int i = 0; i < GT; ++i) {
                                const float4 q4 = *reinterpret_cast<const float4*>(qs + i * d + ch);
                                s[i] = fmaf(q4.x, k4.x, s[i]);
                                s[i] = fmaf(q4.y, k4.y, s[i]);
                                s[i] = fmaf(q4.z, k4.z, s[i]);
                                s[i] = fmaf(q4.w, k4.w, s[i]);
                            }
                        }
                    }
#pragma unroll
                    for (int i = 0; i < GT; ++i) s[i] *= scale;
                }
                // 2. Tile max per head.
#pragma unroll
                for (int i = 0; i < GT; ++i) {
                    float mx = s[i];
#pragma unroll
                    for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
                    if (lane == 0) red[i * 8 + warp] = mx;
                }
                __syncthreads();
                float m_new[GT];
#pragma unroll
                for (int i = 0; i < GT; ++i) {
                    float mx = red[i * 8];
#pragma unroll
                    for (int w = 1; w < kDecThreads / 32; ++w) mx = fmaxf(mx, red[i * 8 + w]);
                    m_new[i] = fmaxf(m_run[i], mx);
                }
                // 3. Probabilities and their sum.
#pragma unroll
                for (int i = 0; i < GT; ++i) {
                    const float pr = tid < tn ? expf(s[i] - m_new[i]) : 0.f;
                    ps[i * kDecTile + tid] = pr;
                    float sum = pr;
#pragma unroll
                    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
                    if (lane == 0) red[GT * 8 + i * 8 + warp] = sum;
                }
                __syncthreads();
#pragma unroll
                for (int i = 0; i < GT; ++i) {
                    float sum = 0.f;
#pragma unroll
                    for (int w = 0; w < kDecThreads / 32; ++w) sum += red[GT * 8 + i * 8 + w];
                    const float corr = expf(m_run[i] - m_new[i]);  // 0 on the first tile (m_run = -inf)
                    l_run[i] = l_run[i] * corr + sum;
                    m_run[i] = m_new[i];
                    macc[i] *= corr;
#pragma unroll
                    for (int j = 0; j < CPT; ++j) acc[i][j] *= corr;
                }
            }
            // Prefetch (L1) the key row of this thread's position in the next tile.
            {
                const int pn = t0 + kDecTile + tid;
                if (pn < c_end && pn < k_enc) {
                    const int t = (pn & (KB - 1));
                    const std::uint8_t* blk = a.key_pool + std::size_t(__ldg(kpages + (pn >> ksh))) * a.key_block_bytes;
                    qjl_prefetch_l1(blk + std::size_t(t) * a.key_layout.code_bytes, a.key_layout.code_bytes);
                    tc::prefetch_l1(blk + a.key_layout.token_side_offset() +
                                    std::size_t(t) * a.key_layout.token_side_bytes);
                }
            }
            // 4. Values: this thread's CPT channels of positions slot, slot + NT, ...
            constexpr int SU = CPT / 8;             // 8-code units per thread
            constexpr int PB = VBITS == 2 ? 8 : 4;  // positions whose loads are issued together
            if (t0 + tn <= v_enc) {
                // Whole tile in value blocks: loads of PB positions issued before their arithmetic.
                for (int tt0 = slot; tt0 < tn; tt0 += PB * NT) {
                    typename DecUnit<VBITS>::type raw[PB][SU];
                    float st[PB], mn[PB];
#pragma unroll
                    for (int k = 0; k < PB; ++k) {
                        const int tt = tt0 + k * NT;
                        const int p = t0 + (tt < tn ? tt : tt0);
                        const int t = p & (VB - 1);
                        const std::uint8_t* blk =
                            a.value_pool + std::size_t(__ldg(vpages + (p >> vsh))) * a.value_block_bytes;
#pragma unroll
                        for (int su = 0; su < SU; ++su)
                            raw[k][su] =
                                dec_raw_unit<VBITS>(blk + std::size_t(t) * a.value_layout.code_bytes, unit * SU + su);
                        const std::uint8_t* side = blk + a.value_layout.token_side_offset();
                        st[k] = dec_half(side, std::size_t(t) * vng + vgrp);
                        mn[k] = dec_half(side, std::size_t(VB) * vng + std::size_t(t) * vng + vgrp);
                    }
#pragma unroll
                    for (int k = 0; k < PB; ++k) {
                        const int tt = tt0 + k * NT;
                        if (tt < tn) {
                            float pst[GT];
#pragma unroll
                            for (int i = 0; i < GT; ++i) {
                                const float pr = ps[i * kDecTile + tt];
                                pst[i] = pr * st[k];
                                macc[i] = fmaf(pr, mn[k], macc[i]);
                            }
#pragma unroll
                            for (int su = 0; su < SU; ++su) {
                                float v[8];
                                dec_expand<VBITS>(raw[k][su], v);
#pragma unroll
                                for (int j = 0; j < 8; ++j)
#pragma unroll
                                    for (int i = 0; i < GT; ++i)
                                        acc[i][su * 8 + j] = fmaf(pst[i], v[j], acc[i][su * 8 + j]);
                            }
                        }
                    }
                }
            } else
                for (int tt = slot; tt < tn; tt += NT) {
                    const int p = t0 + tt;
                    float v[CPT];
                    if (p < v_enc) {
                        const std::uint32_t page = __ldg(vpages + (p >> vsh));
                        const int t = p & (VB - 1);
                        const std::uint8_t* blk = a.value_pool + std::size_t(page) * a.value_block_bytes;
#pragma unroll
                        for (int su = 0; su < SU; ++su)
                            dec_load_unit<VBITS>(blk + std::size_t(t) * a.value_layout.code_bytes, unit * SU + su,
                                                 v + 8 * su);
                        const std::uint8_t* side = blk + a.value_layout.token_side_offset();
                        const float st = dec_half(side, std::size_t(t) * vng + vgrp);
                        const float mn = dec_half(side, std::size_t(VB) * vng + std::size_t(t) * vng + vgrp);
#pragma unroll
                        for (int j = 0; j < CPT; ++j) v[j] = fmaf(v[j], st, mn);
                    } else {
                        const float* row = p < n_tok ? vwin + std::size_t(p - v_enc) * ws : cv;
#pragma unroll
                        for (int j = 0; j < CPT; j += 4) {
                            const float4 x = *reinterpret_cast<const float4*>(row + CPT * unit + j);
                            v[j] = x.x;
                            v[j + 1] = x.y;
                            v[j + 2] = x.z;
                            v[j + 3] = x.w;
                        }
                    }
#pragma unroll
                    for (int i = 0; i < GT; ++i) {
                        const float pr = ps[i * kDecTile + tt];
#pragma unroll
                        for (int j = 0; j < CPT; ++j) acc[i][j] = fmaf(pr, v[j], acc[i][j]);
                    }
                }
            __syncthreads();  // ps and red are rewritten by the next tile
        }

        // 5. Reduce the NT position slots and write the chunk's partials.
#pragma unroll
        for (int i = 0; i < GT; ++i) {
#pragma unroll
            for (int j = 0; j < CPT; ++j) accbuf[slot * d + unit * CPT + j] = acc[i][j] + macc[i];
            __syncthreads();
            for (int ch = tid; ch < d; ch += kDecThreads) {
                float s = 0.f;
                for (int k = 0; k < NT; ++k) s += accbuf[k * d + ch];
                part_acc[((head_base + i) * n_parts + part_offset + c) * d + ch] = s;
            }
            if (tid == 0) {
                part_ml[((head_base + i) * n_parts + part_offset + c) * 2] = m_run[i];
                part_ml[((head_base + i) * n_parts + part_offset + c) * 2 + 1] = l_run[i];
            }
            __syncthreads();
        }
    }
    // tail == 2: the only tail chunk of the tensor-core path, launched after the tensor-core kernel,
    // merges all parts of its G query heads itself (no combine launch). __syncthreads makes this
    // block's partial writes visible to all its threads; the tensor-core kernel's are complete.
    if (tail == 2) {
        __syncthreads();
        qjl_pdl_wait();  // launched as the tensor-core kernel's programmatic dependent (DecodeAttentionArgs::pdl)
        for (int h = 0; h < G; ++h)
            dec_merge_head(a, kv * G + h, b, n_parts, n_parts, part_ml, part_acc, accbuf, accbuf + 256, accbuf + 512);
    }
}

inline int dec_pick_gt(int G) {
    for (int gt : {8, 4, 2})
        if (G % gt == 0) return gt;
    return 1;
}

inline std::size_t dec_smem_bytes(const DecodeAttentionArgs& a, int gt) {
    const int d = a.head_dim;
    const int aux =
        a.key_format == KeyFormat::Qjl ? gt * (a.qjl_m / 4) * 16 : gt * (d / (a.key_group > 0 ? a.key_group : 8));
    const std::size_t floats = std::size_t(gt) * d + ((aux + 3) & ~3) + std::size_t(gt) * kDecTile + 2 * gt * 8 +
                               std::size_t(kDecThreads) * 16;  // accbuf: NT * d = 256 * CPT floats, CPT <= 16
    return floats * sizeof(float);
}

}  // namespace detail

inline CheckResult can_implement(const DecodeAttentionArgs& a) {
    auto fail = [](std::string msg) {
        return CheckResult{false, "kvq::cuda::launch_decode_attention: " + std::move(msg)};
    };
    const int d = a.head_dim;
    if (d != 64 && d != 128 && d != 256) return fail("head_dim must be 64, 128 or 256, got " + std::to_string(d));
    if (a.n_kv_heads <= 0 || a.n_q_heads <= 0 || a.n_q_heads % a.n_kv_heads != 0)
        return fail("n_q_heads must be a positive multiple of n_kv_heads");
    if (a.batch <= 0 || a.batch > 65535) return fail("batch must be in [1, 65535]");
    if (a.n_kv_heads > 65535) return fail("n_kv_heads must be <= 65535");
    if (a.max_tokens < 0 || a.max_tokens > (1 << 30)) return fail("max_tokens must be in [0, 2^30]");
    if (a.chunk_tokens < 0 || a.chunk_tokens % detail::kDecTile != 0)
        return fail("chunk_tokens must be 0 or a multiple of 256");
    auto pow2 = [](std::uint32_t v) { return v != 0 && (v & (v - 1)) == 0; };
    if (a.key_format == KeyFormat::Qjl) {
        if (a.qjl_m < 32 || a.qjl_m > 1024 || a.qjl_m % 32 != 0)
            return fail("QJL keys: m must be a multiple of 32 in [32, 1024] and the codec without outliers");
        if (a.key_layout.code_bytes != std::uint32_t(a.qjl_m) / 8 || a.key_layout.token_side_bytes != 2 ||
            a.key_layout.block_side_bytes != 0)
            return fail("QJL key layout does not match m without outliers (use set_qjl_keys)");
        if (!a.sketch) return fail("QJL keys need the device sketch");
    } else {
        if (a.key_bits != 2 && a.key_bits != 4 && a.key_bits != 8) return fail("key bits must be 2, 4 or 8");
        if (a.key_group < 8 || a.key_group % 8 != 0 || d % a.key_group != 0)
            return fail("key group must be a multiple of 8 dividing head_dim");
        if (a.key_layout.code_bytes != std::uint32_t(d * a.key_bits / 8) ||
            a.key_layout.token_side_bytes != std::uint32_t(4 * (d / a.key_group)))
            return fail("token-wise key layout does not match (use set_tokenwise_keys)");
    }
    if (a.value_bits != 2 && a.value_bits != 4 && a.value_bits != 8) return fail("value bits must be 2, 4 or 8");
    if (a.value_group < 8 || a.value_group % 8 != 0 || d % a.value_group != 0)
        return fail("value group must be a multiple of 8 dividing head_dim");
    if (a.value_layout.code_bytes != std::uint32_t(d * a.value_bits / 8) ||
        a.value_layout.token_side_bytes != std::uint32_t(4 * (d / a.value_group)))
        return fail("token-wise value layout does not match (use set_tokenwise_values)");
    if (!pow2(a.key_layout.block_tokens) || !pow2(a.value_layout.block_tokens))
        return fail("block_tokens must be powers of two");
    if (a.key_block_bytes < a.key_layout.bytes() || a.key_block_bytes % 16 != 0 ||
        a.value_block_bytes < a.value_layout.bytes() || a.value_block_bytes % 16 != 0)
        return fail("block bytes must be multiples of 16 and at least the layout's bytes");
    if (reinterpret_cast<std::uintptr_t>(a.key_pool) % 16 != 0 ||
        reinterpret_cast<std::uintptr_t>(a.value_pool) % 16 != 0)
        return fail("pools must be 16-byte aligned");
    if ((a.cur_k == nullptr) != (a.cur_v == nullptr)) return fail("cur_k and cur_v must be given together");
    if ((a.v_scale == nullptr) != (a.v_shift == nullptr)) return fail("v_scale and v_shift must be given together");
    if (a.k_scale != nullptr && a.key_format == KeyFormat::Qjl)
        return fail("k_scale (WKV key smoothing) needs token-wise keys");
    if (a.window_stride != 0 && (a.window_stride < std::int64_t(a.n_kv_heads) * d || a.window_stride % 4 != 0))
        return fail("window_stride must be 0 or a multiple of 4 of at least n_kv_heads * head_dim");
    if (!a.query || !a.out || !a.n_tokens || !a.k_encoded || !a.v_encoded || !a.key_pages || !a.value_pages)
        return fail("query, out, n_tokens, k_encoded, v_encoded, key_pages and value_pages must be device pointers");
    if (a.page_stride < 0) return fail("page_stride must be >= 0");
    if (detail::dec_smem_bytes(a, detail::dec_pick_gt(a.n_q_heads / a.n_kv_heads)) > 200 * 1024)
        return fail("shared memory need above 200 KB (m too large for the group size)");
    return {};
}

inline std::size_t decode_attention_workspace_bytes(const DecodeAttentionArgs& a) {
    return detail::dec_workspace_layout(a).total;
}

// Decode attention for the whole batch. Asynchronous on `stream`; throws kvq::Error on invalid
// arguments, a too small workspace (256-byte aligned, decode_attention_workspace_bytes()), or a
// launch error. Device-side contract (not checked): n_tokens[b] (+1 with a current token) <=
// max_tokens, k_encoded[b], v_encoded[b] <= n_tokens[b], page tables cover the encoded tokens,
// windows cover the rest; window rows 16-byte aligned.
inline void launch_decode_attention(const DecodeAttentionArgs& a, cudaStream_t stream, void* workspace,
                                    std::size_t workspace_bytes) {
    const CheckResult ok = can_implement(a);
    KVQ_CHECK(ok.ok, ok.message);
    const detail::DecWorkspace w = detail::dec_workspace_layout(a);
    KVQ_CHECK(workspace_bytes >= w.total && workspace != nullptr, "kvq::cuda::launch_decode_attention: workspace of ",
              workspace_bytes, " bytes is below decode_attention_workspace_bytes() = ", w.total);
    KVQ_CHECK(reinterpret_cast<std::uintptr_t>(workspace) % 256 == 0, "workspace must be 256-byte aligned");
    auto* base = static_cast<std::uint8_t*>(workspace);
    float* proj = reinterpret_cast<float*>(base + w.proj);
    float* ml = reinterpret_cast<float*>(base + w.ml);
    float* accp = reinterpret_cast<float*>(base + w.acc);
    const detail::DecPlan plan = detail::dec_plan(a);
    const int G = a.n_q_heads / a.n_kv_heads;
    float* projq = reinterpret_cast<float*>(base + w.projq);
    auto* qrec = reinterpret_cast<std::uint32_t*>(base + w.qrec);

    int dev = 0, cc_major = 0;
    KVQ_CUDA_CHECK(cudaGetDevice(&dev));
    KVQ_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, dev));
    const bool pdl = a.pdl && cc_major >= 9;
    if (a.key_format == KeyFormat::Qjl) {
        QjlScoreArgs q;
        q.head_dim = a.head_dim;
        q.m = a.qjl_m;
        q.sketch_rows = a.qjl_m;
        q.sketch = a.sketch;
        q.n_q_heads = a.batch * a.n_q_heads;
        q.query = a.query;
        q.query_type = QueryType::F32;
        const dim3 pgrid(q.n_q_heads, (q.sketch_rows + 7) / 8);
        detail::qjl_project_kernel<<<pgrid, 256, a.head_dim * sizeof(float), stream>>>(
            q, proj, reinterpret_cast<float*>(base + w.qf), nullptr);
        KVQ_CUDA_CHECK_LAUNCH("qjl_project_kernel");
        // Every GPU path scores with the int8 bit-sliced query (qjl_query.cuh), as the CPU decode does.
        if (pdl)
            detail::qjl_launch_dependent(detail::qjl_quantize_query_kernel, dim3(q.n_q_heads),
                                         32 * ((a.qjl_m + 31) / 32), 0, stream, static_cast<const float*>(proj),
                                         a.qjl_m, qrec, projq, false);
        else
            detail::qjl_quantize_query_kernel<<<q.n_q_heads, 32 * ((a.qjl_m + 31) / 32), 0, stream>>>(
                proj, a.qjl_m, qrec, projq, false);
        KVQ_CUDA_CHECK_LAUNCH("qjl_quantize_query_kernel");
    }

    if (plan.tc) {
        const std::size_t tsmem = detail::tc_smem_bytes(a, G);
        const int stages = detail::tc_pick_stages(a);
        const dim3 tgrid(plan.n_main, a.n_kv_heads, a.batch);
        auto tlaunch = [&](auto kernel) {
            KVQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(tsmem)));
            // Only after our own quantisation: token-wise keys read the caller's query, which the
            // caller's previous launch may still be writing.
            if (pdl && a.key_format == KeyFormat::Qjl)
                detail::qjl_launch_dependent(kernel, tgrid, detail::kTcWarps * 32, tsmem, stream, a,
                                             static_cast<const std::uint32_t*>(qrec), plan.chunk, plan.n_parts, stages,
                                             ml, accp);
            else
                kernel<<<tgrid, detail::kTcWarps * 32, tsmem, stream>>>(a, qrec, plan.chunk, plan.n_parts, stages, ml,
                                                                        accp);
            KVQ_CUDA_CHECK_LAUNCH("decode_tc_kernel");
        };
        // Template arguments: head dim, value bits, G, key bits (0 = QJL).
        auto with_g = [&](auto d_c, auto vb_c, auto kb_c) {
            constexpr int Dc = decltype(d_c)::value, VBc = decltype(vb_c)::value, KBc = decltype(kb_c)::value;
            switch (G) {
                case 1: tlaunch(detail::decode_tc_kernel<Dc, VBc, 1, KBc>); break;
                case 2: tlaunch(detail::decode_tc_kernel<Dc, VBc, 2, KBc>); break;
                default: tlaunch(detail::decode_tc_kernel<Dc, VBc, 4, KBc>); break;
            }
        };
        auto with_vb = [&](auto d_c, auto kb_c) {
            switch (a.value_bits) {
                case 2: with_g(d_c, std::integral_constant<int, 2>{}, kb_c); break;
                case 4: with_g(d_c, std::integral_constant<int, 4>{}, kb_c); break;
                default: with_g(d_c, std::integral_constant<int, 8>{}, kb_c); break;
            }
        };
        auto with_kb = [&](auto d_c) {
            if (a.key_format == KeyFormat::Qjl) {
                with_vb(d_c, std::integral_constant<int, 0>{});
                return;
            }
            switch (a.key_bits) {
                case 2: with_vb(d_c, std::integral_constant<int, 2>{}); break;
                case 4: with_vb(d_c, std::integral_constant<int, 4>{}); break;
                default: with_vb(d_c, std::integral_constant<int, 8>{}); break;
            }
        };
        switch (a.head_dim) {
            case 64: with_kb(std::integral_constant<int, 64>{}); break;
            case 128: with_kb(std::integral_constant<int, 128>{}); break;
            default: with_kb(std::integral_constant<int, 256>{}); break;
        }
    }
    const int chunk = plan.tail_chunk, n_chunks = plan.n_tail;
    // tail 2: one tail chunk after the tensor-core kernel, which also merges (see decode_partial_kernel).
    const int part_offset = plan.tc ? plan.n_main : 0, tail = plan.tc ? (n_chunks == 1 ? 2 : 1) : 0;
    const float* tables = a.key_format == KeyFormat::Qjl ? projq : proj;

    const int gt = detail::dec_pick_gt(G);
    const std::size_t smem = detail::dec_smem_bytes(a, gt);
    const dim3 grid(n_chunks, a.n_kv_heads, a.batch);
    auto launch = [&](auto kernel, const char* name) {
        if (smem > 48 * 1024)
            KVQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
        if (pdl && tail == 2)  // waits for the tensor-core kernel before its merge
            detail::qjl_launch_dependent(kernel, grid, detail::kDecThreads, smem, stream, a, tables, chunk, ml, accp,
                                         part_offset, plan.n_parts, tail);
        else
            kernel<<<grid, detail::kDecThreads, smem, stream>>>(a, tables, chunk, ml, accp, part_offset, plan.n_parts,
                                                                tail);
        KVQ_CUDA_CHECK_LAUNCH(name);
    };
    // Dispatch over (GT, key format/bits, value bits).
    auto with_vbits = [&](auto gt_c, auto kf_c, auto kb_c) {
        constexpr int GTc = decltype(gt_c)::value;
        constexpr KeyFormat KFc = decltype(kf_c)::value;
        constexpr int KBc = decltype(kb_c)::value;
        // 16 channels per thread (half the per-position overhead) for up to 2 heads per pass.
        const bool wide = GTc <= 2 && a.value_group % 16 == 0;
        if constexpr (GTc <= 2) {
            if (wide) {
                switch (a.value_bits) {
                    case 2: launch(detail::decode_partial_kernel<GTc, KFc, KBc, 2, 16>, "decode_partial_kernel"); break;
                    case 4: launch(detail::decode_partial_kernel<GTc, KFc, KBc, 4, 16>, "decode_partial_kernel"); break;
                    default:
                        launch(detail::decode_partial_kernel<GTc, KFc, KBc, 8, 16>, "decode_partial_kernel");
                        break;
                }
                return;
            }
        }
        switch (a.value_bits) {
            case 2: launch(detail::decode_partial_kernel<GTc, KFc, KBc, 2, 8>, "decode_partial_kernel"); break;
            case 4: launch(detail::decode_partial_kernel<GTc, KFc, KBc, 4, 8>, "decode_partial_kernel"); break;
            default: launch(detail::decode_partial_kernel<GTc, KFc, KBc, 8, 8>, "decode_partial_kernel"); break;
        }
    };
    auto with_keys = [&](auto gt_c) {
        using KF = KeyFormat;
        if (a.key_format == KF::Qjl) {
            with_vbits(gt_c, std::integral_constant<KF, KF::Qjl>{}, std::integral_constant<int, 0>{});
        } else {
            switch (a.key_bits) {
                case 2:
                    with_vbits(gt_c, std::integral_constant<KF, KF::Tokenwise>{}, std::integral_constant<int, 2>{});
                    break;
                case 4:
                    with_vbits(gt_c, std::integral_constant<KF, KF::Tokenwise>{}, std::integral_constant<int, 4>{});
                    break;
                default:
                    with_vbits(gt_c, std::integral_constant<KF, KF::Tokenwise>{}, std::integral_constant<int, 8>{});
                    break;
            }
        }
    };
    switch (gt) {
        case 8: with_keys(std::integral_constant<int, 8>{}); break;
        case 4: with_keys(std::integral_constant<int, 4>{}); break;
        case 2: with_keys(std::integral_constant<int, 2>{}); break;
        default: with_keys(std::integral_constant<int, 1>{}); break;
    }

    if (tail == 2) return;
    detail::decode_combine_kernel<<<dim3(a.n_q_heads, a.batch), a.head_dim, 0, stream>>>(a, chunk, plan.n_parts, tail,
                                                                                         ml, accp);
    KVQ_CUDA_CHECK_LAUNCH("decode_combine_kernel");
}

}  // namespace kvq::cuda
