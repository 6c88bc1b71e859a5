// libFuzzer target for the W4 calibration file reader (include/kvq/io/w4_file.hpp): any input must
// either parse or throw kvq::Error; crashes, sanitizer reports and other exception types are bugs.
// An accepted file must re-serialize to the same bytes. Seeds: fuzz/corpus/w4_file/ (a 2-layer
// dim-8 model's file with and without KV parameters).
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude -I/usr/include/eigen3 \
//       fuzz/fuzz_w4_file.cpp -o fuzz_w4_file
//   ./fuzz_w4_file -max_total_time=60 -max_len=8192 fuzz/corpus/w4_file
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvq/io/w4_file.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    try {
        const kvq::io::W4Calibration w = kvq::io::parse_w4_calibration(data, size);
        const std::vector<std::uint8_t> again = kvq::io::serialize_w4_calibration(w);
        if (again.size() != size || std::memcmp(again.data(), data, size) != 0) __builtin_trap();
    } catch (const kvq::Error&) {
        // malformed file: expected
    }
    return 0;
}
