#pragma once
// Byte-level BPE tokenizer (GPT-2 family) built from GGUF metadata: tokenizer.ggml.tokens,
// tokenizer.ggml.merges, tokenizer.ggml.token_type, bos/eos ids. This is what SmolLM2 uses
// (tokenizer.ggml.model = "gpt2", tokenizer.ggml.pre = "smollm").
//
// Encoding: (1) control / user-defined tokens (token_type 3 or 4, e.g. <|im_start|>) are matched
// literally first; (2) the rest is pre-tokenized as llama.cpp does for "smollm": every digit is its
// own piece, then each remaining piece is split by the GPT-2 pattern
//     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// implemented by hand on code points; (3) each piece's bytes are mapped to the GPT-2 byte alphabet
// and merged by BPE rank. Decoding maps the byte alphabet back to bytes.
//
// Unicode classes are approximated: letters = ASCII letters plus every non-ASCII code point that
// is not listed below as whitespace or punctuation; numbers = ASCII digits. Exact for ASCII text and
// for the usual typographic punctuation (curly quotes, dashes, ellipsis); a rare script symbol may
// split differently from the reference tokenizer (the encoding still round-trips exactly).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/io/gguf.hpp"

namespace kvq::io {

class Gpt2BpeTokenizer {
public:
    Gpt2BpeTokenizer(std::vector<std::string> tokens, const std::vector<std::string>& merges,
                     std::vector<std::int32_t> token_types = {}, int bos_id = -1, int eos_id = -1)
        : tokens_(std::move(tokens)), types_(std::move(token_types)), bos_(bos_id), eos_(eos_id) {
        KVQ_CHECK(!tokens_.empty(), "bpe tokenizer: empty vocabulary");
        KVQ_CHECK(tokens_.size() < static_cast<std::size_t>(std::numeric_limits<int>::max()),
                  "bpe tokenizer: vocabulary too large");
        KVQ_CHECK(types_.empty() || types_.size() == tokens_.size(), "bpe tokenizer: ", types_.size(),
                  " token types for ", tokens_.size(), " tokens");
        KVQ_CHECK(bos_ < static_cast<int>(tokens_.size()) && eos_ < static_cast<int>(tokens_.size()),
                  "bpe tokenizer: bos/eos id out of range");
        init_byte_maps();
        for (std::size_t i = 0; i < tokens_.size(); ++i) vocab_.emplace(tokens_[i], static_cast<int>(i));
        for (std::size_t r = 0; r < merges.size(); ++r) {
            const auto sp = merges[r].find(' ');
            KVQ_CHECK(sp != std::string::npos && sp > 0 && sp + 1 < merges[r].size(), "bpe tokenizer: merge ", r, " '",
                      merges[r], "' is not 'left right'");
            ranks_.emplace(merges[r], static_cast<int>(r));
        }
        for (std::size_t i = 0; i < types_.size(); ++i)
            if ((types_[i] == 3 || types_[i] == 4) && !tokens_[i].empty()) specials_.push_back(static_cast<int>(i));
        std::sort(specials_.begin(), specials_.end(),
                  [&](int a, int b) { return tokens_[a].size() > tokens_[b].size(); });  // longest first
    }

    static Gpt2BpeTokenizer from_gguf(const GgufFile& f) {
        const std::string& model = f.get_string("tokenizer.ggml.model");
        KVQ_CHECK(model == "gpt2", "bpe tokenizer: tokenizer.ggml.model = '", model, "', expected 'gpt2'");
        std::vector<std::int32_t> types;
        if (const GgufValue* t = f.find("tokenizer.ggml.token_type")) {
            KVQ_CHECK(t->type == GgufType::Array, "bpe tokenizer: token_type is not an array");
            for (const auto& e : t->array) types.push_back(static_cast<std::int32_t>(e.is_signed() ? e.i : e.u));
        }
        const int bos =
            f.has("tokenizer.ggml.bos_token_id") ? static_cast<int>(f.get_uint("tokenizer.ggml.bos_token_id")) : -1;
        const int eos =
            f.has("tokenizer.ggml.eos_token_id") ? static_cast<int>(f.get_uint("tokenizer.ggml.eos_token_id")) : -1;
        return Gpt2BpeTokenizer(f.get_string_array("tokenizer.ggml.tokens"),
                                f.get_string_array("tokenizer.ggml.merges"), std::move(types), bos, eos);
    }

    int vocab_size() const { return static_cast<int>(tokens_.size()); }
    int bos_id() const { return bos_; }
    int eos_id() const { return eos_; }
    const std::string& token(int id) const {
        KVQ_CHECK(id >= 0 && id < vocab_size(), "bpe tokenizer: id ", id, " outside [0, ", vocab_size(), ")");
        return tokens_[static_cast<std::size_t>(id)];
    }
    int find(const std::string& s) const {
        auto it = vocab_.find(s);
        return it == vocab_.end() ? -1 : it->second;
    }

