"""kvstream.compat.vineyard: the seed document's two examples, verbatim, and the API around them."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest

from kvstream.compat.vineyard import FileCacheConfig, KVCache, KVTensor, VineyardCacheConfig
from kvstream.errors import ConfigError, LayoutError
from kvstream.stores import RadixStore

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(HERE, script)], capture_output=True, text=True, timeout=300)


def test_seed_radix_example_runs_unchanged():
    out = _run("seed_radix_example.py")
    assert out.returncode == 0, out.stderr


def test_seed_file_example_runs_unchanged():
    shutil.rmtree("/tmp/vineyard/llm_cache", ignore_errors=True)  # the seed's own path; start clean
    out = _run("seed_file_example.py")
    assert out.returncode == 0, out.stderr
    files = [f for _, _, fs in os.walk("/tmp/vineyard/llm_cache") for f in fs if f.endswith(".kvc")]
    assert len(files) == 2  # two chunks of 2 tokens, each under two levels of directories


def test_kvtensor_buffer_protocol():
    a = np.arange(6, dtype=np.float32)
    t = KVTensor(a.ctypes.data, a.nbytes)
    assert t.ptr == a.ctypes.data and t.nbytes == 24
    assert np.array_equal(np.frombuffer(t, dtype=np.float32), a)
    np.frombuffer(t, dtype=np.float32)[1] = 42  # a view of the caller's memory
    assert a[1] == 42
    empty = KVTensor(0, 0)
    assert empty.ptr == 0 and empty.nbytes == 0 and memoryview(empty).nbytes == 0
    assert isinstance(t, KVTensor) and isinstance(empty, KVTensor) and isinstance(t, ctypes.Array)
    assert "nbytes=24" in repr(t)
    with pytest.raises(ConfigError):
        KVTensor(-1, 4)


def _kv_list(tokens, layers, nbytes, rng, fill=True):
    arrays, lst = [], []
    for _ in tokens:
        row_a, row = [], []
        for _ in range(layers):
            k = rng.random(nbytes // 4).astype(np.float32) if fill else np.full(nbytes // 4, np.nan, np.float32)
            v = rng.random(nbytes // 4).astype(np.float32) if fill else np.full(nbytes // 4, np.nan, np.float32)
            row_a.append((k, v))
            row.append((KVTensor(k.ctypes.data, k.nbytes), KVTensor(v.ctypes.data, v.nbytes)))
        arrays.append(row_a)
        lst.append(row)
    return arrays, lst


@pytest.mark.parametrize("kind", ["radix", "file"])
def test_update_and_query_with_prefixes(kind, tmp_path):
    rng = np.random.default_rng(0)
    config = (VineyardCacheConfig("/nonexistent.sock") if kind == "radix"
              else FileCacheConfig(chunk_size=2, hash_chunk_size=2, root=str(tmp_path / "kv")))
    cache = KVCache(config, tensor_nbytes=16, cache_capacity=64, layer=3)
    tokens = [5, 6, 7, 8, 9, 10]
    arrays, lst = _kv_list(tokens, 3, 16, rng)
    assert cache.update(None, tokens[:4], lst[:4]) == 4
    assert cache.update(tokens[:4], tokens[4:], lst[4:]) == 2
    # query with a prefix: fills the entries of `tokens` only, into the caller's buffers
    got_arrays, got = _kv_list(tokens[2:], 3, 16, rng, fill=False)
    assert cache.query(tokens[:2], tokens[2:] + [11], got + [got[0]]) == 4
    for i in range(4):
        for j in range(3):
            assert np.array_equal(got_arrays[i][j][0], arrays[2 + i][j][0])
            assert np.array_equal(got_arrays[i][j][1], arrays[2 + i][j][1])
    # empty slots receive memory they own
    slots = [[(KVTensor(0, 0), KVTensor(0, 0)) for _ in range(3)] for _ in tokens]
    assert cache.query(tokens, slots) == 6
    for i in range(6):
        for j in range(3):
            assert slots[i][j][0].ptr != 0 and slots[i][j][0].nbytes == 16
            assert np.array_equal(np.frombuffer(slots[i][j][1], dtype=np.float32), arrays[i][j][1])
    # a miss leaves the list untouched
    untouched = [[(KVTensor(0, 0), KVTensor(0, 0)) for _ in range(3)]]
    assert cache.query([99], untouched) == 0 and untouched[0][0][0].ptr == 0
    assert cache.batched_query([None, None], [tokens[:2], [99]], [slots[:2], untouched]) == [2, 0]
    cache.close()


def test_memory_cache_capacity_is_in_tokens():
    rng = np.random.default_rng(1)
    cache = KVCache(VineyardCacheConfig("/x.sock"), tensor_nbytes=8, cache_capacity=6, layer=1)
    _, a = _kv_list([1] * 4, 1, 8, rng)
    _, b = _kv_list([2] * 4, 1, 8, rng)
    assert cache.update(None, [1, 1, 1, 1], a) == 4
    assert cache.update(None, [2, 2, 2, 2], b) == 4  # evicts the first sequence (least recently used)
    slots = [[(KVTensor(0, 0), KVTensor(0, 0))] for _ in range(4)]
    assert cache.query([1, 1, 1, 1], slots) == 0
    assert cache.query([2, 2, 2, 2], slots) == 4


def test_shared_memory_config_shares_between_caches():
    rng = np.random.default_rng(2)
    name = f"vineyard-{uuid.uuid4().hex[:8]}"
    try:
        config = VineyardCacheConfig("/x.sock", llm_cache_object_name=name, shared=True)
        writer = KVCache(config, tensor_nbytes=8, cache_capacity=16, layer=2)
        reader = KVCache(config, tensor_nbytes=8, cache_capacity=16, layer=2)
        arrays, lst = _kv_list([1, 2, 3], 2, 8, rng)
        assert writer.update(None, [1, 2, 3], lst) == 3
        slots = [[(KVTensor(0, 0), KVTensor(0, 0)) for _ in range(2)] for _ in range(3)]
        assert reader.query([1, 2, 3], slots) == 3
        assert np.array_equal(np.frombuffer(slots[2][1][0], dtype=np.float32), arrays[2][1][0])
        writer.close(), reader.close()
    finally:
        RadixStore.remove_shared(name)


def test_errors(tmp_path):
    rng = np.random.default_rng(3)
    with pytest.raises(ConfigError):
        KVCache(None)
    with pytest.raises(ConfigError, match="differ"):
        KVCache(VineyardCacheConfig("/x"), tensor_nbytes=8, tensor_bytes=16)
    with pytest.raises(ConfigError):
        FileCacheConfig(hash_chunk_size=2, split_number=3)
    cache = KVCache(VineyardCacheConfig("/x"), tensor_nbytes=16, layer=2)
    _, lst = _kv_list([1, 2], 2, 8, rng)  # 8-byte tensors for a 16-byte cache
    with pytest.raises(LayoutError, match="tensor_nbytes=16"):
        cache.update(None, [1, 2], lst)
    _, lst = _kv_list([1, 2], 1, 16, rng)
    with pytest.raises(ConfigError, match="layers"):
        cache.update(None, [1, 2], lst)
    with pytest.raises(ConfigError, match="entries"):
        cache.query([1, 2, 3], [])
    with pytest.raises(ConfigError, match="arguments"):
        cache.query([1])
    file_cache = KVCache(FileCacheConfig(chunk_size=4, root=str(tmp_path)), tensor_nbytes=16, layer=2, rank=1,
                         world_size=4)
    assert str(file_cache.store.root) == os.path.join(str(tmp_path), "4-1")
    _, lst = _kv_list([1, 2], 2, 16, rng)
    with pytest.raises(ConfigError, match="multiple"):
        file_cache.update([1, 2], [3, 4], lst)  # a file cache's prefix is whole chunks


_NULL_PAGE = r"""
import numpy as np
from kvstream.compat.vineyard import KVCache, KVTensor, VineyardCacheConfig
from kvstream.errors import ConfigError
cache = KVCache(VineyardCacheConfig("/x"), tensor_nbytes=16, layer=1)
v = np.zeros(4, np.float32)
try:
    k = KVTensor(8, 16)                      # a length passed as the pointer
    cache.update(None, [1], [[(k, KVTensor(v.ctypes.data, 16))]])
