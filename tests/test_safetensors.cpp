// safetensors reader/writer: exact round trips, and every malformed input is a kvq::Error
// (never a crash), including all truncations and random header corruption.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include "kvq/core/half.hpp"
#include "kvq/io/safetensors.hpp"

using kvq::io::Dtype;
using kvq::io::SafetensorsFile;
using kvq::io::TensorToWrite;

namespace {

std::vector<std::uint8_t> make_file(const std::string& header, std::size_t data_bytes) {
    std::vector<std::uint8_t> out;
    for (int i = 0; i < 8; ++i)
        out.push_back(static_cast<std::uint8_t>(static_cast<std::uint64_t>(header.size()) >> (8 * i)));
    out.insert(out.end(), header.begin(), header.end());
    for (std::size_t i = 0; i < data_bytes; ++i) out.push_back(static_cast<std::uint8_t>(i * 37 + 1));
    return out;
}

// A one-tensor header with the given dtype/shape/offsets JSON fragments.
std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  const std::string& offsets) {
    return "\"" + name + "\":{\"dtype\":" + dtype + ",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}";
}

void expect_parse_error(const std::vector<std::uint8_t>& bytes, const std::string& word) {
    try {
        SafetensorsFile::parse(bytes);
        ADD_FAILURE() << "no error, expected one mentioning \"" << word << "\"";
    } catch (const kvq::Error& e) {
        EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << "message: " << e.what();
    }
}
void expect_header_error(const std::string& header, std::size_t data_bytes, const std::string& word) {
    SCOPED_TRACE(header);
    expect_parse_error(make_file(header, data_bytes), word);
}

std::uint32_t bits(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

// Values that exercise rounding, subnormals, fp16 overflow, signed zero, inf and NaN.
std::vector<float> test_values(std::size_t n, std::uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 3.0f);
    const float specials[] = {0.0f,  -0.0f,  1.0f,     -1.5f,     65504.0f, 65520.0f,    1e6f,       -1e-7f,
                              6e-8f, 1e-40f, INFINITY, -INFINITY, NAN,      3.14159265f, 1.0f / 3.0f};
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = i < std::size(specials) && seed % 2 == 0 ? specials[i] : nd(rng);
    return v;
}

float expected_after(Dtype d, float x) {
    if (d == Dtype::F16) return kvq::half_to_float(kvq::float_to_half(x));
    if (d == Dtype::BF16) return kvq::bf16_to_float(kvq::float_to_bf16(x));
    return x;
}

struct TempDir {
    std::filesystem::path path = std::filesystem::temp_directory_path() / ("kvq_st_test_" + std::to_string(::getpid()));
    TempDir() { std::filesystem::create_directories(path); }
    ~TempDir() { std::filesystem::remove_all(path); }
};

// Three tensors plus metadata; the last tensor by offset is non-empty so that every truncation
// is detectable.
std::vector<std::uint8_t> sample_file() {
    static const std::vector<float> a = test_values(6, 2), b = test_values(4, 3), c = test_values(3, 4);
    return kvq::io::serialize_safetensors(
        {{"a", Dtype::F32, {2, 3}, a}, {"b", Dtype::F16, {4}, b}, {"c", Dtype::BF16, {3, 1}, c}},
        {{"format", "pt"}, {"comment", "a reasonably long metadata string value"}});
}

}  // namespace

