#pragma once
// Tensor-core fused decode attention for QJL keys (no outliers) or token-wise int 2/4/8 keys (plain
// or WKV-smoothed), with token-wise int 2/4/8 values. Included by decode_attention.cuh (it needs
// DecodeAttentionArgs); launch_decode_attention picks it when tc_supported() says the shape fits,
// and falls back to the CUDA-core kernel otherwise. One kernel body, decode_tc_kernel<D, VBITS, G,
// KBITS>: KBITS = 0 scores QJL keys, 2/4/8 token-wise keys; staging, softmax, values and the
// partial write are shared.
//
// Why: at 82 bytes per (position, head) (QJL m = 256 + int2 g32 values, d = 128) memory speed leaves
// ~5-25 warp instructions per position; the CUDA-core kernel spends ~65. Here both halves run on
// tensor cores and a position costs ~8:
//  * QJL scores: the int8 bit-sliced query (qjl_query.cuh) as the 8 columns of a BMMA (AND + popcount),
//    16 keys x 256 code bits per instruction, so the stored sign bits are the A operand unchanged.
//    est = ((cs * ||k||) * float(2T - usum)) / sqrt(d): the CPU's decode scorer (prepare_fast).
//  * Token-wise int scores: s = sum_grp step * (sum_{i in grp} q'_i c_i) + min * (sum_{i in grp} q'_i),
//    q' = q (.) k_scale (WKV; 1 without). The code sums on mma.m16n8k16: A = the codes of 16 positions
//    (rows) x 16 channels, two channels of one position per register taken out of one packed 32-bit
//    word by one AND (a code of each 16-bit half), i.e. fp16 subnormals c * 2^(sh - 24) (exact);
//    lane t's K indices are channels of its quarter [t d/4, (t+1) d/4) of the row. B = q' as fp16
//    hi + lo (2^-22 relative), built once per CTA: column (head, group) combination c & 3, hi for
//    c < 4, lo for c >= 4, zero outside the column's group; each entry is scaled by 2^(E - sh) (sh:
//    the code's shift, so the accumulator holds sum q' c * 2^(E - 24) for every channel alike; E per
//    (head, group) puts the group's largest |q'| near 2^13). A k-step of 16 channels touches at most
//    4 groups (one per lane quarter), so 4 combinations (G x groups per k-step <= 4) fill the 8
//    columns; with more than 4 groups (group < d/4) the k-steps of each group class (sub-group of
//    every quarter) accumulate separately and are folded into the scores with their fp32 steps and
//    minima from shared memory.
//  * Values: out^T[d] = V^T[d x 16 positions] * w[16] per step with mma.m16n8k16 (fp16 in, fp32
//    accumulate). A = the codes of 16 channels at 16 positions, each 2-code pair taken out of the
//    packed stream by one PRMT (pair two positions) and one AND (keep one code of each half), which
//    leaves an fp16 subnormal c * 2^(r - 24) (exact); the power 2^(r - 24) depends on the channel only
//    and is undone at the end. B = the weights w = p * step of the position for the channel's group,
//    as fp16 hi + lo (2^-22 relative) in separate columns: columns 0..3 = hi of (head, group)
//    combinations, 4..7 = lo. w is scaled by a per-column power of two 2^E (non-increasing over the
//    run) so that the tile's largest weight is near 2^14; acc is kept in those units.
//    The minimum term sum_p p * min is summed in fp32 on the side.
//  * Softmax: fp32 online softmax per warp (running max / sum), warps merged per CTA, chunks merged by
//    decode_combine_kernel exactly as on the CUDA-core path (which also un-smooths WKV values).
// Work split: grid (chunks, KV heads, batch), 4 warps per CTA; each warp takes 64-position tiles of the
// chunk in turn and stages them (key codes and side data, value codes, steps, minima) through its own
// 2-3 deep pipeline in shared memory: no CTA barrier inside the loop. Every lane issues 16-byte
// cp.async copies; with tc_bulk_staging (on by default), sm_90 and blocks of >= 64 tokens, a tile is
// 5 (QJL) or 6 (token-wise keys: codes, steps, minima) contiguous byte ranges of one key and one value
// block instead, staged by bulk copies from one lane that complete on the stage's mbarrier. Positions
// [0, E) with E = min(k_encoded, v_encoded, n_tokens) rounded down to 16 are done here; the rest (the
// last partial step, the fp32 windows, the exact current token) by the CUDA-core kernel in "tail"
// mode, into further partial slots.
//
// Lane roles (lane = 4 g + t): key rows = the 16 positions of a step (rows g, g + 8 of lane g);
// value K index k of a step holds position P(k): P(2t) = t, P(2t+1) = t + 4, P(2t+8) = t + 8,
// P(2t+9) = t + 12 (bank-conflict free code reads); value A rows: lane g owns channels
// [g d/8, (g+1) d/8), channel(g, h, j) = g d/8 + h d/16 + j for m-tile j and row half h (rows g / g + 8).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kvq/cuda/mma.cuh"
#include "kvq/cuda/qjl_query.cuh"
#include "kvq/cuda/timeline.cuh"

// The QJL kernel with G = 1 (decode_tc_kernel<D, VBITS, 1, 0>, kLean) has its own tile body, the same
// arithmetic as the general one (bit-identical outputs; measured 1.20x / 1.34x faster at 64k tokens,
// batch 1 / 8, bench/GPU_NOTES.md round 4; it was the opt-in KVQ_TC_LEAN before):
//  * the K steps (m / 256, last one partial) and, for m = 256 k, the key row stride are compile time
//    (a switch per tile), so a 16-position step issues ceil(m / 256) BMMA without predicates;
//  * the plane weights and the quad reduction of the popcounts run on one mma.m16n8k16 per two steps
//    (popcounts as exact fp16 c 2^-24, B = the weights 2 w_n in the column pair of the step), which
//    leaves lane (g, t) the exact 2T 2^-24 of positions 16t + g, 16t + g + 8:
//    no shuffles, and each lane scores 2 distinct positions instead of the quad's 8 shared ones;
//  * the softmax computes 2 exponentials per lane instead of 8 (the running sum keeps the general
//    order: the quad's values are gathered by 8 width-4 shuffles);
//  * the weights take their probabilities straight from the owning lanes, the value steps/minima are
//    read at compile-time offsets (value groups per head 1, 2 or 4: a switch per tile), and full tiles
//    have no per-step validity branches (partial tiles keep the general guards);
//  * the value mma of a step runs without a branch (steps past the tile's end have weights 0).
// Token-wise keys (KBITS > 0) and G > 1 take the general body.
#include <type_traits>

