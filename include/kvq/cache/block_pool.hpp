#pragma once
// A pool of fixed-size encoded blocks, addressed by 32-bit block ids, as paged-attention engines
// do: many sequences (KvCache objects) can share one pool, and freeing a sequence returns its
// blocks. Storage comes in chunks of blocks so that a block's address never changes while the
// pool grows (ids stay valid, pointers too).
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/quant/codec.hpp"

namespace kvq {

class BlockPool {
public:
    // max_blocks = 0: grow without limit. Blocks are zero-filled when handed out.
    explicit BlockPool(const BlockLayout& layout, std::uint32_t max_blocks = 0, std::uint32_t chunk_blocks = 64)
        : layout_(layout), block_bytes_(layout.bytes()), max_blocks_(max_blocks), chunk_blocks_(chunk_blocks) {
        KVQ_CHECK(block_bytes_ > 0, "block layout has zero size");
        KVQ_CHECK(chunk_blocks_ > 0, "chunk_blocks must be positive");
    }

    const BlockLayout& layout() const { return layout_; }
    std::size_t block_bytes() const { return block_bytes_; }
    std::uint32_t blocks_in_use() const { return static_cast<std::uint32_t>(total_ - free_.size()); }
    std::size_t bytes_in_use() const { return std::size_t(blocks_in_use()) * block_bytes_; }
    // Bytes the pool holds from the system (in use or free).
    std::size_t bytes_reserved() const { return std::size_t(total_) * block_bytes_; }
    // How many more blocks allocate() can return before failing.
    std::uint64_t available() const {
        if (max_blocks_ == 0) return UINT64_MAX;
        return std::uint64_t(max_blocks_) - total_ + free_.size();
    }

    std::uint32_t allocate() {
        if (free_.empty()) {
            KVQ_CHECK(max_blocks_ == 0 || total_ < max_blocks_, "block pool exhausted (", max_blocks_, " blocks)");
            const std::uint32_t n = max_blocks_ ? std::min(chunk_blocks_, max_blocks_ - total_) : chunk_blocks_;
            chunks_.push_back(std::make_unique<std::uint8_t[]>(std::size_t(n) * block_bytes_ + 64));
            chunk_first_.push_back(total_);
            for (std::uint32_t i = n; i > 0; --i) free_.push_back(total_ + i - 1);
            total_ += n;
        }
        const std::uint32_t id = free_.back();
        free_.pop_back();
        std::memset(data(id), 0, block_bytes_);
        return id;
    }

    void release(std::uint32_t id) {
        check_id(id);
        free_.push_back(id);
    }

    std::uint8_t* data(std::uint32_t id) { return const_cast<std::uint8_t*>(std::as_const(*this).data(id)); }
    const std::uint8_t* data(std::uint32_t id) const {
        check_id(id);
        std::size_t c = chunk_of(id);
        std::uint8_t* base = chunks_[c].get();
        base += (64 - reinterpret_cast<std::uintptr_t>(base) % 64) % 64;  // 64-byte aligned blocks
        return base + std::size_t(id - chunk_first_[c]) * block_bytes_;
    }

    void check_id(std::uint32_t id) const {
        KVQ_CHECK(id < total_, "block id ", id, " out of range (pool has ", total_, " blocks)");
    }

private:
    std::size_t chunk_of(std::uint32_t id) const {
        std::size_t lo = 0, hi = chunk_first_.size();
        while (hi - lo > 1) {
            const std::size_t mid = (lo + hi) / 2;
            (chunk_first_[mid] <= id ? lo : hi) = mid;
        }
        return lo;
    }

    BlockLayout layout_;
    std::size_t block_bytes_;
    std::uint32_t max_blocks_, chunk_blocks_;
    std::uint32_t total_ = 0;
    std::vector<std::unique_ptr<std::uint8_t[]>> chunks_;
    std::vector<std::uint32_t> chunk_first_;
    std::vector<std::uint32_t> free_;
};

}  // namespace kvq
