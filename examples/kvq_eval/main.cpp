// kvq-eval: accuracy, memory and speed of KV-cache compression methods on a KV workload, against
// exact float64 attention. See --help (kUsage below) for the command line.
//
// For each layer, each method gets its own KvCache (past-only, the given window and block size)
// and decodes the layer's tokens one at a time with kvq::decode_step; the pre-softmax scores and
// the attention outputs of every step are compared with exact causal attention computed in float64
// from the unquantized data (once per layer, shared by all methods):
//   score_rel_err = ||s^ - s||_2 / ||s||_2 over all scores q_t.k_j / sqrt(d), j <= t, every query
//                   head, step and layer;
//   attn_rel_err  = ||o^ - o||_2 / ||o||_2 over all decode outputs.
// Methods with WKVQuant smoothing (wkv, or a mixed spec with a wkv side) are calibrated per layer on
// the first half of the tokens (T/2); then, whenever any method calibrates, the errors of every
// method are measured over the second half of the decode steps only, so calibration data never
// enter the metrics (the output says so). All steps are still decoded, so the cache holds the
// first half as context.
// Bits per element are the codecs' exact storage rates (every byte of metadata and padding of a
// full block counted, from KvCache::memory()); the fp32 window is reported separately.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

#include <Eigen/Dense>

#include "kvq/core/progress.hpp"
#include "kvq/eval/method_spec.hpp"
#include "kvq/io/json.hpp"
#include "kvq/io/safetensors.hpp"
#include "kvq/kvq.hpp"
#include "kvq/workload/synthetic.hpp"

namespace {

constexpr const char* kUsage = R"(usage: kvq-eval [options]

Evaluates KV-cache compression methods: every token of every layer is decoded through a kvq
KvCache (past-only quantization: the current token is attended exactly, then stored) and the
scores and outputs are compared with exact float64 causal attention.

Workload (default: the built-in synthetic one, see include/kvq/workload/synthetic.hpp):
  --kv FILE          a KV dump (safetensors): layers.L.k and layers.L.v of shape [H_kv, T, d] and
                     optionally layers.L.q [H_q, T, d] for L = 0, 1, ... until layers.L.k is
                     missing; dtype F32, F16 or BF16. Without layers.L.q the keys serve as
                     queries: H_q = H_kv and the query of head h at step t is k_t of head h.
  --tokens N         synthetic workload: sequence length (default 1024)
  --layers N         synthetic workload: layers (default 2)
  --seed S           synthetic workload: seed
  --max-tokens N     use only the first N tokens of every layer (the float64 reference costs
                     O(T^2 H d) time and keeps T^2 H_q / 2 floats per layer)

Methods:
  --method SPEC      repeatable; default: fp16 int8 int4 int2 qjl:m=128 qjl:m=256 qjl:m=512
                     kivi:bits=2 kivi:bits=4 wkv:bits=4,calib=none wkv:bits=4 wkv:bits=4,calib=opt
                     wkv:bits=4,poq=off k=qjl:m=256;v=wkv:bits=4
                     SPEC = NAME[:KEY=VALUE,...]:
                       fp32 | fp16 | bf16                  no quantization
                       int8 | int4 | int3 | int2 [g=32]    token-wise, groups of g channels, K and V
                       qjl [m=256,mo=256,outliers=8,sketch=orthogonal|gaussian,seed=N,vbits=2,vg=32]
                                                           QJL keys, token-wise vbits values
                       wkv [bits=4,g=d,calib=stats|opt|none]
                                                           WKVQuant 2-D: per-channel smoothing
                                                           calibrated on the first half of the
                                                           tokens, then token-wise bits
                       kivi [bits=2|4,window=128]          KIVI: per-channel keys over 32 tokens,
                                                           per-token values (g=32), residual R
                     every method also takes window=R, kflush=sliding|chunk (key window flush) and
                     poq=on|off (past-only quantization, default on)
                     K/V mixing: k=SPEC;v=SPEC (key codec of the first, value codec of the second;
                     quote it in a shell because of ';')
  --window R         newest R tokens of K and V kept in fp32, sliding (default 0)
  --block B          tokens per cache block, a power of two (default 64)

Output:
  --progress         progress bar on stderr even when stderr is not a terminal (default: only on
                     a terminal); --no-progress turns it off. Never written to stdout.
  --json             one JSON object instead of the table:
                     {"methods":[{"name", "bits_per_element", "key_bits_per_element",
                      "value_bits_per_element", "score_rel_err", "attn_rel_err", "seconds",
                      "window_bits"}, ...], "workload":{...}}
  --help             this text

Columns: bits/elem K, V and their mean are the codecs' storage rates with all metadata (fp16
scales, norms, outlier ids, block padding); "window KiB" is the fp32 window left at the end of
the sequence, summed over layers (window_bits in JSON); seconds is the method's wall time
(codec setup, cache and decode steps; the shared reference and error bookkeeping excluded).
Exit status: 0 on success, 2 on a bad command line or any kvq error (bad spec, unreadable or
malformed file, missing tensors, wrong shapes, non-finite data).
)";

