// Cache persistence (kvq/io/cache_file.hpp): exact round trips for every codec, window policy and
// partial block; every truncation and every single-bit flip rejected; wrong version, magic and
// codec; the destination cache and its pools untouched by a failed load; atomic file writes.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <random>
#include <string>

#include "kvq/io/cache_file.hpp"
#include "kvq/kvq.hpp"
#include "test_util.hpp"

namespace {

using Bytes = std::vector<std::uint8_t>;

struct CaseSetup {
    std::string name;
    kvq::CacheConfig cfg;
    std::shared_ptr<const kvq::Codec> kc, vc;
};

std::shared_ptr<const kvq::Codec> ident(int d, kvq::StorageType t) {
    return std::make_shared<kvq::IdentityCodec>(d, t);
}
std::shared_ptr<const kvq::Codec> tw(int d, int bits, int group) {
    return std::make_shared<kvq::TokenwiseCodec>(kvq::TokenwiseParams{d, bits, group});
}
std::shared_ptr<const kvq::Codec> qjl(int d, int m, int mo, int outliers, kvq::SketchKind kind, std::uint64_t seed) {
    kvq::QjlParams p;
    p.head_dim = d;
    p.m = m;
    p.m_outlier = mo;
    p.outliers = outliers;
    p.sketch = kind;
    p.seed = seed;
    return std::make_shared<kvq::QjlKeyCodec>(p);
}

std::vector<CaseSetup> setups() {
    using kvq::FlushMode;
    const int d = 64;
    std::vector<CaseSetup> s;
    s.push_back(
        {"fp32", {2, 2, d, 16, {}, {}, true}, ident(d, kvq::StorageType::F32), ident(d, kvq::StorageType::F32)});
    s.push_back({"fp16_window",
                 {2, 2, d, 16, {5, FlushMode::Sliding}, {3, FlushMode::Sliding}, false},
                 ident(d, kvq::StorageType::F16),
                 ident(d, kvq::StorageType::F16)});
    s.push_back(
        {"bf16", {1, 3, d, 8, {}, {}, true}, ident(d, kvq::StorageType::BF16), ident(d, kvq::StorageType::BF16)});
    s.push_back({"int2_int4_chunk",
                 {3, 2, d, 16, {8, FlushMode::Chunk}, {4, FlushMode::Chunk}, true},
                 tw(d, 2, 32),
                 tw(d, 4, 16)});
    s.push_back({"int3_int8", {1, 2, d, 32, {}, {7, FlushMode::Sliding}, false}, tw(d, 3, 64), tw(d, 8, 8)});
    s.push_back(
        {"qjl_plain", {2, 2, d, 16, {}, {}, true}, qjl(d, 128, 0, 0, kvq::SketchKind::Gaussian, 11), tw(d, 4, 32)});
    s.push_back({"qjl_outliers",
                 {2, 2, d, 32, {}, {}, true},
                 qjl(d, 64, 32, 4, kvq::SketchKind::BlockOrthogonal, 0xDEADBEEFCAFEull),
                 tw(d, 2, 32)});
    s.push_back({"qjl_outliers_chunk",
                 {1, 2, d, 64, {32, FlushMode::Chunk}, {16, FlushMode::Sliding}, false},
                 qjl(d, 96, 64, 8, kvq::SketchKind::Gaussian, 3),
                 tw(d, 4, 32)});
    // WKVQuant's dynamic part (the static smoothing is saved separately, in the parameter file).
    s.push_back({"wkv4",
                 {2, 2, d, 16, {}, {}, true},
                 std::make_shared<kvq::WkvCodec>(d, 4),
                 std::make_shared<kvq::WkvCodec>(d, 4, 32)});
    // KIVI keys (granularity 32: chunk-flushed window) with its per-token 2-bit values.
    s.push_back({"kivi2",
                 {2, 2, d, 32, {32, FlushMode::Chunk}, {16, FlushMode::Sliding}, false},
                 std::make_shared<kvq::KiviKeyCodec>(d, 2),
                 tw(d, 2, 32)});
    return s;
}

// Appends T tokens to every layer in uneven steps (so blocks are partial and windows non-empty).
void fill(kvq::KvCache& c, int T, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    const int H = c.config().n_kv_heads, d = c.config().head_dim;
    for (int l = 0; l < c.config().n_layers; ++l) {
        int done = 0, step = 1;
        while (done < T) {
            const int n = std::min(step, T - done);
            const auto k = kvq::test::normal_vector(std::size_t(n) * H * d, rng);
            const auto v = kvq::test::normal_vector(std::size_t(n) * H * d, rng);
            c.append(l, k.data(), v.data(), n);
            done += n;
            step = step % 7 + 3;
        }
    }
}

// Pre-softmax scores and outputs of attention over everything in the cache, for a few queries.
std::vector<float> attention_of(const kvq::KvCache& c, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    const int H = c.config().n_kv_heads, d = c.config().head_dim, Hq = 2 * H;
    std::vector<float> all;
    kvq::AttentionWorkspace ws;
    for (int l = 0; l < c.config().n_layers; ++l) {
        if (c.tokens(l) == 0) continue;
        for (int rep = 0; rep < 2; ++rep) {
            const auto q = kvq::test::normal_vector(std::size_t(Hq) * d, rng);
            std::vector<float> out(std::size_t(Hq) * d), scores(std::size_t(Hq) * c.tokens(l));
            kvq::attend(c, l, q.data(), Hq, c.tokens(l), kvq::ExactTokens{}, 0, out.data(), ws, scores.data());
            all.insert(all.end(), out.begin(), out.end());
            all.insert(all.end(), scores.begin(), scores.end());
        }
    }
    return all;
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// A small cache in every format feature: QJL keys with outliers (block-side ids), int4 values,
// two layers, partial blocks, windows.
std::unique_ptr<kvq::KvCache> small_cache() {
    const int d = 32;
    auto c = std::make_unique<kvq::KvCache>(
        kvq::CacheConfig{2, 1, d, 32, {3, kvq::FlushMode::Sliding}, {2, kvq::FlushMode::Sliding}, true},
        qjl(d, 64, 32, 2, kvq::SketchKind::Gaussian, 5), tw(d, 4, 16));
    fill(*c, 70, 9);
    return c;
}

// Section boundaries [offset, end) of a valid file (preamble excluded).
std::vector<std::pair<std::size_t, std::size_t>> sections(const Bytes& b) {
    std::vector<std::pair<std::size_t, std::size_t>> s;
    std::size_t pos = 16;
    while (pos < b.size()) {
        std::uint64_t len = 0;
        for (int i = 0; i < 8; ++i) len |= std::uint64_t(b[pos + 4 + i]) << (8 * i);
        s.emplace_back(pos, pos + 16 + len);
        pos += 16 + len;
    }
    return s;
}

TEST(CacheFile, Crc32MatchesTheStandardCheckValue) {
    const std::string s = "123456789";
    EXPECT_EQ(kvq::io::crc32(reinterpret_cast<const std::uint8_t*>(s.data()), s.size()), 0xCBF43926u);
    EXPECT_EQ(kvq::io::crc32(nullptr, 0), 0u);
    // Incremental use continues the checksum.
    const auto* p = reinterpret_cast<const std::uint8_t*>(s.data());
    EXPECT_EQ(kvq::io::crc32(p + 4, 5, kvq::io::crc32(p, 4)), 0xCBF43926u);
}

TEST(CacheFile, RoundTripIsExactForEveryCodecAndPolicy) {
    for (const CaseSetup& s : setups())
        for (int T : {0, 1, 31, 77}) {
            SCOPED_TRACE(s.name + " T=" + std::to_string(T));
            kvq::KvCache a(s.cfg, s.kc, s.vc);
            fill(a, T, 100 + T);
            const Bytes bytes = kvq::io::save_cache(a);
            std::unique_ptr<kvq::KvCache> b = kvq::io::load_cache(bytes);
            EXPECT_EQ(kvq::io::save_cache(*b), bytes);
            EXPECT_EQ(b->key_codec().name(), a.key_codec().name());
            EXPECT_EQ(b->value_codec().name(), a.value_codec().name());
            for (int l = 0; l < s.cfg.n_layers; ++l) EXPECT_EQ(b->tokens(l), a.tokens(l));
            const kvq::MemoryReport ma = a.memory(), mb = b->memory();
            EXPECT_EQ(ma.key_block_bytes, mb.key_block_bytes);
            EXPECT_EQ(ma.window_elements, mb.window_elements);
            if (T > 0) {
                EXPECT_TRUE(bitwise_equal(attention_of(a, 7), attention_of(*b, 7)));
            }
            // Both continue identically: same blocks, same windows after more appends.
            fill(a, 45, 555);
            fill(*b, 45, 555);
            EXPECT_EQ(kvq::io::save_cache(*b), kvq::io::save_cache(a));
            EXPECT_TRUE(bitwise_equal(attention_of(a, 8), attention_of(*b, 8)));
        }
}

// Tokens [T][H][d] for keys and values of every layer, appended in uneven steps up to `upto`.
struct TokenStream {
    std::vector<std::vector<float>> k, v;  // [layer][T * H * d]
};
TokenStream make_stream(const kvq::CacheConfig& cfg, int T, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    TokenStream s;
    const std::size_t n = std::size_t(T) * cfg.n_kv_heads * cfg.head_dim;
    for (int l = 0; l < cfg.n_layers; ++l) {
        s.k.push_back(kvq::test::normal_vector(n, rng));
        s.v.push_back(kvq::test::normal_vector(n, rng));
    }
    return s;
}
void append_stream(kvq::KvCache& c, const TokenStream& s, int upto) {
    const std::size_t row = std::size_t(c.config().n_kv_heads) * c.config().head_dim;
    for (int l = 0; l < c.config().n_layers; ++l)
        for (int done = 0, step = 5; done < upto; step = step % 11 + 2) {
            const int n = std::min(step, upto - done);
            c.append(l, s.k[l].data() + done * row, s.v[l].data() + done * row, n);
            done += n;
        }
}

TEST(CacheFile, PrefixOfWholePagesEqualsACacheGivenOnlyThoseTokens) {
    const int d = 64;
    for (const CaseSetup& s :
         {CaseSetup{"qjl_outliers_int4",
                    {3, 2, d, 32, {}, {}, true},
                    qjl(d, 128, 64, 4, kvq::SketchKind::Gaussian, 7),
                    tw(d, 4, 32)},
          CaseSetup{
              "fp16", {2, 2, d, 16, {}, {}, true}, ident(d, kvq::StorageType::F16), ident(d, kvq::StorageType::F16)},
          CaseSetup{"wkv4",
                    {1, 3, d, 16, {}, {}, false},
                    std::make_shared<kvq::WkvCodec>(d, 4),
                    std::make_shared<kvq::WkvCodec>(d, 4)}}) {
        SCOPED_TRACE(s.name);
        const TokenStream ts = make_stream(s.cfg, 150, 21);
        kvq::KvCache full(s.cfg, s.kc, s.vc);
        append_stream(full, ts, 150);
        for (int n : {0, s.cfg.block_tokens, 4 * s.cfg.block_tokens}) {
            SCOPED_TRACE(n);
            kvq::KvCache only(s.cfg, s.kc, s.vc);
            append_stream(only, ts, n);
            const Bytes prefix = kvq::io::save_cache_prefix(full, n);
            EXPECT_EQ(prefix, kvq::io::save_cache(only));
            auto loaded = kvq::io::load_cache(prefix);
            for (int l = 0; l < s.cfg.n_layers; ++l) EXPECT_EQ(loaded->tokens(l), n);
            // It continues as the original did: appending the rest gives the full cache.
            kvq::KvCache rest(s.cfg, s.kc, s.vc);
            kvq::io::load_cache_into(rest, prefix);
            const std::size_t row = std::size_t(s.cfg.n_kv_heads) * d;
            for (int l = 0; l < s.cfg.n_layers; ++l)
                rest.append(l, ts.k[l].data() + n * row, ts.v[l].data() + n * row, 150 - n);
            EXPECT_TRUE(bitwise_equal(attention_of(rest, 3), attention_of(full, 3)));
        }
    }
}

TEST(CacheFile, PrefixWithWindowsKeepsOnlyEncodedPagesAndAttendsAsTheOriginal) {
    const int d = 32, B = 16;
    const kvq::CacheConfig cfg{2, 2, d, B, {20, kvq::FlushMode::Sliding}, {8, kvq::FlushMode::Chunk}, true};
    kvq::KvCache full(cfg, qjl(d, 64, 0, 0, kvq::SketchKind::BlockOrthogonal, 3), tw(d, 2, 32));
    append_stream(full, make_stream(cfg, 90, 5), 90);  // keys: 70 encoded (window 20), values 88
    const Bytes prefix = kvq::io::save_cache_prefix(full, 4 * B);
    auto p = kvq::io::load_cache(prefix);
    std::mt19937_64 rng(9);
    kvq::AttentionWorkspace ws;
    for (int l = 0; l < 2; ++l) {
        EXPECT_EQ(p->tokens(l), 4 * B);
        EXPECT_EQ(p->memory().window_elements, 0u);
        // Attention over the first 64 tokens of the original equals attention over the prefix.
        const auto q = kvq::test::normal_vector(std::size_t(4) * d, rng);
        std::vector<float> o1(4 * d), o2(4 * d), s1(4 * 4 * B), s2(4 * 4 * B);
        kvq::attend(full, l, q.data(), 4, 4 * B, kvq::ExactTokens{}, 0, o1.data(), ws, s1.data());
        kvq::attend(*p, l, q.data(), 4, 4 * B, kvq::ExactTokens{}, 0, o2.data(), ws, s2.data());
        EXPECT_TRUE(bitwise_equal(o1, o2));
        EXPECT_TRUE(bitwise_equal(s1, s2));
    }
    // Tokens still in a window, or a partial page, cannot be saved as a prefix.
    const auto message_of = [&](int n) {
        try {
            kvq::io::save_cache_prefix(full, n);
        } catch (const kvq::Error& e) {
            return std::string(e.what());
        }
        return std::string("no error");
    };
    EXPECT_NE(message_of(5 * B).find("only 70 encoded tokens"), std::string::npos) << message_of(5 * B);
    EXPECT_NE(message_of(20).find("not a multiple of block_tokens 16"), std::string::npos) << message_of(20);
    EXPECT_NE(message_of(-16).find("-16"), std::string::npos);
}

TEST(CacheFile, NonFiniteStoredFactorsAreRejectedEvenWithValidCrcs) {
    // One stored fp16 factor per codec set to +inf (0x7C00) / NaN: the reader must refuse the block
    // instead of building a cache whose attention is NaN.
    const int d = 32;
    struct Case {
        std::string name;
        kvq::CacheConfig cfg;
        std::shared_ptr<const kvq::Codec> kc;
        std::size_t offset_in_block;  // byte offset of a fp16 factor of token 0 (or group 0)
    };
    const auto qc = qjl(d, 64, 0, 0, kvq::SketchKind::Gaussian, 1);
    const auto tc = tw(d, 4, 16);
    const auto kv = std::make_shared<kvq::KiviKeyCodec>(d, 4);
    const auto f16 = ident(d, kvq::StorageType::F16);
    for (const Case& c :
         {Case{"qjl norm", {1, 1, d, 32, {}, {}, true}, qc, qc->layout(32).token_side_offset()},
          Case{"token-wise min", {1, 1, d, 32, {}, {}, true}, tc, tc->layout(32).token_side_offset() + 2 * 32 * 2},
          Case{"kivi step",
               {1, 1, d, 32, {32, kvq::FlushMode::Chunk}, {}, true},
               kv,
               kv->layout(32).block_side_offset() + 2},
          Case{"fp16 value", {1, 1, d, 32, {}, {}, true}, f16, 6}}) {
        SCOPED_TRACE(c.name);
        kvq::KvCache a(c.cfg, c.kc, tw(d, 8, 32));
        fill(a, 40, 2);
        const Bytes good = kvq::io::save_cache(a);
        ASSERT_NO_THROW(kvq::io::load_cache(good));
        const auto secs = sections(good);
        for (std::uint16_t bad : {std::uint16_t(0x7C00), std::uint16_t(0xFE01)}) {
            Bytes b = good;
            const std::size_t at = secs[2].first + 12 + 4 + c.offset_in_block;
            b[at] = std::uint8_t(bad & 0xFF);
            b[at + 1] = std::uint8_t(bad >> 8);
            kvq::io::detail::refresh_section_crcs(b);
            try {
                kvq::io::load_cache(b);
                ADD_FAILURE() << "accepted a non-finite factor";
            } catch (const kvq::Error& e) {
                EXPECT_NE(std::string(e.what()).find("inf or NaN"), std::string::npos) << e.what();
            }
        }
    }
}

TEST(CacheFile, RoundTripThroughAFileIsAtomicAndLeavesNoTemporaries) {
    const auto dir = std::filesystem::temp_directory_path() / ("kvq_cache_file_" + std::to_string(::getpid()));
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    const std::string path = (dir / "cache.kvqc").string();
    auto a = small_cache();
    kvq::io::save_cache_file(*a, path);
    auto b = kvq::io::load_cache_file(path);
    EXPECT_EQ(kvq::io::save_cache(*b), kvq::io::save_cache(*a));
    // Overwrite in place with a different cache: the file is replaced whole.
    kvq::KvCache c(kvq::CacheConfig{1, 1, 32, 8, {}, {}, true}, ident(32, kvq::StorageType::F16),
                   ident(32, kvq::StorageType::F16));
    fill(c, 20, 1);
    kvq::io::save_cache_file(c, path);
    EXPECT_EQ(kvq::io::read_cache_bytes(path), kvq::io::save_cache(c));
    int files = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir)) {
        ++files;
        EXPECT_EQ(e.path().filename(), "cache.kvqc");
    }
    EXPECT_EQ(files, 1);
    // A folder that does not exist: error, nothing created.
    EXPECT_THROW(kvq::io::save_cache_file(c, (dir / "no" / "such" / "x").string()), kvq::Error);
    EXPECT_THROW(kvq::io::load_cache_file((dir / "missing").string()), kvq::Error);
    std::filesystem::remove_all(dir);
}

