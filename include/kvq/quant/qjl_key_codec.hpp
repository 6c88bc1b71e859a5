#pragma once
// QJL key codec (Zandieh, Daliri, Han 2024): a key becomes the sign bits of a seeded JL projection
// plus its norm; scores come from the asymmetric estimator against the full-precision query:
//     est(q, k) = sqrt(pi/2) / m * ||k|| * sum_j sign(<s_j, k>) * <s_j, q>
// With outliers (official QJL code): per group of 32 tokens the k_o channels with the largest L2
// norm over the group get their own m_o-bit sketch (the first m_o rows of S restricted to those
// channels) and norm; the inlier part (outliers zeroed) uses the first m rows and its own norm, and
// the query's inlier projection excludes the outlier channels, so est = est_I + est_O, each term
// unbiased for Gaussian S.
//
// Block layout (B tokens, B a multiple of 32 when k_o > 0):
// | section     | content                                   | bytes                 |
// |-------------|-------------------------------------------|-----------------------|
// | codes       | per token: m/8 inlier sign bytes, then     | B * (m + m_o') / 8    |
// |             | m_o'/8 outlier sign bytes (m_o' = 0 if k_o=0) |                    |
// | token side  | fp16 ||k_I||[B], then fp16 ||k_O||[B] (k_o>0) | B * 2 (or 4)       |
// | block side  | uint8 outlier channel ids [B/32][k_o], ascending | (B/32) * k_o     |
// Sign bits are LSB-first (bit j of the sketch in byte j/8, bit j%8).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <numeric>

#include <Eigen/Dense>

#include "kvq/core/bitpack.hpp"
#include "kvq/core/half.hpp"
#include "kvq/core/validate.hpp"
#include "kvq/cpu/kernels.hpp"
#include "kvq/quant/codec.hpp"
#include "kvq/quant/jl_sketch.hpp"

namespace kvq {

struct QjlParams {
    int head_dim = 128;
    int m = 256;          // inlier sketch size, multiple of 32 in [64, 1024]
    int m_outlier = 256;  // outlier sketch size, multiple of 32 in [32, 1024] (ignored when outliers = 0)
    int outliers = 8;     // outlier channels per 32-token group, 0..16
    SketchKind sketch = SketchKind::BlockOrthogonal;
    std::uint64_t seed = 0x6B7671ull;
};

class QjlKeyCodec final : public Codec {
public:
    static constexpr int kGroup = 32;  // tokens per outlier group
    static constexpr double kHalfPi = 1.57079632679489661923;

    explicit QjlKeyCodec(const QjlParams& p) : p_(p) {
        detail::check_head_dim(p.head_dim);
        KVQ_CHECK(p.head_dim <= 256, "QJL head_dim must be <= 256 (outlier ids are bytes), got ", p.head_dim);
        KVQ_CHECK(p.m >= 64 && p.m <= 1024 && p.m % 32 == 0, "QJL m must be a multiple of 32 in [64, 1024], got ", p.m);
        KVQ_CHECK(p.outliers >= 0 && p.outliers <= 16 && p.outliers < p.head_dim,
                  "QJL outlier count must be in [0, 16] and below head_dim, got ", p.outliers);
        if (p.outliers > 0)
            KVQ_CHECK(p.m_outlier >= 32 && p.m_outlier <= 1024 && p.m_outlier % 32 == 0,
                      "QJL outlier sketch size m_o must be a multiple of 32 in [32, 1024], got ", p.m_outlier);
        rows_ = p.outliers > 0 ? std::max(p.m, p.m_outlier) : p.m;
        sketch_ = make_jl_sketch(p.seed, rows_, p.head_dim, p.sketch);
        sketch_t_.resize(sketch_.size());
        for (int j = 0; j < rows_; ++j)
            for (int c = 0; c < p.head_dim; ++c)
                sketch_t_[std::size_t(c) * rows_ + j] = sketch_[std::size_t(j) * p.head_dim + c];
    }

