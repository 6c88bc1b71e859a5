#pragma once
// GPU QJL key encode straight into paged blocks, byte for byte the CPU codec's format (docs/FORMAT.md):
// launch_qjl_encode writes kvq::QjlKeyCodec blocks, with or without outliers. The JL projection S k
// runs on tensor cores (mma.sync m16n8k16, fp16 in, fp32 accumulate) with split operands: S = S_hi + S_lo
// (two fp16 parts, 22 bits), k (fp32 input) scaled by a power of two and split the same way
// (k_hi, k_lo), products S_hi k_hi + S_lo k_hi + S_hi k_lo (fp16 input: k is exact, two products).
// The result is within ~2^-20 ||S_j|| ||k|| of the exact projection. Every projection closer to
// zero than a bound on that error (qjl_enc_coef) is queued and recomputed in float64 (one warp per
// entry), so each sign bit the kernel writes is the sign of the exact projection. The CPU codec
// (fp32 GEMM) can differ from it only where its own rounding crosses zero; tests count those bits.
// Norms are computed in float64 as on the CPU. Outliers (per 32-token group): channel energies
// summed in float64 in token order, top k_o by (energy desc, id asc), ids ascending; outlier
// projection in fp32 with the same near-zero float64 recheck; outlier channels zeroed for the
// inlier projection and norm.
// fp16 input without outliers (the serving case) runs qjl_encode_f16_kernel: the same arithmetic
// for the signs, fp32 norms with a float64 fallback where they could round differently, and about
// a fifth of the instructions per row (its comment says how); QjlEncodeArgs::legacy_kernel keeps
// the kernel described next for every shape.
// Structure: persistent CTAs (one per SM; 16 warps for d <= 128, 8 for d = 256) over tiles of 64
// rows (32 tokens x 2 KV heads); each warp keeps its 16 sketch rows' S_hi / S_lo mma fragments in
// registers for the whole kernel; the next tile's input rows stream into shared memory with
// cp.async while the tensor cores work on the current one. fp16 conversions use the hardware
// round-to-nearest-even (__float2half_rn), bit-identical to kvq::float_to_half on finite values.
// Input, addressing and launcher rules: encode.cuh.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "kvq/cuda/encode_common.cuh"
#include "kvq/cuda/mma.cuh"

namespace kvq::cuda {
namespace detail {

// ---------------------------------------------------------------------------------------------
// QJL encode. A tile of 64 rows = 32 tokens x 2 KV heads (an outlier group per head);
// blockIdx.y picks a slice of NW * JW sketch rows (NW = 16 warps for d <= 128, else 8; JW = 16);
// warp w owns JW of them, with their S_hi / S_lo mma B fragments in registers for the whole kernel.
// Grid-stride over tiles.
template <int D>
inline constexpr int kQjlEncWarps = D <= 128 ? 16 : 8;
inline constexpr int kQjlEncJW = 16;  // sketch rows per warp
inline constexpr int kQjlEncRows = 64;

// Near-zero recheck bound: |mma result - exact| <= ||k'|| (C ||S_j|| + 2^-20 sqrt(d)) with
// C = (3 d / 16 + 8) 2^-21: operand splitting leaves <= 2^-22 |S| + 2^-25 per element of S and, for
// fp32 input scaled to max |k'| in [2^14, 2^15), <= 2^-22 |k'| + 2^-25 per element of k'; each of the
// <= 3 d / 16 fp32 accumulation steps of the tensor cores adds <= 2^-22 of the running magnitude.
// C is twice the sum of those terms (d = 128: |error| <= 1.6e-5 ||k'|| ||S_j|| against ~1e-6 typical).
__device__ __forceinline__ float qjl_enc_coef(int d) { return (3.0f * d / 16.0f + 8.0f) * 4.76837158203125e-07f; }

__device__ __forceinline__ unsigned pack_half2(__half lo, __half hi) {
    return static_cast<unsigned>(__half_as_ushort(lo)) | (static_cast<unsigned>(__half_as_ushort(hi)) << 16);
}

__device__ __forceinline__ float enc_load1(const EncodeTarget& a, std::size_t off) {
    if (a.x_type == QueryType::F32) return __ldg(static_cast<const float*>(a.x) + off);
    return __half2float(__ldg(static_cast<const __half*>(a.x) + off));
}

// Exact sign of <S_j, k> (k with the outlier channels in `omask` zeroed), in float64.
__device__ __forceinline__ unsigned qjl_exact_sign(const QjlEncodeArgs& a, std::size_t xoff, int j,
                                                   const unsigned* omask) {
    const int d = a.head_dim;
    double s = 0;
    for (int c = 0; c < d; ++c) {
        if (omask != nullptr && ((omask[c >> 5] >> (c & 31)) & 1u)) continue;
        s += double(__ldg(a.sketch + std::size_t(j) * d + c)) * double(enc_load1(a, xoff + c));
    }
    return s > 0.0 ? 1u : 0u;
}

inline constexpr int kQjlEncCheckMax = 512;  // near-zero rechecks queued per tile (more: done in place)

template <int D, bool F16IN>
struct QjlEncSmem {
    static constexpr int RT = kQjlEncRows, AST = D + 8, ESZ = F16IN ? 2 : 4;
    static constexpr std::size_t raw = 0;                                                // [RT][D] input rows
    static constexpr std::size_t ahi = raw + std::size_t(RT) * D * ESZ;                  // [RT][AST] half
    static constexpr std::size_t alo = ahi + std::size_t(RT) * AST * 2;                  // [RT][AST] half (fp32 input)
    static constexpr std::size_t codes = alo + (F16IN ? 0 : std::size_t(RT) * AST * 2);  // [RT][8] u32
    static constexpr std::size_t tau = codes + std::size_t(RT) * 16 * 4;                 // [RT] float
    static constexpr std::size_t rows = tau + RT * 4;                                    // [RT] EncRow (16 B)
    static constexpr std::size_t omask = rows + RT * 16;                                 // [2][8] u32
    static constexpr std::size_t ochan = omask + 64;                                     // [2][16] int
    static constexpr std::size_t check = ochan + 128;                                    // [kQjlEncCheckMax] int
    static constexpr std::size_t ncheck = check + kQjlEncCheckMax * 4;                   // int (+pad)
    static constexpr std::size_t thr = ncheck + 16;                                      // [256] float
    static constexpr std::size_t so = thr + 256 * 4;  // [2][16][256] float (outliers)
    static constexpr std::size_t bytes(bool outliers) {
        return so + (outliers ? 2 * 17 * 256 * 4 : 0);
    }  // + smax [2][256]
};

template <int D, bool F16IN>
__device__ __forceinline__ float qjl_raw_get(const std::uint8_t* raw, int r, int c) {
    if constexpr (F16IN)
        return __half2float(reinterpret_cast<const __half*>(raw)[r * D + c]);
    else
        return reinterpret_cast<const float*>(raw)[r * D + c];
}

// Lane's CPL consecutive channels of row r (vector loads: conflict-free).
template <int D, bool F16IN>
__device__ __forceinline__ void qjl_raw_row(const std::uint8_t* raw, int r, int lane, float* v) {
    constexpr int CPL = D / 32;
    if constexpr (F16IN) {
        const __half2* p = reinterpret_cast<const __half2*>(raw) + (r * D + lane * CPL) / 2;
        if constexpr (CPL == 2) {
            const float2 f = __half22float2(p[0]);
            v[0] = f.x, v[1] = f.y;
        } else if constexpr (CPL == 4) {
            const uint2 u = *reinterpret_cast<const uint2*>(p);
            const float2 f0 = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
            const float2 f1 = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
            v[0] = f0.x, v[1] = f0.y, v[2] = f1.x, v[3] = f1.y;
        } else {
            const uint4 u = *reinterpret_cast<const uint4*>(p);
            const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
                v[2 * i] = f.x, v[2 * i + 1] = f.y;
            }
        }
    } else {
        const float* p = reinterpret_cast<const float*>(raw) + r * D + lane * CPL;
        if constexpr (CPL == 2) {
            const float2 f = *reinterpret_cast<const float2*>(p);
            v[0] = f.x, v[1] = f.y;
        } else {
#pragma unroll
            for (int i = 0; i < CPL; i += 4) {
                const float4 f = *reinterpret_cast<const float4*>(p + i);
                v[i] = f.x, v[i + 1] = f.y, v[i + 2] = f.z, v[i + 3] = f.w;
            }
        }
    }
}

// The mma B fragments of the warp's sketch rows jbase .. jbase + 8 NT - 1 (row jbase + 8 nt + g,
// channels 16 ks + 8 hlf + 2 tig and the next), split as S = S_hi + S_lo in fp16 so that two fp16
// mmas give the projection to about fp32 accuracy. Inactive warps (jbase >= m) load row 0.
template <int D, int KS, int NT>
__device__ __forceinline__ void qjl_sketch_fragments(const float* sketch, int jbase, bool jactive, int g, int tig,
                                                     unsigned (&bh)[KS][NT][2], unsigned (&bl)[KS][NT][2]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const float* srow = sketch + std::size_t(jactive ? jbase + nt * 8 + g : 0) * D;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks)
#pragma unroll
            for (int hlf = 0; hlf < 2; ++hlf) {
                const int c = ks * 16 + hlf * 8 + tig * 2;
                const float s0 = __ldg(srow + c), s1 = __ldg(srow + c + 1);
                const __half h0 = __float2half_rn(s0), h1 = __float2half_rn(s1);
                const __half l0 = __float2half_rn(s0 - __half2float(h0)), l1 = __float2half_rn(s1 - __half2float(h1));
                bh[ks][nt][hlf] = pack_half2(h0, h1);
                bl[ks][nt][hlf] = pack_half2(l0, l1);
            }
    }
}

