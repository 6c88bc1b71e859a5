// Tests for the llama2.c checkpoint/tokenizer readers and the fp32 reference Llama forward.
// Known answers come from the real stories260K model (see shared/models/README.md); the
// malformed-input tests use synthetic byte buffers so that they run without any file.
#include <gtest/gtest.h>

#include <cctype>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "kvq/io/llama2c.hpp"
#include "kvq/io/llama2c_tokenizer.hpp"
#include "kvq/model/llama.hpp"

#ifndef KVQ_SHARED_DIR
#define KVQ_SHARED_DIR "../shared"
#endif

namespace {

using kvq::io::Llama2cTokenizer;
using kvq::model::Fp32AttentionBackend;
using kvq::model::LlamaModel;
using Bytes = std::vector<std::uint8_t>;

const std::string kModelPath = std::string(KVQ_SHARED_DIR) + "/models/stories260K.bin";
const std::string kTokPath = std::string(KVQ_SHARED_DIR) + "/models/tok512.bin";

#define SKIP_WITHOUT_MODEL_FILES()                                                         \
    do {                                                                                   \
        if (!std::filesystem::exists(kModelPath) || !std::filesystem::exists(kTokPath))    \
            GTEST_SKIP() << "stories260K.bin / tok512.bin not found under " KVQ_SHARED_DIR \
                            "/models "                                                     \
                            "(set KVQ_SHARED_DIR to the shared folder)";                   \
    } while (0)

// Expected output of `./run stories260K.bin -z tok512.bin -t 0.0 -n 200` (trailing "\n" stripped),
// copied from `expected_stdout` in karpathy/llama2.c test_all.py (commit 65c8993...).
const char* const kExpectedGreedy200 =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. "
    "She said, \"I want to play with your ball, but I can't find it.\"\n"
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to "
    "do.\"\nLily didn't want to help her mom, so she";

// run.c's safe_printf: a single-byte piece that is neither printable nor whitespace is dropped.
void append_like_run_c(std::string& out, const std::string& piece) {
    if (piece.empty()) return;
    if (piece.size() == 1) {
        const auto c = static_cast<unsigned char>(piece[0]);
        if (!(std::isprint(c) || std::isspace(c))) return;
    }
    out += piece;
}

TEST(Llama2c, HeaderOfStories260K) {
    SKIP_WITHOUT_MODEL_FILES();
    const auto ck = kvq::io::load_llama2c(kModelPath);
    const auto& c = ck.config;
    EXPECT_EQ(c.dim, 64);
    EXPECT_EQ(c.hidden_dim, 172);
    EXPECT_EQ(c.n_layers, 5);
    EXPECT_EQ(c.n_heads, 8);
    EXPECT_EQ(c.n_kv_heads, 4);
    EXPECT_EQ(c.head_dim, 8);
    EXPECT_EQ(c.vocab_size, 512);
    EXPECT_EQ(c.seq_len, 512);
    EXPECT_TRUE(c.shared_classifier);
    EXPECT_TRUE(ck.had_rope_tables);
    EXPECT_TRUE(ck.weights.wcls.empty());
}

// (a) Greedy decoding reproduces llama2.c byte for byte.
TEST(Llama2c, GreedyMatchesLlama2cTestAll) {
    SKIP_WITHOUT_MODEL_FILES();
    auto ck = kvq::io::load_llama2c(kModelPath);
    const auto tok = kvq::io::load_llama2c_tokenizer(kTokPath, ck.config.vocab_size);
    const LlamaModel model(ck.config, std::move(ck.weights));
    Fp32AttentionBackend backend(model.config());
    const std::vector<int> prompt = {Llama2cTokenizer::kBos};
    const auto seq = model.generate_greedy(prompt, 200, backend, /*stop_token=*/1);
    std::string text;
    for (std::size_t i = 1; i < seq.size(); ++i) append_like_run_c(text, tok.decode(seq[i], seq[i - 1]));
    EXPECT_EQ(text, kExpectedGreedy200);
    EXPECT_LE(seq.size(), 201u);
}

// (b) Teacher-forced NLL matches bennyz/esp32-llm eval/golden.json, whose eval/ppl.c computes
// nll = sum over the n-1 = 34 predictions of -log p(next) and perplexity = exp(nll / (n - 1)).
TEST(Llama2c, TeacherForcedNllMatchesGolden) {
    SKIP_WITHOUT_MODEL_FILES();
    auto ck = kvq::io::load_llama2c(kModelPath);
    const auto tok = kvq::io::load_llama2c_tokenizer(kTokPath, ck.config.vocab_size);
    const LlamaModel model(ck.config, std::move(ck.weights));
    Fp32AttentionBackend backend(model.config());
    const auto tokens =
        tok.encode("One day, a clever fox found a shiny key under the old oak tree.", /*bos=*/true, /*eos=*/false);
    ASSERT_EQ(tokens.size(), 35u);  // golden.json n_tokens
    const double nll = model.sequence_nll(tokens, backend);
    const double ppl = std::exp(nll / 34.0);
    EXPECT_NEAR(nll, 54.404121, 1e-4 * 54.404121) << "nll=" << nll;
    EXPECT_NEAR(ppl, 4.953633, 1e-4 * 4.953633) << "ppl=" << ppl;
}

// Observer hook sees each layer's post-RoPE q,k,v, and k,v are exactly what the backend caches.
TEST(Llama2c, QkvObserverSeesCachedKeys) {
    SKIP_WITHOUT_MODEL_FILES();
    auto ck = kvq::io::load_llama2c(kModelPath);
    LlamaModel model(ck.config, std::move(ck.weights));
    Fp32AttentionBackend backend(model.config());
    const int kvd = model.config().kv_dim();
    std::vector<std::vector<float>> seen_k(model.config().n_layers);
    int calls = 0;
    model.set_qkv_observer([&](int layer, int, const float*, const float* k, const float*) {
        ++calls;
        seen_k[layer].insert(seen_k[layer].end(), k, k + kvd);
    });
    for (int pos = 0; pos < 3; ++pos) model.forward(pos == 0 ? 1 : 300 + pos, pos, backend);
    EXPECT_EQ(calls, 3 * model.config().n_layers);
    for (int l = 0; l < model.config().n_layers; ++l) EXPECT_EQ(seen_k[l], backend.keys(l));
    // Out-of-order positions and bad tokens are caller errors.
    EXPECT_THROW(model.forward(1, 7, backend), kvq::Error);
    backend.reset();
    EXPECT_THROW(model.forward(512, 0, backend), kvq::Error);
    EXPECT_THROW(model.forward(-1, 0, backend), kvq::Error);
    EXPECT_THROW(model.forward(1, 512, backend), kvq::Error);
}

// (c) Tokenizer round trip: decoding (after BOS) gives back the exact text, including
// byte-fallback UTF-8 and newlines.
TEST(Llama2cTokenizer, EncodeDecodeRoundTrip) {
    SKIP_WITHOUT_MODEL_FILES();
    const auto tok = kvq::io::load_llama2c_tokenizer(kTokPath, 512);
    EXPECT_EQ(tok.max_token_length(), 7);
    EXPECT_EQ(tok.piece(1), "\n<s>\n");
    EXPECT_EQ(tok.decode(3 + 0x41, 0), "A");  // <0x41>
    const std::vector<std::string> texts = {
        "Once upon a time, there was a little girl named Lily.",
        "One day, a clever fox found a shiny key under the old oak tree.",
        "Tom said, \"Let's go!\"\nThey ran to the park.",
        "Caf\xC3\xA9 na\xC3\xAFve \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x98\x80 tab\there",
        "  leading spaces, 12345 and symbols #@!~"};
    for (const auto& text : texts) {
        const auto ids = tok.encode(text, /*bos=*/true, /*eos=*/false);
        ASSERT_GE(ids.size(), 2u);
        EXPECT_EQ(ids[0], 1);
        EXPECT_EQ(tok.decode(std::span<const int>(ids).subspan(1), /*prev=*/1), text);
        const auto with_eos = tok.encode(text, true, true);
        EXPECT_EQ(with_eos.back(), 2);
        const auto no_bos = tok.encode(text, false, false);
        EXPECT_EQ(std::vector<int>(ids.begin() + 1, ids.end()), no_bos);
    }
    EXPECT_EQ(tok.encode("", true, false), std::vector<int>{1});
    EXPECT_TRUE(tok.encode("", false, false).empty());
    // Bytes the vocab has no piece for come out as byte-fallback ids (byte + 3).
    const auto emoji = tok.encode("\xF0\x9F\x98\x80", false, false);
    EXPECT_EQ(emoji, (std::vector<int>{tok.find(" "), 0xF0 + 3, 0x9F + 3, 0x98 + 3, 0x80 + 3}));
    EXPECT_THROW(tok.decode(512, -1), kvq::Error);
    EXPECT_THROW(tok.decode(-1, -1), kvq::Error);
}

// ---------------------------------------------------------------- synthetic checkpoints

void put_i32(Bytes& b, std::int32_t v) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(&v);
    b.insert(b.end(), p, p + 4);
}
void put_f32(Bytes& b, float v) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(&v);
    b.insert(b.end(), p, p + 4);
}
void set_i32(Bytes& b, std::size_t off, std::int32_t v) { std::memcpy(b.data() + off, &v, 4); }