    const QjlParams& params() const { return p_; }
    int sketch_rows() const { return rows_; }
    // S as [sketch_rows()][head_dim] row-major float32: what the CUDA path uploads.
    const std::vector<float>& sketch() const { return sketch_; }
    int outlier_bits() const { return p_.outliers > 0 ? p_.m_outlier : 0; }
    // S^T [d][sketch_rows()] (what the outlier correction reads); exposed for tests.
    const float* sketch_t_for_tests() const { return sketch_t_.data(); }

    CodecId id() const override { return CodecId::Qjl; }
    std::string name() const override {
        return "qjl:m=" + std::to_string(p_.m) + ",mo=" + std::to_string(outlier_bits()) +
               ",outliers=" + std::to_string(p_.outliers) + ",sketch=" + to_string(p_.sketch);
    }
    int head_dim() const override { return p_.head_dim; }
    int granularity() const override { return p_.outliers > 0 ? kGroup : 1; }
    bool decodable() const override { return false; }

    BlockLayout layout(int block_tokens) const override {
        detail::check_block_tokens(block_tokens, granularity());
        BlockLayout l;
        l.block_tokens = static_cast<std::uint32_t>(block_tokens);
        l.code_bytes = static_cast<std::uint32_t>((p_.m + outlier_bits()) / 8);
        l.token_side_bytes = p_.outliers > 0 ? 4 : 2;
        l.block_side_bytes = p_.outliers > 0 ? static_cast<std::uint32_t>(block_tokens / kGroup * p_.outliers) : 0;
        return l;
    }

    void validate(const float* x, int n) const override {
        // fp16 norms: ||k|| must stay below 65504; per-element bound sqrt(65504^2 / d) is not enough,
        // so check the norm itself after the finite check.
        detail::check_finite_and_bounded(x, n, p_.head_dim, 3.0e38f, "key");
        for (int t = 0; t < n; ++t) {
            double s = 0;
            for (int c = 0; c < p_.head_dim; ++c) s += double(x[t * p_.head_dim + c]) * x[t * p_.head_dim + c];
            KVQ_CHECK(std::sqrt(s) <= kHalfMax, "key norm ", std::sqrt(s), " at token ", t,
                      " exceeds the fp16 range of the stored norm (65504)");
        }
    }

    void encode(const float* x, int n, std::uint8_t* block, int block_tokens, int first) const override {
        const int d = p_.head_dim, G = granularity();
        KVQ_ASSERT(n % G == 0 && first % G == 0 && first + n <= block_tokens);
        const BlockLayout l = layout(block_tokens);
        std::uint8_t* codes = block + l.codes_offset();
        half_t* norm_in = reinterpret_cast<half_t*>(block + l.token_side_offset());
        half_t* norm_out = norm_in + block_tokens;
        std::uint8_t* ids = block + l.block_side_offset();

        using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
        Eigen::Map<const RowMat> S(sketch_.data(), rows_, d);
        RowMat kin = Eigen::Map<const RowMat>(x, n, d);  // inlier part: outlier channels zeroed below
        std::vector<int> chan(d);
        std::vector<float> proj_o(std::max(1, outlier_bits()));
        for (int g0 = 0; g0 < n; g0 += G) {
            if (p_.outliers > 0) {
                // Channel energy over the group; ties broken toward the lower channel id.
                std::vector<double> energy(d, 0.0);
                for (int t = g0; t < g0 + G; ++t)
                    for (int c = 0; c < d; ++c) energy[c] += double(kin(t, c)) * kin(t, c);
                std::iota(chan.begin(), chan.end(), 0);
                std::partial_sort(chan.begin(), chan.begin() + p_.outliers, chan.end(), [&](int a, int b) {
                    return energy[a] > energy[b] || (energy[a] == energy[b] && a < b);
                });
                std::sort(chan.begin(), chan.begin() + p_.outliers);
                std::uint8_t* gid = ids + (first + g0) / kGroup * p_.outliers;
                for (int i = 0; i < p_.outliers; ++i) gid[i] = static_cast<std::uint8_t>(chan[i]);
                for (int t = g0; t < g0 + G; ++t) {
                    const int tok = first + t;
                    double nn = 0;
                    for (int j = 0; j < p_.m_outlier; ++j) {
                        float s = 0;
                        for (int i = 0; i < p_.outliers; ++i) s += S(j, chan[i]) * kin(t, chan[i]);
                        proj_o[j] = s;
                    }
                    for (int i = 0; i < p_.outliers; ++i) {
                        nn += double(kin(t, chan[i])) * kin(t, chan[i]);
                        kin(t, chan[i]) = 0.0f;
                    }
                    pack_signs(proj_o.data(), p_.m_outlier, codes + std::size_t(tok) * l.code_bytes + p_.m / 8);
                    norm_out[tok] = float_to_half(static_cast<float>(std::sqrt(nn)));
                }
            }
        }
        RowMat proj = kin * S.topRows(p_.m).transpose();  // [n][m], one GEMM for the whole batch
        for (int t = 0; t < n; ++t) {
            const int tok = first + t;
            pack_signs(&proj(t, 0), p_.m, codes + std::size_t(tok) * l.code_bytes);
            norm_in[tok] = float_to_half(static_cast<float>(kin.row(t).template cast<double>().norm()));
        }
    }