template <int D, bool F16IN>
__global__ void __launch_bounds__(kQjlEncWarps<D> * 32, 1) qjl_encode_kernel(QjlEncodeArgs a) {
    constexpr int NW = kQjlEncWarps<D>, kQjlEncThreads = NW * 32;
    constexpr int CPL = D / 32;
    constexpr int JW = kQjlEncJW;
    constexpr int NT = JW / 8;  // mma n-tiles per warp
    constexpr int KS = D / 16;  // mma k-steps
    constexpr int RT = kQjlEncRows;
    using L = QjlEncSmem<D, F16IN>;
    constexpr int AST = L::AST;
    extern __shared__ float4 enc_smem4[];
    std::uint8_t* sm = reinterpret_cast<std::uint8_t*>(enc_smem4);
    std::uint8_t* raw = sm + L::raw;
    __half* Ahi = reinterpret_cast<__half*>(sm + L::ahi);
    __half* Alo = reinterpret_cast<__half*>(sm + L::alo);
    unsigned* codes = reinterpret_cast<unsigned*>(sm + L::codes);
    float* tau = reinterpret_cast<float*>(sm + L::tau);
    EncRow* rows = reinterpret_cast<EncRow*>(sm + L::rows);
    unsigned* omask = reinterpret_cast<unsigned*>(sm + L::omask);
    int* ochan = reinterpret_cast<int*>(sm + L::ochan);
    int* check = reinterpret_cast<int*>(sm + L::check);
    int* ncheck = reinterpret_cast<int*>(sm + L::ncheck);
    float* so = reinterpret_cast<float*>(sm + L::so);
    float* thr = reinterpret_cast<float*>(sm + L::thr);  // near-zero bound factor per sketch row of the slice

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, tig = lane & 3;
    const int H = a.n_kv_heads;
    const int jslice = blockIdx.y * (NW * JW);
    const int jbase = jslice + warp * JW;
    const bool jactive = jbase < a.m;
    const bool lead = blockIdx.y == 0;  // writes norms, ids and outlier codes
    const int ko = a.outliers;

    // B fragments of S (hi, lo) and the per-column near-zero thresholds.
    unsigned bh[KS][NT][2], bl[KS][NT][2];
    {
        const float coef = qjl_enc_coef(D), absterm = 9.5367431640625e-07f * sqrtf(float(D));
        for (int jl = tid; jl < NW * JW; jl += kQjlEncThreads) {
            const int jj = jslice + jl;
            float nn = 0.f;
            if (jj < a.m)
                for (int c = 0; c < D; ++c) {
                    const float sv = __ldg(a.sketch + std::size_t(jj) * D + c);
                    nn = fmaf(sv, sv, nn);
                }
            thr[jl] = coef * sqrtf(nn) * 1.001f + absterm;
        }
        qjl_sketch_fragments<D, KS, NT>(a.sketch, jbase, jactive, g, tig, bh, bl);
    }

    const int ntg = (a.n_tokens + 31) / 32, nhp = (H + 1) / 2;
    const long long tiles = static_cast<long long>(a.batch) * ntg * nhp;
    const std::uint32_t B = a.layout.block_tokens;
    auto coords = [&](long long tile, int& b, int& tg, int& hp) {
        hp = static_cast<int>(tile % nhp);
        tg = static_cast<int>((tile / nhp) % ntg);
        b = static_cast<int>(tile / (static_cast<long long>(nhp) * ntg));
    };
    // Asynchronous copy of a tile's input rows into `raw` (invalid rows zero-filled).
    auto prefetch = [&](long long tile) {
        if (tile >= tiles) return;
        int b, tg, hp;
        coords(tile, b, tg, hp);
        constexpr int CH = D * L::ESZ / 16;  // 16-byte chunks per row
        for (int i = tid; i < RT * CH; i += kQjlEncThreads) {
            const int r = i / CH, k = i % CH;
            const int h = hp * 2 + r / 32, t = tg * 32 + r % 32;
            std::uint8_t* dst = raw + (std::size_t(r) * D) * L::ESZ + k * 16;
            if (h < H && t < a.n_tokens) {
                const std::uint8_t* src =
                    static_cast<const std::uint8_t*>(a.x) + enc_x_offset(a, b, t, h) * L::ESZ + k * 16;
                tc::cp_async16(dst, src);
            } else {
                *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
            }
        }
        tc::cp_async_commit();
    };

    prefetch(blockIdx.x);
    for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        int b, tg, hp;
        coords(tile, b, tg, hp);
        tc::cp_async_wait<0>();
        __syncthreads();  // raw is complete; the previous tile's smem readers are done
        if (tid < RT) {   // row targets (page lookups) in parallel
            const int h = hp * 2 + tid / 32, t = tg * 32 + tid % 32;
            rows[tid] = (h < H && t < a.n_tokens) ? enc_row(a, b, t, h) : EncRow{nullptr, 0};
        }
        __syncthreads();
        if (ko > 0) {
            if (warp < 2) {
                // Energies in float64, token order; lane owns channels lane, lane + 32, ...
                double en[CPL];
#pragma unroll
                for (int i = 0; i < CPL; ++i) {
                    double e = 0;
                    for (int t = 0; t < 32; ++t) {
                        const float x = qjl_raw_get<D, F16IN>(raw, warp * 32 + t, lane + 32 * i);
                        e += double(x) * x;
                    }
                    en[i] = e;
                }
                unsigned mymask = 0;  // bit i: channel lane + 32 i taken
                for (int k = 0; k < ko; ++k) {
                    double be = -1.0;
                    int bc = 1 << 30;
#pragma unroll
                    for (int i = 0; i < CPL; ++i)
                        if (!((mymask >> i) & 1u) && en[i] > be) {
                            be = en[i];
                            bc = lane + 32 * i;
                        }
                    for (int off = 16; off > 0; off >>= 1) {
                        const double oe = __shfl_xor_sync(0xffffffffu, be, off);
                        const int oc = __shfl_xor_sync(0xffffffffu, bc, off);
                        if (oe > be || (oe == be && oc < bc)) {
                            be = oe;
                            bc = oc;
                        }
                    }
                    if ((bc & 31) == lane) mymask |= 1u << (bc >> 5);
                }
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const unsigned bal = __ballot_sync(0xffffffffu, i < CPL && ((mymask >> i) & 1u));
                    if (lane == 0) omask[warp * 8 + i] = bal;
                }
                __syncwarp();
                {  // ascending ids: rank of channel 32 i + lane among the set bits
                    int before = 0;
#pragma unroll
                    for (int i = 0; i < CPL; ++i) {
                        const unsigned wd = omask[warp * 8 + i];
                        if ((wd >> lane) & 1u)
                            ochan[warp * 16 + before + __popc(wd & ((1u << lane) - 1u))] = 32 * i + lane;
                        before += __popc(wd);
                    }
                }
                __syncwarp();
                if (lane == 0) {
                    const int h = hp * 2 + warp;
                    if (lead && h < H && tg * 32 < a.n_tokens) {
                        const EncRow r = enc_row(a, b, tg * 32, h);
                        std::uint8_t* ids = r.blk + a.layout.block_side_offset() + std::size_t(r.tok / 32) * ko;
                        for (int i = 0; i < ko; ++i) ids[i] = static_cast<std::uint8_t>(ochan[warp * 16 + i]);
                    }
                }
            }
            __syncthreads();
        }
        // Norms, scaling, fp16 split into the A tile; row targets.
        if (tid == 0) *ncheck = 0;