    std::vector<int> encode(std::string_view text, bool add_bos = false) const {
        std::vector<int> out;
        if (add_bos && bos_ >= 0) out.push_back(bos_);
        std::size_t i = 0, start = 0;
        while (i < text.size()) {
            int hit = -1;
            for (int s : specials_) {
                const std::string& t = tokens_[static_cast<std::size_t>(s)];
                if (text.compare(i, t.size(), t) == 0) {
                    hit = s;
                    break;
                }
            }
            if (hit < 0) {
                ++i;
                continue;
            }
            encode_plain(text.substr(start, i - start), out);
            out.push_back(hit);
            i += tokens_[static_cast<std::size_t>(hit)].size();
            start = i;
        }
        encode_plain(text.substr(start), out);
        return out;
    }

    std::string decode(int id) const {
        const std::string& t = token(id);
        if (is_special(id)) return t;
        std::string out;
        std::size_t i = 0;
        while (i < t.size()) {
            const std::size_t before = i;
            const std::uint32_t cp = next_cp(t, i);
            auto it = unicode_to_byte_.find(cp);
            if (it != unicode_to_byte_.end())
                out.push_back(static_cast<char>(it->second));
            else
                out.append(t, before, i - before);  // not from the byte alphabet: keep as is
        }
        return out;
    }
    std::string decode(const std::vector<int>& ids) const {
        std::string out;
        for (int id : ids) out += decode(id);
        return out;
    }

    // Pre-tokenizer pieces of `text` (no special-token handling), exposed for tests.
    static std::vector<std::string> pretokenize(std::string_view text) {
        std::vector<std::string> pieces;
        // digits first: each digit is a piece; the gaps go through the GPT-2 pattern
        std::size_t i = 0, start = 0;
        while (i < text.size()) {
            if (text[i] >= '0' && text[i] <= '9') {
                gpt2_split(text.substr(start, i - start), pieces);
                pieces.emplace_back(1, text[i]);
                start = ++i;
            } else {
                ++i;
            }
        }
        gpt2_split(text.substr(start), pieces);
        return pieces;
    }

private:
    bool is_special(int id) const {
        return !types_.empty() &&
               (types_[static_cast<std::size_t>(id)] == 3 || types_[static_cast<std::size_t>(id)] == 4);
    }

    static std::string utf8(std::uint32_t cp) {
        std::string s;
        if (cp < 0x80) {
            s.push_back(static_cast<char>(cp));
        } else if (cp < 0x800) {
            s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
            s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
        } else if (cp < 0x10000) {
            s.push_back(static_cast<char>(0xE0 | (cp >> 12)));
            s.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
            s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
        } else {
            s.push_back(static_cast<char>(0xF0 | (cp >> 18)));
            s.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
            s.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
            s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
        }
        return s;
    }
    // Decodes one UTF-8 code point at s[i], advancing i; invalid bytes decode as themselves
    // (0xDC00 + byte, a lone surrogate no valid text contains) and advance by one.
    static std::uint32_t next_cp(std::string_view s, std::size_t& i) {
        const auto b0 = static_cast<unsigned char>(s[i]);
        int len = b0 < 0x80 ? 1 : (b0 >> 5) == 6 ? 2 : (b0 >> 4) == 14 ? 3 : (b0 >> 3) == 30 ? 4 : 0;
        if (len == 0 || i + static_cast<std::size_t>(len) > s.size()) {
            ++i;
            return 0xDC00u + b0;
        }
        std::uint32_t cp = len == 1 ? b0 : len == 2 ? (b0 & 0x1F) : len == 3 ? (b0 & 0x0F) : (b0 & 0x07);
        for (int k = 1; k < len; ++k) {
            const auto b = static_cast<unsigned char>(s[i + static_cast<std::size_t>(k)]);
            if ((b & 0xC0) != 0x80) {
                ++i;
                return 0xDC00u + b0;
            }
            cp = (cp << 6) | (b & 0x3F);
        }
        i += static_cast<std::size_t>(len);
        return cp;
    }

