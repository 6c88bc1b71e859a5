#pragma once
// The JL sketch S (rows x d, row-major float32) as a pure function of (seed, rows, d, kind).
//
// Gaussian: S[j][c] ~ N(0, 1), drawn by Box-Muller from Philox4x32-10 with counter (j, c, 0x514A4C, 0)
// and key (seed low, seed high) -- one counter per element, so any element can be regenerated alone.
// BlockOrthogonal (the official QJL default): the Gaussian rows are cut into blocks of d rows, each
// block orthonormalised (modified Gram-Schmidt, twice, in double) and scaled by sqrt(d), so rows keep
// norm sqrt(d) and rows within a block are orthogonal.
//
// The matrix is generated on the host in double and rounded once to float; the CUDA path uploads
// these exact floats instead of regenerating them (device libm may differ in the last bit), so CPU
// and GPU encode with the same matrix bit for bit.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/core/philox.hpp"

namespace kvq {

enum class SketchKind : std::uint8_t { Gaussian = 0, BlockOrthogonal = 1 };

inline const char* to_string(SketchKind k) { return k == SketchKind::Gaussian ? "gaussian" : "orthogonal"; }

inline double sketch_gaussian_entry(std::uint64_t seed, std::uint32_t row, std::uint32_t col) {
    const Philox4x32 r = philox4x32_10(row, col, 0x514A4Cu, 0u, static_cast<std::uint32_t>(seed),
                                       static_cast<std::uint32_t>(seed >> 32));
    const double u1 = uniform_open01(r.v[0], r.v[1]);
    const double u2 = uniform_open01(r.v[2], r.v[3]);
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
}

// Returns S as [rows][d] float32.
inline std::vector<float> make_jl_sketch(std::uint64_t seed, int rows, int d, SketchKind kind) {
    KVQ_CHECK(rows > 0 && rows <= 65536, "sketch rows must be in [1, 65536], got ", rows);
    KVQ_CHECK(d > 0 && d <= 4096, "sketch width must be in [1, 4096], got ", d);
    std::vector<double> g(static_cast<std::size_t>(rows) * d);
    for (int j = 0; j < rows; ++j)
        for (int c = 0; c < d; ++c) g[std::size_t(j) * d + c] = sketch_gaussian_entry(seed, j, c);
    if (kind == SketchKind::BlockOrthogonal) {
        const double scale = std::sqrt(static_cast<double>(d));
        for (int b0 = 0; b0 < rows; b0 += d) {
            const int b1 = std::min(rows, b0 + d);
            for (int j = b0; j < b1; ++j) {
                double* rj = &g[std::size_t(j) * d];
                for (int pass = 0; pass < 2; ++pass)  // second pass restores orthogonality lost to rounding
                    for (int i = b0; i < j; ++i) {
                        const double* ri = &g[std::size_t(i) * d];
                        double dot = 0;
                        for (int c = 0; c < d; ++c) dot += ri[c] * rj[c];
                        for (int c = 0; c < d; ++c) rj[c] -= dot * ri[c];
                    }
                double nn = 0;
                for (int c = 0; c < d; ++c) nn += rj[c] * rj[c];
                KVQ_ASSERT(nn > 0);  // Gaussian rows are independent with probability 1
                const double inv = 1.0 / std::sqrt(nn);
                for (int c = 0; c < d; ++c) rj[c] *= inv;
            }
            for (int j = b0; j < b1; ++j)
                for (int c = 0; c < d; ++c) g[std::size_t(j) * d + c] *= scale;
        }
    }
    std::vector<float> s(g.size());
    for (std::size_t i = 0; i < g.size(); ++i) s[i] = static_cast<float>(g[i]);
    return s;
}

}  // namespace kvq
