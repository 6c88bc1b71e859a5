#pragma once
// The codec contract shared by every quantizer, the cache and the CUDA kernels.
//
// A block holds B consecutive tokens of one (layer, KV head) stream for one codec, laid out as
// structure-of-arrays in three sections, each starting on a 16-byte boundary so that device code
// can use 16-byte loads:
//
//   [ codes: B x code_bytes ][ per-token side data: B x token_side_bytes ][ per-block side data ]
//
// Token t's code bytes are at codes + t * code_bytes. How a codec splits its side sections (e.g. an
// array of B norms followed by another) is documented in the codec's header; BlockLayout only
// records sizes, so host and device code compute the same offsets.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/core/host_device.hpp"

namespace kvq {

KVQ_HD constexpr std::size_t align16(std::size_t n) { return (n + 15) & ~static_cast<std::size_t>(15); }

struct BlockLayout {
    std::uint32_t block_tokens = 0;      // B
    std::uint32_t code_bytes = 0;        // per token
    std::uint32_t token_side_bytes = 0;  // per token (norms, scales, zero points)
    std::uint32_t block_side_bytes = 0;  // per block (outlier indices, per-channel scales)

    KVQ_HD std::size_t codes_offset() const { return 0; }
    KVQ_HD std::size_t token_side_offset() const { return align16(std::size_t{block_tokens} * code_bytes); }
    KVQ_HD std::size_t block_side_offset() const {
        return token_side_offset() + align16(std::size_t{block_tokens} * token_side_bytes);
    }
    // Total bytes of one block, alignment padding included (it is memory the cache really uses).
    KVQ_HD std::size_t bytes() const { return block_side_offset() + align16(block_side_bytes); }
};

// Work a key codec does once per query vector ("set the query once, score many codes").
struct PreparedQuery {
    std::vector<float> q;                // [d] the query itself
    std::vector<float> data;             // codec-specific (e.g. QJL: S q, [m_max])
    mutable std::vector<float> scratch;  // per-block work space, reused so scoring never allocates
};

enum class CodecId : std::uint8_t { Identity = 1, Tokenwise = 2, Qjl = 3, Wkv = 4, KiviKey = 5 };

// Runtime-polymorphic so that a cache, kvq-eval and an engine can pick codecs at run time; calls
// are per block (B tokens), so the virtual dispatch is amortised. Every method with "first" and
// "n" works on tokens [first, first + n) of one block of block_tokens tokens.
class Codec {
public:
    virtual ~Codec() = default;

    virtual CodecId id() const = 0;
    virtual std::string name() const = 0;
    virtual int head_dim() const = 0;
    // Tokens that must be encoded together (QJL with outliers picks channels per 32-token group).
    virtual int granularity() const { return 1; }
    // Whether tokens can be decoded back to vectors (false for QJL keys: it only scores).
    virtual bool decodable() const { return true; }
    virtual BlockLayout layout(int block_tokens) const = 0;

    // Throws kvq::Error if x [n][d] cannot be stored (NaN, Inf, out of the storage type's range).
    // The cache validates a whole append before changing anything, so encode never throws.
    virtual void validate(const float* x, int n) const = 0;
    // x: [n][d] row-major. first and n are multiples of granularity(), first + n <= block_tokens.
    virtual void encode(const float* x, int n, std::uint8_t* block, int block_tokens, int first) const = 0;

    // Keys: q [d] -> prepared; scores out[i] = estimate of <q, k_{first+i}> for i in [0, n).
    virtual void prepare(const float* q, PreparedQuery& pq) const = 0;
    virtual void score(const PreparedQuery& pq, const std::uint8_t* block, int block_tokens, int first, int n,
                       float* out) const = 0;

    // Values: acc [d] += sum_i w[i] * v_{first+i}; decode: out [n][d].
    virtual void accumulate(const std::uint8_t* block, int block_tokens, int first, int n, const float* w,
                            float* acc) const = 0;
    virtual void decode(const std::uint8_t* block, int block_tokens, int first, int n, float* out) const = 0;

    // prepare() for hot loops (decode attention): a codec may trade exactness for speed within a
    // tolerance it documents (QJL: an int8-quantized projection for the SIMD bit-sliced scorer).
    // score() accepts either preparation. Default: prepare().
    virtual void prepare_fast(const float* q, PreparedQuery& pq) const { prepare(q, pq); }

    // GQA: the G query heads that share one KV head, in one pass over the block (codecs override
    // these to read and expand a block once for all G). out[g] / acc[g] as in score / accumulate.
    virtual void score_group(const PreparedQuery* const* pq, int G, const std::uint8_t* block, int block_tokens,
                             int first, int n, float* const* out) const {
        for (int g = 0; g < G; ++g) score(*pq[g], block, block_tokens, first, n, out[g]);
    }
    virtual void accumulate_group(const std::uint8_t* block, int block_tokens, int first, int n, int G,
                                  const float* const* w, float* const* acc) const {
        for (int g = 0; g < G; ++g) accumulate(block, block_tokens, first, n, w[g], acc[g]);
    }

    // Exact storage cost: bits per element of a full block, every byte of metadata counted.
    double bits_per_element(int block_tokens) const {
        return 8.0 * static_cast<double>(layout(block_tokens).bytes()) / (double(block_tokens) * head_dim());
    }
};

namespace detail {
inline void check_head_dim(int d) {
    KVQ_CHECK(d >= 8 && d <= 1024 && d % 8 == 0, "head_dim must be a multiple of 8 in [8, 1024], got ", d);
}
inline void check_block_tokens(int block_tokens, int granularity) {
    KVQ_CHECK(block_tokens >= 1 && block_tokens <= 4096 && (block_tokens & (block_tokens - 1)) == 0,
              "block_tokens must be a power of two in [1, 4096], got ", block_tokens);
    KVQ_CHECK(block_tokens % granularity == 0, "block_tokens (", block_tokens,
              ") must be a multiple of the codec's encoding granularity (", granularity, ")");
}
}  // namespace detail

}  // namespace kvq
