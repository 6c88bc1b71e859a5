// kvq-calibrate: WKVQuant's 4-bit weights with learned clipping and CRR (ALGORITHMS.md §2.3, §2.4).
//
//   kvq-calibrate calibrate --model PATH --text FILE --out FILE.kvqw [--objective crr|lwc-local]
//                 [--k 5] [--alpha 0] [--epochs 20] [--segments 8] [--seq 128] [--group 128]
//                 [--kv-bits 4 | --no-kv]
//   kvq-calibrate eval --model PATH --text HELD_OUT --calib-text FILE [--files A.kvqw,B.kvqw]
//                 [--config NAME] [--tokens 512] [--context 256] [--json]
//
// calibrate: segments of --seq tokens from the text (consecutive, each run from position 0), CRR
// (or the block-local MSE ablation) block by block; progress bar and calibration time on stderr.
// The file is loaded by `kvq-llama --weights w4=crr:FILE` (or w4=lwc-local:FILE).
// eval: perplexity and mean KL against the W16KV16 model (fp32 weights, fp32 cache) on held-out
// text, for W16KV16, W16KV4 (2-D stats KV), W4 RTN, W4KV4 (RTN weights + stats KV), and for each
// calibration file W4 alone, W4KV4 with the file's KV smoothing, POQ on and off. --config runs one
// of them (names as printed) so that the rows can run in parallel processes.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "kvq/cache/attention.hpp"
#include "kvq/cache/kv_cache.hpp"
#include "kvq/calibration/crr.hpp"
#include "kvq/io/gguf.hpp"
#include "kvq/io/gpt2_bpe_tokenizer.hpp"
#include "kvq/io/llama2c.hpp"
#include "kvq/io/llama2c_tokenizer.hpp"
#include "kvq/io/w4_file.hpp"
#include "kvq/model/gguf_llama.hpp"
#include "kvq/model/llama.hpp"
#include "kvq/quant/wkv_codec.hpp"

namespace fs = std::filesystem;

