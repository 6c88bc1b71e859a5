// GPU fused decode attention against the CPU cache: a batch of kvq::KvCache sequences built with
// the real codecs (QJL keys without outliers or token-wise int keys, token-wise int values, fp32
// windows), their block bytes uploaded into one device pool per stream kind in shuffled page order,
// kvq::cuda::launch_decode_attention compared with kvq::attend and a float64 attention over the
// decoded keys and values (int keys), or (QJL keys, scored with the int8 bit-sliced query on every
// GPU path) a float64 attention with the quantized-query estimator, after checking the quantization.
//
// Tolerance: |gpu - ref| <= 5e-4 * (1 + |ref|) per output element. Both sides compute the same
// scores from the same bytes (GPU: fp32, or exact integer popcounts for QJL; fp32 online softmax with
// ex2.approx; value weights as fp16 hi + lo, 2^-22 relative), so the expected error is ~1e-6; the
// bound leaves room for exp() of scores of magnitude ~10.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "kvq/cuda/check.cuh"
#include "kvq/cuda/decode_attention.cuh"
#if defined(__NVCC__)
#pragma nv_diag_suppress 20012
#pragma nv_diag_suppress 20013
#pragma nv_diag_suppress 20014
#pragma nv_diag_suppress 20015
#endif
#include "kvq/cache/attention.hpp"
#include "kvq/cache/kv_cache.hpp"
#include "kvq/quant/qjl_key_codec.hpp"
#include "kvq/quant/tokenwise_codec.hpp"

namespace {

template <class T>
struct DevBuf {
    T* p = nullptr;
    std::size_t n = 0;
    explicit DevBuf(std::size_t count) : n(count) {
        KVQ_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(count, 1) * sizeof(T)));
    }
    explicit DevBuf(const std::vector<T>& v) : DevBuf(v.size()) {
        if (!v.empty()) KVQ_CUDA_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    }
    ~DevBuf() { cudaFree(p); }
    DevBuf(const DevBuf&) = delete;
    DevBuf& operator=(const DevBuf&) = delete;
    std::vector<T> download() const {
        std::vector<T> v(n);
        KVQ_CUDA_CHECK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
        return v;
    }
};

struct DecCase {
    int d = 128;
    bool qjl = true;
    int m = 256;
    int kbits = 4, kgroup = 32;
    int vbits = 2, vgroup = 32;
    int group = 1;  // query heads per KV head
    int H_kv = 2;
    std::vector<int> lens{1000, 37, 333};
    int B = 64;
    int kwin = 5, vwin = 9;
    bool cur = true;
    int chunk = 0;
    bool graph = false;
    bool wkv = false;        // WKVQuant smoothing: k_scale folded into q, output un-smoothed (v_scale, v_shift)
    float qscale = 0.4f;     // query entries ~ N(0, qscale^2): larger = sharper attention
    float vscale = 1.f;      // value entries ~ N(0, vscale^2): small values test the weight scaling
    int expect_tc = -1;      // 1 / 0: assert that the tensor-core path is / is not taken
    bool bulk = false;       // DecodeAttentionArgs::tc_bulk_staging (the library's default is true)
    bool cuda_core = false;  // DecodeAttentionArgs::cuda_core_only
    bool pdl = true;         // DecodeAttentionArgs::pdl (launches as programmatic dependents on sm_90)
};

std::string describe(const DecCase& c) {
    std::string s =
        "d=" + std::to_string(c.d) +
        (c.qjl ? " qjl m=" + std::to_string(c.m) : " int" + std::to_string(c.kbits) + " g" + std::to_string(c.kgroup)) +
        " v=int" + std::to_string(c.vbits) + " g" + std::to_string(c.vgroup) + " G=" + std::to_string(c.group) +
        " Hkv=" + std::to_string(c.H_kv) + " B=" + std::to_string(c.B) + " kwin=" + std::to_string(c.kwin) +
        " vwin=" + std::to_string(c.vwin) + (c.cur ? " cur" : "") + " chunk=" + std::to_string(c.chunk) +
        (c.graph ? " graph" : "") + (c.wkv ? " wkv" : "") + (c.bulk ? " bulk" : "") +
        (c.cuda_core ? " cuda_core_only" : "") + (c.pdl ? "" : " no-pdl") + " q*" + std::to_string(c.qscale) + " v*" +
        std::to_string(c.vscale) + " lens=";
    for (int l : c.lens) s += std::to_string(l) + ",";
    return s;
}

