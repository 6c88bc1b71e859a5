#pragma once
// fp16 / bf16 storage types: bit patterns plus exact conversions (round to nearest even), usable
// from host and device code. kvq stores norms, scales and zero points as fp16; arithmetic is fp32.
#include <cstdint>
#include <cstring>

#include "kvq/core/host_device.hpp"

namespace kvq {

struct half_t {
    std::uint16_t bits;
};
struct bf16_t {
    std::uint16_t bits;
};
static_assert(sizeof(half_t) == 2 && sizeof(bf16_t) == 2);

KVQ_HD std::uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
#endif
}
KVQ_HD float bits_float(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, 4);
    return f;
#endif
}

// Largest finite fp16 value; a value whose magnitude rounds above it becomes infinity.
inline constexpr float kHalfMax = 65504.0f;

KVQ_HD half_t float_to_half(float f) {
    const std::uint32_t x = float_bits(f);
    const std::uint32_t sign = (x >> 16) & 0x8000u;
    const std::uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {  // Inf or NaN
        return half_t{static_cast<std::uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u))};
    }
    if (ax >= 0x477ff000u) {  // rounds to >= 65520: overflow to infinity
        return half_t{static_cast<std::uint16_t>(sign | 0x7c00u)};
    }
    if (ax < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
        if (ax < 0x33000000u) return half_t{static_cast<std::uint16_t>(sign)};  // < 2^-25 rounds to 0
        const std::uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
        const int shift = 126 - static_cast<int>(ax >> 23);  // 14..24 for this range
        const std::uint32_t q = mant >> shift;
        const std::uint32_t rem = mant & ((1u << shift) - 1u);
        const std::uint32_t halfway = 1u << (shift - 1);
        std::uint32_t r = q + ((rem > halfway || (rem == halfway && (q & 1u))) ? 1u : 0u);
        return half_t{static_cast<std::uint16_t>(sign | r)};
    }
    // Normal: rebias exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
    std::uint32_t h = ((ax - 0x38000000u) >> 13);
    const std::uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is correct
    return half_t{static_cast<std::uint16_t>(sign | h)};
}

KVQ_HD float half_to_float(half_t h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
    const std::uint32_t exp = (h.bits >> 10) & 0x1fu;
    std::uint32_t mant = h.bits & 0x3ffu;
    if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
        if (mant == 0) return bits_float(sign);
        // subnormal: value = mant * 2^-24, exactly representable in float
        const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

KVQ_HD bf16_t float_to_bf16(float f) {
    const std::uint32_t x = float_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<std::uint16_t>((x >> 16) | 0x40u)};
    const std::uint32_t r = x + 0x7fffu + ((x >> 16) & 1u);
    return bf16_t{static_cast<std::uint16_t>(r >> 16)};
}

KVQ_HD float bf16_to_float(bf16_t b) { return bits_float(static_cast<std::uint32_t>(b.bits) << 16); }

// Rounds through fp16 and back: the value a stored fp16 factor will have when read.
KVQ_HD float round_to_half(float f) { return half_to_float(float_to_half(f)); }

}  // namespace kvq
