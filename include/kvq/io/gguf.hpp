#pragma once
// Reader for GGUF v3 files (the llama.cpp model format), over a byte buffer.
//
// Layout (little-endian): "GGUF" u32 version(3) u64 n_tensors u64 n_kv; n_kv metadata pairs
// (gguf string key, u32 value type, value); n_tensors tensor infos (string name, u32 n_dims,
// u64 ne[n_dims] (ne[0] is the contiguous dimension), u32 ggml type, u64 offset); padding to
// `general.alignment` (default 32); the tensor data, each tensor at data_start + offset.
// A gguf string is u64 length + bytes (no terminator); an array is u32 element type, u64 count,
// elements.
//
// The buffer is untrusted: every count is checked against the bytes that remain before anything is
// reserved (an element takes at least one byte, a string at least eight), tensor shapes are
// overflow-checked and every tensor's bytes must lie inside the buffer. Errors are kvq::Error.
//
// Dequantization supports F32, F16, Q4_0, Q4_1 and Q8_0 (ggml block layouts: block_q4_0 =
// fp16 d + 16 bytes of nibbles for 32 weights, y = (q - 8) d; block_q4_1 = fp16 d, fp16 m + 16 bytes,
// y = q d + m; block_q8_0 = fp16 d + 32 int8, y = q d; in the nibble blocks byte j holds weight j in
// its low nibble and weight j + 16 in its high nibble). SmolLM2-135M-Instruct.Q4_1.gguf uses F32,
// Q4_1 and Q8_0.
#include <bit>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/core/half.hpp"

namespace kvq::io {

static_assert(std::endian::native == std::endian::little, "GGUF is little-endian; kvq reads it with memcpy");

enum class GgufType : std::uint32_t {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
};

enum class GgmlType : std::uint32_t { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };

inline const char* ggml_type_name(std::uint32_t t) {
    switch (t) {
        case 0: return "F32";
        case 1: return "F16";
        case 2: return "Q4_0";
        case 3: return "Q4_1";
        case 8: return "Q8_0";
        default: return "unsupported";
    }
}

// Elements per block and bytes per block; {0, 0} for types kvq cannot read.
inline std::pair<std::uint64_t, std::uint64_t> ggml_block_layout(std::uint32_t t) {
    switch (t) {
        case 0: return {1, 4};
        case 1: return {1, 2};
        case 2: return {32, 18};
        case 3: return {32, 20};
        case 8: return {32, 34};
        default: return {0, 0};
    }
}

struct GgufValue {
    GgufType type = GgufType::U8;
    std::uint64_t u = 0;  // unsigned integers and bool
    std::int64_t i = 0;   // signed integers
    double f = 0.0;       // F32 / F64
    std::string s;        // String
    GgufType array_type = GgufType::U8;
    std::vector<GgufValue> array;  // Array elements

    bool is_integer() const {
        switch (type) {
            case GgufType::U8:
            case GgufType::U16:
            case GgufType::U32:
            case GgufType::U64:
            case GgufType::I8:
            case GgufType::I16:
            case GgufType::I32:
            case GgufType::I64: return true;
            default: return false;
        }
    }
    bool is_signed() const {
        return type == GgufType::I8 || type == GgufType::I16 || type == GgufType::I32 || type == GgufType::I64;
    }
};

struct GgufTensorInfo {
    std::string name;
    std::vector<std::uint64_t> ne;  // ne[0] contiguous
    std::uint32_t type = 0;
    std::uint64_t offset = 0;  // relative to the data section
    std::uint64_t n_elements = 0;
    std::uint64_t n_bytes = 0;
    std::uint64_t file_offset = 0;  // absolute, in the buffer
};

inline constexpr std::uint64_t kGgufMaxDims = 4;
inline constexpr std::size_t kGgufMaxDepth = 4;  // nested arrays
// Total metadata array elements over the whole file. Each becomes a GgufValue (~100 bytes), so this
// bounds the parsed metadata to ~200 MB whatever the file says; real vocabularies (tokens + merges +
// token types) stay far below it (SmolLM2: ~150 K, the largest known models: < 1 M).
inline constexpr std::uint64_t kGgufMaxArrayElements = std::uint64_t{1} << 21;

class GgufFile {
public:
    // Parses `bytes` (the whole file), taking ownership.
    explicit GgufFile(std::vector<std::uint8_t> bytes) : buf_(std::move(bytes)) { parse(); }