TEST(CacheFile, EveryTruncationThrows) {
    const Bytes bytes = kvq::io::save_cache(*small_cache());
    ASSERT_GT(bytes.size(), 500u);
    for (std::size_t n = 0; n < bytes.size(); ++n) {
        const Bytes cut(bytes.begin(), bytes.begin() + std::ptrdiff_t(n));
        EXPECT_THROW(kvq::io::load_cache(cut), kvq::Error) << "truncated to " << n << " bytes";
    }
    Bytes longer = bytes;
    longer.push_back(0);
    EXPECT_THROW(kvq::io::load_cache(longer), kvq::Error);
}

TEST(CacheFile, EverySingleBitFlipIsDetected) {
    const Bytes bytes = kvq::io::save_cache(*small_cache());
    const auto secs = sections(bytes);
    ASSERT_EQ(secs.size(), 3u + 2 * 2);  // HEAD, TOKS, (PAGE, WIND) x 2 layers, END.
    for (std::size_t i = 0; i < bytes.size(); ++i) {
        Bytes bad = bytes;
        bad[i] ^= std::uint8_t(1u << (i % 8));
        try {
            (void)kvq::io::load_cache(bad);
            ADD_FAILURE() << "flip at byte " << i << " not detected";
        } catch (const kvq::Error& e) {
            // Payload flips are caught by the section's CRC.
            for (const auto& [lo, hi] : secs) {
                if (i >= lo + 12 && i < hi - 4) {
                    EXPECT_NE(std::string(e.what()).find("CRC"), std::string::npos) << i;
                }
            }
        }
    }
}