    enum class Cls { Space, Letter, Number, Other };
    static Cls classify(std::uint32_t cp) {
        if (cp == ' ' || cp == '\t' || cp == '\n' || cp == '\r' || cp == '\v' || cp == '\f' || cp == 0x85 ||
            cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
            cp == 0x202F || cp == 0x205F || cp == 0x3000)
            return Cls::Space;
        if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return Cls::Letter;
        if (cp >= '0' && cp <= '9') return Cls::Number;
        if (cp < 0xC0) return (cp == 0xAA || cp == 0xB5 || cp == 0xBA) ? Cls::Letter : Cls::Other;
        if (cp == 0xD7 || cp == 0xF7) return Cls::Other;
        if ((cp >= 0x2010 && cp <= 0x205E) || (cp >= 0x20A0 && cp <= 0x20CF) || (cp >= 0x2190 && cp <= 0x2BFF) ||
            (cp >= 0x3001 && cp <= 0x3003) || (cp >= 0xDC00 && cp <= 0xDCFF) || (cp >= 0x1F000 && cp <= 0x1FAFF) ||
            (cp >= 0xFE00 && cp <= 0xFE0F))
            return Cls::Other;
        return Cls::Letter;
    }

    // GPT-2 pattern over code points; appends the pieces of `s`.
    static void gpt2_split(std::string_view s, std::vector<std::string>& out) {
        if (s.empty()) return;
        std::vector<std::uint32_t> cps;
        std::vector<std::size_t> at;  // byte offset of each code point, plus the end
        for (std::size_t i = 0; i < s.size();) {
            at.push_back(i);
            cps.push_back(next_cp(s, i));
        }
        at.push_back(s.size());
        const std::size_t n = cps.size();
        auto cls = [&](std::size_t k) { return classify(cps[k]); };
        std::size_t i = 0;
        while (i < n) {
            std::size_t j = i;
            // contractions
            if (cps[i] == '\'' && i + 1 < n) {
                const std::uint32_t a = cps[i + 1], b = i + 2 < n ? cps[i + 2] : 0;
                if (a == 's' || a == 't' || a == 'm' || a == 'd')
                    j = i + 2;
                else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
                    j = i + 3;
            }
            if (j == i) {
                const std::size_t k = (cps[i] == ' ' && i + 1 < n) ? i + 1 : i;  // optional leading space
                const Cls c = cls(k);
                if (c != Cls::Space && (k == i + 1 || c != Cls::Space)) {
                    // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+'
                    j = k;
                    while (j < n && cls(j) == c) ++j;
                } else {
                    // whitespace: \s+(?!\S) then \s+
                    j = i;
                    while (j < n && cls(j) == Cls::Space) ++j;
                    if (j < n && j - i > 1) --j;  // leave the last space to prefix the next word
                }
            }
            out.emplace_back(s.substr(at[i], at[j] - at[i]));
            i = j;
        }
    }

    void init_byte_maps() {
        int extra = 0;
        for (int b = 0; b < 256; ++b) {
            const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
            const std::uint32_t cp =
                printable ? static_cast<std::uint32_t>(b) : static_cast<std::uint32_t>(256 + extra++);
            byte_to_unicode_[static_cast<std::size_t>(b)] = utf8(cp);
            unicode_to_byte_[cp] = static_cast<std::uint8_t>(b);
        }
    }

    void encode_plain(std::string_view text, std::vector<int>& out) const {
        if (text.empty()) return;
        for (const std::string& piece : pretokenize(text)) {
            std::vector<std::string> sym;
            sym.reserve(piece.size());
            for (unsigned char b : piece) sym.push_back(byte_to_unicode_[b]);
            while (sym.size() > 1) {
                int best = std::numeric_limits<int>::max();
                std::size_t best_at = 0;
                for (std::size_t k = 0; k + 1 < sym.size(); ++k) {
                    auto it = ranks_.find(sym[k] + " " + sym[k + 1]);
                    if (it != ranks_.end() && it->second < best) {
                        best = it->second;
                        best_at = k;
                    }
                }
                if (best == std::numeric_limits<int>::max()) break;
                sym[best_at] += sym[best_at + 1];
                sym.erase(sym.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
            }
            for (const std::string& s : sym) {
                const int id = find(s);
                if (id >= 0) {
                    out.push_back(id);
                    continue;
                }
                // not in the vocabulary: fall back to its single byte symbols
                std::size_t i = 0;
                while (i < s.size()) {
                    const std::size_t b = i;
                    next_cp(s, i);
                    const int bid = find(s.substr(b, i - b));
                    KVQ_CHECK(bid >= 0, "bpe tokenizer: byte symbol '", s.substr(b, i - b),
                              "' is not in the vocabulary");
                    out.push_back(bid);
                }
            }
        }
    }

    std::vector<std::string> tokens_;
    std::vector<std::int32_t> types_;
    int bos_, eos_;
    std::unordered_map<std::string, int> vocab_;
    std::unordered_map<std::string, int> ranks_;
    std::vector<int> specials_;
    std::string byte_to_unicode_[256];
    std::unordered_map<std::uint32_t, std::uint8_t> unicode_to_byte_;
};

}  // namespace kvq::io