using Clock = std::chrono::steady_clock;

[[noreturn]] void usage_error(const std::string& msg) { throw kvq::Error(msg + " (see --help)"); }

int parse_int_arg(const std::string& opt, const std::string& value, std::uint64_t lo, std::uint64_t hi) {
    std::uint64_t v = 0;
    if (!kvq::eval::detail::parse_uint(value, hi, v) || v < lo)
        usage_error(opt + " expects an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
                    kvq::eval::detail::quote(value));
    return static_cast<int>(v);
}

struct Options {
    std::string kv_path;
    std::vector<std::string> methods;
    int window = 0;
    int block = 64;
    bool json = false;
    int progress = -1;   // 1: --progress, 0: --no-progress, -1: when stderr is a terminal
    int max_tokens = 0;  // 0: all
    int tokens = -1, layers = -1;
    bool seed_given = false;
    std::uint64_t seed = 0;
};

// Returns false when --help was given.
bool parse_args(int argc, char** argv, Options& o) {
    std::vector<std::string> args(argv + 1, argv + argc);
    for (std::size_t i = 0; i < args.size(); ++i) {
        std::string a = args[i], value;
        bool has_value = false;
        if (a.rfind("--", 0) == 0) {
            const std::size_t eq = a.find('=');
            if (eq != std::string::npos) {
                value = a.substr(eq + 1);
                a = a.substr(0, eq);
                has_value = true;
            }
        }
        const auto take = [&]() -> std::string {
            if (has_value) return value;
            if (i + 1 >= args.size()) usage_error(a + " needs a value");
            return args[++i];
        };
        const auto no_value = [&] {
            if (has_value) usage_error(a + " takes no value");
        };
        if (a == "--help" || a == "-h") {
            no_value();
            return false;
        } else if (a == "--json") {
            no_value();
            o.json = true;
        } else if (a == "--progress" || a == "--no-progress") {
            no_value();
            o.progress = a == "--progress" ? 1 : 0;
        } else if (a == "--kv") {
            o.kv_path = take();
            if (o.kv_path.empty()) usage_error("--kv needs a file name");
        } else if (a == "--method") {
            o.methods.push_back(take());
        } else if (a == "--window") {
            o.window = parse_int_arg(a, take(), 0, 1u << 20);
        } else if (a == "--block") {
            o.block = parse_int_arg(a, take(), 1, 4096);
            if ((o.block & (o.block - 1)) != 0)
                usage_error("--block must be a power of two, got " + std::to_string(o.block));
        } else if (a == "--max-tokens") {
            o.max_tokens = parse_int_arg(a, take(), 1, 1u << 24);
        } else if (a == "--tokens") {
            o.tokens = parse_int_arg(a, take(), 1, 1u << 24);
        } else if (a == "--layers") {
            o.layers = parse_int_arg(a, take(), 1, 4096);
        } else if (a == "--seed") {
            const std::string v = take();
            if (!kvq::eval::detail::parse_uint(v, std::numeric_limits<std::uint64_t>::max(), o.seed))
                usage_error("--seed expects an unsigned 64-bit integer, got " + kvq::eval::detail::quote(v));
            o.seed_given = true;
        } else {
            usage_error("unknown argument " + kvq::eval::detail::quote(args[i]));
        }
    }
    if (!o.kv_path.empty() && (o.tokens >= 0 || o.layers >= 0 || o.seed_given))
        usage_error("--tokens, --layers and --seed describe the synthetic workload and cannot be combined with --kv");
    if (o.methods.empty())
        o.methods = {"fp16",
                     "int8",
                     "int4",
                     "int2",
                     "qjl:m=128",
                     "qjl:m=256",
                     "qjl:m=512",
                     "kivi:bits=2",
                     "kivi:bits=4",
                     "wkv:bits=4,calib=none",
                     "wkv:bits=4",
                     "wkv:bits=4,calib=opt",
                     "wkv:bits=4,poq=off",
                     "k=qjl:m=256;v=wkv:bits=4"};
    return true;
}