    static GgufFile load(const std::string& path) {
        std::ifstream in(path, std::ios::binary | std::ios::ate);
        KVQ_CHECK(in.good(), "gguf: cannot open '", path, "'");
        const std::streamoff n = in.tellg();
        KVQ_CHECK(n >= 0, "gguf: cannot size '", path, "'");
        std::vector<std::uint8_t> bytes(static_cast<std::size_t>(n));
        in.seekg(0);
        if (n > 0) in.read(reinterpret_cast<char*>(bytes.data()), n);
        KVQ_CHECK(in.good() || in.eof(), "gguf: read error on '", path, "'");
        return GgufFile(std::move(bytes));
    }

    std::uint32_t version() const { return version_; }
    std::uint64_t alignment() const { return alignment_; }
    std::uint64_t data_start() const { return data_start_; }
    const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
    const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
    std::span<const std::uint8_t> bytes() const { return buf_; }

    const GgufValue* find(const std::string& key) const {
        auto it = kv_index_.find(key);
        return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
    }
    bool has(const std::string& key) const { return find(key) != nullptr; }
    const GgufValue& get(const std::string& key) const {
        const GgufValue* v = find(key);
        KVQ_CHECK(v != nullptr, "gguf: missing metadata key '", key, "'");
        return *v;
    }
    std::uint64_t get_uint(const std::string& key) const {
        const GgufValue& v = get(key);
        KVQ_CHECK(v.is_integer(), "gguf: metadata '", key, "' is not an integer");
        if (v.is_signed()) {
            KVQ_CHECK(v.i >= 0, "gguf: metadata '", key, "' = ", v.i, " is negative");
            return static_cast<std::uint64_t>(v.i);
        }
        return v.u;
    }
    std::uint64_t get_uint(const std::string& key, std::uint64_t def) const { return has(key) ? get_uint(key) : def; }
    double get_float(const std::string& key) const {
        const GgufValue& v = get(key);
        if (v.type == GgufType::F32 || v.type == GgufType::F64) return v.f;
        KVQ_CHECK(v.is_integer(), "gguf: metadata '", key, "' is not a number");
        return v.is_signed() ? static_cast<double>(v.i) : static_cast<double>(v.u);
    }
    double get_float(const std::string& key, double def) const { return has(key) ? get_float(key) : def; }
    const std::string& get_string(const std::string& key) const {
        const GgufValue& v = get(key);
        KVQ_CHECK(v.type == GgufType::String, "gguf: metadata '", key, "' is not a string");
        return v.s;
    }
    std::vector<std::string> get_string_array(const std::string& key) const {
        const GgufValue& v = get(key);
        KVQ_CHECK(v.type == GgufType::Array && v.array_type == GgufType::String, "gguf: metadata '", key,
                  "' is not an array of strings");
        std::vector<std::string> out;
        out.reserve(v.array.size());
        for (const auto& e : v.array) out.push_back(e.s);
        return out;
    }