struct Shape {
    int dim = 16, hidden = 24, layers = 2, heads = 4, kv_heads = 2, vocab = 20, seq_len = 8;
};

// A valid llama2c file with random weights; vocab stored negative when `separate_cls`.
Bytes make_checkpoint(const Shape& s, bool rope_tables, bool separate_cls) {
    Bytes b;
    for (int v : {s.dim, s.hidden, s.layers, s.heads, s.kv_heads, separate_cls ? -s.vocab : s.vocab, s.seq_len})
        put_i32(b, v);
    const std::int64_t hd = s.dim / s.heads, kvd = s.kv_heads * hd;
    std::int64_t n = std::int64_t{s.vocab} * s.dim +
                     s.layers * (2 * s.dim + 2 * s.dim * s.dim + 2 * kvd * s.dim + 3 * s.hidden * s.dim) + s.dim;
    if (rope_tables) n += s.seq_len * hd;
    if (separate_cls) n += std::int64_t{s.vocab} * s.dim;
    std::mt19937 rng(7);
    std::normal_distribution<float> dist(0.0f, 0.3f);
    for (std::int64_t i = 0; i < n; ++i) put_f32(b, dist(rng));
    return b;
}

TEST(Llama2cParse, SyntheticVariantsParseAndRun) {
    const Shape s;
    for (bool tables : {false, true}) {
        for (bool separate : {false, true}) {
            const Bytes b = make_checkpoint(s, tables, separate);
            auto ck = kvq::io::parse_llama2c(b);
            EXPECT_EQ(ck.had_rope_tables, tables);
            EXPECT_EQ(ck.config.shared_classifier, !separate);
            EXPECT_EQ(ck.config.vocab_size, s.vocab);
            EXPECT_EQ(ck.weights.wcls.size(), separate ? std::size_t(s.vocab * s.dim) : 0u);
            const LlamaModel model(ck.config, std::move(ck.weights));
            Fp32AttentionBackend backend(model.config());
            const std::vector<int> toks = {1, 5, 7, 3, 19};
            const double nll = model.sequence_nll(toks, backend);
            EXPECT_TRUE(std::isfinite(nll) && nll > 0.0);
            EXPECT_EQ(model.generate_greedy(std::vector<int>{1}, 100, backend, -1).size(),
                      std::size_t(s.seq_len) + 1);  // steps capped at seq_len
        }
    }
}

