// GPU encode (cuda/kvq/cuda/encode.cuh) against the CPU codecs, byte for byte: tokens of a batch of
// sequences written at arbitrary stream positions (partially filled blocks, shuffled page tables,
// garbage in every byte the call must not touch), fp32 and fp16 inputs, d = 64/128/256.
//  * Token-wise / WKV: the whole pool must be identical.
//  * QJL: identical except sign bits whose exact (float64) projection is within the CPU's fp32
//    rounding bound of zero, |<s_j, k>| <= d 2^-23 sum_c |s_jc k_c|. Those bits are counted; on
//    random inputs their fraction must be below 1e-6.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

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
#include "kvq/quant/wkv_codec.hpp"

namespace {

template <class T>
struct Dev {
    T* p = nullptr;
    explicit Dev(std::size_t n) { KVQ_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T))); }
    explicit Dev(const std::vector<T>& v) : Dev(v.size()) {
        if (!v.empty()) KVQ_CUDA_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    }
    ~Dev() { cudaFree(p); }
    Dev(const Dev&) = delete;
    Dev& operator=(const Dev&) = delete;
};

struct EncCase {
    int d = 128, H = 4, batch = 2, n = 77, B = 64;
    std::vector<int> pos0{0, 45};
    bool f16 = false;
    // QJL
    int m = 256, mo = 0, ko = 0;
    kvq::SketchKind sketch = kvq::SketchKind::BlockOrthogonal;
    bool adversarial = false;  // keys = sketch rows: many projections at float rounding of zero
    bool legacy = false;       // QjlEncodeArgs::legacy_kernel
    bool norm_ties = false;    // rows whose norm is an fp16 rounding tie or just off one, and zero rows
    // token-wise
    int bits = 4, group = 32;
    bool wkv = false;
    bool reciprocal = false;  // TokenwiseEncodeArgs::reciprocal_codes
    bool vec = false;         // TokenwiseEncodeArgs::vector_kernel
    bool ties = false;        // token-wise inputs on a half-step grid: every code a rounding tie
    bool zeros = false;       // token-wise: groups whose minimum / maximum is a zero of either sign
    bool offset = false;      // token-wise: groups far from 0 (fp16 rounding of the minimum >> step)
    bool wkv_edges = false;   // WKV: x == shift (smoothed zeros), scales outside [2^-30, 2^30]
    int pad = 0;              // token-wise: extra elements between tokens (x_token_stride)
    bool graph = false;       // token-wise: launch inside a captured CUDA graph
    std::uint32_t seed = 1;
};

// Inputs, pool with garbage, shuffled page tables: shared by both codecs.
struct Setup {
    std::vector<float> x;           // [batch][n][H][d] (fp16-representable when f16)
    std::vector<std::uint16_t> xh;  // fp16 bits when f16
    std::vector<std::uint32_t> pages;
    std::int64_t stride = 0;
    std::vector<std::uint8_t> pool;
    std::size_t block_bytes = 0;
};

