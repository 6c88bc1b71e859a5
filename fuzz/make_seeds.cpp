// Writes the committed seed corpora of the fuzz targets that read model and parameter files:
// fuzz/corpus/{gguf,llama2c,tokenizer,kv_params}/. Each seed is a small valid file (so mutations
// start from inputs that reach the deep checks) plus a few truncations of it. The cache_file seeds
// come from fuzz/fuzz_cache_file.cpp built with -DKVQ_CACHE_FILE_MAKE_SEEDS.
//   g++ -std=c++20 -Iinclude -I/usr/include/eigen3 fuzz/make_seeds.cpp -o mk && ./mk fuzz/corpus
// Deterministic: running it again rewrites the same bytes.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "kvq/core/half.hpp"
#include "kvq/io/gguf.hpp"
#include "kvq/io/kv_params_file.hpp"
#include "kvq/io/llama2c.hpp"

namespace {
using Bytes = std::vector<std::uint8_t>;

void write(const std::filesystem::path& dir, const std::string& name, const Bytes& b) {
    std::filesystem::create_directories(dir);
    const std::string path = (dir / name).string();
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (!f) throw std::runtime_error("cannot write " + path);
    std::fwrite(b.data(), 1, b.size(), f);
    std::fclose(f);
    std::printf("%s: %zu bytes\n", path.c_str(), b.size());
}

// The file, and cuts at 1/3 and 2/3 of it (truncation paths of the reader).
void write_with_cuts(const std::filesystem::path& dir, const std::string& name, const Bytes& b) {
    write(dir, name, b);
    for (int k : {1, 2}) write(dir, name + "_cut" + std::to_string(k), Bytes(b.begin(), b.begin() + b.size() * k / 3));
}

template <class T>
void put(Bytes& b, T v) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(&v);
    b.insert(b.end(), p, p + sizeof(T));
}

// GPT-2 byte-level alphabet: printable bytes stand for themselves, the rest for U+0100 onwards.
std::vector<std::string> byte_level_alphabet() {
    std::vector<std::string> out;
    int next = 256;
    for (int b = 0; b < 256; ++b) {
        const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        const int cp = printable ? b : next++;
        std::string s;
        if (cp < 0x80) {
            s += char(cp);
        } else {  // two-byte UTF-8 (all code points here are below 0x800)
            s += char(0xC0 | (cp >> 6));
            s += char(0x80 | (cp & 0x3F));
        }
        out.push_back(s);
    }
    return out;
}

Bytes gguf_seed() {
    kvq::io::GgufWriter w;
    w.add_string("general.architecture", "llama");
    w.add_u32("general.alignment", 32);
    w.add_string("tokenizer.ggml.model", "gpt2");
    std::vector<std::string> tokens = byte_level_alphabet();
    for (const char* t : {"He", "ll", "Hell", "Hello", "\xC4\xA0w", "or", "\xC4\xA0wor", "<|im_start|>"})
        tokens.push_back(t);
    w.add_string_array("tokenizer.ggml.tokens", tokens);
    w.add_string_array("tokenizer.ggml.merges", {"H e", "l l", "He ll", "Hell o", "\xC4\xA0 w", "o r", "\xC4\xA0w or"});
    std::vector<std::int32_t> types(tokens.size(), 1);
    types.back() = 3;  // control token
    w.add_array<std::int32_t>("tokenizer.ggml.token_type", kvq::io::GgufType::I32, types);
    w.add_u32("tokenizer.ggml.bos_token_id", std::uint32_t(tokens.size() - 1));
    // One tensor of each supported type: F32, F16, Q4_0, Q4_1, Q8_0.
    std::mt19937 rng(1);
    Bytes f32, f16, q40, q41, q80;
    for (int i = 0; i < 8; ++i) put(f32, float(i) - 3.5f);
    for (int i = 0; i < 8; ++i) put(f16, kvq::float_to_half(0.25f * i).bits);
    put(q40, kvq::float_to_half(0.5f).bits);
    for (int j = 0; j < 16; ++j) q40.push_back(std::uint8_t(rng()));
    put(q41, kvq::float_to_half(0.125f).bits);
    put(q41, kvq::float_to_half(-1.0f).bits);
    for (int j = 0; j < 16; ++j) q41.push_back(std::uint8_t(rng()));
    put(q80, kvq::float_to_half(0.0625f).bits);
    for (int j = 0; j < 32; ++j) q80.push_back(std::uint8_t(rng()));
    w.add_tensor("f32", {4, 2}, 0, f32);
    w.add_tensor("f16", {8}, 1, f16);
    w.add_tensor("q4_0", {32}, 2, q40);
    w.add_tensor("q4_1", {32}, 3, q41);
    w.add_tensor("q8_0", {32}, 8, q80);
    return w.finish(32);
}

// A 1-layer llama2.c checkpoint: dim 8, hidden 16, 2 query heads, 1 KV head, vocab 6, seq_len 4.
Bytes llama2c_seed(bool shared_classifier, bool rope_tables) {
    Bytes b;
    const std::int32_t header[7] = {8, 16, 1, 2, 1, shared_classifier ? 6 : -6, 4};
    for (std::int32_t v : header) put(b, v);
    kvq::io::LlamaConfig c = kvq::io::parse_llama2c_header(b);
    const std::int64_t n = kvq::io::llama2c_float_count(c, rope_tables);
    std::mt19937 rng(2);
    std::normal_distribution<float> nd(0.0f, 0.3f);
    for (std::int64_t i = 0; i < n; ++i) put(b, nd(rng));
    return b;
}

// llama2.c tokenizer with vocab 262 (unk, BOS, EOS, 256 byte pieces, " " and two merges); the fuzz
// target reads vocab_size + 1 from the first two bytes.
Bytes tokenizer_seed() {
    Bytes b;
    const int vocab = 262;
    put(b, std::uint16_t(vocab + 1));
    put(b, std::int32_t(8));  // max_token_length
    auto piece = [&](float score, const std::string& s) {
        put(b, score);
        put(b, std::int32_t(s.size()));
        b.insert(b.end(), s.begin(), s.end());
    };
    piece(0.0f, "<unk>");
    piece(0.0f, "\n<s>\n");
    piece(0.0f, "\n</s>\n");
    char hex[8];
    for (int i = 0; i < 256; ++i) {
        std::snprintf(hex, sizeof hex, "<0x%02X>", i);
        piece(0.0f, hex);
    }
    piece(-0.5f, " ");
    piece(-1.0f, " H");
    piece(-2.0f, "i,");
    return b;
}

Bytes kv_params_seed() {
    kvq::WkvParams p = kvq::WkvParams::identity(2, 1, 8);
    for (std::size_t c = 0; c < 8; ++c) {
        p.layers[0].k_shift[c] = 0.5f * float(c);
        p.layers[1].v_scale[c] = 1.0f + 0.25f * float(c);
    }
    return kvq::io::serialize_wkv_params(p);
}
}  // namespace

int main(int argc, char** argv) {
    const std::filesystem::path root = argc > 1 ? argv[1] : "fuzz/corpus";
    write_with_cuts(root / "gguf", "tiny_llama_tokenizer", gguf_seed());
    write_with_cuts(root / "llama2c", "tiny_shared", llama2c_seed(true, false));
    write(root / "llama2c", "tiny_separate_classifier_rope_tables", llama2c_seed(false, true));
    write_with_cuts(root / "tokenizer", "bytes_and_merges", tokenizer_seed());
    write_with_cuts(root / "kv_params", "two_layers", kv_params_seed());
    return 0;
}
