#pragma once
// The W4 calibration file (.kvqw), written by kvq-calibrate, read by kvq-llama (--weights w4=crr:FILE):
// the learned weight clipping logits (a, b per row-group of every block linear, §2.4) and, when
// the KV side was calibrated too, WKVQuant's KV smoothing (delta, s, §2.2) of every layer.
// Quantized weights are not stored: they are re-derived from the model and the logits, so the file
// is small and tied to the model by its shape (checked on load).
//
// Little-endian binary, version 1:
//   offset  size   field
//   0       8      magic "KVQW4CL\0"
//   8       4 u32  version = 1
//   12     4 u32  n_layers, dim, hidden_dim, n_heads, n_kv_heads, head_dim   (6 x u32, to 36)
//   36      4 u32  group (0 = per-channel)
//   40      4 u32  objective: 0 = crr (cross-block MAE), 1 = lwc-local (block-local MSE)
//   44      4 u32  k (blocks in the loss)
//   48      4 u32  has_kv (0 or 1)
//   52      ...    per layer, per linear (wq wk wv wo w1 w2 w3): f32 a[rows*G], f32 b[rows*G]
//           ...    if has_kv: per layer f32 k_shift[C], k_scale[C], v_shift[C], v_scale[C]
//   end-8   8 u64  FNV-1a 64 of every preceding byte
// The size follows from the header exactly; every failure throws kvq::Error naming the problem.
#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kvq/calibration/wkv_params.hpp"
#include "kvq/core/error.hpp"
#include "kvq/io/kv_params_file.hpp"
#include "kvq/io/llama2c.hpp"
#include "kvq/weights/w4_grid.hpp"
#include "kvq/weights/w4_quant.hpp"

namespace kvq::io {

inline constexpr char kW4FileMagic[8] = {'K', 'V', 'Q', 'W', '4', 'C', 'L', '\0'};
inline constexpr std::uint32_t kW4FileVersion = 1;

enum class W4Objective : std::uint32_t { Crr = 0, LocalMse = 1 };
inline const char* objective_name(W4Objective o) { return o == W4Objective::Crr ? "crr" : "lwc-local"; }

struct W4Calibration {
    int n_layers = 0, dim = 0, hidden_dim = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, group = 128;
    W4Objective objective = W4Objective::Crr;
    int k = 5;
    std::vector<wq::LwcLayer> clip;  // [n_layers]
    std::optional<WkvParams> kv;

