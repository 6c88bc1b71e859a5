// libFuzzer target for the llama2.c checkpoint reader: any byte buffer must either parse or throw
// kvq::Error; no crash, no sanitizer report, no allocation beyond the input size. A buffer that
// parses is also run through one forward step, to exercise LlamaModel's own validation.
// Build: clang++ -std=c++20 -fsanitize=fuzzer,address,undefined -Iinclude fuzz/fuzz_llama2c.cpp
#include <cstddef>
#include <cstdint>
#include <span>

#include "kvq/io/llama2c.hpp"
#include "kvq/model/llama.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    try {
        auto ck = kvq::io::parse_llama2c(std::span<const std::uint8_t>(data, size));
        const kvq::model::LlamaModel model(ck.config, std::move(ck.weights));
        kvq::model::Fp32AttentionBackend backend(model.config());
        // Weights are finite but may be huge, so logits can overflow to inf/NaN: that is allowed.
        (void)model.forward(0, 0, backend);
    } catch (const kvq::Error&) {
        // Expected for malformed input.
    }
    return 0;
}