TEST(CacheFile, WrongMagicVersionAndCodecGiveClearErrors) {
    const Bytes good = kvq::io::save_cache(*small_cache());
    auto message = [](const Bytes& b) {
        try {
            (void)kvq::io::load_cache(b);
        } catch (const kvq::Error& e) {
            return std::string(e.what());
        }
        return std::string("no error");
    };
    Bytes b = good;
    b[0] = 'X';
    EXPECT_NE(message(b).find("bad magic"), std::string::npos);
    b = good;
    b[8] = 2;
    EXPECT_NE(message(b).find("format version 2 is not supported"), std::string::npos) << message(b);
    // Codec id 9 (e.g. a future codec) with valid CRCs: the registry names it.
    b = good;
    const std::size_t key_codec = 16 + 12 + 12 + 35;
    ASSERT_EQ(b[key_codec], std::uint8_t(kvq::CodecId::Qjl));
    b[key_codec] = 9;
    kvq::io::detail::refresh_section_crcs(b);
    EXPECT_NE(message(b).find("codec id 9 not supported by this reader"), std::string::npos) << message(b);
    // A different sketch seed: the codec is rebuilt, but the file's sketch CRC does not match.
    b = good;
    b[key_codec + 28] ^= 1;
    kvq::io::detail::refresh_section_crcs(b);
    EXPECT_NE(message(b).find("sketch"), std::string::npos) << message(b);
    // An unsupported parameter (token-wise 5 bits) is reported by the codec.
    b = good;
    const std::size_t value_codec = key_codec + 56;
    ASSERT_EQ(b[value_codec], std::uint8_t(kvq::CodecId::Tokenwise));
    b[value_codec + 8] = 5;
    kvq::io::detail::refresh_section_crcs(b);
    EXPECT_NE(message(b).find("bits must be 2, 3, 4 or 8"), std::string::npos) << message(b);
}