    const GgufTensorInfo* find_tensor(const std::string& name) const {
        auto it = tensor_index_.find(name);
        return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
    }
    const GgufTensorInfo& tensor(const std::string& name) const {
        const GgufTensorInfo* t = find_tensor(name);
        KVQ_CHECK(t != nullptr, "gguf: missing tensor '", name, "'");
        return *t;
    }
    std::span<const std::uint8_t> tensor_bytes(const GgufTensorInfo& t) const {
        return {buf_.data() + t.file_offset, static_cast<std::size_t>(t.n_bytes)};
    }
    std::vector<float> dequantize(const GgufTensorInfo& t) const;
    std::vector<float> dequantize(const std::string& name) const { return dequantize(tensor(name)); }

private:
    void need(std::uint64_t n, const char* what) const {
        KVQ_CHECK(n <= buf_.size() - pos_, "gguf: truncated file: ", what, " needs ", n, " bytes at offset ", pos_,
                  " but only ", buf_.size() - pos_, " remain");
    }
    template <class T>
    T rd(const char* what) {
        need(sizeof(T), what);
        T v;
        std::memcpy(&v, buf_.data() + pos_, sizeof(T));
        pos_ += sizeof(T);
        return v;
    }
    std::string rd_string(const char* what) {
        const std::uint64_t n = rd<std::uint64_t>(what);
        need(n, what);
        std::string s(reinterpret_cast<const char*>(buf_.data() + pos_), static_cast<std::size_t>(n));
        pos_ += static_cast<std::size_t>(n);
        return s;
    }
    static std::uint64_t min_value_bytes(GgufType t) {
        switch (t) {
            case GgufType::U8:
            case GgufType::I8:
            case GgufType::Bool: return 1;
            case GgufType::U16:
            case GgufType::I16: return 2;
            case GgufType::U32:
            case GgufType::I32:
            case GgufType::F32: return 4;
            case GgufType::U64:
            case GgufType::I64:
            case GgufType::F64:
            case GgufType::String: return 8;
            case GgufType::Array: return 12;
        }
        return 1;
    }
    GgufValue rd_value(GgufType t, std::size_t depth) {
        GgufValue v;
        v.type = t;
        switch (t) {
            case GgufType::U8: v.u = rd<std::uint8_t>("u8"); break;
            // NOLINTNEXTLINE(bugprone-signed-char-misuse): GGUF I8 is a signed integer, sign-extended on purpose
            case GgufType::I8: v.i = rd<std::int8_t>("i8"); break;
            case GgufType::U16: v.u = rd<std::uint16_t>("u16"); break;
            case GgufType::I16: v.i = rd<std::int16_t>("i16"); break;
            case GgufType::U32: v.u = rd<std::uint32_t>("u32"); break;
            case GgufType::I32: v.i = rd<std::int32_t>("i32"); break;
            case GgufType::U64: v.u = rd<std::uint64_t>("u64"); break;
            case GgufType::I64: v.i = rd<std::int64_t>("i64"); break;
            case GgufType::F32: v.f = rd<float>("f32"); break;
            case GgufType::F64: v.f = rd<double>("f64"); break;
            case GgufType::Bool: {
                const std::uint8_t b = rd<std::uint8_t>("bool");
                KVQ_CHECK(b <= 1, "gguf: bool value ", static_cast<int>(b), " at offset ", pos_ - 1);
                v.u = b;
                break;
            }
            case GgufType::String: v.s = rd_string("string"); break;
            case GgufType::Array: {
                KVQ_CHECK(depth < kGgufMaxDepth, "gguf: arrays nested deeper than ", kGgufMaxDepth);
                const std::uint32_t et = rd<std::uint32_t>("array type");
                KVQ_CHECK(et <= 12, "gguf: unknown array element type ", et);
                v.array_type = static_cast<GgufType>(et);
                const std::uint64_t n = rd<std::uint64_t>("array count");
                const std::uint64_t remain = buf_.size() - pos_;
                KVQ_CHECK(n <= remain / min_value_bytes(v.array_type), "gguf: array count ", n, " cannot fit in the ",
                          remain, " bytes that remain");
                KVQ_CHECK(n <= kGgufMaxArrayElements - array_elements_, "gguf: metadata arrays hold more than ",
                          kGgufMaxArrayElements, " elements in all");
                array_elements_ += n;
                v.array.reserve(static_cast<std::size_t>(n));
                for (std::uint64_t k = 0; k < n; ++k) v.array.push_back(rd_value(v.array_type, depth + 1));
                break;
            }
            default: KVQ_THROW("gguf: unknown value type ", static_cast<std::uint32_t>(t));
        }
        return v;
    }

