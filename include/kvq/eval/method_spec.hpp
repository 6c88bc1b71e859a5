#pragma once
// Method specs: the strings kvq-eval (and benchmarks, engines) use to name a KV-cache compression
// method, and the factory that turns one into codecs and a window policy.
//
// Grammar (no whitespace anywhere, case-sensitive, at most kMaxSpecChars characters):
//     SPEC  := NAME [ ':' PARAM { ',' PARAM } ]
//     PARAM := KEY '=' VALUE
// Integers are unsigned decimal ([0-9]+, no sign, no exponent, no hex); enums are one of the listed
// words. Every violation -- empty spec, unknown name, unknown key for that name, missing '=', empty
// key or value, bad or out-of-range integer, unknown enum word, duplicate key, empty parameter
// (":" with nothing after it, ",,", trailing ",") -- throws kvq::Error quoting the spec and the
// offending part; parsing never crashes on any input (it is fuzzed: fuzz/fuzz_method_spec.cpp).
//
// Methods (K = key codec, V = value codec):
//   fp32, fp16, bf16          IdentityCodec for K and V (no quantization)
//   int8, int4, int3, int2    TokenwiseCodec for K and V: b bits, groups of g channels
//                             (g = 32 default), fp16 step and min per (token, group)
//   qjl                       K = QjlKeyCodec, V = TokenwiseCodec(vbits, vg)
//   wkv                       WKVQuant 2-D: static per-channel smoothing (delta, s per layer, K and V,
//                             calibrated) + WkvCodec (token-wise bits, group g) for K and V; run
//                             through WkvKvCache (kvq/quant/wkv_codec.hpp)
//   kivi                      K = KiviKeyCodec (per channel over 32 tokens), V = TokenwiseCodec(bits,
//                             32); residual window=R (default 128, not the caller's default): keys
//                             flush in chunks of R, values slide
// Keys (all optional):
//   every method  window=R    newest R tokens of K and V kept in fp32 (default: the caller's, e.g.
//                             kvq-eval --window); 0..2^20
//                 kflush=sliding|chunk  how the key window flushes (values always slide; QJL's
//                             official setting is window=128,kflush=chunk). Default sliding.
//   int*          g=          channels per group (divides head_dim), default 32
//   qjl           m=          inlier sketch bits, multiple of 32 in [64, 1024], default 256
//                 mo=         outlier sketch bits, multiple of 32 in [32, 1024], default 256
//                 outliers=   outlier channels per 32-token group, 0..16, default 8
//                 sketch=gaussian|orthogonal   default orthogonal
//                 seed=       sketch seed (uint64), default QjlParams{}.seed
//                 vbits=      value bits (2, 3, 4, 8), default 2
//                 vg=         value group, default 32
//   wkv           bits=       2, 3, 4 or 8, default 4
//                 g=          channels per group (divides head_dim), default head_dim
//                 calib=stats|opt|none   how delta, s are found (none: delta = 0, s = 1, i.e. plain
//                             token-wise quantization), default stats
//   kivi          bits=       2 or 4, default 2
//   every method  poq=on|off  past-only quantization (default on; see kv_cache.hpp)
//
// Key/value mixing: "k=SPEC;v=SPEC" takes the key codec (and key window, kflush, K smoothing) of the
// first spec and the value codec (value window, V smoothing) of the second, e.g.
// "k=qjl:m=256;v=wkv:bits=4" (QJL keys, WKV 4-bit values) or "k=kivi:bits=2;v=int4". poq, if given
// on both sides, must agree. parse_kv_spec() / make_method(text) accept both forms;
// parse_method_spec() only the single form. Canonical form of a mixed spec:
// "k=" + canonical(K) + ";v=" + canonical(V).
// Ranges that depend on the codec or the head dimension are checked by make_method(), which also
// throws kvq::Error naming the spec.
//
// Canonical form (MethodSpec::canonical()): the name, then the given keys in the order listed
// above with normalised values (decimal integers without leading zeros), e.g.
// "qjl:mo=0128,m=512" -> "qjl:m=512,mo=128"; parse(canonical(x)) == parse(x).
// Method::description() spells out every parameter, defaults included.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvq/cache/kv_cache.hpp"
#include "kvq/calibration/kv_calibration.hpp"
#include "kvq/core/error.hpp"
#include "kvq/quant/codec.hpp"
#include "kvq/quant/identity_codec.hpp"
#include "kvq/quant/kivi_codec.hpp"
#include "kvq/quant/qjl_key_codec.hpp"
#include "kvq/quant/tokenwise_codec.hpp"
#include "kvq/quant/wkv_codec.hpp"

