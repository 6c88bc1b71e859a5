#pragma once
// CRR calibration (ALGORITHMS.md §2.3): block by block, AdamW on the block's weight clipping
// logits (§2.4) and KV smoothing delta, s (§2.2), with the loss
//   crr:        L_i = mean |F_{e-1} o ... o F_{i+1}(F^_i(x^_i)) - F_{e-1} o ... o F_i(x_i)|,  e = min(i+k, L)
//               (+ alpha * mean |F^_i(x^_i) - F_i(x_i)|, default alpha = 0)
//   lwc-local:  L_i = mean (F^_i(x^_i) - F_i(x_i))^2   (OmniQuant's block-local MSE, the ablation)
// where x_i is the full-precision model's input of block i and x^_i the input produced by blocks
// 0..i-1 already quantized with their calibrated parameters. Blocks i+1..e-1 run in full
// precision with frozen weights; gradients flow back through them (kvq/calibration/block_grad.hpp).
// Calibration data: segments of T tokens (each processed from position 0, causal); one AdamW step
// per segment (batch 1, as OmniQuant), weight decay 0, lr 1e-2 (clipping) and 5e-3 (smoothing).
// KV smoothing starts from the statistics initialisation (calibrate_stats on the block's own K, V
// given x^_i). Everything runs in float64.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <optional>
#include <vector>

#include "kvq/calibration/block_grad.hpp"
#include "kvq/calibration/kv_calibration.hpp"
#include "kvq/core/error.hpp"
#include "kvq/io/llama2c.hpp"
#include "kvq/io/w4_file.hpp"

namespace kvq::calib {

struct CrrOptions {
    io::W4Objective objective = io::W4Objective::Crr;
    int k = 5;           // blocks in the crr loss
    double alpha = 0.0;  // weight of the block-local MAE term (crr only)
    int epochs = 20;
    double lr_clip = 1e-2, lr_smooth = 5e-3;
    int w_group = 128;
    bool quant_kv = true;  // W4KV4 (false: weight-only W4, KV smoothing not learned or stored)
    int kv_bits = 4, kv_group = 0;
    // Called after every epoch of every block with the epoch's mean loss (before-step losses).
    std::function<void(int block, int epoch, double loss)> progress;
};

struct CrrResult {
    io::W4Calibration calib;
    std::vector<std::vector<double>> epoch_loss;  // [block][epoch]
    double seconds = 0;
};

// Logit that makes sigmoid exactly 1 in double: RTN (no clipping) in the float64 path.
inline constexpr double kNoClipLogit = 40.0;

// The model in float64 plus helpers shared by calibration and evaluation. Keeps a pointer to `w`
// (embedding, final norm, classifier): w must outlive the CrrModel.
class CrrModel {
public:
    CrrModel(const io::LlamaConfig& c, const io::LlamaWeights& w) : c_(c), w_(&w) {
        KVQ_CHECK(w.layers.size() == std::size_t(c.n_layers), "CrrModel: ", w.layers.size(), " layers, config has ",
                  c.n_layers);
        for (const auto& L : w.layers) blocks_.push_back(BlockWeights::from(c, L));
    }
    const io::LlamaConfig& config() const { return c_; }
    const BlockWeights& block(int i) const { return blocks_[std::size_t(i)]; }
    int n_layers() const { return c_.n_layers; }

    // Token embeddings of a segment, [T][dim].
    Mat embed(const std::vector<int>& tokens) const {
        KVQ_CHECK(!tokens.empty(), "CrrModel::embed: empty segment");
        KVQ_CHECK(tokens.size() <= std::size_t(c_.seq_len), "CrrModel::embed: segment of ", tokens.size(),
                  " tokens exceeds seq_len = ", c_.seq_len);
        Mat X(Eigen::Index(tokens.size()), c_.dim);
        for (std::size_t t = 0; t < tokens.size(); ++t) {
            KVQ_CHECK(tokens[t] >= 0 && tokens[t] < c_.vocab_size, "CrrModel::embed: token ", tokens[t],
                      " is outside [0, ", c_.vocab_size, ")");
            for (int j = 0; j < c_.dim; ++j)
                X(Eigen::Index(t), j) = w_->token_embedding[std::size_t(tokens[t]) * c_.dim + j];
        }
        return X;
    }
    // Logits [T][vocab] from the last block's output (final RMSNorm + classifier).
    Mat logits(const Mat& X) const {
        std::vector<double> r;
        const Eigen::VectorXd g = Eigen::Map<const Eigen::VectorXf>(w_->rms_final.data(), c_.dim).cast<double>();
        const Mat xn = rmsnorm_fwd(X, g, c_.norm_eps, r);
        const auto& cls = w_->classifier();
        const Mat Wc = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
                           cls.data(), c_.vocab_size, c_.dim)
                           .cast<double>();
        return xn * Wc.transpose();
    }

private:
    io::LlamaConfig c_;
    const io::LlamaWeights* w_;
    std::vector<BlockWeights> blocks_;
};

