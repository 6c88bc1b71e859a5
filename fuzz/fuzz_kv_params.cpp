// libFuzzer target for the WKV KV parameter file reader (include/kvq/io/kv_params_file.hpp): any
// input must either parse or throw kvq::Error; crashes, sanitizer reports and other exception
// types are bugs. An accepted file must re-serialize to the same bytes.
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude -I/usr/include/eigen3 \
//       fuzz/fuzz_kv_params.cpp -o fuzz_kv_params
//   ./fuzz_kv_params -max_total_time=60 -max_len=4096 NEW_CORPUS_DIR
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvq/io/kv_params_file.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    try {
        const kvq::WkvParams p = kvq::io::parse_wkv_params(data, size);
        const std::vector<std::uint8_t> again = kvq::io::serialize_wkv_params(p);
        if (again.size() != size || std::memcmp(again.data(), data, size) != 0) __builtin_trap();
    } catch (const kvq::Error&) {
        // malformed file: expected
    }
    return 0;
}