namespace kvq::eval {

inline constexpr std::size_t kMaxSpecChars = 1024;

namespace detail {

// Printable rendering of untrusted text for error messages: control and non-ASCII bytes as \xNN,
// quotes and backslashes escaped, cut to 80 characters.
inline std::string quote(std::string_view s) {
    static const char* hex = "0123456789abcdef";
    std::string out = "\"";
    std::size_t i = 0;
    for (; i < s.size() && i < 80; ++i) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        if (c == '"' || c == '\\') {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c >= 0x20 && c < 0x7F) {
            out += static_cast<char>(c);
        } else {
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 15];
        }
    }
    if (i < s.size()) out += "...";
    return out + "\"";
}

// Strict unsigned decimal; false on anything else or on a value above max.
inline bool parse_uint(std::string_view s, std::uint64_t max, std::uint64_t& out) {
    if (s.empty()) return false;
    std::uint64_t v = 0;
    for (char ch : s) {
        if (ch < '0' || ch > '9') return false;
        const std::uint64_t digit = static_cast<std::uint64_t>(ch - '0');
        if (v > (max - digit) / 10) return false;
        v = v * 10 + digit;
    }
    out = v;
    return true;
}

// The message of a kvq::Error without the "kvq: " prefix and " [function]" suffix.
inline std::string inner_message(const Error& e) {
    std::string_view m = e.what();
    if (m.substr(0, 5) == "kvq: ") m.remove_prefix(5);
    const std::size_t at = m.rfind(" [");
    if (!m.empty() && m.back() == ']' && at != std::string_view::npos) m = m.substr(0, at);
    return std::string(m);
}

enum class KeyType { Int, Seed, Enum };

struct KeyDef {
    const char* key;
    KeyType type;
    std::uint64_t max;               // Int: largest accepted value (finer ranges: make_method)
    std::vector<const char*> words;  // Enum: accepted words
};

struct MethodDef {
    const char* name;
    std::vector<KeyDef> keys;  // canonical order
};

inline const std::vector<MethodDef>& method_table() {
    static const std::vector<MethodDef> table = [] {
        const KeyDef window{"window", KeyType::Int, 1u << 20, {}};
        const KeyDef kflush{"kflush", KeyType::Enum, 0, {"sliding", "chunk"}};
        const KeyDef g{"g", KeyType::Int, 1u << 16, {}};
        const KeyDef poq{"poq", KeyType::Enum, 0, {"on", "off"}};
        const KeyDef bits{"bits", KeyType::Int, 1u << 16, {}};
        std::vector<MethodDef> t;
        for (const char* n : {"fp32", "fp16", "bf16"}) t.push_back({n, {window, kflush, poq}});
        for (const char* n : {"int8", "int4", "int3", "int2"}) t.push_back({n, {g, window, kflush, poq}});
        t.push_back({"qjl",
                     {{"m", KeyType::Int, 1u << 16, {}},
                      {"mo", KeyType::Int, 1u << 16, {}},
                      {"outliers", KeyType::Int, 1u << 16, {}},
                      {"sketch", KeyType::Enum, 0, {"gaussian", "orthogonal"}},
                      {"seed", KeyType::Seed, std::numeric_limits<std::uint64_t>::max(), {}},
                      {"vbits", KeyType::Int, 1u << 16, {}},
                      {"vg", KeyType::Int, 1u << 16, {}},
                      window,
                      kflush,
                      poq}});
        t.push_back({"wkv", {bits, g, {"calib", KeyType::Enum, 0, {"stats", "opt", "none"}}, window, kflush, poq}});
        t.push_back({"kivi", {bits, window, poq}});
        return t;
    }();
    return table;
}