    void parse() {
        KVQ_CHECK(buf_.size() >= 24, "gguf: file of ", buf_.size(), " bytes is too short for a header");
        KVQ_CHECK(std::memcmp(buf_.data(), "GGUF", 4) == 0, "gguf: bad magic (not a GGUF file)");
        pos_ = 4;
        version_ = rd<std::uint32_t>("version");
        KVQ_CHECK(version_ == 3, "gguf: version ", version_, " is not supported (only 3)");
        const std::uint64_t n_tensors = rd<std::uint64_t>("tensor count");
        const std::uint64_t n_kv = rd<std::uint64_t>("metadata count");
        // A pair takes >= 8 (key) + 4 (type) + 1 bytes; a tensor info >= 8 + 4 + 4 + 8.
        KVQ_CHECK(n_kv <= (buf_.size() - pos_) / 13, "gguf: metadata count ", n_kv, " is absurd for a file of ",
                  buf_.size(), " bytes");
        KVQ_CHECK(n_tensors <= (buf_.size() - pos_) / 24, "gguf: tensor count ", n_tensors, " is absurd for a file of ",
                  buf_.size(), " bytes");
        kv_.reserve(static_cast<std::size_t>(n_kv));
        for (std::uint64_t k = 0; k < n_kv; ++k) {
            std::string key = rd_string("metadata key");
            const std::uint32_t t = rd<std::uint32_t>("metadata type");
            KVQ_CHECK(t <= 12, "gguf: metadata '", key, "' has unknown type ", t);
            GgufValue v = rd_value(static_cast<GgufType>(t), 0);
            KVQ_CHECK(kv_index_.count(key) == 0, "gguf: duplicate metadata key '", key, "'");
            kv_index_[key] = kv_.size();
            kv_.emplace_back(std::move(key), std::move(v));
        }
        alignment_ = 32;
        if (const GgufValue* a = find("general.alignment")) {
            KVQ_CHECK(a->type == GgufType::U32, "gguf: general.alignment must be a u32");
            alignment_ = a->u;
            KVQ_CHECK(alignment_ > 0 && alignment_ <= (1u << 20) && (alignment_ & (alignment_ - 1)) == 0,
                      "gguf: general.alignment = ", alignment_, " is not a power of two in [1, 2^20]");
        }
        tensors_.reserve(static_cast<std::size_t>(n_tensors));
        for (std::uint64_t k = 0; k < n_tensors; ++k) {
            GgufTensorInfo t;
            t.name = rd_string("tensor name");
            const std::uint32_t nd = rd<std::uint32_t>("tensor n_dims");
            KVQ_CHECK(nd >= 1 && nd <= kGgufMaxDims, "gguf: tensor '", t.name, "' has ", nd, " dimensions");
            t.n_elements = 1;
            for (std::uint32_t d = 0; d < nd; ++d) {
                const std::uint64_t e = rd<std::uint64_t>("tensor dim");
                KVQ_CHECK(e >= 1 && e <= (std::uint64_t{1} << 40), "gguf: tensor '", t.name, "' dim ", d, " = ", e);
                KVQ_CHECK(t.n_elements <= (std::uint64_t{1} << 42) / e, "gguf: tensor '", t.name,
                          "' has too many elements");
                t.n_elements *= e;
                t.ne.push_back(e);
            }
            t.type = rd<std::uint32_t>("tensor type");
            t.offset = rd<std::uint64_t>("tensor offset");
            const auto [blk, bytes] = ggml_block_layout(t.type);
            KVQ_CHECK(blk != 0, "gguf: tensor '", t.name, "' has ggml type ", t.type,
                      " which kvq cannot read (supported: F32, F16, Q4_0, Q4_1, Q8_0)");
            KVQ_CHECK(t.ne[0] % blk == 0, "gguf: tensor '", t.name, "' row of ", t.ne[0],
                      " elements is not a whole number of ", blk, "-element blocks");
            t.n_bytes = t.n_elements / blk * bytes;
            KVQ_CHECK(t.offset % alignment_ == 0, "gguf: tensor '", t.name, "' offset ", t.offset,
                      " is not aligned to ", alignment_);
            KVQ_CHECK(tensor_index_.count(t.name) == 0, "gguf: duplicate tensor '", t.name, "'");
            tensor_index_[t.name] = tensors_.size();
            tensors_.push_back(std::move(t));
        }
        // Data section: the next multiple of the alignment.
        const std::uint64_t pad = (alignment_ - pos_ % alignment_) % alignment_;
        data_start_ = pos_ + pad;
        KVQ_CHECK(tensors_.empty() || data_start_ <= buf_.size(), "gguf: data section starts at ", data_start_,
                  " past the end of the ", buf_.size(), "-byte file");
        for (auto& t : tensors_) {
            const std::uint64_t avail = buf_.size() - std::min<std::uint64_t>(data_start_, buf_.size());
            KVQ_CHECK(t.offset <= avail && t.n_bytes <= avail - t.offset, "gguf: tensor '", t.name, "' (", t.n_bytes,
                      " bytes at data offset ", t.offset, ") runs past the end of the file (", avail, " data bytes)");
            t.file_offset = data_start_ + t.offset;
        }
    }

