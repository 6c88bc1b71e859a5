#pragma once
// A seeded, LLM-like synthetic KV workload: keys, values and queries of a few attention layers in
// the dump layout of DESIGN.md ("Data interchange"): per layer k, v as [H_kv][T][d] and q as
// [H_q][T][d], row-major float32. It stands in for a real KV dump when none is at hand (kvq-eval's
// default workload, tests, benchmarks) and reproduces the features that make KV quantization hard.
//
// Model, per layer l and KV head h (c = channel, t = token, all draws independent N(0, 1) unless
// stated otherwise):
//   outliers  O_{l,h}: `outlier_channels` distinct channels drawn uniformly; scale s_c =
//             outlier_scale for c in O, 1 otherwise. As in real LLM keys (KIVI, QJL papers) the
//             outliers are whole channels, fixed for the head and consistent over tokens.
//   bias      mu_c ~ N(0, bias_std^2): a fixed per-(layer, head, channel) offset, so per-channel
//             means are non-zero (what per-channel key quantization exploits).
//   drift     u_c(t): a slowly varying component along the sequence, a unit-variance AR(1) process
//             u_c(0) ~ N(0, 1), u_c(t) = rho u_c(t-1) + sqrt(1 - rho^2) e_c(t), rho =
//             exp(-1 / drift_tokens): keys drift_tokens apart are correlated by 1/e, so a query
//             that resembles one key also prefers its neighbours (attention is local, not uniform).
//   keys      k_t[c] = s_c * (mu_c + drift_std * u_c(t) + noise_std * z_c(t)).
//   values    v_t[c] = value_std * n_c(t): flat, no outliers, no bias.
// and per query head g (it reads KV head h = g / (H_q / H_kv), as GQA does):
//   queries   q_t = query_gain * R k_j + query_noise * n(t), with j drawn uniformly from [0, t]
//             (a random earlier position, the current one included) and R = diag(r_c), r_c =
//             query_outlier_gain for c in O_{l,h}, 1 otherwise. So a query shares its head's
//             per-channel structure (bias, drift, outlier channels scaled by outlier_scale *
//             query_outlier_gain) and its softmax peaks at position j and j's neighbours.
//             Default query_outlier_gain = 1 / outlier_scale: the outlier channels weigh in the
//             scores like any other channel (q has no outliers), while they still dominate the
//             key norms and the ranges that quantizers see. query_outlier_gain = 1 gives q = a k_j
//             exactly, whose scores are dominated by the few outlier channels.
// With the defaults (d = 128, T = 1024; measured over the second half of the sequence) the logits
// q.k/sqrt(d) of one query have a standard deviation of about 1.6 and their maximum (at j) stands
// about 5 standard deviations above their mean: the largest attention weight is about 0.47 and the
// perplexity of the attention row (exp of its entropy) about 60 tokens, so the softmax is peaked
// but not one-hot.
//
// Randomness: every stream is a std::mt19937_64 (whose output the C++ standard fixes) seeded from
// (seed, layer, head, stream) through the SplitMix64 finalizer; uniform, normal (Box-Muller) and
// bounded integer draws are done by hand here, not by std::*_distribution (implementation-defined),
// so the data are the same with every standard library (up to libm's log/sin/cos, which glibc and
// every common libm round identically in practice). Each (layer, head) has its own streams for
// structure (outliers, bias), keys, values and queries, and tokens are drawn in order, so the data
// of T tokens are a prefix of the data of T' > T tokens, and heads and layers do not depend on
// each other or on how many there are.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "kvq/core/error.hpp"

namespace kvq::workload {

struct SyntheticSpec {
    int layers = 2;
    int kv_heads = 4;
    int q_heads = 8;  // a positive multiple of kv_heads (GQA group = q_heads / kv_heads)
    int head_dim = 128;
    int tokens = 1024;
    std::uint64_t seed = 0x6B76712D6576616Cull;  // "kvq-eval"

    int outlier_channels = 4;     // outlier channels per (layer, KV head), in [0, head_dim]
    float outlier_scale = 10.0f;  // s_c of an outlier channel
    float bias_std = 1.0f;        // std of the per-channel offset mu_c
    float noise_std = 1.0f;       // std of the per-token key noise
    float drift_std = 1.0f;       // amplitude of the slowly varying component
    float drift_tokens = 64.0f;   // its correlation length in tokens (> 0)
    float value_std = 1.0f;
    float query_gain = 0.3f;          // a in q = a R k_j + noise
    float query_noise = 0.1f;         // std of the query's own noise
    float query_outlier_gain = 0.1f;  // r_c on outlier channels (default 1 / outlier_scale)