namespace kvq::cuda::detail {

inline constexpr int kTcWarps = 4;
inline constexpr int kTcTile = 64;  // positions per warp tile (4 steps of 16)

// Shared-memory bytes of one pipeline stage of one warp. kcb: key code bytes per position; kside: key
// side bytes per position (QJL: the fp16 norm; token-wise: fp16 steps [64][kng] then minima [64][kng]).
struct TcStage {
    int kc = 0, kn = 0, vc = 0, vs = 0, bytes = 0;  // offsets of keys' codes/side, values' codes/steps(+minima)
    __host__ __device__ static TcStage of(int kcb, int kside, int d, int vbits, int vng) {
        TcStage s;
        s.kc = 0;
        s.kn = kTcTile * kcb;
        s.vc = s.kn + kTcTile * kside;
        s.vs = s.vc + kTcTile * d * vbits / 8;
        s.bytes = s.vs + kTcTile * vng * 4;  // steps [64][vng] fp16 then minima [64][vng] fp16
        s.bytes = (s.bytes + 15) & ~15;
        return s;
    }
};
inline TcStage tc_stage(const DecodeAttentionArgs& a) {
    const int d = a.head_dim;
    const bool qjl = a.key_format == KeyFormat::Qjl;
    const int kcb = qjl ? a.qjl_m / 8 : d * a.key_bits / 8, kng = qjl ? 0 : d / a.key_group, vng = d / a.value_group;
    return TcStage::of(kcb, qjl ? 2 : 4 * kng, d, a.value_bits, vng);
}

__device__ __forceinline__ float tc_pow2(int e) {  // 2^e for e in [-126, 127]; 0 below
    return e < -126 ? 0.f : __int_as_float((127 + (e > 127 ? 127 : e)) << 23);
}
__device__ __forceinline__ float tc_exp(float x) {  // e^x, ex2.approx (2 ulp); exp(-inf) = 0
    return exp2f(x * 1.4426950408889634f);
}

// Lane's d/8 channels of the codes of two positions (x0, x1: CB bits each, as 32-bit words) to the
// A registers of the (h, j) rows: out[h][j] holds {code(P_lo), code(P_hi)} as fp16 subnormals.
template <int D, int BITS>
__device__ __forceinline__ void tc_expand_pair(const std::uint32_t* x0, const std::uint32_t* x1,
                                               std::uint32_t (&out)[2][D / 16]) {
    constexpr int CB = D * BITS / 8;  // bits per lane chunk (16 .. 256)
    constexpr int NH = CB / 16;       // 16-bit halves
    std::uint32_t z[NH], zs[NH];
#pragma unroll
    for (int e = 0; e < NH; ++e) {
        z[e] = (e % 2 == 0) ? tc::prmt_lo(x0[e / 2], x1[e / 2]) : tc::prmt_hi(x0[e / 2], x1[e / 2]);
        zs[e] = z[e] >> 8;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < D / 16; ++j) {
            const int o = (h * (D / 16) + j) * BITS, e = o / 16, r = o % 16, sh = r % 8;
            const std::uint32_t mk = ((1u << BITS) - 1u) << sh;
#if defined(KVQ_TC_NORMAL_A)
            // Variant without subnormal operands: 1024 + c 2^sh (exponent 10), minus 1024, exact.
            std::uint32_t raw = ((r < 8 ? z[e] : zs[e]) & (mk | (mk << 16))) | 0x64006400u;
            __half2 hv = *reinterpret_cast<__half2*>(&raw);
            const std::uint32_t bias_bits = 0x64006400u;
            hv = __hsub2(hv, *reinterpret_cast<const __half2*>(&bias_bits));
            out[h][j] = *reinterpret_cast<std::uint32_t*>(&hv);
#else
            out[h][j] = (r < 8 ? z[e] : zs[e]) & (mk | (mk << 16));
#endif
        }
}
// Scale of the A operand's unit: 2^-24 for subnormals (undone by 2^24 at the end), 1 otherwise.
#if defined(KVQ_TC_NORMAL_A)
inline constexpr float kTcUnitInv = 1.0f;
#else
inline constexpr float kTcUnitInv = 16777216.0f;
#endif
// Exponent r % 8 of the code's position inside its half (the subnormal carries c * 2^(sh - 24)).
template <int D, int BITS>
__host__ __device__ constexpr int tc_row_shift(int h, int j) {
    return (((h * (D / 16) + j) * BITS) % 16) % 8;
}

// One packed 32-bit word of a key row (32 / BITS codes, LSB first) to the A registers of 16 / BITS
// channel pairs: out[i] holds {code i, code i + 16/BITS} as fp16 subnormals c * 2^(sh - 24),
// sh = (i BITS) % 8 (tc_key_shift), both codes of one position (one A row).
template <int BITS>
__device__ __forceinline__ void tc_expand_key_word(std::uint32_t w, std::uint32_t (&out)[16 / BITS]) {
    const std::uint32_t ws = w >> 8;
#pragma unroll
    for (int i = 0; i < 16 / BITS; ++i) {
        const int o = i * BITS, sh = o % 8;
        const std::uint32_t mk = ((1u << BITS) - 1u) << sh;
#if defined(KVQ_TC_NORMAL_A)
        std::uint32_t raw = ((o < 8 ? w : ws) & (mk | (mk << 16))) | 0x64006400u;
        __half2 hv = *reinterpret_cast<__half2*>(&raw);
        const std::uint32_t bias_bits = 0x64006400u;
        hv = __hsub2(hv, *reinterpret_cast<const __half2*>(&bias_bits));
        out[i] = *reinterpret_cast<std::uint32_t*>(&hv);
#else
        out[i] = (o < 8 ? w : ws) & (mk | (mk << 16));
#endif
    }
}
// Bytes CK of a lane's quarter of a key row (CK / 4 words; 16-byte aligned when CK >= 16).
template <int CK>
__device__ __forceinline__ void tc_load_words(const std::uint8_t* p, std::uint32_t (&w)[CK / 4]) {
    if constexpr (CK == 4) {
        w[0] = *reinterpret_cast<const std::uint32_t*>(p);
    } else if constexpr (CK == 8) {
        const uint2 u = *reinterpret_cast<const uint2*>(p);
        w[0] = u.x;
        w[1] = u.y;
    } else {
#pragma unroll
        for (int q = 0; q < CK / 16; ++q) {
            const uint4 u = *reinterpret_cast<const uint4*>(p + 16 * q);
            w[4 * q] = u.x;
            w[4 * q + 1] = u.y;
            w[4 * q + 2] = u.z;
            w[4 * q + 3] = u.w;
        }
    }
}

// 3 CTAs per SM (<= 168 registers) where the registers allow it; token-wise keys hold d/8 more B
// registers, so only their G = 1, d <= 128 instantiations keep that bound (tc_min_ctas).
// KVQ_TC_QJL_MIN_CTAS: CTAs per SM of the QJL kernel for G = 1, d <= 128. 4 caps it at 128 registers
// (the lean tile body uses all 128 at d 128 with 2-bit values, no spills) and takes 2 pipeline stages
// so that 4 CTAs fit in shared memory: 16 warps per SM hide more of the mma/shuffle latency than a
// third stage does (the kernel is latency bound, not short of bytes in flight). H100, 64k tokens x 32
// heads, QJL + int2 (general tile body): 108.2 vs 150.6 us at batch 1, 784.9 vs 848.2 us at batch 8
// against 3 CTAs with 3 stages (bench/RESULTS.md, round 3). Define it as 3 to build the previous
// bound for A/B runs.
#ifndef KVQ_TC_QJL_MIN_CTAS
#define KVQ_TC_QJL_MIN_CTAS 4
#endif
template <int D, int G, int KBITS>
__host__ __device__ constexpr int tc_min_ctas() {
    return KBITS == 0 ? (G >= 4 ? 2 : (G == 1 && D <= 128 ? KVQ_TC_QJL_MIN_CTAS : 3)) : (G == 1 && D <= 128 ? 3 : 2);
}

// The QJL query records of the G query heads of KV head kv, sequence b (qjl_query.cuh): this lane's
// B fragments of the K steps (zero past m), the score scale c_in * s and usum.
template <int G>
__device__ __forceinline__ void tc_load_qrec(const std::uint32_t* qrec, int b, int Hq, int kv, int m, int g, int t,
                                             std::uint32_t (&bq)[G][4][2], float (&cs)[G], int (&usum)[G]) {
    const QjlQueryLayout QL = QjlQueryLayout::of(m);
    const int ksteps = (m + 255) / 256;
    const float c_in = static_cast<float>(1.2533141373155003 / m);
#pragma unroll
    for (int hh = 0; hh < G; ++hh) {
        const std::uint32_t* r = qrec + (std::size_t(b) * Hq + kv * G + hh) * QL.record_words();
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
            bq[hh][ks][0] = ks < ksteps ? __ldg(r + std::size_t(g) * QL.words + 8 * ks + 2 * t) : 0u;
            bq[hh][ks][1] = ks < ksteps ? __ldg(r + std::size_t(g) * QL.words + 8 * ks + 2 * t + 1) : 0u;
        }
        cs[hh] = c_in * __uint_as_float(__ldg(r + 8 * QL.words));
        usum[hh] = static_cast<int>(__ldg(r + 8 * QL.words + 1));
    }
}