// (d) Malformed checkpoints: every failure is a kvq::Error, never a crash or a big allocation.
TEST(Llama2cParse, TruncatedAtManyLengthsThrows) {
    const Bytes full = make_checkpoint(Shape{}, true, false);
    std::vector<std::size_t> lengths;
    for (std::size_t n = 0; n <= 64; ++n) lengths.push_back(n);
    for (std::size_t n = 65; n < full.size(); n += 97) lengths.push_back(n);
    for (std::size_t d = 1; d <= 8; ++d) lengths.push_back(full.size() - d);
    for (std::size_t n : lengths) {
        const Bytes cut(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(n));
        EXPECT_THROW(kvq::io::parse_llama2c(cut), kvq::Error) << "length " << n;
    }
    Bytes longer = full;
    longer.push_back(0);
    EXPECT_THROW(kvq::io::parse_llama2c(longer), kvq::Error);
}

TEST(Llama2cParse, BadHeaderValuesThrow) {
    const Bytes good = make_checkpoint(Shape{}, true, false);
    const std::int32_t bad_values[] = {0, -1, -7, INT_MIN, INT_MAX, 1 << 30, 65537, 3};
    for (int field = 0; field < 7; ++field) {
        for (std::int32_t v : bad_values) {
            if (field == 5 && v < 0 && v != INT_MIN) continue;  // negative vocab is legal (checked below)
            Bytes b = good;
            set_i32(b, 4 * field, v);
            EXPECT_THROW(kvq::io::parse_llama2c(b), kvq::Error) << "field " << field << " = " << v;
        }
    }
    auto expect_throw_with = [&](std::initializer_list<std::pair<int, std::int32_t>> edits, const char* what) {
        Bytes b = good;
        for (auto [field, v] : edits) set_i32(b, 4 * field, v);
        EXPECT_THROW(kvq::io::parse_llama2c(b), kvq::Error) << what;
    };
    expect_throw_with({{3, 5}}, "dim % n_heads != 0");
    expect_throw_with({{4, 3}}, "n_heads % n_kv_heads != 0");
    expect_throw_with({{4, 8}}, "n_kv_heads > n_heads");
    expect_throw_with({{3, 16}, {4, 16}}, "head_dim = 1 is odd");
    expect_throw_with({{5, -20}}, "negative vocab (separate classifier) but no wcls bytes");
    expect_throw_with({{0, 65537}}, "dim > 65536");
    expect_throw_with({{2, 1025}}, "n_layers > 1024");
    // Limits all at their maximum: sizes are ~2^57 bytes, computed without overflow, then rejected
    // by the size check before anything is allocated.
    expect_throw_with({{0, 65536}, {1, 1 << 20}, {2, 1024}, {3, 2}, {4, 1}, {5, -(1 << 22)}, {6, 1 << 24}},
                      "maximal header");
    try {
        Bytes b = good;
        set_i32(b, 0, 24);  // valid on its own (head_dim 6), but the byte count no longer fits
        kvq::io::parse_llama2c(b);
        ADD_FAILURE() << "expected kvq::Error";
    } catch (const kvq::Error& e) {
        EXPECT_NE(std::string(e.what()).find("bytes"), std::string::npos) << e.what();
    }
}

