#pragma once
// A small strict JSON (RFC 8259) parser for headers of files we do not trust (safetensors).
// Strict on purpose: a header that a lenient parser accepts and another tool rejects (or reads
// differently) is a file bug we would rather report than propagate. So there are no comments,
// no trailing commas, no NaN, no duplicate keys, no invalid UTF-8 and no lone surrogates.
// Integers keep all 64 bits (tensor offsets exceed 2^53 in principle); an integer that does not
// fit int64 is an error rather than a silently rounded double. Nesting is capped so that hostile
// input cannot exhaust the stack, and the number of values can be capped so that it cannot make
// the parser allocate far more memory than the input size suggests.
#include <algorithm>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "kvq/core/error.hpp"

namespace kvq::io::json {

enum class Type { Null, Bool, Int, Double, String, Array, Object };

inline const char* type_name(Type t) {
    constexpr const char* names[] = {"null", "bool", "int", "double", "string", "array", "object"};
    return names[static_cast<int>(t)];
}

class Value;
struct Member;
using Array = std::vector<Value>;
using Object = std::vector<Member>;  // keys in document order, unique (the parser enforces it)

class Value {
public:
    Value() = default;  // null
    // Defined after Member: constructing the variant instantiates the destructor of every
    // alternative, which needs Member complete.
    inline explicit Value(bool b);
    inline explicit Value(std::int64_t i);
    inline explicit Value(double d);
    inline explicit Value(std::string s);
    inline explicit Value(Array a);
    inline explicit Value(Object o);

    // The enumerators follow the variant's alternative order.
    Type type() const { return static_cast<Type>(v_.index()); }
    bool is_null() const { return type() == Type::Null; }
    bool is_bool() const { return type() == Type::Bool; }
    bool is_int() const { return type() == Type::Int; }
    bool is_number() const { return type() == Type::Int || type() == Type::Double; }
    bool is_string() const { return type() == Type::String; }
    bool is_array() const { return type() == Type::Array; }
    bool is_object() const { return type() == Type::Object; }

    bool as_bool() const { return get<bool>(Type::Bool); }
    std::int64_t as_int() const { return get<std::int64_t>(Type::Int); }
    double as_double() const {
        if (is_int()) return static_cast<double>(std::get<std::int64_t>(v_));
        return get<double>(Type::Double);
    }
    const std::string& as_string() const { return get<std::string>(Type::String); }
    const Array& as_array() const { return get<Array>(Type::Array); }
    const Object& as_object() const { return get<Object>(Type::Object); }

