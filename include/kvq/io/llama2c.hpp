#pragma once
// Reader for llama2.c "legacy" (version 0) checkpoints such as stories260K.bin.
//
// Layout (little-endian): 7 x int32 header = dim, hidden_dim, n_layers, n_heads, n_kv_heads,
// vocab_size, seq_len; then float32 tensors, matrices row-major [out][in]:
//   token_embedding[vocab][dim], rms_att[L][dim], wq[L][dim][dim], wk[L][kv_dim][dim],
//   wv[L][kv_dim][dim], wo[L][dim][dim], rms_ffn[L][dim], w1[L][hidden][dim],
//   w2[L][dim][hidden], w3[L][hidden][dim], rms_final[dim],
//   [optional: two legacy RoPE tables, seq_len * head_dim/2 floats each, never used],
//   [wcls[vocab][dim] only when the stored vocab_size is negative].
//
// The file is untrusted input: every header value is range-checked, the expected byte count is
// computed in 64-bit with overflow checks, and it must equal the buffer size exactly BEFORE any
// tensor is allocated. So a malformed header can never cause a large allocation: whatever we
// allocate is bounded by the size of the bytes we were handed.
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "kvq/core/error.hpp"

namespace kvq::io {

static_assert(std::endian::native == std::endian::little,
              "llama2.c files are little-endian; kvq::io reads them with memcpy");

struct LlamaConfig {
    int dim = 0;
    int hidden_dim = 0;
    int n_layers = 0;
    int n_heads = 0;
    int n_kv_heads = 0;
    int vocab_size = 0;  // always positive here; the file's sign is folded into shared_classifier
    int seq_len = 0;
    int head_dim = 0;               // dim / n_heads
    bool shared_classifier = true;  // classifier == token embedding (file stores +vocab_size)
    float rope_theta = 10000.0f;    // llama2.c hard-codes these two; not stored in the file
    float norm_eps = 1e-5f;

    int kv_dim() const { return n_kv_heads * head_dim; }
};

struct LlamaLayerWeights {
    std::vector<float> rms_att;  // [dim]
    std::vector<float> wq;       // [dim][dim]
    std::vector<float> wk;       // [kv_dim][dim]
    std::vector<float> wv;       // [kv_dim][dim]
    std::vector<float> wo;       // [dim][dim]
    std::vector<float> rms_ffn;  // [dim]
    std::vector<float> w1;       // [hidden][dim]
    std::vector<float> w2;       // [dim][hidden]
    std::vector<float> w3;       // [hidden][dim]
};

struct LlamaWeights {
    std::vector<float> token_embedding;  // [vocab][dim]
    std::vector<LlamaLayerWeights> layers;
    std::vector<float> rms_final;  // [dim]
    std::vector<float> wcls;       // [vocab][dim]; empty when the classifier is shared

    const std::vector<float>& classifier() const { return wcls.empty() ? token_embedding : wcls; }
};

struct Llama2cCheckpoint {
    LlamaConfig config;
    LlamaWeights weights;
    bool had_rope_tables = false;  // whether the (ignored) legacy RoPE tables were present
};

// Sanity limits. They are far above any llama2.c-exportable model but low enough that every
// size product below stays well inside int64 (checked anyway).
inline constexpr std::int64_t kLlama2cMaxDim = 65536;
inline constexpr std::int64_t kLlama2cMaxHiddenDim = 1 << 20;
inline constexpr std::int64_t kLlama2cMaxLayers = 1024;
inline constexpr std::int64_t kLlama2cMaxVocab = 1 << 22;
inline constexpr std::int64_t kLlama2cMaxSeqLen = 1 << 24;

namespace llama2c_detail {

// a * b, or kvq::Error if the product leaves [0, int64 max]. Operands are already non-negative.
inline std::int64_t checked_mul(std::int64_t a, std::int64_t b, const char* what) {
    std::int64_t r = 0;
    if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r)) KVQ_THROW("size overflow computing ", what);
    return r;
}
inline std::int64_t checked_add(std::int64_t a, std::int64_t b, const char* what) {
    std::int64_t r = 0;
    if (a < 0 || b < 0 || __builtin_add_overflow(a, b, &r)) KVQ_THROW("size overflow computing ", what);
    return r;
}

inline std::int32_t read_i32(std::span<const std::uint8_t> bytes, std::size_t offset) {
    std::int32_t v;
    std::memcpy(&v, bytes.data() + offset, sizeof v);
    return v;
}

// Sequential float reader; the total size was verified up front, so a short read is a kvq bug.
struct FloatCursor {
    std::span<const std::uint8_t> bytes;
    std::size_t offset;