// RTN weights (no clipping) and identity KV smoothing for a block.
inline BlockParams rtn_params(const BlockWeights& w, int w_group) {
    return BlockParams::init(w, w_group, kNoClipLogit);
}

// The statistics initialisation of delta, s (calibrate_stats) from the block's K, V over segments.
inline void stats_init_kv(const BlockWeights& w, const std::vector<Mat>& inputs, BlockParams& p) {
    KvCalibData D;
    D.n_kv_heads = w.n_kv_heads;
    D.head_dim = w.head_dim;
    BlockTape t;
    for (const Mat& X : inputs) {
        block_forward(w, nullptr, {}, X, t);
        for (Eigen::Index i = 0; i < t.K.rows(); ++i)
            for (Eigen::Index c = 0; c < t.K.cols(); ++c) {
                D.k.push_back(float(t.K(i, c)));
                D.v.push_back(float(t.V(i, c)));
            }
        D.tokens += int(t.K.rows());
    }
    const WkvLayerParams lp = calibrate_stats(D);
    p.k_shift.assign(lp.k_shift.begin(), lp.k_shift.end());
    p.k_scale.assign(lp.k_scale.begin(), lp.k_scale.end());
    p.v_shift.assign(lp.v_shift.begin(), lp.v_shift.end());
    p.v_scale.assign(lp.v_scale.begin(), lp.v_scale.end());
}

// Loss of one segment for block i and, with grad, its gradient w.r.t. p (accumulated).
// xq: block i's quantized-model input; target: full-precision output of block e-1 (crr) or i (local);
// target_local: full-precision output of block i (for alpha > 0).
inline double crr_segment_loss(const CrrModel& m, int i, const BlockParams& p, const BlockQuant& q, const CrrOptions& o,
                               const Mat& xq, const Mat& target, const Mat* target_local, BlockParams* grad) {
    const bool crr = o.objective == io::W4Objective::Crr;
    const int e = crr ? std::min(i + o.k, m.n_layers()) : i + 1;
    std::vector<BlockTape> tapes(std::size_t(e - i));
    Mat Y = block_forward(m.block(i), &p, q, xq, tapes[0]);
    const Mat Yi = Y;
    for (int j = i + 1; j < e; ++j) Y = block_forward(m.block(j), nullptr, {}, Y, tapes[std::size_t(j - i)]);
    const double n = double(Y.size());
    const Mat D = Y - target;
    double loss = crr ? D.cwiseAbs().sum() / n : D.squaredNorm() / n;
    Mat dYi;
    const bool local = crr && o.alpha > 0 && target_local;
    if (local) loss += o.alpha * (Yi - *target_local).cwiseAbs().sum() / n;
    if (!grad) return loss;
    Mat dY =
        crr ? Mat(D.unaryExpr([n](double x) { return (x > 0 ? 1.0 : (x < 0 ? -1.0 : 0.0)) / n; })) : Mat(D * (2.0 / n));
    for (int j = e - 1; j > i; --j)
        dY = block_backward(m.block(j), nullptr, {}, tapes[std::size_t(j - i)], dY, nullptr);
    if (local)
        dY += (Yi - *target_local).unaryExpr([&](double x) {
            return o.alpha * (x > 0 ? 1.0 : (x < 0 ? -1.0 : 0.0)) / n;
        });
    block_backward(m.block(i), &p, q, tapes[0], dY, grad);
    return loss;
}