Setup make_setup(const EncCase& c, const kvq::BlockLayout& l) {
    Setup s;
    std::mt19937 rng(c.seed);
    std::normal_distribution<float> nd(0.f, 1.f);
    const std::size_t rows = std::size_t(c.batch) * c.n * c.H;
    s.x.resize(rows * c.d);
    std::vector<float> chs(c.d);
    for (int ch = 0; ch < c.d; ++ch) chs[ch] = (ch % 17 == 3) ? 8.f : 0.5f + float(ch % 5) * 0.3f;  // outlier channels
    for (std::size_t r = 0; r < rows; ++r)
        for (int ch = 0; ch < c.d; ++ch) s.x[r * c.d + ch] = nd(rng) * chs[ch] + 0.25f;
    if (c.ties) {
        // Per group: minimum 0 and maximum 2^b - 1 (so step = 1 exactly), the rest on the grid of
        // halves in between: (x - min) / step lands exactly between two codes, the case where the
        // reciprocal path must fall back to the division.
        const int levels = (1 << c.bits) - 1;
        std::uniform_int_distribution<int> half_steps(0, 2 * levels);
        for (std::size_t r = 0; r < rows; ++r)
            for (int ch = 0; ch < c.d; ++ch) {
                const int in_group = ch % c.group;
                s.x[r * c.d + ch] = in_group == 0 ? 0.f : in_group == 1 ? float(levels) : 0.5f * half_steps(rng);
            }
    }
    if (c.zeros) {
        // Per (row, group), by a hash: 1 minimum is +0 and -0 (order varies), 2 maximum is, 3 all
        // zeros of mixed signs, 4 constant group; else random. The CPU keeps the first of equal values,
        // so the stored fp16 minimum / step carry that zero's sign.
        for (std::size_t r = 0; r < rows; ++r)
            for (int g0 = 0; g0 < c.d; g0 += c.group) {
                float* x = &s.x[r * c.d + g0];
                const unsigned mode = static_cast<unsigned>(rng() % 6), i = rng() % c.group, j = rng() % c.group;
                const float z1 = (rng() & 1) ? -0.0f : 0.0f;
                if (mode == 1 || mode == 2)
                    for (int k = 0; k < c.group; ++k) x[k] = (mode == 1 ? 1.f : -1.f) * (std::fabs(x[k]) + 0.125f);
                if (mode == 1 || mode == 2 || mode == 3) {
                    if (mode == 3)
                        for (int k = 0; k < c.group; ++k) x[k] = (rng() & 1) ? -0.0f : 0.0f;
                    x[i] = z1;
                    x[j] = -z1;
                }
                if (mode == 4)
                    for (int k = 0; k < c.group; ++k) x[k] = 1.5f;
            }
    }
    if (c.offset)
        for (std::size_t r = 0; r < rows; ++r)
            for (int ch = 0; ch < c.d; ++ch)
                s.x[r * c.d + ch] = 100.f * float(1 + (r + ch / c.group) % 7) + s.x[r * c.d + ch] * 0.01f;
    if (c.norm_ties) {
        // Row r % 4: 0 random; 1 norm exactly 2049 2^-k (the midpoint of two fp16 values: a tie, RNE
        // goes down to 2048 2^-k); 2 norm sqrt(2049^2 + 3) 2^-k, just above that midpoint (fp32 sums
        // cannot decide it: the float64 fallback must); 3 all zeros. Channels and signs vary.
        for (std::size_t r = 0; r < rows; ++r) {
            const int mode = static_cast<int>(r % 4);
            if (mode == 0) continue;
            float* x = &s.x[r * c.d];
            std::fill(x, x + c.d, 0.0f);
            if (mode == 3) continue;
            const float sc = std::ldexp(1.0f, -static_cast<int>((r / 4) % 21));
            const int c0 = static_cast<int>(r % c.d), c1 = (c0 + 1 + static_cast<int>(r % 5)) % c.d,
                      c2 = (c0 + 7 + static_cast<int>(r % 11)) % c.d;
            x[c0] = (r & 8 ? -2048.f : 2048.f) * sc;
            x[c1] = (r & 16 ? -64.f : 64.f) * sc;
            x[c2] = (mode == 1 ? 1.f : 2.f) * (r & 32 ? -sc : sc);
        }
    }
    if (c.f16) {
        s.xh.resize(s.x.size());
        for (std::size_t i = 0; i < s.x.size(); ++i) {
            s.xh[i] = kvq::float_to_half(s.x[i]).bits;
            s.x[i] = kvq::half_to_float(kvq::half_t{s.xh[i]});
        }
    }
    int max_pages = 0;
    for (int b = 0; b < c.batch; ++b) max_pages = std::max(max_pages, (c.pos0[b] + c.n + c.B - 1) / c.B);
    s.stride = max_pages + 1;
    const int n_blocks = c.batch * c.H * max_pages + 3;
    std::vector<std::uint32_t> ids(n_blocks);
    std::iota(ids.begin(), ids.end(), 0u);
    std::shuffle(ids.begin(), ids.end(), rng);
    s.pages.assign(std::size_t(c.batch) * c.H * s.stride, 0xFFFFFFFFu);
    int next = 0;
    for (int b = 0; b < c.batch; ++b)
        for (int h = 0; h < c.H; ++h)
            for (int p = 0; p < max_pages; ++p) s.pages[(std::size_t(b) * c.H + h) * s.stride + p] = ids[next++];
    s.block_bytes = l.bytes() + 16;
    s.pool.resize(std::size_t(n_blocks) * s.block_bytes);
    for (auto& v : s.pool) v = static_cast<std::uint8_t>(rng());
    return s;
}

// Runs launch(stream) on a new stream, directly or captured in a CUDA graph that is replayed twice (an
// encode rewrites the same bytes, so the second replay must leave the pool as the first did), and waits.
template <class F>
void launch_on_stream(bool graph, F&& launch) {
    cudaStream_t st;
    KVQ_CUDA_CHECK(cudaStreamCreate(&st));
    if (graph) {
        cudaGraph_t g;
        cudaGraphExec_t ge;
        KVQ_CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
        launch(st);
        KVQ_CUDA_CHECK(cudaStreamEndCapture(st, &g));
        KVQ_CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
        KVQ_CUDA_CHECK(cudaGraphLaunch(ge, st));
        KVQ_CUDA_CHECK(cudaGraphLaunch(ge, st));
        KVQ_CUDA_CHECK(cudaStreamSynchronize(st));
        KVQ_CUDA_CHECK(cudaGraphExecDestroy(ge));
        KVQ_CUDA_CHECK(cudaGraphDestroy(g));
    } else {
        launch(st);
    }
    KVQ_CUDA_CHECK(cudaStreamSynchronize(st));
    KVQ_CUDA_CHECK(cudaStreamDestroy(st));
}

template <class Args>
void fill_target(Args& a, const EncCase& c, const Setup& s, const void* x, const int* pos0, std::uint8_t* pool,
                 const std::uint32_t* pages) {
    a.head_dim = c.d;
    a.n_kv_heads = c.H;
    a.batch = c.batch;
    a.n_tokens = c.n;
    a.x = x;
    a.x_type = c.f16 ? kvq::cuda::QueryType::F16 : kvq::cuda::QueryType::F32;
    a.pos0 = pos0;
    a.pool = pool;
    a.block_bytes = s.block_bytes;
    a.pages = pages;
    a.page_stride = s.stride;
}

