// libFuzzer target for method specs (include/kvq/eval/method_spec.hpp): any input must either be
// accepted or throw kvq::Error, from the parser and from the codec factory alike; crashes,
// sanitizer reports and other exception types are bugs. An accepted spec must also survive a
// round trip through its canonical form.
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude -I/usr/include/eigen3 \
//       fuzz/fuzz_method_spec.cpp -o fuzz_method_spec
//   ./fuzz_method_spec -max_total_time=60 -max_len=256 NEW_CORPUS_DIR fuzz/corpus/method_spec
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "kvq/eval/method_spec.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    try {
        const kvq::eval::MethodSpec spec = kvq::eval::parse_method_spec(text);
        if (!(kvq::eval::parse_method_spec(spec.canonical()) == spec)) __builtin_trap();
        for (int head_dim : {64, 128}) {
            try {
                const kvq::eval::Method m = kvq::eval::make_method(spec, head_dim, 0);
                if (!m.key_codec || !m.value_codec || m.key_codec->head_dim() != head_dim) __builtin_trap();
                (void)m.description();
                (void)m.cache_config(1, 1, 64);
            } catch (const kvq::Error&) {
                // out-of-range value for this head dimension: expected
            }
        }
    } catch (const kvq::Error&) {
        // malformed spec: expected
    }
    return 0;
}