inline const MethodDef* find_method(std::string_view name) {
    for (const MethodDef& m : method_table())
        if (name == m.name) return &m;
    return nullptr;
}

inline const KeyDef* find_key(const MethodDef& m, std::string_view key) {
    for (const KeyDef& k : m.keys)
        if (key == k.key) return &k;
    return nullptr;
}

inline std::string method_names() {
    std::string s;
    for (const MethodDef& m : method_table()) {
        if (!s.empty()) s += ", ";
        s += m.name;
    }
    return s;
}

inline std::string key_names(const MethodDef& m) {
    std::string s;
    for (const KeyDef& k : m.keys) {
        if (!s.empty()) s += ", ";
        s += k.key;
    }
    return s;
}

}  // namespace detail

// A parsed spec: the method name and its parameters with normalised values (integers in decimal
// without leading zeros, enum words as given). Only keys that were given are present.
struct MethodSpec {
    std::string name;
    std::map<std::string, std::string> params;

    bool has(const std::string& key) const { return params.count(key) != 0; }

    // The canonical spec string (see the header comment).
    std::string canonical() const {
        std::string s = name;
        const detail::MethodDef* def = detail::find_method(name);
        if (!def) return s;  // not produced by parse_method_spec
        bool first = true;
        for (const detail::KeyDef& k : def->keys) {
            auto it = params.find(k.key);
            if (it == params.end()) continue;
            s += first ? ":" : ",";
            s += it->first + "=" + it->second;
            first = false;
        }
        return s;
    }

    friend bool operator==(const MethodSpec&, const MethodSpec&) = default;
};

// Parses and validates SPEC; throws kvq::Error quoting the spec and the offending text.
inline MethodSpec parse_method_spec(std::string_view text) {
    using detail::quote;
    KVQ_CHECK(!text.empty(), "empty method spec (expected NAME[:KEY=VALUE,...], NAME one of ", detail::method_names(),
              ")");
    KVQ_CHECK(text.size() <= kMaxSpecChars, "method spec ", quote(text), " is ", text.size(),
              " characters long, over the limit of ", kMaxSpecChars);
    const std::size_t colon = text.find(':');
    const std::string_view name = text.substr(0, colon);
    KVQ_CHECK(!name.empty(), "method spec ", quote(text), " has an empty method name (expected one of ",
              detail::method_names(), ")");
    const detail::MethodDef* def = detail::find_method(name);
    KVQ_CHECK(def != nullptr, "method spec ", quote(text), ": unknown method ", quote(name), " (expected one of ",
              detail::method_names(), ")");
    MethodSpec spec;
    spec.name = std::string(name);
    if (colon == std::string_view::npos) return spec;

    std::string_view rest = text.substr(colon + 1);
    KVQ_CHECK(!rest.empty(), "method spec ", quote(text), " has an empty parameter list after ':'");
    std::size_t pos = colon + 1;  // offset of the current parameter in text, for messages
    for (;;) {
        const std::size_t comma = rest.find(',');
        const std::string_view item = rest.substr(0, comma);
        KVQ_CHECK(!item.empty(), "method spec ", quote(text), " has an empty parameter at character ", pos,
                  " (stray ',' or ':')");
        const std::size_t eq = item.find('=');
        KVQ_CHECK(eq != std::string_view::npos, "method spec ", quote(text), ": parameter ", quote(item),
                  " is not of the form KEY=VALUE");
        const std::string_view key = item.substr(0, eq), value = item.substr(eq + 1);
        KVQ_CHECK(!key.empty(), "method spec ", quote(text), ": parameter ", quote(item), " has an empty key");
        const detail::KeyDef* kd = detail::find_key(*def, key);
        KVQ_CHECK(kd != nullptr, "method spec ", quote(text), ": unknown key ", quote(key), " for method ", def->name,
                  " (expected one of ", detail::key_names(*def), ")");
        KVQ_CHECK(!spec.has(std::string(key)), "method spec ", quote(text), ": duplicate key ", quote(key));
        KVQ_CHECK(!value.empty(), "method spec ", quote(text), ": key ", quote(key), " has an empty value");
        std::string normal;
        if (kd->type == detail::KeyType::Enum) {
            for (const char* w : kd->words)
                if (value == w) normal = w;
            if (normal.empty()) {
                std::string words;
                for (const char* w : kd->words) {
                    if (!words.empty()) words += '|';
                    words += w;
                }
                KVQ_THROW("method spec ", quote(text), ": value ", quote(value), " of key ", quote(key),
                          " must be one of ", words);
            }
        } else {
            std::uint64_t v = 0;
            KVQ_CHECK(detail::parse_uint(value, kd->max, v), "method spec ", quote(text), ": value ", quote(value),
                      " of key ", quote(key), " is not an integer in [0, ", kd->max, "]");
            normal = std::to_string(v);
        }
        spec.params.emplace(std::string(key), std::move(normal));
        if (comma == std::string_view::npos) break;
        rest.remove_prefix(comma + 1);
        pos += comma + 1;
    }
    return spec;
}

