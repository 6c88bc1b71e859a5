// libFuzzer target for the cache file reader (kvq/io/cache_file.hpp, docs/CACHE_FILE.md): any
// input must either load or throw kvq::Error; crashes, sanitizer reports, leaks and other
// exception types are bugs. Byte 0 of the input picks a mode, the rest is the file:
//   bit 0 set: every section's CRC is recomputed first, so that mutations reach the checks behind
//              the CRCs (shapes, codec parameters, token counts, block contents, windows).
// A file that loads must re-save to bytes that load to the same bytes again, and attention over
// every layer must run.
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude -I/usr/include/eigen3 \
//       fuzz/fuzz_cache_file.cpp -o fuzz_cache_file
//   ./fuzz_cache_file -max_total_time=60 -max_len=8192 NEW_CORPUS_DIR fuzz/corpus/cache_file
// Seeds (fuzz/corpus/cache_file/) come from this file built without libFuzzer:
//   g++ -std=c++20 -DKVQ_CACHE_FILE_MAKE_SEEDS -Iinclude -I/usr/include/eigen3 fuzz/fuzz_cache_file.cpp -o mk
//   ./mk fuzz/corpus/cache_file
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvq/cache/attention.hpp"
#include "kvq/io/cache_file.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size < 1) return 0;
    std::vector<std::uint8_t> file(data + 1, data + size);
    if (data[0] & 1) kvq::io::detail::refresh_section_crcs(file);
    try {
        const std::unique_ptr<kvq::KvCache> c = kvq::io::load_cache(file);
        const std::vector<std::uint8_t> s1 = kvq::io::save_cache(*c);
        if (kvq::io::save_cache(*kvq::io::load_cache(s1)) != s1) __builtin_trap();
        const kvq::CacheConfig& cfg = c->config();
        std::vector<float> q(std::size_t(cfg.n_kv_heads) * cfg.head_dim, 0.25f), out(q.size());
        kvq::AttentionWorkspace ws;
        for (int l = 0; l < cfg.n_layers; ++l)
            if (c->tokens(l) > 0)
                kvq::attend(*c, l, q.data(), cfg.n_kv_heads, c->tokens(l), kvq::ExactTokens{}, 0, out.data(), ws);
    } catch (const kvq::Error&) {
        // malformed input: expected
    }
    return 0;
}

#ifdef KVQ_CACHE_FILE_MAKE_SEEDS
#include <cstdio>
#include <random>
#include <string>

#include "kvq/kvq.hpp"

namespace {
void write_seed(const std::string& dir, const std::string& name, kvq::KvCache& c, int tokens) {
    std::mt19937_64 rng(tokens);
    std::normal_distribution<float> nd;
    const int H = c.config().n_kv_heads, d = c.config().head_dim;
    for (int l = 0; l < c.config().n_layers; ++l) {
        std::vector<float> k(std::size_t(tokens) * H * d), v(k.size());
        for (auto& x : k) x = nd(rng);
        for (auto& x : v) x = nd(rng);
        c.append(l, k.data(), v.data(), tokens);
    }
    std::vector<std::uint8_t> bytes = kvq::io::save_cache(c);
    for (std::uint8_t mode : {0, 1}) {
        std::vector<std::uint8_t> seed{mode};
        seed.insert(seed.end(), bytes.begin(), bytes.end());
        const std::string path = dir + "/" + name + (mode ? "_fixcrc" : "");
        std::FILE* f = std::fopen(path.c_str(), "wb");
        std::fwrite(seed.data(), 1, seed.size(), f);
        std::fclose(f);
        std::printf("%s: %zu bytes\n", path.c_str(), seed.size());
    }
}
}  // namespace

int main(int argc, char** argv) {
    const std::string dir = argc > 1 ? argv[1] : ".";
    using kvq::FlushMode;
    auto f16 = std::make_shared<kvq::IdentityCodec>(8, kvq::StorageType::F16);
    auto f32 = std::make_shared<kvq::IdentityCodec>(8, kvq::StorageType::F32);
    auto int2 = std::make_shared<kvq::TokenwiseCodec>(kvq::TokenwiseParams{8, 2, 4});
    auto int4 = std::make_shared<kvq::TokenwiseCodec>(kvq::TokenwiseParams{16, 4, 8});
    kvq::QjlParams qp;
    qp.head_dim = 16;
    qp.m = 64;
    qp.m_outlier = 32;
    qp.outliers = 2;
    qp.sketch = kvq::SketchKind::Gaussian;
    auto qjl_o = std::make_shared<kvq::QjlKeyCodec>(qp);
    qp.outliers = 0;
    qp.sketch = kvq::SketchKind::BlockOrthogonal;
    auto qjl = std::make_shared<kvq::QjlKeyCodec>(qp);
    {
        kvq::KvCache c({1, 1, 8, 4, {}, {}, true}, f32, f16);
        write_seed(dir, "empty_fp32", c, 0);
    }
    {
        kvq::KvCache c({2, 1, 8, 4, {2, FlushMode::Sliding}, {}, false}, f16, f16);
        write_seed(dir, "fp16_window", c, 7);
    }
    {
        kvq::KvCache c({1, 2, 8, 8, {4, FlushMode::Chunk}, {1, FlushMode::Sliding}, true}, int2, int2);
        write_seed(dir, "int2_chunk", c, 11);
    }
    {
        kvq::KvCache c({1, 1, 16, 4, {}, {}, true}, qjl, int4);
        write_seed(dir, "qjl_int4", c, 6);
    }
    {
        kvq::KvCache c({1, 1, 16, 32, {}, {}, true}, qjl_o, int4);
        write_seed(dir, "qjl_outliers", c, 33);
    }
    {
        kvq::KvCache c({1, 1, 16, 4, {}, {}, true}, std::make_shared<kvq::WkvCodec>(16, 4),
                       std::make_shared<kvq::WkvCodec>(16, 2, 8));
        write_seed(dir, "wkv", c, 5);
    }
    {
        kvq::KvCache c({1, 1, 8, 32, {32, FlushMode::Chunk}, {}, true}, std::make_shared<kvq::KiviKeyCodec>(8, 2),
                       int2);
        write_seed(dir, "kivi", c, 40);
    }
    return 0;
}
#endif
