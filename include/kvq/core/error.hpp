#pragma once
// Two tiers of errors (as FAISS does):
//  - kvq::Error (thrown) for anything a caller can get wrong: bad shapes, unsupported parameters,
//    NaN/Inf input, malformed files, out-of-range ids. The message names the problem and the value.
//  - KVQ_ASSERT (abort) for broken internal invariants, i.e. bugs in kvq itself.
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>

namespace kvq {

class Error : public std::runtime_error {
public:
    explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
template <class... Parts>
[[noreturn]] inline void throw_error(const char* where, const Parts&... parts) {
    std::ostringstream os;
    os << "kvq: ";
    (os << ... << parts);
    os << " [" << where << "]";
    throw Error(os.str());
}
[[noreturn]] inline void assert_fail(const char* cond, const char* file, int line) {
    std::fprintf(stderr, "kvq internal invariant violated: %s at %s:%d\n", cond, file, line);
    std::abort();
}
}  // namespace detail
}  // namespace kvq

// Throws kvq::Error("kvq: <message parts> [function]") when cond is false.
#define KVQ_CHECK(cond, ...)                                            \
    do {                                                                \
        if (!(cond)) ::kvq::detail::throw_error(__func__, __VA_ARGS__); \
    } while (0)

#define KVQ_THROW(...) ::kvq::detail::throw_error(__func__, __VA_ARGS__)

// Internal invariants only: never for user input.
#define KVQ_ASSERT(cond)                                                    \
    do {                                                                    \
        if (!(cond)) ::kvq::detail::assert_fail(#cond, __FILE__, __LINE__); \
    } while (0)