    // A config with this file's shape (for the shape checks of the clipping params).
    LlamaConfig shape_config() const {
        LlamaConfig c;
        c.n_layers = n_layers;
        c.dim = dim;
        c.hidden_dim = hidden_dim;
        c.n_heads = n_heads;
        c.n_kv_heads = n_kv_heads;
        c.head_dim = head_dim;
        return c;
    }
    void validate() const {
        KVQ_CHECK(n_layers >= 1 && n_layers <= 4096 && dim >= 1 && dim <= 65536 && hidden_dim >= 1 &&
                      hidden_dim <= 262144 && n_heads >= 1 && n_heads <= 1024 && n_kv_heads >= 1 &&
                      n_kv_heads <= n_heads && head_dim >= 1 && head_dim <= 1024 && n_heads * head_dim == dim &&
                      group >= 0 && group <= 65536 && k >= 1 && k <= 4096,
                  "W4 calibration: bad shape layers=", n_layers, " dim=", dim, " hidden=", hidden_dim,
                  " heads=", n_heads, " kv_heads=", n_kv_heads, " head_dim=", head_dim, " group=", group, " k=", k);
        KVQ_CHECK(clip.size() == std::size_t(n_layers), "W4 calibration: clipping for ", clip.size(),
                  " layers, expected ", n_layers);
        const LlamaConfig c = shape_config();
        for (int l = 0; l < n_layers; ++l)
            for (int i = 0; i < wq::kBlockLinears; ++i) {
                const auto [r, k2] = wq::block_linear_shape(c, i);
                const wq::LwcParams& p = clip[std::size_t(l)].m[i];
                KVQ_CHECK(p.rows == r && p.cols == k2 && p.group == group, "W4 calibration: layer ", l, " ",
                          wq::kLinearNames[i], " clipping is ", p.rows, "x", p.cols, " g=", p.group, ", expected ", r,
                          "x", k2, " g=", group);
                p.validate();
            }
        if (kv) {
            kv->validate();
            KVQ_CHECK(kv->n_layers == n_layers && kv->n_kv_heads == n_kv_heads && kv->head_dim == head_dim,
                      "W4 calibration: KV params for layers=", kv->n_layers, " kv_heads=", kv->n_kv_heads,
                      " head_dim=", kv->head_dim);
        }
    }
    // Throws unless the file is for a model of this config.
    void check_model(const LlamaConfig& m, const std::string& what) const {
        KVQ_CHECK(m.n_layers == n_layers && m.dim == dim && m.hidden_dim == hidden_dim && m.n_heads == n_heads &&
                      m.n_kv_heads == n_kv_heads && m.head_dim == head_dim,
                  what, " is for a model with layers=", n_layers, " dim=", dim, " hidden=", hidden_dim,
                  " heads=", n_heads, " kv_heads=", n_kv_heads, ", but the model has layers=", m.n_layers,
                  " dim=", m.dim, " hidden=", m.hidden_dim, " heads=", m.n_heads, " kv_heads=", m.n_kv_heads);
    }
};

inline std::vector<std::uint8_t> serialize_w4_calibration(const W4Calibration& W) {
    W.validate();
    std::vector<std::uint8_t> b(kW4FileMagic, kW4FileMagic + 8);
    using detail::put_u32;
    put_u32(b, kW4FileVersion);
    for (int v : {W.n_layers, W.dim, W.hidden_dim, W.n_heads, W.n_kv_heads, W.head_dim, W.group})
        put_u32(b, std::uint32_t(v));
    put_u32(b, std::uint32_t(W.objective));
    put_u32(b, std::uint32_t(W.k));
    put_u32(b, W.kv ? 1u : 0u);
    auto put_f = [&](float x) {
        std::uint32_t u;
        std::memcpy(&u, &x, 4);
        put_u32(b, u);
    };
    for (const wq::LwcLayer& L : W.clip)
        for (const wq::LwcParams& p : L.m) {
            for (float x : p.a) put_f(x);
            for (float x : p.b) put_f(x);
        }
    if (W.kv)
        for (const WkvLayerParams& L : W.kv->layers)
            for (const std::vector<float>* v : {&L.k_shift, &L.k_scale, &L.v_shift, &L.v_scale})
                for (float x : *v) put_f(x);
    const std::uint64_t h = detail::fnv1a64(b.data(), b.size());
    put_u32(b, std::uint32_t(h));
    put_u32(b, std::uint32_t(h >> 32));
    return b;
}

inline W4Calibration parse_w4_calibration(const std::uint8_t* data, std::size_t size) {
    KVQ_CHECK(size >= 60, "W4 calibration file is truncated: ", size, " bytes, a header needs 52 and a checksum 8");
    KVQ_CHECK(std::memcmp(data, kW4FileMagic, 8) == 0, "not a kvq W4 calibration file (bad magic)");
    using detail::get_u32;
    const std::uint32_t version = get_u32(data + 8);
    KVQ_CHECK(version == kW4FileVersion, "W4 calibration file version ", version, " is not supported (expected ",
              kW4FileVersion, ")");
    std::uint32_t f[11];
    for (int i = 0; i < 11; ++i) f[i] = get_u32(data + 12 + 4 * i);
    // Bound every field before it is used as a size (a corrupt header must not allocate wildly).
    KVQ_CHECK(
        f[0] >= 1 && f[0] <= 4096 && f[1] >= 1 && f[1] <= 65536 && f[2] >= 1 && f[2] <= 262144 && f[3] >= 1 &&
            f[3] <= 1024 && f[4] >= 1 && f[4] <= f[3] && f[5] >= 1 && f[5] <= 1024 &&
            std::uint64_t(f[3]) * f[5] == f[1] && f[6] <= 65536 && f[7] <= 1 && f[8] >= 1 && f[8] <= 4096 && f[9] <= 1,
        "W4 calibration file has a bad header: layers=", f[0], " dim=", f[1], " hidden=", f[2], " heads=", f[3],
        " kv_heads=", f[4], " head_dim=", f[5], " group=", f[6], " objective=", f[7], " k=", f[8], " has_kv=", f[9]);
    W4Calibration W;
    W.n_layers = int(f[0]);
    W.dim = int(f[1]);
    W.hidden_dim = int(f[2]);
    W.n_heads = int(f[3]);
    W.n_kv_heads = int(f[4]);
    W.head_dim = int(f[5]);
    W.group = int(f[6]);
    W.objective = W4Objective(f[7]);
    W.k = int(f[8]);
    const LlamaConfig c = W.shape_config();
    std::uint64_t floats = 0;
    for (int i = 0; i < wq::kBlockLinears; ++i) {
        const auto [r, k2] = wq::block_linear_shape(c, i);
        floats += 2ull * std::uint64_t(r) * std::uint64_t(wq::w4_groups_per_row(k2, W.group));
    }
    floats *= W.n_layers;
    if (f[9]) floats += 4ull * W.n_layers * std::uint64_t(c.kv_dim());
    const std::uint64_t expect = 60 + 4 * floats;
    KVQ_CHECK(size == expect, "W4 calibration file for layers=", W.n_layers, " dim=", W.dim, " group=", W.group,
              " must be ", expect, " bytes, got ", size, (size < expect ? " (truncated)" : " (trailing bytes)"));
    const std::uint64_t stored = detail::get_u64(data + size - 8), actual = detail::fnv1a64(data, size - 8);
    KVQ_CHECK(stored == actual, "W4 calibration file checksum mismatch (corrupted file)");
    const std::uint8_t* p = data + 52;
    auto read = [&](std::vector<float>& v, std::size_t n) {
        v.resize(n);
        for (std::size_t i = 0; i < n; ++i, p += 4) {
            const std::uint32_t u = get_u32(p);
            std::memcpy(&v[i], &u, 4);
        }
    };
    W.clip.resize(std::size_t(W.n_layers));
    for (wq::LwcLayer& L : W.clip)
        for (int i = 0; i < wq::kBlockLinears; ++i) {
            const auto [r, k2] = wq::block_linear_shape(c, i);
            wq::LwcParams& lp = L.m[i];
            lp.rows = r;
            lp.cols = k2;
            lp.group = W.group;
            read(lp.a, std::size_t(r) * lp.groups());
            read(lp.b, std::size_t(r) * lp.groups());
        }
    if (f[9]) {
        WkvParams kv;
        kv.n_layers = W.n_layers;
        kv.n_kv_heads = W.n_kv_heads;
        kv.head_dim = W.head_dim;
        kv.layers.resize(std::size_t(W.n_layers));
        for (WkvLayerParams& L : kv.layers)
            for (std::vector<float>* v : {&L.k_shift, &L.k_scale, &L.v_shift, &L.v_scale})
                read(*v, std::size_t(c.kv_dim()));
        W.kv = std::move(kv);
    }
    W.validate();
    return W;
}

inline void save_w4_calibration(const std::string& path, const W4Calibration& W) {
    const std::vector<std::uint8_t> b = serialize_w4_calibration(W);
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    KVQ_CHECK(f.good(), "cannot open \"", path, "\" for writing");
    f.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
    f.close();
    KVQ_CHECK(!f.fail(), "writing \"", path, "\" failed");
}

inline W4Calibration load_w4_calibration(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    KVQ_CHECK(f.good(), "cannot open W4 calibration file \"", path, "\"");
    f.seekg(0, std::ios::end);
    const std::streamoff n = f.tellg();
    KVQ_CHECK(n >= 0 && n <= (std::streamoff(1) << 34), "cannot read the size of \"", path, "\"");
    f.seekg(0);
    std::vector<std::uint8_t> b(static_cast<std::size_t>(n));
    f.read(reinterpret_cast<char*>(b.data()), n);
    KVQ_CHECK(f.gcount() == n, "short read of \"", path, "\"");
    try {
        return parse_w4_calibration(b.data(), b.size());
    } catch (const Error& e) {
        KVQ_THROW("\"", path, "\": ", e.what());
    }
}

// kvq-llama's --weights SPEC: "fp32" (none) | "w4=rtn[,g=G]" | "w4=grid[,g=G]" (gradient-free clipping
// search, kvq/weights/w4_grid.hpp) | "w4=crr:FILE" | "w4=lwc-local:FILE"
// (the FILE's objective must match the name). Returns nullptr for fp32; KV params of the file, if
// any, in *kv_out.
inline std::shared_ptr<const wq::W4Model> make_w4_weights(const std::string& spec, const LlamaConfig& c,
                                                          const LlamaWeights& w,
                                                          std::optional<WkvParams>* kv_out = nullptr) {
    if (spec.empty() || spec == "fp32") return nullptr;
    KVQ_CHECK(spec.rfind("w4=", 0) == 0,
              "--weights: expected fp32 | w4=rtn[,g=G] | w4=grid[,g=G] | w4=crr:FILE | w4=lwc-local:FILE, got '", spec,
              "'");
    const std::string rest = spec.substr(3);
    // "rtn" / "grid" with an optional ",g=G": no calibration file.
    for (const std::string method : {"rtn", "grid"}) {
        if (rest != method && rest.rfind(method + ",g=", 0) != 0) continue;
        int g = 128;
        if (rest.size() > method.size()) {
            const std::string gs = rest.substr(method.size() + 3);
            std::size_t used = 0;
            try {
                g = std::stoi(gs, &used);
            } catch (...) {
                used = 0;
            }
            KVQ_CHECK(used == gs.size() && !gs.empty() && g >= 0 && g <= 65536, "--weights: bad group '", gs, "'");
        }
        if (method == "rtn") return std::make_shared<const wq::W4Model>(wq::quantize_model(c, w, g));
        return std::make_shared<const wq::W4Model>(wq::quantize_model(c, w, g, wq::grid_search_model(c, w, g)));
    }
    const auto colon = rest.find(':');
    KVQ_CHECK(colon != std::string::npos, "--weights: '", spec, "' needs a calibration file (w4=crr:FILE)");
    const std::string name = rest.substr(0, colon), path = rest.substr(colon + 1);
    KVQ_CHECK(name == "crr" || name == "lwc-local", "--weights: unknown W4 method '", name, "'");
    const W4Calibration W = load_w4_calibration(path);
    KVQ_CHECK(name == objective_name(W.objective), "--weights: \"", path, "\" was calibrated with ",
              objective_name(W.objective), ", not ", name);
    W.check_model(c, "\"" + path + "\"");
    if (kv_out) *kv_out = W.kv;
    return std::make_shared<const wq::W4Model>(wq::quantize_model(c, w, W.group, W.clip));
}

}  // namespace kvq::io