// CPU reference: encode every (sequence, head) stream's tokens block segment by block segment.
template <class F>
void cpu_encode(const EncCase& c, const Setup& s, std::vector<std::uint8_t>& pool, int gran, F&& encode) {
    std::vector<float> rowbuf;
    for (int b = 0; b < c.batch; ++b)
        for (int h = 0; h < c.H; ++h) {
            int t = 0;
            while (t < c.n) {
                const int pos = c.pos0[b] + t, first = pos % c.B;
                const int cnt = std::min(c.n - t, c.B - first);
                rowbuf.resize(std::size_t(cnt) * c.d);
                for (int i = 0; i < cnt; ++i)
                    std::memcpy(&rowbuf[std::size_t(i) * c.d], &s.x[((std::size_t(b) * c.n + t + i) * c.H + h) * c.d],
                                c.d * sizeof(float));
                const std::uint32_t page = s.pages[(std::size_t(b) * c.H + h) * s.stride + pos / c.B];
                EXPECT_EQ(cnt % gran, 0);
                encode(h, rowbuf.data(), cnt, pool.data() + std::size_t(page) * s.block_bytes, first);
                t += cnt;
            }
        }
}

struct QjlResult {
    long long near_zero_bits = 0, total_bits = 0, bad = 0;
    // Differing bytes by field (any of them but near-zero sign bits is a failure).
    long long wrong_sign_bits = 0, norm_in_bytes = 0, norm_out_bytes = 0, id_bytes = 0, untouched_bytes = 0;
};

QjlResult run_qjl(const EncCase& c, bool graph = false) {
    kvq::QjlParams p;
    p.head_dim = c.d;
    p.m = c.m;
    p.m_outlier = c.mo;
    p.outliers = c.ko;
    p.sketch = c.sketch;
    const kvq::QjlKeyCodec codec(p);
    const kvq::BlockLayout l = codec.layout(c.B);
    Setup s = make_setup(c, l);
    if (c.adversarial) {
        const auto& S = codec.sketch();
        for (std::size_t r = 0; r < s.x.size() / c.d; ++r)
            for (int ch = 0; ch < c.d; ++ch) s.x[r * c.d + ch] = S[(r % codec.sketch_rows()) * c.d + ch];
        if (c.f16)  // fp16 keys: the projections onto the other rows are fp16 rounding noise, near the bound
            for (std::size_t i = 0; i < s.x.size(); ++i) {
                s.xh[i] = kvq::float_to_half(s.x[i]).bits;
                s.x[i] = kvq::half_to_float(kvq::half_t{s.xh[i]});
            }
    }
    std::vector<std::uint8_t> ref = s.pool;
    cpu_encode(c, s, ref, codec.granularity(),
               [&](int, const float* x, int n, std::uint8_t* blk, int first) { codec.encode(x, n, blk, c.B, first); });

    Dev<float> dx(c.f16 ? std::vector<float>{} : s.x);
    Dev<std::uint16_t> dxh(s.xh);
    Dev<int> dpos(c.pos0);
    Dev<std::uint8_t> dpool(s.pool);
    Dev<std::uint32_t> dpages(s.pages);
    Dev<float> dS(codec.sketch());
    kvq::cuda::QjlEncodeArgs a;
    fill_target(a, c, s, c.f16 ? static_cast<const void*>(dxh.p) : dx.p, dpos.p, dpool.p, dpages.p);
    kvq::cuda::set_qjl_codec(a, codec, c.B);
    a.sketch = dS.p;
    a.legacy_kernel = c.legacy;
    const auto ok = kvq::cuda::can_implement(a);
    EXPECT_TRUE(ok.ok) << ok.message;
    launch_on_stream(graph, [&](cudaStream_t st) { kvq::cuda::launch_qjl_encode(a, st); });
    std::vector<std::uint8_t> got(s.pool.size());
    KVQ_CUDA_CHECK(cudaMemcpy(got.data(), dpool.p, got.size(), cudaMemcpyDeviceToHost));

    // Inverse page map: block id -> (b, h, page index).
    std::vector<std::array<int, 3>> owner(s.pool.size() / s.block_bytes, {-1, -1, -1});
    for (int b = 0; b < c.batch; ++b)
        for (int h = 0; h < c.H; ++h)
            for (int pg = 0; pg + 1 < s.stride; ++pg)
                owner[s.pages[(std::size_t(b) * c.H + h) * s.stride + pg]] = {b, h, pg};
    QjlResult res;
    res.total_bits = static_cast<long long>(c.batch) * c.n * c.H * (c.m + codec.outlier_bits());
    const auto& S = codec.sketch();
    int reported = 0;  // the first few failures of each run in detail, then only the counts
    auto report = [&]() -> bool { return ++reported <= 8; };
    for (std::size_t i = 0; i < got.size(); ++i) {
        if (got[i] == ref[i]) continue;
        const std::size_t blk = i / s.block_bytes, off = i % s.block_bytes;
        const auto [b, h, pg] = owner[blk];
        if (b < 0 || off >= l.token_side_offset()) {  // only code bytes may differ
            ++res.bad;
            const std::size_t ts = l.token_side_offset(), bs = l.block_side_offset();
            const char* field = "untouched";
            if (b >= 0 && off >= ts && off < ts + 2 * std::size_t(c.B)) {
                field = "inlier norm";
                ++res.norm_in_bytes;
            } else if (b >= 0 && c.ko > 0 && off >= ts + 2 * std::size_t(c.B) && off < bs) {
                field = "outlier norm";
                ++res.norm_out_bytes;
            } else if (b >= 0 && c.ko > 0 && off >= bs && off < bs + l.block_side_bytes) {
                field = "outlier ids";
                ++res.id_bytes;
            } else {
                ++res.untouched_bytes;
            }
            if (report())
                ADD_FAILURE() << field << " byte " << i << " (block " << blk << ", offset " << off << ") differs: gpu "
                              << int(got[i]) << " cpu " << int(ref[i]);
            continue;
        }
        const int tok = static_cast<int>(off / l.code_bytes), byte = static_cast<int>(off % l.code_bytes);
        const int t = pg * c.B + tok - c.pos0[b];
        if (t < 0 || t >= c.n) {
            ++res.bad;
            ++res.untouched_bytes;
            if (report()) ADD_FAILURE() << "untouched token changed at block " << blk;
            continue;
        }
        const float* x = &s.x[((std::size_t(b) * c.n + t) * c.H + h) * c.d];
        // Outlier channels of the token's group (from the reference bytes).
        std::vector<int> outl;
        if (c.ko > 0) {
            const std::uint8_t* ids = &ref[blk * s.block_bytes + l.block_side_offset() + std::size_t(tok / 32) * c.ko];
            outl.assign(ids, ids + c.ko);
        }
        const unsigned diff = got[i] ^ ref[i];
        for (int bit = 0; bit < 8; ++bit) {
            if (!((diff >> bit) & 1u)) continue;
            const int jj = byte * 8 + bit;
            const bool is_out = jj >= c.m;
            const int j = is_out ? jj - c.m : jj;
            double pj = 0, sa = 0;
            for (int ch = 0; ch < c.d; ++ch) {
                const bool o = std::find(outl.begin(), outl.end(), ch) != outl.end();
                if (o != is_out) continue;
                const double term = double(S[std::size_t(j) * c.d + ch]) * x[ch];
                pj += term;
                sa += std::fabs(term);
            }
            const double bound = c.d * std::ldexp(1.0, -23) * sa;
            if (std::fabs(pj) <= bound) {
                ++res.near_zero_bits;
            } else {
                ++res.bad;
                ++res.wrong_sign_bits;
                if (report())
                    ADD_FAILURE() << "sign bit " << jj << " of token " << t << " head " << h << " differs: projection "
                                  << pj << " bound " << bound << " gpu " << ((got[i] >> bit) & 1) << " cpu "
                                  << ((ref[i] >> bit) & 1);
            }
        }
    }
    if (res.bad > 0)
        ADD_FAILURE() << "[qjl encode, " << (c.legacy ? "legacy" : "new") << " kernel, d " << c.d << " m " << c.m
                      << " outliers " << c.ko << " f16 " << c.f16 << "] differing: wrong sign bits "
                      << res.wrong_sign_bits << ", inlier norm bytes " << res.norm_in_bytes << ", outlier norm bytes "
                      << res.norm_out_bytes << ", outlier id bytes " << res.id_bytes << ", bytes that must not change "
                      << res.untouched_bytes << " (near-zero sign bits, allowed: " << res.near_zero_bits << ")";
    return res;
}

