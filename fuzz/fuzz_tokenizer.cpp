// libFuzzer target for the llama2.c tokenizer reader and its encode/decode. The first two bytes
// choose vocab_size (the real format takes it from the model config), the rest is the file.
// Whatever parses is used to encode a fixed text and to decode every id.
// Build: clang++ -std=c++20 -fsanitize=fuzzer,address,undefined -Iinclude fuzz/fuzz_tokenizer.cpp
#include <cstddef>
#include <cstdint>
#include <span>

#include "kvq/io/llama2c_tokenizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size < 2) return 0;
    // 0 and values above the real file's entry count are deliberately reachable.
    const int vocab_size = static_cast<int>(data[0] | (data[1] << 8)) - 1;
    try {
        const kvq::io::Llama2cTokenizer tok(std::span<const std::uint8_t>(data + 2, size - 2), vocab_size);
        int prev = -1;
        for (int id = 0; id < tok.vocab_size(); ++id) {
            (void)tok.decode(id, prev);
            prev = id;
        }
        const auto ids = tok.encode("Hi, caf\xC3\xA9 \xF0\x9F\x98\x80!\n\x80\xFF", true, true);
        (void)tok.decode(ids);
    } catch (const kvq::Error&) {
        // Expected for malformed input, and for vocabularies that cannot encode the text.
    }
    return 0;
}