template <int D, int VBITS, int G, int KBITS>
__global__ void __launch_bounds__(kTcWarps * 32, tc_min_ctas<D, G, KBITS>())
    decode_tc_kernel(DecodeAttentionArgs a, const std::uint32_t* qrec, int chunk, int n_parts, int n_stages,
                     float* part_ml, float* part_acc) {
    static_assert(KBITS == 0 || KBITS == 2 || KBITS == 4 || KBITS == 8, "KBITS: 0 (QJL) or 2/4/8 (token-wise)");
    constexpr bool kQjl = KBITS == 0;
    if (threadIdx.x == 0) {
        KVQ_TIMELINE_STAMP(0, KVQ_TIMELINE_SMID());
        KVQ_TIMELINE_STAMP(1, KVQ_TIMELINE_NOW());
    }
    extern __shared__ float4 tc_smem4[];
    std::uint8_t* smem = reinterpret_cast<std::uint8_t*>(tc_smem4);
    constexpr int MT = D / 16;           // value m-tiles
    constexpr int CB8 = D * VBITS / 64;  // bytes of a lane's channel chunk per position
    constexpr int CW = CB8 >= 4 ? CB8 / 4 : 1;
    // Token-wise keys: a lane's quarter of a key row is KCK bytes = KNW words of KRPW A registers; group
    // classes (see fold below) end every KWPM words at the earliest (groups >= 16 channels).
    constexpr int KCK = kQjl ? 4 : D * KBITS / 32, KNW = KCK / 4, KRPW = kQjl ? 2 : 16 / KBITS;
    constexpr int KMAXC = D / 64, KWPM = KNW / KMAXC > 0 ? KNW / KMAXC : 1;
    const int m = a.qjl_m, ksteps = (m + 255) / 256;
    const int kcb = kQjl ? m / 8 : D * KBITS / 8;
    const int kg = kQjl ? D : a.key_group, kng = D / kg;
    const int kspp = kQjl ? 2 : 2 * kng;  // key side bytes per position and side array (QJL: 1 array)
    const int vg = a.value_group, vng = D / vg, vcb = D * VBITS / 8;
    const int kv = blockIdx.y, b = blockIdx.z, c = blockIdx.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const TcStage st = TcStage::of(kcb, (kQjl ? 1 : 2) * kspp, D, VBITS, vng);
    std::uint8_t* wsm = smem + std::size_t(warp) * n_stages * st.bytes;
    std::uint8_t* const stages_end = smem + std::size_t(kTcWarps) * n_stages * st.bytes;
    float* red = reinterpret_cast<float*>(stages_end);  // [W][G][D]
    float* mred = red + kTcWarps * G * D;               // [W][G][4]
    float* mls = mred + kTcWarps * G * 4;               // [W][G][2]
    // [W][n_stages] stage barriers of the bulk-copy staging (8-byte aligned: everything before it is
    // a multiple of 8 bytes).
    std::uint64_t* mbar0 = reinterpret_cast<std::uint64_t*>(mls + kTcWarps * G * 2);
    std::uint64_t* mbar = mbar0 + warp * n_stages;
    // Token-wise keys: [G][kng] per-group query sums (the minimum term), then [G][kng] the factors that
    // take a group's accumulator back to sum q' c (2^-E and the A operand's unit).
    float* ktab = reinterpret_cast<float*>(mbar0 + kTcWarps * n_stages);

    const int n_tok = __ldg(a.n_tokens + b), k_enc = __ldg(a.k_encoded + b), v_enc = __ldg(a.v_encoded + b);
    const int E = min(n_tok, min(k_enc, v_enc)) & ~15;
    const int c_begin = c * chunk, c_end = min(E, c_begin + chunk);
    const int len = c_end > c_begin ? c_end - c_begin : 0;
    const int n_tiles = (len + kTcTile - 1) / kTcTile;
    const int Hq = a.n_q_heads;
    const std::uint32_t* kpages = a.key_pages + (std::size_t(b) * a.n_kv_heads + kv) * a.page_stride;
    const std::uint32_t* vpages = a.value_pages + (std::size_t(b) * a.n_kv_heads + kv) * a.page_stride;
    const int KB = static_cast<int>(a.key_layout.block_tokens), VB = static_cast<int>(a.value_layout.block_tokens);
    const int ksh = __ffs(KB) - 1, vsh = __ffs(VB) - 1;
    const std::size_t kside = a.key_layout.token_side_offset(), vside = a.value_layout.token_side_offset();
    // Blocks of >= 64 tokens hold a whole tile (tiles start at multiples of 64: chunks are multiples
    // of 256), so its key codes, key side arrays, value codes, steps and minima are contiguous byte
    // ranges, each staged by one bulk copy from lane 0 (sm_90). Smaller blocks: per-lane 16-byte cp.async.
#if defined(KVQ_TC_HAS_BULK_COPY)
    const bool bulk = a.tc_bulk_staging && KB >= kTcTile && VB >= kTcTile;
    if (bulk) {
        if (lane == 0) {
            for (int i = 0; i < n_stages; ++i) tc::mbar_init(mbar + i, 1);
            tc::fence_mbar_init();
        }
        __syncwarp();
    }
#else
    constexpr bool bulk = false;
    (void)mbar;
#endif

    // The first tiles are issued before the per-CTA query setup below (records, the token-wise B
    // fragments with their barriers) and, as a programmatic dependent, before the wait for the records,
    // so the copies overlap both. (It did not move the first tile's arrival: at batch 1 the grid asks
    // for ~27 MB at once, ~9 us at copy speed either way; bench_gpu_decode --timeline.)
    // Tile k of this warp: positions [c_begin + (warp + k W) 64, ...).
    const int my_tiles = n_tiles > warp ? (n_tiles - warp + kTcWarps - 1) / kTcWarps : 0;
    auto tile_pos = [&](int k) { return c_begin + (warp + k * kTcWarps) * kTcTile; };
    // Page ids of tile k: lane sp (< 4) holds the key block of step sp, lane 4 + sp the value block.
    // Loaded one iteration before their tile is issued, so the cp.async issue never waits on them.
    auto load_pages = [&](int k) -> std::uint32_t {
        if (k >= my_tiles || lane >= 8) return 0u;
        const int p = tile_pos(k) + 16 * (lane & 3);
        if (p >= c_end) return 0u;
        return lane < 4 ? __ldg(kpages + (p >> ksh)) : __ldg(vpages + (p >> vsh));
    };
    // Stage of tile k = k % n_stages, kept as running counters (no integer division in the loop).
    auto issue = [&](int k, std::uint32_t pg, int stage) {
#if defined(KVQ_TC_HAS_BULK_COPY)
        if (bulk) {
            const std::uint32_t kpg = __shfl_sync(0xffffffffu, pg, 0), vpg = __shfl_sync(0xffffffffu, pg, 4);
            if (k < my_tiles && lane == 0) {
                std::uint8_t* s = wsm + std::size_t(stage) * st.bytes;
                const int p0 = tile_pos(k), np = 16 * min(4, (c_end - p0) / 16);
                const std::uint8_t* kb = a.key_pool + std::size_t(kpg) * a.key_block_bytes;
                const std::uint8_t* vb = a.value_pool + std::size_t(vpg) * a.value_block_bytes;
                const int tk = p0 & (KB - 1), tv = p0 & (VB - 1);
                const unsigned kbytes = np * kcb, nbytes = np * kspp, vbytes = np * vcb, sbytes = np * vng * 2;
                std::uint64_t* bar = mbar + stage;
                tc::fence_proxy_async_smem();  // the warp's reads of this stage (synced) come first
                tc::mbar_arrive_expect_tx(bar, kbytes + (kQjl ? 1 : 2) * nbytes + vbytes + 2 * sbytes);
                tc::bulk_g2s(s + st.kc, kb + std::size_t(tk) * kcb, kbytes, bar);
                tc::bulk_g2s(s + st.kn, kb + kside + std::size_t(tk) * kspp, nbytes, bar);
                if constexpr (!kQjl)  // key minima
                    tc::bulk_g2s(s + st.kn + kTcTile * kspp, kb + kside + std::size_t(KB + tk) * kspp, nbytes, bar);
                tc::bulk_g2s(s + st.vc, vb + std::size_t(tv) * vcb, vbytes, bar);
                tc::bulk_g2s(s + st.vs, vb + vside + std::size_t(tv) * vng * 2, sbytes, bar);
                tc::bulk_g2s(s + st.vs + kTcTile * vng * 2, vb + vside + std::size_t(VB + tv) * vng * 2, sbytes, bar);
            }
            return;
        }
#endif
        if (k < my_tiles) {
            std::uint8_t* s = wsm + std::size_t(stage) * st.bytes;
            const int p0 = tile_pos(k), ns = min(4, (c_end - p0) / 16);
#pragma unroll
            for (int sp = 0; sp < 4; ++sp) {
                const std::uint32_t kpg = __shfl_sync(0xffffffffu, pg, sp), vpg = __shfl_sync(0xffffffffu, pg, 4 + sp);
                if (sp >= ns) continue;
                const int p = p0 + 16 * sp;
                const std::uint8_t* kb = a.key_pool + std::size_t(kpg) * a.key_block_bytes;
                const std::uint8_t* vb = a.value_pool + std::size_t(vpg) * a.value_block_bytes;
                const int tk = p & (KB - 1), tv = p & (VB - 1);
                for (int q = lane; q < kcb; q += 32)
                    tc::cp_async16(s + st.kc + sp * 16 * kcb + 16 * q, kb + std::size_t(tk) * kcb + 16 * q);
                if constexpr (kQjl) {
                    if (lane < 2)
                        tc::cp_async16(s + st.kn + sp * 32 + 16 * lane, kb + kside + std::size_t(tk) * 2 + 16 * lane);
                } else {  // steps then minima: 16 positions x kng fp16 = kspp 16-byte chunks each
                    for (int q = lane; q < 2 * kspp; q += 32) {
                        const int half = q >= kspp, qq = half ? q - kspp : q;
                        tc::cp_async16(s + st.kn + half * kTcTile * kspp + sp * 16 * kspp + 16 * qq,
                                       kb + kside + std::size_t(half) * KB * kspp + std::size_t(tk) * kspp + 16 * qq);
                    }
                }
                for (int q = lane; q < vcb; q += 32)
                    tc::cp_async16(s + st.vc + sp * 16 * vcb + 16 * q, vb + std::size_t(tv) * vcb + 16 * q);
                if (lane < 4 * vng) {  // steps then minima: 16 positions x vng fp16 = 2 vng chunks each
                    const int half = lane / (2 * vng), q = lane % (2 * vng);
                    tc::cp_async16(s + st.vs + half * kTcTile * vng * 2 + sp * 32 * vng + 16 * q,
                                   vb + vside + std::size_t(half) * VB * vng * 2 + std::size_t(tv) * vng * 2 + 16 * q);
                }
            }
        }
        tc::cp_async_commit();
    };
    for (int k = 0; k < n_stages - 1; ++k) issue(k, load_pages(k), k);
    std::uint32_t pg_next = load_pages(n_stages - 1);
    // QJL keys with DecodeAttentionArgs::pdl: launched as a programmatic dependent of the query
    // quantisation; the records are read below, after the wait. The tail launch after this kernel may
    // then start (it waits for this grid before it merges). Both are no-ops in a plain launch.
    qjl_pdl_wait();
    qjl_pdl_launch_dependents();

    // QJL: query planes of the G heads (B operands of the BMMA), the scale and usum.
    std::uint32_t bq[kQjl ? G : 1][4][2];
    float cs[G];
    int usum[G];
    if constexpr (kQjl) tc_load_qrec<G>(qrec, b, Hq, kv, m, g, t, bq, cs, usum);
    const int wt0 = 2 * t < 7 ? (1 << (2 * t)) : -128, wt1 = 2 * t + 1 < 7 ? (1 << (2 * t + 1)) : -128;
    const float scale = 1.0f / sqrtf(static_cast<float>(D));

    constexpr bool kLean = kQjl && G == 1;
    // B of the reduction mma (k = 8 planes of step 2q, then 8 of step 2q + 1; column n = 2 sp + e holds
    // step sp): this lane's column g carries the weights 2 w of planes 2t, 2t + 1 in the half of its step.
    std::uint32_t lred[2][2];
    {
        const std::uint32_t wb = tc::pack_half2(2.0f * static_cast<float>(wt0), 2.0f * static_cast<float>(wt1));
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            lred[q][0] = (g >> 1) == 2 * q ? wb : 0u;
            lred[q][1] = (g >> 1) == 2 * q + 1 ? wb : 0u;
        }
    }
    float lusum = 0.f;  // usum as float, exact (|usum| <= 127 m)
    if constexpr (kQjl) lusum = static_cast<float>(usum[0]);
    const int lk_off = st.kc + g * kcb + 8 * t;    // key row g of step 0, this lane's 8 bytes
    const int lkn_off = st.kn + 2 * (16 * t + g);  // norm of position 16t + g

    // Token-wise keys: combinations (head, group of the k-step) = column & 3; a k-step holds kps groups
    // (one per lane quarter, or the 1-2 groups that span them), and with kng > 4 the quarter's
    // sub-groups form ncls classes that the k-steps go through in order.
    const int kps = kng < 4 ? kng : 4, ncls = kng > 4 ? kng / 4 : 1;
    std::uint32_t bk[kQjl ? 1 : D / 8];  // B fragments: register j = operand b[j % 2] of k-step j / 2
    // D columns 2t + e of this lane: valid, head, first group (class 0), ktab index of that group.
    bool kval[2] = {false, false};
    int khd[2] = {0, 0}, kgrp[2] = {0, 0}, ktix[2] = {0, 0};
    const bool khi = t < 2;             // columns 0..3: hi parts (they also take the minimum term)
    int kcls_mask = 0, kcls_shift = 0;  // class boundary every (KMAXC / ncls) word groups of KWPM words
    if constexpr (!kQjl) {
        for (int x = KMAXC / ncls; x > 1; x >>= 1) ++kcls_shift;
        kcls_mask = (1 << kcls_shift) - 1;
        // kg, ncls and kps are powers of two (kg divides d).
        const int kg_log = __ffs(kg) - 1, ncls_log = __ffs(ncls) - 1, kps_log = __ffs(kps) - 1;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int cmb = (2 * t + e) & 3;
            kval[e] = cmb < G * kps;
            khd[e] = kval[e] ? cmb >> kps_log : 0;
            kgrp[e] = kval[e] ? (cmb & (kps - 1)) * ncls : 0;
            ktix[e] = khd[e] * kng + kgrp[e];
        }
        // Once per CTA: q' = q (.) k_scale (the CUDA-core kernel's product), per-group sums and scale
        // exponents, then every lane's B fragments. red is free until the warps' merge at the end.
        float* qp = red;                                // [G][D]
        int* qe = reinterpret_cast<int*>(red + G * D);  // [G][kng]
        for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
            const int hh = i / D, ch = i % D;
            float v = __ldg(a.query + (std::size_t(b) * Hq + kv * G + hh) * D + ch);
            if (a.k_scale != nullptr) v *= __ldg(a.k_scale + std::size_t(kv) * D + ch);
            qp[i] = v;
        }
        __syncthreads();
        for (int i = warp; i < G * kng; i += kTcWarps) {  // a warp per (head, group): channels [i kg, (i+1) kg)
            float sum = 0.f, mx = 0.f;
            for (int j = lane; j < kg; j += 32) {
                const float v = qp[i * kg + j];
                sum += v;
                mx = fmaxf(mx, fabsf(v));
            }
#pragma unroll
            for (int o = 16; o > 0; o /= 2) {
                sum += __shfl_xor_sync(0xffffffffu, sum, o);
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            }
            // max |q'| 2^E in [2^13, 2^14): the hi parts stay below fp16's 65504 for every shift.
            const int eb = static_cast<int>(__float_as_uint(mx) >> 23);
            const int ex = eb == 0 ? 0 : max(-100, min(126, 140 - eb));
            if (lane == 0) {
                qe[i] = ex;
                ktab[i] = sum;
                ktab[G * kng + i] = tc_pow2(-ex) * kTcUnitInv;
            }
        }
        __syncthreads();
        const int cmb_b = g & 3;
        const bool val_b = cmb_b < G * kps, lo_b = g >= 4;
        const int hd_b = val_b ? cmb_b >> kps_log : 0, qi_b = val_b ? cmb_b & (kps - 1) : 0;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            const int u = j / KRPW, i = j % KRPW, sh = (i * KBITS) % 8;
            float xv[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int ch = t * (D / 4) + u * (32 / KBITS) + i + h * KRPW, grp = ch >> kg_log;
                xv[h] =
                    (val_b && (grp >> ncls_log) == qi_b) ? qp[hd_b * D + ch] * tc_pow2(qe[hd_b * kng + grp] - sh) : 0.f;
            }
            std::uint32_t hv = tc::pack_half2(xv[0], xv[1]);
            if (lo_b) hv = tc::pack_half2(xv[0] - tc::half_lo_to_float(hv), xv[1] - tc::half_hi_to_float(hv));
            bk[j] = hv;
        }
        __syncthreads();  // qp and qe (in red) are read; the warps may now reach the merge
    }

    // Value column roles. B column g: combination (head, group) = g & 3, hi (g < 4) or lo part.
    const int ncombo = G * vng;
    const int combo_b = g & 3;
    const bool valid_b = combo_b < ncombo, lo_b = g >= 4;
    const int head_b = valid_b ? combo_b / vng : 0, grp_b = valid_b ? combo_b % vng : 0;
    // D columns 2t, 2t+1 of this lane; rows of this lane are channels of group grp_row.
    const int grp_row = g * (D / 8) / vg;
    int head_d[2];
    bool use_d[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int col = 2 * t + e, cmb = col & 3;
        use_d[e] = cmb < ncombo && cmb % vng == grp_row;
        head_d[e] = cmb < ncombo ? cmb / vng : 0;
    }

    float m_run[G], l_run[G];
