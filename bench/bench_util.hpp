#pragma once
// Shared by the CPU benchmark binaries: seeded N(0, 1) data.
#include <cstdint>
#include <random>
#include <vector>

namespace kvq::bench {

inline std::vector<float> randn(std::size_t n, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> nd(0, 1);
    std::vector<float> v(n);
    for (auto& x : v) x = nd(rng);
    return v;
}

}  // namespace kvq::bench