#pragma unroll 2
        for (int r = warp; r < RT; r += NW) {
            const int h = hp * 2 + r / 32, t = tg * 32 + r % 32;
            const bool valid = h < H && t < a.n_tokens;
            float v[CPL];
            qjl_raw_row<D, F16IN>(raw, r, lane, v);
            if (ko > 0) {
#pragma unroll
                for (int i = 0; i < CPL; ++i) {
                    const int c = lane * CPL + i;
                    if ((omask[(r / 32) * 8 + (c >> 5)] >> (c & 31)) & 1u) v[i] = 0.f;
                }
            }
            double nn = 0;
            float mx = 0.f;
#pragma unroll
            for (int i = 0; i < CPL; ++i) {
                nn += double(v[i]) * v[i];
                mx = fmaxf(mx, fabsf(v[i]));
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                nn += __shfl_xor_sync(0xffffffffu, nn, off);
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            }
            const float norm = static_cast<float>(sqrt(nn));
            int e = 0;
            if (!F16IN && mx > 0.f) {
                int ex;
                frexpf(mx, &ex);
                e = 15 - ex;
            }
#pragma unroll
            for (int i = 0; i < CPL; i += 2) {
                __half h0, h1;
                if (F16IN) {
                    h0 = __float2half_rn(v[i]);
                    h1 = __float2half_rn(v[i + 1]);
                } else {
                    const float s0 = ldexpf(v[i], e), s1 = ldexpf(v[i + 1], e);
                    h0 = __float2half_rn(s0);
                    h1 = __float2half_rn(s1);
                    const __half l0 = __float2half_rn(s0 - __half2float(h0)),
                                 l1 = __float2half_rn(s1 - __half2float(h1));
                    *reinterpret_cast<unsigned*>(Alo + r * AST + lane * CPL + i) = pack_half2(l0, l1);
                }
                *reinterpret_cast<unsigned*>(Ahi + r * AST + lane * CPL + i) = pack_half2(h0, h1);
            }
            if (lane == 0) {
                tau[r] = ldexpf(norm, e);
                const EncRow rr = rows[r];
                if (valid) {
                    if (lead) {
                        std::uint16_t* side = reinterpret_cast<std::uint16_t*>(rr.blk + a.layout.token_side_offset());
                        side[rr.tok] = enc_f2h(norm).bits;
                        if (ko > 0) {
                            double no = 0;
                            for (int i = 0; i < ko; ++i) {
                                const float x = qjl_raw_get<D, F16IN>(raw, r, ochan[(r / 32) * 16 + i]);
                                no += double(x) * x;
                            }
                            side[B + rr.tok] = enc_f2h(static_cast<float>(sqrt(no))).bits;
                        }
                    }
                }
            }
        }
        __syncthreads();
        // Outlier projection (lead CTAs): S[:, O] staged per 256 sketch rows; thread per (row, 32
        // sketch rows); fp32 with a float64 recheck near zero.
        if (ko > 0 && lead) {
            for (int j0 = 0; j0 < a.m_outlier; j0 += 256) {
                const int jn = min(256, a.m_outlier - j0);
                float* somax = so + 2 * 16 * 256;  // [2][256]: max_i |S[j][O_i]| per group
                for (int i = tid; i < 2 * ko * jn; i += kQjlEncThreads) {
                    const int grp = i / (ko * jn), rem = i % (ko * jn), oi = rem / jn, jj = rem % jn;
                    so[(grp * 16 + oi) * 256 + jj] = __ldg(a.sketch + std::size_t(j0 + jj) * D + ochan[grp * 16 + oi]);
                }
                __syncthreads();
                for (int i = tid; i < 2 * jn; i += kQjlEncThreads) {
                    const int grp = i / jn, jj = i % jn;
                    float mxs = 0.f;
                    for (int oi = 0; oi < ko; ++oi) mxs = fmaxf(mxs, fabsf(so[(grp * 16 + oi) * 256 + jj]));
                    somax[grp * 256 + jj] = mxs;
                }
                __syncthreads();
                // |fp32 sum - exact| <= ko 2^-24 sum_i |S x| <= 2^-20 max_i |S| sum_i |x|: recheck below 2^-18 of that.
                auto project = [&](auto ko_c) {
                    constexpr int KO = decltype(ko_c)::value;  // upper bound of ko (loops predicated)
                    for (int task = tid; task < RT * (jn / 32); task += kQjlEncThreads) {
                        const int r = task % RT, wd = task / RT;
                        const EncRow rr = rows[r];
                        if (rr.blk == nullptr) continue;
                        const int grp = r / 32;
                        const int* ch = ochan + grp * 16;
                        float xv[KO];
                        float xa = 0.f;
#pragma unroll
                        for (int i = 0; i < KO; ++i) {
                            xv[i] = i < ko ? qjl_raw_get<D, F16IN>(raw, r, ch[i]) : 0.f;
                            xa += fabsf(xv[i]);
                        }
                        xa *= 3.814697265625e-06f;  // 2^-18
                        unsigned word = 0;
                        for (int jj = 0; jj < 32; ++jj) {
                            const float* sc = so + grp * 16 * 256 + wd * 32 + jj;
                            float sv[KO];
                            float s = 0.f;
#pragma unroll
                            for (int i = 0; i < KO; ++i) {
                                sv[i] = i < ko ? sc[i * 256] : 0.f;
                                s = fmaf(sv[i], xv[i], s);
                            }
                            unsigned bit = s > 0.f ? 1u : 0u;
                            if (fabsf(s) <= somax[grp * 256 + wd * 32 + jj] * xa) {
                                double sd = 0;
#pragma unroll
                                for (int i = 0; i < KO; ++i) sd += double(sv[i]) * double(xv[i]);
                                bit = sd > 0.0 ? 1u : 0u;
                            }
                            word |= bit << jj;
                        }
                        *reinterpret_cast<unsigned*>(rr.blk + std::size_t(rr.tok) * a.layout.code_bytes +
                                                     (a.m + j0) / 8 + wd * 4) = word;
                    }
                };
                if (ko <= 4)
                    project(std::integral_constant<int, 4>{});
                else if (ko <= 8)
                    project(std::integral_constant<int, 8>{});
                else
                    project(std::integral_constant<int, 16>{});
                __syncthreads();
            }
        }
        // raw is free: fetch the next tile while the tensor cores work on this one.
        prefetch(tile + gridDim.x);

        // Inlier projection on tensor cores: warp computes RT rows x JW sketch rows.
        if (jactive) {
#pragma unroll 1
            for (int mt = 0; mt < RT / 16; ++mt) {
                float acc[NT][4];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
                const int r0 = mt * 16 + g;
#pragma unroll
                for (int ks = 0; ks < KS; ++ks) {
                    const int c = ks * 16 + tig * 2;
                    unsigned ah[4], al[4];
                    ah[0] = *reinterpret_cast<const unsigned*>(Ahi + r0 * AST + c);
                    ah[1] = *reinterpret_cast<const unsigned*>(Ahi + (r0 + 8) * AST + c);
                    ah[2] = *reinterpret_cast<const unsigned*>(Ahi + r0 * AST + c + 8);
                    ah[3] = *reinterpret_cast<const unsigned*>(Ahi + (r0 + 8) * AST + c + 8);
                    if (!F16IN) {
                        al[0] = *reinterpret_cast<const unsigned*>(Alo + r0 * AST + c);
                        al[1] = *reinterpret_cast<const unsigned*>(Alo + (r0 + 8) * AST + c);
                        al[2] = *reinterpret_cast<const unsigned*>(Alo + r0 * AST + c + 8);
                        al[3] = *reinterpret_cast<const unsigned*>(Alo + (r0 + 8) * AST + c + 8);
                    }
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        tc::mma_m16n8k16_f16(acc[nt], ah, bl[ks][nt]);
                        if (!F16IN) tc::mma_m16n8k16_f16(acc[nt], al, bh[ks][nt]);
                        tc::mma_m16n8k16_f16(acc[nt], ah, bh[ks][nt]);
                    }
                }
                // Signs; near-zero ones are queued for an exact recheck.
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int r = r0 + half * 8;
                    const float tr = tau[r];
                    const bool rv = rows[r].blk != nullptr;
                    unsigned word = 0;
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const float p = acc[nt][half * 2 + e];
                            const int jl = nt * 8 + tig * 2 + e;
                            unsigned bit = p > 0.f ? 1u : 0u;
                            if (fabsf(p) <= tr * thr[warp * JW + jl] && rv) {
                                const int slot = atomicAdd(ncheck, 1);
                                if (slot < kQjlEncCheckMax) {
                                    check[slot] = (r << 16) | (warp * JW + jl);
                                } else {
                                    const int h = hp * 2 + r / 32, t = tg * 32 + r % 32;
                                    bit = qjl_exact_sign(a, enc_x_offset(a, b, t, h), jbase + jl,
                                                         ko > 0 ? omask + (r / 32) * 8 : nullptr);
                                }
                            }
                            word |= bit << jl;
                        }
                    word |= __shfl_xor_sync(0xffffffffu, word, 1);
                    word |= __shfl_xor_sync(0xffffffffu, word, 2);
                    if (tig == half) codes[r * NW + warp] = word;
                }
            }
        }
        __syncthreads();
        // Exact (float64) signs of the queued near-zero projections: one warp per entry.
        {
            const int n = min(*ncheck, kQjlEncCheckMax);
            for (int i = warp; i < n; i += NW) {
                const int ent = check[i], r = ent >> 16, jl = ent & 0xFFFF;
                const int h = hp * 2 + r / 32, t = tg * 32 + r % 32;
                const int j = jslice + jl;
                float v[CPL];
                enc_load<CPL>(a, enc_x_offset(a, b, t, h) + lane * CPL, v);
                double s = 0;
#pragma unroll
                for (int k = 0; k < CPL; ++k) {
                    const int c = lane * CPL + k;
                    if (ko > 0 && ((omask[(r / 32) * 8 + (c >> 5)] >> (c & 31)) & 1u)) continue;
                    s += double(__ldg(a.sketch + std::size_t(j) * D + c)) * double(v[k]);
                }
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
                if (lane == 0) {
                    const unsigned m = 1u << (jl % JW);
                    if (s > 0.0)
                        atomicOr(codes + r * NW + jl / JW, m);
                    else
                        atomicAnd(codes + r * NW + jl / JW, ~m);
                }
            }
        }
        __syncthreads();
        // Codes out: row r, warp slot w -> JW bits at sketch row jslice + w * JW.
        for (int i = tid; i < RT * NW; i += kQjlEncThreads) {
            const int r = i / NW, w = i % NW;
            const EncRow rr = rows[r];
            if (rr.blk == nullptr || jslice + w * JW >= a.m) continue;
            std::uint8_t* dst = rr.blk + std::size_t(rr.tok) * a.layout.code_bytes + (jslice + w * JW) / 8;
            if constexpr (JW == 32)
                *reinterpret_cast<unsigned*>(dst) = codes[i];
            else
                *reinterpret_cast<std::uint16_t*>(dst) = static_cast<std::uint16_t>(codes[i]);
        }
    }
    tc::cp_async_wait<0>();
}