TEST(CacheFile, CraftedBlocksAndCountsAreRejectedEvenWithValidCrcs) {
    auto a = small_cache();
    const Bytes good = kvq::io::save_cache(*a);
    const auto secs = sections(good);
    // A QJL outlier channel id >= head_dim would index out of bounds when scoring.
    const kvq::BlockLayout kl = a->key_codec().layout(32);
    Bytes b = good;
    b[secs[2].first + 12 + 4 + kl.block_side_offset()] = 200;
    kvq::io::detail::refresh_section_crcs(b);
    EXPECT_THROW(kvq::io::load_cache(b), kvq::Error);
    // Non-finite window values.
    b = good;
    const std::size_t wind = secs[3].first + 12 + 4;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(&b[wind], &nan, 4);
    kvq::io::detail::refresh_section_crcs(b);
    EXPECT_THROW(kvq::io::load_cache(b), kvq::Error);
    // Token counts that the window policy cannot produce (or that do not match the data).
    for (int field = 0; field < 6; ++field) {
        b = good;
        b[secs[1].first + 12 + 4 * field] ^= 1;
        kvq::io::detail::refresh_section_crcs(b);
        EXPECT_THROW(kvq::io::load_cache(b), kvq::Error) << field;
    }
}

TEST(CacheFile, FailedLoadLeavesTheDestinationAndItsPoolsUntouched) {
    auto src = small_cache();
    const Bytes good = kvq::io::save_cache(*src);
    auto dest = small_cache();
    kvq::KvCache other(src->config(), src->key_codec_ptr(), src->value_codec_ptr(), dest->key_pool(),
                       dest->value_pool());
    fill(*dest, 5, 77);  // different contents from src
    const Bytes before = kvq::io::save_cache(*dest);
    const auto att = attention_of(*dest, 3);
    const std::uint32_t kin = dest->key_pool()->blocks_in_use(), vin = dest->value_pool()->blocks_in_use();
    auto untouched = [&] {
        EXPECT_EQ(kvq::io::save_cache(*dest), before);
        EXPECT_TRUE(bitwise_equal(attention_of(*dest, 3), att));
        EXPECT_EQ(dest->key_pool()->blocks_in_use(), kin);
        EXPECT_EQ(dest->value_pool()->blocks_in_use(), vin);
    };
    for (std::size_t n : {std::size_t(0), std::size_t(20), good.size() / 2, good.size() - 1}) {
        EXPECT_THROW(kvq::io::load_cache_into(*dest, Bytes(good.begin(), good.begin() + std::ptrdiff_t(n))),
                     kvq::Error);
        untouched();
    }
    Bytes flipped = good;
    flipped[good.size() - 30] ^= 0x10;
    EXPECT_THROW(kvq::io::load_cache_into(*dest, flipped), kvq::Error);
    untouched();
    // Wrong codec: a file written with int2 values into a cache with int4 values.
    kvq::KvCache wrong(src->config(), src->key_codec_ptr(), tw(32, 2, 16));
    fill(wrong, 40, 2);
    EXPECT_THROW(kvq::io::load_cache_into(*dest, kvq::io::save_cache(wrong)), kvq::Error);
    untouched();
    // Wrong config (window policy).
    kvq::CacheConfig cfg = src->config();
    cfg.value_window.tokens = 5;
    kvq::KvCache wrong_cfg(cfg, src->key_codec_ptr(), src->value_codec_ptr());
    EXPECT_THROW(kvq::io::load_cache_into(*dest, kvq::io::save_cache(wrong_cfg)), kvq::Error);
    untouched();

    // A good load replaces the contents; the old blocks go back to the pools.
    kvq::io::load_cache_into(*dest, good);
    EXPECT_EQ(kvq::io::save_cache(*dest), good);
    EXPECT_TRUE(bitwise_equal(attention_of(*dest, 3), attention_of(*src, 3)));
    EXPECT_EQ(dest->key_pool()->blocks_in_use(), src->key_pool()->blocks_in_use());
}

