"""ChunkFileStore layer by layer: per-layer checksums, parallel verified reads, loads from a start token, and a
corrupt layer slice that shortens the match before anything is served."""

from __future__ import annotations

import gc
import os
import time
import weakref

import pytest
import torch

from kvstream.chunk import HEADER_BYTES, SLICE_CHECKSUMS, ChunkHeader
from kvstream.stores import ChunkFileStore, chunk_read
from kvstream.stores.cost import TierCost
from store_helpers import HEADS, HEAD_DIM, LAYERS, prefix_kv

C = 4
IDS = list(range(200, 222))  # 22 tokens: 5 full chunks
LAYER_BYTES = 2 * HEADS * C * HEAD_DIM * 4  # one layer of one chunk, float32


@pytest.fixture
def store(tmp_path):
    s = ChunkFileStore(tmp_path / "kv", chunk_tokens=C, queue_depth=3)
    keys, values = prefix_kv(IDS)
    assert s.update_kv(IDS, keys, values) == 20
    yield s
    s.close()


def _expect(lo: int, hi: int):
    keys, values = prefix_kv(IDS[:hi])
    return [k[:, :, lo:hi] for k in keys], [v[:, :, lo:hi] for v in values]


def _corrupt(store, chunk: int, layer: int) -> None:
    path = store.path(store.keys_for(IDS)[chunk])
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + layer * LAYER_BYTES + 5)
        b = f.read(1)
        f.seek(HEADER_BYTES + layer * LAYER_BYTES + 5)
        f.write(bytes([b[0] ^ 0x40]))


def test_chunks_carry_a_checksum_per_layer(store):
    with open(store.path(store.keys_for(IDS)[0]), "rb") as f:
        header = ChunkHeader.from_bytes(f.read(HEADER_BYTES))
    assert len(header.meta[SLICE_CHECKSUMS]) == 16 * LAYERS


@pytest.mark.parametrize("cap, n", [(None, 20), (13, 13), (21, 20)])
def test_layerwise_load_is_bit_exact_with_one_event_per_layer(store, cap, n):
    with store.lookup(IDS, max_tokens=cap) as m:
        assert m.granularity == C and m.bytes_per_token == LAYERS * 2 * HEADS * HEAD_DIM * 4 and m.store is store
        load = m.load_layers()
        assert load.matched_tokens == n and load.start == 0 and m.matched_tokens == n
        assert len(load) == LAYERS and len({id(e) for e in load.events}) == LAYERS
        keys, values = _expect(0, n)
        for l in range(LAYERS):
            k, v = load.take(l)
            assert torch.equal(k, keys[l]) and torch.equal(v, values[l])
    assert store.pinned() == 0 and store.pin_counts() == {}


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("start", [0, 4, 8, 16, 20])
def test_load_from_a_start_token(store, layerwise, start):
    with store.lookup(IDS, max_tokens=21) as m:
        m.prefetch(start=start)
        if layerwise:
            load = m.load_layers(start=start)
            got_k, got_v = load.keys, load.values
            assert load.start == start
        else:
            got_k, got_v = m.load(start=start)
        assert m.matched_tokens == 20 and m.start == start
        keys, values = _expect(start, 20)
        if start == 20:
            assert got_k == [] or all(k.shape[2] == 0 for k in got_k)
            return
        for l in range(LAYERS):
            assert torch.equal(got_k[l], keys[l]) and torch.equal(got_v[l], values[l])


def test_start_must_be_on_a_chunk_boundary(store):
    from kvstream.errors import ConfigError

    with store.lookup(IDS) as m:
        with pytest.raises(ConfigError, match="multiple of 4"):
            m.prefetch(start=3)
        m.prefetch(start=8)
        with pytest.raises(ConfigError, match="prefetched from token 8"):
            m.load(start=4)


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("layer", [0, LAYERS - 1])
def test_a_corrupt_layer_slice_shortens_the_match_and_drops_the_file(store, layerwise, layer):
    _corrupt(store, chunk=2, layer=layer)
    bad = store.path(store.keys_for(IDS)[2])
    with store.lookup(IDS) as m:
        assert m.matched_tokens == 20  # the files exist; the reads find the damage
        if layerwise:
            load = m.load_layers()
            got_k, got_v = [load.keys[l] for l in range(LAYERS)], [load.values[l] for l in range(LAYERS)]
        else:
            got_k, got_v = m.load()
        assert m.matched_tokens == 8  # the two chunks before the bad one, in every layer
        keys, values = _expect(0, 8)
        for l in range(LAYERS):
            assert torch.equal(got_k[l], keys[l]) and torch.equal(got_v[l], values[l])
    assert not bad.exists()  # dropped, so the next update rewrites it
    assert store.query(IDS) == 8
    keys, values = prefix_kv(IDS)
    store.update_kv(IDS, keys, values)
    with store.fetch_prefix(IDS) as m:
        assert m.matched_tokens == 20