#pragma unroll
    for (int hh = 0; hh < G; ++hh) {
        m_run[hh] = -INFINITY;
        l_run[hh] = 0.f;
    }
    float acc[MT][4];
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[j][r] = 0.f;
    float macc = 0.f;
    int e_b = 120, e_d[2] = {120, 120};  // per-column weight exponents (non-increasing)

    int rd_stage = 0, wr_stage = n_stages - 1;  // stages of tiles k and k + n_stages - 1
    unsigned rd_parity = 0;                     // (k / n_stages) & 1: phase of tile k's stage barrier

    for (int k = 0; k < my_tiles; ++k) {
        bool staged = false;
#if defined(KVQ_TC_HAS_BULK_COPY)
        if (bulk) {
            tc::mbar_wait(mbar + rd_stage, rd_parity);
            staged = true;
        }
#endif
        if (!staged) {
            if (n_stages == 3)
                tc::cp_async_wait<1>();
            else
                tc::cp_async_wait<0>();
        }
        __syncwarp();
        if (k == 0 && lane == 0) KVQ_TIMELINE_STAMP(2 + warp, KVQ_TIMELINE_NOW());
        issue(k + n_stages - 1, pg_next, wr_stage);
        pg_next = load_pages(k + n_stages);
        const std::uint8_t* s = wsm + std::size_t(rd_stage) * st.bytes;
        wr_stage = rd_stage;  // tile k + n_stages goes where tile k is now
        if (++rd_stage == n_stages) {
            rd_stage = 0;
            rd_parity ^= 1u;
        }
        const int ns = min(4, (c_end - tile_pos(k)) / 16);

        // 1. Scores of the tile's positions (rows g, g + 8 of each step), all heads.
        float sc[4][2][G];
        float corr[G];
        float lp0 = 0.f, lp1 = 0.f;  // lean: probabilities of positions 16t + g, 16t + g + 8
        if constexpr (kLean) {
            // 1'. Popcounts of steps 2q, 2q + 1 -> one mma: dsc = 2T 2^-24 of step t (exact: integers below 2^19
            // in units of 2^-24). Steps >= ns read stale (finite) codes; their scores become -inf.
            float dsc[4] = {0.f, 0.f, 0.f, 0.f};
            const std::uint8_t* kr = s + lk_off;
            auto bits = [&](auto ksc, auto kcbc) {
                constexpr int KS = decltype(ksc)::value, KCB = decltype(kcbc)::value;
                const int rs = KCB > 0 ? KCB : kcb;
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    int cc[2][4];
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        cc[h][0] = cc[h][1] = cc[h][2] = cc[h][3] = 0;
#pragma unroll
                        for (int ks = 0; ks < KS; ++ks) {
                            // Word loads straight into the operand order (an 8-byte load per row needs moves).
                            const std::uint32_t* r0 =
                                reinterpret_cast<const std::uint32_t*>(kr + (16 * (2 * q + h)) * rs + 32 * ks);
                            const std::uint32_t av[4] = {r0[0], r0[2 * rs], r0[1], r0[2 * rs + 1]};
                            tc::bmma_m16n8k256_popc(cc[h], av, bq[0][ks]);
                        }
                    }
                    const std::uint32_t af[4] = {
                        tc::prmt_lo(static_cast<std::uint32_t>(cc[0][0]), static_cast<std::uint32_t>(cc[0][1])),
                        tc::prmt_lo(static_cast<std::uint32_t>(cc[0][2]), static_cast<std::uint32_t>(cc[0][3])),
                        tc::prmt_lo(static_cast<std::uint32_t>(cc[1][0]), static_cast<std::uint32_t>(cc[1][1])),
                        tc::prmt_lo(static_cast<std::uint32_t>(cc[1][2]), static_cast<std::uint32_t>(cc[1][3]))};
                    tc::mma_m16n8k16_f16(dsc, af, lred[q]);
                }
            };
            using std::integral_constant;
            switch (m) {
                case 256: bits(integral_constant<int, 1>{}, integral_constant<int, 32>{}); break;
                case 512: bits(integral_constant<int, 2>{}, integral_constant<int, 64>{}); break;
                case 768: bits(integral_constant<int, 3>{}, integral_constant<int, 96>{}); break;
                case 1024: bits(integral_constant<int, 4>{}, integral_constant<int, 128>{}); break;
                default:
                    if (ksteps == 1)
                        bits(integral_constant<int, 1>{}, integral_constant<int, 0>{});
                    else if (ksteps == 2)
                        bits(integral_constant<int, 2>{}, integral_constant<int, 0>{});
                    else if (ksteps == 3)
                        bits(integral_constant<int, 3>{}, integral_constant<int, 0>{});
                    else
                        bits(integral_constant<int, 4>{}, integral_constant<int, 0>{});
            }
            const unsigned short* knl = reinterpret_cast<const unsigned short*>(s + lkn_off);
            const float n0 = __half2float(__ushort_as_half(knl[0]));
            const float n1 = __half2float(__ushort_as_half(knl[8]));
            // fmaf(dsc, 2^24, -usum) = float(2T - usum) exactly (integers below 2^20).
            float s0 = ((cs[0] * n0) * fmaf(dsc[0], 16777216.0f, -lusum)) * scale;
            float s1 = ((cs[0] * n1) * fmaf(dsc[2], 16777216.0f, -lusum)) * scale;
            if (t >= ns) s0 = s1 = -INFINITY;
            // 2'. Online softmax over the warp's 64 distinct scores.
            float mx = fmaxf(s0, s1);