TEST(Safetensors, RoundTripAllDtypesAndShapes) {
    const std::vector<std::vector<std::int64_t>> shapes = {{}, {0}, {5}, {3, 4}, {2, 3, 4}, {1, 1, 7}, {4, 0, 2}};
    std::vector<std::vector<float>> data;
    data.reserve(3 * shapes.size());  // the spans below point into these vectors
    std::vector<TensorToWrite> ts;
    for (Dtype d : {Dtype::F32, Dtype::F16, Dtype::BF16}) {
        for (const auto& shape : shapes) {
            std::int64_t n = 1;
            for (auto s : shape) n *= s;
            data.push_back(test_values(static_cast<std::size_t>(n), static_cast<std::uint32_t>(data.size())));
            ts.push_back(
                {std::string(kvq::io::dtype_name(d)) + "_" + kvq::io::shape_str(shape), d, shape, data.back()});
        }
    }

    TempDir dir;
    const std::string path = (dir.path / "t.safetensors").string();
    kvq::io::write_safetensors(path, ts);
    EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir.path), {}), 1) << "temporary file left behind";

    const SafetensorsFile f = SafetensorsFile::load(path);
    EXPECT_EQ(f.size(), ts.size());
    std::uint64_t offset = 0;
    for (const TensorToWrite& t : ts) {
        SCOPED_TRACE(t.name);
        ASSERT_TRUE(f.has(t.name));
        const kvq::io::TensorInfo& info = f.info(t.name);
        EXPECT_EQ(info.dtype, t.dtype);
        EXPECT_EQ(info.shape, t.shape);
        EXPECT_EQ(info.begin, offset);  // data laid out in the order given
        offset = info.end;
        const std::vector<float> got = f.read_f32(t.name, t.shape);
        ASSERT_EQ(got.size(), t.data.size());
        for (std::size_t i = 0; i < got.size(); ++i)
            EXPECT_EQ(bits(got[i]), bits(expected_after(t.dtype, t.data[i]))) << i;
    }
    EXPECT_EQ(SafetensorsFile::parse(kvq::io::serialize_safetensors(ts)).names(), f.names());
}

TEST(Safetensors, HeaderIsPaddedAndLittleEndian) {
    const std::vector<float> x = {1.0f, -2.0f};
    const auto bytes = kvq::io::serialize_safetensors({{"x", Dtype::F32, {2}, x}});
    std::uint64_t n = 0;
    for (std::size_t i = 8; i-- > 0;) n = (n << 8) | bytes[i];
    EXPECT_EQ(n % 8, 0u);
    EXPECT_EQ(bytes.size(), 8 + n + 8);
    EXPECT_EQ(bytes[8 + n - 1], ' ');
    const std::uint8_t one_le[] = {0x00, 0x00, 0x80, 0x3f};
    EXPECT_EQ(std::memcmp(&bytes[8 + n], one_le, 4), 0);
    const std::string header(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n));
    EXPECT_EQ(header.find("__metadata__"), std::string::npos);  // omitted when empty
}

TEST(Safetensors, MetadataRoundTrip) {
    const std::map<std::string, std::string> meta = {
        {"format", "pt"}, {"note", "h\xC3\xA9llo \"quoted\"\n\\"}, {"", "empty key"}};
    const std::vector<float> x = {1, 2, 3};
    const SafetensorsFile f =
        SafetensorsFile::parse(kvq::io::serialize_safetensors({{"x", Dtype::BF16, {3}, x}}, meta));
    EXPECT_EQ(f.metadata(), meta);
    EXPECT_EQ(f.read_f32("x"), x);
    EXPECT_TRUE(SafetensorsFile::parse(kvq::io::serialize_safetensors({{"x", Dtype::F32, {3}, x}})).metadata().empty());
}

TEST(Safetensors, NonAsciiAndEscapedNames) {
    const std::vector<std::string> names = {"caf\xC3\xA9",
                                            "\xE6\x97\xA5\xE6\x9C\xAC",
                                            "quote\"d",
                                            "back\\slash",
                                            "new\nline",
                                            "\x01"
                                            "ctl",
                                            "emoji\xF0\x9F\x98\x80",
                                            "with space",
                                            ""};
    const std::vector<float> x = {0.5f};
    std::vector<TensorToWrite> ts;
    for (const auto& n : names) ts.push_back({n, Dtype::F16, {1}, x});
    const SafetensorsFile f = SafetensorsFile::parse(kvq::io::serialize_safetensors(ts));
    for (const auto& n : names) {
        ASSERT_TRUE(f.has(n)) << n;
        EXPECT_EQ(f.read_f32(n), x);
    }
    // Escapes written by other tools decode to the same names.
    const SafetensorsFile g = SafetensorsFile::parse(
        make_file("{" + entry("\\u00e9t\\u00e9\\ud83d\\ude00", "\"U8\"", "[2]", "[0,2]") + "}", 2));
    EXPECT_TRUE(g.has("\xC3\xA9t\xC3\xA9\xF0\x9F\x98\x80"));
}