// Adam (AdamW with weight decay 0) over the parameter vectors of a BlockParams.
class Adam {
public:
    Adam(BlockParams& p, double lr_clip, double lr_smooth) : lr_clip_(lr_clip), lr_smooth_(lr_smooth) {
        m_ = p.zeros_like();
        v_ = p.zeros_like();
    }
    // Which vectors are trained: clipping logits (0..13), smoothing (14..17).
    void step(BlockParams& p, BlockParams& g, bool train_clip, bool train_kv) {
        ++t_;
        auto P = p.all(), G = g.all(), M = m_.all(), V = v_.all();
        const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
        const double c1 = 1 - std::pow(b1, t_), c2 = 1 - std::pow(b2, t_);
        for (std::size_t k = 0; k < P.size(); ++k) {
            const bool is_clip = k < 2 * std::size_t(wq::kBlockLinears);
            if ((is_clip && !train_clip) || (!is_clip && !train_kv)) continue;
            const double lr = is_clip ? lr_clip_ : lr_smooth_;
            for (std::size_t i = 0; i < P[k]->size(); ++i) {
                const double gi = (*G[k])[i];
                double& mi = (*M[k])[i];
                double& vi = (*V[k])[i];
                mi = b1 * mi + (1 - b1) * gi;
                vi = b2 * vi + (1 - b2) * gi * gi;
                (*P[k])[i] -= lr * (mi / c1) / (std::sqrt(vi / c2) + eps);
            }
        }
        // Keep the parameters in the ranges the files accept: scales positive, logits bounded.
        for (auto* s : {&p.k_scale, &p.v_scale})
            for (double& x : *s) x = std::clamp(x, 1e-3, 1e3);
        for (std::size_t k = 0; k < 2 * std::size_t(wq::kBlockLinears); ++k)
            for (double& x : *P[k]) x = std::clamp(x, -30.0, 30.0);
    }

private:
    double lr_clip_, lr_smooth_;
    BlockParams m_, v_;
    long t_ = 0;
};

// Runs blocks 0..L-1 on `inputs` with params[i] (nullptr entries: full precision); out[l] = input of
// block l for l = 0..L (out[L] = the model's last hidden state).
inline std::vector<std::vector<Mat>> run_blocks(const CrrModel& m, const std::vector<Mat>& inputs,
                                                const std::vector<const BlockParams*>& params, const BlockQuant& q) {
    std::vector<std::vector<Mat>> out(std::size_t(m.n_layers()) + 1);
    out[0] = inputs;
    BlockTape t;
    for (int l = 0; l < m.n_layers(); ++l)
        for (const Mat& X : out[std::size_t(l)])
            out[std::size_t(l) + 1].push_back(
                block_forward(m.block(l), params[std::size_t(l)], params[std::size_t(l)] ? q : BlockQuant{}, X, t));
    return out;
}

inline BlockQuant block_quant_of(const CrrOptions& o) {
    BlockQuant q;
    q.weights = true;
    q.w_group = o.w_group;
    q.kv = o.quant_kv;
    q.kv_bits = o.kv_bits;
    q.kv_group = o.kv_group;
    return q;
}

// Cross-block MAE of quantization parameters on held-out segments: mean over blocks i of
// mean |F_{e-1..i+1}(F^_i(x^_i)) - x_e|, e = min(i+k, L), x^_i from blocks 0..i-1 quantized with
// params; i.e. the crr loss with the real quantizers. Also the last hidden state's MAE.
struct CrossBlockReport {
    double mean_cross_block_mae = 0, final_mae = 0;
    std::vector<double> per_block;
};
inline CrossBlockReport cross_block_mae(const CrrModel& m, const std::vector<std::vector<int>>& segments,
                                        const std::vector<BlockParams>& params, const BlockQuant& q, int k) {
    KVQ_CHECK(!segments.empty(), "cross_block_mae: no segments");
    KVQ_CHECK(params.size() == std::size_t(m.n_layers()), "cross_block_mae: ", params.size(), " block params for ",
              m.n_layers(), " layers");
    std::vector<Mat> x0;
    x0.reserve(segments.size());
    for (const auto& s : segments) x0.push_back(m.embed(s));
    const auto fp = run_blocks(m, x0, std::vector<const BlockParams*>(std::size_t(m.n_layers()), nullptr), q);
    std::vector<const BlockParams*> pp;
    pp.reserve(params.size());
    for (const auto& p : params) pp.push_back(&p);
    const auto qa = run_blocks(m, x0, pp, q);
    CrossBlockReport r;
    CrrOptions o;
    o.k = k;
    for (int i = 0; i < m.n_layers(); ++i) {
        const int e = std::min(i + k, m.n_layers());
        double s = 0;
        for (std::size_t j = 0; j < segments.size(); ++j)
            s += crr_segment_loss(m, i, params[std::size_t(i)], q, o, qa[std::size_t(i)][j], fp[std::size_t(e)][j],
                                  nullptr, nullptr);
        r.per_block.push_back(s / double(segments.size()));
        r.mean_cross_block_mae += r.per_block.back() / m.n_layers();
    }
    for (std::size_t j = 0; j < segments.size(); ++j)
        r.final_mae += (qa.back()[j] - fp.back()[j]).cwiseAbs().mean() / double(segments.size());
    return r;
}