#pragma unroll
            for (int o = 1; o < 32; o *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            const float m_new = fmaxf(m_run[0], mx);
            corr[0] = tc_exp(m_run[0] - m_new);
            lp0 = tc_exp(s0 - m_new);
            lp1 = tc_exp(s1 - m_new);
            // The default's order: row g's 8 values of the quad in step order, then over g.
            float sum = 0.f;
#pragma unroll
            for (int sp = 0; sp < 4; ++sp) {
                sum += __shfl_sync(0xffffffffu, lp0, sp, 4);
                sum += __shfl_sync(0xffffffffu, lp1, sp, 4);
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 4);
            sum += __shfl_xor_sync(0xffffffffu, sum, 8);
            sum += __shfl_xor_sync(0xffffffffu, sum, 16);
            l_run[0] = l_run[0] * corr[0] + sum;
            m_run[0] = m_new;
        } else if constexpr (kQjl) {
#pragma unroll
            for (int sp = 0; sp < 4; ++sp) {
                if (sp < ns) {
                    int cc[G][4];
#pragma unroll
                    for (int hh = 0; hh < G; ++hh) cc[hh][0] = cc[hh][1] = cc[hh][2] = cc[hh][3] = 0;
#pragma unroll
                    for (int ks = 0; ks < 4; ++ks) {
                        if (ks < ksteps) {
                            const std::uint8_t* r0 = s + st.kc + (16 * sp + g) * kcb + 32 * ks + 8 * t;
                            const uint2 lo = *reinterpret_cast<const uint2*>(r0);
                            const uint2 hi = *reinterpret_cast<const uint2*>(r0 + 8 * kcb);
                            const std::uint32_t av[4] = {lo.x, hi.x, lo.y, hi.y};
#pragma unroll
                            for (int hh = 0; hh < G; ++hh) tc::bmma_m16n8k256_popc(cc[hh], av, bq[hh][ks]);
                        }
                    }
                    const unsigned short* kn = reinterpret_cast<const unsigned short*>(s + st.kn);
                    const float n0 = __half2float(__ushort_as_half(kn[16 * sp + g]));
                    const float n1 = __half2float(__ushort_as_half(kn[16 * sp + g + 8]));
#pragma unroll
                    for (int hh = 0; hh < G; ++hh) {
                        int t0 = cc[hh][0] * wt0 + cc[hh][1] * wt1, t1 = cc[hh][2] * wt0 + cc[hh][3] * wt1;
                        t0 += __shfl_xor_sync(0xffffffffu, t0, 1);
                        t1 += __shfl_xor_sync(0xffffffffu, t1, 1);
                        t0 += __shfl_xor_sync(0xffffffffu, t0, 2);
                        t1 += __shfl_xor_sync(0xffffffffu, t1, 2);
                        sc[sp][0][hh] = ((cs[hh] * n0) * static_cast<float>(2 * t0 - usum[hh])) * scale;
                        sc[sp][1][hh] = ((cs[hh] * n1) * static_cast<float>(2 * t1 - usum[hh])) * scale;
                    }
                } else {
#pragma unroll
                    for (int hh = 0; hh < G; ++hh) sc[sp][0][hh] = sc[sp][1][hh] = -INFINITY;
                }
            }
        } else {
            const unsigned short* kst = reinterpret_cast<const unsigned short*>(s + st.kn);  // [64][kng]
            const unsigned short* kmn = kst + kTcTile * kng;
            // All 4 steps without a branch, so that the scheduler can interleave their mma chains (two
            // accumulators per step, even and odd k-steps, halve each chain); the stale stage data of
            // steps >= ns only give scores that are replaced by -inf.
#pragma unroll
            for (int sp = 0; sp < 4; ++sp) {
                std::uint32_t w0[KNW], w1[KNW];
                tc_load_words<KCK>(s + st.kc + (16 * sp + g) * kcb + t * KCK, w0);
                tc_load_words<KCK>(s + st.kc + (16 * sp + g + 8) * kcb + t * KCK, w1);
                float kacc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
                float pe[2][2] = {{0.f, 0.f}, {0.f, 0.f}};  // [column e][row]: partial scores
#pragma unroll
                for (int u = 0; u < KNW; ++u) {
                    std::uint32_t xa[KRPW], ya[KRPW];
                    tc_expand_key_word<KBITS>(w0[u], xa);
                    tc_expand_key_word<KBITS>(w1[u], ya);
#pragma unroll
                    for (int kk = 0; kk < KRPW / 2; ++kk) {
                        const std::uint32_t af[4] = {xa[2 * kk], ya[2 * kk], xa[2 * kk + 1], ya[2 * kk + 1]};
                        const std::uint32_t bf[2] = {bk[u * KRPW + 2 * kk], bk[u * KRPW + 2 * kk + 1]};
                        tc::mma_m16n8k16_f16(kacc[(u * (KRPW / 2) + kk) & 1], af, bf);
                    }
                    // End of a group class: acc * step * 2^-E (+ min * sum q' on the hi columns).
                    if ((u + 1) % KWPM == 0) {
                        const int cpos = (u + 1) / KWPM;  // 1..KMAXC (compile time after unrolling)
                        if (KMAXC == 1 || (cpos & kcls_mask) == 0) {
                            const int sg = (cpos >> kcls_shift) - 1;
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                const int p0 = (16 * sp + g) * kng + kgrp[e] + sg, p1 = p0 + 8 * kng;
                                const float us = kval[e] ? ktab[G * kng + ktix[e] + sg] : 0.f;
                                const float qs = kval[e] && khi ? ktab[ktix[e] + sg] : 0.f;
                                const float d0 = kacc[0][e] + kacc[1][e], d1 = kacc[0][2 + e] + kacc[1][2 + e];
                                pe[e][0] = fmaf(__half2float(__ushort_as_half(kst[p0])) * us, d0, pe[e][0]);
                                pe[e][1] = fmaf(__half2float(__ushort_as_half(kst[p1])) * us, d1, pe[e][1]);
                                pe[e][0] = fmaf(__half2float(__ushort_as_half(kmn[p0])), qs, pe[e][0]);
                                pe[e][1] = fmaf(__half2float(__ushort_as_half(kmn[p1])), qs, pe[e][1]);
                            }
#pragma unroll
                            for (int r = 0; r < 4; ++r) kacc[0][r] = kacc[1][r] = 0.f;
                        }
                    }
                }
                // Per head: this lane's columns of that head, then the quad (hi + lo, all groups).
#pragma unroll
                for (int hh = 0; hh < G; ++hh) {
                    float v0 = (G == 1 || khd[0] == hh ? pe[0][0] : 0.f) + (G == 1 || khd[1] == hh ? pe[1][0] : 0.f);
                    float v1 = (G == 1 || khd[0] == hh ? pe[0][1] : 0.f) + (G == 1 || khd[1] == hh ? pe[1][1] : 0.f);
                    v0 += __shfl_xor_sync(0xffffffffu, v0, 1);
                    v1 += __shfl_xor_sync(0xffffffffu, v1, 1);
                    v0 += __shfl_xor_sync(0xffffffffu, v0, 2);
                    v1 += __shfl_xor_sync(0xffffffffu, v1, 2);
                    sc[sp][0][hh] = sp < ns ? v0 * scale : -INFINITY;
                    sc[sp][1][hh] = sp < ns ? v1 * scale : -INFINITY;
                }
            }
        }
        // 2. Online softmax per head (quads hold identical copies; reduce over g: xor 4, 8, 16).