// ---------------------------------------------------------------------------------------------
// Workload: per layer, token-major k, v [T][H_kv][d] and q [T][H_q][d] (what decode_step reads).

struct Layer {
    std::vector<float> k, v, q;
};

struct Workload {
    std::string source;       // "synthetic" or the file name
    std::string description;  // one line
    std::string queries;      // where the queries come from
    int layers = 0, kv_heads = 0, q_heads = 0, head_dim = 0, tokens = 0, tokens_available = 0;
    kvq::workload::SyntheticSpec synthetic;  // when source == "synthetic"
    std::vector<Layer> data;
};

// [H][T_all][d] -> [T][H][d], keeping the first T tokens.
std::vector<float> to_token_major(const std::vector<float>& x, int H, int T_all, int T, int d) {
    std::vector<float> out(std::size_t(T) * H * d);
    for (int h = 0; h < H; ++h)
        for (int t = 0; t < T; ++t)
            std::copy_n(x.data() + (std::size_t(h) * T_all + t) * d, d, out.data() + (std::size_t(t) * H + h) * d);
    return out;
}

Workload synthetic_workload(const Options& o) {
    kvq::workload::SyntheticSpec s;
    if (o.tokens > 0) s.tokens = o.tokens;
    if (o.layers > 0) s.layers = o.layers;
    if (o.seed_given) s.seed = o.seed;
    // The data of T tokens are a prefix of those of more tokens: --max-tokens just generates fewer.
    if (o.max_tokens > 0) s.tokens = std::min(s.tokens, o.max_tokens);
    s.validate();
    Workload w;
    w.source = "synthetic";
    w.synthetic = s;
    w.description = s.describe();
    w.queries = "synthetic (q = a R k_j + noise, j a random earlier position)";
    w.layers = s.layers;
    w.kv_heads = s.kv_heads;
    w.q_heads = s.q_heads;
    w.head_dim = s.head_dim;
    w.tokens = w.tokens_available = s.tokens;
    for (int l = 0; l < s.layers; ++l) {
        const kvq::workload::LayerKV L = kvq::workload::generate_layer(s, l);
        w.data.push_back({to_token_major(L.k, s.kv_heads, s.tokens, s.tokens, s.head_dim),
                          to_token_major(L.v, s.kv_heads, s.tokens, s.tokens, s.head_dim),
                          to_token_major(L.q, s.q_heads, s.tokens, s.tokens, s.head_dim)});
    }
    return w;
}

void check_finite(const std::vector<float>& x, const std::string& name, int T, int d) {
    for (std::size_t i = 0; i < x.size(); ++i)
        if (!std::isfinite(x[i])) {
            const std::size_t c = i % d, t = (i / d) % T, h = i / (std::size_t(d) * T);
            KVQ_THROW("tensor \"", name, "\" has a non-finite value (", x[i], ") at [", h, ", ", t, ", ", c, "]");
        }
}