// ---------------------------------------------------------------------------------------------
// QJL encode, fast path: fp16 input without outliers (the serving case; QjlEncodeArgs::legacy_kernel
// or any other shape takes qjl_encode_kernel above). Same tile (32 tokens x 2 KV heads), same split
// S_hi / S_lo fragments in registers and the same mma order as qjl_encode_kernel, so the same
// near-zero bound holds and every sign is again the sign of the exact projection. What changes is
// the work per row (round-2 SASS: ~1300 issue slots per row, most of them not tensor work):
//  * fp16 input is already the A operand: rows are copied with cp.async into a padded, double
//    buffered tile (row stride D + 8 halves, conflict-free for ldmatrix) and fed to the tensor cores
//    with ldmatrix.x4, two m-tiles at a time (four independent accumulator chains per warp).
//  * Norms in fp32 by 8 threads per row (squares of fp16 values are exact in fp32; the rounding of
//    the sum is bounded), and the float64 sum only where that bound cannot decide the fp16 rounding
//    of the norm (qjl_norm_f64_part, out of line).
//  * Near-zero test: one compare per projection against the warp's largest threshold; the float64
//    recheck (qjl_recheck_f16) is out of line and done at once by the warp that found it, so no
//    queue, no atomics and no extra phase.
//  * Row targets (page lookups) are fetched two tiles ahead and stored after the mma, so their
//    latency never stalls a barrier; codes leave as whole 32-bit words.
template <int D>
inline constexpr int kQjlF16Warps = kQjlEncWarps<D>;
inline constexpr int kQjlF16JW = kQjlEncJW;  // sketch rows per warp

