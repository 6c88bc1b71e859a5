// Packaging check: compiles against an installed (or add_subdirectory'd) kvq and runs.
#include <cstdio>

#include <kvq/kvq.hpp>

int main() {
    const kvq::half_t one = kvq::float_to_half(1.0f);
    if (one.bits != 0x3c00u || kvq::half_to_float(one) != 1.0f) {
        std::fprintf(stderr, "kvq consumer: float_to_half(1.0f) gave 0x%04x\n", one.bits);
        return 1;
    }
    try {
        throw kvq::Error("kvq consumer: test error");
    } catch (const kvq::Error& e) {
        std::printf("kvq consumer OK: float_to_half(1.0f) = 0x%04x, caught \"%s\"\n", one.bits, e.what());
    }
    return 0;
}