Workload dump_workload(const Options& o) {
    using kvq::io::shape_str;
    const kvq::io::SafetensorsFile f = kvq::io::SafetensorsFile::load(o.kv_path);
    Workload w;
    w.source = o.kv_path;
    bool has_q = false;
    std::vector<std::int64_t> kshape, qshape;
    for (int l = 0;; ++l) {
        const std::string p = "layers." + std::to_string(l) + ".";
        if (!f.has(p + "k")) {
            KVQ_CHECK(!f.has(p + "v") && !f.has(p + "q"), "\"", o.kv_path, "\" has ", p, (f.has(p + "v") ? "v" : "q"),
                      " but no ", p, "k");
            KVQ_CHECK(l > 0, "\"", o.kv_path, "\" is not a KV dump: no tensor layers.0.k (expected layers.L.k and ",
                      "layers.L.v of shape [H_kv, T, d], optionally layers.L.q [H_q, T, d])");
            break;
        }
        KVQ_CHECK(f.has(p + "v"), "\"", o.kv_path, "\" has ", p, "k but no ", p, "v");
        const std::vector<std::int64_t>& ks = f.info(p + "k").shape;
        if (l == 0) {
            KVQ_CHECK(ks.size() == 3, "", p, "k must have shape [H_kv, T, d], got ", shape_str(ks));
            KVQ_CHECK(ks[0] >= 1 && ks[0] <= 1024, "", p, "k has ", ks[0], " KV heads, expected 1..1024");
            KVQ_CHECK(ks[1] >= 1 && ks[1] <= (1 << 24), "", p, "k has ", ks[1], " tokens, expected 1..2^24");
            KVQ_CHECK(ks[2] >= 8 && ks[2] <= 1024, "", p, "k has head dimension ", ks[2], ", expected 8..1024");
            kshape = ks;
            has_q = f.has(p + "q");
        }
        KVQ_CHECK(ks == kshape, "", p, "k has shape ", shape_str(ks), " but layers.0.k has ", shape_str(kshape),
                  " (every layer must have the same shape)");
        const std::vector<std::int64_t>& vs = f.info(p + "v").shape;
        KVQ_CHECK(vs == kshape, "", p, "v has shape ", shape_str(vs), ", expected the shape of ", p, "k ",
                  shape_str(kshape));
        KVQ_CHECK(f.has(p + "q") == has_q, "", (has_q ? "layers.0.q exists but " : ""), p, "q ",
                  (has_q ? "is missing" : "exists but layers.0.q does not"),
                  " (queries must be given for all layers or none)");
        if (has_q) {
            const std::vector<std::int64_t>& qs = f.info(p + "q").shape;
            KVQ_CHECK(qs.size() == 3 && qs[1] == kshape[1] && qs[2] == kshape[2] && qs[0] >= kshape[0] &&
                          qs[0] <= 4096 && qs[0] % kshape[0] == 0,
                      "", p, "q has shape ", shape_str(qs), ", expected [H_q, ", kshape[1], ", ", kshape[2],
                      "] with H_q a multiple of H_kv = ", kshape[0]);
            if (l == 0) qshape = qs;
            KVQ_CHECK(qs == qshape, "", p, "q has shape ", shape_str(qs), " but layers.0.q has ", shape_str(qshape));
        }
        KVQ_CHECK(l < 4096, "more than 4096 layers");
        w.layers = l + 1;
    }
    w.kv_heads = static_cast<int>(kshape[0]);
    w.tokens_available = static_cast<int>(kshape[1]);
    w.head_dim = static_cast<int>(kshape[2]);
    w.q_heads = has_q ? static_cast<int>(qshape[0]) : w.kv_heads;
    w.tokens = o.max_tokens > 0 ? std::min(o.max_tokens, w.tokens_available) : w.tokens_available;
    w.queries =
        has_q ? "layers.L.q" : "none in the file: the keys serve as queries (H_q = H_kv, q_t = k_t of the same head)";
    const int T_all = w.tokens_available, T = w.tokens, d = w.head_dim;
    for (int l = 0; l < w.layers; ++l) {
        const std::string p = "layers." + std::to_string(l) + ".";
        const std::vector<float> k = f.read_f32(p + "k"), v = f.read_f32(p + "v");
        check_finite(k, p + "k", T_all, d);
        check_finite(v, p + "v", T_all, d);
        Layer L;
        L.k = to_token_major(k, w.kv_heads, T_all, T, d);
        L.v = to_token_major(v, w.kv_heads, T_all, T, d);
        if (has_q) {
            const std::vector<float> q = f.read_f32(p + "q");
            check_finite(q, p + "q", T_all, d);
            L.q = to_token_major(q, w.q_heads, T_all, T, d);
        } else {
            L.q = L.k;
        }
        w.data.push_back(std::move(L));
    }
    w.description = "dump " + o.kv_path + ": layers=" + std::to_string(w.layers) +
                    " kv_heads=" + std::to_string(w.kv_heads) + " q_heads=" + std::to_string(w.q_heads) +
                    " head_dim=" + std::to_string(d) + " tokens=" + std::to_string(T) +
                    (T < T_all ? " (of " + std::to_string(T_all) + ")" : "");
    return w;
}

