// CRR calibration (kvq/calibration/crr.hpp) on stories260K and the W4 calibration file
// (kvq/io/w4_file.hpp): the float64 calibration path reproduces the model, CRR-calibrated W4KV4
// beats round-to-nearest W4KV4 (2-D stats KV) on held-out cross-block MAE, the loss decreases over
// epochs, the file round-trips and bad input is rejected with an error naming the problem.
//
// Data: token sequences sampled (temperature 1) from the fp32 model itself with two different
// seeds, one set for calibration and a disjoint one held out, so no text file is needed.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <vector>

#include "kvq/calibration/crr.hpp"
#include "kvq/io/w4_file.hpp"
#include "kvq/model/llama.hpp"

#ifndef KVQ_SHARED_DIR
#define KVQ_SHARED_DIR "../shared"
#endif

namespace {

const std::string kModel = std::string(KVQ_SHARED_DIR) + "/models/stories260K.bin";

std::vector<int> sample(const kvq::model::LlamaModel& M, int T, std::mt19937_64& rng) {
    kvq::model::Fp32AttentionBackend b(M.config());
    std::vector<int> s{1};
    for (int p = 0; p + 1 < T; ++p) {
        auto lg = M.forward(s.back(), p, b);
        kvq::model::softmax(lg.data(), int(lg.size()));
        std::discrete_distribution<int> d(lg.begin(), lg.end());
        s.push_back(d(rng));
    }
    return s;
}

// One calibration shared by the tests of this file (it is the slow part: ~3 s).
struct Shared {
    kvq::io::Llama2cCheckpoint ck;
    std::unique_ptr<kvq::calib::CrrModel> cm;
    std::vector<std::vector<int>> cal, held;
    kvq::calib::CrrOptions opt;
    kvq::calib::CrrResult crr;
    std::vector<kvq::calib::BlockParams> crr_params, rtn_params;
};
Shared* shared() {
    static std::unique_ptr<Shared> S;
    if (S) return S.get();
    S = std::make_unique<Shared>();
    S->ck = kvq::io::load_llama2c(kModel);
    kvq::model::LlamaModel M(S->ck.config, S->ck.weights);
    std::mt19937_64 r1(1), r2(2);
    for (int i = 0; i < 4; ++i) S->cal.push_back(sample(M, 64, r1));
    for (int i = 0; i < 4; ++i) S->held.push_back(sample(M, 64, r2));
    S->cm = std::make_unique<kvq::calib::CrrModel>(S->ck.config, S->ck.weights);
    S->opt.epochs = 20;  // k = 5, lr 1e-2 / 5e-3, group 128 (one group per 64-wide row), KV 4 bits
    S->crr = kvq::calib::calibrate_crr(*S->cm, S->cal, S->opt, &S->crr_params);
    // Baseline: RTN weights and the 2-D statistics KV smoothing (no learning), from the same data.
    std::vector<kvq::calib::Mat> x0;
    for (const auto& s : S->cal) x0.push_back(S->cm->embed(s));
    const auto fp = kvq::calib::run_blocks(*S->cm, x0, std::vector<const kvq::calib::BlockParams*>(5, nullptr), {});
    for (int l = 0; l < 5; ++l) {
        auto p = kvq::calib::rtn_params(S->cm->block(l), 128);
        kvq::calib::stats_init_kv(S->cm->block(l), fp[std::size_t(l)], p);
        S->rtn_params.push_back(std::move(p));
    }
    return S.get();
}

#define NEED_MODEL() \
    if (!std::filesystem::exists(kModel)) GTEST_SKIP() << kModel << " not found"

TEST(Crr, Float64PathReproducesTheModel) {
    NEED_MODEL();
    Shared* S = shared();
    kvq::model::LlamaModel M(S->ck.config, S->ck.weights);
    kvq::model::Fp32AttentionBackend b(S->ck.config);
    kvq::calib::BlockTape t;
    kvq::calib::Mat X = S->cm->embed(S->held[0]);
    for (int l = 0; l < 5; ++l) X = kvq::calib::block_forward(S->cm->block(l), nullptr, {}, X, t);
    const kvq::calib::Mat L = S->cm->logits(X);
    double max_diff = 0, max_logit = 0;
    for (int p = 0; p < 64; ++p) {
        const auto lg = M.forward(S->held[0][std::size_t(p)], p, b);
        for (int v = 0; v < 512; ++v) {
            max_diff = std::max(max_diff, std::fabs(lg[std::size_t(v)] - L(p, v)));
            max_logit = std::max(max_logit, std::fabs(L(p, v)));
        }
    }
    EXPECT_LT(max_diff, 1e-4 * max_logit);  // fp32 vs float64 through 5 blocks (observed 1.7e-5 of ~10)
}

TEST(Crr, CalibratedW4Kv4BeatsRtnOnHeldOutCrossBlockMae) {
    NEED_MODEL();
    Shared* S = shared();
    const auto q = kvq::calib::block_quant_of(S->opt);
    const auto crr = kvq::calib::cross_block_mae(*S->cm, S->held, S->crr_params, q, 5);
    const auto rtn = kvq::calib::cross_block_mae(*S->cm, S->held, S->rtn_params, q, 5);
    // Observed: 0.218 vs 0.241 (-9.5%), final hidden state -8.3%; with other data seeds (3, 5, 7)
    // -5.9% to -7.1% and -5.7% to -6.4%. Asserted: at least -3%.
    EXPECT_LT(crr.mean_cross_block_mae, 0.97 * rtn.mean_cross_block_mae);
    EXPECT_LT(crr.final_mae, 0.97 * rtn.final_mae);
}

TEST(Crr, LossDecreasesOverEpochs) {
    NEED_MODEL();
    Shared* S = shared();
    ASSERT_EQ(S->crr.epoch_loss.size(), 5u);
    // Observed (data seeds 1, 3, 5, 7): every block's last-epoch loss is 1.3% to 8% below its
    // first-epoch loss; summed over blocks 5% to 8% below. Asserted: lower, and 2% lower in sum.
    double sum_first = 0, sum_last = 0;
    for (std::size_t b = 0; b < 5; ++b) {
        const auto& l = S->crr.epoch_loss[b];
        ASSERT_EQ(l.size(), 20u);
        sum_first += l.front(), sum_last += l.back();
        EXPECT_LT(l.back(), l.front()) << "block " << b;
        // and not by the first epoch alone: the second half still improves on the first half.
        double first = 0, second = 0;
        for (int e = 0; e < 10; ++e) first += l[std::size_t(e)], second += l[std::size_t(e) + 10];
        EXPECT_LT(second, first) << "block " << b;
    }
    EXPECT_LT(sum_last, 0.98 * sum_first);
}

TEST(Crr, FileRoundTripsAndLoadsIntoTheModel) {
    NEED_MODEL();
    Shared* S = shared();
    const std::string path = ::testing::TempDir() + "kvq_test_crr.kvqw";
    kvq::io::save_w4_calibration(path, S->crr.calib);
    const auto back = kvq::io::load_w4_calibration(path);
    EXPECT_EQ(kvq::io::serialize_w4_calibration(back), kvq::io::serialize_w4_calibration(S->crr.calib));
    ASSERT_TRUE(back.kv.has_value());
    std::optional<kvq::WkvParams> kv;
    const auto w4 = kvq::io::make_w4_weights("w4=crr:" + path, S->ck.config, S->ck.weights, &kv);
    ASSERT_TRUE(w4 && kv);
    EXPECT_EQ(kv->layers[2].k_scale, S->crr.calib.kv->layers[2].k_scale);
    // The packed weights are the clipping of the file: a calibrated group differs from RTN somewhere.
    const auto rtn = kvq::io::make_w4_weights("w4=rtn", S->ck.config, S->ck.weights);
    EXPECT_NE(w4->layers[0].m[0].dequantize(), rtn->layers[0].m[0].dequantize());
    EXPECT_THROW(kvq::io::make_w4_weights("w4=lwc-local:" + path, S->ck.config, S->ck.weights), kvq::Error);
    std::filesystem::remove(path);
}

// ---- bad input ----

kvq::io::W4Calibration tiny_calibration() {
    kvq::io::LlamaConfig c;
    c.n_layers = 2, c.dim = 8, c.hidden_dim = 12, c.n_heads = 2, c.n_kv_heads = 1, c.head_dim = 4;
    std::vector<kvq::calib::BlockParams> p;
    kvq::calib::BlockWeights w;
    w.dim = 8, w.hidden = 12, w.n_heads = 2, w.n_kv_heads = 1, w.head_dim = 4;
    const int shapes[7][2] = {{8, 8}, {4, 8}, {4, 8}, {8, 8}, {12, 8}, {8, 12}, {12, 8}};
    for (int i = 0; i < 7; ++i) w.W[i] = kvq::calib::Mat::Zero(shapes[i][0], shapes[i][1]);
    p.assign(2, kvq::calib::BlockParams::init(w, 128));
    kvq::calib::CrrOptions o;
    return kvq::calib::to_file(c, p, o);
}

TEST(CrrBadInput, TruncatedCorruptedAndForeignFilesThrow) {
    const auto W = tiny_calibration();
    auto bytes = kvq::io::serialize_w4_calibration(W);
    EXPECT_NO_THROW(kvq::io::parse_w4_calibration(bytes.data(), bytes.size()));
    for (std::size_t n : {std::size_t(0), std::size_t(10), std::size_t(59), bytes.size() - 1})
        EXPECT_THROW(kvq::io::parse_w4_calibration(bytes.data(), n), kvq::Error) << n;
    auto bad = bytes;
    bad[70] ^= 1;  // a logit bit: checksum mismatch
    try {
        kvq::io::parse_w4_calibration(bad.data(), bad.size());
        ADD_FAILURE() << "no exception";
    } catch (const kvq::Error& e) {
        EXPECT_NE(std::string(e.what()).find("checksum"), std::string::npos) << e.what();
    }
    bad = bytes;
    bad[12] = 3;  // n_layers 2 -> 3: the size no longer matches
    EXPECT_THROW(kvq::io::parse_w4_calibration(bad.data(), bad.size()), kvq::Error);
    // A file for another model.
    kvq::io::LlamaConfig other;
    other.n_layers = 5, other.dim = 64, other.hidden_dim = 172, other.n_heads = 8, other.n_kv_heads = 4,
    other.head_dim = 8;
    try {
        W.check_model(other, "file");
        ADD_FAILURE() << "no exception";
    } catch (const kvq::Error& e) {
        EXPECT_NE(std::string(e.what()).find("layers=5"), std::string::npos) << e.what();
    }
    EXPECT_THROW(kvq::io::load_w4_calibration("/nonexistent/kvq.kvqw"), kvq::Error);
}

TEST(CrrBadInput, EmptyOrShortCalibrationDataThrows) {
    NEED_MODEL();
    Shared* S = shared();
    EXPECT_THROW(kvq::calib::calibrate_crr(*S->cm, {}, S->opt), kvq::Error);
    EXPECT_THROW(kvq::calib::calibrate_crr(*S->cm, {{1}}, S->opt), kvq::Error);
    EXPECT_THROW(kvq::calib::calibrate_crr(*S->cm, {{1, 600}}, S->opt), kvq::Error);  // token >= vocab 512
    // A file for stories260K does not load into a model of another shape.
    const std::string path = ::testing::TempDir() + "kvq_test_crr_other.kvqw";
    kvq::io::save_w4_calibration(path, tiny_calibration());
    try {
        kvq::io::make_w4_weights("w4=crr:" + path, S->ck.config, S->ck.weights);
        ADD_FAILURE() << "no exception";
    } catch (const kvq::Error& e) {
        EXPECT_NE(std::string(e.what()).find("layers=2"), std::string::npos) << e.what();
    }
    std::filesystem::remove(path);
}

}  // namespace
