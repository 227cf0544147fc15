// A scoped caching allocator for large CPU tensors.
//
// Why: glibc serves allocations of tens of MB from fresh pages (mmap, or a heap top that it
// trims again on free), and on this VM every first touch of a 4 KiB page costs a fault of about
// 0.7 us. EnCodec's encoder takes ~120 MB of fresh pages per 10 s of audio (5 of its 39 ops
// wrote a 30 MB output at half their speed): ~25 ms of a 190 ms encode. Inside a scope, large
// blocks are kept when freed and handed out again, like the CUDA caching allocator.
//
// Only c10 headers here: this file stays cheap to compile.
#include "block_cache.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace pysonic::memory {
namespace {

constexpr size_t kRound = size_t(1) << 16;  // sizes round up to 64 KiB: repeated shapes reuse

class BlockCacheAllocator final : public c10::Allocator {
 public:
  // Every allocation is a plain c10::alloc_cpu block whose context is its own pointer, so that
  // raw_allocate / raw_deleter (oneDNN's scratch memory goes through them) work too; blocks of
  // at least min_block bytes are remembered in live_ and go to the free list when released.
  c10::DataPtr allocate(size_t n) override {
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (n >= min_block_ && depth_ > 0) {
        const size_t size = (n + kRound - 1) / kRound * kRound;
        ptr = take_locked(size);
        if (ptr == nullptr) {
          ptr = c10::alloc_cpu(size);  // throws on failure
        }
        live_.emplace(ptr, size);
      }
    }
    if (ptr == nullptr) ptr = c10::alloc_cpu(n);
    return {ptr, ptr, &BlockCacheAllocator::release_ptr, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &BlockCacheAllocator::release_ptr; }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void enter(int64_t min_block, int64_t max_cached) {
    std::lock_guard<std::mutex> lock(mu_);
    if (depth_ == 0) {
      previous_ = c10::GetCPUAllocator();
      c10::SetCPUAllocator(this, /*priority=*/0);
    }
    ++depth_;
    min_block_ = static_cast<size_t>(min_block);
    max_cached_ = static_cast<size_t>(max_cached);
    trim_locked();
  }

  void exit() {
    std::lock_guard<std::mutex> lock(mu_);
    TORCH_CHECK(depth_ > 0, "pysonic block cache: exit without a matching enter");
    if (--depth_ == 0) {
      // Put the previous allocator back unless someone replaced this one meanwhile.
      if (c10::GetCPUAllocator() == this) c10::SetCPUAllocator(previous_, /*priority=*/0);
      previous_ = nullptr;
    }
  }

  int64_t release() {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t freed = cached_;
    for (const Block& b : free_) c10::free_cpu(b.ptr);
    free_.clear();
    cached_ = 0;
    return static_cast<int64_t>(freed);
  }

  BlockCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(cached_), hits_, misses_, depth_};
  }

  // Never destroyed: tensors freed during interpreter shutdown still find it.
  static BlockCacheAllocator& instance() {
    static auto* a = new BlockCacheAllocator();
    return *a;
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };

  // The smallest free block that fits with at most 1/8 slack, or null (a miss).
  void* take_locked(size_t size) {
    size_t best = free_.size();
    for (size_t i = 0; i < free_.size(); ++i) {
      const size_t s = free_[i].size;
      if (s >= size && s <= size + size / 8 && (best == free_.size() || s < free_[best].size)) best = i;
    }
    if (best == free_.size()) {
      ++misses_;
      return nullptr;
    }
    ++hits_;
    const Block b = free_[best];
    free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
    cached_ -= b.size;
    return b.ptr;
  }

  static void release_ptr(void* ptr) {
    if (ptr == nullptr) return;
    BlockCacheAllocator& self = instance();
    {
      std::lock_guard<std::mutex> lock(self.mu_);
      auto it = self.live_.find(ptr);
      if (it != self.live_.end()) {
        self.free_.push_back({ptr, it->second});
        self.cached_ += it->second;
        self.live_.erase(it);
        self.trim_locked();
        return;
      }
    }
    c10::free_cpu(ptr);  // a small block
  }

  // Free the oldest free blocks until the cache is within its limit.
  void trim_locked() {
    size_t i = 0;
    while (cached_ > max_cached_ && i < free_.size()) {
      cached_ -= free_[i].size;
      c10::free_cpu(free_[i].ptr);
      ++i;
    }
    free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(i));
  }

  std::mutex mu_;
  std::vector<Block> free_;                   // oldest first
  std::unordered_map<void*, size_t> live_;    // large blocks in use
  size_t cached_ = 0;
  size_t min_block_ = size_t(1) << 20;
  size_t max_cached_ = size_t(1) << 30;
  c10::Allocator* previous_ = nullptr;
  int64_t depth_ = 0, hits_ = 0, misses_ = 0;
};

}  // namespace

void block_cache_enter(int64_t min_block_bytes, int64_t max_cached_bytes) {
  TORCH_CHECK(min_block_bytes >= 0 && max_cached_bytes >= 0,
              "pysonic block cache: sizes must be non-negative, got min_block_bytes=", min_block_bytes,
              ", max_cached_bytes=", max_cached_bytes);
  BlockCacheAllocator::instance().enter(min_block_bytes, max_cached_bytes);
}

void block_cache_exit() { BlockCacheAllocator::instance().exit(); }

int64_t block_cache_release() { return BlockCacheAllocator::instance().release(); }

BlockCacheStats block_cache_stats() { return BlockCacheAllocator::instance().stats(); }

}  // namespace pysonic::memory