TEST(Safetensors, ReaderAccessErrors) {
    const std::string h =
        "{" + entry("w", "\"F32\"", "[2,3]", "[0,24]") + "," + entry("i", "\"I32\"", "[2]", "[24,32]") + "}";
    const SafetensorsFile f = SafetensorsFile::parse(make_file(h, 32));
    EXPECT_EQ(f.names(), (std::vector<std::string>{"i", "w"}));
    EXPECT_EQ(f.info("i").dtype, Dtype::I32);
    EXPECT_EQ(f.raw("i").size(), 8u);
    EXPECT_FALSE(f.has("nope"));
    try {
        f.read_f32("w", {3, 2});
        FAIL();
    } catch (const kvq::Error& e) {
        const std::string m = e.what();
        EXPECT_NE(m.find("\"w\""), std::string::npos) << m;
        EXPECT_NE(m.find("[2, 3]"), std::string::npos) << m;
        EXPECT_NE(m.find("[3, 2]"), std::string::npos) << m;
    }
    EXPECT_EQ(f.read_f32("w", {2, 3}).size(), 6u);
    try {
        f.read_f32("i");
        FAIL();
    } catch (const kvq::Error& e) {
        EXPECT_NE(std::string(e.what()).find("I32"), std::string::npos) << e.what();
    }
    EXPECT_THROW(f.info("nope"), kvq::Error);
    EXPECT_THROW(f.read_f32("nope"), kvq::Error);
}

