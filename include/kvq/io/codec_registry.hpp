#pragma once
// Codec descriptors: a codec's id and parameters as plain data, the codec rebuilt from them, and
// checks of block contents that a codec trusts when it reads blocks. Used by the cache file
// format (kvq/io/cache_file.hpp, docs/CACHE_FILE.md).
//
// Supported ids: 1 identity (fp32/fp16/bf16), 2 token-wise int-b, 3 QJL keys, 4 WKVQuant's dynamic
// token-wise part (bits, group; its static smoothing is not block data: a WkvKvCache is saved as its
// inner KvCache plus the parameter file of kvq/io/kv_params_file.hpp), 5 KIVI keys (bits). Any
// other id gives kvq::Error "codec id N not supported by this reader".
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "kvq/core/error.hpp"
#include "kvq/quant/codec.hpp"
#include "kvq/quant/identity_codec.hpp"
#include "kvq/quant/kivi_codec.hpp"
#include "kvq/quant/qjl_key_codec.hpp"
#include "kvq/quant/tokenwise_codec.hpp"
#include "kvq/quant/wkv_codec.hpp"

namespace kvq::io {

// Everything needed to rebuild a supported codec. Fields a codec does not use are zero.
struct CodecDescriptor {
    std::uint8_t id = 0;  // CodecId
    std::uint32_t head_dim = 0;
    std::uint8_t storage = 0;     // identity: StorageType
    std::uint32_t bits = 0;       // token-wise, WKV, KIVI
    std::uint32_t group = 0;      // token-wise, WKV
    std::uint32_t m = 0;          // QJL inlier sketch rows
    std::uint32_t m_outlier = 0;  // QJL outlier sketch rows (0 when outliers = 0)
    std::uint32_t outliers = 0;   // QJL outlier channels per 32-token group
    std::uint8_t sketch = 0;      // QJL SketchKind
    std::uint64_t seed = 0;       // QJL sketch seed

