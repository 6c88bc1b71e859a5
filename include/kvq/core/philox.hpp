#pragma once
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a
// counter-based generator, so element i of any random stream is a pure function of (key, i) and
// host and device code draw the same numbers without sharing state.
#include <cstdint>

#include "kvq/core/host_device.hpp"

namespace kvq {

struct Philox4x32 {
    std::uint32_t v[4];
};

namespace detail {
KVQ_HD void mulhilo32(std::uint32_t a, std::uint32_t b, std::uint32_t& hi, std::uint32_t& lo) {
    const std::uint64_t p = static_cast<std::uint64_t>(a) * b;
    hi = static_cast<std::uint32_t>(p >> 32);
    lo = static_cast<std::uint32_t>(p);
}
}  // namespace detail

// counter: 128 bits (c0..c3); key: 64 bits (k0, k1). Ten rounds, the published constants.
KVQ_HD Philox4x32 philox4x32_10(std::uint32_t c0, std::uint32_t c1, std::uint32_t c2, std::uint32_t c3,
                                std::uint32_t k0, std::uint32_t k1) {
    constexpr std::uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
    constexpr std::uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
    for (int r = 0; r < 10; ++r) {
        std::uint32_t hi0, lo0, hi1, lo1;
        detail::mulhilo32(M0, c0, hi0, lo0);
        detail::mulhilo32(M1, c2, hi1, lo1);
        const std::uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
        c0 = n0;
        c1 = n1;
        c2 = n2;
        c3 = n3;
        k0 += W0;
        k1 += W1;
    }
    return Philox4x32{{c0, c1, c2, c3}};
}

// Uniform double in (0, 1) from two 32-bit words (53 bits), never exactly 0 or 1.
KVQ_HD double uniform_open01(std::uint32_t hi, std::uint32_t lo) {
    const std::uint64_t bits = (static_cast<std::uint64_t>(hi) << 21) ^ (lo >> 11);
    return (static_cast<double>(bits & ((1ull << 53) - 1)) + 0.5) * (1.0 / 9007199254740992.0);
}

}  // namespace kvq