template <int D>
struct QjlFastSmem {
    static constexpr int RT = kQjlEncRows, AST = D + 8, NW = kQjlF16Warps<D>;
    static constexpr std::size_t raw = 0;                                             // [2][RT][AST] half
    static constexpr std::size_t codes = raw + std::size_t(2) * RT * AST * 2;         // [RT][NW] JW-bit words
    static constexpr std::size_t tau = codes + std::size_t(RT) * NW * kQjlF16JW / 8;  // [RT] float (< 0: no check)
    static constexpr std::size_t src = tau + RT * 4;                                  // [3][RT] input row pointers
    static constexpr std::size_t tgt = src + 3 * RT * 8;                              // [3][RT] int2 {page, tok}
    // The CTA's NW * JW sketch rows in fp32 (zeros past m), for the float64 recheck: without them a
    // recheck waits on L2 while the rest of the CTA waits at the next barrier.
    static constexpr std::size_t sk = tgt + 3 * RT * 8;  // [NW * kQjlF16JW][D] float
    static constexpr std::size_t bytes = sk + std::size_t(NW) * kQjlF16JW * D * 4;
};

__device__ __forceinline__ void qjl_ldmatrix_x4(unsigned r[4], unsigned saddr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(saddr)
                 : "memory");
}

// Float64 sum of squares of this lane's part of a row (channels [8 (p + 8 i), 8 (p + 8 i) + 8)):
// the rare fallback of the fp32 norm, kept out of the hot loop.
template <int D>
__device__ __noinline__ double qjl_norm_f64_part(const __half* row, int p) {
    double s = 0;
#pragma unroll
    for (int i = 0; i < D / 64; ++i) {
        const uint4 u = *reinterpret_cast<const uint4*>(row + (p + 8 * i) * 8);
        const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[k]));
            s += double(f.x) * f.x;
            s += double(f.y) * f.y;
        }
    }
    return s;
}

// A lane's 8 NT accumulators of a pair of m-tiles, index v = 4 NT p + 4 nt + k (acc[p][nt][k]):
// m-tile p, row 16 p + lane / 4 (+ 8 for k >= 2), the warp's sketch row 8 nt + 2 (lane % 4) + (k & 1).
template <int N>
struct QjlAccN {
    float v[N];
};

// Exact (float64) signs of the projections closer to zero than their bound th[p][k >> 1] (th[2 p +
// (k >> 1)] here). `sgn` holds the lane's sign bits by the same index v; the flagged ones are
// replaced. The whole warp computes each flagged dot product: channels lane, lane + 32, ...
// (products of fp32 and fp16 values are exact in float64). Called by all 32 lanes. `rows`: the
// pair's first tile row, `sketch`: the warp's JW sketch rows (both in shared memory).
template <int D, int NT>
__device__ __noinline__ unsigned qjl_recheck_f16(unsigned sgn, QjlAccN<8 * NT> acc, float4 th, const __half* rows,
                                                 const float* sketch) {
    constexpr int AST = D + 8, PSH = NT == 2 ? 3 : 2;  // v >> PSH: m-tile p
    static_assert(NT == 1 || NT == 2, "1 or 2 n-tiles");
    const int lane = threadIdx.x & 31;
    const float thv[4] = {th.x, th.y, th.z, th.w};
    unsigned near = 0;
#pragma unroll
    for (int v = 0; v < 8 * NT; ++v) near |= (fabsf(acc.v[v]) <= thv[(v >> PSH) * 2 + ((v >> 1) & 1)] ? 1u : 0u) << v;
    unsigned pending = __ballot_sync(0xffffffffu, near != 0);
    while (pending) {
        const int src = __ffs(pending) - 1;
        pending &= pending - 1;
        unsigned nm = __shfl_sync(0xffffffffu, near, src);
        while (nm) {
            const int v = __ffs(nm) - 1;
            nm &= nm - 1;
            const int p = v >> PSH, nt = (v >> 2) & (NT - 1), k = v & 3;
            const int row = p * 16 + (src >> 2) + (k >> 1) * 8;
            const int col = nt * 8 + (src & 3) * 2 + (k & 1);
            const __half* xr = rows + row * AST;
            const float* sr = sketch + col * D;
            double s = 0;
#pragma unroll
            for (int i = 0; i < D / 32; ++i) s += double(sr[lane + 32 * i]) * double(__half2float(xr[lane + 32 * i]));
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
            if (lane == src) sgn = s > 0.0 ? (sgn | (1u << v)) : (sgn & ~(1u << v));
        }
    }
    return sgn;
}