#pragma unroll
        for (int hh = 0; hh < (kLean ? 0 : G); ++hh) {  // lean: done in 2'
            float mx = -INFINITY;
#pragma unroll
            for (int sp = 0; sp < 4; ++sp) mx = fmaxf(mx, fmaxf(sc[sp][0][hh], sc[sp][1][hh]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
            const float m_new = fmaxf(m_run[hh], mx);
            corr[hh] = tc_exp(m_run[hh] - m_new);
            float sum = 0.f;
#pragma unroll
            for (int sp = 0; sp < 4; ++sp)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    sc[sp][r][hh] = tc_exp(sc[sp][r][hh] - m_new);
                    sum += sc[sp][r][hh];
                }
            sum += __shfl_xor_sync(0xffffffffu, sum, 4);
            sum += __shfl_xor_sync(0xffffffffu, sum, 8);
            sum += __shfl_xor_sync(0xffffffffu, sum, 16);
            l_run[hh] = l_run[hh] * corr[hh] + sum;
            m_run[hh] = m_new;
        }
        // 3. Weights w = p * step for this lane's B column at positions P(2t), P(2t+1), P(2t+8), P(2t+9).
        const unsigned short* vst = reinterpret_cast<const unsigned short*>(s + st.vs);
        const unsigned short* vmn = vst + kTcTile * vng;
        float w[4][4];
        float wmax = 0.f, msum = 0.f;
        if constexpr (kLean) {
            // 3'. Probabilities from the owning lanes (position t + 4 kq of step sp: lane 4 (t + 4 (kq & 1)) + sp,
            // lp0 / lp1 for kq < 2 / >= 2), steps and minima at compile-time offsets. Same products and
            // order as the general body; the guards only in partial tiles. In full tiles columns without a
            // (head, group) read group 0 (finite; their accumulators are never used).
            auto wts = [&](auto vngc, auto fullc) {
                constexpr int VNG = decltype(vngc)::value;
                constexpr bool FULL = decltype(fullc)::value;
                const unsigned short* vl = vst + (t * VNG + grp_b);
#pragma unroll
                for (int sp = 0; sp < 4; ++sp) {
                    const float pq[4] = {
                        __shfl_sync(0xffffffffu, lp0, 4 * t + sp), __shfl_sync(0xffffffffu, lp0, 4 * t + 16 + sp),
                        __shfl_sync(0xffffffffu, lp1, 4 * t + sp), __shfl_sync(0xffffffffu, lp1, 4 * t + 16 + sp)};
#pragma unroll
                    for (int kq = 0; kq < 4; ++kq) {
                        const int pos = 16 * sp + 4 * kq;  // + t (in vl)
                        float stp = 0.f, mnv = 0.f;
                        if (FULL || (valid_b && sp < ns)) {
                            stp = __half2float(__ushort_as_half(vl[pos * VNG]));
                            mnv = __half2float(__ushort_as_half(vl[(kTcTile + pos) * VNG]));
                        }
                        w[sp][kq] = pq[kq] * stp;
                        msum = fmaf(pq[kq], mnv, msum);
                        wmax = fmaxf(wmax, w[sp][kq]);
                    }
                }
            };
            using std::integral_constant;
            // tc_supported: G vng <= 4 and vng = d / value_group with value_group | d: vng is 1, 2 or 4.
            auto by_groups = [&](auto full) {
                if (vng == 4)
                    wts(integral_constant<int, 4>{}, full);
                else if (vng == 2)
                    wts(integral_constant<int, 2>{}, full);
                else
                    wts(integral_constant<int, 1>{}, full);
            };
            if (ns == 4)
                by_groups(std::true_type{});
            else
                by_groups(std::false_type{});
        }
#pragma unroll
        for (int sp = 0; sp < (kLean ? 0 : 4); ++sp) {  // lean: done in 3'
            float pq[4];
#pragma unroll
            for (int hh = 0; hh < G; ++hh) {
                const float q0 = __shfl_sync(0xffffffffu, sc[sp][0][hh], 4 * t);
                const float q1 = __shfl_sync(0xffffffffu, sc[sp][0][hh], 4 * t + 16);
                const float q2 = __shfl_sync(0xffffffffu, sc[sp][1][hh], 4 * t);
                const float q3 = __shfl_sync(0xffffffffu, sc[sp][1][hh], 4 * t + 16);
                if (hh == head_b || G == 1) {
                    pq[0] = q0;
                    pq[1] = q1;
                    pq[2] = q2;
                    pq[3] = q3;
                }
            }
#pragma unroll
            for (int kq = 0; kq < 4; ++kq) {
                const int pos = 16 * sp + t + 4 * kq;
                float stp = 0.f, mnv = 0.f;
                if (valid_b && sp < ns) {
                    stp = __half2float(__ushort_as_half(vst[pos * vng + grp_b]));
                    mnv = __half2float(__ushort_as_half(vmn[pos * vng + grp_b]));
                }
                w[sp][kq] = pq[kq] * stp;
                msum = fmaf(pq[kq], mnv, msum);
                wmax = fmaxf(wmax, w[sp][kq]);
            }
        }
        macc = macc * corr[head_b] + msum;
        wmax = fmaxf(wmax, __shfl_xor_sync(0xffffffffu, wmax, 1));
        wmax = fmaxf(wmax, __shfl_xor_sync(0xffffffffu, wmax, 2));
        if (wmax > 0.f) e_b = min(e_b, 141 - static_cast<int>(__float_as_uint(wmax) >> 23));
        if constexpr (kLean) {
            // The same factors; the 4 MT multiplies only when some lane's factor is not 1 (x 1 is exact).
            float f[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int e_nw = __shfl_sync(0xffffffffu, e_b, 4 * (2 * t + e));
                f[e] = corr[head_d[e]] * tc_pow2(e_nw - e_d[e]);
                e_d[e] = e_nw;
            }
            if (__any_sync(0xffffffffu, f[0] != 1.0f || f[1] != 1.0f)) {
#pragma unroll
                for (int e = 0; e < 2; ++e)
#pragma unroll
                    for (int j = 0; j < MT; ++j) {
                        acc[j][e] *= f[e];
                        acc[j][2 + e] *= f[e];
                    }
            }
        }
        int e_new[2];
#pragma unroll
        for (int e = 0; e < (kLean ? 0 : 2); ++e) {  // lean: done above
            e_new[e] = __shfl_sync(0xffffffffu, e_b, 4 * (2 * t + e));
            const float f = corr[head_d[e]] * tc_pow2(e_new[e] - e_d[e]);
            e_d[e] = e_new[e];
#pragma unroll
            for (int j = 0; j < MT; ++j) {
                acc[j][e] *= f;
                acc[j][2 + e] *= f;
            }
        }
        const float bscale = tc_pow2(e_b);
        // 4. Values: per step, B fragment (weights) and the A fragments of every m-tile. Token-wise keys, d <= 128:
        // steps >= ns too, without a branch (their weights are exactly 0, the stale codes finite), so
        // that the code loads of a step can overlap the mma chain of the previous one.
#pragma unroll
        for (int sp = 0; sp < 4; ++sp) {
            if ((!kQjl && D <= 128) || kLean || sp < ns) {
                std::uint32_t bf[2];
#pragma unroll
                for (int hp = 0; hp < 2; ++hp) {
                    const float x0 = w[sp][2 * hp] * bscale, x1 = w[sp][2 * hp + 1] * bscale;
                    std::uint32_t hv = tc::pack_half2(x0, x1);
                    if (lo_b) hv = tc::pack_half2(x0 - tc::half_lo_to_float(hv), x1 - tc::half_hi_to_float(hv));
                    bf[hp] = hv;
                }
                std::uint32_t x[4][CW];
#pragma unroll
                for (int kq = 0; kq < 4; ++kq) {
                    const std::uint8_t* src = s + st.vc + (16 * sp + t + 4 * kq) * (D * VBITS / 8) + g * CB8;
                    if constexpr (CB8 == 2) {
                        x[kq][0] = *reinterpret_cast<const unsigned short*>(src);
                    } else if constexpr (CB8 == 4) {
                        x[kq][0] = *reinterpret_cast<const std::uint32_t*>(src);
                    } else if constexpr (CB8 == 8) {
                        const uint2 u = *reinterpret_cast<const uint2*>(src);
                        x[kq][0] = u.x;
                        x[kq][1] = u.y;
                    } else {
#pragma unroll
                        for (int q = 0; q < CB8 / 16; ++q) {
                            const uint4 u = *reinterpret_cast<const uint4*>(src + 16 * q);
                            x[kq][4 * q] = u.x;
                            x[kq][4 * q + 1] = u.y;
                            x[kq][4 * q + 2] = u.z;
                            x[kq][4 * q + 3] = u.w;
                        }
                    }
                }
                std::uint32_t a01[2][MT], a23[2][MT];
                tc_expand_pair<D, VBITS>(x[0], x[1], a01);  // positions P(2t), P(2t+1)
                tc_expand_pair<D, VBITS>(x[2], x[3], a23);  // positions P(2t+8), P(2t+9)
#pragma unroll
                for (int j = 0; j < MT; ++j) {
                    const std::uint32_t af[4] = {a01[0][j], a01[1][j], a23[0][j], a23[1][j]};
                    tc::mma_m16n8k16_f16(acc[j], af, bf);
                }
            }
        }
    }
    tc::cp_async_wait<0>();
    if (lane == 0) KVQ_TIMELINE_STAMP(6 + warp, KVQ_TIMELINE_NOW());

    // 5. Merge the warps of the CTA and write the chunk's partial per head.
    for (int i = threadIdx.x; i < kTcWarps * G * (D + 4); i += blockDim.x) red[i] = 0.f;  // red and mred
    __syncthreads();
    // Columns c and c + 4 (lanes t and t ^ 2, same e) are the hi and lo parts of one (head, group): one
    // shuffle sums them and the hi lane stores the channel (each (warp, head, channel) has exactly one
    // such pair). Shared-memory float atomics here were CAS loops on sm_90: ~8 us per CTA between the
    // last tile and the exit (bench_gpu_decode --timeline).
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const float f = tc_pow2(-e_d[e]) * kTcUnitInv;  // weights' 2^E and the A operand's unit
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int ch = g * (D / 8) + h * (D / 16) + j;
                float v = use_d[e] ? acc[j][2 * h + e] * f * (1.0f / float(1 << tc_row_shift<D, VBITS>(h, j))) : 0.f;
                v += __shfl_xor_sync(0xffffffffu, v, 2);
                if (use_d[e] && t < 2) red[(warp * G + head_d[e]) * D + ch] = v;
            }
    }
    {
        float ms = macc;
        ms += __shfl_xor_sync(0xffffffffu, ms, 1);
        ms += __shfl_xor_sync(0xffffffffu, ms, 2);
        if (t == 0 && valid_b && !lo_b) mred[(warp * G + head_b) * 4 + grp_b] = ms;
    }
    if (lane == 0)