// Names the first differing bytes of a token-wise pool: block, field (codes / step / min / outside
// the written tokens), token, channel or group, GPU and CPU values; counts per field.
void report_tokenwise_diffs(const EncCase& c, const Setup& s, const kvq::BlockLayout& l,
                            const std::vector<std::uint8_t>& got, const std::vector<std::uint8_t>& ref) {
    std::vector<char> written(got.size() / s.block_bytes * c.B, 0);  // [block][token]
    for (int b = 0; b < c.batch; ++b)
        for (int h = 0; h < c.H; ++h)
            for (int t = 0; t < c.n; ++t) {
                const int pos = c.pos0[b] + t;
                written[std::size_t(s.pages[(std::size_t(b) * c.H + h) * s.stride + pos / c.B]) * c.B + pos % c.B] = 1;
            }
    const int ng = c.d / c.group;
    const std::size_t side = l.token_side_offset(), codes_end = std::size_t(c.B) * l.code_bytes;
    std::size_t n_codes = 0, n_step = 0, n_min = 0, n_outside = 0, ndiff = 0;
    testing::Message m;
    for (std::size_t i = 0; i < got.size(); ++i) {
        if (got[i] == ref[i]) continue;
        const std::size_t blk = i / s.block_bytes, o = i % s.block_bytes;
        std::string what;
        int tok = -1, field = 3;  // codes, step, min, other
        if (o < codes_end) {
            tok = static_cast<int>(o / l.code_bytes);
            const int byte = static_cast<int>(o % l.code_bytes), per = 8 / c.bits;
            field = 0;
            what = "codes byte " + std::to_string(byte) + " (channels " + std::to_string(byte * per) + ".." +
                   std::to_string(byte * per + per - 1) + ")";
        } else if (o >= side && o < side + std::size_t(c.B) * ng * 4) {
            const std::size_t e = (o - side) / 2;
            const bool is_min = e >= std::size_t(c.B) * ng;
            const std::size_t k = e % (std::size_t(c.B) * ng);
            tok = static_cast<int>(k / ng);
            field = is_min ? 2 : 1;
            what = std::string(is_min ? "fp16 min" : "fp16 step") + " of group " + std::to_string(k % ng);
        } else {
            what = "padding after the layout";
        }
        const bool inside = tok >= 0 && written[blk * c.B + tok];
        if (!inside)
            ++n_outside;
        else
            ++(field == 0 ? n_codes : field == 1 ? n_step : n_min);
        if (ndiff++ < 8)
            m << "\n  block " << blk << " offset " << o << ": " << what << " of token " << tok
              << (inside ? "" : " [NOT WRITTEN: must be untouched]") << ", gpu 0x" << std::hex << int(got[i])
              << " cpu 0x" << int(ref[i]) << std::dec;
    }
    if (ndiff > 0)
        ADD_FAILURE() << "[token-wise encode, kernel "
                      << (c.vec          ? "vector"
                          : c.reciprocal ? "reciprocal"
                                         : "division")
                      << ", d " << c.d << " bits " << c.bits << " group " << c.group << " f16 " << c.f16 << " wkv "
                      << c.wkv << "] " << ndiff << " bytes differ: codes " << n_codes << ", steps " << n_step
                      << ", minimums " << n_min << ", bytes outside the written tokens " << n_outside
                      << "; first ones:" << m;
}

