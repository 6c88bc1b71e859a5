// Method spec parsing and the codec factory (include/kvq/eval/method_spec.hpp).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "kvq/eval/method_spec.hpp"

namespace {

using kvq::eval::make_method;
using kvq::eval::MethodSpec;
using kvq::eval::parse_method_spec;

TEST(MethodSpec, ParsesNamesAndParams) {
    const MethodSpec a = parse_method_spec("fp16");
    EXPECT_EQ(a.name, "fp16");
    EXPECT_TRUE(a.params.empty());
    EXPECT_EQ(a.canonical(), "fp16");

    const MethodSpec b =
        parse_method_spec("qjl:m=512,mo=128,outliers=0,sketch=gaussian,seed=18446744073709551615,vbits=4,vg=64");
    EXPECT_EQ(b.name, "qjl");
    EXPECT_EQ(b.params.at("m"), "512");
    EXPECT_EQ(b.params.at("mo"), "128");
    EXPECT_EQ(b.params.at("outliers"), "0");
    EXPECT_EQ(b.params.at("sketch"), "gaussian");
    EXPECT_EQ(b.params.at("seed"), "18446744073709551615");
    EXPECT_EQ(b.params.at("vbits"), "4");
    EXPECT_EQ(b.params.at("vg"), "64");

    const MethodSpec c = parse_method_spec("int4:window=128,g=064,kflush=chunk");
    EXPECT_EQ(c.params.at("g"), "64");
    EXPECT_EQ(c.canonical(), "int4:g=64,window=128,kflush=chunk");  // table order, normalised integers
}

TEST(MethodSpec, CanonicalRoundTrips) {
    for (const char* s : {"fp32", "bf16", "int8", "int2:g=16", "qjl", "qjl:mo=0128,m=512",
                          "qjl:sketch=orthogonal,seed=0007", "qjl:window=128,kflush=chunk,vbits=3"}) {
        const MethodSpec p = parse_method_spec(s);
        EXPECT_EQ(parse_method_spec(p.canonical()), p) << s;
    }
    EXPECT_EQ(parse_method_spec("qjl:mo=0128,m=512").canonical(), "qjl:m=512,mo=128");
}

TEST(MethodSpec, EveryInvalidFormThrows) {
    const std::vector<std::string> bad = {
        "",       // empty
        ":",      // empty name
        ":m=1",   // empty name
        "fp8",    // unknown name
        "FP16",   // names are case-sensitive
        "fp16 ",  // whitespace
        " fp16",
        "int5",
        "qjl:",             // empty parameter list
        "qjl:m",            // no '='
        "qjl:=64",          // empty key
        "qjl:m=",           // empty value
        "qjl:m=64,",        // trailing comma
        "qjl:,m=64",        // leading comma
        "qjl:m=64,,mo=64",  // empty parameter
        "qjl:m=64,m=128",   // duplicate key
        "qjl:m=64,m=64",    // duplicate key, same value
        "qjl:M=64",         // unknown key (case)
        "qjl:g=32",         // key of another method
        "int4:m=64",
        "fp16:g=32",
        "qjl: m=64",  // whitespace in key
        "qjl:m= 64",  // whitespace in value
        "qjl:m=-64",  // signed
        "qjl:m=+64",
        "qjl:m=0x40",  // hex
        "qjl:m=6.4e1",
        "qjl:m=64abc",
        "qjl:m=99999999999999999999999",  // overflow
        "qjl:seed=18446744073709551616",  // 2^64
        "qjl:m=64=64",                    // second '='
        "qjl:m=64:mo=64",                 // second ':'
        "qjl:sketch=hadamard",            // unknown enum word
        "qjl:sketch=Gaussian",
        "qjl:sketch=",
        "int4:kflush=fixed",
        "int4:window=1048577",     // above 2^20
        std::string("fp16\0", 5),  // embedded NUL
        std::string("qjl:m=6\x01", 8),
        std::string(2000, 'a'),  // over the length limit
    };
    for (const std::string& s : bad) EXPECT_THROW(parse_method_spec(s), kvq::Error) << '"' << s << '"';
}

TEST(MethodSpec, ErrorNamesTheOffendingText) {
    const auto message = [](const std::string& s) {
        try {
            parse_method_spec(s);
        } catch (const kvq::Error& e) {
            return std::string(e.what());
        }
        return std::string("no error");
    };
    EXPECT_NE(message("fp8").find("\"fp8\""), std::string::npos);
    EXPECT_NE(message("qjl:m=abc").find("\"abc\""), std::string::npos);
    EXPECT_NE(message("qjl:foo=1").find("\"foo\""), std::string::npos);
    EXPECT_NE(message("qjl:m=64,m=128").find("duplicate key \"m\""), std::string::npos);
    EXPECT_NE(message("qjl:sketch=x").find("gaussian|orthogonal"), std::string::npos);
    EXPECT_NE(message("").find("empty"), std::string::npos);
    EXPECT_NE(message(std::string("fp\x01", 3)).find("\\x01"), std::string::npos);  // non-printables escaped
}

TEST(MethodFactory, BuildsTheDocumentedCodecs) {
    const auto fp16 = make_method("fp16", 128);
    EXPECT_EQ(fp16.key_codec->id(), kvq::CodecId::Identity);
    EXPECT_EQ(fp16.key_codec->name(), "fp16");
    EXPECT_EQ(fp16.value_codec->name(), "fp16");
    EXPECT_DOUBLE_EQ(fp16.key_codec->bits_per_element(64), 16.0);
    EXPECT_EQ(make_method("fp32", 64).key_codec->name(), "fp32");

    for (int bits : {8, 4, 3, 2}) {
        const auto m = make_method("int" + std::to_string(bits), 128);
        EXPECT_EQ(m.key_codec->name(), "int" + std::to_string(bits) + ":g=32");
        EXPECT_EQ(m.value_codec->name(), "int" + std::to_string(bits) + ":g=32");
        // b bits per element plus fp16 step and min per 32 channels.
        EXPECT_DOUBLE_EQ(m.key_codec->bits_per_element(64), bits + 1.0);
    }
    EXPECT_EQ(make_method("int4:g=64", 128).key_codec->name(), "int4:g=64");

    const auto q = make_method("qjl", 128);
    EXPECT_EQ(q.key_codec->id(), kvq::CodecId::Qjl);
    EXPECT_EQ(q.key_codec->name(), "qjl:m=256,mo=256,outliers=8,sketch=orthogonal");
    EXPECT_EQ(q.value_codec->name(), "int2:g=32");
    EXPECT_EQ(q.key_window.tokens, 0);
    const auto& qp = dynamic_cast<const kvq::QjlKeyCodec&>(*q.key_codec).params();
    EXPECT_EQ(qp.seed, kvq::QjlParams{}.seed);

    const auto q2 = make_method("qjl:m=128,mo=64,outliers=4,sketch=gaussian,seed=9,vbits=4,vg=64", 128);
    const auto& p2 = dynamic_cast<const kvq::QjlKeyCodec&>(*q2.key_codec).params();
    EXPECT_EQ(p2.m, 128);
    EXPECT_EQ(p2.m_outlier, 64);
    EXPECT_EQ(p2.outliers, 4);
    EXPECT_EQ(p2.sketch, kvq::SketchKind::Gaussian);
    EXPECT_EQ(p2.seed, 9u);
    EXPECT_EQ(q2.value_codec->name(), "int4:g=64");
}

TEST(MethodFactory, WindowPolicy) {
    const auto a = make_method("int4", 128, 96);  // the caller's default window
    EXPECT_EQ(a.key_window.tokens, 96);
    EXPECT_EQ(a.value_window.tokens, 96);
    EXPECT_EQ(a.key_window.mode, kvq::FlushMode::Sliding);

    const auto b = make_method("qjl:window=128,kflush=chunk", 128, 96);  // the spec overrides it
    EXPECT_EQ(b.key_window.tokens, 128);
    EXPECT_EQ(b.key_window.mode, kvq::FlushMode::Chunk);
    EXPECT_EQ(b.value_window.tokens, 128);
    EXPECT_EQ(b.value_window.mode, kvq::FlushMode::Sliding);

    const kvq::CacheConfig c = b.cache_config(2, 4, 64);
    EXPECT_EQ(c.n_layers, 2);
    EXPECT_EQ(c.n_kv_heads, 4);
    EXPECT_EQ(c.head_dim, 128);
    EXPECT_EQ(c.block_tokens, 64);
    EXPECT_EQ(c.key_window.mode, kvq::FlushMode::Chunk);
    EXPECT_TRUE(c.past_only);
    kvq::KvCache cache(c, b.key_codec, b.value_codec);  // accepted by the cache
}

TEST(MethodFactory, OutOfRangeValuesThrowNamingTheSpec) {
    for (const char* s : {"qjl:m=63", "qjl:m=2048", "qjl:m=0", "qjl:mo=16", "qjl:outliers=17", "qjl:vbits=5",
                          "qjl:vg=48", "int4:g=0", "int4:g=5", "int4:g=256", "qjl:window=100,kflush=chunk"}) {
        try {
            make_method(s, 128);
            ADD_FAILURE() << s << " did not throw";
        } catch (const kvq::Error& e) {
            EXPECT_NE(std::string(e.what()).find(std::string("\"") + s + "\""), std::string::npos) << e.what();
        }
    }
    EXPECT_THROW(make_method("qjl", 512), kvq::Error);  // QJL head_dim <= 256
    EXPECT_THROW(make_method("fp16", 12), kvq::Error);  // head_dim multiple of 8
    EXPECT_THROW(make_method("fp16", 128, -1), kvq::Error);
    EXPECT_NO_THROW(make_method("qjl:outliers=0,mo=0", 128));  // mo is ignored without outliers
    EXPECT_NO_THROW(make_method("qjl:window=96,kflush=chunk", 128));

    MethodSpec hand;  // a hand-built spec is validated like a parsed one
    hand.name = "int4";
    hand.params["g"] = "32,window=5";
    EXPECT_THROW(make_method(hand, 128), kvq::Error);
    hand.params = {{"bogus", "1"}};
    EXPECT_THROW(make_method(hand, 128), kvq::Error);
    hand.name = "nope";
    hand.params.clear();
    EXPECT_THROW(make_method(hand, 128), kvq::Error);
}

}  // namespace