namespace {

const char* const kUsage =
    "usage: kvq-calibrate calibrate --model PATH --text FILE --out FILE [options]\n"
    "       kvq-calibrate eval --model PATH --text HELD_OUT --calib-text FILE [--files A,B] [--config NAME]\n"
    "options (calibrate): --objective crr|lwc-local (default crr)  --k N (5)  --alpha A (0)  --epochs N (20)\n"
    "  --segments N (8)  --seq T (128)  --group G (128, 0 = per-channel)  --kv-bits B (4)  --no-kv (weight-only)\n"
    "  --epochs 0 writes the initialisation (RTN clipping, KV statistics). The KV smoothing is fitted to\n"
    "  positions 0..T-1 (post-RoPE statistics depend on the position range): use --seq >= the context\n"
    "  the model will run at, or the smoothing will not fit later positions.\n"
    "options (eval): --tokens N (512 held-out tokens)  --context N (256)  --json\n"
    "common: --tokenizer PATH (llama2.c models; default tok512.bin next to the model)\n";

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

std::map<std::string, std::string> parse(int argc, char** argv, int from) {
    static const char* const known[] = {"model",  "tokenizer", "text",   "out",     "objective", "k",     "alpha",
                                        "epochs", "segments",  "seq",    "group",   "kv-bits",   "no-kv", "calib-text",
                                        "files",  "config",    "tokens", "context", "json"};
    std::map<std::string, std::string> o;
    for (int i = from; i < argc; ++i) {
        const std::string s = argv[i];
        if (s.rfind("--", 0) != 0) throw UsageError("unexpected argument '" + s + "'");
        const std::string k = s.substr(2);
        if (std::find(std::begin(known), std::end(known), k) == std::end(known))
            throw UsageError("unknown option '" + s + "'");
        if (k == "no-kv" || k == "json") {
            o[k] = "1";
            continue;
        }
        if (i + 1 >= argc) throw UsageError("option '" + s + "' needs a value");
        o[k] = argv[++i];
    }
    return o;
}
long long integer(const std::map<std::string, std::string>& o, const std::string& k, long long def, long long lo,
                  long long hi) {
    auto it = o.find(k);
    if (it == o.end()) return def;
    std::size_t used = 0;
    long long v = 0;
    try {
        v = std::stoll(it->second, &used);
    } catch (...) {
        used = 0;
    }
    if (used != it->second.size() || v < lo || v > hi)
        throw UsageError("--" + k + " expects an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                         "], got '" + it->second + "'");
    return v;
}
double real(const std::map<std::string, std::string>& o, const std::string& k, double def) {
    auto it = o.find(k);
    if (it == o.end()) return def;
    std::size_t used = 0;
    double v = 0;
    try {
        v = std::stod(it->second, &used);
    } catch (...) {
        used = 0;
    }
    if (used != it->second.size() || !std::isfinite(v) || v < 0)
        throw UsageError("--" + k + " expects a non-negative number, got '" + it->second + "'");
    return v;
}

std::string read_text(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw kvq::Error("kvq-calibrate: cannot open text file '" + path + "'");
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

struct Loaded {
    kvq::io::LlamaConfig config;
    kvq::io::LlamaWeights weights;
    std::optional<kvq::io::Llama2cTokenizer> tok;
    std::optional<kvq::io::Gpt2BpeTokenizer> bpe;
    std::vector<int> encode(const std::string& text) const {
        if (tok) return tok->encode(text, true, false);
        return bpe->encode(text, true);
    }
};

Loaded load(const std::map<std::string, std::string>& o) {
    if (!o.count("model")) throw UsageError("--model PATH is required");
    const std::string path = o.at("model");
    std::ifstream in(path, std::ios::binary);
    char magic[4] = {};
    in.read(magic, 4);
    Loaded L;
    if (in.gcount() == 4 && std::string(magic, 4) == "GGUF") {
        const auto f = kvq::io::GgufFile::load(path);
        auto g = kvq::model::load_gguf_llama(f, 4096);
        L.config = g.config;
        L.weights = std::move(g.weights);
        L.bpe = kvq::io::Gpt2BpeTokenizer::from_gguf(f);
        return L;
    }
    auto ck = kvq::io::load_llama2c(path);
    L.config = ck.config;
    L.weights = std::move(ck.weights);
    const std::string tp =
        o.count("tokenizer") ? o.at("tokenizer") : (fs::path(path).parent_path() / "tok512.bin").string();
    L.tok = kvq::io::load_llama2c_tokenizer(tp, L.config.vocab_size);
    return L;
}

// Consecutive segments of `seq` tokens (the first starts with BOS; later ones are plain windows).
std::vector<std::vector<int>> segments_of(const std::vector<int>& tokens, int seq, int max_segments,
                                          const std::string& what) {
    std::vector<std::vector<int>> s;
    for (std::size_t i = 0; i + std::size_t(seq) <= tokens.size() && int(s.size()) < max_segments;
         i += std::size_t(seq))
        s.emplace_back(tokens.begin() + long(i), tokens.begin() + long(i) + seq);
    if (s.empty())
        throw kvq::Error("kvq-calibrate: " + what + " has " + std::to_string(tokens.size()) +
                         " tokens, fewer than one segment of " + std::to_string(seq));
    return s;
}

// Progress bar on stderr: "[=====>    ] 45% block 3/5 epoch 7/20 loss 0.1234 12.3 s".
void draw(std::size_t done, std::size_t total, const std::string& tail, double secs) {
    const int W = 30, fill = int(double(done) / double(total) * W);
    std::string bar(std::size_t(W), ' ');
    for (int i = 0; i < fill; ++i) bar[std::size_t(i)] = '=';
    if (fill < W) bar[std::size_t(fill)] = '>';
    std::fprintf(stderr, "\r[%s] %3d%% %s %.1f s   ", bar.c_str(), int(100.0 * done / total), tail.c_str(), secs);
    std::fflush(stderr);
}

int run_calibrate(const std::map<std::string, std::string>& o) {
    if (!o.count("text")) throw UsageError("calibrate needs --text FILE");
    if (!o.count("out")) throw UsageError("calibrate needs --out FILE");
    const Loaded L = load(o);
    kvq::calib::CrrOptions opt;
    const std::string obj = o.count("objective") ? o.at("objective") : "crr";
    if (obj == "crr")
        opt.objective = kvq::io::W4Objective::Crr;
    else if (obj == "lwc-local")
        opt.objective = kvq::io::W4Objective::LocalMse;
    else
        throw UsageError("--objective must be crr or lwc-local, got '" + obj + "'");
    opt.k = int(integer(o, "k", 5, 1, 4096));
    opt.alpha = real(o, "alpha", 0.0);
    opt.epochs = int(integer(o, "epochs", 20, 0, 10000));  // 0: the statistics initialisation only
    opt.w_group = int(integer(o, "group", 128, 0, 65536));
    opt.kv_bits = int(integer(o, "kv-bits", 4, 2, 8));
    opt.quant_kv = !o.count("no-kv");
    const int seq = int(integer(o, "seq", std::min(128, L.config.seq_len), 2, L.config.seq_len));
    const int nseg = int(integer(o, "segments", 8, 1, 100000));
    const std::string text = read_text(o.at("text"));
    if (text.empty()) throw kvq::Error("kvq-calibrate: calibration text '" + o.at("text") + "' is empty");
    const auto segs = segments_of(L.encode(text), seq, nseg, "calibration text '" + o.at("text") + "'");
    std::fprintf(stderr, "kvq-calibrate: %s, %d blocks, %zu segments x %d tokens, %d epochs, objective %s (k=%d)%s\n",
                 o.at("model").c_str(), L.config.n_layers, segs.size(), seq, opt.epochs, obj.c_str(),
                 opt.objective == kvq::io::W4Objective::Crr ? opt.k : 1, opt.quant_kv ? ", W4KV4" : ", W4 only");
    const std::size_t total = std::size_t(L.config.n_layers) * std::size_t(opt.epochs);
    std::size_t done = 0;
    const auto t0 = std::chrono::steady_clock::now();
    opt.progress = [&](int block, int epoch, double loss) {
        ++done;
        char tail[160];
        std::snprintf(tail, sizeof tail, "block %d/%d epoch %d/%d loss %.5g", block + 1, L.config.n_layers, epoch + 1,
                      opt.epochs, loss);
        draw(done, total, tail, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    };
    const kvq::calib::CrrModel cm(L.config, L.weights);
    const auto R = kvq::calib::calibrate_crr(cm, segs, opt);
    std::fprintf(stderr, "\n");
    kvq::io::save_w4_calibration(o.at("out"), R.calib);
    std::printf("calibration time %.1f s (%zu segments x %d tokens, %d epochs, %d blocks)\n", R.seconds, segs.size(),
                seq, opt.epochs, L.config.n_layers);
    for (std::size_t b = 0; b < R.epoch_loss.size(); ++b)
        std::printf("block %2zu loss %.6g -> %.6g\n", b, R.epoch_loss[b].front(), R.epoch_loss[b].back());
    std::printf("wrote %s\n", o.at("out").c_str());
    return 0;
}

// ---------------------------------------------------------------- eval

// Attention through a WKVQuant cache (smoothing + token-wise b-bit codec, POQ on or off).
class WkvBackend : public kvq::model::AttentionBackend {
public:
    WkvBackend(const kvq::io::LlamaConfig& c, std::shared_ptr<const kvq::WkvParams> p, int bits, bool poq)
        : n_heads_(c.n_heads), cache_(config(c, poq), codec(c, bits), codec(c, bits), std::move(p)) {}
    void reset() override { cache_.cache().clear(); }
    void decode(int layer, int, const float* q, const float* k, const float* v, float* out) override {
        cache_.decode_step(layer, q, n_heads_, k, v, out, ws_);
    }
    kvq::MemoryReport memory() const { return cache_.memory(); }

private:
    static kvq::CacheConfig config(const kvq::io::LlamaConfig& c, bool poq) {
        kvq::CacheConfig cc;
        cc.n_layers = c.n_layers;
        cc.n_kv_heads = c.n_kv_heads;
        cc.head_dim = c.head_dim;
        cc.block_tokens = 64;
        cc.past_only = poq;
        return cc;
    }
    static std::shared_ptr<const kvq::Codec> codec(const kvq::io::LlamaConfig& c, int bits) {
        return std::make_shared<kvq::WkvCodec>(c.head_dim, bits);
    }
    int n_heads_;
    kvq::WkvKvCache cache_;
    kvq::AttentionWorkspace ws_;
};

double log_sum_exp(const std::vector<float>& z) {
    double mx = -INFINITY, s = 0;
    for (float x : z) mx = std::max(mx, double(x));
    for (float x : z) s += std::exp(double(x) - mx);
    return mx + std::log(s);
}

struct EvalRow {
    std::string name;
    double ppl = 0, kl = 0, bits_w = 32, bits_kv = 32;
};

int run_eval(const std::map<std::string, std::string>& o) {
    if (!o.count("text") || !o.count("calib-text"))
        throw UsageError("eval needs --text HELD_OUT and --calib-text FILE");
    const Loaded L = load(o);
    const auto& c = L.config;
    const int context = int(integer(o, "context", std::min(256, c.seq_len), 2, c.seq_len));
    const int ntok = int(integer(o, "tokens", 512, 2, 1 << 24));
    std::vector<int> held = L.encode(read_text(o.at("text")));
    if (held.size() > std::size_t(ntok)) held.resize(std::size_t(ntok));
    if (held.size() < 2)
        throw kvq::Error("kvq-calibrate: held-out text '" + o.at("text") + "' has fewer than 2 tokens");
    const std::string ctext = read_text(o.at("calib-text"));
    if (ctext.empty()) throw kvq::Error("kvq-calibrate: calibration text '" + o.at("calib-text") + "' is empty");

    // The 2-D stats KV smoothing (no learning), from the calibration text through the fp model.
    auto stats_kv = [&] {
        const kvq::calib::CrrModel cm(c, L.weights);
        const auto segs = segments_of(L.encode(ctext), std::min(128, c.seq_len), 4, "calibration text");
        std::vector<kvq::calib::Mat> x;
        for (const auto& s : segs) x.push_back(cm.embed(s));
        auto P = std::make_shared<kvq::WkvParams>(kvq::WkvParams::identity(c.n_layers, c.n_kv_heads, c.head_dim));
        kvq::calib::BlockTape t;
        for (int l = 0; l < c.n_layers; ++l) {
            kvq::calib::BlockParams p = kvq::calib::rtn_params(cm.block(l), 128);
            kvq::calib::stats_init_kv(cm.block(l), x, p);
            auto& Lp = P->layers[std::size_t(l)];
            Lp.k_shift.assign(p.k_shift.begin(), p.k_shift.end());
            Lp.k_scale.assign(p.k_scale.begin(), p.k_scale.end());
            Lp.v_shift.assign(p.v_shift.begin(), p.v_shift.end());
            Lp.v_scale.assign(p.v_scale.begin(), p.v_scale.end());
            for (auto& X : x) X = kvq::calib::block_forward(cm.block(l), nullptr, {}, X, t);
        }
        return std::shared_ptr<const kvq::WkvParams>(P);
    };

    struct Config {
        std::string name, weights;  // weights: a make_w4_weights spec
        int kv = 0;                 // 0: fp32 cache, 1: stats KV, 2: the file's KV
        bool poq = true;
    };
    std::vector<Config> configs = {{"W16KV16", "fp32", 0, true},
                                   {"W16KV4 stats", "fp32", 1, true},
                                   {"W4 rtn", "w4=rtn", 0, true},
                                   {"W4KV4 rtn+stats", "w4=rtn", 1, true},
                                   {"W4KV4 rtn+stats poq=off", "w4=rtn", 1, false}};
    if (o.count("files")) {
        std::stringstream ss(o.at("files"));
        for (std::string f; std::getline(ss, f, ',');) {
            const auto W = kvq::io::load_w4_calibration(f);
            const std::string tag =
                std::string(kvq::io::objective_name(W.objective)) + ":" + fs::path(f).filename().string();
            const std::string spec = "w4=" + std::string(kvq::io::objective_name(W.objective)) + ":" + f;
            configs.push_back({"W4 " + tag, spec, 0, true});
            if (W.kv) {
                configs.push_back({"W4KV4 " + tag, spec, 2, true});
                configs.push_back({"W4KV4 " + tag + " poq=off", spec, 2, false});
            }
        }
    }
    if (o.count("config")) {
        const std::string want = o.at("config");
        std::erase_if(configs, [&](const Config& x) { return x.name != want; });
        if (configs.empty()) throw UsageError("--config '" + want + "' is not one of the evaluated configurations");
    }
    kvq::model::LlamaModel ref(c, L.weights);
    ref.set_fast_matvec(true);
    std::shared_ptr<const kvq::WkvParams> stats;
    const bool json = o.count("json") > 0;
    if (!json) std::printf("%-44s %8s %10s %7s %7s\n", "config", "ppl", "mean KL", "W bits", "KV bits");
    for (const Config& cf : configs) {
        kvq::model::LlamaModel m(c, L.weights);
        m.set_fast_matvec(true);
        std::optional<kvq::WkvParams> file_kv;
        auto w4 = kvq::io::make_w4_weights(cf.weights, c, L.weights, &file_kv);
        EvalRow row;
        row.name = cf.name;
        if (w4) row.bits_w = w4->bits_per_weight();
        m.set_w4(std::move(w4));
        std::unique_ptr<kvq::model::AttentionBackend> be;
        WkvBackend* wb = nullptr;
        if (cf.kv == 0) {
            be = std::make_unique<kvq::model::Fp32AttentionBackend>(c);
        } else {
            if (cf.kv == 1 && !stats) stats = stats_kv();
            auto p = cf.kv == 1 ? stats : std::make_shared<const kvq::WkvParams>(*file_kv);
            auto w = std::make_unique<WkvBackend>(c, p, 4, cf.poq);
            wb = w.get();
            be = std::move(w);
        }
        kvq::model::Fp32AttentionBackend rb(c);
        double nll = 0, kl = 0;
        long n = 0;
        for (std::size_t s = 0; s + 1 < held.size(); s += std::size_t(context) - 1) {
            const std::size_t e = std::min(held.size(), s + std::size_t(context));
            be->reset();
            rb.reset();
            for (std::size_t p = s; p + 1 < e; ++p) {
                const auto lg = m.forward(held[p], int(p - s), *be);
                const auto lr = ref.forward(held[p], int(p - s), rb);
                const double a = log_sum_exp(lg), b = log_sum_exp(lr);
                nll += a - double(lg[std::size_t(held[p + 1])]);
                double k = 0;
                for (std::size_t v = 0; v < lg.size(); ++v) {
                    const double lp = double(lr[v]) - b, lq = double(lg[v]) - a;
                    k += std::exp(lp) * (lp - lq);
                }
                kl += std::max(k, 0.0);
                ++n;
            }
        }
        row.ppl = std::exp(nll / double(n));
        row.kl = kl / double(n);
        if (wb) row.bits_kv = wb->memory().bits_per_element();
        if (json)
            std::printf(
                "{\"config\":\"%s\",\"ppl\":%.6f,\"mean_kl\":%.6g,\"bits_per_weight\":%.4f,"
                "\"kv_bits_per_element\":%.4f,\"tokens\":%ld}\n",
                row.name.c_str(), row.ppl, row.kl, row.bits_w, row.bits_kv, n);
        else
            std::printf("%-44s %8.4f %10.4g %7.3f %7.3f\n", row.name.c_str(), row.ppl, row.kl, row.bits_w, row.bits_kv);
        std::fflush(stdout);
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        if (argc < 2 || std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help") {
            std::fputs(kUsage, argc < 2 ? stderr : stdout);
            return argc < 2 ? 2 : 0;
        }
        const std::string mode = argv[1];
        const auto o = parse(argc, argv, 2);
        if (mode == "calibrate") return run_calibrate(o);
        if (mode == "eval") return run_eval(o);
        throw UsageError("unknown mode '" + mode + "'");
    } catch (const UsageError& e) {
        std::fprintf(stderr, "kvq-calibrate: %s\n\n%s", e.what(), kUsage);
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 2;
    }
}
