// KV dumps from a real model (kvq/model/kv_dump.hpp): KvRecorder in front of an attention backend
// records the post-RoPE q, k, v the backend receives, write_kv_dump writes them in the DESIGN.md
// layout (layers.L.{q,k,v} [heads, tokens, head_dim]) that kvq-eval --kv reads. Also the WKV mode
// of KvCacheBackend and the progress meter the examples draw. Model tests skip without
// ../shared/models/stories260K.bin.
#include <gtest/gtest.h>
#include <unistd.h>  // getpid: per-process temporary file names

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "kvq/calibration/kv_calibration.hpp"
#include "kvq/core/progress.hpp"
#include "kvq/io/llama2c.hpp"
#include "kvq/io/llama2c_tokenizer.hpp"
#include "kvq/io/safetensors.hpp"
#include "kvq/kvq.hpp"
#include "kvq/model/kv_cache_backend.hpp"
#include "kvq/model/kv_dump.hpp"
#include "kvq/model/llama.hpp"

#ifndef KVQ_SHARED_DIR
#define KVQ_SHARED_DIR "../shared"
#endif

namespace {

using kvq::model::Fp32AttentionBackend;
using kvq::model::KvCacheBackend;
using kvq::model::KvRecorder;
using kvq::model::LlamaModel;

const std::string kModel = std::string(KVQ_SHARED_DIR) + "/models/stories260K.bin";
const std::string kTok = std::string(KVQ_SHARED_DIR) + "/models/tok512.bin";

#define SKIP_WITHOUT_MODEL()                                                                          \
    do {                                                                                              \
        if (!std::filesystem::exists(kModel) || !std::filesystem::exists(kTok))                       \
            GTEST_SKIP() << "stories260K.bin / tok512.bin not found under " KVQ_SHARED_DIR "/models"; \
    } while (0)

const char* const kText =
    "Once upon a time, there was a little girl named Mia. Mia had a small red ball. She loved to play "
    "with it in the garden. One sunny day, Mia threw the ball very high. It went over the fence and "
    "into the yard of an old man.";

struct Fixture {
    LlamaModel model;
    std::vector<int> tokens;
};

const Fixture& fixture() {
    static const Fixture f = [] {
        auto ck = kvq::io::load_llama2c(kModel);
        auto tok = kvq::io::load_llama2c_tokenizer(kTok, ck.config.vocab_size);
        std::vector<int> t = tok.encode(kText, true, false);
        return Fixture{LlamaModel(ck.config, std::move(ck.weights)), std::move(t)};
    }();
    return f;
}

std::string temp_path(const std::string& name) {
    return (std::filesystem::temp_directory_path() / ("kvq_test_" + std::to_string(::getpid()) + "_" + name)).string();
}

// What the model hands to the backend, captured independently of KvRecorder through the model's
// q/k/v observer: token-major per layer.
struct Observed {
    std::vector<std::vector<float>> q, k, v;
};

TEST(KvDump, RecordedDumpHasDesignShapesAndMatchesBackendInputs) {
    SKIP_WITHOUT_MODEL();
    const Fixture& f = fixture();
    LlamaModel model = f.model;  // a copy: the observer is set on it only
    const auto& c = model.config();
    Observed obs;
    obs.q.resize(c.n_layers);
    obs.k.resize(c.n_layers);
    obs.v.resize(c.n_layers);
    model.set_qkv_observer([&](int l, int, const float* q, const float* k, const float* v) {
        obs.q[l].insert(obs.q[l].end(), q, q + c.dim);
        obs.k[l].insert(obs.k[l].end(), k, k + c.kv_dim());
        obs.v[l].insert(obs.v[l].end(), v, v + c.kv_dim());
    });
    // A quantized cache: the dump must hold what *this* cache received.
    kvq::TokenwiseParams tp;
    tp.head_dim = c.head_dim;
    tp.bits = 4;
    tp.group = c.head_dim;
    auto codec = std::make_shared<kvq::TokenwiseCodec>(tp);
    kvq::CacheConfig cc;
    cc.block_tokens = 16;
    KvCacheBackend backend(c, cc, codec, codec);
    KvRecorder rec(backend, c);
    const int T = static_cast<int>(f.tokens.size()) - 1;
    ASSERT_GT(T, 20);
    for (int pos = 0; pos < T; ++pos) model.forward(f.tokens[pos], pos, rec);
    EXPECT_EQ(backend.cache().tokens(0), T);  // the recorder forwarded every call
    ASSERT_EQ(rec.recording().tokens(), T);

    const std::string path = temp_path("dump.safetensors");
    kvq::model::write_kv_dump(path, rec.recording(), kvq::io::Dtype::F32, {{"source", "test"}});
    const kvq::io::SafetensorsFile file = kvq::io::SafetensorsFile::load(path);
    std::remove(path.c_str());
    EXPECT_EQ(file.metadata().at("source"), "test");
    EXPECT_EQ(file.metadata().at("tokens"), std::to_string(T));
    const int d = c.head_dim, Hq = c.n_heads, Hk = c.n_kv_heads;
    for (int l = 0; l < c.n_layers; ++l) {
        const std::string p = "layers." + std::to_string(l) + ".";
        ASSERT_TRUE(file.has(p + "q") && file.has(p + "k") && file.has(p + "v")) << p;
        EXPECT_EQ(file.info(p + "q").shape, (std::vector<std::int64_t>{Hq, T, d}));
        EXPECT_EQ(file.info(p + "k").shape, (std::vector<std::int64_t>{Hk, T, d}));
        EXPECT_EQ(file.info(p + "v").shape, (std::vector<std::int64_t>{Hk, T, d}));
        EXPECT_EQ(file.info(p + "k").dtype, kvq::io::Dtype::F32);
        const std::vector<float> q = file.read_f32(p + "q"), k = file.read_f32(p + "k"), v = file.read_f32(p + "v");
        // Element [h, t, i] of the file is element i of head h in the vector handed over at position t.
        for (int t = 0; t < T; ++t)
            for (int i = 0; i < d; ++i) {
                for (int h = 0; h < Hq; ++h)
                    ASSERT_EQ(q[(std::size_t(h) * T + t) * d + i], obs.q[l][std::size_t(t) * c.dim + h * d + i])
                        << "layer " << l << " q head " << h << " t " << t << " i " << i;
                for (int h = 0; h < Hk; ++h) {
                    ASSERT_EQ(k[(std::size_t(h) * T + t) * d + i], obs.k[l][std::size_t(t) * c.kv_dim() + h * d + i]);
                    ASSERT_EQ(v[(std::size_t(h) * T + t) * d + i], obs.v[l][std::size_t(t) * c.kv_dim() + h * d + i]);
                }
            }
    }
    EXPECT_FALSE(file.has("layers." + std::to_string(c.n_layers) + ".k"));  // kvq-eval stops at the first missing layer
}

TEST(KvDump, HalfPrecisionAndWithoutQueries) {
    SKIP_WITHOUT_MODEL();
    const Fixture& f = fixture();
    const auto& c = f.model.config();
    Fp32AttentionBackend fp32(c);
    KvRecorder rec(fp32, c, /*max_tokens=*/12);
    for (int pos = 0; pos < 20; ++pos) f.model.forward(f.tokens[pos], pos, rec);
    ASSERT_EQ(rec.recording().tokens(), 12);  // capped; the run itself went on
    EXPECT_EQ(fp32.length(0), 20);
    for (kvq::io::Dtype dt : {kvq::io::Dtype::F16, kvq::io::Dtype::BF16}) {
        const std::string path = temp_path("dump16.safetensors");
        kvq::model::write_kv_dump(path, rec.recording(), dt, {}, /*with_q=*/false);
        const auto file = kvq::io::SafetensorsFile::load(path);
        std::remove(path.c_str());
        EXPECT_FALSE(file.has("layers.0.q"));
        EXPECT_EQ(file.info("layers.0.k").dtype, dt);
        const std::vector<float> k = file.read_f32("layers.0.k");
        const std::vector<float> ref = kvq::model::head_major(rec.recording().k[0], 12, c.n_kv_heads, c.head_dim);
        ASSERT_EQ(k.size(), ref.size());
        const double tol = dt == kvq::io::Dtype::F16 ? 1e-3 : 8e-3;  // relative rounding of 11 / 8 significant bits
        for (std::size_t i = 0; i < k.size(); ++i) EXPECT_NEAR(k[i], ref[i], tol * (std::abs(ref[i]) + 1e-3)) << i;
    }
}

TEST(KvDump, OnlyTheFirstSequenceIsRecorded) {
    SKIP_WITHOUT_MODEL();
    const Fixture& f = fixture();
    const auto& c = f.model.config();
    Fp32AttentionBackend fp32(c);
    KvRecorder rec(fp32, c);
    rec.reset();  // a reset before anything was recorded does not end the recording
    for (int pos = 0; pos < 5; ++pos) f.model.forward(f.tokens[pos], pos, rec);
    const std::vector<float> k0 = rec.recording().k[0];
    rec.reset();  // second context window
    for (int pos = 0; pos < 7; ++pos) f.model.forward(f.tokens[pos + 3], pos, rec);
    EXPECT_EQ(fp32.length(0), 7);
    EXPECT_EQ(rec.recording().tokens(), 5);
    EXPECT_EQ(rec.recording().k[0], k0);
    rec.clear();
    EXPECT_EQ(rec.recording().tokens(), 0);
}

TEST(KvDump, BadInputsThrow) {
    kvq::model::KvRecording empty;
    EXPECT_THROW(kvq::model::write_kv_dump(temp_path("x.safetensors"), empty), kvq::Error);
    empty.n_layers = 1;
    empty.n_heads = empty.n_kv_heads = 1;
    empty.head_dim = 8;
    empty.q.resize(1);
    empty.k.resize(1);
    empty.v.resize(1);
    EXPECT_THROW(kvq::model::write_kv_dump(temp_path("x.safetensors"), empty), kvq::Error);  // 0 positions
    kvq::model::KvRecording r = empty;
    r.q[0].assign(8, 1.0f);
    r.k[0].assign(8, 1.0f);
    r.v[0].assign(8, 1.0f);
    EXPECT_THROW(kvq::model::write_kv_dump(temp_path("x.safetensors"), r, kvq::io::Dtype::I32), kvq::Error);
    r.q[0].clear();  // q missing for the recorded position
    EXPECT_THROW(kvq::model::write_kv_dump(temp_path("x.safetensors"), r), kvq::Error);
    EXPECT_THROW(r.tokens(3), kvq::Error);
    kvq::io::LlamaConfig bad;  // all zero
    Fp32AttentionBackend fp32(1, 1, 1, 8);
    EXPECT_THROW(KvRecorder(fp32, bad), kvq::Error);
}

// WKV through KvCacheBackend: identity parameters reproduce the plain cache with the same codec
// bit for bit; calibrated 4-bit smoothing is finite and its parameters are accounted.
TEST(KvCacheBackendWkv, IdentityParamsMatchPlainCacheAndCalibratedRuns) {
    SKIP_WITHOUT_MODEL();
    const Fixture& f = fixture();
    const auto& c = f.model.config();
    auto codec = std::make_shared<kvq::WkvCodec>(c.head_dim, 4, c.head_dim);
    kvq::CacheConfig cc;
    cc.block_tokens = 16;
    KvCacheBackend plain(c, cc, codec, codec);
    auto id = std::make_shared<kvq::WkvParams>(kvq::WkvParams::identity(c.n_layers, c.n_kv_heads, c.head_dim));
    KvCacheBackend wkv_id(c, cc, codec, codec, id);
    EXPECT_TRUE(wkv_id.smoothed());
    EXPECT_FALSE(plain.smoothed());
    const double a = f.model.sequence_nll(f.tokens, plain), b = f.model.sequence_nll(f.tokens, wkv_id);
    EXPECT_EQ(a, b);
    EXPECT_EQ(plain.bytes_in_use(), wkv_id.bytes_in_use());
    EXPECT_EQ(wkv_id.parameter_bytes(), std::size_t(c.n_layers) * c.n_kv_heads * c.head_dim * 16);

    // Calibrate on the fp32 model's own q/k/v of the text (recorded) and run.
    Fp32AttentionBackend fp32(c);
    KvRecorder rec(fp32, c);
    for (std::size_t pos = 0; pos < f.tokens.size(); ++pos) f.model.forward(f.tokens[pos], int(pos), rec);
    std::vector<kvq::calib::KvCalibData> data;
    for (int l = 0; l < c.n_layers; ++l) data.push_back(rec.recording().calib_data(l));
    auto P = std::make_shared<kvq::WkvParams>(kvq::calib::calibrate(data, kvq::calib::CalibMode::Stats));
    KvCacheBackend wkv(c, cc, codec, codec, P);
    const double nll = f.model.sequence_nll(f.tokens, wkv);
    const double ref = f.model.sequence_nll(f.tokens, fp32);
    std::printf("nll fp32 %.4f  wkv4 identity %.4f  wkv4 stats %.4f\n", ref, a, nll);
    EXPECT_TRUE(std::isfinite(nll));
    EXPECT_LT(std::abs(nll - ref), std::abs(a - ref) + 0.05 * ref);  // smoothing does not make it much worse
    // Parameters of the wrong shape are rejected.
    auto wrong = std::make_shared<kvq::WkvParams>(kvq::WkvParams::identity(c.n_layers + 1, c.n_kv_heads, c.head_dim));
    EXPECT_THROW(KvCacheBackend(c, cc, codec, codec, wrong), kvq::Error);
    EXPECT_THROW(KvCacheBackend(c, cc, codec, codec, nullptr), kvq::Error);
}

TEST(ProgressMeter, RendersAndThrottles) {
    kvq::ProgressMeter pm("job", 200, /*min_interval_s=*/1000);
    EXPECT_TRUE(pm.due(1));    // first call
    EXPECT_FALSE(pm.due(2));   // within the interval
    EXPECT_TRUE(pm.due(200));  // the last step always redraws
    const std::string line = pm.render(100);
    EXPECT_EQ(line[0], '\r');
    EXPECT_NE(line.find("job ["), std::string::npos);
    EXPECT_NE(line.find(" 50.0%"), std::string::npos);
    EXPECT_NE(line.find("100/200"), std::string::npos);
    EXPECT_EQ(pm.render(500).find("100.0%") != std::string::npos, true);  // clamped to total
    EXPECT_EQ(pm.finish(), "\n");                                         // the last render already showed the total
    EXPECT_EQ(kvq::ProgressMeter::clock_time(59.6), "1:00");
    EXPECT_EQ(kvq::ProgressMeter::clock_time(3725), "1:02:05");
    EXPECT_THROW(kvq::ProgressMeter("x", 0), kvq::Error);
    EXPECT_THROW(kvq::ProgressMeter("x", 5, -1.0), kvq::Error);
}

}  // namespace