template <int D>
__global__ void __launch_bounds__(kQjlF16Warps<D> * 32, 1) qjl_encode_f16_kernel(QjlEncodeArgs a) {
    constexpr int NW = kQjlF16Warps<D>, NTHR = NW * 32;
    constexpr int JW = kQjlF16JW, NT = JW / 8, KS = D / 16, RT = kQjlEncRows;
    static_assert((NT == 1 || NT == 2) && RT == 64, "the flag layout assumes 1 or 2 n-tiles and 2 pairs of m-tiles");
    using L = QjlFastSmem<D>;
    constexpr int AST = L::AST;
    constexpr int CH = D / 8;  // 16-byte chunks per input row
    extern __shared__ float4 enc_smem4[];
    std::uint8_t* sm = reinterpret_cast<std::uint8_t*>(enc_smem4);
    __half* raw = reinterpret_cast<__half*>(sm + L::raw);
    std::uint16_t* codes16 = reinterpret_cast<std::uint16_t*>(sm + L::codes);  // NT == 2
    std::uint8_t* codes8 = sm + L::codes;                                      // NT == 1
    const unsigned* codes32 = reinterpret_cast<const unsigned*>(sm + L::codes);
    float* tau = reinterpret_cast<float*>(sm + L::tau);
    const std::uint8_t** srcs = reinterpret_cast<const std::uint8_t**>(sm + L::src);
    int2* tgts = reinterpret_cast<int2*>(sm + L::tgt);
    float* sks = reinterpret_cast<float*>(sm + L::sk);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, tig = lane & 3;
    const int H = a.n_kv_heads;
    const int jslice = blockIdx.y * (NW * JW);
    const int jbase = jslice + warp * JW;
    const bool jactive = jbase < a.m;  // m is a multiple of 32: then all JW rows are < m
    const bool lead = blockIdx.y == 0;

    unsigned bh[KS][NT][2], bl[KS][NT][2];
    float thrw;  // the largest near-zero factor of the warp's sketch rows (one compare per projection)
    {
        const float coef = qjl_enc_coef(D), absterm = 9.5367431640625e-07f * sqrtf(float(D));
        float nn = 0.f;
        if (jactive && lane < JW)
            for (int c = 0; c < D; ++c) {
                const float sv = __ldg(a.sketch + std::size_t(jbase + lane) * D + c);
                nn = fmaf(sv, sv, nn);
            }
        thrw = coef * sqrtf(nn) * 1.001f + absterm;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) thrw = fmaxf(thrw, __shfl_xor_sync(0xffffffffu, thrw, off));
        qjl_sketch_fragments<D, KS, NT>(a.sketch, jbase, jactive, g, tig, bh, bl);
    }

    const int ntg = (a.n_tokens + 31) / 32, nhp = (H + 1) / 2;
    const long long tiles = static_cast<long long>(a.batch) * ntg * nhp;
    const int B = static_cast<int>(a.layout.block_tokens), bsh = __ffs(B) - 1;
    // Row r of a tile: KV head 2 hp + r / 32, token 32 tg + r % 32 of sequence b.
    // Target of row tid (< RT) of `tile`: the input row pointer, and {page, token in block} (tok < 0:
    // no such row). The page entry is only loaded here; `store_meta` writes it to shared memory later.
    const std::uint8_t* m_src = nullptr;
    const std::uint32_t* m_page = nullptr;
    int m_tok = -1;
    auto load_meta = [&](long long tile) {
        m_src = nullptr;
        m_page = nullptr;
        m_tok = -1;
        if (tid >= RT || tile >= tiles) return;
        int hp, tg, b;
        if (tiles <= 0x7fffffffLL) {  // 32-bit division: the usual case, a third of the instructions
            const unsigned tl = static_cast<unsigned>(tile), q = tl / unsigned(nhp);
            hp = static_cast<int>(tl - q * unsigned(nhp));
            tg = static_cast<int>(q % unsigned(ntg));
            b = static_cast<int>(q / unsigned(ntg));
        } else {
            hp = static_cast<int>(tile % nhp);
            tg = static_cast<int>((tile / nhp) % ntg);
            b = static_cast<int>(tile / (static_cast<long long>(nhp) * ntg));
        }
        const int h = hp * 2 + tid / 32, t = tg * 32 + tid % 32;
        if (h >= H || t >= a.n_tokens) return;
        m_src = static_cast<const std::uint8_t*>(a.x) + enc_x_offset(a, b, t, h) * 2;
        const int pos = __ldg(a.pos0 + b) + t;
        m_page = a.pages + (std::size_t(b) * H + h) * a.page_stride + (pos >> bsh);
        m_tok = pos & (B - 1);
    };
    std::uint32_t m_pg = 0;
    auto issue_page = [&]() {
        if (m_page != nullptr) m_pg = __ldg(m_page);
    };
    auto store_meta = [&](int slot) {
        if (tid < RT) {
            srcs[slot * RT + tid] = m_src;
            tgts[slot * RT + tid] = make_int2(static_cast<int>(m_pg), m_tok);
        }
    };
    // Input rows of the tile whose targets are in `slot` into buffer `buf` (missing rows: zeros).
    auto prefetch = [&](int slot, int buf) {
        std::uint8_t* dst0 = reinterpret_cast<std::uint8_t*>(raw + std::size_t(buf) * RT * AST);
        static_assert((RT * CH) % NTHR == 0 || NTHR % (RT * CH) == 0, "whole rounds of chunks");
#pragma unroll
        for (int n = 0; n < (RT * CH + NTHR - 1) / NTHR; ++n) {
            const int i = tid + n * NTHR, r = i / CH, k = i % CH;
            const std::uint8_t* s = srcs[slot * RT + r];
            std::uint8_t* dst = dst0 + std::size_t(r) * AST * 2 + k * 16;
            if (s != nullptr)
                tc::cp_async16(dst, s + k * 16);
            else
                *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
        }
        tc::cp_async_commit();
    };

    for (int i = tid; i < NW * JW * D; i += NTHR) {  // once per CTA; scalar: the sketch needs no alignment
        const int j = jslice + i / D;
        sks[i] = j < a.m ? __ldg(a.sketch + std::size_t(j) * D + i % D) : 0.f;
    }
    // Prologue: targets of the first two tiles, the first tile's rows in flight (the barrier below
    // also publishes the sketch rows).
    const long long t0 = blockIdx.x, step = gridDim.x;
    load_meta(t0);
    issue_page();
    store_meta(0);
    load_meta(t0 + step);
    issue_page();
    store_meta(1);
    __syncthreads();
    prefetch(0, 0);

    int it = 0;
    for (long long tile = t0; tile < tiles; tile += step, ++it) {
        const int cur = it % 3, nxt = (it + 1) % 3, buf = it & 1;
        const __half* A = raw + std::size_t(buf) * RT * AST;
        tc::cp_async_wait<0>();
        __syncthreads();         // rows of this tile landed; the previous tile's readers of codes / buffers are done
        prefetch(nxt, buf ^ 1);  // the next tile's rows stream in during this tile
        load_meta(tile + 2 * step);
        issue_page();  // consumed after the mma: its latency is hidden there

        // Norms: 8 threads per row, thread p sums the squares of chunks p, p + 8, ... in fp32 (exact
        // squares; rounding of at most D/8 + 3 additions, each <= 2^-24 of the running sum), then a
        // butterfly over the 8 threads (the same value in all 8). |norm_f - ||k||| <= (D/16 + 3)
        // 2^-24 ||k||, and the CPU's float (float64 norm rounded once) is within 2^-24 (1 + 2^-29)
        // of ||k||: both lie in norm_f (1 -+ 2^-19) (D <= 256), so where both ends of that interval
        // round to the same fp16 value, so does the CPU's norm (rounding is monotone). Otherwise the
        // row's sum is redone in float64 (as the CPU and qjl_encode_kernel do).
#pragma unroll
        for (int q0 = 0; q0 < RT * 8; q0 += NTHR) {
            const int q = q0 + tid, r = q >> 3, p = q & 7;
            const __half* row = A + r * AST;
            float s = 0.f;
#pragma unroll
            for (int i = 0; i < D / 64; ++i) {
                const uint4 u = *reinterpret_cast<const uint4*>(row + (p + 8 * i) * 8);
                const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[k]));
                    s = fmaf(f.x, f.x, s);
                    s = fmaf(f.y, f.y, s);
                }
            }
            s += __shfl_xor_sync(0xffffffffu, s, 1);
            s += __shfl_xor_sync(0xffffffffu, s, 2);
            s += __shfl_xor_sync(0xffffffffu, s, 4);
            const float nf = __fsqrt_rn(s);
            std::uint16_t nh = __half_as_ushort(__float2half_rn(nf));
            const bool undecided = __half_as_ushort(__float2half_rn(nf * (1.0f - 1.9073486328125e-06f))) !=
                                   __half_as_ushort(__float2half_rn(nf * (1.0f + 1.9073486328125e-06f)));
            if (__any_sync(0xffffffffu, undecided)) {
                double sd = qjl_norm_f64_part<D>(row, p);
                sd += __shfl_xor_sync(0xffffffffu, sd, 1);
                sd += __shfl_xor_sync(0xffffffffu, sd, 2);
                sd += __shfl_xor_sync(0xffffffffu, sd, 4);
                if (undecided) nh = enc_f2h(static_cast<float>(sqrt(sd))).bits;
            }
            if (p == 0) {
                const int2 tg = tgts[cur * RT + r];
                // Zero rows (all projections exactly 0, sign 0) and missing rows skip the near-zero test.
                tau[r] = (tg.y >= 0 && s > 0.f) ? nf : -1.0f;
                if (lead && tg.y >= 0) {
                    std::uint8_t* blk = a.pool + std::size_t(static_cast<std::uint32_t>(tg.x)) * a.block_bytes;
                    reinterpret_cast<std::uint16_t*>(blk + a.layout.token_side_offset())[tg.y] = nh;
                }
            }
        }
        __syncthreads();  // tau

        // Projection on tensor cores: 64 rows x the warp's JW sketch rows, as two pairs of m-tiles.
        if (jactive) {
            const unsigned abase =
                static_cast<unsigned>(__cvta_generic_to_shared(A)) + ((lane & 15) * AST + (lane >> 4) * 8) * 2;
#pragma unroll 1
            for (int mp = 0; mp < RT / 32; ++mp) {
                const unsigned amp = abase + mp * (32 * AST * 2);  // constant offsets below
                float acc[2][NT][4];
#pragma unroll
                for (int p = 0; p < 2; ++p)
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) acc[p][nt][0] = acc[p][nt][1] = acc[p][nt][2] = acc[p][nt][3] = 0.f;
#pragma unroll
                for (int ks = 0; ks < KS; ++ks) {
                    unsigned af[2][4];
#pragma unroll
                    for (int p = 0; p < 2; ++p) qjl_ldmatrix_x4(af[p], amp + (p * 16 * AST + ks * 16) * 2);
#pragma unroll
                    for (int p = 0; p < 2; ++p)
#pragma unroll
                        for (int nt = 0; nt < NT; ++nt) {  // qjl_encode_kernel's order (its error bound)
                            tc::mma_m16n8k16_f16(acc[p][nt], af[p], bl[ks][nt]);
                            tc::mma_m16n8k16_f16(acc[p][nt], af[p], bh[ks][nt]);
                        }
                }
                const int rb = mp * 32 + g;
                const float4 th = make_float4(tau[rb] * thrw, tau[rb + 8] * thrw, tau[rb + 16] * thrw,
                                              tau[rb + 24] * thrw);  // th[p][hf]: row rb + 16 p + 8 hf
                // Sign bits by accumulator index (constant positions: one compare and one OR each),
                // spread to their sketch-row positions once below.
                unsigned sgn = 0;
                bool anynear = false;
#pragma unroll
                for (int p = 0; p < 2; ++p)
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int k = 0; k < 4; ++k) {
                            const float x = acc[p][nt][k];
                            if (x > 0.f) sgn |= 1u << (p * 4 * NT + nt * 4 + k);
                            const float t = (k >> 1) ? (p ? th.w : th.y) : (p ? th.z : th.x);
                            anynear |= fabsf(x) <= t;
                        }
                if (__any_sync(0xffffffffu, anynear)) {
                    QjlAccN<8 * NT> av;
#pragma unroll
                    for (int p = 0; p < 2; ++p)
#pragma unroll
                        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                            for (int k = 0; k < 4; ++k) av.v[p * 4 * NT + nt * 4 + k] = acc[p][nt][k];
                    sgn = qjl_recheck_f16<D, NT>(sgn, av, th, A + mp * 32 * AST, sks + std::size_t(warp) * JW * D);
                }
                if constexpr (NT == 2) {
                    // Bit nt 4 + 2 hf + e of m-tile p -> bit 16 hf + 8 nt + 2 tig + e of its word (row g
                    // in the low half, row g + 8 in the high half), then OR over the quad.
                    unsigned w[2];
#pragma unroll
                    for (int p = 0; p < 2; ++p) {
                        const unsigned l = (sgn >> (8 * p)) & 0xFFu;
                        w[p] = ((l & 0x3u) | ((l & 0xCu) << 14) | ((l & 0x30u) << 4) | ((l & 0xC0u) << 18))
                               << (2 * tig);
                        w[p] |= __shfl_xor_sync(0xffffffffu, w[p], 1);
                        w[p] |= __shfl_xor_sync(0xffffffffu, w[p], 2);
                    }
                    // Lane tig stores m-tile tig / 2, row half tig % 2.
                    const unsigned wv = (tig >> 1) ? w[1] : w[0];
                    codes16[(rb + (tig >> 1) * 16 + (tig & 1) * 8) * NW + warp] =
                        static_cast<std::uint16_t>((tig & 1) ? (wv >> 16) : (wv & 0xFFFFu));
                } else {
                    // Bit 2 hf + e of m-tile p (row rb + 16 p + 8 hf, sketch row 2 tig + e) -> bit
                    // 8 (2 p + hf) + 2 tig + e: byte q of the word is row rb + 8 q. OR over the quad.
                    unsigned wv = ((sgn & 0x3u) | ((sgn & 0xCu) << 6) | ((sgn & 0x30u) << 12) | ((sgn & 0xC0u) << 18))
                                  << (2 * tig);
                    wv |= __shfl_xor_sync(0xffffffffu, wv, 1);
                    wv |= __shfl_xor_sync(0xffffffffu, wv, 2);
                    // Lane tig stores byte tig (row rb + 8 tig).
                    codes8[(rb + 8 * tig) * NW + warp] = static_cast<std::uint8_t>(wv >> (8 * tig));
                }
            }
        }
        store_meta((it + 2) % 3);
        __syncthreads();  // codes

        // Codes out: 32 sketch rows (32 / JW warps' words) per store.
        constexpr int WPR = NW * JW / 32;  // 32-bit words per row
        static_assert((RT * WPR) % NTHR == 0 || NTHR % (RT * WPR) == 0, "whole rounds of words");