    // Exact preparation: scores through the float byte LUT (no outliers) or the float signed sums.
    void prepare(const float* q, PreparedQuery& pq) const override { prepare_impl(q, pq, false); }
    // Decode attention's preparation: with no outliers and an AVX2 / AVX-512 CPU, the bit-sliced
    // int8 query below (tolerance stated there); otherwise the same as prepare().
    // With outliers and AVX-512 VNNI: the exact preparation (S q) plus a 4-float marker; scoring
    // then quantizes the per-group inlier / outlier projections to int8 (step s_I = max|p_I| / 127,
    // s_O likewise) and scores both sketches with the VNNI group kernel. Tolerance as for the
    // no-outlier path, per part: |est_fast - est_exact| <= sqrt(pi/2)/m * ||k_I|| * m s_I / 2 +
    // sqrt(pi/2)/m_o * ||k_O|| * m_o s_O / 2 (+ float rounding).
    void prepare_fast(const float* q, PreparedQuery& pq) const override {
        prepare_impl(q, pq, p_.outliers == 0 && bitsliced_supported());
        if (p_.outliers > 0 && cpu::has_avx512_vnni()) {
            pq.data.resize(std::size_t(rows_) + 4);
            float* hdr = pq.data.data() + rows_;
            hdr[0] = kOutlierFastMarker;
            hdr[1] = hdr[2] = hdr[3] = 0;
        }
    }

