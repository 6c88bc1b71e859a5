#pragma once
// Cache persistence: a whole KvCache saved to / loaded from a byte buffer or a file, in the
// versioned format of docs/CACHE_FILE.md (magic, format version, writer's kvq version, codec ids
// and parameters, cache config, per-layer token counts, blocks in page order, fp32 windows, a
// CRC-32 per section). A round trip is exact: the loaded cache exports the same bytes and gives
// bit-identical attention.
//
//   std::vector<std::uint8_t> save_cache(const KvCache&)
//   void save_cache_file(const KvCache&, const std::string& path)      atomic: temp + fsync + rename
//   std::vector<std::uint8_t> save_cache_prefix(const KvCache&, int tokens)   whole pages of a prefix
//   void save_cache_prefix_file(const KvCache&, int tokens, path)
//   std::unique_ptr<KvCache> load_cache(bytes [, key_pool, value_pool]) codecs rebuilt from the file
//   std::unique_ptr<KvCache> load_cache_file(path [, key_pool, value_pool])
//   void load_cache_into(KvCache& dest, bytes)       file must match dest's config and codecs
//   void load_cache_file_into(KvCache& dest, path)
//
// Loading validates everything (section CRCs, lengths, version, codec ids and parameters, the
// codec's block layout and QJL sketch, token counts, window values, QJL outlier ids) before the
// cache is built, and a load into an existing cache builds a new one and swaps only at the end:
// on any kvq::Error the destination is untouched. Little-endian hosts only (block bytes are
// stored as they are in memory).
#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include "kvq/cache/kv_cache.hpp"
#include "kvq/core/error.hpp"
#include "kvq/io/codec_registry.hpp"
#include "kvq/version.hpp"

