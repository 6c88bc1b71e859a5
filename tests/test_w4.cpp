// 4-bit weights (kvq/weights/w4_quant.hpp): packed matvec vs a float64 product over the dequantized
// matrix, quantization error bounds derived from the formulas, storage cost, the Llama forward on
// packed weights, bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <memory>
#include <random>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/io/llama2c.hpp"
#include "kvq/model/llama.hpp"
#include "kvq/weights/w4_quant.hpp"
#include "test_util.hpp"

#ifndef KVQ_SHARED_DIR
#define KVQ_SHARED_DIR "../shared"
#endif

namespace {

using kvq::wq::LwcParams;
using kvq::wq::W4Matrix;

// Random clipping logits in [-1, 5] (gamma, beta in [0.27, 0.993]).
LwcParams random_clip(int rows, int cols, int group, std::mt19937_64& rng) {
    LwcParams p = LwcParams::init(rows, cols, group);
    std::uniform_real_distribution<float> u(-1.0f, 5.0f);
    for (auto& x : p.a) x = u(rng);
    for (auto& x : p.b) x = u(rng);
    return p;
}

// Shapes: exact groups, ragged last group (SmolLM2's 576), odd width, per-channel, group wider than a row.
struct Shape {
    int rows, cols, group;
};
const Shape kShapes[] = {{7, 256, 128}, {5, 576, 128}, {6, 173, 128}, {4, 99, 0}, {3, 64, 128}, {5, 40, 7}};

TEST(W4Quant, PackedMatvecEqualsDequantizedReference) {
    std::mt19937_64 rng(11);
    for (const Shape& s : kShapes)
        for (int clipped = 0; clipped < 2; ++clipped) {
            const auto w = kvq::test::normal_vector(std::size_t(s.rows) * s.cols, rng, 0.05f);
            const auto x = kvq::test::normal_vector(std::size_t(s.cols), rng);
            const LwcParams clip = random_clip(s.rows, s.cols, s.group, rng);
            const W4Matrix m = kvq::wq::quantize_w4(w.data(), s.rows, s.cols, s.group, clipped ? &clip : nullptr);
            const std::vector<float> deq = m.dequantize();
            std::vector<float> y(std::size_t(s.rows));
            kvq::wq::matvec(y.data(), m, x.data());
            for (int r = 0; r < s.rows; ++r) {
                double ref = 0, mag = 0;
                for (int c = 0; c < s.cols; ++c) {
                    ref += double(deq[std::size_t(r) * s.cols + c]) * x[std::size_t(c)];
                    mag += std::fabs(double(deq[std::size_t(r) * s.cols + c]) * x[std::size_t(c)]);
                }
                // Float accumulation of <= 600 terms (codes are exact small integers): the error is
                // a few ulps of the magnitude sum plus h * z * sum(x); 1e-5 of sum |w^ x| + |zero term|.
                EXPECT_NEAR(y[std::size_t(r)], ref, 1e-5 * (mag + 1.0))
                    << s.rows << "x" << s.cols << " g=" << s.group << " row " << r;
            }
        }
}

// Dequantized weights from an independent float64 evaluation of §2.4's formulas.
TEST(W4Quant, CodesAreNearestCodesOfTheStoredStep) {
    std::mt19937_64 rng(12);
    for (const Shape& s : kShapes) {
        const auto w = kvq::test::normal_vector(std::size_t(s.rows) * s.cols, rng, 0.05f);
        const LwcParams clip = random_clip(s.rows, s.cols, s.group, rng);
        const W4Matrix m = kvq::wq::quantize_w4(w.data(), s.rows, s.cols, s.group, &clip);
        const int gw = s.group == 0 ? s.cols : std::min(s.group, s.cols);
        for (int r = 0; r < s.rows; ++r)
            for (int c = 0; c < s.cols; ++c) {
                const std::size_t gi = std::size_t(r) * m.groups() + c / gw;
                const double h = kvq::half_to_float(m.step[gi]), z = kvq::half_to_float(m.zero[gi]);
                const double code =
                    std::clamp(std::nearbyint(double(w[std::size_t(r) * s.cols + c]) / h) + z, 0.0, 15.0);
                ASSERT_EQ(m.code(r, c), int(code)) << "row " << r << " col " << c;
            }
    }
}

// RTN: every weight within h/2 of its reconstruction, up to the fp16 rounding of h. Derivation:
// the grid (k - z) h, k = 0..15, with z = -round(min/h) starts within h/2 of min and, since
// (max - min) <= 15 h_exact, ends within h/2 + 15 |h - h_exact| of max.
TEST(W4Quant, RtnErrorWithinHalfStep) {
    std::mt19937_64 rng(13);
    for (const Shape& s : kShapes) {
        const auto w = kvq::test::normal_vector(std::size_t(s.rows) * s.cols, rng, 0.05f);
        const W4Matrix m = kvq::wq::quantize_w4(w.data(), s.rows, s.cols, s.group);
        const std::vector<float> deq = m.dequantize();
        const int gw = s.group == 0 ? s.cols : std::min(s.group, s.cols);
        for (int r = 0; r < s.rows; ++r)
            for (int g = 0; g < m.groups(); ++g) {
                const int c0 = g * gw, c1 = std::min(s.cols, c0 + gw);
                double lo = 1e30, hi = -1e30;
                for (int c = c0; c < c1; ++c) {
                    lo = std::min(lo, double(w[std::size_t(r) * s.cols + c]));
                    hi = std::max(hi, double(w[std::size_t(r) * s.cols + c]));
                }
                const double h_exact = kvq::wq::w4_step_exact(lo, hi, 1, 1),
                             h = kvq::half_to_float(m.step[std::size_t(r) * m.groups() + g]);
                const double bound = h / 2 + 15 * std::fabs(h - h_exact) + 1e-7;
                for (int c = c0; c < c1; ++c) {
                    const std::size_t i = std::size_t(r) * s.cols + c;
                    ASSERT_LE(std::fabs(double(w[i]) - deq[i]), bound) << "row " << r << " col " << c;
                }
            }
    }
}

// With clipping, weights inside the clipped range [beta min, gamma max] keep the half-step bound;
// the clipped range is smaller, so the step is too.
TEST(W4Quant, ClippedErrorWithinHalfStepInsideRange) {
    std::mt19937_64 rng(14);
    const int rows = 6, cols = 256, group = 128;
    const auto w = kvq::test::normal_vector(std::size_t(rows) * cols, rng, 0.05f);
    LwcParams clip = LwcParams::init(rows, cols, group, 0.0f);  // gamma = beta = 0.5
    const W4Matrix m = kvq::wq::quantize_w4(w.data(), rows, cols, group, &clip);
    const W4Matrix rtn = kvq::wq::quantize_w4(w.data(), rows, cols, group);
    const std::vector<float> deq = m.dequantize();
    int inside = 0;
    for (int r = 0; r < rows; ++r)
        for (int g = 0; g < 2; ++g) {
            const std::size_t gi = std::size_t(r) * 2 + g;
            const double h = kvq::half_to_float(m.step[gi]), z = kvq::half_to_float(m.zero[gi]);
            EXPECT_LT(h, 0.51 * kvq::half_to_float(rtn.step[gi]));
            for (int c = g * 128; c < (g + 1) * 128; ++c) {
                const std::size_t i = std::size_t(r) * cols + c;
                if (w[i] < -z * h || w[i] > (15 - z) * h) continue;  // outside the grid: clipped
                ++inside;
                ASSERT_LE(std::fabs(double(w[i]) - deq[i]), h / 2 * (1 + 1e-6));
            }
        }
    EXPECT_GT(inside, rows * cols / 2);  // most normal weights lie inside +-half the range
}

TEST(W4Quant, BitsPerWeight) {
    std::mt19937_64 rng(15);
    const auto w = kvq::test::normal_vector(64 * 512, rng);
    EXPECT_DOUBLE_EQ(kvq::wq::quantize_w4(w.data(), 64, 512, 128).bits_per_weight(), 4.25);
    EXPECT_DOUBLE_EQ(kvq::wq::quantize_w4(w.data(), 64, 512, 0).bits_per_weight(), 4.0 + 32.0 / 512);
}

TEST(W4Quant, ConstantAndTinyGroupsStayFinite) {
    std::vector<float> w(256, 0.25f);
    for (int i = 128; i < 256; ++i) w[std::size_t(i)] = 0.0f;
    const W4Matrix m = kvq::wq::quantize_w4(w.data(), 1, 256, 128);
    for (float v : m.dequantize()) EXPECT_TRUE(std::isfinite(v));
    const std::vector<float> deq = m.dequantize();
    // min = max > 0: h = 0.25 / 15 (fp16), z = -15, the value is the top of the grid 15 h.
    EXPECT_EQ(kvq::half_to_float(m.zero[0]), -15.0f);
    EXPECT_NEAR(deq[0], 0.25f, 15 * std::fabs(kvq::half_to_float(m.step[0]) - 0.25 / 15) + 1e-7);
    EXPECT_EQ(deq[200], 0.0f);
}

TEST(W4Quant, BadInputThrows) {
    std::vector<float> w(128, 1.0f);
    w[5] = std::nanf("");
    EXPECT_THROW(kvq::wq::quantize_w4(w.data(), 1, 128, 128), kvq::Error);
    w[5] = 1.0f;
    const LwcParams wrong = LwcParams::init(2, 128, 128);
    EXPECT_THROW(kvq::wq::quantize_w4(w.data(), 1, 128, 128, &wrong), kvq::Error);
    EXPECT_THROW(kvq::wq::quantize_w4(w.data(), 0, 128, 128), kvq::Error);
}

// ---- the Llama forward on packed weights (stories260K) ----

const std::string kModel = std::string(KVQ_SHARED_DIR) + "/models/stories260K.bin";

TEST(W4Model, ForwardEqualsFp32ForwardOnDequantizedWeights) {
    if (!std::filesystem::exists(kModel)) GTEST_SKIP() << kModel << " not found";
    auto ck = kvq::io::load_llama2c(kModel);
    const auto w4 = std::make_shared<kvq::wq::W4Model>(kvq::wq::quantize_model(ck.config, ck.weights, 128));
    kvq::io::LlamaWeights deq = ck.weights;
    for (int l = 0; l < ck.config.n_layers; ++l) {
        auto& L = deq.layers[std::size_t(l)];
        std::vector<float>* m[7] = {&L.wq, &L.wk, &L.wv, &L.wo, &L.w1, &L.w2, &L.w3};
        for (int i = 0; i < 7; ++i) *m[i] = w4->layers[std::size_t(l)].m[i].dequantize();
    }
    kvq::model::LlamaModel plain(ck.config, ck.weights), packed(ck.config, ck.weights), ref(ck.config, deq);
    packed.set_w4(w4);
    kvq::model::Fp32AttentionBackend b1(ck.config), b2(ck.config), b3(ck.config);
    const int tokens[] = {1, 403, 407, 261, 378, 429, 271, 302, 356, 275, 287, 258};
    double max_diff = 0, max_logit = 0, max_quant_effect = 0;
    for (int pos = 0; pos < 12; ++pos) {
        const auto a = packed.forward(tokens[pos], pos, b1), r = ref.forward(tokens[pos], pos, b2),
                   p = plain.forward(tokens[pos], pos, b3);
        for (std::size_t i = 0; i < a.size(); ++i) {
            max_diff = std::max(max_diff, std::fabs(double(a[i]) - r[i]));
            max_logit = std::max(max_logit, std::fabs(double(r[i])));
            max_quant_effect = std::max(max_quant_effect, std::fabs(double(p[i]) - r[i]));
        }
    }
    // Same weights, different float summation order (group sums, h (acc - z sum x)) through 5 layers.
    EXPECT_LT(max_diff, 1e-4 * max_logit) << "max |logit| " << max_logit;
    // And 4 bits really changed the model (the check above is not comparing fp32 to fp32).
    EXPECT_GT(max_quant_effect, 100 * max_diff);
    // 64-wide rows: one group per row; w2's rows are 172 wide: 2 groups (128 + 44).
    EXPECT_GT(w4->bits_per_weight(), 4.25);
    EXPECT_LT(w4->bits_per_weight(), 4.6);
}

TEST(W4Model, ClearingW4RestoresTheFp32PathBitForBit) {
    if (!std::filesystem::exists(kModel)) GTEST_SKIP() << kModel << " not found";
    auto ck = kvq::io::load_llama2c(kModel);
    kvq::model::LlamaModel a(ck.config, ck.weights), b(ck.config, ck.weights);
    b.set_w4(std::make_shared<kvq::wq::W4Model>(kvq::wq::quantize_model(ck.config, ck.weights, 128)));
    b.set_w4(nullptr);
    kvq::model::Fp32AttentionBackend b1(ck.config), b2(ck.config);
    for (int pos = 0; pos < 4; ++pos) EXPECT_EQ(a.forward(300 + pos, pos, b1), b.forward(300 + pos, pos, b2));
}

TEST(W4Model, WrongShapeThrows) {
    if (!std::filesystem::exists(kModel)) GTEST_SKIP() << kModel << " not found";
    auto ck = kvq::io::load_llama2c(kModel);
    auto w4 = std::make_shared<kvq::wq::W4Model>(kvq::wq::quantize_model(ck.config, ck.weights, 128));
    kvq::model::LlamaModel m(ck.config, ck.weights);
    auto fewer = std::make_shared<kvq::wq::W4Model>(*w4);
    fewer->layers.pop_back();
    EXPECT_THROW(m.set_w4(fewer), kvq::Error);
    auto wrong = std::make_shared<kvq::wq::W4Model>(*w4);
    std::swap(wrong->layers[0].m[0], wrong->layers[0].m[4]);  // w1 (172x64) where wq (64x64) belongs
    EXPECT_THROW(m.set_w4(wrong), kvq::Error);
}

}  // namespace
