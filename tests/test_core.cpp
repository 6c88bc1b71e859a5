#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "kvq/kvq.hpp"

namespace {

// Round-to-nearest-even fp16 reference: the nearest representable value, found by search in double.
float half_reference(float f) {
    if (std::isnan(f)) return f;
    const double x = f;
    if (std::fabs(x) >= 65520.0) return std::copysign(INFINITY, f);
    // Exhaustive over the 65536 patterns would be slow per call; use the exponent to find the spacing.
    const double a = std::fabs(x);
    double ulp = a < std::ldexp(1.0, -14) ? std::ldexp(1.0, -24) : std::ldexp(1.0, std::ilogb(a) - 10);
    double lo = std::floor(a / ulp) * ulp, hi = lo + ulp;
    double r;
    if (a - lo < hi - a)
        r = lo;
    else if (a - lo > hi - a)
        r = hi;
    else
        r = (std::fmod(lo / ulp, 2.0) == 0.0) ? lo : hi;
    return static_cast<float>(std::copysign(r, x));
}

TEST(Half, EveryHalfPatternRoundTrips) {
    for (std::uint32_t b = 0; b < 65536; ++b) {
        const kvq::half_t h{static_cast<std::uint16_t>(b)};
        const float f = kvq::half_to_float(h);
        if (std::isnan(f)) {
            EXPECT_TRUE(std::isnan(kvq::half_to_float(kvq::float_to_half(f))));
            continue;
        }
        EXPECT_EQ(kvq::float_to_half(f).bits, b) << "pattern " << b;
    }
}

TEST(Half, RoundsToNearestEvenLikeAFloat64Reference) {
    std::mt19937_64 rng(1);
    std::uniform_int_distribution<std::uint32_t> bits;
    for (int i = 0; i < 200000; ++i) {
        std::uint32_t u = bits(rng);
        float f;
        std::memcpy(&f, &u, 4);
        if (!std::isfinite(f) || std::fabs(f) > 1e6f) continue;
        const float got = kvq::half_to_float(kvq::float_to_half(f));
        const float want = half_reference(f);
        ASSERT_TRUE(got == want || (got == 0 && want == 0)) << f << " -> " << got << " want " << want;
    }
    EXPECT_EQ(kvq::float_to_half(65504.0f).bits, 0x7bff);
    EXPECT_EQ(kvq::float_to_half(65519.0f).bits, 0x7bff);
    EXPECT_EQ(kvq::float_to_half(65520.0f).bits, 0x7c00);  // tie rounds to even = infinity
    EXPECT_EQ(kvq::float_to_half(-2.0f).bits, 0xc000);
}

TEST(Bf16, RoundsToNearestEven) {
    EXPECT_EQ(kvq::float_to_bf16(1.0f).bits, 0x3f80);
    // 1 + 2^-8 is exactly halfway between two bf16 values: ties to even (down).
    EXPECT_EQ(kvq::float_to_bf16(1.00390625f).bits, 0x3f80);
    EXPECT_EQ(kvq::float_to_bf16(1.01171875f).bits, 0x3f82);  // 1 + 3*2^-8: tie, rounds up to even
    EXPECT_TRUE(std::isnan(kvq::bf16_to_float(kvq::float_to_bf16(NAN))));
    for (std::uint32_t b = 0; b < 65536; ++b) {
        const float f = kvq::bf16_to_float(kvq::bf16_t{static_cast<std::uint16_t>(b)});
        if (!std::isnan(f)) {
            EXPECT_EQ(kvq::float_to_bf16(f).bits, b);
        }
    }
}

TEST(Philox, MatchesPublishedKnownAnswers) {
    // Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
    auto r = kvq::philox4x32_10(0, 0, 0, 0, 0, 0);
    EXPECT_EQ(r.v[0], 0x6627e8d5u);
    EXPECT_EQ(r.v[1], 0xe169c58du);
    EXPECT_EQ(r.v[2], 0xbc57ac4cu);
    EXPECT_EQ(r.v[3], 0x9b00dbd8u);
    r = kvq::philox4x32_10(0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu);
    EXPECT_EQ(r.v[0], 0x408f276du);
    EXPECT_EQ(r.v[1], 0x41c83b0eu);
    EXPECT_EQ(r.v[2], 0xa20bc7c6u);
    EXPECT_EQ(r.v[3], 0x6d5451fdu);
}

TEST(BitPack, SignsAreLsbFirst) {
    float v[16] = {1, -1, 0, 2, -0.0f, 3, -3, 5, /* byte 1 */ -1, -1, -1, -1, -1, -1, -1, 7};
    std::uint8_t out[2];
    kvq::pack_signs(v, 16, out);
    EXPECT_EQ(out[0], 0b10101001);  // bits 0,3,5,7 set; exact 0 and -0 map to 0
    EXPECT_EQ(out[1], 0b10000000);
    for (int j = 0; j < 16; ++j) EXPECT_EQ(kvq::get_sign_bit(out, j), v[j] > 0 ? 1 : 0);
}

TEST(BitPack, CodesRoundTripForEveryWidth) {
    std::mt19937_64 rng(2);
    for (int bits : {1, 2, 3, 4, 8}) {
        std::vector<std::uint8_t> codes(128), packed(kvq::packed_bytes(128, bits));
        for (auto& c : codes) c = static_cast<std::uint8_t>(rng() & ((1u << bits) - 1));
        kvq::pack_codes(codes.data(), 128, bits, packed.data());
        for (int i = 0; i < 128; ++i) ASSERT_EQ(kvq::get_code(packed.data(), i, bits), codes[i]) << bits << " " << i;
    }
    // 2-bit layout is LSB-first within each byte.
    const std::uint8_t c[4] = {1, 2, 3, 0};
    std::uint8_t p = 0;
    kvq::pack_codes(c, 4, 2, &p);
    EXPECT_EQ(p, 0b00111001);
}

TEST(Sketch, PureFunctionOfSeedShapeAndKind) {
    for (auto kind : {kvq::SketchKind::Gaussian, kvq::SketchKind::BlockOrthogonal}) {
        const auto a = kvq::make_jl_sketch(42, 96, 64, kind);
        const auto b = kvq::make_jl_sketch(42, 96, 64, kind);
        const auto c = kvq::make_jl_sketch(43, 96, 64, kind);
        EXPECT_EQ(a, b);
        EXPECT_NE(a, c);
        // A sketch with more rows starts with the same rows for Gaussian S (element-wise counters).
        if (kind == kvq::SketchKind::Gaussian) {
            const auto longer = kvq::make_jl_sketch(42, 128, 64, kind);
            EXPECT_TRUE(std::equal(a.begin(), a.end(), longer.begin()));
        }
    }
}

TEST(Sketch, GaussianMomentsAndOrthogonalRows) {
    const int m = 256, d = 128;
    const auto g = kvq::make_jl_sketch(7, m, d, kvq::SketchKind::Gaussian);
    double mean = 0, var = 0;
    for (float x : g) mean += x;
    mean /= g.size();
    for (float x : g) var += (x - mean) * (x - mean);
    var /= g.size() - 1;
    // 32768 N(0,1) draws: SE of the mean 1/181 = 0.0055, SE of the variance sqrt(2/32768) = 0.0078; 5 SE.
    EXPECT_NEAR(mean, 0.0, 5 * 0.0055);
    EXPECT_NEAR(var, 1.0, 5 * 0.0078);
    const auto o = kvq::make_jl_sketch(7, m, d, kvq::SketchKind::BlockOrthogonal);
    for (int i = 0; i < m; ++i)
        for (int j = i; j < m; ++j) {
            double dd = 0;
            for (int c = 0; c < d; ++c) dd += double(o[i * d + c]) * o[j * d + c];
            if (i == j) {
                EXPECT_NEAR(dd, d, 1e-4 * d);  // norm sqrt(d), float rounding only
            } else if (i / d == j / d) {
                EXPECT_NEAR(dd, 0.0, 1e-4 * d);
            }
        }
}

TEST(Errors, CarryTheOffendingValue) {
    try {
        kvq::QjlParams p;
        p.m = 100;
        kvq::QjlKeyCodec c(p);
        FAIL() << "no exception";
    } catch (const kvq::Error& e) {
        EXPECT_NE(std::string(e.what()).find("100"), std::string::npos) << e.what();
    }
    EXPECT_THROW(kvq::TokenwiseCodec(kvq::TokenwiseParams{128, 5, 32}), kvq::Error);
    EXPECT_THROW(kvq::TokenwiseCodec(kvq::TokenwiseParams{128, 4, 48}), kvq::Error);
    EXPECT_THROW(kvq::IdentityCodec(12, kvq::StorageType::F32), kvq::Error);
    EXPECT_STREQ(kvq::version(), "0.1.0");
}

}  // namespace