    bool operator==(const CodecDescriptor&) const = default;
};

inline std::string codec_id_name(std::uint8_t id) {
    switch (id) {
        case std::uint8_t(CodecId::Identity): return "identity";
        case std::uint8_t(CodecId::Tokenwise): return "tokenwise";
        case std::uint8_t(CodecId::Qjl): return "qjl";
        case std::uint8_t(CodecId::Wkv): return "wkv";
        case std::uint8_t(CodecId::KiviKey): return "kivi-key";
        default: return "unknown";
    }
}

// The descriptor of a codec; throws for codec types this registry does not know.
inline CodecDescriptor describe_codec(const Codec& c) {
    CodecDescriptor d;
    d.id = static_cast<std::uint8_t>(c.id());
    d.head_dim = static_cast<std::uint32_t>(c.head_dim());
    if (const auto* ic = dynamic_cast<const IdentityCodec*>(&c)) {
        d.storage = static_cast<std::uint8_t>(ic->storage());
    } else if (const auto* tc = dynamic_cast<const TokenwiseCodec*>(&c)) {
        d.bits = static_cast<std::uint32_t>(tc->params().bits);
        d.group = static_cast<std::uint32_t>(tc->params().group);
    } else if (const auto* wc = dynamic_cast<const WkvCodec*>(&c)) {
        d.bits = static_cast<std::uint32_t>(wc->inner().params().bits);
        d.group = static_cast<std::uint32_t>(wc->inner().params().group);
    } else if (const auto* kc = dynamic_cast<const KiviKeyCodec*>(&c)) {
        d.bits = static_cast<std::uint32_t>(kc->bits());
    } else if (const auto* qc = dynamic_cast<const QjlKeyCodec*>(&c)) {
        const QjlParams& p = qc->params();
        d.m = static_cast<std::uint32_t>(p.m);
        d.outliers = static_cast<std::uint32_t>(p.outliers);
        d.m_outlier = static_cast<std::uint32_t>(qc->outlier_bits());
        d.sketch = static_cast<std::uint8_t>(p.sketch);
        d.seed = p.seed;
    } else {
        KVQ_THROW("codec ", c.name(), " (id ", int(d.id), ") cannot be described: not supported by this writer");
    }
    return d;
}

namespace detail {
inline int checked_int(std::uint32_t v, const char* what) {
    KVQ_CHECK(v <= 65536u, "codec parameter ", what, " = ", v, " out of range");
    return static_cast<int>(v);
}
}  // namespace detail

// Rebuilds the codec; throws kvq::Error for unknown ids and for parameters the codec rejects.
inline std::shared_ptr<const Codec> make_codec(const CodecDescriptor& d) {
    const int hd = detail::checked_int(d.head_dim, "head_dim");
    switch (d.id) {
        case std::uint8_t(CodecId::Identity):
            KVQ_CHECK(d.storage <= 2, "identity codec storage type ", int(d.storage),
                      " unknown (0 f32, 1 f16, 2 bf16)");
            KVQ_CHECK(d.bits == 0 && d.group == 0 && d.m == 0 && d.m_outlier == 0 && d.outliers == 0 && d.sketch == 0 &&
                          d.seed == 0,
                      "identity codec descriptor has parameters of another codec");
            return std::make_shared<IdentityCodec>(hd, static_cast<StorageType>(d.storage));
        case std::uint8_t(CodecId::Tokenwise): {
            KVQ_CHECK(d.storage == 0 && d.m == 0 && d.m_outlier == 0 && d.outliers == 0 && d.sketch == 0 && d.seed == 0,
                      "token-wise codec descriptor has parameters of another codec");
            TokenwiseParams p;
            p.head_dim = hd;
            p.bits = detail::checked_int(d.bits, "bits");
            p.group = detail::checked_int(d.group, "group");
            return std::make_shared<TokenwiseCodec>(p);
        }
        case std::uint8_t(CodecId::Wkv): {
            KVQ_CHECK(d.storage == 0 && d.m == 0 && d.m_outlier == 0 && d.outliers == 0 && d.sketch == 0 && d.seed == 0,
                      "WKV codec descriptor has parameters of another codec");
            KVQ_CHECK(d.group != 0, "WKV codec descriptor: group 0 (the writer stores the resolved group)");
            return std::make_shared<WkvCodec>(hd, detail::checked_int(d.bits, "bits"),
                                              detail::checked_int(d.group, "group"));
        }
        case std::uint8_t(CodecId::KiviKey): {
            KVQ_CHECK(d.storage == 0 && d.group == 0 && d.m == 0 && d.m_outlier == 0 && d.outliers == 0 &&
                          d.sketch == 0 && d.seed == 0,
                      "KIVI key codec descriptor has parameters of another codec");
            return std::make_shared<KiviKeyCodec>(hd, detail::checked_int(d.bits, "bits"));
        }
        case std::uint8_t(CodecId::Qjl): {
            KVQ_CHECK(d.storage == 0 && d.bits == 0 && d.group == 0,
                      "QJL codec descriptor has parameters of another codec");
            KVQ_CHECK(d.sketch <= 1, "QJL sketch kind ", int(d.sketch), " unknown (0 gaussian, 1 orthogonal)");
            KVQ_CHECK(d.outliers > 0 || d.m_outlier == 0, "QJL without outliers must have m_o = 0, got ", d.m_outlier);
            QjlParams p;
            p.head_dim = hd;
            p.m = detail::checked_int(d.m, "m");
            p.outliers = detail::checked_int(d.outliers, "outliers");
            p.m_outlier = d.outliers > 0 ? detail::checked_int(d.m_outlier, "m_outlier") : 0;
            p.sketch = static_cast<SketchKind>(d.sketch);
            p.seed = d.seed;
            return std::make_shared<QjlKeyCodec>(p);
        }
        default:
            KVQ_THROW("codec id ", int(d.id),
                      " not supported by this reader (supported: 1 identity, 2 tokenwise, 3 qjl, 4 wkv, 5 kivi-key)");
    }
}

namespace detail {
inline std::uint16_t load_u16(const std::uint8_t* p) { return std::uint16_t(p[0] | (p[1] << 8)); }

// n 16-bit floats at p must be finite: fp16 exponent 0x1F (bf16: 0xFF) is inf or NaN, which
// would turn every score or output of the block into NaN.
inline void check_16bit_finite(const std::uint8_t* p, std::size_t n, bool bf16, const char* what) {
    const std::uint16_t mask = bf16 ? 0x7F80 : 0x7C00;
    for (std::size_t i = 0; i < n; ++i)
        KVQ_CHECK((load_u16(p + 2 * i) & mask) != mask, what, " (element ", i, ") is inf or NaN (bits ",
                  load_u16(p + 2 * i), ")");
}
}  // namespace detail

// Checks the bytes of one block that a codec would otherwise trust, for the first valid_tokens
// tokens (those the cache reads): QJL outlier channel ids (indices into memory) must be below
// head_dim and strictly ascending in used groups; every stored float factor (identity values,
// token-wise/WKV steps and minima, QJL norms, KIVI steps and minima) must be finite, so that a
// block that passed a CRC but was written wrong cannot make attention NaN. Throws kvq::Error.
inline void check_block(const Codec& c, const std::uint8_t* block, int block_tokens, int valid_tokens) {
    const BlockLayout l = c.layout(block_tokens);
    const std::size_t used = static_cast<std::size_t>(valid_tokens);
    const std::uint8_t* tside = block + l.token_side_offset();
    if (const auto* ic = dynamic_cast<const IdentityCodec*>(&c)) {
        const std::size_t n = used * std::size_t(c.head_dim());
        if (ic->storage() == StorageType::F32) {
            for (std::size_t i = 0; i < n; ++i) {
                float v;
                std::memcpy(&v, block + 4 * i, 4);
                KVQ_CHECK(std::isfinite(v), "identity block: value ", i, " is not finite (", v, ")");
            }
        } else {
            detail::check_16bit_finite(block, n, ic->storage() == StorageType::BF16, "identity block: value");
        }
        return;
    }
    if (const auto* kc = dynamic_cast<const KiviKeyCodec*>(&c)) {
        // block side: fp16 step[NG][d], then fp16 min[NG][d]; groups holding tokens are checked.
        const std::size_t ng = block_tokens / kKiviGroupTokens, d = std::size_t(kc->head_dim());
        const std::size_t used_groups = (used + kKiviGroupTokens - 1) / kKiviGroupTokens;
        const std::uint8_t* bside = block + l.block_side_offset();
        detail::check_16bit_finite(bside, used_groups * d, false, "KIVI block: a step");
        detail::check_16bit_finite(bside + ng * d * 2, used_groups * d, false, "KIVI block: a minimum");
        return;
    }
    // Token-wise, WKV and QJL: the token side is one or two fp16 arrays [B][w] (w = d/g for steps
    // then minima; w = 1 for the norm and then the outlier norm).
    const std::size_t per_token_halves = l.token_side_bytes / 2;
    std::size_t arrays = 0;
    if (dynamic_cast<const TokenwiseCodec*>(&c) || dynamic_cast<const WkvCodec*>(&c)) arrays = 2;
    const auto* qc = dynamic_cast<const QjlKeyCodec*>(&c);
    if (qc) arrays = qc->params().outliers > 0 ? 2 : 1;
    if (arrays == 0) return;  // a codec this registry does not describe: nothing known to check
    const std::size_t w = per_token_halves / arrays;
    for (std::size_t a = 0; a < arrays; ++a)
        detail::check_16bit_finite(tside + a * std::size_t(block_tokens) * w * 2, used * w, false,
                                   qc ? "QJL block: a norm" : "token-wise block: a step or minimum");
    if (!qc || qc->params().outliers == 0) return;
    const std::uint8_t* ids = block + l.block_side_offset();
    const int k = qc->params().outliers, groups = block_tokens / QjlKeyCodec::kGroup;
    for (int g = 0; g < groups; ++g) {
        const std::uint8_t* gid = ids + std::size_t(g) * k;
        const bool in_use = g * QjlKeyCodec::kGroup < valid_tokens;
        for (int o = 0; o < k; ++o) {
            KVQ_CHECK(gid[o] < qc->head_dim(), "QJL block: outlier channel id ", int(gid[o]), " in group ", g,
                      " is not below head_dim ", qc->head_dim());
            if (in_use && o > 0)
                KVQ_CHECK(gid[o] > gid[o - 1], "QJL block: outlier channel ids of group ", g, " are not ascending");
        }
    }
}

}  // namespace kvq::io
