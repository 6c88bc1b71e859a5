#pragma once
// Input checks shared by the codecs and the cache. They run before anything is written, so a
// rejected append leaves the cache as it was.
#include <cmath>

#include "kvq/core/error.hpp"

namespace kvq::detail {

// x: [n][d]. Throws naming the token, channel and value of the first non-finite or out-of-range entry.
inline void check_finite_and_bounded(const float* x, int n, int d, float max_abs, const char* what) {
    for (int t = 0; t < n; ++t)
        for (int c = 0; c < d; ++c) {
            const float v = x[static_cast<long>(t) * d + c];
            if (!std::isfinite(v))
                KVQ_THROW(what, " contains a non-finite value (", v, ") at token ", t, ", channel ", c);
            if (std::fabs(v) > max_abs)
                KVQ_THROW(what, " value ", v, " at token ", t, ", channel ", c, " exceeds the storable range +-",
                          max_abs);
        }
}

}  // namespace kvq::detail
