// Unit tests for the strict JSON parser behind the safetensors reader.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>

#include "kvq/io/json.hpp"

namespace json = kvq::io::json;

namespace {

// Expects parse(text) to throw a kvq::Error whose message contains `word`.
void expect_error(const std::string& text, const std::string& word) {
    try {
        json::parse(text);
        ADD_FAILURE() << "no error for: " << text;
    } catch (const kvq::Error& e) {
        EXPECT_NE(std::string(e.what()).find(word), std::string::npos)
            << "message: " << e.what() << "\ninput: " << text;
    }
}

std::string nested_arrays(std::size_t depth) { return std::string(depth, '[') + std::string(depth, ']'); }

}  // namespace

TEST(Json, Literals) {
    EXPECT_TRUE(json::parse("null").is_null());
    EXPECT_TRUE(json::parse("true").as_bool());
    EXPECT_FALSE(json::parse(" \t\r\nfalse \n").as_bool());
    expect_error("nul", "literal");
    expect_error("True", "unexpected");
    expect_error("", "end of input");
    expect_error("   ", "end of input");
}

TEST(Json, Integers) {
    EXPECT_EQ(json::parse("0").as_int(), 0);
    EXPECT_EQ(json::parse("-0").as_int(), 0);
    EXPECT_EQ(json::parse("12345").as_int(), 12345);
    EXPECT_EQ(json::parse("9223372036854775807").as_int(), std::numeric_limits<std::int64_t>::max());
    EXPECT_EQ(json::parse("-9223372036854775808").as_int(), std::numeric_limits<std::int64_t>::min());
    // 2^53 + 1 is not representable as a double: integers must not go through one.
    EXPECT_EQ(json::parse("9007199254740993").as_int(), 9007199254740993LL);
    expect_error("9223372036854775808", "int64 range");
    expect_error("-9223372036854775809", "int64 range");
    expect_error("123456789012345678901234567890", "int64 range");
    expect_error("01", "leading zero");
    expect_error("-", "digit");
    expect_error("+1", "unexpected");
    expect_error("0x10", "after the JSON value");
}

TEST(Json, Doubles) {
    EXPECT_DOUBLE_EQ(json::parse("1.5").as_double(), 1.5);
    EXPECT_DOUBLE_EQ(json::parse("-2.5e3").as_double(), -2500.0);
    EXPECT_DOUBLE_EQ(json::parse("1E-2").as_double(), 0.01);
    EXPECT_DOUBLE_EQ(json::parse("1e+2").as_double(), 100.0);
    EXPECT_EQ(json::parse("1.0").type(), json::Type::Double);
    EXPECT_EQ(json::parse("1e2").type(), json::Type::Double);
    EXPECT_DOUBLE_EQ(json::parse("7").as_double(), 7.0);  // ints widen on request
    EXPECT_EQ(json::parse("1e-400").as_double(), 0.0);    // underflow is zero, not an error
    EXPECT_EQ(json::parse("0.00001e-330").as_double(), 0.0);
    expect_error("1e400", "out of double range");
    expect_error("-123.0e999", "out of double range");
    expect_error("1.", "after '.'");
    expect_error(".5", "unexpected");
    expect_error("1e", "exponent");
    expect_error("1e+", "exponent");
    expect_error("NaN", "unexpected");
    expect_error("Infinity", "unexpected");
}

TEST(Json, Strings) {
    EXPECT_EQ(json::parse(R"("")").as_string(), "");
    EXPECT_EQ(json::parse(R"("abc")").as_string(), "abc");
    EXPECT_EQ(json::parse(R"("a\"b\\c\/d\b\f\n\r\t")").as_string(), "a\"b\\c/d\b\f\n\r\t");
    EXPECT_EQ(json::parse(R"("\u0041\u00e9\u20AC")").as_string(), "A\xC3\xA9\xE2\x82\xAC");
    EXPECT_EQ(json::parse(R"("\ud83d\ude00")").as_string(), "\xF0\x9F\x98\x80");  // U+1F600 via a surrogate pair
    EXPECT_EQ(json::parse(R"("\u0000")").as_string(), std::string(1, '\0'));
    EXPECT_EQ(json::parse("\"caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC\"").as_string(),
              "caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC");
    expect_error(R"("abc)", "unterminated");
    expect_error(R"("\x")", "invalid escape");
    expect_error(R"("\u12")", "\\u escape");
    expect_error(R"("\u12G4")", "hex digit in \\u escape");
    expect_error(R"("\ud83d")", "surrogate");
    expect_error(R"("\ud83dx")", "surrogate");
    expect_error(R"("\ud83d\u0041")", "surrogate");
    expect_error(R"("\ude00")", "surrogate");
    expect_error("\"a\nb\"", "control character");
    expect_error("\"\x01\"", "control character");
    expect_error("\"\xC3\"", "UTF-8");              // truncated sequence
    expect_error("\"\xC0\xAF\"", "UTF-8");          // overlong '/'
    expect_error("\"\xED\xA0\x80\"", "UTF-8");      // encoded surrogate
    expect_error("\"\xF4\x90\x80\x80\"", "UTF-8");  // above U+10FFFF
    expect_error("\"\xFF\"", "UTF-8");
}

