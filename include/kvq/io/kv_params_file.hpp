#pragma once
// The WKVQuant KV smoothing parameter file (.kvqp): WkvParams (delta, s per layer for K and V).
//
// Little-endian binary, version 1:
//   offset  size      field
//   0       8         magic "KVQWKVP\0"
//   8       4  u32    version = 1
//   12      4  u32    n_layers    (1..4096)
//   16      4  u32    n_kv_heads  (1..1024)
//   20      4  u32    head_dim    (1..1024)
//   24      L*4*C*4   per layer l: f32 k_shift[C], k_scale[C], v_shift[C], v_scale[C], C = H_kv * d
//   end-8   8  u64    FNV-1a 64 of every preceding byte
// The file size must be exactly 32 + 16 L C bytes. Loading checks magic, version, shape bounds,
// size, checksum and the values (finite, scales in [1e-6, 1e6]); load with an expected shape also
// checks that the file is for that model. Every failure throws kvq::Error naming the problem.
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "kvq/calibration/wkv_params.hpp"
#include "kvq/core/error.hpp"

namespace kvq::io {

inline constexpr char kKvParamsMagic[8] = {'K', 'V', 'Q', 'W', 'K', 'V', 'P', '\0'};
inline constexpr std::uint32_t kKvParamsVersion = 1;

namespace detail {
inline std::uint64_t fnv1a64(const std::uint8_t* p, std::size_t n) {
    std::uint64_t h = 0xcbf29ce484222325ull;
    for (std::size_t i = 0; i < n; ++i) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}
inline void put_u32(std::vector<std::uint8_t>& b, std::uint32_t v) {
    for (int i = 0; i < 4; ++i) b.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}
inline std::uint32_t get_u32(const std::uint8_t* p) {
    return std::uint32_t(p[0]) | std::uint32_t(p[1]) << 8 | std::uint32_t(p[2]) << 16 | std::uint32_t(p[3]) << 24;
}
inline std::uint64_t get_u64(const std::uint8_t* p) {
    return std::uint64_t(get_u32(p)) | std::uint64_t(get_u32(p + 4)) << 32;
}
}  // namespace detail

inline std::vector<std::uint8_t> serialize_wkv_params(const WkvParams& P) {
    P.validate();
    std::vector<std::uint8_t> b(kKvParamsMagic, kKvParamsMagic + 8);
    detail::put_u32(b, kKvParamsVersion);
    detail::put_u32(b, std::uint32_t(P.n_layers));
    detail::put_u32(b, std::uint32_t(P.n_kv_heads));
    detail::put_u32(b, std::uint32_t(P.head_dim));
    for (const WkvLayerParams& L : P.layers)
        for (const std::vector<float>* v : {&L.k_shift, &L.k_scale, &L.v_shift, &L.v_scale})
            for (float x : *v) {
                std::uint32_t u;
                std::memcpy(&u, &x, 4);
                detail::put_u32(b, u);
            }
    const std::uint64_t h = detail::fnv1a64(b.data(), b.size());
    detail::put_u32(b, std::uint32_t(h));
    detail::put_u32(b, std::uint32_t(h >> 32));
    return b;
}

inline WkvParams parse_wkv_params(const std::uint8_t* data, std::size_t size) {
    KVQ_CHECK(size >= 32, "KV parameter file is truncated: ", size, " bytes, a header needs 24 and a checksum 8");
    KVQ_CHECK(std::memcmp(data, kKvParamsMagic, 8) == 0, "not a kvq KV parameter file (bad magic)");
    const std::uint32_t version = detail::get_u32(data + 8);
    KVQ_CHECK(version == kKvParamsVersion, "KV parameter file version ", version, " is not supported (expected ",
              kKvParamsVersion, ")");
    const std::uint32_t L = detail::get_u32(data + 12), H = detail::get_u32(data + 16), d = detail::get_u32(data + 20);
    KVQ_CHECK(L >= 1 && L <= 4096 && H >= 1 && H <= 1024 && d >= 1 && d <= 1024,
              "KV parameter file has a bad shape: layers=", L, " kv_heads=", H, " head_dim=", d);
    const std::uint64_t C = std::uint64_t(H) * d, expect = 32 + 16 * std::uint64_t(L) * C;
    KVQ_CHECK(size == expect, "KV parameter file for layers=", L, " kv_heads=", H, " head_dim=", d, " must be ", expect,
              " bytes, got ", size, (size < expect ? " (truncated)" : " (trailing bytes)"));
    const std::uint64_t stored = detail::get_u64(data + size - 8), actual = detail::fnv1a64(data, size - 8);
    KVQ_CHECK(stored == actual, "KV parameter file checksum mismatch (corrupted file)");
    WkvParams P;
    P.n_layers = int(L);
    P.n_kv_heads = int(H);
    P.head_dim = int(d);
    P.layers.resize(L);
    const std::uint8_t* p = data + 24;
    for (WkvLayerParams& Lp : P.layers)
        for (std::vector<float>* v : {&Lp.k_shift, &Lp.k_scale, &Lp.v_shift, &Lp.v_scale}) {
            v->resize(C);
            for (std::uint64_t c = 0; c < C; ++c, p += 4) {
                const std::uint32_t u = detail::get_u32(p);
                std::memcpy(&(*v)[c], &u, 4);
            }
        }
    P.validate();
    return P;
}

inline void save_wkv_params(const std::string& path, const WkvParams& P) {
    const std::vector<std::uint8_t> b = serialize_wkv_params(P);
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    KVQ_CHECK(f.good(), "cannot open \"", path, "\" for writing");
    f.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
    f.close();
    KVQ_CHECK(!f.fail(), "writing \"", path, "\" failed");
}

inline WkvParams load_wkv_params(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    KVQ_CHECK(f.good(), "cannot open KV parameter file \"", path, "\"");
    f.seekg(0, std::ios::end);
    const std::streamoff n = f.tellg();
    KVQ_CHECK(n >= 0 && n <= (std::streamoff(1) << 36), "cannot read the size of \"", path, "\"");
    f.seekg(0);
    std::vector<std::uint8_t> b(static_cast<std::size_t>(n));
    f.read(reinterpret_cast<char*>(b.data()), n);
    KVQ_CHECK(f.gcount() == n, "short read of \"", path, "\"");
    try {
        return parse_wkv_params(b.data(), b.size());
    } catch (const Error& e) {
        KVQ_THROW("\"", path, "\": ", e.what());
    }
}

// As load_wkv_params, and the file must be for a model of this shape.
inline WkvParams load_wkv_params(const std::string& path, int n_layers, int n_kv_heads, int head_dim) {
    WkvParams P = load_wkv_params(path);
    KVQ_CHECK(P.n_layers == n_layers && P.n_kv_heads == n_kv_heads && P.head_dim == head_dim, "\"", path,
              "\" holds KV parameters for layers=", P.n_layers, " kv_heads=", P.n_kv_heads, " head_dim=", P.head_dim,
              ", but the model has layers=", n_layers, " kv_heads=", n_kv_heads, " head_dim=", head_dim);
    return P;
}

}  // namespace kvq::io