// ---------------------------------------------------------------------------------------------
// Exact float64 reference of one layer: scores of step t, head hq at scores[offset(t) + hq (t+1) + j]
// (rounded once to float to halve the memory; that is 6e-8 relative, far below any codec's error)
// and outputs [T][H_q][d] in double.

struct Reference {
    std::vector<float> scores;
    std::vector<double> out;
    int q_heads = 0;
    std::size_t offset(int t) const { return std::size_t(q_heads) * (std::size_t(t) * (t + 1) / 2); }
};

Reference reference(const Layer& L, int T, int Hk, int Hq, int d) {
    using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    constexpr int kRows = 256;  // query rows per GEMM, so the score matrix is kRows x T, not T x T
    Reference r;
    r.q_heads = Hq;
    r.scores.resize(r.offset(T));
    r.out.resize(std::size_t(T) * Hq * d);
    const int group = Hq / Hk;
    const double scale = 1.0 / std::sqrt(double(d));
    Mat K(T, d), V(T, d), Q(T, d), S, O;
    for (int h = 0; h < Hk; ++h) {
        for (int t = 0; t < T; ++t)
            for (int c = 0; c < d; ++c) {
                K(t, c) = L.k[(std::size_t(t) * Hk + h) * d + c];
                V(t, c) = L.v[(std::size_t(t) * Hk + h) * d + c];
            }
        for (int hq = h * group; hq < (h + 1) * group; ++hq) {
            for (int t = 0; t < T; ++t)
                for (int c = 0; c < d; ++c) Q(t, c) = L.q[(std::size_t(t) * Hq + hq) * d + c];
            for (int t0 = 0; t0 < T; t0 += kRows) {
                const int rows = std::min(kRows, T - t0), cols = t0 + rows;  // causal: keys [0, cols)
                S.noalias() = Q.middleRows(t0, rows) * K.topRows(cols).transpose();
                S *= scale;
                for (int i = 0; i < rows; ++i) {
                    const int t = t0 + i;
                    float* dst = r.scores.data() + r.offset(t) + std::size_t(hq) * (t + 1);
                    double mx = -std::numeric_limits<double>::infinity();
                    for (int j = 0; j <= t; ++j) {
                        dst[j] = static_cast<float>(S(i, j));
                        mx = std::max(mx, S(i, j));
                    }
                    double sum = 0;
                    for (int j = 0; j <= t; ++j) sum += (S(i, j) = std::exp(S(i, j) - mx));
                    for (int j = 0; j <= t; ++j) S(i, j) /= sum;
                    for (int j = t + 1; j < cols; ++j) S(i, j) = 0.0;
                }
                O.noalias() = S * V.topRows(cols);
                for (int i = 0; i < rows; ++i)
                    for (int c = 0; c < d; ++c) r.out[(std::size_t(t0 + i) * Hq + hq) * d + c] = O(i, c);
            }
        }
    }
    return r;
}

// ---------------------------------------------------------------------------------------------