// A ready method: codecs and window policy, plus its names.
struct Method {
    MethodSpec spec;  // the key side's spec for a mixed method (see value_spec / mixed)
    std::shared_ptr<const Codec> key_codec, value_codec;
    WindowPolicy key_window, value_window;
    bool past_only = true;
    // WKVQuant smoothing (wkv): which side is smoothed and how its delta, s are calibrated. A method
    // with smoothing must run through WkvKvCache with parameters from calibration (kvq-eval does).
    bool smooth_keys = false, smooth_values = false;
    calib::CalibMode key_calib = calib::CalibMode::None, value_calib = calib::CalibMode::None;
    int calib_bits = 4, calib_group = 0;  // the WKV codec being calibrated for (group 0: head_dim)
    bool mixed = false;
    MethodSpec value_spec;  // mixed only

    bool smoothing() const { return smooth_keys || smooth_values; }
    std::string canonical() const {
        return mixed ? "k=" + spec.canonical() + ";v=" + value_spec.canonical() : spec.canonical();
    }
    // Every parameter spelled out, e.g. "K=qjl:m=256,mo=256,outliers=8,sketch=orthogonal V=int2:g=32 window=0".
    std::string description() const {
        std::string s =
            "K=" + key_codec->name() + " V=" + value_codec->name() + " window=" + std::to_string(key_window.tokens);
        if (value_window.tokens != key_window.tokens) s += " vwindow=" + std::to_string(value_window.tokens);
        if (key_window.mode == FlushMode::Chunk) s += " kflush=chunk";
        const auto mode = [](calib::CalibMode m) {
            return m == calib::CalibMode::Opt ? "opt" : (m == calib::CalibMode::Stats ? "stats" : "none");
        };
        if (smooth_keys) s += std::string(" K-smoothing=") + mode(key_calib);
        if (smooth_values) s += std::string(" V-smoothing=") + mode(value_calib);
        s += past_only ? " poq=on" : " poq=off";
        return s;
    }
    // A cache configuration for this method (the window policies filled in).
    CacheConfig cache_config(int n_layers, int n_kv_heads, int block_tokens, bool past_only = true) const {
        CacheConfig c;
        c.n_layers = n_layers;
        c.n_kv_heads = n_kv_heads;
        c.head_dim = key_codec->head_dim();
        c.block_tokens = block_tokens;
        c.key_window = key_window;
        c.value_window = value_window;
        c.past_only = past_only && this->past_only;
        return c;
    }
};

