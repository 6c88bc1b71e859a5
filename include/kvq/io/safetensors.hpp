#pragma once
// safetensors reader and writer: how kvq exchanges tensors (calibration data, codebooks, captured
// KV activations) with PyTorch / Hugging Face tooling.
//
// Layout: 8-byte little-endian header length N, N bytes of JSON mapping tensor name ->
// {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data buffer that follows)
// plus an optional "__metadata__" object of strings, then the data buffer.
//
// The reader treats the file as hostile: every field is checked before it is used, every size
// is overflow-checked and bounded by the bytes actually present, so a corrupt or malicious file
// yields a kvq::Error rather than a crash or a huge allocation. Holes between tensors are
// tolerated (other writers align data); overlapping tensors are not.
#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>  // getpid, fsync

#include "kvq/core/error.hpp"
#include "kvq/core/half.hpp"
#include "kvq/io/json.hpp"

namespace kvq::io {

enum class Dtype { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

// Same cap as the reference implementation: no legitimate header comes close.
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;
// Bounds the parsed header's memory (~40 bytes per JSON value) independently of its byte size;
// a tensor entry needs about 8 values, so this still allows ~500k tensors.
inline constexpr std::size_t kMaxHeaderValues = std::size_t{1} << 22;

inline std::string_view dtype_name(Dtype d) {
    constexpr std::string_view names[] = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"};
    return names[static_cast<int>(d)];
}

inline std::size_t dtype_size(Dtype d) {
    constexpr std::size_t sizes[] = {8, 4, 2, 2, 8, 4, 2, 1, 1, 1};
    return sizes[static_cast<int>(d)];
}

inline Dtype dtype_from_name(std::string_view s) {
    for (int i = 0; i <= static_cast<int>(Dtype::BOOL); ++i)
        if (dtype_name(static_cast<Dtype>(i)) == s) return static_cast<Dtype>(i);
    KVQ_THROW("safetensors: unknown dtype \"", json::detail::preview(s), "\"");
}

inline std::string shape_str(const std::vector<std::int64_t>& shape) {
    std::ostringstream os;
    os << '[';
    for (std::size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
    os << ']';
    return os.str();
}

struct TensorInfo {
    std::string name;
    Dtype dtype = Dtype::F32;
    std::vector<std::int64_t> shape;
    std::uint64_t begin = 0;  // byte range [begin, end) in the data buffer after the header
    std::uint64_t end = 0;

    // Exact for shapes the reader accepted; a zero dim short-circuits so that the other dims,
    // which may be huge, are never multiplied.
    std::int64_t numel() const {
        if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
        std::uint64_t n = 1;
        for (std::int64_t d : shape) n *= static_cast<std::uint64_t>(d);
        return static_cast<std::int64_t>(n);
    }
    std::uint64_t nbytes() const { return end - begin; }
};

namespace detail {

// Product of the dims; throws naming the tensor on a negative dim or if the product (or its
// size in bytes) does not fit, so later arithmetic on it cannot wrap.
inline std::uint64_t checked_numel(std::string_view name, const std::vector<std::int64_t>& shape, std::size_t elem) {
    for (std::int64_t d : shape)
        KVQ_CHECK(d >= 0, "safetensors: negative dimension ", d, " in shape ", shape_str(shape), " of tensor \"",
                  json::detail::preview(name), "\"");
    if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
    const std::uint64_t max = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) / elem;
    std::uint64_t n = 1;
    for (std::int64_t d : shape) {
        KVQ_CHECK(static_cast<std::uint64_t>(d) <= max / n, "safetensors: shape ", shape_str(shape), " of tensor \"",
                  json::detail::preview(name), "\" overflows: its size in bytes exceeds 2^63 - 1");
        n *= static_cast<std::uint64_t>(d);
    }
    return n;
}

inline std::uint64_t load_le(const std::uint8_t* p, int bytes) {
    std::uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
    return v;
}

inline std::string json_ints(const std::vector<std::int64_t>& v) {
    std::string out = "[";
    for (std::size_t i = 0; i < v.size(); ++i) out += (i ? "," : "") + std::to_string(v[i]);
    return out + "]";
}

inline void store_le(std::vector<std::uint8_t>& out, std::uint64_t v, int bytes) {
    for (int i = 0; i < bytes; ++i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}

// The message of e without the "kvq: " prefix and " [function]" suffix, so that a wrapping
// error does not repeat them.
inline std::string inner_message(const Error& e) {
    std::string_view m = e.what();
    if (m.substr(0, 5) == "kvq: ") m.remove_prefix(5);
    const std::size_t at = m.rfind(" [");
    if (!m.empty() && m.back() == ']' && at != std::string_view::npos) m = m.substr(0, at);
    return std::string(m);
}

}  // namespace detail

class SafetensorsFile {
public:
    static SafetensorsFile load(const std::string& path) {
        std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
        KVQ_CHECK(f != nullptr, "safetensors: cannot open \"", path, "\": ", std::strerror(errno));
        std::vector<std::uint8_t> bytes;
        std::uint8_t buf[1 << 16];
        std::size_t got;
        while ((got = std::fread(buf, 1, sizeof buf, f.get())) > 0) bytes.insert(bytes.end(), buf, buf + got);
        KVQ_CHECK(!std::ferror(f.get()), "safetensors: error reading \"", path, "\": ", std::strerror(errno));
        try {
            return parse(std::move(bytes));
        } catch (const Error& e) {
            KVQ_THROW("\"", path, "\": ", detail::inner_message(e));
        }
    }

    static SafetensorsFile parse(std::vector<std::uint8_t> bytes) {
        SafetensorsFile f;
        f.bytes_ = std::move(bytes);
        const std::size_t size = f.bytes_.size();
        KVQ_CHECK(size >= 8, "safetensors: file is ", size, " bytes, shorter than the 8-byte header length");
        const std::uint64_t n = detail::load_le(f.bytes_.data(), 8);
        KVQ_CHECK(n <= kMaxHeaderBytes, "safetensors: header length ", n, " exceeds the limit of ", kMaxHeaderBytes,
                  " bytes");
        KVQ_CHECK(n <= size - 8, "safetensors: header length ", n, " is larger than the ", size - 8,
                  " bytes after the length field");
        f.data_start_ = 8 + static_cast<std::size_t>(n);
        const std::string_view text(reinterpret_cast<const char*>(f.bytes_.data() + 8), static_cast<std::size_t>(n));
        json::Value root;
        try {
            root = json::parse(text, json::Limits{64, kMaxHeaderValues});
        } catch (const Error& e) {
            KVQ_THROW("safetensors: header is not valid JSON (offsets relative to the header at file byte 8): ",
                      detail::inner_message(e));
        }
        KVQ_CHECK(root.is_object(), "safetensors: header must be a JSON object, got ", json::type_name(root.type()));
        for (const json::Member& m : root.as_object()) {
            if (m.key == "__metadata__") {
                f.read_metadata(m.value);
            } else {
                f.add_entry(m.key, m.value);
            }
        }
        f.check_overlaps();
        return f;
    }

    bool has(std::string_view name) const { return tensors_.find(name) != tensors_.end(); }

    const TensorInfo& info(std::string_view name) const {
        auto it = tensors_.find(name);
        KVQ_CHECK(it != tensors_.end(), "safetensors: no tensor named \"", json::detail::preview(name),
                  "\" (the file has ", tensors_.size(), " tensors)");
        return it->second;
    }

    // Sorted by name.
    std::vector<std::string> names() const {
        std::vector<std::string> out;
        out.reserve(tensors_.size());
        for (const auto& kv : tensors_) out.push_back(kv.first);
        return out;
    }

    std::size_t size() const { return tensors_.size(); }
    const std::map<std::string, std::string>& metadata() const { return metadata_; }

    // The tensor's raw little-endian bytes.
    std::span<const std::uint8_t> raw(std::string_view name) const {
        const TensorInfo& t = info(name);
        return {bytes_.data() + data_start_ + t.begin, static_cast<std::size_t>(t.nbytes())};
    }

    // Elements converted to float; F32, F16 and BF16 only, since silently widening integer or
    // narrowing F64 data is more often a caller mistake than an intent.
    std::vector<float> read_f32(std::string_view name) const {
        const TensorInfo& t = info(name);
        const std::uint8_t* p = bytes_.data() + data_start_ + t.begin;
        const std::size_t n = static_cast<std::size_t>(t.nbytes() / dtype_size(t.dtype));
        std::vector<float> out(n);
        switch (t.dtype) {
            case Dtype::F32:
                for (std::size_t i = 0; i < n; ++i)
                    out[i] = bits_float(static_cast<std::uint32_t>(detail::load_le(p + 4 * i, 4)));
                break;
            case Dtype::F16:
                for (std::size_t i = 0; i < n; ++i)
                    out[i] = half_to_float(half_t{static_cast<std::uint16_t>(detail::load_le(p + 2 * i, 2))});
                break;
            case Dtype::BF16:
                for (std::size_t i = 0; i < n; ++i)
                    out[i] = bf16_to_float(bf16_t{static_cast<std::uint16_t>(detail::load_le(p + 2 * i, 2))});
                break;
            default:
                KVQ_THROW("safetensors: tensor \"", json::detail::preview(name), "\" has dtype ", dtype_name(t.dtype),
                          "; read_f32 supports only F32, F16 and BF16");
        }
        return out;
    }

    std::vector<float> read_f32(std::string_view name, const std::vector<std::int64_t>& expected_shape) const {
        const TensorInfo& t = info(name);
        KVQ_CHECK(t.shape == expected_shape, "safetensors: tensor \"", json::detail::preview(name), "\" has shape ",
                  shape_str(t.shape), ", expected ", shape_str(expected_shape));
        return read_f32(name);
    }

private:
    SafetensorsFile() = default;

    std::uint64_t data_size() const { return bytes_.size() - data_start_; }

    void read_metadata(const json::Value& v) {
        KVQ_CHECK(v.is_object(), "safetensors: \"__metadata__\" must be an object, got ", json::type_name(v.type()));
        for (const json::Member& m : v.as_object()) {
            KVQ_CHECK(m.value.is_string(), "safetensors: metadata value for key \"", json::detail::preview(m.key),
                      "\" must be a string, got ", json::type_name(m.value.type()));
            metadata_.emplace(m.key, m.value.as_string());
        }
    }

    void add_entry(const std::string& name, const json::Value& v) {
        const std::string q = "\"" + json::detail::preview(name) + "\"";
        KVQ_CHECK(v.is_object(), "safetensors: entry ", q, " must be an object, got ", json::type_name(v.type()));
        const json::Value *dtype = nullptr, *shape = nullptr, *offsets = nullptr;
        for (const json::Member& m : v.as_object()) {
            if (m.key == "dtype")
                dtype = &m.value;
            else if (m.key == "shape")
                shape = &m.value;
            else if (m.key == "data_offsets")
                offsets = &m.value;
            else
                KVQ_THROW("safetensors: entry ", q, " has unknown field \"", json::detail::preview(m.key), "\"");
        }
        KVQ_CHECK(dtype, "safetensors: entry ", q, " is missing field \"dtype\"");
        KVQ_CHECK(shape, "safetensors: entry ", q, " is missing field \"shape\"");
        KVQ_CHECK(offsets, "safetensors: entry ", q, " is missing field \"data_offsets\"");
        KVQ_CHECK(dtype->is_string(), "safetensors: field \"dtype\" of ", q, " must be a string, got ",
                  json::type_name(dtype->type()));
        KVQ_CHECK(shape->is_array(), "safetensors: field \"shape\" of ", q, " must be an array, got ",
                  json::type_name(shape->type()));
        KVQ_CHECK(offsets->is_array(), "safetensors: field \"data_offsets\" of ", q, " must be an array, got ",
                  json::type_name(offsets->type()));

        TensorInfo t;
        t.name = name;
        try {
            t.dtype = dtype_from_name(dtype->as_string());
        } catch (const Error& e) {
            KVQ_THROW(detail::inner_message(e), " for tensor ", q);
        }
        for (const json::Value& d : shape->as_array()) {
            KVQ_CHECK(d.is_int(), "safetensors: shape of ", q, " must contain integers, got ",
                      json::type_name(d.type()));
            t.shape.push_back(d.as_int());
        }
        const std::uint64_t numel = detail::checked_numel(name, t.shape, dtype_size(t.dtype));

        const json::Array& off = offsets->as_array();
        KVQ_CHECK(off.size() == 2, "safetensors: data_offsets of ", q, " must be [begin, end], got ", off.size(),
                  " elements");
        for (const json::Value& o : off) {
            KVQ_CHECK(o.is_int(), "safetensors: data_offsets of ", q, " must be integers, got ",
                      json::type_name(o.type()));
            KVQ_CHECK(o.as_int() >= 0, "safetensors: negative data offset ", o.as_int(), " for tensor ", q);
        }
        t.begin = static_cast<std::uint64_t>(off[0].as_int());
        t.end = static_cast<std::uint64_t>(off[1].as_int());
        KVQ_CHECK(t.begin <= t.end, "safetensors: data_offsets [", t.begin, ", ", t.end, "] of ", q,
                  " have begin > end");
        KVQ_CHECK(t.end <= data_size(), "safetensors: data_offsets end ", t.end, " of ", q,
                  " is beyond the data buffer of ", data_size(), " bytes");
        const std::uint64_t need = numel * dtype_size(t.dtype);
        KVQ_CHECK(t.end - t.begin == need, "safetensors: tensor ", q, " has ", t.end - t.begin,
                  " bytes in data_offsets but dtype ", dtype_name(t.dtype), " and shape ", shape_str(t.shape), " need ",
                  need, " bytes");
        tensors_.emplace(name, std::move(t));
    }

    void check_overlaps() const {
        std::vector<const TensorInfo*> order;
        for (const auto& kv : tensors_)
            if (kv.second.nbytes() > 0) order.push_back(&kv.second);  // an empty range overlaps nothing
        std::sort(order.begin(), order.end(),
                  [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
        for (std::size_t i = 1; i < order.size(); ++i) {
            const TensorInfo& a = *order[i - 1];
            const TensorInfo& b = *order[i];
            KVQ_CHECK(b.begin >= a.end, "safetensors: tensors \"", json::detail::preview(a.name), "\" [", a.begin, ", ",
                      a.end, ") and \"", json::detail::preview(b.name), "\" [", b.begin, ", ", b.end, ") overlap");
        }
    }

    std::vector<std::uint8_t> bytes_;
    std::size_t data_start_ = 0;
    std::map<std::string, TensorInfo, std::less<>> tensors_;
    std::map<std::string, std::string> metadata_;
};

// ---------------------------------------------------------------------------------------------
// Writer

struct TensorToWrite {
    std::string name;
    Dtype dtype = Dtype::F32;  // F32, F16 or BF16; the floats are converted on write
    std::vector<std::int64_t> shape;
    std::span<const float> data;  // row-major, product(shape) elements
};

inline std::vector<std::uint8_t> serialize_safetensors(const std::vector<TensorToWrite>& tensors,
                                                       const std::map<std::string, std::string>& metadata = {}) {
    std::string header = "{";
    if (!metadata.empty()) {
        header += "\"__metadata__\":{";
        bool first = true;
        for (const auto& [k, v] : metadata) {
            header += (first ? "" : ",") + json::quote(k) + ":" + json::quote(v);
            first = false;
        }
        header += "}";
    }
    std::set<std::string_view> seen;
    std::uint64_t offset = 0;
    for (const TensorToWrite& t : tensors) {
        const std::string q = "\"" + json::detail::preview(t.name) + "\"";
        KVQ_CHECK(t.name != "__metadata__", "safetensors: \"__metadata__\" is reserved and cannot name a tensor");
        KVQ_CHECK(seen.insert(t.name).second, "safetensors: duplicate tensor name ", q);
        KVQ_CHECK(t.dtype == Dtype::F32 || t.dtype == Dtype::F16 || t.dtype == Dtype::BF16,
                  "safetensors: cannot write tensor ", q, " as dtype ", dtype_name(t.dtype),
                  "; the writer supports F32, F16 and BF16");
        const std::uint64_t numel = detail::checked_numel(t.name, t.shape, dtype_size(t.dtype));
        KVQ_CHECK(numel == t.data.size(), "safetensors: tensor ", q, " has shape ", shape_str(t.shape), " (", numel,
                  " elements) but ", t.data.size(), " data values");
        const std::uint64_t end = offset + numel * dtype_size(t.dtype);
        header += (header.size() > 1 ? "," : "") + json::quote(t.name) + ":{\"dtype\":\"" +
                  std::string(dtype_name(t.dtype)) + "\",\"shape\":" + detail::json_ints(t.shape) +
                  ",\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(end) + "]}";
        offset = end;
    }
    header += "}";
    // Pad with spaces (valid JSON whitespace) so that the data starts 8-byte aligned, as the
    // reference writer does.
    while (header.size() % 8 != 0) header += ' ';

    std::vector<std::uint8_t> out;
    out.reserve(8 + header.size() + static_cast<std::size_t>(offset));
    detail::store_le(out, header.size(), 8);
    out.insert(out.end(), header.begin(), header.end());
    for (const TensorToWrite& t : tensors) {
        for (float x : t.data) {
            switch (t.dtype) {
                case Dtype::F32: detail::store_le(out, float_bits(x), 4); break;
                case Dtype::F16: detail::store_le(out, float_to_half(x).bits, 2); break;
                default: detail::store_le(out, float_to_bf16(x).bits, 2); break;
            }
        }
    }
    return out;
}

// Writes to a temporary file next to path and renames it over path, so that readers never see
// a partially written file and a crash mid-write leaves any previous file intact.
inline void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
    const std::vector<std::uint8_t> bytes = serialize_safetensors(tensors, metadata);
    const std::string tmp = path + ".tmp." + std::to_string(::getpid());
    std::FILE* f = std::fopen(tmp.c_str(), "wb");
    KVQ_CHECK(f != nullptr, "safetensors: cannot create \"", tmp, "\": ", std::strerror(errno));
    bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
    ok = ok && std::fflush(f) == 0 && ::fsync(::fileno(f)) == 0;
    const int err = errno;
    ok = (std::fclose(f) == 0) && ok;
    if (!ok) {
        std::remove(tmp.c_str());
        KVQ_THROW("safetensors: error writing \"", tmp, "\": ", std::strerror(err));
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        const int rerr = errno;
        std::remove(tmp.c_str());
        KVQ_THROW("safetensors: cannot rename \"", tmp, "\" to \"", path, "\": ", std::strerror(rerr));
    }
}

}  // namespace kvq::io