struct Result {
    std::string name, description;
    double key_bits = 0, value_bits = 0;
    double score_num = 0, score_den = 0, out_num = 0, out_den = 0;
    double seconds = 0;
    std::size_t window_bytes = 0;
    double bits() const { return 0.5 * (key_bits + value_bits); }
    static double ratio(double num, double den) {
        return den > 0 ? std::sqrt(num / den) : (num == 0 ? 0.0 : std::numeric_limits<double>::infinity());
    }
    double score_err() const { return ratio(score_num, score_den); }
    double attn_err() const { return ratio(out_num, out_den); }
};

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// WKV smoothing parameters of one layer for method m from the layer's first calib_tokens tokens.
std::shared_ptr<const kvq::WkvParams> calibrate_layer(const kvq::eval::Method& m, const Layer& L, const Workload& w,
                                                      int calib_tokens) {
    using kvq::calib::CalibMode;
    const int Hk = w.kv_heads, Hq = w.q_heads, d = w.head_dim;
    auto P = std::make_shared<kvq::WkvParams>(kvq::WkvParams::identity(1, Hk, d));
    if (m.key_calib == CalibMode::None && m.value_calib == CalibMode::None) return P;
    kvq::calib::KvCalibData D;
    D.n_kv_heads = Hk;
    D.n_q_heads = Hq;
    D.head_dim = d;
    D.tokens = calib_tokens;
    D.k.assign(L.k.begin(), L.k.begin() + std::ptrdiff_t(calib_tokens) * Hk * d);
    D.v.assign(L.v.begin(), L.v.begin() + std::ptrdiff_t(calib_tokens) * Hk * d);
    D.q.assign(L.q.begin(), L.q.begin() + std::ptrdiff_t(calib_tokens) * Hq * d);
    kvq::WkvLayerParams lp = kvq::calib::calibrate_stats(D);
    const kvq::WkvLayerParams id = P->layers[0];
    if (!m.smooth_keys || m.key_calib == CalibMode::None) lp.k_shift = id.k_shift, lp.k_scale = id.k_scale;
    if (!m.smooth_values || m.value_calib == CalibMode::None) lp.v_shift = id.v_shift, lp.v_scale = id.v_scale;
    if (m.key_calib == CalibMode::Opt || m.value_calib == CalibMode::Opt) {
        kvq::calib::OptOptions oo;
        oo.bits = m.calib_bits;
        oo.group = m.calib_group;
        oo.smooth_keys = m.smooth_keys && m.key_calib == CalibMode::Opt;
        oo.smooth_values = m.smooth_values && m.value_calib == CalibMode::Opt;
        lp = kvq::calib::calibrate_opt(D, lp, oo);
    }
    P->layers[0] = lp;
    return P;
}

void run_layer(const kvq::eval::Method& m, const Layer& L, const Reference& ref, const Workload& w, int block,
               int metric_from, int calib_tokens, Result& r) {
    const int T = w.tokens, Hk = w.kv_heads, Hq = w.q_heads, d = w.head_dim;
    std::vector<float> out(std::size_t(Hq) * d), scores(std::size_t(Hq) * T);
    auto t0 = Clock::now();
    std::unique_ptr<kvq::KvCache> plain;
    std::unique_ptr<kvq::WkvKvCache> wkv;
    if (m.smoothing())
        wkv = std::make_unique<kvq::WkvKvCache>(m.cache_config(1, Hk, block), m.key_codec, m.value_codec,
                                                calibrate_layer(m, L, w, calib_tokens), m.smooth_keys, m.smooth_values);
    else
        plain = std::make_unique<kvq::KvCache>(m.cache_config(1, Hk, block), m.key_codec, m.value_codec);
    kvq::AttentionWorkspace ws;
    r.seconds += seconds_since(t0);
    for (int t = 0; t < T; ++t) {
        t0 = Clock::now();
        const float* qt = L.q.data() + std::size_t(t) * Hq * d;
        const float* kt = L.k.data() + std::size_t(t) * Hk * d;
        const float* vt = L.v.data() + std::size_t(t) * Hk * d;
        if (wkv)
            wkv->decode_step(0, qt, Hq, kt, vt, out.data(), ws, scores.data());
        else
            kvq::decode_step(*plain, 0, qt, Hq, kt, vt, out.data(), ws, scores.data());
        r.seconds += seconds_since(t0);
        if (t < metric_from) continue;
        const float* s_ref = ref.scores.data() + ref.offset(t);
        const std::size_t n = std::size_t(Hq) * (t + 1);  // scores_out is [H_q][t + 1], as the reference
        for (std::size_t i = 0; i < n; ++i) {
            const double e = double(scores[i]) - double(s_ref[i]);
            r.score_num += e * e;
            r.score_den += double(s_ref[i]) * s_ref[i];
        }
        const double* o_ref = ref.out.data() + std::size_t(t) * Hq * d;
        for (std::size_t i = 0; i < std::size_t(Hq) * d; ++i) {
            const double e = double(out[i]) - o_ref[i];
            r.out_num += e * e;
            r.out_den += o_ref[i] * o_ref[i];
        }
    }
    const kvq::MemoryReport mem = wkv ? wkv->memory() : plain->memory();
    r.key_bits = mem.key_bits_per_element;
    r.value_bits = mem.value_bits_per_element;
    r.window_bytes += mem.window_bytes;
}

std::string json_number(double x) {
    if (!std::isfinite(x)) return "null";
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.9g", x);
    return buf;
}