TEST(Llama2cParse, NonFiniteWeightThrows) {
    Bytes b = make_checkpoint(Shape{}, false, false);
    const float nan = std::nanf("");
    std::memcpy(b.data() + 28 + 4 * 100, &nan, 4);
    EXPECT_THROW(kvq::io::parse_llama2c(b), kvq::Error);
}

TEST(LlamaModel, RejectsInconsistentWeights) {
    auto ck = kvq::io::parse_llama2c(make_checkpoint(Shape{}, false, false));
    auto w = ck.weights;
    w.layers[1].wk.pop_back();
    EXPECT_THROW(LlamaModel(ck.config, w), kvq::Error);
    w = ck.weights;
    w.wcls = w.token_embedding;  // shared config but a separate classifier
    EXPECT_THROW(LlamaModel(ck.config, w), kvq::Error);
    auto c = ck.config;
    c.head_dim = 2;
    EXPECT_THROW(LlamaModel(c, ck.weights), kvq::Error);
    EXPECT_THROW(Fp32AttentionBackend(2, 4, 3, 4), kvq::Error);
}

// ---------------------------------------------------------------- malformed tokenizers

// A well-formed tokenizer file of `n` entries: <unk>, BOS, EOS, 256 byte pieces, then " " and
// some letters when n is large enough.
Bytes make_tokenizer(int n, std::int32_t max_len = 6) {
    Bytes b;
    put_i32(b, max_len);
    for (int id = 0; id < n; ++id) {
        std::string p;
        if (id == 0)
            p = "<unk>";
        else if (id == 1)
            p = "<s>";
        else if (id == 2)
            p = "</s>";
        else if (id < 259) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "<0x%02X>", id - 3);
            p = buf;
        } else
            p = std::string(1, static_cast<char>(' ' + (id - 259) % 95)) + std::to_string(id);
        put_f32(b, -static_cast<float>(id));
        put_i32(b, static_cast<std::int32_t>(p.size()));
        b.insert(b.end(), p.begin(), p.end());
    }
    return b;
}

