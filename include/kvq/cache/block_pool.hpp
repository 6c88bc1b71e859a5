#pragma once
// A pool of fixed-size encoded blocks, addressed by 32-bit block ids, as paged-attention engines
// do: many sequences (KvCache objects) can share one pool, and freeing a sequence returns its
// blocks. Storage comes in chunks of blocks so that a block's address never changes while the
// pool grows (ids stay valid, pointers too).
//
// Thread safety (docs/CONCURRENCY.md): every member function may be called concurrently from any
// number of threads. allocate/release/reserve and the counters take an internal mutex; data(id)
// takes a shared lock (the chunk directory may grow while another thread allocates). The bytes
// of a block are not protected: a block belongs to one sequence, and writing it while another
// thread reads it is the caller's data race.
//
// Reservations make "check that enough blocks are free, then allocate them" atomic across
// threads: a KvCache append reserves every block it will need before it changes anything, so two
// sequences appending concurrently to a bounded pool cannot both pass the check and then run out.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <shared_mutex>
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
    BlockPool(const BlockPool&) = delete;
    BlockPool& operator=(const BlockPool&) = delete;

    // Blocks set aside by reserve(); allocate() through it never fails. Unused blocks go back to
    // the pool when the reservation is destroyed. Movable, not copyable.
    class Reservation {
    public:
        Reservation() = default;
        Reservation(Reservation&& o) noexcept
            : pool_(std::exchange(o.pool_, nullptr)), left_(std::exchange(o.left_, 0)) {}
        Reservation& operator=(Reservation&& o) noexcept {
            if (this != &o) {
                cancel();
                pool_ = std::exchange(o.pool_, nullptr);
                left_ = std::exchange(o.left_, 0);
            }
            return *this;
        }
        ~Reservation() { cancel(); }
        std::uint64_t remaining() const { return left_; }
        // One of the reserved blocks (zero-filled). Asserts that one is left.
        std::uint32_t allocate() {
            KVQ_ASSERT(pool_ != nullptr && left_ > 0);
            --left_;
            return pool_->allocate_impl(true);
        }

    private:
        friend class BlockPool;
        Reservation(BlockPool* p, std::uint64_t n) : pool_(p), left_(n) {}
        void cancel() {
            if (pool_ && left_ > 0 && pool_->max_blocks_ != 0) {
                std::lock_guard<std::shared_mutex> lk(pool_->mu_);
                pool_->reserved_ -= left_;
            }
            pool_ = nullptr;
            left_ = 0;
        }
        BlockPool* pool_ = nullptr;
        std::uint64_t left_ = 0;
    };

    const BlockLayout& layout() const { return layout_; }
    std::size_t block_bytes() const { return block_bytes_; }
    std::uint32_t blocks_in_use() const {
        std::shared_lock<std::shared_mutex> lk(mu_);
        return static_cast<std::uint32_t>(total_ - free_.size());
    }
    std::size_t bytes_in_use() const { return std::size_t(blocks_in_use()) * block_bytes_; }
    // Bytes the pool holds from the system (in use or free).
    std::size_t bytes_reserved() const {
        std::shared_lock<std::shared_mutex> lk(mu_);
        return std::size_t(total_) * block_bytes_;
    }
    // How many more blocks allocate() can return before failing (blocks held by outstanding
    // reservations are not available). A snapshot: another thread may take blocks right after.
    std::uint64_t available() const {
        std::shared_lock<std::shared_mutex> lk(mu_);
        return available_locked();
    }

    // Atomically sets aside n blocks; throws kvq::Error (and reserves nothing) if fewer are available.
    Reservation reserve(std::uint64_t n) {
        std::lock_guard<std::shared_mutex> lk(mu_);
        const std::uint64_t a = available_locked();
        KVQ_CHECK(a >= n, "block pool too small: needs ", n, " blocks, ", a, " available");
        if (max_blocks_ != 0) reserved_ += n;
        return Reservation(this, n);
    }
    // Like reserve, but returns false (reserving nothing) instead of throwing.
    bool try_reserve(std::uint64_t n, Reservation& out) {
        std::lock_guard<std::shared_mutex> lk(mu_);
        if (available_locked() < n) return false;
        if (max_blocks_ != 0) reserved_ += n;
        out = Reservation(this, n);
        return true;
    }

    std::uint32_t allocate() { return allocate_impl(false); }

    void release(std::uint32_t id) {
        std::lock_guard<std::shared_mutex> lk(mu_);
        KVQ_CHECK(id < total_, "block id ", id, " out of range (pool has ", total_, " blocks)");
        free_.push_back(id);
    }

    std::uint8_t* data(std::uint32_t id) { return const_cast<std::uint8_t*>(std::as_const(*this).data(id)); }
    const std::uint8_t* data(std::uint32_t id) const {
        std::shared_lock<std::shared_mutex> lk(mu_);
        KVQ_CHECK(id < total_, "block id ", id, " out of range (pool has ", total_, " blocks)");
        return block_ptr(id);
    }

    void check_id(std::uint32_t id) const {
        std::shared_lock<std::shared_mutex> lk(mu_);
        KVQ_CHECK(id < total_, "block id ", id, " out of range (pool has ", total_, " blocks)");
    }

private:
    std::uint64_t available_locked() const {
        if (max_blocks_ == 0) return UINT64_MAX;
        return std::uint64_t(max_blocks_) - total_ + free_.size() - reserved_;
    }

    // Every chunk but the last of a bounded pool holds chunk_blocks_ blocks, so id / chunk_blocks_
    // is the chunk.
    const std::uint8_t* block_ptr(std::uint32_t id) const {
        const std::size_t c = id / chunk_blocks_;
        std::uint8_t* base = chunks_[c].get();
        base += (64 - reinterpret_cast<std::uintptr_t>(base) % 64) % 64;  // 64-byte aligned blocks
        return base + std::size_t(id - c * std::size_t(chunk_blocks_)) * block_bytes_;
    }

    std::uint32_t allocate_impl(bool reserved) {
        std::uint32_t id;
        {
            std::lock_guard<std::shared_mutex> lk(mu_);
            if (reserved && max_blocks_ != 0) {
                KVQ_ASSERT(reserved_ > 0);
                --reserved_;
            } else {
                KVQ_CHECK(available_locked() > 0, "block pool exhausted (", max_blocks_, " blocks)");
            }
            if (free_.empty()) {
                KVQ_ASSERT(max_blocks_ == 0 || total_ < max_blocks_);
                const std::uint32_t n = max_blocks_ ? std::min(chunk_blocks_, max_blocks_ - total_) : chunk_blocks_;
                chunks_.push_back(std::make_unique<std::uint8_t[]>(std::size_t(n) * block_bytes_ + 64));
                for (std::uint32_t i = n; i > 0; --i) free_.push_back(total_ + i - 1);
                total_ += n;
            }
            id = free_.back();
            free_.pop_back();
            // Zeroed under the lock: the chunk directory may move once the lock is dropped
            // (the block's own address never does); cheap next to encoding a block.
            std::memset(const_cast<std::uint8_t*>(block_ptr(id)), 0, block_bytes_);
        }
        return id;
    }

    BlockLayout layout_;
    std::size_t block_bytes_;
    std::uint32_t max_blocks_, chunk_blocks_;
    mutable std::shared_mutex mu_;  // guards everything below (not the block bytes)
    std::uint32_t total_ = 0;
    std::uint64_t reserved_ = 0;
    std::vector<std::unique_ptr<std::uint8_t[]>> chunks_;
    std::vector<std::uint32_t> free_;
};

}  // namespace kvq
