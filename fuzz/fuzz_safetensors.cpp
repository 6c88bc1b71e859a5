// libFuzzer target for the safetensors reader: any input must either parse or throw kvq::Error;
// crashes, sanitizer reports, leaks and other exception types are bugs.
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude fuzz/fuzz_safetensors.cpp -o
//   fuzz_safetensors
//   ./fuzz_safetensors -max_total_time=60 NEW_CORPUS_DIR fuzz/corpus/safetensors
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "kvq/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    try {
        const kvq::io::SafetensorsFile f =
            kvq::io::SafetensorsFile::parse(std::vector<std::uint8_t>(data, data + size));
        for (const std::string& name : f.names()) {
            try {
                const std::vector<float> v = f.read_f32(name);
                // Validation promised that the element count matches the byte range.
                if (v.size() != static_cast<std::size_t>(f.info(name).numel())) __builtin_trap();
            } catch (const kvq::Error&) {
                // unsupported dtype for read_f32: expected
            }
        }
    } catch (const kvq::Error&) {
        // malformed input: expected
    }
    return 0;
}