    std::vector<std::uint8_t> buf_;
    std::size_t pos_ = 0;
    std::uint64_t array_elements_ = 0;
    std::uint32_t version_ = 0;
    std::uint64_t alignment_ = 32;
    std::uint64_t data_start_ = 0;
    std::vector<std::pair<std::string, GgufValue>> kv_;
    std::map<std::string, std::size_t> kv_index_;
    std::vector<GgufTensorInfo> tensors_;
    std::map<std::string, std::size_t> tensor_index_;
};

namespace detail {
inline float gguf_half(const std::uint8_t* p) {
    half_t h;
    std::memcpy(&h.bits, p, 2);
    return half_to_float(h);
}
}  // namespace detail

// Dequantizes `n` elements of ggml type `type` from `src` (n must be a whole number of blocks).
inline void ggml_dequantize(std::uint32_t type, const std::uint8_t* src, std::uint64_t n, float* dst) {
    using detail::gguf_half;
    switch (type) {
        case 0: std::memcpy(dst, src, n * 4); return;
        case 1:
            for (std::uint64_t i = 0; i < n; ++i) dst[i] = gguf_half(src + 2 * i);
            return;
        case 2:  // Q4_0
            for (std::uint64_t b = 0; b < n / 32; ++b, src += 18, dst += 32) {
                const float d = gguf_half(src);
                for (int j = 0; j < 16; ++j) {
                    dst[j] = static_cast<float>((src[2 + j] & 0x0F) - 8) * d;
                    dst[j + 16] = static_cast<float>((src[2 + j] >> 4) - 8) * d;
                }
            }
            return;
        case 3:  // Q4_1
            for (std::uint64_t b = 0; b < n / 32; ++b, src += 20, dst += 32) {
                const float d = gguf_half(src), m = gguf_half(src + 2);
                for (int j = 0; j < 16; ++j) {
                    dst[j] = static_cast<float>(src[4 + j] & 0x0F) * d + m;
                    dst[j + 16] = static_cast<float>(src[4 + j] >> 4) * d + m;
                }
            }
            return;
        case 8:  // Q8_0
            for (std::uint64_t b = 0; b < n / 32; ++b, src += 34, dst += 32) {
                const float d = gguf_half(src);
                for (int j = 0; j < 32; ++j) dst[j] = static_cast<float>(static_cast<std::int8_t>(src[2 + j])) * d;
            }
            return;
        default: KVQ_THROW("gguf: cannot dequantize ggml type ", type);
    }
}

inline std::vector<float> GgufFile::dequantize(const GgufTensorInfo& t) const {
    std::vector<float> out(static_cast<std::size_t>(t.n_elements));  // bounded by the file size (checked)
    ggml_dequantize(t.type, buf_.data() + t.file_offset, t.n_elements, out.data());
    return out;
}

// ---- a small writer (tests, fuzz seeds, tools) ----

class GgufWriter {
public:
    void add_u32(const std::string& key, std::uint32_t v) {
        kv_head(key, GgufType::U32), put(v);
        ++n_kv_;
    }
    void add_i32(const std::string& key, std::int32_t v) {
        kv_head(key, GgufType::I32), put(v);
        ++n_kv_;
    }
    void add_u64(const std::string& key, std::uint64_t v) {
        kv_head(key, GgufType::U64), put(v);
        ++n_kv_;
    }
    void add_f32(const std::string& key, float v) {
        kv_head(key, GgufType::F32), put(v);
        ++n_kv_;
    }
    void add_bool(const std::string& key, bool v) {
        kv_head(key, GgufType::Bool), put<std::uint8_t>(v);
        ++n_kv_;
    }
    void add_string(const std::string& key, const std::string& v) {
        kv_head(key, GgufType::String), str(v);
        ++n_kv_;
    }
    void add_string_array(const std::string& key, const std::vector<std::string>& v) {
        kv_head(key, GgufType::Array);
        put(static_cast<std::uint32_t>(GgufType::String));
        put<std::uint64_t>(v.size());
        for (const auto& s : v) str(s);
        ++n_kv_;
    }
    template <class T>
    void add_array(const std::string& key, GgufType et, const std::vector<T>& v) {
        kv_head(key, GgufType::Array);
        put(static_cast<std::uint32_t>(et));
        put<std::uint64_t>(v.size());
        for (const auto& x : v) put(x);
        ++n_kv_;
    }
    // Raw tensor: `data` holds the encoded bytes of type `type`.
    void add_tensor(const std::string& name, std::vector<std::uint64_t> ne, std::uint32_t type,
                    std::vector<std::uint8_t> data) {
        tensors_.push_back({name, std::move(ne), type, std::move(data)});
    }
    std::vector<std::uint8_t> finish(std::uint64_t alignment = 32) const {
        std::vector<std::uint8_t> out;
        auto app = [&](const void* p, std::size_t n) {
            const auto* b = static_cast<const std::uint8_t*>(p);
            out.insert(out.end(), b, b + n);
        };
        app("GGUF", 4);
        const std::uint32_t version = 3;
        app(&version, 4);
        const std::uint64_t nt = tensors_.size();
        app(&nt, 8);
        app(&n_kv_, 8);
        out.insert(out.end(), kv_.begin(), kv_.end());
        std::uint64_t off = 0;
        std::vector<std::uint64_t> offs;
        for (const auto& t : tensors_) {
            const std::uint64_t n = t.name.size();
            app(&n, 8);
            app(t.name.data(), t.name.size());
            const std::uint32_t nd = static_cast<std::uint32_t>(t.ne.size());
            app(&nd, 4);
            for (auto e : t.ne) app(&e, 8);
            app(&t.type, 4);
            app(&off, 8);
            offs.push_back(off);
            off += (t.data.size() + alignment - 1) / alignment * alignment;
        }
        while (out.size() % alignment) out.push_back(0);
        const std::size_t base = out.size();
        for (std::size_t i = 0; i < tensors_.size(); ++i) {
            out.resize(base + offs[i]);
            app(tensors_[i].data.data(), tensors_[i].data.size());
        }
        return out;
    }

private:
    struct T {
        std::string name;
        std::vector<std::uint64_t> ne;
        std::uint32_t type;
        std::vector<std::uint8_t> data;
    };
    template <class V>
    void put(V v) {
        const auto* b = reinterpret_cast<const std::uint8_t*>(&v);
        kv_.insert(kv_.end(), b, b + sizeof(V));
    }
    void str(const std::string& s) {
        put<std::uint64_t>(s.size());
        kv_.insert(kv_.end(), s.begin(), s.end());
    }
    void kv_head(const std::string& key, GgufType t) {
        str(key);
        put(static_cast<std::uint32_t>(t));
    }
    std::vector<std::uint8_t> kv_;
    std::uint64_t n_kv_ = 0;
    std::vector<T> tensors_;
};

}  // namespace kvq::io