    // Member lookup; nullptr when absent or when this is not an object.
    inline const Value* find(std::string_view key) const;

private:
    template <class T>
    const T& get(Type want) const {
        if (type() != want)
            ::kvq::detail::throw_error("json::Value", "json: expected ", type_name(want), ", got ", type_name(type()));
        return std::get<T>(v_);
    }
    std::variant<std::monostate, bool, std::int64_t, double, std::string, Array, Object> v_;
};

struct Member {
    std::string key;
    Value value;
};

inline Value::Value(bool b) : v_(b) {}
inline Value::Value(std::int64_t i) : v_(i) {}
inline Value::Value(double d) : v_(d) {}
inline Value::Value(std::string s) : v_(std::move(s)) {}
inline Value::Value(Array a) : v_(std::move(a)) {}
inline Value::Value(Object o) : v_(std::move(o)) {}

inline const Value* Value::find(std::string_view key) const {
    if (!is_object()) return nullptr;
    for (const Member& m : std::get<Object>(v_))
        if (m.key == key) return &m.value;
    return nullptr;
}

struct Limits {
    int max_depth = 64;  // arrays/objects nested deeper than this are rejected
    std::size_t max_values = std::numeric_limits<std::size_t>::max();
};

namespace detail {

// Length of the well-formed UTF-8 sequence starting at s[i], or 0 if it is malformed (overlong
// forms, surrogates and code points above U+10FFFF are malformed, per RFC 3629).
inline std::size_t utf8_sequence_length(std::string_view s, std::size_t i) {
    const auto at = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
    const unsigned char b0 = at(i);
    if (b0 < 0x80) return 1;
    std::size_t len;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        len = 2;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
        len = 3;
        if (b0 == 0xE0) lo = 0xA0;
        if (b0 == 0xED) hi = 0x9F;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        len = 4;
        if (b0 == 0xF0) lo = 0x90;
        if (b0 == 0xF4) hi = 0x8F;
    } else {
        return 0;
    }
    if (s.size() - i < len) return 0;
    if (at(i + 1) < lo || at(i + 1) > hi) return 0;
    for (std::size_t k = 2; k < len; ++k)
        if (at(i + k) < 0x80 || at(i + k) > 0xBF) return 0;
    return len;
}

inline void append_utf8(std::string& out, std::uint32_t cp) {
    const int extra = cp < 0x80 ? 0 : cp < 0x800 ? 1 : cp < 0x10000 ? 2 : 3;  // continuation bytes
    constexpr unsigned char lead[] = {0x00, 0xC0, 0xE0, 0xF0};
    out += static_cast<char>(lead[extra] | (cp >> (6 * extra)));
    for (int k = extra - 1; k >= 0; --k) out += static_cast<char>(0x80 | ((cp >> (6 * k)) & 0x3F));
}

// Error messages quote user text; keep them short and printable.
inline std::string preview(std::string_view s) {
    std::string out;
    for (std::size_t i = 0; i < s.size() && i < 40; ++i) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        if (c >= 0x20 && c < 0x7F) {
            out += static_cast<char>(c);
        } else {
            constexpr char hex[] = "0123456789abcdef";
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 15];
        }
    }
    if (s.size() > 40) out += "...";
    return out;
}

class Parser {
public:
    Parser(std::string_view text, const Limits& limits) : t_(text), limits_(limits) {}

    Value parse_document() {
        skip_ws();
        Value v = parse_value(0);
        skip_ws();
        if (pos_ != t_.size()) fail("unexpected ", describe_here(), " after the JSON value");
        return v;
    }

private:
    template <class... Parts>
    [[noreturn]] void fail_at(std::size_t at, const Parts&... parts) const {
        ::kvq::detail::throw_error("json::parse", "json: ", parts..., " at byte ", at);
    }
    template <class... Parts>
    [[noreturn]] void fail(const Parts&... parts) const {
        fail_at(pos_, parts...);
    }

