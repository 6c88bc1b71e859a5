#pragma once
// Bit packing shared by every codec and by the CUDA kernels.
//  - Sign bits: LSB-first, byte i holds bits 8i..8i+7 (bit j of the sketch is (byte[j/8] >> (j%8)) & 1).
//  - b-bit codes: one little-endian bit stream, code i occupies bits [i*b, (i+1)*b). For b in
//    {1,2,4,8} a code never straddles a byte; for b = 3 it may.
#include <cstddef>
#include <cstdint>

#include "kvq/core/host_device.hpp"

namespace kvq {

KVQ_HD constexpr std::size_t packed_bytes(std::size_t count, int bits) {
    return (count * static_cast<std::size_t>(bits) + 7) / 8;
}

KVQ_HD int get_sign_bit(const std::uint8_t* bytes, int j) { return (bytes[j >> 3] >> (j & 7)) & 1; }

// Packs values[0..n) as sign bits (1 iff value > 0; exactly 0 and -0 map to 0). n % 8 == 0.
KVQ_HD void pack_signs(const float* values, int n, std::uint8_t* out) {
    for (int byte = 0; byte < n / 8; ++byte) {
        unsigned acc = 0;
        for (int b = 0; b < 8; ++b) acc |= (values[8 * byte + b] > 0.0f ? 1u : 0u) << b;
        out[byte] = static_cast<std::uint8_t>(acc);
    }
}

// Writes n codes (each < 2^bits) into a zero-initialised or overwritten stream of packed_bytes(n, bits).
KVQ_HD void pack_codes(const std::uint8_t* codes, int n, int bits, std::uint8_t* out) {
    const std::size_t nbytes = packed_bytes(static_cast<std::size_t>(n), bits);
    for (std::size_t i = 0; i < nbytes; ++i) out[i] = 0;
    for (int i = 0; i < n; ++i) {
        const std::size_t bit = static_cast<std::size_t>(i) * bits;
        const unsigned v = codes[i];
        out[bit >> 3] = static_cast<std::uint8_t>(out[bit >> 3] | (v << (bit & 7)));
        if ((bit & 7) + bits > 8)
            out[(bit >> 3) + 1] = static_cast<std::uint8_t>(out[(bit >> 3) + 1] | (v >> (8 - (bit & 7))));
    }
}

KVQ_HD unsigned get_code(const std::uint8_t* packed, int i, int bits) {
    const std::size_t bit = static_cast<std::size_t>(i) * bits;
    unsigned v = packed[bit >> 3] >> (bit & 7);
    if ((bit & 7) + bits > 8) v |= static_cast<unsigned>(packed[(bit >> 3) + 1]) << (8 - (bit & 7));
    return v & ((1u << bits) - 1u);
}

}  // namespace kvq
