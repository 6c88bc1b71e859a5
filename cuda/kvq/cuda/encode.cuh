#pragma once
// GPU encode of keys and values straight into paged blocks, byte for byte the CPU codecs' format
// (docs/FORMAT.md):
//  * launch_tokenwise_encode: kvq::TokenwiseCodec (b = 2, 4, 8): QJL's values, the int-b baselines,
//    and, with the static shift/scale of a layer set, WKVQuant's 2-D codec (x~ = (x - shift) / scale,
//    then token-wise; what WkvKvCache + WkvCodec store). The default kernel (TokenwiseEncodeArgs::
//    vector_kernel) gives a thread 8 channels of a run of tokens and replaces the divisions by
//    reciprocals with exact corrections; the reference kernel (vector_kernel = false) takes one warp
//    per (token, KV head) row with kvq::tokenwise_quantize_group's arithmetic, operation for
//    operation (IEEE division, no contraction). All write the CPU's bytes (tests compare them).
//  * launch_qjl_encode: kvq::QjlKeyCodec, with or without outliers, on tensor cores; every sign bit
//    is that of the exact projection (qjl_encode.cuh says how).
// The token-wise kernels live in tokenwise_encode.cuh, the QJL ones in qjl_encode.cuh; this header
// includes both.
//
// Input: x [batch][n_tokens][n_kv_heads][head_dim] (fp32 or fp16, strides configurable); token t of
// sequence b goes to stream position pos0[b] + t of KV head h: block pages[(b * n_kv_heads + h) *
// page_stride + pos / B], token pos % B. Only the bytes of those tokens (codes, per-token side data,
// and with outliers the group's channel ids) are written. Launchers: stream + (unused, may be null)
// workspace, no host synchronisation, every launch checked, capturable in a CUDA graph.

#include "kvq/cuda/qjl_encode.cuh"
#include "kvq/cuda/tokenwise_encode.cuh"