// A JSON string literal; a file name that is not valid UTF-8 gets '?' for its non-ASCII bytes.
std::string quote(const std::string& s) {
    try {
        return kvq::io::json::quote(s);
    } catch (const kvq::Error&) {
        std::string t = s;
        for (char& c : t)
            if (static_cast<unsigned char>(c) >= 0x80) c = '?';
        return kvq::io::json::quote(t);
    }
}

void print_json(const Workload& w, const Options& o, const std::vector<Result>& results, int metric_from,
                int calib_tokens) {
    std::string s = "{\"methods\":[";
    for (std::size_t i = 0; i < results.size(); ++i) {
        const Result& r = results[i];
        s += (i ? ",{" : "{");
        s += "\"name\":" + quote(r.name);
        s += ",\"bits_per_element\":" + json_number(r.bits());
        s += ",\"key_bits_per_element\":" + json_number(r.key_bits);
        s += ",\"value_bits_per_element\":" + json_number(r.value_bits);
        s += ",\"score_rel_err\":" + json_number(r.score_err());
        s += ",\"attn_rel_err\":" + json_number(r.attn_err());
        s += ",\"seconds\":" + json_number(r.seconds);
        s += ",\"window_bits\":" + std::to_string(8 * std::uint64_t(r.window_bytes));
        s += "}";
    }
    s += "],\"workload\":{";
    s += "\"source\":" + quote(w.source);
    s += ",\"description\":" + quote(w.description);
    s += ",\"queries\":" + quote(w.queries);
    s += ",\"layers\":" + std::to_string(w.layers);
    s += ",\"kv_heads\":" + std::to_string(w.kv_heads);
    s += ",\"q_heads\":" + std::to_string(w.q_heads);
    s += ",\"head_dim\":" + std::to_string(w.head_dim);
    s += ",\"tokens\":" + std::to_string(w.tokens);
    s += ",\"tokens_available\":" + std::to_string(w.tokens_available);
    if (w.source == "synthetic") s += ",\"seed\":" + std::to_string(w.synthetic.seed);
    s += ",\"window\":" + std::to_string(o.window);
    s += ",\"block_tokens\":" + std::to_string(o.block);
    s += ",\"past_only\":true";
    s += ",\"metric_steps_from\":" + std::to_string(metric_from);
    s += ",\"calibration_tokens\":" + std::to_string(calib_tokens);
    s += "}}\n";
    std::fputs(s.c_str(), stdout);
}

void print_table(const Workload& w, const Options& o, const std::vector<Result>& results, double total_seconds,
                 double reference_seconds, int metric_from, int calib_tokens) {
    std::printf("kvq-eval %s\n", kvq::version());
    std::printf("workload: %s\n", w.description.c_str());
    std::printf("queries:  %s\n", w.queries.c_str());
    std::printf(
        "decode:   %d steps x %d layers, %d query / %d KV heads, d=%d; past-only (unless poq=off), block=%d, window=%d "
        "(fp32, sliding)\n",
        w.tokens, w.layers, w.q_heads, w.kv_heads, w.head_dim, o.block, o.window);
    if (calib_tokens > 0)
        std::printf(
            "calib:    WKV smoothing calibrated per layer on tokens [0, %d) of each %s; metrics of every method over "
            "decode steps [%d, %d) only (no leakage)\n",
            calib_tokens, w.source == "synthetic" ? "synthetic layer" : "dump layer", metric_from, w.tokens);
    std::printf(
        "errors vs exact float64 causal attention; bits/elem include all metadata; window KiB = fp32 window at the "
        "end\n\n");
    std::size_t nw = 6;
    for (const Result& r : results) nw = std::max(nw, r.name.size());
    const int W = static_cast<int>(nw);
    std::printf("%-*s  %7s  %7s  %9s  %13s  %12s  %10s  %8s\n", W, "method", "K bits", "V bits", "bits/elem",
                "score_rel_err", "attn_rel_err", "window KiB", "seconds");
    for (const Result& r : results)
        std::printf("%-*s  %7.3f  %7.3f  %9.3f  %13.4e  %12.4e  %10.1f  %8.2f\n", W, r.name.c_str(), r.key_bits,
                    r.value_bits, r.bits(), r.score_err(), r.attn_err(), double(r.window_bytes) / 1024.0, r.seconds);
    std::printf("\n");
    for (const Result& r : results) std::printf("%-*s  = %s\n", W, r.name.c_str(), r.description.c_str());
    std::printf("\nreference: %.2f s; total: %.2f s\n", reference_seconds, total_seconds);
}

