// How an inference engine uses kvq: the code README.md's "Integrating kvq into an engine" walks
// through, compiled and run by ctest (it checks its own results and exits non-zero on a mismatch).
//
//   1. one pair of BlockPools (keys, values) shared by every sequence, bounded like an engine's
//      KV memory budget; each sequence is a KvCache drawing pages from them;
//   2. per layer: prefill of the prompt, then one decode_step per generated token (past-only
//      quantization: the current token's K/V are used exactly, then appended);
//   3. prefix caching: the pages of a shared prompt are saved once (save_cache_prefix) and restored
//      into a new sequence in the same pools, which then attends exactly as the original would;
//   4. the paged view a custom kernel (e.g. kvq's CUDA decode) reads: page table + block bytes.
// The "model" is random q/k/v so the example runs anywhere; kvq-llama is the real-model version.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "kvq/io/cache_file.hpp"
#include "kvq/kvq.hpp"

namespace {
constexpr int kLayers = 2, kKvHeads = 2, kQHeads = 8, kHeadDim = 128, kBlock = 64;

std::vector<float> randn(std::size_t n, std::mt19937& rng) {
    std::normal_distribution<float> nd;
    std::vector<float> v(n);
    for (float& x : v) x = nd(rng);
    return v;
}

// What one layer of a model hands to attention for n new tokens: post-RoPE q [n][Hq][d], k, v
// [n][Hkv][d]. Seeded by (token position, layer), so two sequences with the same prompt get the
// same vectors, as they would from a real model.
struct Qkv {
    std::vector<float> q, k, v;
};
Qkv model_layer(int first_token, int n, int layer) {
    Qkv r;
    for (int t = first_token; t < first_token + n; ++t) {
        std::mt19937 rng(1000003u * t + 7u * layer);
        auto q = randn(std::size_t(kQHeads) * kHeadDim, rng), k = randn(std::size_t(kKvHeads) * kHeadDim, rng),
             v = randn(std::size_t(kKvHeads) * kHeadDim, rng);
        r.q.insert(r.q.end(), q.begin(), q.end());
        r.k.insert(r.k.end(), k.begin(), k.end());
        r.v.insert(r.v.end(), v.begin(), v.end());
    }
    return r;
}

// Prefill `n` prompt tokens, then decode `steps` tokens; returns the last step's attention output
// of every layer ([layer][Hq * d]).
std::vector<std::vector<float>> run(kvq::KvCache& cache, int prompt, int steps, kvq::AttentionWorkspace& ws) {
    std::vector<std::vector<float>> last(kLayers);
    for (int l = 0; l < kLayers; ++l) {
        const int have = cache.tokens(l);  // > 0 when a cached prefix was restored
        if (prompt > have) {
            const Qkv p = model_layer(have, prompt - have, l);
            std::vector<float> out(p.q.size());
            kvq::prefill(cache, l, p.q.data(), kQHeads, p.k.data(), p.v.data(), prompt - have, out.data(), ws);
        }
    }
    for (int s = 0; s < steps; ++s)
        for (int l = 0; l < kLayers; ++l) {
            const Qkv t = model_layer(prompt + s, 1, l);
            last[l].assign(t.q.size(), 0.0f);
            kvq::decode_step(cache, l, t.q.data(), kQHeads, t.k.data(), t.v.data(), last[l].data(), ws);
        }
    return last;
}

int failures = 0;
void expect(bool ok, const char* what) {
    std::printf("  [%s] %s\n", ok ? "ok" : "FAILED", what);
    failures += ok ? 0 : 1;
}
}  // namespace