TEST(CacheFile, LoadIntoABoundedPoolThatIsTooSmallThrowsAndTakesNothing) {
    auto src = small_cache();
    const Bytes good = kvq::io::save_cache(*src);
    auto kpool = std::make_shared<kvq::BlockPool>(src->key_codec().layout(32), 2);  // src needs 4 key blocks
    auto vpool = std::make_shared<kvq::BlockPool>(src->value_codec().layout(32));
    EXPECT_THROW(kvq::io::load_cache(good, kpool, vpool), kvq::Error);
    EXPECT_EQ(kpool->blocks_in_use(), 0u);
    EXPECT_EQ(vpool->blocks_in_use(), 0u);
    EXPECT_EQ(kpool->available(), 2u);
    auto big = std::make_shared<kvq::BlockPool>(src->key_codec().layout(32), 4);
    auto c = kvq::io::load_cache(good, big, vpool);
    EXPECT_EQ(big->available(), 0u);
    EXPECT_EQ(kvq::io::save_cache(*c), good);
}

TEST(CacheFile, FromStateValidatesTheState) {
    auto a = small_cache();
    const kvq::KvCacheState good = a->state();
    auto rebuild = [&](const kvq::KvCacheState& s) {
        return kvq::KvCache::from_state(s, a->key_codec_ptr(), a->value_codec_ptr());
    };
    EXPECT_NO_THROW(rebuild(good));
    kvq::KvCacheState s = good;
    s.layers.pop_back();
    EXPECT_THROW(rebuild(s), kvq::Error);
    s = good;
    s.layers[0].key.blocks.pop_back();
    EXPECT_THROW(rebuild(s), kvq::Error);
    s = good;  // window longer than the sliding policy (3 + 31) can leave
    s.layers[0].tokens += 40;
    s.layers[0].value.encoded += 40;
    s.layers[0].key.window.resize(s.layers[0].key.window.size() + 40 * 32, 0.5f);
    s.layers[0].value.blocks.resize(s.layers[0].value.blocks.size() + 2 * a->value_codec().layout(32).bytes());
    EXPECT_THROW(rebuild(s), kvq::Error);
    s = good;  // encoded not a multiple of the QJL outlier group
    s.layers[1].key.encoded -= 1;
    EXPECT_THROW(rebuild(s), kvq::Error);
}

}  // namespace