TEST(Safetensors, MalformedFiles) {
    for (std::size_t n = 0; n < 8; ++n) expect_parse_error(std::vector<std::uint8_t>(n, 0), "shorter than");
    auto big = make_file("{}", 0);
    big[0] = 0x00;
    big[1] = 0xC2;
    big[2] = 0xEB;
    big[3] = 0x0B;  // 200,000,000
    expect_parse_error(big, "exceeds the limit");
    std::fill(big.begin(), big.begin() + 8, 0xFF);
    expect_parse_error(big, "exceeds the limit");
    auto longer = make_file("{}", 0);
    longer[0] = 3;
    expect_parse_error(longer, "larger than");

    const std::string ok = entry("t", "\"F32\"", "[2]", "[0,8]");
    expect_header_error("{" + ok, 8, "not valid JSON");
    expect_header_error("{\"t\":{\"dtype\":\"F32\",}}", 8, "not valid JSON");
    expect_header_error("{\"a\xFF\":1}", 8, "UTF-8");
    expect_header_error("[" + ok.substr(4) + "]", 8, "must be a JSON object");
    expect_header_error("", 8, "not valid JSON");
    expect_header_error("{\"t\":5}", 8, "must be an object");
    expect_header_error("{\"t\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "missing field \"dtype\"");
    expect_header_error("{\"t\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8, "missing field \"shape\"");
    expect_header_error("{\"t\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, "missing field \"data_offsets\"");
    expect_header_error("{" + ok.substr(0, ok.size() - 1) + ",\"extra\":1}}", 8, "unknown field");
    expect_header_error("{" + entry("t", "32", "[2]", "[0,8]") + "}", 8, "must be a string");
    expect_header_error("{" + entry("t", "\"F32\"", "2", "[0,8]") + "}", 8, "must be an array");
    expect_header_error("{" + entry("t", "\"F32\"", "[2.0]", "[0,8]") + "}", 8, "integers");
    expect_header_error("{" + entry("t", "\"F32\"", "[\"2\"]", "[0,8]") + "}", 8, "integers");
    expect_header_error("{" + entry("t", "\"F32\"", "[2]", "{}") + "}", 8, "must be an array");
    expect_header_error("{" + entry("t", "\"F32\"", "[2]", "[0,8.0]") + "}", 8, "integers");
    expect_header_error("{" + entry("t", "\"F8\"", "[2]", "[0,8]") + "}", 8, "unknown dtype \"F8\"");
    expect_header_error("{" + entry("t", "\"f32\"", "[2]", "[0,8]") + "}", 8, "unknown dtype");
    expect_header_error("{" + entry("t", "\"F32\"", "[-2]", "[0,8]") + "}", 8, "negative dimension -2");
    expect_header_error("{" + entry("t", "\"F32\"", "[4294967296,4294967296]", "[0,8]") + "}", 8, "overflows");
    expect_header_error("{" + entry("t", "\"U8\"", "[9223372036854775807,2]", "[0,8]") + "}", 8, "overflows");
    expect_header_error("{" + entry("t", "\"F32\"", "[2]", "[0]") + "}", 8, "[begin, end]");
    expect_header_error("{" + entry("t", "\"F32\"", "[2]", "[0,8,8]") + "}", 8, "[begin, end]");
    expect_header_error("{" + entry("t", "\"F32\"", "[2]", "[8,0]") + "}", 8, "begin > end");
    expect_header_error("{" + entry("t", "\"F32\"", "[2]", "[-8,0]") + "}", 8, "negative data offset");
    expect_header_error("{" + entry("t", "\"F32\"", "[2]", "[0,99999999999999999999]") + "}", 8, "int64 range");
    expect_header_error("{" + entry("t", "\"F32\"", "[2]", "[8,16]") + "}", 8, "beyond the data buffer");
    expect_header_error("{" + entry("t", "\"F32\"", "[2]", "[0,9223372036854775807]") + "}", 8,
                        "beyond the data buffer");
    expect_header_error("{" + entry("t", "\"F32\"", "[3]", "[0,8]") + "}", 8, "need 12 bytes");
    expect_header_error("{" + entry("t", "\"F16\"", "[2]", "[0,8]") + "}", 8, "need 4 bytes");
    expect_header_error("{" + ok + "," + entry("u", "\"F32\"", "[2]", "[4,12]") + "}", 12, "overlap");
    expect_header_error("{" + ok + "," + entry("u", "\"U8\"", "[8]", "[0,8]") + "}", 8, "overlap");
    expect_header_error("{" + ok + "," + ok + "}", 8, "duplicate key \"t\"");
    expect_header_error("{\"__metadata__\":[]," + ok + "}", 8, "\"__metadata__\" must be an object");
    expect_header_error("{\"__metadata__\":{\"k\":1}," + ok + "}", 8, "must be a string");
    expect_header_error("{\"__metadata__\":{\"k\":\"a\",\"k\":\"b\"}}", 0, "duplicate key");
}

TEST(Safetensors, AcceptsHolesEmptyTensorsAndTrailingBytes) {
    const std::string h = "{" + entry("a", "\"F32\"", "[2]", "[0,8]") + "," + entry("b", "\"F32\"", "[2]", "[16,24]") +
                          "," + entry("e", "\"F32\"", "[0,3]", "[4,4]") + "," +
                          entry("z", "\"F32\"", "[4611686018427387904,4611686018427387904,0]", "[0,0]") + "}";
    const SafetensorsFile f = SafetensorsFile::parse(make_file(h, 40));
    EXPECT_EQ(f.read_f32("b").size(), 2u);
    EXPECT_TRUE(f.read_f32("e").empty());
    EXPECT_TRUE(f.read_f32("z").empty());
    EXPECT_EQ(f.info("z").numel(), 0);
    EXPECT_NO_THROW(SafetensorsFile::parse(make_file("{}", 0)));
    EXPECT_NO_THROW(SafetensorsFile::parse(make_file("  {}  \n", 5)));
}