TEST(Llama2cTokenizerParse, MalformedThrows) {
    const Bytes good = make_tokenizer(300);
    const Llama2cTokenizer tok(good, 300);
    EXPECT_EQ(tok.vocab_size(), 300);
    for (std::size_t n = 0; n < good.size(); n += (n < 64 ? 1 : 13)) {
        const Bytes cut(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n));
        EXPECT_THROW(Llama2cTokenizer(cut, 300), kvq::Error) << "length " << n;
    }
    EXPECT_THROW(Llama2cTokenizer(good, 299), kvq::Error);  // trailing bytes: vocab mismatch
    EXPECT_THROW(Llama2cTokenizer(good, 301), kvq::Error);  // runs out of entries
    EXPECT_THROW(Llama2cTokenizer(good, 0), kvq::Error);
    EXPECT_THROW(Llama2cTokenizer(good, -5), kvq::Error);
    EXPECT_THROW(Llama2cTokenizer(good, INT_MAX), kvq::Error);  // impossible count, no reserve
    for (std::int32_t m : {0, -1, INT_MIN, INT_MAX, 5 /* < longest piece */}) {
        Bytes b = good;
        set_i32(b, 0, m);
        EXPECT_THROW(Llama2cTokenizer(b, 300), kvq::Error) << "max_token_length " << m;
    }
    // Length field of id 0 (after max_len and its score): negative, too long, past the end.
    for (std::int32_t len : {-1, INT_MIN, 7, INT_MAX}) {
        Bytes b = good;
        set_i32(b, 8, len);
        EXPECT_THROW(Llama2cTokenizer(b, 300), kvq::Error) << "len " << len;
    }
    Bytes b = good;
    const float inf = INFINITY;
    std::memcpy(b.data() + 4, &inf, 4);
    EXPECT_THROW(Llama2cTokenizer(b, 300), kvq::Error);
    // A vocab without " " cannot add the dummy prefix; byte fallback outside the vocab is an error.
    const Llama2cTokenizer small(make_tokenizer(100), 100);
    EXPECT_THROW(small.encode("hi", false, false), kvq::Error);
}

TEST(Llama2cTokenizerParse, RealFileVocabMismatchThrows) {
    SKIP_WITHOUT_MODEL_FILES();
    const Bytes bytes = kvq::io::read_file_bytes(kTokPath);
    EXPECT_NO_THROW(Llama2cTokenizer(bytes, 512));
    EXPECT_THROW(Llama2cTokenizer(bytes, 511), kvq::Error);
    EXPECT_THROW(Llama2cTokenizer(bytes, 513), kvq::Error);
    for (std::size_t n = 0; n < bytes.size(); n += 37) {
        const Bytes cut(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n));
        EXPECT_THROW(Llama2cTokenizer(cut, 512), kvq::Error) << "length " << n;
    }
    EXPECT_THROW(kvq::io::load_llama2c_tokenizer(kTokPath + ".does-not-exist", 512), kvq::Error);
}

}  // namespace
