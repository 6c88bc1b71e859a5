// KvCacheBackend: the real stories260K model with its KV cache held by kvq::KvCache.
// Skipped when the model files are absent (see shared/models/README.md).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "kvq/io/llama2c.hpp"
#include "kvq/io/llama2c_tokenizer.hpp"
#include "kvq/kvq.hpp"
#include "kvq/model/kv_cache_backend.hpp"
#include "kvq/model/llama.hpp"

#ifndef KVQ_SHARED_DIR
#define KVQ_SHARED_DIR "../shared"
#endif

namespace {

using kvq::model::Fp32AttentionBackend;
using kvq::model::KvCacheBackend;
using kvq::model::LlamaModel;

const std::string kModel = std::string(KVQ_SHARED_DIR) + "/models/stories260K.bin";
const std::string kTok = std::string(KVQ_SHARED_DIR) + "/models/tok512.bin";

#define SKIP_WITHOUT_MODEL()                                                                          \
    do {                                                                                              \
        if (!std::filesystem::exists(kModel) || !std::filesystem::exists(kTok))                       \
            GTEST_SKIP() << "stories260K.bin / tok512.bin not found under " KVQ_SHARED_DIR "/models"; \
    } while (0)

const char* const kFox = "One day, a clever fox found a shiny key under the old oak tree.";
// A longer teacher-forced text (a few hundred tokens) so that blocks fill and quantization matters.
const char* const kStory =
    "Once upon a time, there was a little girl named Mia. Mia had a small red ball. She loved to play "
    "with it in the garden. One sunny day, Mia threw the ball very high. It went over the fence and "
    "into the yard of an old man. Mia was scared, but she went to the door and knocked. The old man "
    "opened the door and smiled. \"Is this your ball?\" he asked. Mia nodded. \"Thank you,\" she said. "
    "The old man gave her the ball and a cookie too. Mia was very happy. She ran home and told her mom "
    "about the kind old man. Her mom said, \"It is good to be brave and polite.\" The next day, Mia "
    "made a picture for the old man. It had a big sun, a red ball and two smiling friends. The old "
    "man put the picture on his wall. From that day on, Mia and the old man were good friends, and "
    "they played with the red ball together in the garden every day.";

struct Fixture {
    LlamaModel model;
    kvq::io::Llama2cTokenizer tok;
};

const Fixture& fixture() {
    static const Fixture f = [] {
        auto ck = kvq::io::load_llama2c(kModel);
        auto tok = kvq::io::load_llama2c_tokenizer(kTok, ck.config.vocab_size);
        return Fixture{LlamaModel(ck.config, std::move(ck.weights)), std::move(tok)};
    }();
    return f;
}

std::unique_ptr<KvCacheBackend> backend_for(const LlamaModel& m, std::shared_ptr<const kvq::Codec> k,
                                            std::shared_ptr<const kvq::Codec> v, int block_tokens = 64) {
    kvq::CacheConfig cfg;
    cfg.block_tokens = block_tokens;
    return std::make_unique<KvCacheBackend>(m.config(), cfg, std::move(k), std::move(v));
}

std::unique_ptr<KvCacheBackend> identity_backend(const LlamaModel& m, int block_tokens = 64) {
    auto c = std::make_shared<kvq::IdentityCodec>(m.config().head_dim, kvq::StorageType::F32);
    return backend_for(m, c, c, block_tokens);
}

std::unique_ptr<KvCacheBackend> tokenwise_backend(const LlamaModel& m, int bits) {
    kvq::TokenwiseParams p;
    p.head_dim = m.config().head_dim;
    p.bits = bits;
    p.group = std::min(32, p.head_dim);  // head_dim 8 here
    auto c = std::make_shared<kvq::TokenwiseCodec>(p);
    return backend_for(m, c, c);
}

// The fp32 identity cache reproduces Fp32AttentionBackend's logits over a 100-token greedy run
// (the cache scales by multiplication and accumulates in double, hence not bit-identical).
TEST(KvCacheBackend, IdentityF32MatchesFp32BackendOverGreedyRun) {
    SKIP_WITHOUT_MODEL();
    const LlamaModel& model = fixture().model;
    for (int block : {64, 16, 1}) {
        Fp32AttentionBackend ref(model.config());
        auto kv = identity_backend(model, block);
        int tok_ref = kvq::io::Llama2cTokenizer::kBos, tok_kv = tok_ref;
        double worst = 0;
        for (int pos = 0; pos < 100; ++pos) {
            const auto a = model.forward(tok_ref, pos, ref);
            const auto b = model.forward(tok_kv, pos, *kv);
            ASSERT_EQ(a.size(), b.size());
            // Relative to the logit vector (max-norm): individual logits near zero carry the
            // absolute rounding of the 64-term classifier dot products, so an element-wise
            // relative bound would measure cancellation, not the cache.
            double scale = 0, diff = 0;
            for (std::size_t i = 0; i < a.size(); ++i) {
                ASSERT_TRUE(std::isfinite(b[i])) << "pos " << pos << " logit " << i;
                scale = std::max(scale, std::abs(double(a[i])));
                diff = std::max(diff, std::abs(double(a[i]) - double(b[i])));
            }
            EXPECT_LE(diff, 1e-5 * scale) << "block " << block << " pos " << pos;
            worst = std::max(worst, diff / scale);
            tok_ref = kvq::model::argmax(a);
            tok_kv = kvq::model::argmax(b);
            ASSERT_EQ(tok_ref, tok_kv) << "greedy paths diverge at pos " << pos;
        }
        EXPECT_EQ(kv->cache().tokens(0), 100);
        std::printf("[ block %2d ] max |logit diff| / max |logit| over 100 greedy steps: %.3g\n", block, worst);
    }
}

TEST(KvCacheBackend, GenerateGreedyMatchesAndResetClears) {
    SKIP_WITHOUT_MODEL();
    const LlamaModel& model = fixture().model;
    Fp32AttentionBackend ref(model.config());
    auto kv = identity_backend(model);
    const std::vector<int> prompt = {kvq::io::Llama2cTokenizer::kBos};
    const auto a = model.generate_greedy(prompt, 120, ref, -1);
    const auto b = model.generate_greedy(prompt, 120, *kv, -1);
    EXPECT_EQ(a, b);
    EXPECT_GT(kv->bytes_in_use(), 0u);
    const auto again = model.generate_greedy(prompt, 120, *kv, -1);  // generate_greedy resets first
    EXPECT_EQ(again, b);
    kv->reset();
    EXPECT_EQ(kv->cache().tokens(0), 0);
    EXPECT_EQ(kv->bytes_in_use(), 0u);
    // Out-of-order positions are rejected.
    std::vector<float> q(model.config().dim), k(model.config().kv_dim()), v(k.size()), out(q.size());
    EXPECT_THROW(kv->decode(0, 3, q.data(), k.data(), v.data(), out.data()), kvq::Error);
    EXPECT_THROW(kv->decode(model.config().n_layers, 0, q.data(), k.data(), v.data(), out.data()), kvq::Error);
}

TEST(KvCacheBackend, IdentityNllMatchesGolden) {
    SKIP_WITHOUT_MODEL();
    const auto& f = fixture();
    const auto tokens = f.tok.encode(kFox, /*bos=*/true, /*eos=*/false);
    ASSERT_EQ(tokens.size(), 35u);
    auto kv = identity_backend(f.model);
    const double nll = f.model.sequence_nll(tokens, *kv);
    std::printf("identity cache nll %.6f (golden 54.404121)\n", nll);
    EXPECT_NEAR(nll, 54.404121, 1e-4 * 54.404121);
    // Block size must not matter for the identity cache.
    auto kv1 = identity_backend(f.model, 1);
    EXPECT_NEAR(f.model.sequence_nll(tokens, *kv1), nll, 1e-6 * nll);
}

TEST(KvCacheBackend, QuantizedPerplexityOrdering) {
    SKIP_WITHOUT_MODEL();
    const auto& f = fixture();
    const auto tokens = f.tok.encode(kStory, /*bos=*/true, /*eos=*/false);
    ASSERT_GT(tokens.size(), 150u);
    ASSERT_LE(tokens.size(), std::size_t(f.model.config().seq_len));
    const double n = double(tokens.size() - 1);
    Fp32AttentionBackend ref(f.model.config());
    const double ppl32 = std::exp(f.model.sequence_nll(tokens, ref) / n);
    auto ppl_of = [&](int bits) {
        auto kv = tokenwise_backend(f.model, bits);
        return std::exp(f.model.sequence_nll(tokens, *kv) / n);
    };
    const double p8 = ppl_of(8), p4 = ppl_of(4), p2 = ppl_of(2);
    std::printf("%zu tokens: ppl fp32 %.4f  int8 %.4f  int4 %.4f  int2 %.4f\n", tokens.size(), ppl32, p8, p4, p2);
    for (double p : {ppl32, p8, p4, p2}) EXPECT_TRUE(std::isfinite(p));
    EXPECT_NEAR(p8, ppl32, 0.01 * ppl32);
    EXPECT_GT(p4, p8);
    EXPECT_GT(p2, p4);
}

TEST(KvCacheBackend, QjlKeysRunFinite) {
    SKIP_WITHOUT_MODEL();
    const auto& f = fixture();
    const auto tokens = f.tok.encode(kStory, true, false);
    for (int outliers : {0, 2}) {
        kvq::QjlParams q;
        q.head_dim = f.model.config().head_dim;
        q.m = 256;
        q.m_outlier = 64;
        q.outliers = outliers;
        kvq::TokenwiseParams vp;
        vp.head_dim = q.head_dim;
        vp.bits = 4;
        vp.group = q.head_dim;
        auto kv =
            backend_for(f.model, std::make_shared<kvq::QjlKeyCodec>(q), std::make_shared<kvq::TokenwiseCodec>(vp));
        const double nll = f.model.sequence_nll(tokens, *kv);
        std::printf("qjl m=256 outliers=%d: ppl %.4f\n", outliers, std::exp(nll / double(tokens.size() - 1)));
        EXPECT_TRUE(std::isfinite(nll));
        const kvq::MemoryReport r = kv->memory();
        EXPECT_GT(r.key_block_bytes, 0u);
    }
}

}  // namespace
