#pragma once
// One macro for functions that compile for both host and device code. Without nvcc it is plain
// `inline`, so the library headers need no CUDA toolkit.
#if defined(__CUDACC__)
#define KVQ_HD __host__ __device__ __forceinline__
#else
#define KVQ_HD inline
#endif