except ConfigError as e:
    print("ConfigError", e)
"""


def test_null_page_pointer_is_a_config_error_not_a_segfault():
    out = subprocess.run([sys.executable, "-c", _NULL_PAGE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])  # -11 (SIGSEGV) before the check
    assert out.stdout.startswith("ConfigError") and "null page" in out.stdout


@pytest.mark.parametrize("ptr,nbytes", [(1, 4), (65535, 4), (2 ** 64, 4), (2 ** 70, 1), (1 << 20, 2 ** 63),
                                        (0, 2 ** 63), (2 ** 64 - 8, 16), ("x", 4), (None, 4)])
def test_unusable_pointers_and_sizes_are_config_errors(ptr, nbytes):
    with pytest.raises(ConfigError):
        KVTensor(ptr, nbytes)


def test_sizes_are_checked_before_any_byte_moves():
    rng = np.random.default_rng(4)
    cache = KVCache(VineyardCacheConfig("/x"), tensor_nbytes=16, layer=1)
    arrays, lst = _kv_list([1, 2], 1, 16, rng)
    assert cache.update(None, [1, 2], lst) == 2
    big = np.zeros(8, np.float32)  # 32 bytes declared: would copy 16 bytes past a 16-byte buffer
    got_arrays, got = _kv_list([1, 2], 1, 16, rng, fill=False)
    got[1] = [(KVTensor(big.ctypes.data, 32), KVTensor(big.ctypes.data, 32))]
    with pytest.raises(LayoutError, match="tensor_nbytes=16"):
        cache.query([1, 2], got)
    assert np.isnan(got_arrays[0][0][0]).all()  # the first entry was not filled either
    with pytest.raises(LayoutError, match="tensor_nbytes=16"):
        cache.update(None, [3, 4], [lst[0], [(KVTensor(big.ctypes.data, 32), KVTensor(big.ctypes.data, 32))]])
    assert cache.query([3], [[(KVTensor(0, 0), KVTensor(0, 0))]]) == 0  # nothing of the refused update was stored


@pytest.mark.parametrize("write", ["through", "back"])
def test_a_list_of_configs_makes_tiers(write, tmp_path):
    from kvstream.stores import ChunkFileStore, TieredStore

    rng = np.random.default_rng(3)
    cache = KVCache([VineyardCacheConfig("/x.sock"), FileCacheConfig(chunk_size=2, root=str(tmp_path / "kv"))],
                    tensor_nbytes=8, cache_capacity=6, layer=2, tier_write=write)
    assert isinstance(cache.store, TieredStore) and cache.chunk_size == 2
    upper, lower = cache.store.tiers
    assert isinstance(upper, RadixStore) and isinstance(lower, ChunkFileStore)
    arrays, lst = _kv_list([1, 2, 3, 4], 2, 8, rng)
    assert cache.update(None, [1, 2, 3, 4], lst) == 4
    assert lower.query([1, 2, 3, 4]) == (4 if write == "through" else 0)
    _, other = _kv_list([7, 8, 9, 10], 2, 8, rng)
    cache.update(None, [7, 8, 9, 10], other)  # past the memory tier's 6 tokens: [1, 2, 3, 4] is evicted
    assert upper.query([1, 2, 3, 4]) < 4 and lower.query([1, 2, 3, 4]) == 4  # ...but kept below
    slots = [[(KVTensor(0, 0), KVTensor(0, 0)) for _ in range(2)] for _ in range(4)]
    assert cache.query([1, 2, 3, 4], slots) == 4
    for i in range(4):
        for j in range(2):
            assert np.array_equal(np.frombuffer(slots[i][j][0], dtype=np.float32), arrays[i][j][0])
    cache.close()
    assert upper.closed and lower.closed