void run_tokenwise(const EncCase& c) {
    const kvq::TokenwiseCodec codec(kvq::TokenwiseParams{c.d, c.bits, c.group});
    const kvq::BlockLayout l = codec.layout(c.B);
    Setup s = make_setup(c, l);
    std::mt19937 rng(c.seed + 99);
    std::uniform_real_distribution<float> ud(0.5f, 2.f), us(-0.5f, 0.5f);
    std::vector<float> shift(std::size_t(c.H) * c.d), scale(shift.size());
    for (auto& v : shift) v = us(rng);
    for (auto& v : scale) v = ud(rng);
    if (c.wkv_edges)
        for (int h = 0; h < c.H; ++h)
            for (int ch = 0; ch < c.d; ch += 5) {
                const std::size_t k = std::size_t(h) * c.d + ch;
                switch ((ch / 5) % 4) {
                    case 0: shift[k] = s.x[std::size_t(h) * c.d + ch]; break;  // token 0 of sequence 0: x - shift = 0
                    case 1: scale[k] = 0x1p40f; break;                         // tiny smoothed values
                    case 2: scale[k] = 0x1p31f; break;
                    default: scale[k] = -scale[k]; break;
                }
            }
    std::vector<float> sm(c.d);
    std::vector<std::uint8_t> ref = s.pool;
    cpu_encode(c, s, ref, 1, [&](int h, const float* x, int n, std::uint8_t* blk, int first) {
        if (!c.wkv) return codec.encode(x, n, blk, c.B, first);
        std::vector<float> xs(std::size_t(n) * c.d);
        const std::vector<float> sh(shift.begin() + std::size_t(h) * c.d, shift.begin() + std::size_t(h + 1) * c.d);
        const std::vector<float> sc(scale.begin() + std::size_t(h) * c.d, scale.begin() + std::size_t(h + 1) * c.d);
        kvq::wkv_smooth_rows(x, n, sh, sc, xs.data());
        codec.encode(xs.data(), n, blk, c.B, first);
    });
    // Padded input rows (x_token_stride = H d + pad) when asked; the garbage in the gaps is never read.
    const std::size_t row = std::size_t(c.H) * c.d, ts = row + c.pad, ntok = std::size_t(c.batch) * c.n;
    std::vector<float> xf;
    std::vector<std::uint16_t> xh;
    if (c.f16) {
        xh.assign(ntok * ts, 0x7E00);  // NaN in the gaps
        for (std::size_t t = 0; t < ntok; ++t) std::copy_n(&s.xh[t * row], row, &xh[t * ts]);
    } else {
        xf.assign(ntok * ts, std::nanf(""));
        for (std::size_t t = 0; t < ntok; ++t) std::copy_n(&s.x[t * row], row, &xf[t * ts]);
    }
    Dev<float> dx(xf);
    Dev<std::uint16_t> dxh(xh);
    Dev<int> dpos(c.pos0);
    Dev<std::uint8_t> dpool(s.pool);
    Dev<std::uint32_t> dpages(s.pages);
    Dev<float> dshift(shift), dscale(scale);
    kvq::cuda::TokenwiseEncodeArgs a;
    fill_target(a, c, s, c.f16 ? static_cast<const void*>(dxh.p) : dx.p, dpos.p, dpool.p, dpages.p);
    if (c.pad) a.x_token_stride = static_cast<std::int64_t>(ts);
    kvq::cuda::set_tokenwise_codec(a, codec, c.B);
    a.reciprocal_codes = c.reciprocal;
    a.vector_kernel = c.vec;
    if (c.wkv) {
        a.shift = dshift.p;
        a.scale = dscale.p;
    }
    launch_on_stream(c.graph, [&](cudaStream_t st) { kvq::cuda::launch_tokenwise_encode(a, st); });
    KVQ_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<std::uint8_t> got(s.pool.size());
    KVQ_CUDA_CHECK(cudaMemcpy(got.data(), dpool.p, got.size(), cudaMemcpyDeviceToHost));
    report_tokenwise_diffs(c, s, l, got, ref);
}