    void prepare_impl(const float* q, PreparedQuery& pq, bool fast) const {
        const int d = p_.head_dim;
        pq.q.assign(q, q + d);
        pq.data.resize(rows_);
        using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
        Eigen::Map<const RowMat> S(sketch_.data(), rows_, d);
        Eigen::Map<Eigen::VectorXf>(pq.data.data(), rows_) = S * Eigen::Map<const Eigen::VectorXf>(q, d);
        if (p_.outliers == 0 && fast) {
            // SIMD path (AVX2 / AVX-512, chosen at run time): the projection p = S q is quantized
            // symmetrically to int8, u_j = round(p_j / s) with s = max|p_j| / 127, and stored as 8
            // bit planes; a key costs 8 AND + popcount per 64 bits. |error| per projection <= s/2,
            // so |est_simd - est_scalar| <= sqrt(pi/2)/m * ||k|| * (m s / 2) (+ float rounding);
            // in practice the error is ~sqrt(m/12) s, about 1% of the estimator's own deviation.
            // pq.data = [S q (rows)][s, sum_j u_j, words, 0][planes: 8 x words uint64]
            //           [u: 64 * words int8 bytes] (the bytes feed the VNNI group scorer).
            const int words = p_.m / 64;
            pq.data.resize(fast_size());
            const float* pj = pq.data.data();
            alignas(64) std::int8_t u8[1024];
            std::int32_t usum = 0;
            const float sc = cpu::quantize_i8(pj, p_.m, u8, &usum);
            std::uint64_t planes[8 * 16];
            cpu::qjl_planes_from_i8(u8, words, planes);
            float* hdr = pq.data.data() + rows_;
            hdr[0] = sc;
            hdr[1] = static_cast<float>(usum);  // |usum| <= 127 * 1024: exact in float
            hdr[2] = static_cast<float>(words);
            hdr[3] = 0;
            std::memcpy(hdr + 4, planes, 8 * std::size_t(words) * sizeof(std::uint64_t));
            std::memcpy(hdr + 4 + 16 * words, u8, 64 * std::size_t(words));
            return;
        }
        if (p_.outliers == 0) {
            // Without outliers the projection is the same for every key: tabulate, per code byte, the
            // signed sum of its 8 projections for all 256 byte values, so a key costs m/8 lookups.
            // Built incrementally (one add per entry): m/8 * 256 adds, amortised over all keys.
            pq.data.resize(std::size_t(rows_) + std::size_t(p_.m) * 32);
            float* lut = pq.data.data() + rows_;
            for (int byte = 0; byte < p_.m / 8; ++byte) {
                const float* pj = pq.data.data() + 8 * byte;
                float* L = lut + std::size_t(byte) * 256;
                L[0] = -(((pj[0] + pj[1]) + (pj[2] + pj[3])) + ((pj[4] + pj[5]) + (pj[6] + pj[7])));
                for (int v = 1; v < 256; ++v) L[v] = L[v & (v - 1)] + 2.0f * pj[__builtin_ctz(v)];
            }
        }
    }

    void score(const PreparedQuery& pq, const std::uint8_t* block, int block_tokens, int first, int n,
               float* out) const override {
        const BlockLayout l = layout(block_tokens);
        const std::uint8_t* codes = block + l.codes_offset();
        const half_t* norm_in = reinterpret_cast<const half_t*>(block + l.token_side_offset());
        const half_t* norm_out = norm_in + block_tokens;
        const std::uint8_t* ids = block + l.block_side_offset();
        const float c_in = static_cast<float>(std::sqrt(kHalfPi) / p_.m);
        if (p_.outliers == 0 && pq.data.size() != std::size_t(rows_) + std::size_t(p_.m) * 32) {
            // Prepared for the bit-sliced SIMD path (see prepare()).
            const float* hdr = pq.data.data() + rows_;
            const int words = static_cast<int>(hdr[2]);
            std::uint64_t planes[8 * 16];
            std::memcpy(planes, hdr + 4, 8 * std::size_t(words) * sizeof(std::uint64_t));
            const float cs = c_in * hdr[0];
            const std::int64_t usum = static_cast<std::int64_t>(hdr[1]);
#if KVQ_X86_SIMD
            if (words == 4 && cpu::simd_level() == cpu::SimdLevel::Avx512)
                return cpu::qjl_score_m256_avx512(codes + std::size_t(first) * l.code_bytes, n, planes, norm_in + first,
                                                  cs, usum, out);
#endif
            pq.scratch.resize(2 * std::size_t(n));
            std::int64_t* T = reinterpret_cast<std::int64_t*>(pq.scratch.data());
            bitsliced(codes + std::size_t(first) * l.code_bytes, n, words, planes, T);
            for (int i = 0; i < n; ++i)
                out[i] = cs * half_to_float(norm_in[first + i]) * static_cast<float>(2 * T[i] - usum);
            return;
        }
        if (p_.outliers == 0) {
            const float* lut = pq.data.data() + rows_;
            const int nbytes = p_.m / 8;
            for (int i = 0; i < n; ++i) {
                const int tok = first + i;
                const std::uint8_t* code = codes + std::size_t(tok) * l.code_bytes;
                float acc[4] = {0, 0, 0, 0};
                for (int b = 0; b < nbytes; b += 4)
                    for (int u = 0; u < 4; ++u) acc[u] += lut[std::size_t(b + u) * 256 + code[b + u]];
                out[i] = c_in * half_to_float(norm_in[tok]) * ((acc[0] + acc[1]) + (acc[2] + acc[3]));
            }
            return;
        }
#if KVQ_X86_SIMD
        if (outlier_fast(pq) && cpu::has_avx512_vnni()) {
            const PreparedQuery* one = &pq;
            return score_outliers_vnni(&one, 1, block, block_tokens, first, n, &out);
        }
#endif
        const int mo = p_.m_outlier;
        const float c_out = static_cast<float>(std::sqrt(kHalfPi) / mo);
        pq.scratch.resize(std::size_t(p_.m) + rows_);
        float* p_in = pq.scratch.data();
        float* p_out = p_in + p_.m;
        int cached_group = -1;
        for (int i = 0; i < n; ++i) {
            const int tok = first + i;
            if (tok / kGroup != cached_group) {
                // Per group: t = S[:, O] q_O (columns of S are rows of S^T: contiguous axpys);
                // inlier projection = S q - t (outlier channels removed), outlier projection = t.
                cached_group = tok / kGroup;
                const std::uint8_t* gid = ids + cached_group * p_.outliers;
                std::fill(p_out, p_out + rows_, 0.0f);
                for (int o = 0; o < p_.outliers; ++o) {
                    const float qo = pq.q[gid[o]];
                    const float* col = sketch_t_.data() + std::size_t(gid[o]) * rows_;
                    for (int j = 0; j < rows_; ++j) p_out[j] += col[j] * qo;
                }
                for (int j = 0; j < p_.m; ++j) p_in[j] = pq.data[j] - p_out[j];
            }
            const std::uint8_t* code = codes + std::size_t(tok) * l.code_bytes;
            out[i] = c_in * half_to_float(norm_in[tok]) * signed_sum(code, p_in, p_.m) +
                     c_out * half_to_float(norm_out[tok]) * signed_sum(code + p_.m / 8, p_out, mo);
        }
    }