TEST(Safetensors, WriterRejectsBadInput) {
    const std::vector<float> x = {1, 2, 3, 4};
    const auto err = [](const std::vector<TensorToWrite>& ts, const std::string& word) {
        try {
            kvq::io::serialize_safetensors(ts);
            ADD_FAILURE() << "no error, expected \"" << word << "\"";
        } catch (const kvq::Error& e) {
            EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
        }
    };
    err({{"a", Dtype::F32, {4}, x}, {"a", Dtype::F16, {4}, x}}, "duplicate");
    err({{"__metadata__", Dtype::F32, {4}, x}}, "reserved");
    err({{"a", Dtype::I32, {4}, x}}, "I32");
    err({{"a", Dtype::F32, {3}, x}}, "4 data values");
    err({{"a", Dtype::F32, {-1, -4}, x}}, "negative dimension");
    err({{"bad\xFF", Dtype::F32, {4}, x}}, "UTF-8");
    EXPECT_THROW(kvq::io::serialize_safetensors({}, {{"k", "\xC3"}}), kvq::Error);
}

TEST(Safetensors, FileErrorsNameThePath) {
    TempDir dir;
    const std::string missing = (dir.path / "missing.safetensors").string();
    try {
        SafetensorsFile::load(missing);
        FAIL();
    } catch (const kvq::Error& e) {
        EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
    }
    const std::vector<float> x = {1};
    EXPECT_THROW(kvq::io::write_safetensors((dir.path / "no_dir" / "f").string(), {{"x", Dtype::F32, {1}, x}}),
                 kvq::Error);
    const std::string bad = (dir.path / "bad.safetensors").string();
    kvq::io::write_safetensors(bad, {{"x", Dtype::F32, {1}, x}});
    std::filesystem::resize_file(bad, std::filesystem::file_size(bad) - 1);
    try {
        SafetensorsFile::load(bad);
        FAIL();
    } catch (const kvq::Error& e) {
        EXPECT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("beyond the data buffer"), std::string::npos) << e.what();
    }
    // Overwriting an existing file replaces it.
    const std::vector<float> y = {7, 8};
    kvq::io::write_safetensors(bad, {{"y", Dtype::F32, {2}, y}});
    EXPECT_EQ(SafetensorsFile::load(bad).read_f32("y"), y);
}

TEST(Safetensors, EveryTruncationThrows) {
    const auto full = sample_file();
    ASSERT_NO_THROW(SafetensorsFile::parse(full));
    for (std::size_t len = 0; len < full.size(); ++len) {
        const std::vector<std::uint8_t> prefix(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(len));
        EXPECT_THROW(SafetensorsFile::parse(prefix), kvq::Error) << "length " << len;
    }
}

TEST(Safetensors, RandomHeaderCorruptionNeverCrashes) {
    const auto full = sample_file();
    std::uint64_t n = 0;
    for (std::size_t i = 8; i-- > 0;) n = (n << 8) | full[i];
    std::mt19937 rng(20240601);
    int parsed = 0, rejected = 0;
    for (int iter = 0; iter < 4000; ++iter) {
        auto bytes = full;
        const int flips = 1 + static_cast<int>(rng() % 3);
        for (int k = 0; k < flips; ++k) {
            // Mostly the JSON; sometimes the length field.
            const std::size_t pos = rng() % 10 == 0 ? rng() % 8 : 8 + rng() % n;
            bytes[pos] ^= static_cast<std::uint8_t>(1 + rng() % 255);
        }
        try {
            const SafetensorsFile f = SafetensorsFile::parse(std::move(bytes));
            ++parsed;
            for (const std::string& name : f.names()) {
                try {
                    f.read_f32(name);
                } catch (const kvq::Error&) {}
            }
        } catch (const kvq::Error&) {
            ++rejected;
        }
    }
    EXPECT_GT(rejected, 0);
    EXPECT_GT(parsed, 0);
    std::printf("header corruption: %d parsed, %d rejected\n", parsed, rejected);
}
