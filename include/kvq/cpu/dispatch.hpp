#pragma once
// Run-time SIMD dispatch for the CPU hot paths. Nothing is compiled with -march=native: the AVX2
// and AVX-512 kernels are functions with __attribute__((target(...))) and are only called when
// the running CPU reports the features. The scalar paths are always built.
//
// Forcing scalar: environment variable KVQ_FORCE_SCALAR=1 (read once), or kvq::cpu::set_simd_limit().
#include <atomic>
#include <cstdlib>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define KVQ_X86_SIMD 1
#include <cpuid.h>
#include <immintrin.h>
#define KVQ_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,popcnt")))
#define KVQ_TARGET_AVX512 \
    __attribute__((target("avx2,fma,f16c,popcnt,avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq")))
// AVX-512 plus VNNI (VPDPBUSD): the grouped QJL scorer. Checked separately (has_avx512_vnni()):
// some AVX-512 CPUs (Skylake-SP) lack VNNI and keep the VPOPCNTQ kernels.
#define KVQ_TARGET_AVX512VNNI \
    __attribute__((target("avx2,fma,f16c,popcnt,avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,avx512vnni")))
#else
#define KVQ_X86_SIMD 0
#endif

namespace kvq::cpu {

enum class SimdLevel : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

inline const char* to_string(SimdLevel l) {
    return l == SimdLevel::Avx512 ? "avx512" : (l == SimdLevel::Avx2 ? "avx2" : "scalar");
}

// What the hardware supports (AVX-512 here means F, BW, DQ, VL and VPOPCNTDQ).
inline SimdLevel detected_simd_level() {
#if KVQ_X86_SIMD
    static const SimdLevel l = [] {
        __builtin_cpu_init();
        // F16C through CPUID (leaf 1, ECX bit 29): clang 14's __builtin_cpu_supports rejects "f16c".
        unsigned a = 0, b = 0, c = 0, d = 0;
        const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512vpopcntdq") && f16c)
            return SimdLevel::Avx512;
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c && __builtin_cpu_supports("popcnt"))
            return SimdLevel::Avx2;
        return SimdLevel::Scalar;
    }();
    return l;
#else
    return SimdLevel::Scalar;
#endif
}

namespace detail {
inline std::atomic<int>& simd_limit_ref() {
    static std::atomic<int> limit{[] {
        const char* e = std::getenv("KVQ_FORCE_SCALAR");
        return (e && e[0] && e[0] != '0') ? 0 : 2;
    }()};
    return limit;
}
}  // namespace detail

// Caps the level used by every kernel (Scalar forces the scalar paths); returns the previous cap.
inline SimdLevel set_simd_limit(SimdLevel cap) {
    return static_cast<SimdLevel>(detail::simd_limit_ref().exchange(static_cast<int>(cap)));
}
inline void force_scalar(bool on) { set_simd_limit(on ? SimdLevel::Scalar : SimdLevel::Avx512); }

// The level the kernels use now: min(detected, cap).
inline SimdLevel simd_level() {
    const int d = static_cast<int>(detected_simd_level()), c = detail::simd_limit_ref().load(std::memory_order_relaxed);
    return static_cast<SimdLevel>(d < c ? d : c);
}

// Whether the AVX-512 level may also use VNNI (VPDPBUSD): the hardware has it and the current
// level is Avx512 (a cap to Avx2 or Scalar turns it off with the rest of AVX-512).
inline bool has_avx512_vnni() {
#if KVQ_X86_SIMD
    static const bool hw = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512vnni") != 0;
    }();
    return hw && simd_level() == SimdLevel::Avx512;
#else
    return false;
#endif
}

// RAII cap, for tests and benchmarks.
class ScopedSimdLimit {
public:
    explicit ScopedSimdLimit(SimdLevel cap) : prev_(set_simd_limit(cap)) {}
    ~ScopedSimdLimit() { set_simd_limit(prev_); }
    ScopedSimdLimit(const ScopedSimdLimit&) = delete;
    ScopedSimdLimit& operator=(const ScopedSimdLimit&) = delete;

private:
    SimdLevel prev_;
};

}  // namespace kvq::cpu