// The three kernels: division (vector_kernel = false), reciprocal (reciprocal_codes), vector (the default).
enum TwKernel { kDivision, kReciprocal, kVector };
void set_kernel(EncCase& c, int k) {
    c.reciprocal = k == kReciprocal;
    c.vec = k == kVector;
}
const char* kernel_name(int k) { return k == kDivision ? "division" : k == kReciprocal ? "reciprocal" : "vector"; }

}  // namespace

TEST(GpuEncode, TokenwiseMatchesCpuBytes) {
    for (int k : {kDivision, kReciprocal, kVector})
        for (int d : {64, 128, 256})
            for (int bits : {2, 4, 8})
                for (int group : {d / 32, d == 256 ? 16 : 8, 32, d})
                    for (bool f16 : {false, true}) {
                        EncCase c;
                        c.d = d;
                        c.bits = bits;
                        c.group = group;
                        c.f16 = f16;
                        set_kernel(c, k);
                        c.H = 3;
                        c.batch = 2;
                        c.n = 37;
                        c.B = 16;
                        c.pos0 = {5, 16};
                        c.seed = d * 100 + bits * 10 + group + f16;
                        SCOPED_TRACE(testing::Message() << kernel_name(k) << " kernel, d " << d << " bits " << bits
                                                        << " group " << group << " f16 " << f16);
                        run_tokenwise(c);
                    }
}

TEST(GpuEncode, TokenwiseRoundingTiesMatchCpuBytes) {
    for (int k : {kDivision, kReciprocal, kVector})
        for (int bits : {2, 4, 8})
            for (int group : {4, 8, 32, 128}) {
                EncCase c;
                c.bits = bits;
                c.group = group;
                c.ties = true;
                c.f16 = bits != 4;  // both input types (halves up to 255 are fp16-exact)
                set_kernel(c, k);
                c.H = 2;
                c.n = 40;
                c.seed = 300 + bits + group;
                SCOPED_TRACE(testing::Message() << kernel_name(k) << " kernel, bits " << bits << " group " << group);
                run_tokenwise(c);
            }
}

// Signed zeros as a group's minimum or maximum (the CPU keeps the first; min/max instructions may
// not), all-zero and constant groups.
TEST(GpuEncode, TokenwiseSignedZerosMatchCpuBytes) {
    for (int k : {kDivision, kReciprocal, kVector})
        for (int d : {64, 128})
            for (int bits : {2, 8})
                for (int group : {8, 32, d})
                    for (bool f16 : {false, true}) {
                        EncCase c;
                        c.d = d;
                        c.bits = bits;
                        c.group = group;
                        c.f16 = f16;
                        c.zeros = true;
                        set_kernel(c, k);
                        c.H = 3;
                        c.n = 50;
                        c.pos0 = {3, 70};
                        c.seed = 900 + d + bits + group + f16;
                        SCOPED_TRACE(testing::Message() << kernel_name(k) << " kernel, d " << d << " bits " << bits
                                                        << " group " << group << " f16 " << f16);
                        run_tokenwise(c);
                    }
}

// Groups far from zero: fp16(min) differs from the minimum by much more than a step, so (x - lo) / step
// leaves [0, 2^b - 1] on both sides (fp32 input) and the clamps decide.
TEST(GpuEncode, TokenwiseOffsetGroupsMatchCpuBytes) {
    for (int k : {kDivision, kReciprocal, kVector})
        for (int bits : {2, 4, 8})
            for (bool f16 : {false, true}) {
                EncCase c;
                c.bits = bits;
                c.group = 32;
                c.f16 = f16;
                c.offset = true;
                set_kernel(c, k);
                c.H = 2;
                c.n = 64;
                c.seed = 1300 + bits + f16;
                SCOPED_TRACE(testing::Message() << kernel_name(k) << " kernel, bits " << bits << " f16 " << f16);
                run_tokenwise(c);
            }
}