    std::vector<float> take(std::int64_t count, const char* name) {
        KVQ_ASSERT(count >= 0 && offset + static_cast<std::size_t>(count) * 4 <= bytes.size());
        std::vector<float> out(static_cast<std::size_t>(count));
        std::memcpy(out.data(), bytes.data() + offset, out.size() * sizeof(float));
        offset += out.size() * sizeof(float);
        // NaN/Inf weights would silently poison every logit; reject them at the door.
        for (std::size_t i = 0; i < out.size(); ++i)
            KVQ_CHECK(std::isfinite(out[i]), "llama2c: tensor ", name, " has non-finite value ", out[i], " at index ",
                      i);
        return out;
    }
    void skip(std::int64_t count) { offset += static_cast<std::size_t>(count) * sizeof(float); }
};

}  // namespace llama2c_detail

// Validates the 7-int header (28 bytes) and returns the config. Does not look at the tensor bytes.
inline LlamaConfig parse_llama2c_header(std::span<const std::uint8_t> bytes) {
    KVQ_CHECK(bytes.size() >= 28, "llama2c: file too short for the 28-byte header: ", bytes.size(), " bytes");
    auto field = [&](int i) -> std::int64_t {
        return llama2c_detail::read_i32(bytes, 4 * static_cast<std::size_t>(i));
    };
    const std::int64_t dim = field(0), hidden = field(1), layers = field(2), heads = field(3), kv_heads = field(4),
                       vocab_signed = field(5), seq_len = field(6);
    auto in_range = [](std::int64_t v, std::int64_t hi, const char* name) {
        KVQ_CHECK(v > 0 && v <= hi, "llama2c: header ", name, " = ", v, " is outside [1, ", hi, "]");
    };
    in_range(dim, kLlama2cMaxDim, "dim");
    in_range(hidden, kLlama2cMaxHiddenDim, "hidden_dim");
    in_range(layers, kLlama2cMaxLayers, "n_layers");
    in_range(heads, dim, "n_heads");
    in_range(kv_heads, heads, "n_kv_heads");
    // int64 so that INT32_MIN has a magnitude; zero is neither "shared" nor "separate".
    const std::int64_t vocab = vocab_signed < 0 ? -vocab_signed : vocab_signed;
    KVQ_CHECK(vocab_signed != 0 && vocab <= kLlama2cMaxVocab, "llama2c: header vocab_size = ", vocab_signed,
              " (magnitude must be in [1, ", kLlama2cMaxVocab, "]; negative means a separate classifier)");
    in_range(seq_len, kLlama2cMaxSeqLen, "seq_len");
    KVQ_CHECK(dim % heads == 0, "llama2c: dim = ", dim, " is not divisible by n_heads = ", heads);
    KVQ_CHECK(heads % kv_heads == 0, "llama2c: n_heads = ", heads, " is not divisible by n_kv_heads = ", kv_heads);
    const std::int64_t head_dim = dim / heads;
    // RoPE rotates adjacent pairs inside a head, so a head needs an even width.
    KVQ_CHECK(head_dim % 2 == 0, "llama2c: head_dim = dim / n_heads = ", head_dim, " is odd");

    LlamaConfig c;
    c.dim = static_cast<int>(dim);
    c.hidden_dim = static_cast<int>(hidden);
    c.n_layers = static_cast<int>(layers);
    c.n_heads = static_cast<int>(heads);
    c.n_kv_heads = static_cast<int>(kv_heads);
    c.vocab_size = static_cast<int>(vocab);
    c.seq_len = static_cast<int>(seq_len);
    c.head_dim = static_cast<int>(head_dim);
    c.shared_classifier = vocab_signed > 0;
    return c;
}

// Number of float32 values after the header: the weights proper, plus the legacy tables if asked.
inline std::int64_t llama2c_float_count(const LlamaConfig& c, bool with_rope_tables) {
    using llama2c_detail::checked_add;
    using llama2c_detail::checked_mul;
    const std::int64_t dim = c.dim, hidden = c.hidden_dim, L = c.n_layers, vocab = c.vocab_size;
    const std::int64_t kv_dim = checked_mul(c.n_kv_heads, c.head_dim, "kv_dim");
    const std::int64_t emb = checked_mul(vocab, dim, "token_embedding");
    // Per layer: 2 norms, wq and wo (dim x dim), wk and wv (kv_dim x dim), w1/w2/w3 (hidden x dim).
    std::int64_t per_layer = checked_mul(2, dim, "rms weights");
    per_layer = checked_add(per_layer, checked_mul(2, checked_mul(dim, dim, "wq/wo"), "wq/wo"), "layer");
    per_layer = checked_add(per_layer, checked_mul(2, checked_mul(kv_dim, dim, "wk/wv"), "wk/wv"), "layer");
    per_layer = checked_add(per_layer, checked_mul(3, checked_mul(hidden, dim, "ffn"), "ffn"), "layer");
    std::int64_t total = checked_add(emb, checked_mul(L, per_layer, "all layers"), "weights");
    total = checked_add(total, dim, "rms_final");
    if (with_rope_tables)  // two tables of seq_len * head_dim/2 each
        total = checked_add(total, checked_mul(c.seq_len, c.head_dim, "rope tables"), "rope tables");
    if (!c.shared_classifier) total = checked_add(total, emb, "wcls");
    return total;
}

