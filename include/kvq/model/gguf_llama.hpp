#pragma once
// Maps a GGUF llama-architecture file (e.g. SmolLM2-135M-Instruct) to LlamaConfig / LlamaWeights,
// dequantizing every tensor to fp32.
//
// GGUF stores a matrix with ne = [in, out] (ne[0] contiguous), i.e. row-major [out][in], which is
// the layout model/llama.hpp's matvec expects. llama.cpp's converter permutes the Q and K rows of
// Hugging Face checkpoints so that RoPE rotates adjacent pairs (x[2i], x[2i+1]), the same RoPE
// model/llama.hpp implements, so no un-permutation is needed. When output.weight is absent the
// classifier is tied to token_embd.
#include <string>
#include <utility>

#include "kvq/core/error.hpp"
#include "kvq/io/gguf.hpp"
#include "kvq/io/llama2c.hpp"

namespace kvq::model {

struct GgufLlama {
    io::LlamaConfig config;
    io::LlamaWeights weights;
};

// `max_seq_len` > 0 caps seq_len (llama.context_length can be 8192 or more).
inline GgufLlama load_gguf_llama(const io::GgufFile& f, int max_seq_len = 0) {
    const std::string arch = f.get_string("general.architecture");
    KVQ_CHECK(arch == "llama", "gguf llama: general.architecture = '", arch, "', expected 'llama'");
    auto geti = [&](const std::string& key, std::uint64_t lo, std::uint64_t hi) {
        const std::uint64_t v = f.get_uint(key);
        KVQ_CHECK(v >= lo && v <= hi, "gguf llama: ", key, " = ", v, " is outside [", lo, ", ", hi, "]");
        return static_cast<int>(v);
    };
    GgufLlama m;
    io::LlamaConfig& c = m.config;
    c.n_layers = geti("llama.block_count", 1, 1024);
    c.dim = geti("llama.embedding_length", 1, 65536);
    c.hidden_dim = geti("llama.feed_forward_length", 1, 1 << 20);
    c.n_heads = geti("llama.attention.head_count", 1, 4096);
    c.n_kv_heads = f.has("llama.attention.head_count_kv") ? geti("llama.attention.head_count_kv", 1, 4096) : c.n_heads;
    c.seq_len = geti("llama.context_length", 1, 1 << 24);
    if (max_seq_len > 0 && c.seq_len > max_seq_len) c.seq_len = max_seq_len;
    KVQ_CHECK(c.dim % c.n_heads == 0, "gguf llama: embedding_length ", c.dim, " not divisible by head_count ",
              c.n_heads);
    c.head_dim = c.dim / c.n_heads;
    if (f.has("llama.rope.dimension_count"))
        KVQ_CHECK(static_cast<int>(f.get_uint("llama.rope.dimension_count")) == c.head_dim,
                  "gguf llama: partial RoPE (rope.dimension_count != head_dim) is not supported");
    c.rope_theta = static_cast<float>(f.get_float("llama.rope.freq_base", 10000.0));
    c.norm_eps = static_cast<float>(f.get_float("llama.attention.layer_norm_rms_epsilon", 1e-5));

    const io::GgufTensorInfo& emb = f.tensor("token_embd.weight");
    KVQ_CHECK(emb.ne.size() == 2 && emb.ne[0] == static_cast<std::uint64_t>(c.dim), "gguf llama: token_embd.weight ",
              "has the wrong shape");
    c.vocab_size = static_cast<int>(emb.ne[1]);
    KVQ_CHECK(emb.ne[1] < (1u << 30), "gguf llama: vocabulary of ", emb.ne[1]);

    auto load = [&](const std::string& name, std::uint64_t in, std::uint64_t out) {
        const io::GgufTensorInfo& t = f.tensor(name);
        const bool ok =
            (out == 1) ? (t.ne.size() == 1 && t.ne[0] == in) : (t.ne.size() == 2 && t.ne[0] == in && t.ne[1] == out);
        KVQ_CHECK(ok, "gguf llama: tensor '", name, "' has an unexpected shape (expected [", in, ", ", out, "])");
        return f.dequantize(t);
    };
    const std::uint64_t dim = c.dim, hid = c.hidden_dim, kvd = c.kv_dim();
    m.weights.token_embedding = f.dequantize(emb);
    m.weights.layers.resize(static_cast<std::size_t>(c.n_layers));
    for (int l = 0; l < c.n_layers; ++l) {
        const std::string p = "blk." + std::to_string(l) + ".";
        auto& L = m.weights.layers[static_cast<std::size_t>(l)];
        L.rms_att = load(p + "attn_norm.weight", dim, 1);
        L.wq = load(p + "attn_q.weight", dim, dim);
        L.wk = load(p + "attn_k.weight", dim, kvd);
        L.wv = load(p + "attn_v.weight", dim, kvd);
        L.wo = load(p + "attn_output.weight", dim, dim);
        L.rms_ffn = load(p + "ffn_norm.weight", dim, 1);
        L.w1 = load(p + "ffn_gate.weight", dim, hid);
        L.w2 = load(p + "ffn_down.weight", hid, dim);
        L.w3 = load(p + "ffn_up.weight", dim, hid);
    }
    m.weights.rms_final = load("output_norm.weight", dim, 1);
    if (f.find_tensor("output.weight") != nullptr) {
        m.weights.wcls = load("output.weight", dim, static_cast<std::uint64_t>(c.vocab_size));
        c.shared_classifier = false;
    } else {
        c.shared_classifier = true;
    }
    return m;
}

}  // namespace kvq::model