int main() {
    try {
        // QJL keys (m = 256, block-orthogonal sketch) and 2-bit values, 64-token pages.
        kvq::QjlParams qp;
        qp.head_dim = kHeadDim;
        qp.m = 256;
        qp.sketch = kvq::SketchKind::BlockOrthogonal;
        auto key_codec = std::make_shared<kvq::QjlKeyCodec>(qp);
        auto value_codec = std::make_shared<kvq::TokenwiseCodec>(kvq::TokenwiseParams{kHeadDim, 2, 32});
        const kvq::CacheConfig cfg{kLayers, kKvHeads, kHeadDim, kBlock, {}, {}, /*past_only=*/true};

        // 1. Shared, bounded pools: 512 pages each (the engine's KV budget).
        auto key_pool = std::make_shared<kvq::BlockPool>(key_codec->layout(kBlock), 512);
        auto value_pool = std::make_shared<kvq::BlockPool>(value_codec->layout(kBlock), 512);
        std::printf("pages: key %zu B, value %zu B (%.2f bits/element in all)\n", key_pool->block_bytes(),
                    value_pool->block_bytes(),
                    0.5 * (key_codec->bits_per_element(kBlock) + value_codec->bits_per_element(kBlock)));

        // 2. Sequence A: a 256-token prompt, 8 decode steps.
        kvq::AttentionWorkspace ws;
        kvq::KvCache seq_a(cfg, key_codec, value_codec, key_pool, value_pool);
        const auto out_a = run(seq_a, 256, 8, ws);
        const kvq::MemoryReport m = seq_a.memory();
        // QJL encodes whole 32-token groups, so up to 31 newest tokens wait in an fp32 window.
        std::printf("sequence A: %d tokens, %zu KiB of pages + %zu KiB fp32 window (fp16 would be %zu KiB)\n",
                    seq_a.tokens(0), (m.key_block_bytes + m.value_block_bytes) / 1024, m.window_elements * 4 / 1024,
                    std::size_t(2) * kLayers * kKvHeads * seq_a.tokens(0) * kHeadDim * 2 / 1024);

        // 3. Prefix caching: the first 256 tokens (4 whole pages per head) of A, restored into B.
        const std::vector<std::uint8_t> prefix = kvq::io::save_cache_prefix(seq_a, 256);
        kvq::KvCache seq_b(cfg, key_codec, value_codec, key_pool, value_pool);
        kvq::io::load_cache_into(seq_b, prefix);
        std::printf("prefix: %zu bytes for 256 tokens; B starts with %d tokens\n", prefix.size(), seq_b.tokens(0));
        const auto out_b = run(seq_b, 256, 8, ws);  // prefill skipped: the prefix is there
        bool same = true;
        for (int l = 0; l < kLayers; ++l)
            same = same && std::memcmp(out_a[l].data(), out_b[l].data(), out_a[l].size() * sizeof(float)) == 0;
        expect(same, "B (restored prefix + same decode) gives bit-identical attention to A");

        // 4. The paged view a custom kernel reads: page ids in token order, bytes in docs/FORMAT.md.
        const kvq::StreamView kv = seq_a.keys(/*layer=*/1, /*head=*/0);
        const int pages = (kv.encoded + kv.block_tokens - 1) / kv.block_tokens;
        std::printf("layer 1 head 0 keys: %d tokens in %d pages:", kv.encoded, pages);
        for (int p = 0; p < pages; ++p) std::printf(" %u", kv.pages[p]);
        std::printf("\n");
        // Score the 64 tokens of the first page straight from its bytes with the codec (what a
        // kernel does in bulk) and compare with the exact q.k. One QJL estimate has standard
        // deviation about sqrt(pi / 2m) |q| |k| (~10 here, as large as q.k itself), so a single
        // score says little; the correlation over the page shows the estimator at work (expected
        // ~0.75 for Gaussian q, k at m = 256; the check uses 0.4, > 5 standard errors below).
        const Qkv probe = model_layer(9999, 1, 1);
        kvq::PreparedQuery pq;
        key_codec->prepare(probe.q.data(), pq);  // query head 0 belongs to KV head 0
        std::vector<float> est(kBlock);
        key_codec->score(pq, key_pool->data(kv.pages[0]), kBlock, 0, kBlock, est.data());
        double sx = 0, sy = 0, sxx = 0, syy = 0, sxy = 0;
        for (int t = 0; t < kBlock; ++t) {
            const Qkv tok = model_layer(t, 1, 1);
            double exact = 0;
            for (int c = 0; c < kHeadDim; ++c) exact += double(probe.q[c]) * tok.k[c];
            sx += exact, sy += est[t], sxx += exact * exact, syy += double(est[t]) * est[t], sxy += exact * est[t];
        }
        const double n = kBlock, corr = (sxy - sx * sy / n) / std::sqrt((sxx - sx * sx / n) * (syy - sy * sy / n));
        std::printf("QJL scores of page 0 vs exact q.k: correlation %.3f over %d keys\n", corr, kBlock);
        expect(corr > 0.4, "scores read from the page track the exact inner products");

        // Sequences end: their pages go back to the shared pools.
        const std::uint64_t in_use = key_pool->blocks_in_use();
        seq_b.clear();
        seq_a.clear();
        std::printf("key pages in use: %llu -> %llu after both sequences ended\n", (unsigned long long)in_use,
                    (unsigned long long)key_pool->blocks_in_use());
        expect(key_pool->blocks_in_use() == 0 && value_pool->blocks_in_use() == 0, "all pages returned");
    } catch (const kvq::Error& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return failures == 0 ? 0 : 1;
}
