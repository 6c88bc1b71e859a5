#pragma once
// Error checking for the CUDA runtime: every failure becomes a kvq::Error naming the call, the
// CUDA error and where it happened. Launch checks use cudaGetLastError only (no synchronisation),
// so launchers stay asynchronous and capturable in a CUDA graph.
#include <cuda_runtime.h>

#include <sstream>
#include <string>

#include "kvq/core/error.hpp"

namespace kvq::cuda {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
    std::ostringstream os;
    os << "kvq: CUDA error " << static_cast<int>(err) << " (" << cudaGetErrorName(err) << ": "
       << cudaGetErrorString(err) << ") in `" << expr << "` [" << file << ":" << line << "]";
    throw ::kvq::Error(os.str());
}

inline void check_cuda(cudaError_t err, const char* expr, const char* file, int line) {
    if (err != cudaSuccess) throw_cuda_error(err, expr, file, line);
}

// After a <<<...>>> launch: reports a bad configuration (too much shared memory, invalid grid)
// without waiting for the kernel. Clears the sticky-free error state of the launch.
inline void check_launch(const char* kernel, const char* file, int line) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) throw_cuda_error(err, kernel, file, line);
}

}  // namespace kvq::cuda

#define KVQ_CUDA_CHECK(expr) ::kvq::cuda::check_cuda((expr), #expr, __FILE__, __LINE__)
#define KVQ_CUDA_CHECK_LAUNCH(name) ::kvq::cuda::check_launch((name), __FILE__, __LINE__)
