"""pysonic.memory.block_cache: the large-block CPU allocator cache used by SEANet inference."""
import threading

import pytest
import torch

from pysonic import _ext
from pysonic.memory import block_cache, block_cache_stats, release_block_cache

pytestmark = pytest.mark.skipif(_ext._C is None, reason="the block cache lives in the compiled extension pysonic._C")

MB = 1 << 20


def test_freed_block_is_reused_inside_and_after_the_scope():
    release_block_cache()
    with block_cache():
        assert block_cache_stats()["depth"] == 1
        a = torch.empty(8 * MB, dtype=torch.uint8)
        ptr = a.data_ptr()
        del a
        assert block_cache_stats()["cached_bytes"] == 8 * MB
        hits = block_cache_stats()["hits"]
        b = torch.empty(8 * MB - 100, dtype=torch.uint8)  # rounds up to the same block
        assert b.data_ptr() == ptr and block_cache_stats()["hits"] == hits + 1
        small = torch.ones(16)
    assert block_cache_stats()["depth"] == 0
    b.fill_(7)  # still valid after the scope
    assert int(b[-1]) == 7 and float(small.sum()) == 16
    del b  # returns to the cache although the scope is closed
    assert block_cache_stats()["cached_bytes"] == 8 * MB
    # outside a scope, torch's own allocator serves (the cached block is not handed out)
    c = torch.empty(8 * MB, dtype=torch.uint8)
    assert c.data_ptr() != ptr
    assert release_block_cache() == 8 * MB and block_cache_stats()["cached_bytes"] == 0


def test_limit_small_blocks_and_slack():
    release_block_cache()
    with block_cache(min_block_bytes=2 * MB, max_cached_bytes=5 * MB):
        misses = block_cache_stats()["misses"]
        a = torch.empty(MB, dtype=torch.uint8)  # below min_block_bytes: not counted, not cached
        assert block_cache_stats()["misses"] == misses
        del a
        assert block_cache_stats()["cached_bytes"] == 0
        x, y = torch.empty(3 * MB, dtype=torch.uint8), torch.empty(3 * MB, dtype=torch.uint8)
        del x, y  # 6 MB freed, limit 5 MB: the older block is dropped
        assert block_cache_stats()["cached_bytes"] == 3 * MB
        hits = block_cache_stats()["hits"]
        z = torch.empty(2 * MB, dtype=torch.uint8)  # 3 MB is more than 1/8 over: a fresh block
        assert block_cache_stats()["hits"] == hits
        del z
    release_block_cache()


def test_nesting_threads_and_errors():
    release_block_cache()
    with block_cache():
        with block_cache():
            assert block_cache_stats()["depth"] == 2
        assert block_cache_stats()["depth"] == 1

        def work(seed):
            g = torch.Generator().manual_seed(seed)
            for _ in range(20):
                t = torch.rand(MB // 2, generator=g)  # 2 MB blocks, allocated and freed
                assert 0.0 <= float(t.min()) and float(t.max()) < 1.0

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert block_cache_stats()["depth"] == 0
    with pytest.raises(ValueError, match="non-negative"):
        with block_cache(max_cached_bytes=-1):
            pass
    assert block_cache_stats()["depth"] == 0
    release_block_cache()


def test_onednn_convolution_inside_the_scope_matches():
    """oneDNN takes its scratch memory through raw_allocate / raw_deleter: both must work."""
    torch.manual_seed(0)
    x = torch.randn(1, 32, 1, 50_000).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 32, 1, 4).contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.conv2d(x, w, stride=(1, 2))
    with block_cache():
        for _ in range(2):
            out = torch.nn.functional.conv2d(x, w, stride=(1, 2))
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
    release_block_cache()