void run_case(const DecCase& c) {
    SCOPED_TRACE(describe(c));
    const int d = c.d, H = c.H_kv, Hq = H * c.group, B = c.B, batch = static_cast<int>(c.lens.size());
    std::mt19937 rng(17 + d + c.m + c.group * 3 + c.vbits + c.kbits + batch + c.lens[0]);
    std::normal_distribution<float> nd(0.f, 1.f);

    std::shared_ptr<const kvq::Codec> kc, vc;
    std::shared_ptr<const kvq::QjlKeyCodec> qjl;
    if (c.qjl) {
        kvq::QjlParams p;
        p.head_dim = d;
        p.m = c.m;
        p.outliers = 0;
        p.seed = 55 + d + c.m;
        qjl = std::make_shared<const kvq::QjlKeyCodec>(p);
        kc = qjl;
    } else {
        kc = std::make_shared<const kvq::TokenwiseCodec>(kvq::TokenwiseParams{d, c.kbits, c.kgroup});
    }
    auto vcodec = std::make_shared<const kvq::TokenwiseCodec>(kvq::TokenwiseParams{d, c.vbits, c.vgroup});
    vc = vcodec;

    kvq::CacheConfig cfg;
    cfg.n_layers = 1;
    cfg.n_kv_heads = H;
    cfg.head_dim = d;
    cfg.block_tokens = B;
    cfg.key_window = {c.kwin, kvq::FlushMode::Sliding};
    cfg.value_window = {c.vwin, kvq::FlushMode::Sliding};
    cfg.past_only = true;

    std::vector<std::unique_ptr<kvq::KvCache>> caches;
    std::vector<float> q(std::size_t(batch) * Hq * d), ck(std::size_t(batch) * H * d), cv(ck.size());
    for (auto& v : q) v = c.qscale * nd(rng);
    // WKV: the cache holds smoothed vectors; the reference folds q' = q (.) s_K on the host and
    // un-smooths the output, as kvq::WkvKvCache::decode_step does; the GPU gets the raw q.
    std::vector<float> ksc(std::size_t(H) * d, 1.f), vsc(ksc.size(), 1.f), vsh(ksc.size(), 0.f);
    if (c.wkv) {
        std::uniform_real_distribution<float> ud(0.5f, 2.f);
        for (auto& v : ksc) v = ud(rng);
        for (auto& v : vsc) v = ud(rng);
        for (auto& v : vsh) v = 0.3f * nd(rng);
    }
    std::vector<float> qref(q);
    if (c.wkv)
        for (std::size_t i = 0; i < q.size(); ++i) {
            const std::size_t hq = (i / d) % Hq, ch = i % d;
            qref[i] = q[i] * ksc[(hq / c.group) * d + ch];
        }
    for (auto& v : ck) v = nd(rng);
    for (auto& v : cv) v = c.vscale * nd(rng);
    for (int b = 0; b < batch; ++b) {
        caches.push_back(std::make_unique<kvq::KvCache>(cfg, kc, vc));
        const int T = c.lens[b];
        std::vector<float> k(std::size_t(T) * H * d), v(k.size());
        for (std::size_t i = 0; i < k.size(); ++i) {
            k[i] = ((i % d) % 29 == 3 ? 4.f : 1.f) * nd(rng);
            v[i] = c.vscale * nd(rng);
        }
        // Appended in a few pieces, as a decode loop would.
        int done = 0;
        while (done < T) {
            const int n = std::min(T - done, 1 + static_cast<int>(rng() % 200));
            caches[b]->append(0, &k[std::size_t(done) * H * d], &v[std::size_t(done) * H * d], n);
            done += n;
        }
    }

    // CPU references.
    std::vector<float> ref(std::size_t(batch) * Hq * d, 0.f);
    std::vector<double> ref64(ref.size(), 0.0);
    kvq::AttentionWorkspace ws;
    for (int b = 0; b < batch; ++b) {
        const int T = c.lens[b];
        if (T + (c.cur ? 1 : 0) == 0) continue;
        kvq::ExactTokens ex{&ck[std::size_t(b) * H * d], &cv[std::size_t(b) * H * d], 1};
        kvq::attend(*caches[b], 0, &qref[std::size_t(b) * Hq * d], Hq, T, c.cur ? ex : kvq::ExactTokens{},
                    c.cur ? 1 : 0, &ref[std::size_t(b) * Hq * d], ws);
        if (c.qjl) continue;
        // float64 attention over decoded keys/values (int keys only).
        for (int hq = 0; hq < Hq; ++hq) {
            const int h = hq / c.group;
            const kvq::StreamView ks = caches[b]->keys(0, h), vs = caches[b]->values(0, h);
            const int total = T + (c.cur ? 1 : 0);
            std::vector<float> krow(d), vrow(d);
            std::vector<double> s(total), acc(d, 0.0);
            auto row_of = [&](const kvq::StreamView& sv, const kvq::Codec& codec, int p, const float* curp,
                              std::vector<float>& out) {
                if (p < sv.encoded)
                    codec.decode(sv.pool->data(sv.pages[p / B]), B, p % B, 1, out.data());
                else if (p < T)
                    std::copy_n(sv.window + std::size_t(p - sv.encoded) * sv.window_stride, d, out.begin());
                else
                    std::copy_n(curp, d, out.begin());
            };
            double mx = -1e300;
            for (int p = 0; p < total; ++p) {
                row_of(ks, *kc, p, &ck[(std::size_t(b) * H + h) * d], krow);
                double dd = 0;
                for (int ch = 0; ch < d; ++ch) dd += double(qref[(std::size_t(b) * Hq + hq) * d + ch]) * krow[ch];
                s[p] = dd / std::sqrt(double(d));
                mx = std::max(mx, s[p]);
            }
            double sum = 0;
            for (int p = 0; p < total; ++p) {
                const double e = std::exp(s[p] - mx);
                sum += e;
                row_of(vs, *vc, p, &cv[(std::size_t(b) * H + h) * d], vrow);
                for (int ch = 0; ch < d; ++ch) acc[ch] += e * vrow[ch];
            }
            for (int ch = 0; ch < d; ++ch) ref64[(std::size_t(b) * Hq + hq) * d + ch] = acc[ch] / sum;
        }
    }
    if (c.wkv)
        for (std::size_t i = 0; i < ref.size(); ++i) {
            const std::size_t hq = (i / d) % Hq, ch = i % d, kc_i = (hq / c.group) * d + ch;
            ref[i] = ref[i] * vsc[kc_i] + vsh[kc_i];
            ref64[i] = ref64[i] * vsc[kc_i] + vsh[kc_i];
        }

    // Device pools: every used block of every sequence at a shuffled id, garbage blocks between.
    auto build_pool = [&](bool keys, std::size_t block_bytes, std::vector<std::uint8_t>& pool,
                          std::vector<std::uint32_t>& pages, std::int64_t page_stride) {
        std::vector<std::pair<int, int>> owners;  // (b * H + h, page index)
        for (int b = 0; b < batch; ++b)
            for (int h = 0; h < H; ++h) {
                const kvq::StreamView sv = keys ? caches[b]->keys(0, h) : caches[b]->values(0, h);
                for (int i = 0; i < (sv.encoded + B - 1) / B; ++i) owners.push_back({b * H + h, i});
            }
        const std::size_t n_blocks = owners.size() + 5;
        pool.resize(n_blocks * block_bytes);
        for (auto& x : pool) x = static_cast<std::uint8_t>(rng());
        std::vector<std::uint32_t> ids(n_blocks);
        std::iota(ids.begin(), ids.end(), 0u);
        std::shuffle(ids.begin(), ids.end(), rng);
        pages.assign(std::size_t(batch) * H * page_stride, 0xFFFFFFFFu);
        for (std::size_t i = 0; i < owners.size(); ++i) {
            const int bh = owners[i].first, pi = owners[i].second;
            const kvq::StreamView sv = keys ? caches[bh / H]->keys(0, bh % H) : caches[bh / H]->values(0, bh % H);
            std::memcpy(&pool[std::size_t(ids[i]) * block_bytes], sv.pool->data(sv.pages[pi]), sv.pool->block_bytes());
            pages[std::size_t(bh) * page_stride + pi] = ids[i];
        }
    };
    int max_pages = 0, max_total = 0;
    for (int T : c.lens) {
        max_pages = std::max(max_pages, (T + B - 1) / B);
        max_total = std::max(max_total, T + (c.cur ? 1 : 0));
    }
    const std::int64_t page_stride = max_pages + 2;
    const kvq::BlockLayout kl = kc->layout(B), vl = vc->layout(B);
    const std::size_t kbb = kl.bytes() + 16, vbb = vl.bytes();  // key blocks with padding between them
    std::vector<std::uint8_t> kpool, vpool;
    std::vector<std::uint32_t> kpages, vpages;
    build_pool(true, kbb, kpool, kpages, page_stride);
    build_pool(false, vbb, vpool, vpages, page_stride);

    // Windows [w][H][d] per sequence, concatenated.
    std::vector<float> kwin, vwin;
    std::vector<std::size_t> koff, voff;
    std::vector<int> n_tok, k_enc, v_enc;
    for (int b = 0; b < batch; ++b) {
        n_tok.push_back(c.lens[b]);
        for (int kind = 0; kind < 2; ++kind) {
            std::vector<float>& win = kind == 0 ? kwin : vwin;
            (kind == 0 ? koff : voff).push_back(win.size());
            const kvq::StreamView sv0 = kind == 0 ? caches[b]->keys(0, 0) : caches[b]->values(0, 0);
            (kind == 0 ? k_enc : v_enc).push_back(sv0.encoded);
            for (int t = 0; t < sv0.window_tokens; ++t)
                for (int h = 0; h < H; ++h) {
                    const kvq::StreamView sv = kind == 0 ? caches[b]->keys(0, h) : caches[b]->values(0, h);
                    const float* row = sv.window + std::size_t(t) * sv.window_stride;
                    win.insert(win.end(), row, row + d);
                }
        }
    }

    DevBuf<std::uint8_t> d_kpool(kpool), d_vpool(vpool);
    DevBuf<std::uint32_t> d_kpages(kpages), d_vpages(vpages);
    DevBuf<float> d_kwin(kwin), d_vwin(vwin), d_q(q), d_ck(ck), d_cv(cv);
    DevBuf<int> d_ntok(n_tok), d_kenc(k_enc), d_venc(v_enc);
    DevBuf<float> d_ksc(ksc), d_vsc(vsc), d_vsh(vsh);
    std::vector<const float*> kwp, vwp;
    for (int b = 0; b < batch; ++b) {
        kwp.push_back(d_kwin.p + koff[b]);
        vwp.push_back(d_vwin.p + voff[b]);
    }
    DevBuf<const float*> d_kwp(kwp), d_vwp(vwp);
    std::unique_ptr<DevBuf<float>> d_sketch;
    if (c.qjl) d_sketch = std::make_unique<DevBuf<float>>(qjl->sketch());
    DevBuf<float> d_out(ref.size());
    KVQ_CUDA_CHECK(cudaMemset(d_out.p, 0xFF, d_out.n * sizeof(float)));  // poison: NaN

    kvq::cuda::DecodeAttentionArgs a;
    a.tc_bulk_staging = c.bulk;
    a.cuda_core_only = c.cuda_core;
    a.pdl = c.pdl;
    a.head_dim = d;
    a.n_q_heads = Hq;
    a.n_kv_heads = H;
    a.batch = batch;
    a.max_tokens = max_total;
    a.key_block_bytes = kbb;
    if (c.qjl) {
        kvq::cuda::set_qjl_keys(a, *qjl, B);
        a.sketch = d_sketch->p;
    } else {
        kvq::cuda::set_tokenwise_keys(a, static_cast<const kvq::TokenwiseCodec&>(*kc), B);
    }
    kvq::cuda::set_tokenwise_values(a, *vcodec, B);
    a.key_pool = d_kpool.p;
    a.key_pages = d_kpages.p;
    a.value_pool = d_vpool.p;
    a.value_pages = d_vpages.p;
    a.page_stride = page_stride;
    a.n_tokens = d_ntok.p;
    a.k_encoded = d_kenc.p;
    a.v_encoded = d_venc.p;
    a.k_window = d_kwp.p;
    a.v_window = d_vwp.p;
    if (c.cur) {
        a.cur_k = d_ck.p;
        a.cur_v = d_cv.p;
    }
    a.query = d_q.p;
    a.out = d_out.p;
    a.chunk_tokens = c.chunk;
    if (c.wkv) {
        a.k_scale = d_ksc.p;
        a.v_scale = d_vsc.p;
        a.v_shift = d_vsh.p;
    }
    const auto ok = kvq::cuda::can_implement(a);
    ASSERT_TRUE(ok.ok) << ok.message;
    const std::size_t ws_bytes = kvq::cuda::decode_attention_workspace_bytes(a);
    DevBuf<std::uint8_t> wsb(ws_bytes);
    KVQ_CUDA_CHECK(cudaMemset(wsb.p, 0xFF, ws_bytes));

    cudaStream_t stream;
    KVQ_CUDA_CHECK(cudaStreamCreate(&stream));
    if (c.graph) {
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        KVQ_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
        kvq::cuda::launch_decode_attention(a, stream, wsb.p, ws_bytes);
        KVQ_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
        KVQ_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
        KVQ_CUDA_CHECK(cudaGraphLaunch(exec, stream));
        KVQ_CUDA_CHECK(cudaGraphLaunch(exec, stream));  // replays give the same result
        KVQ_CUDA_CHECK(cudaStreamSynchronize(stream));
        KVQ_CUDA_CHECK(cudaGraphExecDestroy(exec));
        KVQ_CUDA_CHECK(cudaGraphDestroy(graph));
    } else {
        kvq::cuda::launch_decode_attention(a, stream, wsb.p, ws_bytes);
        KVQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
    KVQ_CUDA_CHECK(cudaStreamDestroy(stream));
    const std::vector<float> got = d_out.download();
    const bool tc = kvq::cuda::detail::dec_plan(a).tc;
    if (c.expect_tc >= 0) EXPECT_EQ(tc, c.expect_tc == 1) << "tensor-core path taken: " << tc;

    if (c.qjl) {
        // The GPU scores QJL keys with the int8 bit-sliced query (kvq/cuda/qjl_query.cuh), the CPU
        // decode path's preparation (QjlKeyCodec::prepare_fast). First the quantization, read back from
        // the workspace: the projection S q within the fp32 dot-product bound of float64, and s, u_j,
        // usum exactly cpu::quantize_i8_scalar of that projection. Then a float64 attention whose
        // block-key scores are sqrt(pi/2)/m * s * ||k|| * (2 sum_j b_j u_j - usum).
        const auto wl = kvq::cuda::detail::dec_workspace_layout(a);
        std::vector<std::uint8_t> wsh(ws_bytes);
        KVQ_CUDA_CHECK(cudaMemcpy(wsh.data(), wsb.p, ws_bytes, cudaMemcpyDeviceToHost));
        const kvq::cuda::QjlQueryLayout QL = kvq::cuda::QjlQueryLayout::of(c.m);
        const float* proj = reinterpret_cast<const float*>(wsh.data() + wl.proj);
        const std::uint32_t* rec0 = reinterpret_cast<const std::uint32_t*>(wsh.data() + wl.qrec);
        const std::vector<float>& S = qjl->sketch();
        const int m = c.m;
        std::vector<std::vector<int>> qu(std::size_t(batch) * Hq, std::vector<int>(m));
        std::vector<double> qs(std::size_t(batch) * Hq);
        std::vector<long long> qsum(qs.size());
        int u_mismatch = 0;
        for (std::size_t gh = 0; gh < qs.size(); ++gh) {
            const float* qh = &q[gh * d];
            for (int j = 0; j < m; ++j) {
                double p64 = 0, pabs = 0;
                for (int ch = 0; ch < d; ++ch) {
                    p64 += double(S[std::size_t(j) * d + ch]) * qh[ch];
                    pabs += std::abs(double(S[std::size_t(j) * d + ch]) * qh[ch]);
                }
                const double bound = 1.01 * d * std::ldexp(1.0, -24) * pabs + 1e-30;
                if (!(std::abs(proj[gh * m + j] - p64) <= bound) && ++u_mismatch <= 3)
                    ADD_FAILURE() << "projection " << gh << "," << j << ": " << proj[gh * m + j] << " vs " << p64;
            }
            std::vector<std::int8_t> u(std::size_t((m + 63) / 64) * 64);
            std::int32_t usum = 0;
            const float sc = kvq::cpu::quantize_i8_scalar(proj + gh * m, m, u.data(), &usum);
            const std::uint32_t* rec = rec0 + gh * QL.record_words();
            float rs;
            std::memcpy(&rs, rec + 8 * QL.words, 4);
            EXPECT_EQ(rs, sc) << "head " << gh;
            EXPECT_EQ(static_cast<std::int32_t>(rec[8 * QL.words + 1]), usum) << "head " << gh;
            for (int j = 0; j < m; ++j) {
                unsigned byte = 0;
                for (int n = 0; n < 8; ++n) byte |= ((rec[std::size_t(n) * QL.words + j / 32] >> (j % 32)) & 1u) << n;
                const int uj = static_cast<std::int8_t>(byte);
                if (uj != u[j] && ++u_mismatch <= 3)
                    ADD_FAILURE() << "u " << gh << "," << j << ": " << uj << " vs " << int(u[j]);
                qu[gh][j] = uj;
            }
            for (int j = m; j < QL.words * 32; ++j)
                for (int n = 0; n < 8; ++n)
                    if ((rec[std::size_t(n) * QL.words + j / 32] >> (j % 32)) & 1u) ++u_mismatch;
            qs[gh] = sc;
            qsum[gh] = usum;
        }
        EXPECT_EQ(u_mismatch, 0);
        const kvq::BlockLayout ql = qjl->layout(B);
        for (int b = 0; b < batch; ++b) {
            const int T = c.lens[b], total = T + (c.cur ? 1 : 0);
            if (total == 0) continue;
            for (int hq = 0; hq < Hq; ++hq) {
                const int h = hq / c.group;
                const std::size_t gh = std::size_t(b) * Hq + hq;
                const kvq::StreamView ks = caches[b]->keys(0, h), vs = caches[b]->values(0, h);
                std::vector<double> sc(total), acc(d, 0.0);
                std::vector<float> vrow(d);
                double mx = -1e300;
                for (int p = 0; p < total; ++p) {
                    double dd = 0;
                    if (p < ks.encoded) {
                        const std::uint8_t* blk = ks.pool->data(ks.pages[p / B]);
                        const std::uint8_t* code = blk + ql.codes_offset() + std::size_t(p % B) * ql.code_bytes;
                        long long Tb = 0;
                        for (int j = 0; j < m; ++j) Tb += ((code[j / 8] >> (j % 8)) & 1) * qu[gh][j];
                        kvq::half_t nh;
                        std::memcpy(&nh, blk + ql.token_side_offset() + std::size_t(p % B) * 2, 2);
                        dd = std::sqrt(std::acos(-1.0) / 2) / m * qs[gh] * kvq::half_to_float(nh) *
                             double(2 * Tb - qsum[gh]);
                    } else {
                        const float* row = p < T ? ks.window + std::size_t(p - ks.encoded) * ks.window_stride
                                                 : &ck[(std::size_t(b) * H + h) * d];
                        for (int ch = 0; ch < d; ++ch) dd += double(q[gh * d + ch]) * row[ch];
                    }
                    sc[p] = dd / std::sqrt(double(d));
                    mx = std::max(mx, sc[p]);
                }
                double sum = 0;
                for (int p = 0; p < total; ++p) {
                    const double e = std::exp(sc[p] - mx);
                    sum += e;
                    if (p < vs.encoded)
                        vc->decode(vs.pool->data(vs.pages[p / B]), B, p % B, 1, vrow.data());
                    else if (p < T)
                        std::copy_n(vs.window + std::size_t(p - vs.encoded) * vs.window_stride, d, vrow.begin());
                    else
                        std::copy_n(&cv[(std::size_t(b) * H + h) * d], d, vrow.begin());
                    for (int ch = 0; ch < d; ++ch) acc[ch] += e * vrow[ch];
                }
                for (int ch = 0; ch < d; ++ch) ref64[gh * d + ch] = acc[ch] / sum;
            }
        }
    }

    int bad = 0;
    double worst = 0, worst64 = 0;
    for (int b = 0; b < batch; ++b) {
        const bool empty = c.lens[b] + (c.cur ? 1 : 0) == 0;
        for (int hq = 0; hq < Hq; ++hq)
            for (int ch = 0; ch < d; ++ch) {
                const std::size_t i = (std::size_t(b) * Hq + hq) * d + ch;
                const double r = empty ? 0.0 : (c.qjl ? ref64[i] : ref[i]);
                const double err = std::abs(double(got[i]) - r);
                worst = std::max(worst, err);
                if (!(err <= 5e-4 * (1 + std::abs(r))) && ++bad <= 5)
                    ADD_FAILURE() << "seq " << b << " head " << hq << " ch " << ch << ": gpu " << got[i]
                                  << (c.qjl ? " f64 (int8 query) " : " cpu ") << r;
                if (!c.qjl && !empty) {
                    const double e64 = std::abs(double(got[i]) - ref64[i]);
                    worst64 = std::max(worst64, e64);
                    if (!(e64 <= 5e-4 * (1 + std::abs(ref64[i]))) && ++bad <= 5)
                        ADD_FAILURE() << "seq " << b << " head " << hq << " ch " << ch << ": gpu " << got[i] << " f64 "
                                      << ref64[i];
                }
            }
    }
    EXPECT_EQ(bad, 0);
    std::printf("[decode] %s %s worst |gpu-ref| %.3g, |gpu-f64| %.3g\n", tc ? "tc" : "cuda-core", describe(c).c_str(),
                worst, worst64);
}

DecCase qjl_case(int d, int m, int vbits, int group, std::vector<int> lens) {
    DecCase c;
    c.d = d;
    c.qjl = true;
    c.m = m;
    c.vbits = vbits;
    c.group = group;
    c.lens = std::move(lens);
    return c;
}
DecCase int_case(int d, int kbits, int vbits, int group, std::vector<int> lens) {
    DecCase c = qjl_case(d, 0, vbits, group, std::move(lens));
    c.qjl = false;
    c.kbits = kbits;
    return c;
}

TEST(DecodeAttentionGpu, QjlKeysMatchCpu) {
    for (int d : {64, 128, 256})
        for (int group : {1, 4}) {
            run_case(qjl_case(d, 256, 2, group, {1000, 37, 333}));
            DecCase c = qjl_case(d, d == 64 ? 128 : 512, 4, group, {700, 1, 192});
            c.cur = false;
            c.kwin = 0;
            c.vwin = 0;
            c.B = 32;
            run_case(c);
        }
    DecCase c = qjl_case(128, 256, 8, 3, {129, 2000, 64});  // G = 3: one head per pass
    c.kwin = 17;
    c.vwin = 1;
    run_case(c);
}

// The tensor-core kernel (decode_attention_tc.cuh): every head dim, value bit width and group size
// it takes, GQA 1/2/4, blocks 16..256, m not a multiple of 256, several chunks and warps per chunk
// (chunk 256 = one tile per warp), tails with windows and the current token, sharp attention and
// tiny values (the per-column power-of-two weight scaling), and a shape it must refuse.
// The tensor-core kernel with bulk-copy staging: the same shapes as TensorCorePathShapes (blocks of
// 64..256 tokens take the bulk path, 16 and 32 the per-lane copies), partial last tiles, chunk
// splits, windows and the current token, plus a graph replay.
TEST(DecodeAttentionGpu, TensorCorePathBulkStaging) {
    struct S {
        int d, m, vbits, vgroup, group, B, chunk;
    };
    const S shapes[] = {{128, 256, 2, 32, 1, 64, 256}, {128, 256, 2, 32, 1, 64, 0},     {64, 128, 4, 16, 1, 16, 512},
                        {256, 512, 8, 64, 1, 128, 0},  {256, 256, 2, 128, 2, 256, 256}, {128, 1024, 2, 64, 2, 64, 0},
                        {64, 64, 8, 64, 4, 64, 256},   {128, 192, 4, 128, 4, 128, 0}};
    for (const S& sh : shapes) {
        DecCase c = qjl_case(sh.d, sh.m, sh.vbits, sh.group, {4999, 1, 2048, 64});
        c.vgroup = sh.vgroup;
        c.B = sh.B;
        c.chunk = sh.chunk;
        c.expect_tc = 1;
        c.bulk = true;
        run_case(c);
    }
    DecCase g = qjl_case(128, 256, 2, 1, {3000, 77, 640});
    g.expect_tc = 1;
    g.bulk = true;
    g.graph = true;
    run_case(g);
}

// Plain stream order (DecodeAttentionArgs::pdl = false) against the same references as the default's
// overlapped launches: QJL keys (projection -> quantisation -> tensor-core kernel -> tail, all
// dependents on sm_90 by default) and WKV keys (tensor-core kernel -> tail), with windows, the current
// token, two tail chunks + the combine or one tail chunk that merges, plus a graph replay.
TEST(DecodeAttentionGpu, PlainStreamOrder) {
    for (bool pdl : {false, true}) {
        // max_tokens 5000: two tail chunks and the combine launch; 4000: one tail chunk that merges.
        for (int longest : {4999, 3999}) {
            DecCase c = qjl_case(128, 256, 2, 1, {longest, 1, 2048, 64});
            c.expect_tc = 1;
            c.bulk = true;
            c.pdl = pdl;
            run_case(c);
        }
        DecCase w = int_case(128, 4, 4, 1, {3001, 700, 64});
        w.kgroup = w.vgroup = 128;
        w.wkv = true;
        w.expect_tc = 1;
        w.bulk = true;
        w.pdl = pdl;
        w.graph = pdl;
        run_case(w);
    }
}

TEST(DecodeAttentionGpu, TensorCorePathShapes) {
    struct S {
        int d, m, vbits, vgroup, group, B, chunk;
    };
    const S shapes[] = {{128, 256, 2, 32, 1, 64, 256}, {128, 256, 2, 32, 1, 64, 0},   {64, 128, 4, 16, 1, 16, 512},
                        {64, 256, 2, 32, 2, 32, 0},    {256, 512, 8, 64, 1, 128, 0},  {256, 256, 2, 128, 2, 256, 256},
                        {128, 192, 4, 128, 4, 32, 0},  {128, 320, 8, 32, 1, 16, 256}, {128, 1024, 2, 64, 2, 64, 0},
                        {64, 64, 8, 64, 4, 64, 256}};
    for (const S& sh : shapes) {
        DecCase c = qjl_case(sh.d, sh.m, sh.vbits, sh.group, {4999, 1, 2048});
        c.vgroup = sh.vgroup;
        c.B = sh.B;
        c.chunk = sh.chunk;
        c.expect_tc = 1;
        run_case(c);
    }
    DecCase sharp = qjl_case(128, 256, 2, 1, {3000, 77, 640});
    sharp.qscale = 3.0f;
    sharp.expect_tc = 1;
    run_case(sharp);
    DecCase tiny = qjl_case(128, 256, 4, 2, {3000, 77, 640});
    tiny.vgroup = 64;
    tiny.vscale = 1e-3f;
    tiny.kwin = 0;
    tiny.vwin = 0;
    tiny.cur = false;
    tiny.expect_tc = 1;
    run_case(tiny);
    DecCase wide = qjl_case(128, 256, 2, 4, {300, 2, 9});  // G x groups = 16 > 4: CUDA-core kernel
    wide.expect_tc = 0;
    run_case(wide);
}

// The tensor-core kernel with token-wise int keys (decode_attention_tc.cuh): head dims 64/128/256, key
// and value bits 2/4/8, key groups from 16 (up to 4 group classes per lane quarter) to d, value groups,
// GQA 1/2/4, blocks 16..256, explicit and automatic chunk splits, both staging paths, fp32 windows and
// the exact current token, WKV smoothing (k_scale folded into the key B operand, values un-smoothed
// by the combine), sharp and flat attention, tiny values, a graph replay, and the shapes it must
// refuse (too many (head, group) combinations per k-step, key groups of 8, cuda_core_only).
TEST(DecodeAttentionGpu, TensorCorePathIntKeys) {
    struct S {
        int d, kbits, kgroup, vbits, vgroup, group, B, chunk;
        bool wkv;
    };
    const S shapes[] = {
        {128, 4, 32, 4, 32, 1, 64, 0, false},      // the benchmark's int4 K + V
        {128, 4, 128, 4, 128, 1, 64, 256, true},   // the benchmark's WKV int4 g128
        {128, 4, 128, 4, 128, 4, 128, 0, true},    // WKV, GQA 4
        {64, 2, 16, 2, 16, 1, 16, 512, false},     // 4 key groups of 16, blocks of 16
        {64, 8, 64, 8, 32, 2, 32, 0, false},       // one key group, GQA 2
        {256, 8, 32, 2, 64, 1, 128, 0, false},     // 8 key groups: 2 classes per lane quarter
        {256, 4, 16, 2, 128, 1, 256, 256, false},  // 16 key groups: 4 classes
        {128, 2, 16, 4, 64, 1, 32, 0, true},       // 8 key groups at d = 128, WKV
        {128, 8, 64, 2, 64, 2, 64, 0, true},       // 2 key groups x GQA 2, WKV
        {256, 4, 256, 4, 256, 4, 64, 0, true},     // WKV d = 256, GQA 4
        {64, 4, 64, 4, 64, 4, 256, 256, false},    // GQA 4, blocks of 256
        {128, 2, 128, 8, 32, 1, 16, 256, false},   // 2-bit keys, 8-bit values
    };
    for (const S& sh : shapes)
        for (bool bulk : {false, true}) {
            DecCase c = int_case(sh.d, sh.kbits, sh.vbits, sh.group, {4999, 1, 2048});
            c.kgroup = sh.kgroup;
            c.vgroup = sh.vgroup;
            c.B = sh.B;
            c.chunk = sh.chunk;
            c.wkv = sh.wkv;
            c.bulk = bulk;
            c.expect_tc = 1;
            run_case(c);
        }
    // Odd lengths (partial last step and tile), no windows or current token: everything but the last
    // < 16 positions on tensor cores.
    DecCase odd = int_case(128, 4, 4, 1, {17, 33, 1000, 4095});
    odd.kwin = odd.vwin = 0;
    odd.cur = false;
    odd.bulk = true;
    odd.expect_tc = 1;
    run_case(odd);
    DecCase sharp = int_case(128, 4, 4, 1, {3000, 77, 640});
    sharp.qscale = 3.0f;
    sharp.expect_tc = 1;
    run_case(sharp);
    DecCase flat = int_case(128, 8, 2, 2, {3000, 77, 640});  // tiny query: the key B scaling
    flat.kgroup = flat.vgroup = 64;
    flat.qscale = 1e-3f;
    flat.expect_tc = 1;
    run_case(flat);
    DecCase tiny = int_case(128, 4, 4, 2, {3000, 77, 640});
    tiny.kgroup = tiny.vgroup = 64;
    tiny.vscale = 1e-3f;
    tiny.kwin = tiny.vwin = 0;
    tiny.cur = false;
    tiny.expect_tc = 1;
    run_case(tiny);
    DecCase g = int_case(128, 4, 4, 1, {3000, 77, 640});
    g.kgroup = g.vgroup = 128;
    g.wkv = true;
    g.bulk = true;
    g.graph = true;
    g.expect_tc = 1;
    run_case(g);
    // Refused: G x key groups per k-step = 8 > 4; key groups of 8; the CUDA-core kernel on request.
    DecCase wide = int_case(128, 4, 4, 2, {300, 2, 9});
    wide.kgroup = 32;
    wide.vgroup = 64;
    wide.expect_tc = 0;
    run_case(wide);
    DecCase narrow = int_case(128, 4, 4, 1, {300, 2, 9});
    narrow.kgroup = 8;
    narrow.expect_tc = 0;
    run_case(narrow);
    DecCase forced = int_case(128, 4, 4, 1, {1000, 37, 333});
    forced.cuda_core = true;
    forced.expect_tc = 0;
    run_case(forced);
}

// Every shape on the default path (tensor cores where tc_supported) and on the CUDA-core kernel.
TEST(DecodeAttentionGpu, IntKeysMatchCpuAndFloat64) {
    for (int d : {64, 128, 256})
        for (int group : {1, 4})
            for (bool cuda_core : {false, true}) {
                DecCase a = int_case(d, 4, 4, group, {1500, 257, 9});
                a.cuda_core = cuda_core;
                run_case(a);
                DecCase c = int_case(d, d == 64 ? 2 : 8, d == 256 ? 2 : 8, group, {129, 77, 1025});
                c.kgroup = d == 64 ? 16 : 32;
                c.vgroup = 64;
                c.B = 16;
                c.kwin = 3;
                c.vwin = 0;
                c.cuda_core = cuda_core;
                run_case(c);
            }
}

TEST(DecodeAttentionGpu, NarrowGroups) {
    // Value groups of 8 channels (8 channels per thread even for one head per pass), key groups of 8.
    for (int group : {1, 2, 4}) {
        DecCase c = int_case(128, 4, 4, group, {333, 64, 1001});
        c.kgroup = 8;
        c.vgroup = 8;
        run_case(c);
        DecCase q = qjl_case(128, 256, 2, group, {333, 64, 1001});
        q.vgroup = 8;
        q.B = 256;
        run_case(q);
    }
}

TEST(DecodeAttentionGpu, SplitKChunksAndEmptySequences) {
    DecCase c = int_case(128, 4, 2, 4, {3001, 0, 513});  // a sequence with only the current token
    c.chunk = 256;
    run_case(c);
    c.chunk = 1024;
    run_case(c);
    DecCase q = qjl_case(128, 256, 2, 1, {4999, 1, 2048});
    q.chunk = 512;
    q.B = 128;
    run_case(q);
    q.cur = false;
    q.lens = {5, 0, 300};  // a sequence with nothing to attend: output 0
    q.chunk = 0;
    run_case(q);
    // More parts than the combine kernel's threads (head_dim): it merges them in batches, rescaling
    // the earlier batches' sums (d 64: 79 parts; d 128: 158 parts).
    DecCase w = int_case(64, 4, 4, 1, {20000, 7, 700});
    w.chunk = 256;
    run_case(w);
    DecCase p = qjl_case(128, 256, 2, 1, {40300, 0, 1300});
    p.chunk = 256;
    run_case(p);
}

// WKVQuant 4-bit K and V (token-wise, g = d) with the static smoothing folded into q and the output.
TEST(DecodeAttentionGpu, WkvKeysAndValuesMatchCpuAndFloat64) {
    for (int d : {64, 128, 256})
        for (int group : {1, 4})
            for (bool cuda_core : {false, true}) {  // tensor cores (all of these shapes), CUDA cores
                DecCase c = int_case(d, 4, 4, group, {1500, 257, 9});
                c.kgroup = d;
                c.vgroup = d;
                c.wkv = true;
                c.cuda_core = cuda_core;
                c.expect_tc = cuda_core ? 0 : 1;
                run_case(c);
            }
    DecCase c = int_case(128, 4, 4, 1, {700, 33, 2100});
    c.kgroup = c.vgroup = 128;
    c.wkv = true;
    c.graph = true;
    run_case(c);
}

TEST(DecodeAttentionGpu, CapturesInAGraph) {
    DecCase c = qjl_case(128, 256, 2, 4, {800, 33, 2100});
    c.graph = true;
    run_case(c);
    DecCase i = int_case(128, 4, 4, 1, {700, 1, 300});
    i.graph = true;
    run_case(i);
}

TEST(DecodeAttentionGpu, RejectsBadArguments) {
    kvq::QjlParams p;
    p.head_dim = 128;
    p.m = 256;
    p.outliers = 8;
    const kvq::QjlKeyCodec with_outliers(p);
    const kvq::TokenwiseCodec v4(kvq::TokenwiseParams{128, 4, 32});
    kvq::cuda::DecodeAttentionArgs a;
    float f = 0;
    int n = 0;
    std::uint32_t pg = 0;
    a.head_dim = 128;
    a.n_q_heads = 8;
    a.n_kv_heads = 2;
    a.batch = 1;
    a.max_tokens = 10;
    a.sketch = &f;
    a.query = &f;
    a.out = &f;
    a.n_tokens = a.k_encoded = a.v_encoded = &n;
    a.key_pages = a.value_pages = &pg;
    kvq::cuda::set_qjl_keys(a, with_outliers, 64);
    kvq::cuda::set_tokenwise_values(a, v4, 64);
    EXPECT_FALSE(kvq::cuda::can_implement(a).ok);  // outliers are not supported by the fused kernel
    p.outliers = 0;
    const kvq::QjlKeyCodec plain(p);
    kvq::cuda::set_qjl_keys(a, plain, 64);
    a.key_block_bytes = a.key_layout.bytes();
    EXPECT_TRUE(kvq::cuda::can_implement(a).ok) << kvq::cuda::can_implement(a).message;
    a.head_dim = 96;
    EXPECT_FALSE(kvq::cuda::can_implement(a).ok);
    a.head_dim = 128;
    a.n_q_heads = 7;
    EXPECT_FALSE(kvq::cuda::can_implement(a).ok);
    a.n_q_heads = 8;
    a.chunk_tokens = 100;
    EXPECT_FALSE(kvq::cuda::can_implement(a).ok);
    a.chunk_tokens = 0;
    a.cur_k = &f;  // without cur_v
    EXPECT_FALSE(kvq::cuda::can_implement(a).ok);
    a.cur_k = nullptr;
    EXPECT_THROW(kvq::cuda::launch_decode_attention(a, nullptr, nullptr, 0), kvq::Error);  // no workspace
}

}  // namespace