// Builds the codecs of `spec` for head dimension head_dim. default_window is the window when the
// spec has no window= (its mode is overridden by kflush= for keys; values always slide). Throws
// kvq::Error, quoting the canonical spec, when a value is out of the codec's range.
inline Method make_method(const MethodSpec& spec, int head_dim, int default_window = 0) {
    const std::string canon = spec.canonical();
    const detail::MethodDef* def = detail::find_method(spec.name);
    KVQ_CHECK(def != nullptr, "unknown method ", detail::quote(spec.name), " (expected one of ", detail::method_names(),
              ")");
    for (const auto& [k, v] : spec.params)
        KVQ_CHECK(detail::find_key(*def, k) != nullptr, "method ", detail::quote(canon), ": unknown key ",
                  detail::quote(k));
    // Values of a MethodSpec built by hand are re-validated through the parser.
    const MethodSpec checked = parse_method_spec(canon);
    KVQ_CHECK(checked.params.size() == spec.params.size(), "method ", detail::quote(canon),
              ": a parameter value contains ',' or '=' (", spec.params.size(), " parameters given, ",
              checked.params.size(), " after re-parsing)");
    const auto get_int = [&](const char* key, std::uint64_t dflt) -> std::uint64_t {
        auto it = checked.params.find(key);
        if (it == checked.params.end()) return dflt;
        std::uint64_t v = 0;
        detail::parse_uint(it->second, std::numeric_limits<std::uint64_t>::max(), v);
        return v;
    };
    const auto get_word = [&](const char* key, const char* dflt) -> std::string {
        auto it = checked.params.find(key);
        return it == checked.params.end() ? std::string(dflt) : it->second;
    };
    const auto as_int = [](std::uint64_t v) {  // values were bounded by the parser (<= 2^20 or 2^16)
        return static_cast<int>(std::min<std::uint64_t>(v, std::uint64_t(std::numeric_limits<int>::max())));
    };

    Method m;
    m.spec = checked;
    try {
        KVQ_CHECK(default_window >= 0 && default_window <= (1 << 20), "default window must be in [0, 2^20], got ",
                  default_window);
        const int window = as_int(get_int("window", std::uint64_t(default_window)));
        const std::string& n = checked.name;
        if (n == "fp32" || n == "fp16" || n == "bf16") {
            const StorageType st =
                n == "fp32" ? StorageType::F32 : (n == "fp16" ? StorageType::F16 : StorageType::BF16);
            m.key_codec = std::make_shared<IdentityCodec>(head_dim, st);
            m.value_codec = m.key_codec;
        } else if (n.rfind("int", 0) == 0) {
            TokenwiseParams p;
            p.head_dim = head_dim;
            p.bits = n[3] - '0';
            p.group = as_int(get_int("g", 32));
            m.key_codec = std::make_shared<TokenwiseCodec>(p);
            m.value_codec = m.key_codec;
        } else if (n == "wkv") {
            const int bits = as_int(get_int("bits", 4));
            const int g = as_int(get_int("g", std::uint64_t(head_dim)));
            KVQ_CHECK(g >= 1, "g must be at least 1");
            m.key_codec = std::make_shared<WkvCodec>(head_dim, bits, g);
            m.value_codec = m.key_codec;
            const std::string c = get_word("calib", "stats");
            const calib::CalibMode mode =
                c == "opt" ? calib::CalibMode::Opt : (c == "none" ? calib::CalibMode::None : calib::CalibMode::Stats);
            m.smooth_keys = m.smooth_values = true;
            m.key_calib = m.value_calib = mode;
            m.calib_bits = bits;
            m.calib_group = g;
        } else if (n == "kivi") {
            const KiviConfig k =
                make_kivi(head_dim, as_int(get_int("bits", 2)), as_int(get_int("window", kKiviResidual)));
            m.key_codec = k.key_codec;
            m.value_codec = k.value_codec;
        } else {  // qjl
            QjlParams p;
            p.head_dim = head_dim;
            p.m = as_int(get_int("m", 256));
            p.m_outlier = as_int(get_int("mo", 256));
            p.outliers = as_int(get_int("outliers", 8));
            p.sketch =
                get_word("sketch", "orthogonal") == "gaussian" ? SketchKind::Gaussian : SketchKind::BlockOrthogonal;
            p.seed = get_int("seed", QjlParams{}.seed);
            m.key_codec = std::make_shared<QjlKeyCodec>(p);
            TokenwiseParams vp;
            vp.head_dim = head_dim;
            vp.bits = as_int(get_int("vbits", 2));
            vp.group = as_int(get_int("vg", 32));
            m.value_codec = std::make_shared<TokenwiseCodec>(vp);
        }
        m.key_window = {window, get_word("kflush", "sliding") == "chunk" ? FlushMode::Chunk : FlushMode::Sliding};
        m.value_window = {window, FlushMode::Sliding};
        if (n == "kivi") {
            const int r = as_int(get_int("window", kKiviResidual));
            m.key_window = {r, FlushMode::Chunk};
            m.value_window = {r, FlushMode::Sliding};
        }
        m.past_only = get_word("poq", "on") == "on";
        if (m.key_window.mode == FlushMode::Chunk)
            KVQ_CHECK(window % m.key_codec->granularity() == 0, "key chunk window (", window,
                      ") must be a multiple of the key codec's encoding granularity (", m.key_codec->granularity(),
                      ")");
    } catch (const Error& e) {
        KVQ_THROW("method ", detail::quote(canon), ": ", detail::inner_message(e));
    }
    return m;
}