    // GQA: with AVX-512 VNNI and fast-prepared queries (prepare_fast), 4 query heads per pass over
    // the codes (cpu::qjl_score4_vnni_t); results equal score() per head bitwise for keys without
    // outliers (integer sums, same float formula). Otherwise one score() per head.
    void score_group(const PreparedQuery* const* pq, int G, const std::uint8_t* block, int block_tokens, int first,
                     int n, float* const* out) const override {
#if KVQ_X86_SIMD
        if (n > 0 && G > 0 && G <= 64 && cpu::has_avx512_vnni()) {
            bool fast = true;
            for (int g = 0; g < G && fast; ++g) fast = p_.outliers == 0 ? bitsliced_fast(*pq[g]) : outlier_fast(*pq[g]);
            if (fast && p_.outliers == 0) return score_vnni(pq, G, block, block_tokens, first, n, out);
            if (fast) return score_outliers_vnni(pq, G, block, block_tokens, first, n, out);
        }
#endif
        Codec::score_group(pq, G, block, block_tokens, first, n, out);
    }

    void accumulate(const std::uint8_t*, int, int, int, const float*, float*) const override {
        KVQ_THROW("QJL codes are sign sketches of keys and cannot be used as values");
    }
    void decode(const std::uint8_t*, int, int, int, float*) const override {
        KVQ_THROW("QJL codes cannot be decoded to vectors; use score()");
    }

