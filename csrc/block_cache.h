// A scoped caching allocator for large CPU tensors (see block_cache.cpp).
#pragma once

#include <cstdint>

namespace pysonic::memory {

struct BlockCacheStats {
  int64_t cached_bytes;  // held in free blocks, ready for reuse
  int64_t hits;          // allocations served from a free block
  int64_t misses;        // allocations that took fresh memory
  int64_t depth;         // open scopes (0: torch's own allocator is installed)
};

// Open a scope: while at least one is open, CPU allocations of at least min_block_bytes come
// from the cache, which keeps at most max_cached_bytes of freed blocks. Nested scopes share one
// cache; the innermost settings apply.
void block_cache_enter(int64_t min_block_bytes, int64_t max_cached_bytes);
// Close a scope; the last one puts back the allocator that was installed before.
void block_cache_exit();
// Free every cached block (blocks still in use return to the cache when freed); returns bytes.
int64_t block_cache_release();
BlockCacheStats block_cache_stats();

}  // namespace pysonic::memory