// Parses a whole checkpoint held in memory. Accepts exactly two sizes: with the legacy RoPE
// tables (what llama2.c's legacy export writes) and without them; anything else is an error.
inline Llama2cCheckpoint parse_llama2c(std::span<const std::uint8_t> bytes) {
    Llama2cCheckpoint ck;
    ck.config = parse_llama2c_header(bytes);
    const LlamaConfig& c = ck.config;

    using llama2c_detail::checked_add;
    using llama2c_detail::checked_mul;
    const std::int64_t with_tables = checked_add(28, checked_mul(4, llama2c_float_count(c, true), "bytes"), "bytes");
    const std::int64_t without_tables =
        checked_add(28, checked_mul(4, llama2c_float_count(c, false), "bytes"), "bytes");
    const auto actual = static_cast<std::uint64_t>(bytes.size());
    KVQ_CHECK(actual == static_cast<std::uint64_t>(with_tables) || actual == static_cast<std::uint64_t>(without_tables),
              "llama2c: file has ", actual, " bytes but the header (dim=", c.dim, " hidden_dim=", c.hidden_dim,
              " n_layers=", c.n_layers, " n_heads=", c.n_heads, " n_kv_heads=", c.n_kv_heads,
              " vocab_size=", c.vocab_size, (c.shared_classifier ? " shared" : " separate"),
              " classifier, seq_len=", c.seq_len, ") implies ", with_tables, " bytes with RoPE tables or ",
              without_tables, " without");
    ck.had_rope_tables = actual == static_cast<std::uint64_t>(with_tables);

    // From here on every count is bounded by bytes.size(), so allocation is safe.
    const std::int64_t dim = c.dim, hidden = c.hidden_dim, kv_dim = c.kv_dim(), vocab = c.vocab_size;
    llama2c_detail::FloatCursor cur{bytes, 28};
    LlamaWeights& w = ck.weights;
    w.token_embedding = cur.take(vocab * dim, "token_embedding");
    w.layers.resize(static_cast<std::size_t>(c.n_layers));
    // The file groups each tensor kind across all layers, so read kind by kind.
    for (auto& l : w.layers) l.rms_att = cur.take(dim, "rms_att");
    for (auto& l : w.layers) l.wq = cur.take(dim * dim, "wq");
    for (auto& l : w.layers) l.wk = cur.take(kv_dim * dim, "wk");
    for (auto& l : w.layers) l.wv = cur.take(kv_dim * dim, "wv");
    for (auto& l : w.layers) l.wo = cur.take(dim * dim, "wo");
    for (auto& l : w.layers) l.rms_ffn = cur.take(dim, "rms_ffn");
    for (auto& l : w.layers) l.w1 = cur.take(hidden * dim, "w1");
    for (auto& l : w.layers) l.w2 = cur.take(dim * hidden, "w2");
    for (auto& l : w.layers) l.w3 = cur.take(hidden * dim, "w3");
    w.rms_final = cur.take(dim, "rms_final");
    // The legacy tables are ignored: RoPE is recomputed from rope_theta, as current llama2.c does.
    if (ck.had_rope_tables) cur.skip(static_cast<std::int64_t>(c.seq_len) * c.head_dim);
    if (!c.shared_classifier) w.wcls = cur.take(vocab * dim, "wcls");
    KVQ_ASSERT(cur.offset == bytes.size());
    return ck;
}

// Reads a whole file into memory (binary). kvq::Error if it cannot be opened or read.
inline std::vector<std::uint8_t> read_file_bytes(const std::string& path) {
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    KVQ_CHECK(f.good(), "cannot open file '", path, "'");
    const std::streamoff size = f.tellg();
    KVQ_CHECK(size >= 0, "cannot determine the size of '", path, "'");
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(size));
    f.seekg(0);
    if (size > 0) f.read(reinterpret_cast<char*>(bytes.data()), size);
    KVQ_CHECK(f.good() || (size == 0), "failed to read ", size, " bytes from '", path, "'");
    return bytes;
}

inline Llama2cCheckpoint load_llama2c(const std::string& path) { return parse_llama2c(read_file_bytes(path)); }

}  // namespace kvq::io
