#pragma once
// Tokenizer in llama2.c's tokenizer.bin format (e.g. tok512.bin), with llama2.c's encode/decode
// rules, so that token ids match what llama2.c's run.c produces for the same text.
//
// Format (little-endian): int32 max_token_length, then for each id in [0, vocab_size):
//   float32 score, int32 len, len raw bytes (no terminator).
// vocab_size is not stored; it comes from the model config. The file must hold exactly that many
// entries (trailing bytes mean the caller's vocab_size and the file disagree).
//
// Conventions inherited from SentencePiece/llama2.c: id 1 = BOS, id 2 = EOS, ids 3..258 are the
// byte-fallback pieces "<0x00>".."<0xFF>", merges store a leading space as a real ' '.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/io/llama2c.hpp"  // read_file_bytes

namespace kvq::io {

class Llama2cTokenizer {
public:
    static constexpr int kBos = 1;
    static constexpr int kEos = 2;
    static constexpr int kByteFallbackOffset = 3;  // id of "<0x00>"
    // Pieces are short by construction (a BPE merge of a few bytes); this bound only keeps a
    // corrupted header from describing absurd pieces.
    static constexpr std::int32_t kMaxTokenLengthLimit = 1 << 16;

    Llama2cTokenizer(std::span<const std::uint8_t> bytes, int vocab_size) {
        KVQ_CHECK(vocab_size > 0 && vocab_size <= kLlama2cMaxVocab, "llama2c tokenizer: vocab_size = ", vocab_size,
                  " is outside [1, ", kLlama2cMaxVocab, "]");
        KVQ_CHECK(bytes.size() >= 4, "llama2c tokenizer: file too short for max_token_length: ", bytes.size(),
                  " bytes");
        std::size_t off = 0;
        auto read_i32 = [&](const char* what, int id) {
            KVQ_CHECK(bytes.size() - off >= 4, "llama2c tokenizer: truncated at byte ", off, " reading ", what,
                      " of id ", id, " (vocab_size = ", vocab_size, ")");
            std::int32_t v;
            std::memcpy(&v, bytes.data() + off, 4);
            off += 4;
            return v;
        };
        max_token_length_ = read_i32("max_token_length", -1);
        KVQ_CHECK(max_token_length_ > 0 && max_token_length_ <= kMaxTokenLengthLimit,
                  "llama2c tokenizer: max_token_length = ", max_token_length_, " is outside [1, ", kMaxTokenLengthLimit,
                  "]");
        // Each entry takes at least 8 bytes: reject an impossible vocab before reserving memory.
        KVQ_CHECK(static_cast<std::uint64_t>(vocab_size) * 8 <= bytes.size() - off, "llama2c tokenizer: ", bytes.size(),
                  " bytes cannot hold ", vocab_size, " entries");
        pieces_.reserve(static_cast<std::size_t>(vocab_size));
        scores_.reserve(static_cast<std::size_t>(vocab_size));
        for (int id = 0; id < vocab_size; ++id) {
            float score;
            const std::int32_t s_bits = read_i32("score", id);
            std::memcpy(&score, &s_bits, 4);
            KVQ_CHECK(std::isfinite(score), "llama2c tokenizer: score of id ", id, " is ", score);
            const std::int32_t len = read_i32("length", id);
            KVQ_CHECK(len >= 0 && len <= max_token_length_, "llama2c tokenizer: length of id ", id, " = ", len,
                      " is outside [0, max_token_length = ", max_token_length_, "]");
            KVQ_CHECK(static_cast<std::size_t>(len) <= bytes.size() - off, "llama2c tokenizer: length of id ", id,
                      " = ", len, " exceeds the ", bytes.size() - off, " remaining bytes");
            pieces_.emplace_back(reinterpret_cast<const char*>(bytes.data() + off), static_cast<std::size_t>(len));
            scores_.push_back(score);
            off += static_cast<std::size_t>(len);
        }
        KVQ_CHECK(off == bytes.size(), "llama2c tokenizer: ", bytes.size() - off, " trailing bytes after ", vocab_size,
                  " entries (vocab_size mismatch with the file?)");
        // First id wins on duplicate pieces, like llama2.c's original linear str_lookup.
        lookup_.reserve(pieces_.size());
        for (int id = 0; id < vocab_size; ++id) lookup_.emplace(pieces_[static_cast<std::size_t>(id)], id);
    }

    int vocab_size() const { return static_cast<int>(pieces_.size()); }
    int max_token_length() const { return max_token_length_; }
    const std::string& piece(int id) const { return pieces_.at(checked_id(id)); }
    float score(int id) const { return scores_.at(checked_id(id)); }

    // Id of an exact piece, or -1.
    int find(std::string_view piece) const {
        auto it = lookup_.find(std::string(piece));
        return it == lookup_.end() ? -1 : it->second;
    }

    // Text for `id` when it follows `prev` (pass -1 when there is no previous token).
    // llama2.c rules: SentencePiece strips the leading space of the first piece after BOS, and
    // a byte-fallback piece "<0xXX>" stands for the raw byte XX.
    std::string decode(int id, int prev = -1) const {
        std::string_view p = piece(id);
        if (prev == kBos && !p.empty() && p.front() == ' ') p.remove_prefix(1);
        if (int byte = parse_byte_piece(p); byte >= 0) return std::string(1, static_cast<char>(byte));
        return std::string(p);
    }