// Shapes that stress the vector kernel's addressing: long runs (many CTAs per head), tokens of one
// warp's chunk spread over several small blocks, odd starts, padded input rows, one KV head, many
// sequences, and a captured graph.
TEST(GpuEncode, TokenwiseLayoutsMatchCpuBytes) {
    struct L {
        int d, H, batch, n, B, pad;
        std::vector<int> pos0;
        bool graph;
    };
    const std::vector<L> ls = {{128, 2, 2, 1000, 64, 0, {0, 37}, false},
                               {128, 1, 3, 77, 2, 8, {1, 0, 5}, false},
                               {64, 5, 2, 300, 4, 16, {3, 250}, false},
                               {256, 3, 2, 45, 1, 0, {7, 0}, false},
                               {128, 4, 8, 1, 64, 0, {0, 1, 63, 64, 65, 127, 128, 500}, false},
                               {128, 3, 2, 200, 16, 8, {9, 64}, true}};
    for (int k : {kDivision, kReciprocal, kVector})
        for (const L& x : ls)
            for (bool f16 : {false, true}) {
                EncCase c;
                c.d = x.d;
                c.H = x.H;
                c.batch = x.batch;
                c.n = x.n;
                c.B = x.B;
                c.pad = x.pad;
                c.pos0 = x.pos0;
                c.graph = x.graph;
                c.bits = 4;
                c.group = 32;
                c.f16 = f16;
                set_kernel(c, k);
                c.seed = 1700 + x.n + f16;
                SCOPED_TRACE(testing::Message()
                             << kernel_name(k) << " kernel, d " << x.d << " H " << x.H << " batch " << x.batch << " n "
                             << x.n << " B " << x.B << " pad " << x.pad << " graph " << x.graph << " f16 " << f16);
                run_tokenwise(c);
            }
}

TEST(GpuEncode, WkvSmoothedMatchesCpuBytes) {
    for (int k : {kDivision, kReciprocal, kVector}) {
        for (int bits : {2, 4, 8})
            for (bool f16 : {false, true})
                for (bool edges : {false, true}) {
                    EncCase c;
                    c.bits = bits;
                    c.group = 128;
                    c.wkv = true;
                    c.wkv_edges = edges;
                    c.f16 = f16;
                    set_kernel(c, k);
                    c.H = 4;
                    c.batch = 3;
                    c.n = 100;
                    c.pos0 = {0, 63, 130};
                    c.seed = 7 + bits;
                    SCOPED_TRACE(testing::Message() << kernel_name(k) << " kernel, bits " << bits << " f16 " << f16
                                                    << " edges (x == shift, scale out of range) " << edges);
                    run_tokenwise(c);
                }
        for (int group : {32, 128}) {  // decode step: one token per sequence
            EncCase c;
            c.wkv = true;
            c.group = group;
            c.n = 1;
            c.batch = 4;
            c.pos0 = {0, 1, 63, 64};
            c.f16 = group == 32;
            set_kernel(c, k);
            SCOPED_TRACE(testing::Message() << kernel_name(k) << " kernel, decode step, group " << group);
            run_tokenwise(c);
        }
    }
}

// QJL tests run on both kernels: GetParam() = QjlEncodeArgs::legacy_kernel. The new kernel
// (qjl_encode_f16_kernel) takes fp16 input without outliers; other cases go to the legacy kernel
// either way (checked here too: the routing).
class GpuEncodeQjl : public testing::TestWithParam<bool> {};
INSTANTIATE_TEST_SUITE_P(Kernels, GpuEncodeQjl, testing::Values(false, true),
                         [](const testing::TestParamInfo<bool>& i) { return i.param ? "Legacy" : "New"; });

TEST_P(GpuEncodeQjl, MatchesCpuBytes) {
    struct S {
        int d, m, B, n, H, batch;
        std::vector<int> pos0;
        kvq::SketchKind k;
    };
    const std::vector<S> shapes = {{128, 256, 64, 77, 4, 2, {0, 45}, kvq::SketchKind::BlockOrthogonal},
                                   {64, 128, 16, 33, 3, 2, {7, 16}, kvq::SketchKind::Gaussian},
                                   {256, 512, 32, 20, 5, 1, {31}, kvq::SketchKind::BlockOrthogonal},
                                   {128, 96, 128, 1, 2, 3, {0, 127, 300}, kvq::SketchKind::Gaussian},
                                   {128, 512, 64, 64, 1, 1, {64}, kvq::SketchKind::Gaussian}};
    long long nz = 0, tot = 0;
    for (const auto& sh : shapes)
        for (bool f16 : {false, true}) {
            EncCase c;
            c.d = sh.d;
            c.m = sh.m;
            c.B = sh.B;
            c.n = sh.n;
            c.H = sh.H;
            c.batch = sh.batch;
            c.pos0 = sh.pos0;
            c.sketch = sh.k;
            c.f16 = f16;
            c.legacy = GetParam();
            c.seed = sh.d + sh.m + f16;
            SCOPED_TRACE(testing::Message() << "d " << sh.d << " m " << sh.m << " B " << sh.B << " f16 " << f16);
            const QjlResult r = run_qjl(c);
            EXPECT_EQ(r.bad, 0);
            nz += r.near_zero_bits;
            tot += r.total_bits;
        }
    std::printf("[qjl encode] near-zero sign differences: %lld of %lld bits\n", nz, tot);
}

TEST_P(GpuEncodeQjl, OutliersMatchCpuBytes) {
    for (bool f16 : {false, true})
        for (int d : {64, 128, 256}) {
            EncCase c;
            c.d = d;
            c.m = d == 64 ? 128 : 256;
            c.mo = d == 64 ? 64 : 256;
            c.ko = d == 64 ? 4 : 8;
            c.B = 64;
            c.n = 96;
            c.H = 3;
            c.batch = 2;
            c.pos0 = {0, 32};
            c.f16 = f16;
            c.legacy = GetParam();
            c.seed = 500 + d + f16;
            SCOPED_TRACE(testing::Message() << "d " << d << " f16 " << f16);
            const QjlResult r = run_qjl(c);
            EXPECT_EQ(r.bad, 0);
            std::printf("[qjl encode, outliers d=%d f16=%d] near-zero sign differences: %lld of %lld bits\n", d,
                        int(f16), r.near_zero_bits, r.total_bits);
        }
}

