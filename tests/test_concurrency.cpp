// The concurrency contract of docs/CONCURRENCY.md, run by CI under ThreadSanitizer
// (--gtest_filter='Concurrency.*'):
//  - many threads reading one cache (attend, scores, memory(), state(), save_cache) while no
//    append runs on it;
//  - appends to different sequences (KvCache objects) that share BlockPools, from different
//    threads, including a bounded pool that runs out (reservations keep every append all-or-nothing),
//    and readers of one sequence while other sequences append to (and grow) the shared pool;
//  - clear()/destruction of sequences while others append.
#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <thread>

#include "kvq/io/cache_file.hpp"
#include "kvq/kvq.hpp"
#include "test_util.hpp"

namespace {

constexpr int kD = 32;

std::shared_ptr<const kvq::Codec> qjl_keys() {
    kvq::QjlParams p;
    p.head_dim = kD;
    p.m = 64;
    p.m_outlier = 32;
    p.outliers = 2;
    return std::make_shared<kvq::QjlKeyCodec>(p);
}
std::shared_ptr<const kvq::Codec> int4_values() {
    return std::make_shared<kvq::TokenwiseCodec>(kvq::TokenwiseParams{kD, 4, 16});
}
kvq::CacheConfig config() { return {2, 2, kD, 32, {4, kvq::FlushMode::Sliding}, {}, true}; }

// Tokens of sequence `seq`: deterministic, so a sequence can be rebuilt single-threaded.
struct Tokens {
    std::vector<float> k, v;
};
Tokens tokens_of(int seq, int n) {
    std::mt19937_64 rng(1000 + seq);
    const std::size_t e = std::size_t(n) * 2 * kD;
    return {kvq::test::normal_vector(e, rng), kvq::test::normal_vector(e, rng)};
}
// Appends the tokens in chunks of 1..9 to both layers.
void append_all(kvq::KvCache& c, const Tokens& t, int n) {
    int done = 0, step = 1;
    while (done < n) {
        const int m = std::min(step, n - done);
        for (int l = 0; l < 2; ++l) c.append(l, &t.k[std::size_t(done) * 2 * kD], &t.v[std::size_t(done) * 2 * kD], m);
        done += m;
        step = step % 9 + 1;
    }
}

std::vector<float> attention(const kvq::KvCache& c, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<float> all;
    kvq::AttentionWorkspace ws;
    for (int l = 0; l < 2; ++l) {
        const auto q = kvq::test::normal_vector(4 * kD, rng);
        std::vector<float> out(4 * kD), scores(std::size_t(4) * c.tokens(l));
        kvq::attend(c, l, q.data(), 4, c.tokens(l), kvq::ExactTokens{}, 0, out.data(), ws, scores.data());
        all.insert(all.end(), out.begin(), out.end());
        all.insert(all.end(), scores.begin(), scores.end());
    }
    return all;
}

TEST(Concurrency, ManyReadersOnOneCache) {
    kvq::KvCache c(config(), qjl_keys(), int4_values());
    const Tokens t = tokens_of(0, 150);
    append_all(c, t, 150);
    const std::vector<float> want = attention(c, 5);
    const std::vector<std::uint8_t> bytes = kvq::io::save_cache(c);
    const kvq::MemoryReport mem = c.memory();
    std::atomic<int> bad{0};
    std::vector<std::thread> th;
    for (int i = 0; i < 8; ++i)
        th.emplace_back([&] {
            for (int rep = 0; rep < 3; ++rep) {
                if (attention(c, 5) != want) ++bad;
                if (kvq::io::save_cache(c) != bytes) ++bad;
                if (c.memory().key_block_bytes != mem.key_block_bytes) ++bad;
                if (c.tokens(1) != 150 || c.keys(1, 1).encoded != c.keys(0, 1).encoded) ++bad;
            }
        });
    for (auto& x : th) x.join();
    EXPECT_EQ(bad.load(), 0);
}

TEST(Concurrency, AppendsToSequencesSharingPools) {
    const auto kc = qjl_keys();
    const auto vc = int4_values();
    auto kpool = std::make_shared<kvq::BlockPool>(kc->layout(32), 0, 4);  // small chunks: the pool grows often
    auto vpool = std::make_shared<kvq::BlockPool>(vc->layout(32), 0, 4);
    const int S = 8, n = 120;
    std::vector<std::unique_ptr<kvq::KvCache>> seqs;
    for (int s = 0; s < S; ++s) seqs.push_back(std::make_unique<kvq::KvCache>(config(), kc, vc, kpool, vpool));
    std::vector<Tokens> toks;
    for (int s = 0; s < S; ++s) toks.push_back(tokens_of(s, n));

    // A reader of a finished sequence runs while the others append and grow the shared pools.
    kvq::KvCache fixed(config(), kc, vc, kpool, vpool);
    append_all(fixed, toks[0], n);
    const std::vector<float> fixed_want = attention(fixed, 9);
    std::atomic<bool> stop{false};
    std::atomic<int> bad{0};
    std::thread reader([&] {
        while (!stop.load()) {
            if (attention(fixed, 9) != fixed_want) ++bad;
        }
    });
    std::vector<std::thread> th;
    for (int s = 0; s < S; ++s) th.emplace_back([&, s] { append_all(*seqs[s], toks[s], n); });
    for (auto& x : th) x.join();
    stop = true;
    reader.join();
    EXPECT_EQ(bad.load(), 0);

    // Each sequence equals the same sequence built alone (state is independent of block ids).
    std::uint64_t key_blocks = 0;
    for (int s = 0; s < S; ++s) {
        kvq::KvCache alone(config(), kc, vc);
        append_all(alone, toks[s], n);
        EXPECT_EQ(kvq::io::save_cache(*seqs[s]), kvq::io::save_cache(alone)) << s;
        EXPECT_EQ(attention(*seqs[s], 3), attention(alone, 3)) << s;
        key_blocks += seqs[s]->memory().key_block_bytes / kpool->block_bytes();
    }
    key_blocks += fixed.memory().key_block_bytes / kpool->block_bytes();
    EXPECT_EQ(kpool->blocks_in_use(), key_blocks);

    // Half the sequences are cleared / destroyed while the other half append more.
    th.clear();
    for (int s = 0; s < S; ++s)
        th.emplace_back([&, s] {
            if (s % 2) {
                seqs[s]->clear();
                seqs[s].reset();
            } else {
                append_all(*seqs[s], tokens_of(100 + s, 40), 40);
            }
        });
    for (auto& x : th) x.join();
    std::uint64_t in_use = fixed.memory().key_block_bytes / kpool->block_bytes();
    for (auto& c : seqs)
        if (c) in_use += c->memory().key_block_bytes / kpool->block_bytes();
    EXPECT_EQ(kpool->blocks_in_use(), in_use);
}

TEST(Concurrency, BoundedSharedPoolRunsOutWithoutBreakingAnyAppend) {
    const auto f16 = std::make_shared<kvq::IdentityCodec>(kD, kvq::StorageType::F16);
    const kvq::CacheConfig cfg{1, 2, kD, 8, {}, {}, true};
    // One pool for keys and values of every sequence, too small for all of them.
    auto pool = std::make_shared<kvq::BlockPool>(f16->layout(8), 60, 8);
    const int S = 6, n = 64;  // each sequence wants 2 * 2 * 8 = 32 blocks; 60 fit
    std::vector<std::unique_ptr<kvq::KvCache>> seqs;
    for (int s = 0; s < S; ++s) seqs.push_back(std::make_unique<kvq::KvCache>(cfg, f16, f16, pool, pool));
    std::vector<int> appended(S, 0);
    std::vector<std::thread> th;
    for (int s = 0; s < S; ++s)
        th.emplace_back([&, s] {
            std::mt19937_64 rng(s);
            for (int t = 0; t < n; ++t) {
                const auto k = kvq::test::normal_vector(2 * kD, rng), v = kvq::test::normal_vector(2 * kD, rng);
                try {
                    seqs[s]->append(0, k.data(), v.data(), 1);
                    ++appended[s];
                } catch (const kvq::Error&) {
                    // pool exhausted: this append changed nothing; later ones may still fit
                }
            }
        });
    for (auto& x : th) x.join();
    std::uint64_t blocks = 0;
    for (int s = 0; s < S; ++s) {
        EXPECT_EQ(seqs[s]->tokens(0), appended[s]);
        const kvq::MemoryReport m = seqs[s]->memory();
        // Every appended token is in a block (window 0): each append got all its blocks or none.
        EXPECT_EQ(m.encoded_key_elements, std::size_t(appended[s]) * 2 * kD);
        blocks += (m.key_block_bytes + m.value_block_bytes) / pool->block_bytes();
    }
    EXPECT_EQ(pool->blocks_in_use(), blocks);
    EXPECT_LE(blocks, 60u);
    EXPECT_EQ(pool->available(), 60u - blocks);
    seqs.clear();
    EXPECT_EQ(pool->blocks_in_use(), 0u);
}

}  // namespace