#pragma unroll
        for (int hh = 0; hh < G; ++hh) {
            mls[(warp * G + hh) * 2] = m_run[hh];
            mls[(warp * G + hh) * 2 + 1] = l_run[hh];
        }
    __syncthreads();
    if (threadIdx.x == 0) KVQ_TIMELINE_STAMP(12, KVQ_TIMELINE_NOW());  // the warps' sums staged
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
        const int hh = i / D, ch = i % D;
        float M = -INFINITY;
        for (int w2 = 0; w2 < kTcWarps; ++w2) M = fmaxf(M, mls[(w2 * G + hh) * 2]);
        float L = 0.f, o = 0.f;
        if (M > -INFINITY)
            for (int w2 = 0; w2 < kTcWarps; ++w2) {
                const float mw = mls[(w2 * G + hh) * 2];
                if (mw == -INFINITY) continue;
                const float f = tc_exp(mw - M);
                L = fmaf(f, mls[(w2 * G + hh) * 2 + 1], L);
                o = fmaf(f, red[(w2 * G + hh) * D + ch] + mred[(w2 * G + hh) * 4 + ch / vg], o);
            }
        const std::size_t head = std::size_t(b) * Hq + kv * G + hh;
        part_acc[(head * n_parts + c) * D + ch] = o;
        if (ch == 0) {
            part_ml[(head * n_parts + c) * 2] = M;
            part_ml[(head * n_parts + c) * 2 + 1] = L;
        }
    }