    // Whether prepare() picks the bit-sliced SIMD path now (outliers == 0 and a suitable CPU / m).
    bool bitsliced_supported() const {
        if (p_.outliers != 0 || p_.m % 64 != 0) return false;
        const int words = p_.m / 64;
        const cpu::SimdLevel lv = cpu::simd_level();
        if (lv == cpu::SimdLevel::Avx512) return words <= 8 && (8 % words == 0) ? true : words % 4 == 0;
        if (lv == cpu::SimdLevel::Avx2) return words % 4 == 0;
        return false;
    }

private:
    // Marker of prepare_fast() with outliers (a value S q cannot hold there: it sits after S q).
    static constexpr float kOutlierFastMarker = 1.5e38f;
    std::size_t fast_size() const { return std::size_t(rows_) + 4 + 32 * std::size_t(p_.m / 64); }
    bool bitsliced_fast(const PreparedQuery& pq) const {
        return p_.outliers == 0 && p_.m % 64 == 0 && pq.data.size() == fast_size();
    }
    bool outlier_fast(const PreparedQuery& pq) const {
        return p_.outliers > 0 && pq.data.size() == std::size_t(rows_) + 4 && pq.data[rows_] == kOutlierFastMarker;
    }

#if KVQ_X86_SIMD
    // Heads in fours; a missing head of the last four repeats head G-1 into a throw-away buffer.
    void score_vnni(const PreparedQuery* const* pq, int G, const std::uint8_t* block, int block_tokens, int first,
                    int n, float* const* out) const {
        const BlockLayout l = layout(block_tokens);
        const half_t* norm_in = reinterpret_cast<const half_t*>(block + l.token_side_offset());
        const float c_in = static_cast<float>(std::sqrt(kHalfPi) / p_.m);
        const int words = p_.m / 64;
        thread_local std::vector<float> dummy;
        if (G % 4) dummy.resize(std::size_t(n));
        for (int g0 = 0; g0 < G; g0 += 4) {
            const std::int8_t* u[4];
            float cs[4];
            std::int32_t us[4];
            float* o[4];
            for (int j = 0; j < 4; ++j) {
                const int g = std::min(g0 + j, G - 1);
                const float* hdr = pq[g]->data.data() + rows_;
                u[j] = reinterpret_cast<const std::int8_t*>(hdr + 4 + 16 * words);
                cs[j] = c_in * hdr[0];
                us[j] = static_cast<std::int32_t>(hdr[1]);
                o[j] = g0 + j < G ? out[g0 + j] : dummy.data();
            }
            cpu::qjl_score4_vnni(block + l.codes_offset() + std::size_t(first) * l.code_bytes, l.code_bytes, n, words,
                                 u, norm_in + first, cs, us, o);
        }
    }

