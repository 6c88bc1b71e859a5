#pragma once
// Helpers shared by the CPU tests: seeded random data and float64 reference arithmetic.
#include <cmath>
#include <random>
#include <vector>

namespace kvq::test {

inline std::vector<float> normal_vector(std::size_t n, std::mt19937_64& rng, float sigma = 1.0f) {
    std::normal_distribution<float> nd(0.0f, sigma);
    std::vector<float> v(n);
    for (auto& x : v) x = nd(rng);
    return v;
}

inline double dot64(const float* a, const float* b, int n) {
    double s = 0;
    for (int i = 0; i < n; ++i) s += double(a[i]) * b[i];
    return s;
}

inline double norm64(const float* a, int n) { return std::sqrt(dot64(a, a, n)); }

// ||a - b|| / ||b|| over two equally long arrays.
template <class A, class B>
double rel_err(const A& a, const B& b) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < b.size(); ++i) {
        num += (double(a[i]) - double(b[i])) * (double(a[i]) - double(b[i]));
        den += double(b[i]) * double(b[i]);
    }
    return std::sqrt(num / den);
}

}  // namespace kvq::test
