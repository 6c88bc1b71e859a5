#pragma once
// Codec descriptors: a codec's id and parameters as plain data, the codec rebuilt from them, and
// checks of block contents that a codec trusts when it reads blocks. Used by the cache file
// format (kvq/io/cache_file.hpp, docs/CACHE_FILE.md).
//
// Supported ids: 1 identity (fp32/fp16/bf16), 2 token-wise int-b, 3 QJL keys. Any other id (e.g.
// codecs added later: WKVQuant, KIVI) gives kvq::Error "codec id N not supported by this reader".
#include <cstdint>
#include <memory>
#include <string>

#include "kvq/core/error.hpp"
#include "kvq/quant/codec.hpp"
#include "kvq/quant/identity_codec.hpp"
#include "kvq/quant/qjl_key_codec.hpp"
#include "kvq/quant/tokenwise_codec.hpp"

namespace kvq::io {

// Everything needed to rebuild a supported codec. Fields a codec does not use are zero.
struct CodecDescriptor {
    std::uint8_t id = 0;        // CodecId
    std::uint32_t head_dim = 0;
    std::uint8_t storage = 0;   // identity: StorageType
    std::uint32_t bits = 0;     // token-wise
    std::uint32_t group = 0;    // token-wise
    std::uint32_t m = 0;        // QJL inlier sketch rows
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
            KVQ_CHECK(d.storage <= 2, "identity codec storage type ", int(d.storage), " unknown (0 f32, 1 f16, 2 bf16)");
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
            KVQ_THROW("codec id ", int(d.id), " not supported by this reader (supported: 1 identity, 2 tokenwise, 3 qjl)");
    }
}

// Checks the bytes of one block that a codec would otherwise trust (and index memory with).
// Today only QJL with outliers stores such data: the outlier channel ids of each 32-token group
// must be below head_dim, and strictly ascending in groups that hold tokens (valid_tokens of
// them, from the block's start). Throws kvq::Error naming the block.
inline void check_block(const Codec& c, const std::uint8_t* block, int block_tokens, int valid_tokens) {
    const auto* qc = dynamic_cast<const QjlKeyCodec*>(&c);
    if (!qc || qc->params().outliers == 0) return;
    const BlockLayout l = c.layout(block_tokens);
    const std::uint8_t* ids = block + l.block_side_offset();
    const int k = qc->params().outliers, groups = block_tokens / QjlKeyCodec::kGroup;
    for (int g = 0; g < groups; ++g) {
        const std::uint8_t* gid = ids + std::size_t(g) * k;
        const bool used = g * QjlKeyCodec::kGroup < valid_tokens;
        for (int o = 0; o < k; ++o) {
            KVQ_CHECK(gid[o] < qc->head_dim(), "QJL block: outlier channel id ", int(gid[o]), " in group ", g,
                      " is not below head_dim ", qc->head_dim());
            if (used && o > 0)
                KVQ_CHECK(gid[o] > gid[o - 1], "QJL block: outlier channel ids of group ", g, " are not ascending");
        }
    }
}

}  // namespace kvq::io
