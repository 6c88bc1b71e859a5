#pragma once
// Recording the post-RoPE q, k, v that a Llama model hands to its attention backend, and writing
// them as a KV dump (the safetensors layout of docs/DESIGN.md that kvq-eval --kv reads):
//   layers.L.q  [H_q,  T, d]
//   layers.L.k  [H_kv, T, d]
//   layers.L.v  [H_kv, T, d]      for L = 0 .. n_layers-1, dtype F32, F16 or BF16,
// plus string metadata (__metadata__) describing where the data came from.
//
// KvRecorder is an AttentionBackend that forwards every call to an inner backend (the cache being
// evaluated) and keeps a copy of its inputs, so the dump holds exactly what that cache received:
// with a quantized cache the later layers' q, k, v already carry the effect of quantization on the
// residual stream, which is what "a real cache under method X" means. Only the first sequence is
// recorded (the calls before the first reset() that follows recorded data), at most max_tokens
// positions, because ppl/kl runs over several context windows restart the positions at 0 and a dump
// holds one causal sequence.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "kvq/calibration/kv_calibration.hpp"
#include "kvq/core/error.hpp"
#include "kvq/io/safetensors.hpp"
#include "kvq/model/llama.hpp"

namespace kvq::model {

// What was recorded, token-major as the model produces it: q[l] is [T][H_q][d], k[l] and v[l] are
// [T][H_kv][d].
struct KvRecording {
    int n_layers = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
    std::vector<std::vector<float>> q, k, v;

    // Positions recorded (the same in every layer once a forward pass has completed).
    int tokens(int layer = 0) const {
        KVQ_CHECK(layer >= 0 && layer < n_layers, "KvRecording: layer ", layer, " is outside [0, ", n_layers, ")");
        return static_cast<int>(k[static_cast<std::size_t>(layer)].size() / (std::size_t(n_kv_heads) * head_dim));
    }

    // The first `tokens` positions of `layer` as WKV calibration data (every position when tokens <= 0).
    calib::KvCalibData calib_data(int layer, int tokens = 0) const {
        const int have = this->tokens(layer);
        const int T = tokens > 0 ? std::min(tokens, have) : have;
        calib::KvCalibData D;
        D.n_kv_heads = n_kv_heads;
        D.n_q_heads = n_heads;
        D.head_dim = head_dim;
        D.tokens = T;
        const auto l = static_cast<std::size_t>(layer);
        const std::size_t kvn = std::size_t(T) * n_kv_heads * head_dim, qn = std::size_t(T) * n_heads * head_dim;
        D.k.assign(k[l].begin(), k[l].begin() + static_cast<std::ptrdiff_t>(kvn));
        D.v.assign(v[l].begin(), v[l].begin() + static_cast<std::ptrdiff_t>(kvn));
        D.q.assign(q[l].begin(), q[l].begin() + static_cast<std::ptrdiff_t>(qn));
        return D;
    }
};

class KvRecorder : public AttentionBackend {
public:
    // `inner` must outlive the recorder. max_tokens > 0 caps the recorded positions (the run goes on).
    KvRecorder(AttentionBackend& inner, const LlamaConfig& c, int max_tokens = 0)
        : inner_(inner), max_tokens_(max_tokens) {
        validate_config(c);
        KVQ_CHECK(max_tokens >= 0, "KvRecorder: max_tokens = ", max_tokens, " is negative");
        rec_.n_layers = c.n_layers;
        rec_.n_heads = c.n_heads;
        rec_.n_kv_heads = c.n_kv_heads;
        rec_.head_dim = c.head_dim;
        rec_.q.resize(static_cast<std::size_t>(c.n_layers));
        rec_.k.resize(static_cast<std::size_t>(c.n_layers));
        rec_.v.resize(static_cast<std::size_t>(c.n_layers));
    }

    void reset() override {
        inner_.reset();
        // A new sequence after recorded data: keep the first one (see the header comment).
        if (!rec_.k.empty() && !rec_.k[0].empty()) done_ = true;
    }

