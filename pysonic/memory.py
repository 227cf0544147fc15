"""CPU memory: a cache for large tensor blocks during inference.

On Linux, glibc gives allocations of tens of MB fresh pages (and trims them off the heap again
when they are freed), and each first touch of a 4 KiB page is a page fault: a 10 s EnCodec
encode takes ~120 MB of fresh pages per call, ~25 ms of its ~190 ms on the development VM.
Inside :func:`block_cache`, CPU allocations of at least ``min_block_bytes`` come from blocks
that earlier tensors freed (after the scope too: a block freed later still returns to the
cache), the way PyTorch's CUDA caching allocator works. The cache keeps at most
``max_cached_bytes`` of free blocks between calls; :func:`release_block_cache` frees them.

The EnCodec and WaveGrad inference paths use it. Without the compiled extension it does
nothing (the warning at import says so).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from pysonic import _ext

MIN_BLOCK_BYTES = 1 << 20
MAX_CACHED_BYTES = 1 << 30


@contextlib.contextmanager
def block_cache(min_block_bytes: int = MIN_BLOCK_BYTES, max_cached_bytes: int = MAX_CACHED_BYTES) -> Iterator[None]:
    """Within this block, serve CPU allocations of at least ``min_block_bytes`` from the cache.

    The allocator is process-wide while any scope is open, so tensors that other threads
    allocate meanwhile use the cache too (it is thread-safe). Scopes nest; the innermost
    ``max_cached_bytes`` applies from its entry on.
    """
    if _ext._C is None:
        yield
        return
    if min_block_bytes < 0 or max_cached_bytes < 0:
        raise ValueError(f"block_cache: sizes must be non-negative, got min_block_bytes={min_block_bytes}, "
                         f"max_cached_bytes={max_cached_bytes}")
    _ext._C.block_cache_enter(int(min_block_bytes), int(max_cached_bytes))
    try:
        yield
    finally:
        _ext._C.block_cache_exit()


def release_block_cache() -> int:
    """Free the cached blocks (those still held by tensors return when freed); returns bytes freed."""
    return 0 if _ext._C is None else _ext._C.block_cache_release()


def block_cache_stats() -> dict:
    """``cached_bytes`` (free, kept for reuse), ``hits``/``misses`` (allocations served from the
    cache / from fresh memory, since import), ``depth`` (open scopes)."""
    if _ext._C is None:
        return {"cached_bytes": 0, "hits": 0, "misses": 0, "depth": 0}
    return _ext._C.block_cache_stats()