TEST(Json, ArraysAndObjects) {
    const json::Value v = json::parse(R"( { "a" : [1, 2.5, "x", null, true, [], {}], "b": {"c": -3} } )");
    ASSERT_TRUE(v.is_object());
    ASSERT_EQ(v.as_object().size(), 2u);
    EXPECT_EQ(v.as_object()[0].key, "a");  // document order is kept
    const json::Array& a = v.find("a")->as_array();
    ASSERT_EQ(a.size(), 7u);
    EXPECT_EQ(a[0].as_int(), 1);
    EXPECT_DOUBLE_EQ(a[1].as_double(), 2.5);
    EXPECT_EQ(a[2].as_string(), "x");
    EXPECT_TRUE(a[3].is_null());
    EXPECT_TRUE(a[4].as_bool());
    EXPECT_TRUE(a[5].as_array().empty());
    EXPECT_TRUE(a[6].as_object().empty());
    EXPECT_EQ(v.find("b")->find("c")->as_int(), -3);
    EXPECT_EQ(v.find("zzz"), nullptr);
    EXPECT_EQ(a[0].find("a"), nullptr);  // not an object

    expect_error("[1,]", "expected a value");
    expect_error("[1 2]", "',' or ']'");
    expect_error("[", "end of input");
    expect_error(R"({"a":1,})", "string key");
    expect_error(R"({"a" 1})", "':'");
    expect_error(R"({"a":1 "b":2})", "',' or '}'");
    expect_error(R"({a:1})", "string key");
    expect_error(R"({"a":1}})", "after the JSON value");
    expect_error(R"({"a":1,"b":2,"a":3})", "duplicate key \"a\"");
    // Keys are compared after unescaping.
    expect_error(R"({"a":1,"\u0061":2})", "duplicate key");
    expect_error("[1] // comment", "after the JSON value");
}

TEST(Json, WrongTypeAccessThrows) {
    const json::Value v = json::parse("[1]");
    EXPECT_THROW(v.as_object(), kvq::Error);
    EXPECT_THROW(v.as_array()[0].as_string(), kvq::Error);
    EXPECT_THROW(json::parse("1.5").as_int(), kvq::Error);
    try {
        v.as_string();
        FAIL();
    } catch (const kvq::Error& e) {
        EXPECT_NE(std::string(e.what()).find("expected string, got array"), std::string::npos) << e.what();
    }
}

TEST(Json, DepthLimit) {
    EXPECT_NO_THROW(json::parse(nested_arrays(64)));
    expect_error(nested_arrays(65), "nesting deeper than 64");
    std::string objs;
    for (int i = 0; i < 65; ++i) objs += "{\"k\":";
    objs += "1" + std::string(65, '}');
    expect_error(objs, "nesting");
    // Far deeper than the limit must still be a clean error, not a stack overflow.
    expect_error(std::string(1'000'000, '['), "nesting");
    json::Limits shallow;
    shallow.max_depth = 2;
    EXPECT_NO_THROW(json::parse("[[1]]", shallow));
    EXPECT_THROW(json::parse("[[[1]]]", shallow), kvq::Error);
}

TEST(Json, ValueLimit) {
    json::Limits lim;
    lim.max_values = 4;
    EXPECT_NO_THROW(json::parse("[1,2,3]", lim));  // the array itself counts
    EXPECT_THROW(json::parse("[1,2,3,4]", lim), kvq::Error);
}

TEST(Json, ErrorsNameTheByteOffset) {
    expect_error("[1, 2, x]", "at byte 7");
    expect_error(R"({"ab":1,"ab":2})", "at byte 8");
    expect_error("  01", "at byte 2");
}

TEST(Json, QuoteRoundTrips) {
    const std::string samples[] = {"",
                                   "plain",
                                   "quote\" back\\slash",
                                   std::string("nul\0ctl\x01\x1f", 9),
                                   "tab\there\nnewline",
                                   "\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80"};
    for (const std::string& s : samples) {
        const std::string q = json::quote(s);
        EXPECT_EQ(json::parse(q).as_string(), s) << q;
    }
    EXPECT_EQ(json::quote("a\"b"), "\"a\\\"b\"");
    EXPECT_EQ(json::quote("\x01"), "\"\\u0001\"");
    EXPECT_THROW(json::quote("bad \xFF utf8"), kvq::Error);
    EXPECT_THROW(json::quote("\xED\xA0\x80"), kvq::Error);
}