    // Outliers: per 32-token group and head, the inlier / outlier projections (S q minus / plus the
    // outlier columns' part) are quantized to int8 and both sketches scored by the VNNI kernel.
    void score_outliers_vnni(const PreparedQuery* const* pq, int G, const std::uint8_t* block, int block_tokens,
                             int first, int n, float* const* out) const {
        const BlockLayout l = layout(block_tokens);
        const std::uint8_t* codes = block + l.codes_offset();
        const half_t* norm_in = reinterpret_cast<const half_t*>(block + l.token_side_offset());
        const half_t* norm_out = norm_in + block_tokens;
        const std::uint8_t* ids = block + l.block_side_offset();
        const float c_in = static_cast<float>(std::sqrt(kHalfPi) / p_.m);
        const float c_out = static_cast<float>(std::sqrt(kHalfPi) / p_.m_outlier);
        const int w_in = (p_.m + 63) / 64, w_out = (p_.m_outlier + 63) / 64;
        const int Gp = (G + 3) / 4 * 4;
        // Per head: int8 inlier query [64 w_in], int8 outlier query [64 w_out]; then float work.
        thread_local std::vector<std::int8_t> qbytes;
        thread_local std::vector<float> work;
        qbytes.resize(std::size_t(Gp) * 64 * (w_in + w_out));
        work.resize(2 * std::size_t(rows_) + std::size_t(kGroup) * 5);
        float* p_in = work.data();
        float* p_out = p_in + rows_;
        float* tmp = p_out + rows_;  // [4][32] outlier-part scores, then [32] throw-away
        float cs_in[64], cs_out[64];
        std::int32_t us_in[64], us_out[64];
        for (int g0 = first / kGroup * kGroup; g0 < first + n; g0 += kGroup) {
            const int a = std::max(first, g0), b = std::min(first + n, g0 + kGroup);
            const std::uint8_t* gid = ids + g0 / kGroup * p_.outliers;
            for (int g = 0; g < G; ++g) {
                cpu::qjl_outlier_proj(sketch_t_.data(), rows_, gid, p_.outliers, pq[g]->q.data(), pq[g]->data.data(),
                                      p_.m, p_in, p_out);
                std::int8_t* ui = qbytes.data() + std::size_t(g) * 64 * (w_in + w_out);
                cs_in[g] = c_in * cpu::quantize_i8(p_in, p_.m, ui, &us_in[g]);
                cs_out[g] = c_out * cpu::quantize_i8(p_out, p_.m_outlier, ui + 64 * w_in, &us_out[g]);
            }
            for (int g0h = 0; g0h < G; g0h += 4) {
                const std::int8_t* ui[4];
                const std::int8_t* uo[4];
                float ci[4], co[4];
                std::int32_t si[4], so[4];
                float* oi[4];
                float* oo[4];
                for (int j = 0; j < 4; ++j) {
                    const int g = std::min(g0h + j, G - 1);
                    ui[j] = qbytes.data() + std::size_t(g) * 64 * (w_in + w_out);
                    uo[j] = ui[j] + 64 * w_in;
                    ci[j] = cs_in[g];
                    co[j] = cs_out[g];
                    si[j] = us_in[g];
                    so[j] = us_out[g];
                    oi[j] = g0h + j < G ? out[g0h + j] + (a - first) : tmp + 4 * kGroup;
                    oo[j] = tmp + j * kGroup;
                }
                const std::uint8_t* c0 = codes + std::size_t(a) * l.code_bytes;
                cpu::qjl_score4_vnni(c0, l.code_bytes, b - a, w_in, ui, norm_in + a, ci, si, oi);
                cpu::qjl_score4_vnni(c0 + p_.m / 8, l.code_bytes, b - a, w_out, uo, norm_out + a, co, so, oo);
                for (int j = 0; j < 4 && g0h + j < G; ++j)
                    for (int i = 0; i < b - a; ++i) oi[j][i] += oo[j][i];
            }
        }
    }
#endif

    static void bitsliced(const std::uint8_t* codes, int n, int words, const std::uint64_t* planes, std::int64_t* T) {
#if KVQ_X86_SIMD
        const cpu::SimdLevel lv = cpu::simd_level();
        if (lv == cpu::SimdLevel::Avx512 && words <= 8 && 8 % words == 0)
            return cpu::qjl_bitsliced_avx512(codes, n, words, planes, T);
        if (lv >= cpu::SimdLevel::Avx2 && words % 4 == 0) return cpu::qjl_bitsliced_avx2(codes, n, words, planes, T);
#endif
        cpu::qjl_bitsliced_scalar(codes, n, words, planes, T);
    }
    // sum_j (bit_j ? +p_j : -p_j), as 2 * sum_{bit=1} p_j - sum_j p_j would lose precision when
    // the two sums nearly cancel; a table of +-1 per byte keeps the inner loop branch-free.
    static float signed_sum(const std::uint8_t* bits, const float* p, int m) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int byte = 0; byte < m / 8; ++byte) {
            const float* sg = sign_table()[bits[byte]];
            const float* pj = p + 8 * byte;
            for (int b = 0; b < 8; ++b) acc[b] += sg[b] * pj[b];
        }
        return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
    static const float (*sign_table())[8] {
        static const auto table = [] {
            std::array<std::array<float, 8>, 256> t{};
            for (int v = 0; v < 256; ++v)
                for (int b = 0; b < 8; ++b) t[v][b] = ((v >> b) & 1) ? 1.0f : -1.0f;
            return t;
        }();
        return reinterpret_cast<const float(*)[8]>(table.data());
    }

    QjlParams p_;
    int rows_ = 0;
    std::vector<float> sketch_;
    std::vector<float> sketch_t_;  // S^T [d][rows]: the per-group outlier correction reads columns of S
};

}  // namespace kvq