#pragma unroll
        for (int n = 0; n < (RT * WPR + NTHR - 1) / NTHR; ++n) {
            const int i = tid + n * NTHR;
            if (RT * WPR % NTHR != 0 && i >= RT * WPR) break;
            const int r = i / WPR, wd = i % WPR;
            const int2 tg = tgts[cur * RT + r];
            const int j0 = jslice + wd * 32;
            if (tg.y < 0 || j0 >= a.m) continue;
            std::uint8_t* blk = a.pool + std::size_t(static_cast<std::uint32_t>(tg.x)) * a.block_bytes;
            *reinterpret_cast<unsigned*>(blk + std::size_t(tg.y) * a.layout.code_bytes + j0 / 8) = codes32[i];
        }
    }
    tc::cp_async_wait<0>();
}

inline std::size_t qjl_enc_smem_bytes(int d, bool f16in, int outliers) {
    const bool o = outliers > 0;
    switch (d) {
        case 64: return f16in ? QjlEncSmem<64, true>::bytes(o) : QjlEncSmem<64, false>::bytes(o);
        case 128: return f16in ? QjlEncSmem<128, true>::bytes(o) : QjlEncSmem<128, false>::bytes(o);
        default: return f16in ? QjlEncSmem<256, true>::bytes(o) : QjlEncSmem<256, false>::bytes(o);
    }
}