#if defined(KVQ_TIMELINE)
    __syncthreads();
    if (threadIdx.x == 0) {
        KVQ_TIMELINE_STAMP(10, KVQ_TIMELINE_NOW());
        KVQ_TIMELINE_STAMP(11, len);
    }
#endif
}

inline std::size_t tc_smem_bytes_for(const DecodeAttentionArgs& a, int G, int stages) {
    const std::size_t sb = tc_stage(a).bytes;
    const std::size_t ktab = a.key_format == KeyFormat::Qjl ? 0 : 2 * std::size_t(G) * (a.head_dim / a.key_group);
    const std::size_t merge = sizeof(float) * std::size_t(kTcWarps) * G * (std::size_t(a.head_dim) + 4 + 2);
    const std::size_t stage_all = std::size_t(kTcWarps) * stages * sb;
    return stage_all + merge + sizeof(std::uint64_t) * std::size_t(kTcWarps) * stages +  // stage barriers
           sizeof(float) * ktab;
}
inline int tc_pick_stages(const DecodeAttentionArgs& a) {
    if (a.key_format == KeyFormat::Qjl) {
        if (KVQ_TC_QJL_MIN_CTAS > 3 && a.n_q_heads == a.n_kv_heads && a.head_dim <= 128) return 2;
        return kTcWarps * 3 * tc_stage(a).bytes <= 150 * 1024 ? 3 : 2;
    }
    // Token-wise keys carry ~2x the bytes per position, and 2 stages already keep >= 64 KB per SM in
    // flight: a third stage only where it costs no CTA per SM (warps hide the latency of the mma
    // and shared-memory chains better than a deeper pipeline per warp).
    const int G = a.n_q_heads / a.n_kv_heads;
    auto ctas = [](std::size_t bytes) { return int((228 * 1024) / (bytes + 1024)); };  // 1 KB reserved per CTA
    const std::size_t s3 = tc_smem_bytes_for(a, G, 3);
    return s3 <= 200 * 1024 && ctas(s3) >= ctas(tc_smem_bytes_for(a, G, 2)) ? 3 : 2;
}
inline std::size_t tc_smem_bytes(const DecodeAttentionArgs& a, int G) {
    return tc_smem_bytes_for(a, G, tc_pick_stages(a));
}
// CTAs of decode_tc_kernel per SM on an H100/H200 (228 KB shared memory per SM, 1 KB reserved per CTA):
// the smaller of the launch bound's (register) residency and the shared-memory one. For a wave model
// of the chunk split (dec_plan): QJL + int2 and WKV int4 g128 (d 128, G 1) give 3, int4 g32 K + V 2.
inline int tc_ctas_per_sm(const DecodeAttentionArgs& a) {
    const int G = a.n_q_heads / a.n_kv_heads;
    const int by_regs = a.key_format == KeyFormat::Qjl
                            ? (G >= 4 ? 2 : (G == 1 && a.head_dim <= 128 ? KVQ_TC_QJL_MIN_CTAS : 3))
                            : (G == 1 && a.head_dim <= 128 ? 3 : 2);
    const int by_smem = int((228 * 1024) / (tc_smem_bytes(a, G) + 1024));
    return by_smem < by_regs ? by_smem : by_regs;
}

// Whether the tensor-core kernel takes this shape (otherwise the CUDA-core kernel does all).
inline bool tc_supported(const DecodeAttentionArgs& a) {
    const int d = a.head_dim, G = a.n_q_heads / a.n_kv_heads;
    if (G != 1 && G != 2 && G != 4) return false;
    if (a.key_format == KeyFormat::Qjl) {
        if (a.qjl_m < 64 || a.qjl_m > 1024 || a.qjl_m % 64 != 0) return false;  // 8-byte code reads
    } else {
        if (a.key_bits != 2 && a.key_bits != 4 && a.key_bits != 8) return false;
        // Groups of >= 16 channels: a k-step's channel pairs (and a 2-bit word) stay in one group.
        if (a.key_group < 16 || d % a.key_group != 0) return false;
        const int kng = d / a.key_group;
        if (G * (kng < 4 ? kng : 4) > 4) return false;  // (head, group) combinations of a k-step
    }
    if (a.value_bits != 2 && a.value_bits != 4 && a.value_bits != 8) return false;
    if (a.value_group < d / 8 || d % a.value_group != 0 || G * (d / a.value_group) > 4) return false;
    if (a.key_layout.block_tokens < 16 || a.value_layout.block_tokens < 16) return false;
    if (a.key_block_bytes % 16 != 0 || a.value_block_bytes % 16 != 0) return false;
    return tc_smem_bytes(a, G) <= 200 * 1024;
}

}  // namespace kvq::cuda::detail