    // Concatenated decode of a sequence; `prev` is the token preceding tokens[0].
    std::string decode(std::span<const int> tokens, int prev = -1) const {
        std::string out;
        for (int t : tokens) {
            out += decode(t, prev);
            prev = t;
        }
        return out;
    }

    // llama2.c's encode: optional BOS, a dummy " " prefix when the text is non-empty (SentencePiece's
    // add_dummy_prefix), one piece per UTF-8 codepoint (byte-fallback ids for unknown codepoints),
    // then greedily merge the adjacent pair whose merged piece has the highest score until none
    // exists; optional EOS.
    std::vector<int> encode(std::string_view text, bool bos, bool eos) const {
        std::vector<int> tokens;
        tokens.reserve(text.size() + 3);
        if (bos) tokens.push_back(kBos);
        if (!text.empty()) {
            const int space = find(" ");
            KVQ_CHECK(space >= 0, "llama2c tokenizer: vocabulary has no \" \" piece for the dummy prefix");
            tokens.push_back(space);
        }
        // Codepoints: a lead byte (not 10xxxxxx) starts a new one; at most 4 bytes are grouped, as
        // llama2.c does (it does not validate UTF-8; malformed runs simply fall back to bytes).
        std::string cp;
        for (std::size_t i = 0; i < text.size(); ++i) {
            const auto c = static_cast<unsigned char>(text[i]);
            if ((c & 0xC0) != 0x80) cp.clear();
            cp.push_back(static_cast<char>(c));
            const bool next_is_continuation =
                i + 1 < text.size() && (static_cast<unsigned char>(text[i + 1]) & 0xC0) == 0x80;
            if (next_is_continuation && cp.size() < 4) continue;
            if (int id = find(cp); id >= 0) {
                tokens.push_back(id);
            } else {
                for (unsigned char b : cp) {
                    const int byte_id = b + kByteFallbackOffset;
                    KVQ_CHECK(byte_id < vocab_size(), "llama2c tokenizer: byte-fallback id ", byte_id, " for byte ",
                              static_cast<int>(b), " is outside vocab_size ", vocab_size());
                    tokens.push_back(byte_id);
                }
            }
            cp.clear();
        }
        // Like llama2.c, the merge scan covers BOS too ("\n<s>\n" + anything is not a piece in
        // practice); the dummy prefix merges with the first word.
        merge_pairs(tokens);
        if (eos) tokens.push_back(kEos);
        return tokens;
    }

private:
    std::size_t checked_id(int id) const {
        KVQ_CHECK(id >= 0 && id < vocab_size(), "llama2c tokenizer: token id ", id, " is outside [0, ", vocab_size(),
                  ")");
        return static_cast<std::size_t>(id);
    }

    // "<0xXX>" (exactly, hex upper or lower) -> XX, else -1.
    static int parse_byte_piece(std::string_view p) {
        if (p.size() != 6 || p.substr(0, 3) != "<0x" || p[5] != '>') return -1;
        auto hex = [](char ch) {
            if (ch >= '0' && ch <= '9') return ch - '0';
            if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
            if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
            return -1;
        };
        const int hi = hex(p[3]), lo = hex(p[4]);
        return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
    }

    void merge_pairs(std::vector<int>& tokens) const {
        // Same tie-breaking as llama2.c: strictly greater score wins, so the leftmost pair among
        // equals; scores at or below -1e10 never merge. Each merge shortens the sequence, so this
        // terminates after at most tokens.size() rounds.
        std::string buf;
        for (;;) {
            float best_score = -1e10f;
            int best_id = -1;
            std::size_t best_idx = 0;
            for (std::size_t i = 0; i + 1 < tokens.size(); ++i) {
                buf = pieces_[static_cast<std::size_t>(tokens[i])];
                buf += pieces_[static_cast<std::size_t>(tokens[i + 1])];
                const int id = find(buf);
                if (id >= 0 && scores_[static_cast<std::size_t>(id)] > best_score) {
                    best_score = scores_[static_cast<std::size_t>(id)];
                    best_id = id;
                    best_idx = i;
                }
            }
            if (best_id < 0) return;
            tokens[best_idx] = best_id;
            tokens.erase(tokens.begin() + static_cast<std::ptrdiff_t>(best_idx) + 1);
        }
    }

    std::int32_t max_token_length_ = 0;
    std::vector<std::string> pieces_;
    std::vector<float> scores_;
    std::unordered_map<std::string, int> lookup_;
};

inline Llama2cTokenizer parse_llama2c_tokenizer(std::span<const std::uint8_t> bytes, int vocab_size) {
    return Llama2cTokenizer(bytes, vocab_size);
}
inline Llama2cTokenizer load_llama2c_tokenizer(const std::string& path, int vocab_size) {
    return Llama2cTokenizer(read_file_bytes(path), vocab_size);
}

}  // namespace kvq::io