    void decode(int layer, int pos, const float* q, const float* k, const float* v, float* out) override {
        inner_.decode(layer, pos, q, k, v, out);  // first, so that a rejected call records nothing
        if (done_ || (max_tokens_ > 0 && pos >= max_tokens_)) return;
        const auto l = static_cast<std::size_t>(layer);
        KVQ_CHECK(layer >= 0 && layer < rec_.n_layers, "KvRecorder: layer ", layer, " is outside [0, ", rec_.n_layers,
                  ")");
        KVQ_CHECK(pos == rec_.tokens(layer), "KvRecorder: layer ", layer, " got pos ", pos, " but recorded ",
                  rec_.tokens(layer), " positions");
        const std::size_t qn = std::size_t(rec_.n_heads) * rec_.head_dim,
                          kvn = std::size_t(rec_.n_kv_heads) * rec_.head_dim;
        rec_.q[l].insert(rec_.q[l].end(), q, q + qn);
        rec_.k[l].insert(rec_.k[l].end(), k, k + kvn);
        rec_.v[l].insert(rec_.v[l].end(), v, v + kvn);
    }

    const KvRecording& recording() const { return rec_; }
    // Forget what was recorded and record the next sequence.
    void clear() {
        for (auto* x : {&rec_.q, &rec_.k, &rec_.v})
            for (auto& layer : *x) layer.clear();
        done_ = false;
    }

private:
    AttentionBackend& inner_;
    int max_tokens_;
    bool done_ = false;
    KvRecording rec_;
};

// [T][H][d] -> [H][T][d].
inline std::vector<float> head_major(const std::vector<float>& x, int T, int H, int d) {
    std::vector<float> out(x.size());
    for (int t = 0; t < T; ++t)
        for (int h = 0; h < H; ++h)
            std::copy_n(x.data() + (std::size_t(t) * H + h) * d, d, out.data() + (std::size_t(h) * T + t) * d);
    return out;
}

// Writes `rec` as a KV dump (format in the header comment). Every layer must hold the same number
// of positions (at least 1). with_q = false leaves out layers.L.q (kvq-eval then uses the keys as
// queries). The file is written atomically (io::write_safetensors).
inline void write_kv_dump(const std::string& path, const KvRecording& rec, io::Dtype dtype = io::Dtype::F32,
                          std::map<std::string, std::string> metadata = {}, bool with_q = true) {
    KVQ_CHECK(dtype == io::Dtype::F32 || dtype == io::Dtype::F16 || dtype == io::Dtype::BF16, "write_kv_dump: dtype ",
              io::dtype_name(dtype), " is not one of F32, F16, BF16");
    KVQ_CHECK(rec.n_layers >= 1 && rec.k.size() == std::size_t(rec.n_layers), "write_kv_dump: the recording has ",
              rec.n_layers, " layers");
    const int T = rec.tokens(0);
    KVQ_CHECK(T >= 1, "write_kv_dump: nothing was recorded (0 positions)");
    for (int l = 0; l < rec.n_layers; ++l)
        KVQ_CHECK(rec.tokens(l) == T && rec.q[std::size_t(l)].size() == std::size_t(T) * rec.n_heads * rec.head_dim,
                  "write_kv_dump: layer ", l, " holds ", rec.tokens(l), " positions but layer 0 holds ", T,
                  " (a forward pass was interrupted?)");
    const int d = rec.head_dim, Hk = rec.n_kv_heads, Hq = rec.n_heads;
    std::vector<std::vector<float>> data;  // owns the transposed tensors that TensorToWrite points into
    data.reserve(std::size_t(rec.n_layers) * 3);
    std::vector<io::TensorToWrite> tensors;
    for (int l = 0; l < rec.n_layers; ++l) {
        const auto li = static_cast<std::size_t>(l);
        const std::string p = "layers." + std::to_string(l) + ".";
        if (with_q) {
            data.push_back(head_major(rec.q[li], T, Hq, d));
            tensors.push_back({p + "q", dtype, {Hq, T, d}, data.back()});
        }
        data.push_back(head_major(rec.k[li], T, Hk, d));
        tensors.push_back({p + "k", dtype, {Hk, T, d}, data.back()});
        data.push_back(head_major(rec.v[li], T, Hk, d));
        tensors.push_back({p + "v", dtype, {Hk, T, d}, data.back()});
    }
    metadata.emplace("format", "kvq KV dump: layers.L.{q,k,v} [heads, tokens, head_dim], post-RoPE");
    metadata.emplace("n_layers", std::to_string(rec.n_layers));
    metadata.emplace("n_heads", std::to_string(Hq));
    metadata.emplace("n_kv_heads", std::to_string(Hk));
    metadata.emplace("head_dim", std::to_string(d));
    metadata.emplace("tokens", std::to_string(T));
    io::write_safetensors(path, tensors, metadata);
}

}  // namespace kvq::model