// Random keys: the fraction of near-zero sign differences must stay below 1e-6.
TEST_P(GpuEncodeQjl, NearZeroFractionBelow1e6) {
    for (int v = 0; v < 3; ++v) {  // fp16, fp32 without outliers (the first: the new kernel's case); fp32 + 8
        const int ko = v == 2 ? 8 : 0;
        EncCase c;
        c.legacy = GetParam();
        c.f16 = v == 0;
        c.d = 128;
        c.m = 256;
        c.ko = ko;
        c.mo = ko ? 256 : 0;
        c.H = 8;
        c.batch = 1;
        c.n = 4096;
        c.pos0 = {0};
        c.seed = 42 + ko;
        SCOPED_TRACE(testing::Message() << "outliers " << ko << " f16 " << c.f16);
        const QjlResult r = run_qjl(c);
        EXPECT_EQ(r.bad, 0);
        const double frac = double(r.near_zero_bits) / double(r.total_bits);
        std::printf("[qjl encode, outliers %d, f16 %d] near-zero sign differences: %lld of %lld bits (%.2e)\n", ko,
                    int(c.f16), r.near_zero_bits, r.total_bits, frac);
        EXPECT_LT(frac, 1e-6);
    }
}

// Keys equal to sketch rows: in exact arithmetic most projections onto the other rows of the same
// orthogonal block are 0, so the float results are rounding noise. The GPU takes the sign of the
// exact projection there; every difference must be inside the CPU's rounding bound.
TEST_P(GpuEncodeQjl, AdversarialNearZeroOnlyWithinRounding) {
    for (bool f16 : {false, true}) {
        EncCase c;
        c.H = 2;
        c.batch = 1;
        c.n = 256;
        c.pos0 = {0};
        c.adversarial = true;
        c.f16 = f16;
        c.legacy = GetParam();
        SCOPED_TRACE(testing::Message() << "f16 " << f16);
        const QjlResult r = run_qjl(c);
        EXPECT_EQ(r.bad, 0);
        std::printf("[qjl encode, adversarial, f16 %d] near-zero sign differences: %lld of %lld bits\n", int(f16),
                    r.near_zero_bits, r.total_bits);
    }
}

// Norms at and just off fp16 rounding ties (where an fp32 sum cannot decide the rounding) and zero
// rows, d 64 / 128 / 256, fp16 and fp32 input: the norm bytes must equal the CPU's.
TEST_P(GpuEncodeQjl, NormRoundingTiesAndZeroRows) {
    for (bool f16 : {true, false})
        for (int d : {64, 128, 256}) {
            EncCase c;
            c.d = d;
            c.m = d == 256 ? 512 : 256;
            c.H = 3;
            c.batch = 2;
            c.n = 150;
            c.pos0 = {3, 64};
            c.norm_ties = true;
            c.f16 = f16;
            c.legacy = GetParam();
            c.seed = 900 + d + f16;
            SCOPED_TRACE(testing::Message() << "d " << d << " f16 " << f16);
            const QjlResult r = run_qjl(c);
            EXPECT_EQ(r.bad, 0);
            EXPECT_EQ(r.norm_in_bytes, 0);
        }
}

TEST_P(GpuEncodeQjl, InsideCudaGraph) {
    for (int ko : {8, 0}) {
        EncCase c;
        c.ko = ko;
        c.mo = ko ? 256 : 0;
        c.n = 64;
        c.pos0 = {0, 64};
        c.f16 = ko == 0;
        c.legacy = GetParam();
        SCOPED_TRACE(testing::Message() << "outliers " << ko);
        const QjlResult r = run_qjl(c, true);
        EXPECT_EQ(r.bad, 0);
    }
}

TEST(GpuEncode, CanImplementRejects) {
    kvq::cuda::TokenwiseEncodeArgs a;
    const kvq::TokenwiseCodec c3(kvq::TokenwiseParams{128, 3, 32});
    a.n_kv_heads = 1;
    a.batch = 1;
    kvq::cuda::set_tokenwise_codec(a, c3, 64);
    EXPECT_FALSE(kvq::cuda::can_implement(a).ok);
    const kvq::TokenwiseCodec c4(kvq::TokenwiseParams{128, 4, 2});
    kvq::cuda::set_tokenwise_codec(a, c4, 64);
    EXPECT_FALSE(kvq::cuda::can_implement(a).ok);
    kvq::cuda::QjlEncodeArgs q;
    kvq::QjlParams p;
    p.outliers = 8;
    const kvq::QjlKeyCodec qc(p);
    q.n_kv_heads = 1;
    q.batch = 1;
    kvq::cuda::set_qjl_codec(q, qc, 64);
    q.n_tokens = 33;  // not a multiple of the 32-token group
    EXPECT_FALSE(kvq::cuda::can_implement(q).ok);
    EXPECT_THROW(kvq::cuda::launch_qjl_encode(q, nullptr), kvq::Error);
}
