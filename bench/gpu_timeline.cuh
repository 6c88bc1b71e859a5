#pragma once
// --timeline of the GPU benchmarks (builds with -DKVQ_TIMELINE, kvq/cuda/timeline.cuh): reads the
// per-CTA stamps of the last instrumented launch and prints, relative to the first CTA's entry, the
// quantiles of when CTAs enter, get their first data, stop streaming and exit, how long the phase
// after the loop takes, how the CTAs sat on the SMs, and how many CTAs stream in each 5 us slice.
#if defined(KVQ_TIMELINE)
#include <algorithm>
#include <cstdio>
#include <vector>

#include "kvq/cuda/check.cuh"
#include "kvq/cuda/timeline.cuh"

namespace kvq_bench {

// Zeroes the stamps (call before the launch to be shown).
inline void clear_timeline() {
    void* p = nullptr;
    KVQ_CUDA_CHECK(cudaGetSymbolAddress(&p, kvq::cuda::detail::kvq_timeline));
    KVQ_CUDA_CHECK(cudaMemset(p, 0, sizeof(kvq::cuda::detail::kvq_timeline)));
}

// n_ctas: CTAs of the launch (0: the records with an entry stamp after clear_timeline); bpp: bytes the kernel reads per
// position (for GB/s per CTA); phase: what stamp [12] marks, or nullptr if the kernel has none; phase_after_loop: [12]
// comes after the loop (printed as [12] - loop end and exit - [12]), else before it (printed as [12] - entry).
inline void print_timeline(int n_ctas, double bpp, const char* phase, bool phase_after_loop) {
    using kvq::cuda::detail::kTimelineFields;
    std::vector<unsigned long long> raw(std::size_t(kvq::cuda::detail::kTimelineCtas) * kTimelineFields);
    KVQ_CUDA_CHECK(cudaMemcpyFromSymbol(raw.data(), kvq::cuda::detail::kvq_timeline, raw.size() * 8));
    auto at = [&](int cta, int field) { return raw[std::size_t(cta) * kTimelineFields + field]; };
    if (n_ctas <= 0)
        for (n_ctas = 0; n_ctas < kvq::cuda::detail::kTimelineCtas && at(n_ctas, 1) != 0;) ++n_ctas;
    n_ctas = std::min(n_ctas, kvq::cuda::detail::kTimelineCtas);
    if (n_ctas == 0) {
        std::printf("timeline: no stamps (not an instrumented kernel?)\n");
        return;
    }
    unsigned long long t0 = ~0ull;
    for (int i = 0; i < n_ctas; ++i) t0 = std::min(t0, at(i, 1));
    const auto us = [&](unsigned long long t) { return (double(t) - double(t0)) * 1e-3; };
    std::vector<double> entry, first, stream_end, spread, phase_d, after_phase, exit_, rate;
    std::vector<int> per_sm(1024, 0);
    std::vector<double> sm_end(1024, 0.0);
    for (int i = 0; i < n_ctas; ++i) {
        unsigned long long f = 0, le = 0, ls = ~0ull;
        for (int w = 0; w < 4; ++w) {
            f = std::max(f, at(i, 2 + w));  // warps without data leave 0
            le = std::max(le, at(i, 6 + w));
            if (at(i, 6 + w)) ls = std::min(ls, at(i, 6 + w));
        }
        entry.push_back(us(at(i, 1)));
        first.push_back(us(f));
        stream_end.push_back(us(le));
        spread.push_back(double(le - ls) * 1e-3);
        if (phase && phase_after_loop) {
            phase_d.push_back(double(at(i, 12) - le) * 1e-3);
            after_phase.push_back(double(at(i, 10) - at(i, 12)) * 1e-3);
        } else if (phase) {
            phase_d.push_back(double(at(i, 12) - at(i, 1)) * 1e-3);
        }
        exit_.push_back(us(at(i, 10)));
        rate.push_back(le > f ? double(at(i, 11)) * bpp / double(le - f) : 0.0);  // bytes / ns = GB/s
        const int sm = int(at(i, 0) & 1023);
        ++per_sm[sm];
        sm_end[sm] = std::max(sm_end[sm], us(at(i, 10)));
    }
    auto q = [](std::vector<double> v, double f) {
        std::sort(v.begin(), v.end());
        return v[std::min(v.size() - 1, std::size_t(f * double(v.size())))];
    };
    std::printf("timeline: %d CTAs; us from the first entry, quantiles 0 / 10 / 50 / 90 / 100%%\n", n_ctas);
    auto row = [&](const char* name, const std::vector<double>& v) {
        std::printf("timeline:   %-32s %7.2f %7.2f %7.2f %7.2f %7.2f\n", name, q(v, 0), q(v, 0.1), q(v, 0.5), q(v, 0.9),
                    q(v, 1.0));
    };
    row("entry", entry);
    row("first data (last warp)", first);
    row("streaming ends (last warp)", stream_end);
    row("warps' loop-end spread", spread);
    if (phase) row(phase, phase_d);
    if (phase && phase_after_loop) row("exit after that", after_phase);
    row("exit", exit_);
    row("GB/s per CTA while streaming", rate);
    int used = 0, hist[8] = {};
    for (int sm = 0; sm < 1024; ++sm)
        if (per_sm[sm]) {
            ++used;
            ++hist[std::min(per_sm[sm], 7)];
        }
    std::printf("timeline: %d SMs used; SMs with 1..7+ CTAs:", used);
    for (int c = 1; c < 8; ++c) std::printf(" %d", hist[c]);
    std::printf("\n");
    for (int c = 1; c < 8; ++c) {
        if (!hist[c]) continue;
        std::vector<double> e;
        for (int sm = 0; sm < 1024; ++sm)
            if (std::min(per_sm[sm], 7) == c) e.push_back(sm_end[sm]);
        std::printf("timeline:   SMs with %d CTAs: last exit %7.2f / %7.2f / %7.2f us (min / median / max)\n", c,
                    q(e, 0), q(e, 0.5), q(e, 1.0));
    }
    const double end = q(exit_, 1.0);
    std::printf("timeline: CTAs streaming per 5 us slice:");
    for (double a = 0; a < end; a += 5.0) {
        int n = 0;
        for (int i = 0; i < n_ctas; ++i)
            if (first[i] < a + 5.0 && stream_end[i] > a) ++n;
        std::printf(" %d", n);
    }
    std::printf("\n");
}

}  // namespace kvq_bench
#endif