// A single or mixed ("k=SPEC;v=SPEC") spec, parsed.
struct KvSpec {
    MethodSpec key, value;  // equal for a single spec
    bool mixed = false;
    std::string canonical() const {
        return mixed ? "k=" + key.canonical() + ";v=" + value.canonical() : key.canonical();
    }
    friend bool operator==(const KvSpec&, const KvSpec&) = default;
};

inline KvSpec parse_kv_spec(std::string_view text) {
    KvSpec s;
    if (text.substr(0, 2) != "k=") {
        s.key = s.value = parse_method_spec(text);
        return s;
    }
    KVQ_CHECK(text.size() <= 2 * kMaxSpecChars + 5, "method spec ", detail::quote(text), " is too long");
    const std::size_t semi = text.find(';');
    KVQ_CHECK(semi != std::string_view::npos && text.substr(semi + 1, 2) == "v=", "mixed method spec ",
              detail::quote(text), " must be of the form k=SPEC;v=SPEC");
    const std::string_view ks = text.substr(2, semi - 2), vs = text.substr(semi + 3);
    KVQ_CHECK(vs.find(';') == std::string_view::npos, "mixed method spec ", detail::quote(text),
              " has more than one ';'");
    s.key = parse_method_spec(ks);
    s.value = parse_method_spec(vs);
    s.mixed = true;
    if (s.key.has("poq") && s.value.has("poq"))
        KVQ_CHECK(s.key.params.at("poq") == s.value.params.at("poq"), "mixed method spec ", detail::quote(text),
                  ": poq differs between the key and the value spec");
    return s;
}

inline Method make_method(const KvSpec& s, int head_dim, int default_window = 0) {
    if (!s.mixed) return make_method(s.key, head_dim, default_window);
    const Method k = make_method(s.key, head_dim, default_window);
    const Method v = make_method(s.value, head_dim, default_window);
    Method m = k;
    m.mixed = true;
    m.value_spec = v.spec;
    m.value_codec = v.value_codec;
    m.value_window = v.value_window;
    m.smooth_values = v.smooth_values;
    m.value_calib = v.value_calib;
    if (!k.smooth_keys) {  // the calibration objective quantizes with the smoothed side's codec
        m.calib_bits = v.calib_bits;
        m.calib_group = v.calib_group;
    }
    m.past_only = (s.key.has("poq") ? k.past_only : true) && (s.value.has("poq") ? v.past_only : true);
    return m;
}

inline Method make_method(std::string_view spec_text, int head_dim, int default_window = 0) {
    return make_method(parse_kv_spec(spec_text), head_dim, default_window);
}

}  // namespace kvq::eval