// Converts float64 block params to the file's float logits / KV params.
inline io::W4Calibration to_file(const io::LlamaConfig& c, const std::vector<BlockParams>& params,
                                 const CrrOptions& o) {
    io::W4Calibration W;
    W.n_layers = c.n_layers;
    W.dim = c.dim;
    W.hidden_dim = c.hidden_dim;
    W.n_heads = c.n_heads;
    W.n_kv_heads = c.n_kv_heads;
    W.head_dim = c.head_dim;
    W.group = o.w_group;
    W.objective = o.objective;
    W.k = o.objective == io::W4Objective::Crr ? o.k : 1;
    WkvParams kv = WkvParams::identity(c.n_layers, c.n_kv_heads, c.head_dim);
    for (int l = 0; l < c.n_layers; ++l) {
        const BlockParams& p = params[std::size_t(l)];
        wq::LwcLayer L;
        for (int i = 0; i < wq::kBlockLinears; ++i) {
            const auto [r, k2] = wq::block_linear_shape(c, i);
            L.m[i] = wq::LwcParams::init(r, k2, o.w_group);
            std::transform(p.a[i].begin(), p.a[i].end(), L.m[i].a.begin(), [](double x) { return float(x); });
            std::transform(p.b[i].begin(), p.b[i].end(), L.m[i].b.begin(), [](double x) { return float(x); });
        }
        W.clip.push_back(std::move(L));
        auto cp = [](const std::vector<double>& s, std::vector<float>& d) { d.assign(s.begin(), s.end()); };
        cp(p.k_shift, kv.layers[std::size_t(l)].k_shift);
        cp(p.k_scale, kv.layers[std::size_t(l)].k_scale);
        cp(p.v_shift, kv.layers[std::size_t(l)].v_shift);
        cp(p.v_scale, kv.layers[std::size_t(l)].v_scale);
    }
    if (o.quant_kv) W.kv = std::move(kv);
    W.validate();
    return W;
}

// The calibration. segments: token ids, each >= 2 tokens and <= seq_len.
inline CrrResult calibrate_crr(const CrrModel& m, const std::vector<std::vector<int>>& segments, const CrrOptions& o,
                               std::vector<BlockParams>* params_out = nullptr) {
    KVQ_CHECK(!segments.empty(), "calibrate_crr: no calibration segments (empty calibration text?)");
    for (const auto& s : segments)
        KVQ_CHECK(s.size() >= 2, "calibrate_crr: a calibration segment has ", s.size(), " tokens, need >= 2");
    KVQ_CHECK(o.k >= 1 && o.k <= 4096, "calibrate_crr: k = ", o.k);
    KVQ_CHECK(o.epochs >= 0 && o.epochs <= 100000, "calibrate_crr: epochs = ", o.epochs);
    KVQ_CHECK(o.lr_clip >= 0 && o.lr_smooth >= 0 && o.alpha >= 0, "calibrate_crr: negative lr or alpha");
    KVQ_CHECK(o.kv_bits >= 2 && o.kv_bits <= 8, "calibrate_crr: kv_bits = ", o.kv_bits);
    const auto t0 = std::chrono::steady_clock::now();
    const BlockQuant q = block_quant_of(o);
    const int L = m.n_layers();
    std::vector<Mat> x0;
    x0.reserve(segments.size());
    for (const auto& s : segments) x0.push_back(m.embed(s));
    // Full-precision activations: fp[l] = input of block l.
    const auto fp = run_blocks(m, x0, std::vector<const BlockParams*>(std::size_t(L), nullptr), q);
    std::vector<Mat> xq = x0;  // quantized-model input of the current block
    CrrResult R;
    std::vector<BlockParams> params;
    for (int i = 0; i < L; ++i) {
        BlockParams p = BlockParams::init(m.block(i), o.w_group);
        if (o.quant_kv) stats_init_kv(m.block(i), xq, p);
        const bool crr = o.objective == io::W4Objective::Crr;
        const int e = crr ? std::min(i + o.k, L) : i + 1;
        Adam adam(p, o.lr_clip, o.lr_smooth);
        std::vector<double> losses;
        for (int ep = 0; ep < o.epochs; ++ep) {
            double sum = 0;
            for (std::size_t j = 0; j < segments.size(); ++j) {
                BlockParams g = p.zeros_like();
                sum += crr_segment_loss(m, i, p, q, o, xq[j], fp[std::size_t(e)][j], &fp[std::size_t(i) + 1][j], &g);
                adam.step(p, g, true, o.quant_kv);
            }
            losses.push_back(sum / double(segments.size()));
            if (o.progress) o.progress(i, ep, losses.back());
        }
        R.epoch_loss.push_back(std::move(losses));
        BlockTape t;
        for (Mat& X : xq) X = block_forward(m.block(i), &p, q, X, t);
        params.push_back(std::move(p));
    }
    R.calib = to_file(m.config(), params, o);
    R.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (params_out) *params_out = std::move(params);
    return R;
}

}  // namespace kvq::calib