inline int enc_sm_count() {
    int dev = 0, sms = 0;
    KVQ_CUDA_CHECK(cudaGetDevice(&dev));
    KVQ_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    return sms;
}

}  // namespace detail

inline CheckResult can_implement(const QjlEncodeArgs& a) {
    const char* who = "kvq::cuda::launch_qjl_encode";
    CheckResult r = detail::enc_check_target(a, who);
    if (!r.ok) return r;
    auto fail = [&](std::string msg) { return CheckResult{false, std::string(who) + ": " + std::move(msg)}; };
    if (a.m < 32 || a.m > 1024 || a.m % 32 != 0) return fail("m must be a multiple of 32 in [32, 1024]");
    if (a.outliers < 0 || a.outliers > 16) return fail("outliers must be in [0, 16]");
    if (a.outliers > 0 && (a.m_outlier < 32 || a.m_outlier > 1024 || a.m_outlier % 32 != 0))
        return fail("m_outlier must be a multiple of 32 in [32, 1024]");
    if (a.outliers == 0 && a.m_outlier != 0) return fail("m_outlier must be 0 without outliers");
    const int rows = a.outliers > 0 ? (a.m > a.m_outlier ? a.m : a.m_outlier) : a.m;
    if (a.sketch_rows != rows || !a.sketch) return fail("sketch (device, max(m, m_outlier) rows) must be set");
    const std::uint32_t B = a.layout.block_tokens;
    if (a.layout.code_bytes != std::uint32_t(a.m + a.m_outlier) / 8 ||
        a.layout.token_side_bytes != (a.outliers > 0 ? 4u : 2u) ||
        a.layout.block_side_bytes != (a.outliers > 0 ? B / 32 * std::uint32_t(a.outliers) : 0u))
        return fail("layout does not match the QJL parameters (use set_qjl_codec)");
    if (a.outliers > 0 && (B % 32 != 0 || a.n_tokens % 32 != 0))
        return fail("with outliers, block_tokens and n_tokens must be multiples of 32 (pos0 too, not checked)");
    return {};
}

inline void launch_qjl_encode(const QjlEncodeArgs& a, cudaStream_t stream, void* /*workspace*/ = nullptr,
                              std::size_t /*workspace_bytes*/ = 0) {
    const CheckResult ok = can_implement(a);
    KVQ_CHECK(ok.ok, ok.message);
    if (a.n_tokens == 0) return;
    const bool f16 = a.x_type == QueryType::F16;
    const int jslice = (a.head_dim <= 128 ? 16 : 8) * detail::kQjlEncJW;
    const int ny = (a.m + jslice - 1) / jslice;
    const long long tiles = static_cast<long long>(a.batch) * ((a.n_tokens + 31) / 32) * ((a.n_kv_heads + 1) / 2);
    static const int sms = detail::enc_sm_count();
    long long nx = (static_cast<long long>(sms) + ny - 1) / ny;
    if (nx > tiles) nx = tiles;
    const dim3 grid(static_cast<unsigned>(nx), static_cast<unsigned>(ny));
    if (f16 && a.outliers == 0 && !a.legacy_kernel) {
        auto fast = [&](auto kernel, std::size_t bytes) {
            KVQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
            kernel<<<grid, a.head_dim <= 128 ? 512 : 256, bytes, stream>>>(a);
            KVQ_CUDA_CHECK_LAUNCH("qjl_encode_f16_kernel");
        };
        switch (a.head_dim) {
            case 64: fast(detail::qjl_encode_f16_kernel<64>, detail::QjlFastSmem<64>::bytes); break;
            case 128: fast(detail::qjl_encode_f16_kernel<128>, detail::QjlFastSmem<128>::bytes); break;
            default: fast(detail::qjl_encode_f16_kernel<256>, detail::QjlFastSmem<256>::bytes); break;
        }
        return;
    }
    const std::size_t smem = detail::qjl_enc_smem_bytes(a.head_dim, f16, a.outliers);
    auto go = [&](auto kernel) {
        KVQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
        kernel<<<grid, a.head_dim <= 128 ? 512 : 256, smem, stream>>>(a);
        KVQ_CUDA_CHECK_LAUNCH("qjl_encode_kernel");
    };
    switch (a.head_dim) {
        case 64: f16 ? go(detail::qjl_encode_kernel<64, true>) : go(detail::qjl_encode_kernel<64, false>); break;
        case 128: f16 ? go(detail::qjl_encode_kernel<128, true>) : go(detail::qjl_encode_kernel<128, false>); break;
        default: f16 ? go(detail::qjl_encode_kernel<256, true>) : go(detail::qjl_encode_kernel<256, false>); break;
    }
}

}  // namespace kvq::cuda