int run(const Options& o) {
    const auto t_start = Clock::now();
    // Methods first, so that a bad spec fails before any expensive work.
    std::vector<kvq::eval::KvSpec> specs;
    for (const std::string& s : o.methods) specs.push_back(kvq::eval::parse_kv_spec(s));

    Workload w = o.kv_path.empty() ? synthetic_workload(o) : dump_workload(o);
    const double ref_floats = double(w.q_heads) * w.tokens * (w.tokens + 1.0) / 2.0;
    KVQ_CHECK(ref_floats * 4.0 <= 4.0 * (1ull << 30), "the reference scores of one layer need ",
              ref_floats * 4.0 / (1 << 30), " GiB (T = ", w.tokens, ", H_q = ", w.q_heads,
              "); use --max-tokens to evaluate fewer tokens");

    std::vector<kvq::eval::Method> methods;
    std::vector<Result> results(specs.size());
    for (std::size_t i = 0; i < specs.size(); ++i) {
        const auto t0 = Clock::now();
        methods.push_back(kvq::eval::make_method(specs[i], w.head_dim, o.window));
        results[i].seconds += seconds_since(t0);
        results[i].name = methods[i].canonical();
        results[i].description = methods[i].description();
        // Validate the cache configuration (block size vs codec granularity) up front.
        try {
            kvq::KvCache probe(methods[i].cache_config(1, w.kv_heads, o.block), methods[i].key_codec,
                               methods[i].value_codec);
        } catch (const kvq::Error& e) {
            KVQ_THROW("method \"", results[i].name, "\" with --block ", o.block, " and ", w.kv_heads,
                      " KV heads: ", kvq::eval::detail::inner_message(e));
        }
    }

    bool calibrates = false;
    for (const kvq::eval::Method& m : methods)
        calibrates |= (m.smooth_keys && m.key_calib != kvq::calib::CalibMode::None) ||
                      (m.smooth_values && m.value_calib != kvq::calib::CalibMode::None);
    const int calib_tokens = calibrates ? w.tokens / 2 : 0, metric_from = calib_tokens;
    KVQ_CHECK(!calibrates || calib_tokens >= 2, "WKV calibration needs at least 4 tokens (half for calibration), got ",
              w.tokens);
    double reference_seconds = 0;
    // Progress on stderr (layers x (reference + methods) steps), only for a terminal or --progress.
    std::optional<kvq::ProgressMeter> meter;
    if (o.progress == 1 || (o.progress == -1 && ::isatty(2)))
        meter.emplace("kvq-eval", std::uint64_t(w.layers) * (methods.size() + 1));
    std::uint64_t steps = 0;
    const auto tick = [&] {
        ++steps;
        if (meter && meter->due(steps)) std::fputs(meter->render(steps).c_str(), stderr);
    };
    for (int l = 0; l < w.layers; ++l) {
        const auto t0 = Clock::now();
        const Reference ref = reference(w.data[l], w.tokens, w.kv_heads, w.q_heads, w.head_dim);
        reference_seconds += seconds_since(t0);
        tick();
        for (std::size_t i = 0; i < methods.size(); ++i) {
            run_layer(methods[i], w.data[l], ref, w, o.block, metric_from, calib_tokens, results[i]);
            tick();
        }
    }
    if (meter) std::fputs(meter->finish().c_str(), stderr);

    if (o.json)
        print_json(w, o, results, metric_from, calib_tokens);
    else
        print_table(w, o, results, seconds_since(t_start), reference_seconds, metric_from, calib_tokens);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        Options o;
        if (!parse_args(argc, argv, o)) {
            std::fputs(kUsage, stdout);
            return 0;
        }
        return run(o);
    } catch (const kvq::Error& e) {
        std::fprintf(stderr, "kvq-eval: %s\n", e.what());
        return 2;
    } catch (const std::bad_alloc&) {
        std::fprintf(stderr, "kvq-eval: out of memory (try --max-tokens)\n");
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "kvq-eval: %s\n", e.what());
        return 1;
    }
}
