#pragma once
// A progress meter for long jobs (perplexity runs, evaluations, calibration). The library itself
// prints nothing (docs: long work reports progress through callbacks); this class only decides
// when a redraw is due and renders the line, and the program writes it where it wants (the
// examples: stderr, only when it is a terminal or --progress was given, never into --json output).
//
//   kvq::ProgressMeter pm("kl int4", total_steps);
//   for (...) { ...; if (pm.due(++done)) std::fputs(pm.render(done).c_str(), stderr); }
//   std::fputs(pm.finish().c_str(), stderr);
//
// render() returns "\r" + the line padded to the previous line's width, so repeated writes
// overwrite one terminal line; finish() returns the final line and a newline.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>

#include "kvq/core/error.hpp"

namespace kvq {

class ProgressMeter {
public:
    using Clock = std::chrono::steady_clock;

    // total: number of steps (>= 1); min_interval_s: least time between two redraws (a redraw per
    // step would cost more than the step for fast jobs and flood a log file).
    ProgressMeter(std::string label, std::uint64_t total, double min_interval_s = 0.25, int bar_width = 28)
        : label_(std::move(label)),
          total_(total),
          interval_(min_interval_s),
          width_(bar_width),
          start_(Clock::now()),
          last_(start_) {
        KVQ_CHECK(total >= 1, "ProgressMeter: total = ", total, " (need at least 1 step)");
        KVQ_CHECK(min_interval_s >= 0 && min_interval_s < 3600, "ProgressMeter: min_interval_s = ", min_interval_s);
        KVQ_CHECK(bar_width >= 1 && bar_width <= 200, "ProgressMeter: bar_width = ", bar_width);
    }

    std::uint64_t total() const { return total_; }
    double elapsed() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

    // True when a redraw is due for `done` steps: the first call, the last step, or min_interval_s
    // after the previous redraw that due() allowed.
    bool due(std::uint64_t done) {
        const auto now = Clock::now();
        if (!drawn_ || done >= total_ || std::chrono::duration<double>(now - last_).count() >= interval_) {
            drawn_ = true;
            last_ = now;
            return true;
        }
        return false;
    }

    // "\rlabel [=======>      ]  45.0%  921/2047  12.3/s  eta 1:31" (done is clamped to total).
    std::string render(std::uint64_t done) {
        done = std::min(done, total_);
        last_rendered_ = done;
        const double frac = double(done) / double(total_), secs = elapsed();
        const int fill = static_cast<int>(frac * width_);
        std::string bar(static_cast<std::size_t>(width_), ' ');
        for (int i = 0; i < fill; ++i) bar[static_cast<std::size_t>(i)] = '=';
        if (fill < width_) bar[static_cast<std::size_t>(fill)] = '>';
        const double rate = secs > 0 ? double(done) / secs : 0.0;
        char buf[160];
        std::snprintf(buf, sizeof buf, " [%s] %5.1f%%  %llu/%llu  %.1f/s", bar.c_str(), 100.0 * frac,
                      static_cast<unsigned long long>(done), static_cast<unsigned long long>(total_), rate);
        std::string line = label_ + buf;
        if (done < total_ && rate > 0)
            line += "  eta " + clock_time(double(total_ - done) / rate);
        else if (done >= total_)
            line += "  " + clock_time(secs);
        const std::size_t len = line.size();
        if (line.size() < prev_len_) line.append(prev_len_ - line.size(), ' ');  // erase a longer previous line
        prev_len_ = len;
        return "\r" + line;
    }

    // The final line (total steps) and a newline; just the newline when the last render already
    // showed the total.
    std::string finish() { return last_rendered_ >= total_ ? std::string("\n") : render(total_) + "\n"; }

    // "m:ss" or "h:mm:ss".
    static std::string clock_time(double seconds) {
        const long long s = std::llround(std::max(0.0, seconds));
        char buf[48];
        if (s >= 3600)
            std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", s / 3600, (s / 60) % 60, s % 60);
        else
            std::snprintf(buf, sizeof buf, "%lld:%02lld", s / 60, s % 60);
        return buf;
    }

private:
    std::string label_;
    std::uint64_t total_;
    double interval_;
    int width_;
    Clock::time_point start_, last_;
    bool drawn_ = false;
    std::size_t prev_len_ = 0;
    std::uint64_t last_rendered_ = 0;
};

}  // namespace kvq