    // Throws kvq::Error naming the first invalid field.
    void validate() const {
        KVQ_CHECK(layers >= 1 && layers <= 4096, "synthetic workload: layers must be in [1, 4096], got ", layers);
        KVQ_CHECK(kv_heads >= 1 && kv_heads <= 1024, "synthetic workload: kv_heads must be in [1, 1024], got ",
                  kv_heads);
        KVQ_CHECK(q_heads >= kv_heads && q_heads <= 4096 && q_heads % kv_heads == 0,
                  "synthetic workload: q_heads must be a multiple of kv_heads (", kv_heads, ") up to 4096, got ",
                  q_heads);
        KVQ_CHECK(head_dim >= 1 && head_dim <= 4096, "synthetic workload: head_dim must be in [1, 4096], got ",
                  head_dim);
        KVQ_CHECK(tokens >= 1 && tokens <= (1 << 24), "synthetic workload: tokens must be in [1, 2^24], got ", tokens);
        KVQ_CHECK(double(q_heads) * tokens * head_dim <= double(std::numeric_limits<int>::max()),
                  "synthetic workload: q_heads * tokens * head_dim (", double(q_heads) * tokens * head_dim,
                  ") exceeds 2^31 - 1 elements per layer");
        KVQ_CHECK(outlier_channels >= 0 && outlier_channels <= head_dim,
                  "synthetic workload: outlier_channels must be in [0, head_dim = ", head_dim, "], got ",
                  outlier_channels);
        const float fields[] = {outlier_scale, bias_std,    noise_std,    drift_std,         value_std,
                                query_gain,    query_noise, drift_tokens, query_outlier_gain};
        const char* names[] = {"outlier_scale", "bias_std",    "noise_std",    "drift_std",         "value_std",
                               "query_gain",    "query_noise", "drift_tokens", "query_outlier_gain"};
        for (int i = 0; i < 9; ++i)
            KVQ_CHECK(std::isfinite(fields[i]) && fields[i] >= 0.0f && fields[i] <= 1e4f,
                      "synthetic workload: ", names[i], " must be finite and in [0, 1e4], got ", fields[i]);
        KVQ_CHECK(drift_tokens > 0.0f, "synthetic workload: drift_tokens must be positive, got ", drift_tokens);
    }