    std::string describe_here() const {
        if (pos_ >= t_.size()) return "end of input";
        return "character '" + preview(t_.substr(pos_, 1)) + "'";
    }
    bool at_end() const { return pos_ >= t_.size(); }
    char peek() const { return t_[pos_]; }
    void skip_ws() {
        while (!at_end() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r')) ++pos_;
    }
    bool consume(char c) {
        if (at_end() || peek() != c) return false;
        ++pos_;
        return true;
    }
    void expect(char c) {
        if (!consume(c)) fail("expected '", c, "' but found ", describe_here());
    }

    Value parse_value(int depth) {
        if (at_end()) fail("unexpected end of input, expected a value");
        if (++values_ > limits_.max_values) fail("more than ", limits_.max_values, " values");
        const char c = peek();
        if (c == '{') return parse_object(depth + 1);
        if (c == '[') return parse_array(depth + 1);
        if (c == '"') return Value(parse_string());
        if (c == '-' || (c >= '0' && c <= '9')) return parse_number();
        if (c == 't') return literal("true", Value(true));
        if (c == 'f') return literal("false", Value(false));
        if (c == 'n') return literal("null", Value());
        fail("unexpected ", describe_here(), ", expected a value");
    }

    Value literal(std::string_view word, Value v) {
        if (t_.substr(pos_, word.size()) != word) fail("invalid literal, expected '", word, "'");
        pos_ += word.size();
        return v;
    }

    void check_depth(int depth) const {
        if (depth > limits_.max_depth) fail("nesting deeper than ", limits_.max_depth, " levels");
    }

    Value parse_array(int depth) {
        check_depth(depth);
        ++pos_;  // '['
        Array arr;
        skip_ws();
        if (consume(']')) return Value(std::move(arr));
        do {
            skip_ws();
            arr.push_back(parse_value(depth));
            skip_ws();
        } while (consume(','));
        if (!consume(']')) fail("expected ',' or ']' in array but found ", describe_here());
        return Value(std::move(arr));
    }

    Value parse_object(int depth) {
        check_depth(depth);
        ++pos_;  // '{'
        Object obj;
        std::set<std::string, std::less<>> seen;
        skip_ws();
        if (consume('}')) return Value(std::move(obj));
        do {
            skip_ws();
            if (at_end() || peek() != '"') fail("expected a string key but found ", describe_here());
            const std::size_t key_pos = pos_;
            std::string key = parse_string();
            if (!seen.insert(key).second) fail_at(key_pos, "duplicate key \"", preview(key), "\"");
            skip_ws();
            expect(':');
            skip_ws();
            Value v = parse_value(depth);
            obj.push_back(Member{std::move(key), std::move(v)});
            skip_ws();
        } while (consume(','));
        if (!consume('}')) fail("expected ',' or '}' in object but found ", describe_here());
        return Value(std::move(obj));
    }

    std::uint32_t hex4() {
        if (t_.size() - pos_ < 4) fail("truncated \\u escape");
        const char* p = t_.data() + pos_;
        std::uint32_t v = 0;
        const auto r = std::from_chars(p, p + 4, v, 16);  // hex digits only: no sign, no 0x
        pos_ += static_cast<std::size_t>(r.ptr - p);
        if (r.ptr != p + 4) fail("invalid hex digit in \\u escape: ", describe_here());
        return v;
    }

    std::string parse_string() {
        const std::size_t start = pos_;
        ++pos_;  // opening quote
        std::string out;
        for (;;) {
            if (at_end()) fail_at(start, "unterminated string");
            const unsigned char c = static_cast<unsigned char>(peek());
            if (c == '"') {
                ++pos_;
                return out;
            }
            if (c < 0x20) fail("unescaped control character ", preview(t_.substr(pos_, 1)), " in string");
            if (c == '\\') {
                parse_escape(out);
            } else {
                const std::size_t len = utf8_sequence_length(t_, pos_);
                if (len == 0) fail("invalid UTF-8 in string");
                out.append(t_.substr(pos_, len));
                pos_ += len;
            }
        }
    }

    void parse_escape(std::string& out) {
        const std::size_t esc_pos = pos_;
        ++pos_;  // backslash
        if (at_end()) fail_at(esc_pos, "unterminated escape");
        const char e = peek();
        ++pos_;
        constexpr std::string_view simple_from = "\"\\/bfnrt", simple_to = "\"\\/\b\f\n\r\t";
        if (const std::size_t k = simple_from.find(e); k != std::string_view::npos) {
            out += simple_to[k];
            return;
        }
        if (e != 'u') fail_at(esc_pos, "invalid escape '\\", preview(std::string_view(&e, 1)), "'");
        std::uint32_t cp = hex4();
        if (cp >= 0xDC00 && cp <= 0xDFFF) fail_at(esc_pos, "lone low surrogate in \\u escape");
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            // UTF-16 surrogate pair: the low half must follow as another \u escape.
            if (t_.substr(pos_, 2) != "\\u") fail_at(esc_pos, "high surrogate not followed by a low surrogate");
            pos_ += 2;
            const std::uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail_at(esc_pos, "high surrogate not followed by a low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        append_utf8(out, cp);
    }

    std::size_t digits() {
        const std::size_t start = pos_;
        while (!at_end() && peek() >= '0' && peek() <= '9') ++pos_;
        return pos_ - start;
    }

    Value parse_number() {
        const std::size_t start = pos_;
        const bool neg = peek() == '-';
        if (neg) ++pos_;
        const std::size_t int_start = pos_;
        const std::size_t n_int = digits();
        if (n_int == 0) fail("invalid number: expected a digit");
        if (n_int > 1 && t_[int_start] == '0') fail_at(int_start, "invalid number: leading zero");
        bool is_int = true;
        if (!at_end() && peek() == '.') {
            ++pos_;
            if (digits() == 0) fail("invalid number: expected a digit after '.'");
            is_int = false;
        }
        if (!at_end() && (peek() == 'e' || peek() == 'E')) {
            ++pos_;
            if (!at_end() && (peek() == '+' || peek() == '-')) ++pos_;
            if (digits() == 0) fail("invalid number: expected a digit in the exponent");
            is_int = false;
        }
        const std::string_view tok = t_.substr(start, pos_ - start);
        if (is_int) {
            // Accumulate the magnitude unsigned so that INT64_MIN is reachable.
            const std::uint64_t limit = neg ? std::uint64_t{1} << 63 : (std::uint64_t{1} << 63) - 1;
            std::uint64_t mag = 0;
            for (std::size_t i = int_start; i < pos_; ++i) {
                const auto d = static_cast<std::uint64_t>(t_[i] - '0');
                if (mag > (limit - d) / 10) fail_at(start, "integer ", preview(tok), " out of int64 range");
                mag = mag * 10 + d;
            }
            return Value(neg ? static_cast<std::int64_t>(0 - mag) : static_cast<std::int64_t>(mag));
        }
        double d = 0;
        const auto r = std::from_chars(tok.data(), tok.data() + tok.size(), d);
        if (r.ec == std::errc::result_out_of_range) {
            // from_chars reports underflow too; a value too small for a double is just (signed) 0.
            if (!overflows(tok)) return Value(neg ? -0.0 : 0.0);
            fail_at(start, "number ", preview(tok), " out of double range");
        }
        if (r.ec != std::errc() || r.ptr != tok.data() + tok.size()) fail_at(start, "invalid number ", preview(tok));
        return Value(d);
    }

    // For an out-of-range literal: true if its magnitude is >= 1 (too large) rather than < 1.
    static bool overflows(std::string_view tok) {
        std::size_t i = tok[0] == '-' ? 1 : 0;
        std::int64_t order = 0;  // decimal exponent of the leading significant digit
        bool seen_nonzero = false;
        for (bool frac = false; i < tok.size() && tok[i] != 'e' && tok[i] != 'E'; ++i) {
            if (tok[i] == '.') {
                frac = true;
                continue;
            }
            if (!seen_nonzero && tok[i] != '0') seen_nonzero = true;
            if (!frac && seen_nonzero) ++order;
            if (frac && !seen_nonzero) --order;
        }
        std::int64_t exp = 0;
        if (i < tok.size()) {
            ++i;
            const bool eneg = tok[i] == '-';
            if (tok[i] == '+' || tok[i] == '-') ++i;
            for (; i < tok.size(); ++i) exp = std::min<std::int64_t>(exp * 10 + (tok[i] - '0'), 1'000'000'000);
            if (eneg) exp = -exp;
        }
        return order - 1 + exp >= 0;
    }

    std::string_view t_;
    Limits limits_;
    std::size_t pos_ = 0;
    std::size_t values_ = 0;
};

}  // namespace detail

// Parses a complete JSON document; throws kvq::Error naming the problem and its byte offset.
inline Value parse(std::string_view text, const Limits& limits = {}) {
    return detail::Parser(text, limits).parse_document();
}

// A JSON string literal (with quotes) for s; throws kvq::Error if s is not valid UTF-8, since
// the result would otherwise be a document our own parser rejects.
inline std::string quote(std::string_view s) {
    std::string out = "\"";
    for (std::size_t i = 0; i < s.size();) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        if (c == '"' || c == '\\') {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c < 0x20) {
            constexpr char hex[] = "0123456789abcdef";
            out += "\\u00";
            out += hex[c >> 4];
            out += hex[c & 15];
        } else {
            const std::size_t len = detail::utf8_sequence_length(s, i);
            if (len == 0)
                ::kvq::detail::throw_error("json::quote", "json: string \"", detail::preview(s),
                                           "\" is not valid UTF-8 at byte ", i);
            out.append(s.substr(i, len));
            i += len;
            continue;
        }
        ++i;
    }
    out += '"';
    return out;
}

}  // namespace kvq::io::json
