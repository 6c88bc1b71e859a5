// libFuzzer target for the GGUF reader: any byte buffer must either parse or throw kvq::Error; no
// crash, no sanitizer report, no allocation beyond a small multiple of the input size. A buffer
// that parses has every tensor dequantized and is tried as a GPT-2 BPE tokenizer.
// Build: clang++ -std=c++20 -fsanitize=fuzzer,address,undefined -Iinclude fuzz/fuzz_gguf.cpp
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvq/io/gguf.hpp"
#include "kvq/io/gpt2_bpe_tokenizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    try {
        const kvq::io::GgufFile f(std::vector<std::uint8_t>(data, data + size));
        for (const auto& t : f.tensors()) (void)f.dequantize(t);
        if (f.has("tokenizer.ggml.model")) {
            const auto tok = kvq::io::Gpt2BpeTokenizer::from_gguf(f);
            (void)tok.decode(tok.encode("Hello world 42 <|im_start|>"));
        }
    } catch (const kvq::Error&) {
        // Expected for malformed input.
    }
    return 0;
}