def test_a_corrupt_slice_after_the_start_only_shortens_what_is_loaded(store):
    _corrupt(store, chunk=3, layer=1)
    with store.lookup(IDS) as m:
        load = m.load_layers(start=8)
        assert load.start == 8 and load.matched_tokens == 12 == m.matched_tokens
        keys, _ = _expect(8, 12)
        assert torch.equal(load.keys[1], keys[1])


def test_a_prefetch_released_unloaded_leaves_nothing_behind(store):
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with store.lookup(IDS) as m:
            m.prefetch(start=4)
    assert store.pinned() == 0 and len(os.listdir("/proc/self/fd")) == fds


def test_old_and_new_files_mix(tmp_path):
    s = ChunkFileStore(tmp_path / "kv", chunk_tokens=C, slice_checksums=False)
    keys, values = prefix_kv(IDS)
    s.update_kv(IDS[:8], [k[:, :, :8] for k in keys], [v[:, :, :8] for v in values])
    s.close()
    s = ChunkFileStore(tmp_path / "kv", chunk_tokens=C)
    s.update_kv(IDS, keys, values)  # the first two chunks stay as they were written
    with s.lookup(IDS) as m:
        assert m._layer_loader is None  # the first file has no per-layer checksums: loaded whole
        got_k, _ = m.load()
        assert torch.equal(got_k[1], _expect(0, 20)[0][1])
    s.close()


def test_read_cost_is_probed_once_and_cached_beside_the_store(tmp_path):
    s = ChunkFileStore(tmp_path / "kv", chunk_tokens=C)
    cost = s.read_cost("cpu")
    assert cost.fetch_Bps > 0 and cost.copy_Bps > 0 and cost.latency_s >= 0
    assert (tmp_path / "kv" / ".kvstream-cost.json").exists()
    assert not list((tmp_path / "kv").rglob("*probe*"))  # the probe files are gone
    s.close()
    again = ChunkFileStore(tmp_path / "kv", chunk_tokens=C)
    assert again.read_cost("cpu").fetch_Bps == cost.fetch_Bps  # read from the file, not measured again
    again.tier_cost = TierCost(fetch_Bps=1.0, copy_Bps=2.0)
    assert again.read_cost("cpu").fetch_Bps == 1.0
    again.close()


@pytest.mark.gpu
@pytest.mark.parametrize("start", [0, 8])
def test_gpu_layerwise_file_load_is_bit_exact(tmp_path, cuda_device, start):
    s = ChunkFileStore(tmp_path / "kv", chunk_tokens=C)
    keys, values = prefix_kv(IDS)
    s.update_kv(IDS, [k.to(cuda_device) for k in keys], [v.to(cuda_device) for v in values])  # written from the GPU
    _corrupt(s, chunk=4, layer=1)
    with s.lookup(IDS) as m:
        m.prefetch(start=start)
        load = m.load_layers(cuda_device, start=start)
        assert load.matched_tokens == 16 and load.start == start and load.stream is not None
        want_k, want_v = _expect(start, 16)
        for l in range(LAYERS):
            k, v = load.take(l)
            assert k.is_cuda and torch.equal(k.cpu(), want_k[l]) and torch.equal(v.cpu(), want_v[l])
    with s.fetch_prefix(IDS, device=cuda_device) as m:
        assert m.matched_tokens == 16 and torch.equal(m.keys[1].cpu(), _expect(0, 16)[0][1])
    s.close()


def test_a_dropped_match_frees_its_staging_without_the_cyclic_gc(store, monkeypatch):
    """The staging of a load goes back to the allocator by reference counting alone: a reference cycle would keep
    it (pinned, on a GPU host) until Python's GC runs, and the next load would allocate a new block."""
    stagings = []

    def recording_host_empty(shape, dtype=torch.uint8, **_):
        t = torch.empty(shape, dtype=dtype)
        stagings.append(weakref.ref(t))
        return t

    monkeypatch.setattr(chunk_read, "host_empty", recording_host_empty)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for load in (lambda m: m.load(), lambda m: m.load_layers()):
            with store.lookup(IDS) as m:
                load(m)
            del m
            # a reader thread drops its work item (which holds the staging's view) just after the read's result
            # is set: wait for that, with the GC off, so only a reference cycle keeps the staging alive
            deadline = time.monotonic() + 5.0
            while stagings and stagings[-1]() is not None and time.monotonic() < deadline:
                time.sleep(0.001)
            assert stagings and stagings[-1]() is None
    finally:
        if was_enabled:
            gc.enable()