    // One line, e.g. for a report header.
    std::string describe() const {
        std::ostringstream os;
        os << "synthetic: layers=" << layers << " kv_heads=" << kv_heads << " q_heads=" << q_heads
           << " head_dim=" << head_dim << " tokens=" << tokens << " seed=" << seed << " outliers=" << outlier_channels
           << "x" << outlier_scale << " bias_std=" << bias_std << " noise_std=" << noise_std << " drift=" << drift_std
           << "@" << drift_tokens << "tok value_std=" << value_std << " q=" << query_gain << "*k_j+" << query_noise
           << "*n (outlier gain " << query_outlier_gain << ")";
        return os.str();
    }
};

// One layer in the dump layout: k, v [kv_heads][tokens][head_dim], q [q_heads][tokens][head_dim].
struct LayerKV {
    std::vector<float> k, v, q;
};

namespace detail {

inline std::uint64_t splitmix64(std::uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

enum class Stream : std::uint64_t { Structure = 1, Keys = 2, Values = 3, Queries = 4 };

inline std::uint64_t stream_seed(std::uint64_t seed, int layer, int head, Stream s) {
    std::uint64_t h = splitmix64(seed);
    h = splitmix64(h ^ static_cast<std::uint64_t>(layer));
    h = splitmix64(h ^ static_cast<std::uint64_t>(head));
    return splitmix64(h ^ static_cast<std::uint64_t>(s));
}

// Hand-rolled draws on top of mt19937_64, identical across standard libraries.
class Rng {
public:
    explicit Rng(std::uint64_t seed) : g_(seed) {}
    // Uniform in the open interval (0, 1): 53 random bits, centred in their cell.
    double uniform() { return (static_cast<double>(g_() >> 11) + 0.5) * 0x1p-53; }
    // N(0, 1) by Box-Muller; both outputs of a pair are used.
    double normal() {
        if (has_spare_) {
            has_spare_ = false;
            return spare_;
        }
        const double r = std::sqrt(-2.0 * std::log(uniform()));
        const double a = 6.283185307179586476925 * uniform();
        spare_ = r * std::sin(a);
        has_spare_ = true;
        return r * std::cos(a);
    }
    // Uniform integer in [0, n), n >= 1, by rejection (no modulo bias).
    std::uint64_t below(std::uint64_t n) {
        const std::uint64_t limit =
            std::numeric_limits<std::uint64_t>::max() - std::numeric_limits<std::uint64_t>::max() % n;
        for (;;) {
            const std::uint64_t x = g_();
            if (x < limit) return x % n;
        }
    }

private:
    std::mt19937_64 g_;
    double spare_ = 0;
    bool has_spare_ = false;
};

// Outlier channel set of one (layer, KV head) as a 0/1 mask, and the per-channel bias.
struct HeadStructure {
    std::vector<char> outlier;
    std::vector<double> bias;
};

inline HeadStructure head_structure(const SyntheticSpec& s, int layer, int head) {
    Rng rng(stream_seed(s.seed, layer, head, Stream::Structure));
    const int d = s.head_dim;
    HeadStructure hs;
    hs.outlier.assign(d, 0);
    std::vector<int> perm(d);
    for (int c = 0; c < d; ++c) perm[c] = c;
    for (int i = 0; i < s.outlier_channels; ++i) {  // partial Fisher-Yates
        const int j = i + static_cast<int>(rng.below(static_cast<std::uint64_t>(d - i)));
        std::swap(perm[i], perm[j]);
        hs.outlier[perm[i]] = 1;
    }
    hs.bias.resize(d);
    for (int c = 0; c < d; ++c) hs.bias[c] = s.bias_std * rng.normal();
    return hs;
}

}  // namespace detail

// The outlier channels of (layer, KV head), ascending: what generate() used.
inline std::vector<int> outlier_channels(const SyntheticSpec& spec, int layer, int head) {
    spec.validate();
    const detail::HeadStructure hs = detail::head_structure(spec, layer, head);
    std::vector<int> out;
    for (int c = 0; c < spec.head_dim; ++c)
        if (hs.outlier[c]) out.push_back(c);
    return out;
}

// Generates one layer.
inline LayerKV generate_layer(const SyntheticSpec& s, int layer) {
    s.validate();
    KVQ_CHECK(layer >= 0 && layer < s.layers, "synthetic workload: layer ", layer, " out of range [0, ", s.layers, ")");
    const int d = s.head_dim, T = s.tokens, Hk = s.kv_heads, Hq = s.q_heads, group = Hq / Hk;
    const double rho = std::exp(-1.0 / s.drift_tokens), innov = std::sqrt(std::max(0.0, 1.0 - rho * rho));
    LayerKV out;
    out.k.resize(std::size_t(Hk) * T * d);
    out.v.resize(std::size_t(Hk) * T * d);
    out.q.resize(std::size_t(Hq) * T * d);
    std::vector<double> u(d);
    for (int h = 0; h < Hk; ++h) {
        const detail::HeadStructure hs = detail::head_structure(s, layer, h);
        detail::Rng kr(detail::stream_seed(s.seed, layer, h, detail::Stream::Keys));
        for (int c = 0; c < d; ++c) u[c] = kr.normal();
        float* kh = out.k.data() + std::size_t(h) * T * d;
        for (int t = 0; t < T; ++t) {
            if (t > 0)
                for (int c = 0; c < d; ++c) u[c] = rho * u[c] + innov * kr.normal();
            for (int c = 0; c < d; ++c) {
                const double sc = hs.outlier[c] ? s.outlier_scale : 1.0;
                kh[std::size_t(t) * d + c] =
                    static_cast<float>(sc * (hs.bias[c] + s.drift_std * u[c] + s.noise_std * kr.normal()));
            }
        }
        detail::Rng vr(detail::stream_seed(s.seed, layer, h, detail::Stream::Values));
        float* vh = out.v.data() + std::size_t(h) * T * d;
        for (std::size_t i = 0; i < std::size_t(T) * d; ++i) vh[i] = static_cast<float>(s.value_std * vr.normal());

        for (int g = h * group; g < (h + 1) * group; ++g) {
            detail::Rng qr(detail::stream_seed(s.seed, layer, g, detail::Stream::Queries));
            float* qh = out.q.data() + std::size_t(g) * T * d;
            for (int t = 0; t < T; ++t) {
                const int j = static_cast<int>(qr.below(static_cast<std::uint64_t>(t) + 1));
                const float* kj = kh + std::size_t(j) * d;
                for (int c = 0; c < d; ++c) {
                    const double r = hs.outlier[c] ? s.query_outlier_gain : 1.0;
                    qh[std::size_t(t) * d + c] =
                        static_cast<float>(s.query_gain * r * kj[c] + s.query_noise * qr.normal());
                }
            }
        }
    }
    return out;
}

// Generates every layer: result[l] holds layer l.
inline std::vector<LayerKV> generate(const SyntheticSpec& s) {
    s.validate();
    std::vector<LayerKV> layers;
    layers.reserve(s.layers);
    for (int l = 0; l < s.layers; ++l) layers.push_back(generate_layer(s, l));
    return layers;
}

}  // namespace kvq::workload