namespace kvq::io {

static_assert(std::endian::native == std::endian::little, "kvq cache files are written on little-endian hosts");

inline constexpr char kCacheFileMagic[8] = {'K', 'V', 'Q', 'C', 'A', 'C', 'H', 'E'};
inline constexpr std::uint32_t kCacheFileVersion = 1;

// Section tags: four ASCII characters, stored as a little-endian u32 (so the bytes read "HEAD").
constexpr std::uint32_t cache_tag(const char (&s)[5]) {
    return std::uint32_t(std::uint8_t(s[0])) | std::uint32_t(std::uint8_t(s[1])) << 8 |
           std::uint32_t(std::uint8_t(s[2])) << 16 | std::uint32_t(std::uint8_t(s[3])) << 24;
}
inline constexpr std::uint32_t kTagHead = cache_tag("HEAD"), kTagToks = cache_tag("TOKS"), kTagPage = cache_tag("PAGE"),
                               kTagWind = cache_tag("WIND"), kTagEnd = cache_tag("END.");

// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320, init and final xor 0xFFFFFFFF), as zlib's
// crc32(); crc32(buf) continues crc32 of earlier bytes when `crc` is passed back in.
inline std::uint32_t crc32(const std::uint8_t* p, std::size_t n, std::uint32_t crc = 0) {
    static constexpr auto table = [] {
        std::array<std::uint32_t, 256> t{};
        for (std::uint32_t i = 0; i < 256; ++i) {
            std::uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            t[i] = c;
        }
        return t;
    }();
    crc = ~crc;
    for (std::size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

namespace detail {

// Fixed sizes of the HEAD payload (docs/CACHE_FILE.md).
inline constexpr std::size_t kCodecRecordBytes = 56;
inline constexpr std::size_t kHeadBytes = 12 + 35 + 2 * kCodecRecordBytes;
inline constexpr std::size_t kPreambleBytes = 16;
inline constexpr std::size_t kSectionOverhead = 4 + 8 + 4;  // tag, length, CRC

struct Writer {
    std::vector<std::uint8_t> out;
    void u8(std::uint8_t v) { out.push_back(v); }
    void u32(std::uint32_t v) {
        for (int i = 0; i < 4; ++i) out.push_back(std::uint8_t(v >> (8 * i)));
    }
    void u64(std::uint64_t v) {
        for (int i = 0; i < 8; ++i) out.push_back(std::uint8_t(v >> (8 * i)));
    }
    void bytes(const void* p, std::size_t n) {
        const auto* b = static_cast<const std::uint8_t*>(p);
        out.insert(out.end(), b, b + n);
    }
    // Section framing: begin() writes tag and a length placeholder, end() fills the length and CRC.
    std::size_t begin(std::uint32_t tag) {
        const std::size_t at = out.size();
        u32(tag);
        u64(0);
        return at;
    }
    void end(std::size_t at) {
        const std::uint64_t len = out.size() - at - 12;
        for (int i = 0; i < 8; ++i) out[at + 4 + i] = std::uint8_t(len >> (8 * i));
        u32(crc32(out.data() + at, out.size() - at));
    }
};

struct Reader {
    std::span<const std::uint8_t> in;
    std::size_t pos = 0;
    const char* where = "cache file";
    std::size_t left() const { return in.size() - pos; }
    void need(std::size_t n) const {
        KVQ_CHECK(n <= left(), where, ": truncated (needs ", n, " more bytes at offset ", pos, ", ", left(), " left)");
    }
    std::uint8_t u8() {
        need(1);
        return in[pos++];
    }
    std::uint32_t u32() {
        need(4);
        std::uint32_t v = 0;
        for (int i = 0; i < 4; ++i) v |= std::uint32_t(in[pos + i]) << (8 * i);
        pos += 4;
        return v;
    }
    std::uint64_t u64() {
        need(8);
        std::uint64_t v = 0;
        for (int i = 0; i < 8; ++i) v |= std::uint64_t(in[pos + i]) << (8 * i);
        pos += 8;
        return v;
    }
    const std::uint8_t* bytes(std::size_t n) {
        need(n);
        const std::uint8_t* p = in.data() + pos;
        pos += n;
        return p;
    }
};

inline std::string tag_name(std::uint32_t tag) {
    std::string s;
    for (int i = 0; i < 4; ++i) {
        const char c = char(tag >> (8 * i));
        s += (c >= 32 && c < 127) ? c : '?';
    }
    return s;
}

// Reads one framed section with the expected tag, checks its CRC, returns a reader over its payload.
inline Reader read_section(Reader& r, std::uint32_t want, const std::string& what) {
    const std::size_t at = r.pos;
    r.where = "cache file";
    const std::uint32_t tag = r.u32();
    KVQ_CHECK(tag == want, "cache file: expected section ", tag_name(want), " (", what, ") at offset ", at,
              ", found \"", tag_name(tag), "\"");
    const std::uint64_t len = r.u64();
    KVQ_CHECK(len <= r.left() && r.left() - len >= 4, "cache file: section ", what, " at offset ", at,
              " is truncated (", len, " payload bytes declared, ", r.left(), " bytes left)");
    const std::uint8_t* payload = r.bytes(std::size_t(len));
    const std::uint32_t crc = r.u32();
    const std::uint32_t got = crc32(r.in.data() + at, std::size_t(len) + 12);
    KVQ_CHECK(crc == got, "cache file: CRC mismatch in section ", what, " at offset ", at, " (stored ", crc,
              ", computed ", got, "): the file is corrupt");
    Reader p{std::span<const std::uint8_t>(payload, std::size_t(len))};
    p.where = "cache file section";
    return p;
}

inline void done(const Reader& p, const std::string& what) {
    KVQ_CHECK(p.left() == 0, "cache file: section ", what, " has ", p.left(), " unexpected trailing bytes");
}

inline std::uint32_t sketch_crc(const Codec& c) {
    if (const auto* q = dynamic_cast<const QjlKeyCodec*>(&c))
        return crc32(reinterpret_cast<const std::uint8_t*>(q->sketch().data()), q->sketch().size() * sizeof(float));
    return 0;
}

inline void write_codec(Writer& w, const Codec& c, int block_tokens) {
    const CodecDescriptor d = describe_codec(c);
    const BlockLayout l = c.layout(block_tokens);
    w.u8(d.id);
    w.u8(d.storage);
    w.u8(d.sketch);
    w.u8(0);
    w.u32(d.head_dim);
    w.u32(d.bits);
    w.u32(d.group);
    w.u32(d.m);
    w.u32(d.m_outlier);
    w.u32(d.outliers);
    w.u64(d.seed);
    w.u32(l.code_bytes);
    w.u32(l.token_side_bytes);
    w.u32(l.block_side_bytes);
    w.u32(static_cast<std::uint32_t>(l.bytes()));
    w.u32(sketch_crc(c));
}

struct CodecRecord {
    CodecDescriptor desc;
    std::uint32_t code_bytes, token_side_bytes, block_side_bytes, block_bytes, sketch_crc;
};

inline CodecRecord read_codec(Reader& r) {
    CodecRecord c{};
    c.desc.id = r.u8();
    c.desc.storage = r.u8();
    c.desc.sketch = r.u8();
    KVQ_CHECK(r.u8() == 0, "cache file: reserved codec byte is not 0");
    c.desc.head_dim = r.u32();
    c.desc.bits = r.u32();
    c.desc.group = r.u32();
    c.desc.m = r.u32();
    c.desc.m_outlier = r.u32();
    c.desc.outliers = r.u32();
    c.desc.seed = r.u64();
    c.code_bytes = r.u32();
    c.token_side_bytes = r.u32();
    c.block_side_bytes = r.u32();
    c.block_bytes = r.u32();
    c.sketch_crc = r.u32();
    return c;
}

// Rebuilds the codec of a record and checks that it lays out blocks as the writer's did.
inline std::shared_ptr<const Codec> codec_from_record(const CodecRecord& rec, int block_tokens, const char* what) {
    std::shared_ptr<const Codec> c;
    try {
        c = make_codec(rec.desc);
    } catch (const Error& e) {
        KVQ_THROW("cache file: ", what, " codec: ", e.what());
    }
    const BlockLayout l = c->layout(block_tokens);
    KVQ_CHECK(l.code_bytes == rec.code_bytes && l.token_side_bytes == rec.token_side_bytes &&
                  l.block_side_bytes == rec.block_side_bytes && l.bytes() == rec.block_bytes,
              "cache file: ", what, " codec ", c->name(),
              " lays out blocks differently from the writer (file: ", rec.block_bytes,
              " bytes per block, this reader: ", l.bytes(), ")");
    KVQ_CHECK(sketch_crc(*c) == rec.sketch_crc, "cache file: ", what, " codec ", c->name(),
              ": the JL sketch generated here differs from the writer's (CRC ", sketch_crc(*c), " vs ", rec.sketch_crc,
              ")");
    return c;
}

inline std::uint8_t checked_mode(std::uint8_t m, const char* what) {
    KVQ_CHECK(m <= 1, "cache file: ", what, " window flush mode ", int(m), " unknown (0 sliding, 1 chunk)");
    return m;
}

// a * b, throwing when it exceeds limit (how many bytes could possibly be there).
inline std::uint64_t mul_bounded(std::uint64_t a, std::uint64_t b, std::uint64_t limit, const char* what) {
    std::uint64_t r = 0;
    KVQ_CHECK(!__builtin_mul_overflow(a, b, &r) && r <= limit, "cache file: ", what, " size is larger than the file");
    return r;
}

struct Parsed {
    KvCacheState state;
    CodecRecord key, value;
    std::shared_ptr<const Codec> key_codec, value_codec;
};

inline Parsed parse_cache(std::span<const std::uint8_t> bytes) {
    Reader r{bytes};
    KVQ_CHECK(bytes.size() >= kPreambleBytes, "cache file: ", bytes.size(), " bytes is too short for a kvq cache file");
    KVQ_CHECK(std::memcmp(bytes.data(), kCacheFileMagic, 8) == 0, "cache file: bad magic (not a kvq cache file)");
    r.pos = 8;
    const std::uint32_t version = r.u32();
    KVQ_CHECK(version == kCacheFileVersion, "cache file: format version ", version,
              " is not supported by this reader (supports version ", kCacheFileVersion, ")");
    const std::uint32_t sections = r.u32();

    Parsed out;
    Reader h = read_section(r, kTagHead, "HEAD");
    KVQ_CHECK(h.left() == kHeadBytes, "cache file: HEAD has ", h.left(), " bytes, expected ", kHeadBytes);
    h.u32(), h.u32(), h.u32();  // writer's kvq version: informational
    CacheConfig& cfg = out.state.config;
    const std::uint32_t nl = h.u32(), nh = h.u32(), hd = h.u32(), bt = h.u32();
    KVQ_CHECK(nl >= 1 && nl <= 4096 && nh >= 1 && nh <= 1024 && hd >= 1 && hd <= 1024 && bt >= 1 && bt <= 4096,
              "cache file: cache shape out of range (layers ", nl, ", heads ", nh, ", head_dim ", hd, ", block_tokens ",
              bt, ")");
    cfg.n_layers = int(nl);
    cfg.n_kv_heads = int(nh);
    cfg.head_dim = int(hd);
    cfg.block_tokens = int(bt);
    const std::uint32_t kw = h.u32();
    const std::uint8_t km = checked_mode(h.u8(), "key");
    const std::uint32_t vw = h.u32();
    const std::uint8_t vm = checked_mode(h.u8(), "value");
    KVQ_CHECK(kw <= (1u << 20) && vw <= (1u << 20), "cache file: window sizes out of range (", kw, ", ", vw, ")");
    cfg.key_window = {int(kw), FlushMode(km)};
    cfg.value_window = {int(vw), FlushMode(vm)};
    const std::uint8_t poq = h.u8();
    KVQ_CHECK(poq <= 1, "cache file: past_only flag ", int(poq), " is not 0 or 1");
    cfg.past_only = poq == 1;
    const std::uint32_t r0 = h.u32(), r1 = h.u32();
    KVQ_CHECK(r0 == 0 && r1 == 0, "cache file: reserved HEAD fields are not 0");
    out.key = read_codec(h);
    out.value = read_codec(h);
    done(h, "HEAD");
    KVQ_CHECK(sections == 3 + 2 * nl, "cache file: preamble declares ", sections, " sections, a cache of ", nl,
              " layers has ", 3 + 2 * nl);
    out.key_codec = codec_from_record(out.key, cfg.block_tokens, "key");
    out.value_codec = codec_from_record(out.value, cfg.block_tokens, "value");
    const Codec& kc = *out.key_codec;
    const Codec& vc = *out.value_codec;
    KVQ_CHECK(kc.head_dim() == cfg.head_dim && vc.head_dim() == cfg.head_dim,
              "cache file: codec head_dim differs from the cache's");

    Reader t = read_section(r, kTagToks, "TOKS");
    KVQ_CHECK(t.left() == std::size_t(nl) * 12, "cache file: TOKS has ", t.left(), " bytes, expected ", nl * 12);
    out.state.layers.resize(nl);
    for (auto& L : out.state.layers) {
        const std::uint32_t tok = t.u32(), ke = t.u32(), ve = t.u32();
        KVQ_CHECK(tok <= 0x7FFFFFFFu && ke <= tok && ve <= tok, "cache file: token counts out of range (", tok, ", ",
                  ke, ", ", ve, ")");
        L.tokens = int(tok);
        L.key.encoded = int(ke);
        L.value.encoded = int(ve);
    }

    const std::uint64_t B = std::uint64_t(cfg.block_tokens), H = nh, D = hd;
    const std::uint64_t kbb = kc.layout(cfg.block_tokens).bytes(), vbb = vc.layout(cfg.block_tokens).bytes();
    for (std::uint32_t l = 0; l < nl; ++l) {
        KvLayerState& L = out.state.layers[l];
        const std::string pname = "PAGE of layer " + std::to_string(l), wname = "WIND of layer " + std::to_string(l);
        Reader p = read_section(r, kTagPage, pname);
        KVQ_CHECK(p.u32() == l, "cache file: ", pname, " is for another layer");
        const std::uint64_t lim = p.left();
        const std::uint64_t kn =
            mul_bounded(mul_bounded((L.key.encoded + B - 1) / B, H, lim, "key pages"), kbb, lim, "key pages");
        const std::uint64_t vn =
            mul_bounded(mul_bounded((L.value.encoded + B - 1) / B, H, lim, "value pages"), vbb, lim, "value pages");
        KVQ_CHECK(kn + vn == p.left(), "cache file: ", pname, " has ", p.left(), " block bytes, the token counts need ",
                  kn + vn);
        const std::uint8_t* kb = p.bytes(kn);
        L.key.blocks.assign(kb, kb + kn);
        const std::uint8_t* vb = p.bytes(vn);
        L.value.blocks.assign(vb, vb + vn);
        for (std::uint64_t i = 0; i < kn / kbb; ++i)
            check_block(kc, L.key.blocks.data() + i * kbb, cfg.block_tokens,
                        int(std::min<std::uint64_t>(B, L.key.encoded - (i % (kn / kbb / H)) * B)));
        for (std::uint64_t i = 0; i < vn / vbb; ++i)
            check_block(vc, L.value.blocks.data() + i * vbb, cfg.block_tokens,
                        int(std::min<std::uint64_t>(B, L.value.encoded - (i % (vn / vbb / H)) * B)));

        Reader w = read_section(r, kTagWind, wname);
        KVQ_CHECK(w.u32() == l, "cache file: ", wname, " is for another layer");
        const std::uint64_t wl = w.left();
        const std::uint64_t kf = mul_bounded(
            mul_bounded(std::uint64_t(L.tokens - L.key.encoded), H * D, wl, "key window"), 4, wl, "key window");
        const std::uint64_t vf = mul_bounded(
            mul_bounded(std::uint64_t(L.tokens - L.value.encoded), H * D, wl, "value window"), 4, wl, "value window");
        KVQ_CHECK(kf + vf == w.left(), "cache file: ", wname, " has ", w.left(), " bytes, the token counts need ",
                  kf + vf);
        L.key.window.resize(kf / 4);
        if (kf) std::memcpy(L.key.window.data(), w.bytes(kf), kf);
        L.value.window.resize(vf / 4);
        if (vf) std::memcpy(L.value.window.data(), w.bytes(vf), vf);
    }
    Reader e = read_section(r, kTagEnd, "END.");
    done(e, "END.");
    KVQ_CHECK(r.left() == 0, "cache file: ", r.left(), " bytes after the END. section");
    return out;
}

inline void write_all_fd(int fd, const std::uint8_t* p, std::size_t n) {
    while (n > 0) {
        const ssize_t k = ::write(fd, p, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) KVQ_THROW("cannot write: ", std::strerror(errno));
        p += k;
        n -= std::size_t(k);
    }
}

// Recomputes the CRC of every section whose framing fits in the buffer (tests and the fuzz
// target use it to reach the checks behind the CRCs). Returns the number of sections fixed.
inline int refresh_section_crcs(std::vector<std::uint8_t>& b) {
    std::size_t pos = kPreambleBytes;
    int n = 0;
    while (b.size() >= pos + 12) {
        std::uint64_t len = 0;
        for (int i = 0; i < 8; ++i) len |= std::uint64_t(b[pos + 4 + i]) << (8 * i);
        if (len > b.size() - pos - 12 || b.size() - pos - 12 - len < 4) break;
        const std::uint32_t c = crc32(b.data() + pos, std::size_t(len) + 12);
        for (int i = 0; i < 4; ++i) b[pos + 12 + len + i] = std::uint8_t(c >> (8 * i));
        pos += 16 + std::size_t(len);
        ++n;
    }
    return n;
}

}  // namespace detail

namespace detail {
inline std::vector<std::uint8_t> serialize(const KvCacheState& st, const Codec& key_codec, const Codec& value_codec) {
    const CacheConfig& cfg = st.config;
    detail::Writer w;
    w.bytes(kCacheFileMagic, 8);
    w.u32(kCacheFileVersion);
    w.u32(static_cast<std::uint32_t>(3 + 2 * cfg.n_layers));

    std::size_t at = w.begin(kTagHead);
    w.u32(KVQ_VERSION_MAJOR);
    w.u32(KVQ_VERSION_MINOR);
    w.u32(KVQ_VERSION_PATCH);
    w.u32(std::uint32_t(cfg.n_layers));
    w.u32(std::uint32_t(cfg.n_kv_heads));
    w.u32(std::uint32_t(cfg.head_dim));
    w.u32(std::uint32_t(cfg.block_tokens));
    w.u32(std::uint32_t(cfg.key_window.tokens));
    w.u8(std::uint8_t(cfg.key_window.mode));
    w.u32(std::uint32_t(cfg.value_window.tokens));
    w.u8(std::uint8_t(cfg.value_window.mode));
    w.u8(cfg.past_only ? 1 : 0);
    w.u32(0);
    w.u32(0);
    write_codec(w, key_codec, cfg.block_tokens);
    write_codec(w, value_codec, cfg.block_tokens);
    w.end(at);

    at = w.begin(kTagToks);
    for (const KvLayerState& L : st.layers) {
        w.u32(std::uint32_t(L.tokens));
        w.u32(std::uint32_t(L.key.encoded));
        w.u32(std::uint32_t(L.value.encoded));
    }
    w.end(at);

    for (std::size_t l = 0; l < st.layers.size(); ++l) {
        const KvLayerState& L = st.layers[l];
        at = w.begin(kTagPage);
        w.u32(std::uint32_t(l));
        w.bytes(L.key.blocks.data(), L.key.blocks.size());
        w.bytes(L.value.blocks.data(), L.value.blocks.size());
        w.end(at);
        at = w.begin(kTagWind);
        w.u32(std::uint32_t(l));
        w.bytes(L.key.window.data(), L.key.window.size() * sizeof(float));
        w.bytes(L.value.window.data(), L.value.window.size() * sizeof(float));
        w.end(at);
    }
    at = w.begin(kTagEnd);
    w.end(at);
    return std::move(w.out);
}

// Keeps the first `pages` pages of every head of a stream ([H][P][block bytes] -> [H][pages][...]).
inline void keep_pages(KvStreamState& s, int heads, int pages, std::size_t block_bytes) {
    const std::size_t P = heads == 0 ? 0 : s.blocks.size() / block_bytes / heads;
    std::vector<std::uint8_t> kept(std::size_t(heads) * pages * block_bytes);
    // pages == 0 leaves `kept` empty (data() may be null, which memcpy must not get even for 0 bytes).
    for (int h = 0; pages > 0 && h < heads; ++h)
        std::memcpy(kept.data() + std::size_t(h) * pages * block_bytes, s.blocks.data() + h * P * block_bytes,
                    std::size_t(pages) * block_bytes);
    s.blocks = std::move(kept);
    s.window.clear();
}
}  // namespace detail

// The cache as bytes of the format in docs/CACHE_FILE.md.
inline std::vector<std::uint8_t> save_cache(const KvCache& cache) {
    return detail::serialize(cache.state(), cache.key_codec(), cache.value_codec());
}

// The first `tokens` tokens of every layer as a cache file (prefix caching: an engine saves the
// shared prompt's pages once and restores them for every request that starts with it). tokens
// must be a multiple of block_tokens and already encoded in both streams of every layer (not in a
// full-precision window), so the prefix is whole pages taken byte for byte; the loaded cache holds
// exactly those tokens, all in blocks, and continues with appends like any cache. For a cache
// without windows, save_cache_prefix(c, n) equals save_cache of a cache that was given only the
// first n tokens.
inline std::vector<std::uint8_t> save_cache_prefix(const KvCache& cache, int tokens) {
    KvCacheState st = cache.state();
    const CacheConfig& cfg = st.config;
    KVQ_CHECK(tokens >= 0 && tokens % cfg.block_tokens == 0, "cache prefix: ", tokens,
              " tokens is not a multiple of block_tokens ", cfg.block_tokens);
    for (std::size_t l = 0; l < st.layers.size(); ++l) {
        KvLayerState& L = st.layers[l];
        KVQ_CHECK(tokens <= L.key.encoded && tokens <= L.value.encoded, "cache prefix: ", tokens,
                  " tokens requested but layer ", l, " has only ", std::min(L.key.encoded, L.value.encoded),
                  " encoded tokens (", L.tokens, " in all; the rest are in the full-precision window)");
        const int pages = tokens / cfg.block_tokens;
        detail::keep_pages(L.key, cfg.n_kv_heads, pages, cache.key_codec().layout(cfg.block_tokens).bytes());
        detail::keep_pages(L.value, cfg.n_kv_heads, pages, cache.value_codec().layout(cfg.block_tokens).bytes());
        L.tokens = L.key.encoded = L.value.encoded = tokens;
    }
    return detail::serialize(st, cache.key_codec(), cache.value_codec());
}

// A new cache with the file's config and codecs (rebuilt from their ids and parameters), in the
// given pools (new private pools when null). Throws kvq::Error for any malformed input.
inline std::unique_ptr<KvCache> load_cache(std::span<const std::uint8_t> bytes,
                                           std::shared_ptr<BlockPool> key_pool = {},
                                           std::shared_ptr<BlockPool> value_pool = {}) {
    detail::Parsed p = detail::parse_cache(bytes);
    return KvCache::from_state(p.state, std::move(p.key_codec), std::move(p.value_codec), std::move(key_pool),
                               std::move(value_pool));
}

// Replaces dest's contents with the file's. The file must have dest's config and codecs (same
// ids and parameters); the new contents use dest's codec objects and pools. On any error dest is
// untouched (the new cache is built aside and swapped in at the end; its old blocks then return
// to the pools).
inline void load_cache_into(KvCache& dest, std::span<const std::uint8_t> bytes) {
    detail::Parsed p = detail::parse_cache(bytes);
    const CacheConfig &a = p.state.config, &b = dest.config();
    KVQ_CHECK(a.n_layers == b.n_layers && a.n_kv_heads == b.n_kv_heads && a.head_dim == b.head_dim &&
                  a.block_tokens == b.block_tokens && a.key_window.tokens == b.key_window.tokens &&
                  a.key_window.mode == b.key_window.mode && a.value_window.tokens == b.value_window.tokens &&
                  a.value_window.mode == b.value_window.mode && a.past_only == b.past_only,
              "cache file: its cache config differs from the destination cache's");
    KVQ_CHECK(p.key.desc == describe_codec(dest.key_codec()), "cache file: key codec ", p.key_codec->name(),
              " differs from the destination cache's (", dest.key_codec().name(), ")");
    KVQ_CHECK(p.value.desc == describe_codec(dest.value_codec()), "cache file: value codec ", p.value_codec->name(),
              " differs from the destination cache's (", dest.value_codec().name(), ")");
    std::unique_ptr<KvCache> fresh =
        KvCache::from_state(p.state, dest.key_codec_ptr(), dest.value_codec_ptr(), dest.key_pool(), dest.value_pool());
    dest.swap(*fresh);
}

inline std::vector<std::uint8_t> read_cache_bytes(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    KVQ_CHECK(f.good(), "cache file: cannot open \"", path, "\": ", std::strerror(errno));
    std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    KVQ_CHECK(!f.bad(), "cache file: error reading \"", path, "\"");
    return bytes;
}

inline std::unique_ptr<KvCache> load_cache_file(const std::string& path, std::shared_ptr<BlockPool> key_pool = {},
                                                std::shared_ptr<BlockPool> value_pool = {}) {
    const std::vector<std::uint8_t> bytes = read_cache_bytes(path);
    return load_cache(bytes, std::move(key_pool), std::move(value_pool));
}

inline void load_cache_file_into(KvCache& dest, const std::string& path) {
    const std::vector<std::uint8_t> bytes = read_cache_bytes(path);
    load_cache_into(dest, bytes);
}

// Writes bytes to path atomically: a temporary file in the same folder, fsync, rename over path,
// fsync of the folder. Readers see the old file or the new one, never a partial one; on error the
// temporary file is removed and path is unchanged.
inline void write_file_atomic(const std::string& path, const std::vector<std::uint8_t>& bytes) {
    static std::atomic<unsigned> counter{0};
    const std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    KVQ_CHECK(fd >= 0, "cannot create \"", tmp, "\": ", std::strerror(errno));
    try {
        detail::write_all_fd(fd, bytes.data(), bytes.size());
        KVQ_CHECK(::fsync(fd) == 0, "cannot fsync \"", tmp, "\": ", std::strerror(errno));
    } catch (...) {
        ::close(fd);
        ::unlink(tmp.c_str());
        throw;
    }
    if (::close(fd) != 0) {
        const int err = errno;
        ::unlink(tmp.c_str());
        KVQ_THROW("error closing \"", tmp, "\": ", std::strerror(err));
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        const int err = errno;
        ::unlink(tmp.c_str());
        KVQ_THROW("cannot rename \"", tmp, "\" to \"", path, "\": ", std::strerror(err));
    }
    const std::size_t slash = path.find_last_of('/');
    const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {  // best effort: makes the rename itself durable
        (void)::fsync(dfd);
        ::close(dfd);
    }
}

inline void save_cache_file(const KvCache& cache, const std::string& path) {
    write_file_atomic(path, save_cache(cache));
}

inline void save_cache_prefix_file(const KvCache& cache, int tokens, const std::string& path) {
    write_file_atomic(path, save_cache_prefix(cache, tokens));
}

}  // namespace kvq::io
