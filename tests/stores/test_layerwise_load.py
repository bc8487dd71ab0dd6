"""PrefixMatch.load_layers: layer-by-layer loads (one event per layer) give exactly what load() gives.

CPU tests run the RadixStore's layer-wise path itself (pitched copies, staging, pack) synchronously;
GPU tests (``gpu``) run it on a side stream against a busy compute stream.
"""

from __future__ import annotations

import gc
import uuid
import weakref

import pytest
import torch

import kvstream.stores.radix.blobs as radix_store
from kvstream.errors import ConfigError
from kvstream.cuda import Event, Stream
from kvstream.layout import KVLayout
from kvstream.stores import ChunkFileStore, LayerwiseLoad, PinError, PrefixMatch, RadixStore
from kvstream.stores.layerwise import enqueue_layers
from store_helpers import prefix_kv

A = list(range(100, 130))  # 30 tokens
B = A[:12] + [7, 8, 9, 10, 11, 12]  # splits A's node after 12 tokens
C = B + [50, 51, 52, 53]  # extends B: a third node, in a third blob


def _radix(ids_list, layers=2, heads=2, head_dim=4, dtype=torch.float32, **kw):
    s = RadixStore(capacity_bytes=1 << 24, **kw)
    for ids in ids_list:
        keys, values = prefix_kv(ids, layers, heads, head_dim, dtype)
        s.update_kv(ids, keys, values)
    return s


def _load_both(store, ids, device="cpu", stream=None, **kw):
    """``(load() keys, load() values, LayerwiseLoad taken layer by layer, its keys, its values)``."""
    with store.fetch_prefix(ids, device=device, **kw) as whole:
        ref_k, ref_v = [k.clone() for k in whole.keys], [v.clone() for v in whole.values]
    with store.lookup(ids, **kw) as m:
        load = m.load_layers(device, stream=stream)
        assert m.matched_tokens == load.matched_tokens
        taken = [load.take(l) for l in range(len(load))]
    return ref_k, ref_v, load, [k for k, _ in taken], [v for _, v in taken]


def _assert_identical(ref_k, ref_v, keys, values, n, contiguous=True):
    assert len(keys) == len(ref_k) > 0
    for l in range(len(ref_k)):
        assert keys[l].shape == ref_k[l].shape and keys[l].shape[2] == n
        assert not contiguous or (keys[l].is_contiguous() and values[l].is_contiguous())
        assert torch.equal(keys[l], ref_k[l]), f"layer {l} keys differ"
        assert torch.equal(values[l], ref_v[l]), f"layer {l} values differ"


@pytest.mark.parametrize("probe,cap,expected", [
    (A + [1], None, 30),          # one node, whole
    (A[:9] + [1], None, 9),       # shorter than the node
    (B, None, 18),                # two slices of two blobs (after the split)
    (C + [99], None, 22),         # three slices, three blobs
    (C, 15, 15),                  # capped inside the second slice
    (C, 12, 12),                  # capped exactly at a node boundary
    (C, 1, 1),                    # one token
])
def test_radix_layerwise_equals_load(probe, cap, expected):
    s = _radix([A, B, C])
    assert s.stats()["nodes"] == 4
    ref_k, ref_v, load, keys, values = _load_both(s, probe, max_tokens=cap)
    assert load.matched_tokens == expected
    _assert_identical(ref_k, ref_v, keys, values, expected)
    want_k, want_v = prefix_kv(probe[:expected])
    _assert_identical(want_k, want_v, keys, values, expected)  # and both are the stored KV
    assert s.pinned() == 0 and s.stats()["pins"] == 0
    s.close()


@pytest.mark.parametrize("layers,heads,head_dim,dtype", [
    (1, 1, 1, torch.float32),
    (3, 1, 5, torch.float16),
    (4, 3, 7, torch.bfloat16),
])
def test_radix_layerwise_geometries_and_dtypes(layers, heads, head_dim, dtype):
    s = _radix([A, B], layers, heads, head_dim, dtype)
    ref_k, ref_v, load, keys, values = _load_both(s, B + [3])
    assert len(load) == layers and keys[0].dtype == dtype
    _assert_identical(ref_k, ref_v, keys, values, 18)
    s.close()


def test_one_pitched_copy_per_layer_and_blob_run(monkeypatch):
    layers = 3
    calls = []
    real = radix_store.memcpy_2d_async

    def counting(dst, src, stream=None):
        assert src.dim() == 2 and src.stride(1) == 1 and src.stride(0) == layers * src.shape[1]
        calls.append(src.shape[0])
        return real(dst, src, stream)

    monkeypatch.setattr(radix_store, "memcpy_2d_async", counting)
    s = _radix([A, B, C], layers=layers)
    for probe, runs in [(A, [30]), (B, [12, 6]), (C, [12, 6, 4]), (A[:20], [20])]:
        calls.clear()
        ref_k, ref_v, _, keys, values = _load_both(s, probe)
        _assert_identical(ref_k, ref_v, keys, values, len(probe))
        assert calls == runs * layers  # A's two nodes (split at 12) slice one blob: one run of 30 rows
    s.close()


def test_radix_layerwise_from_a_shared_store(tmp_path):
    name = f"test-{uuid.uuid4().hex[:12]}"
    s = _radix([A, B], shared_name=name, shm_dir=str(tmp_path))
    ref_k, ref_v, _, keys, values = _load_both(s, B)
    _assert_identical(ref_k, ref_v, keys, values, 18)
    s.unlink()


def test_events_and_take_on_the_cpu():
    s = _radix([A])
    with s.lookup(A) as m:
        load = m.load_layers()
        assert isinstance(load, LayerwiseLoad) and load.stream is None
        assert all(isinstance(e, Event) and not e.is_cuda and e.query() for e in load.events)
        assert load.ready()
        load.synchronize()
        load.wait(0)
        k0, v0 = load.take(0)
        assert load.keys[0] is None and load.values[0] is None and load.keys[1] is not None
        with pytest.raises(ConfigError, match="already taken"):
            load.take(0)
        want_k, want_v = prefix_kv(A)
        assert torch.equal(k0, want_k[0]) and torch.equal(v0, want_v[0])
    s.close()


def test_pins_and_load_once():
    s = _radix([A])
    m = s.lookup(A)
    assert s.pinned() == 1 and s.stats()["pins"] == 1
    load = m.load_layers(torch.device("cpu"))
    assert s.pinned() == 1  # the load does not drop the pin: release does
    with pytest.raises(ConfigError, match="loaded once"):
        m.load_layers()
    with pytest.raises(ConfigError, match="layer-wise"):
        m.load()
    m.release()
    assert s.pinned() == 0 and s.stats()["pins"] == 0
    with pytest.raises(PinError):
        m.release()
    assert torch.equal(load.keys[1], prefix_kv(A)[0][1])  # the caller's tensors outlive the match
    other = s.lookup(A)
    other.load()
    with pytest.raises(ConfigError, match="loaded once"):
        other.load_layers()
    other.release()
    with pytest.raises(PinError, match="after release"):
        other.load_layers()
    assert s.pinned() == 0
    s.close()


def test_no_match_gives_an_empty_load():
    s = _radix([A])
    with s.lookup([1, 2, 3]) as m:
        load = m.load_layers()
        assert len(load) == 0 and load.matched_tokens == 0 and load.keys == [] and load.ready()
        load.synchronize()
    assert s.pinned() == 0
    s.close()


def test_bad_stream_is_a_type_error():
    s = _radix([A])
    with s.lookup(A) as m:
        with pytest.raises(TypeError, match="stream"):
            m.load_layers(stream="side")
    s.close()


def test_taken_layers_are_not_kept_by_the_match():
    s = _radix([A])
    with s.lookup(A) as m:
        load = m.load_layers()
        k1_ref = weakref.ref(load.keys[1])
        k0_ref = weakref.ref(load.keys[0])
        k, v = load.take(0)
        del k, v
        gc.collect()
        assert k0_ref() is None  # taken and dropped: gone before release
        assert k1_ref() is not None  # not taken: held until release
        del load
        gc.collect()
        assert k1_ref() is not None  # the match still holds it (a copy might still write it)
    gc.collect()
    assert k1_ref() is None
    s.close()


class _FakeEvent:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def synchronize(self):
        self.log.append(("synchronize", self.name))

    def wait(self, stream=None):
        self.log.append(("wait", self.name))

    def query(self):
        return True


def test_release_waits_for_the_last_layer_before_unpinning():
    log = []
    staging = torch.zeros(4)
    staging_ref = weakref.ref(staging)

    def layer_loader(device, n_tokens, stream):
        kv = [torch.zeros(2, 1, 1, n_tokens, 1) for _ in range(3)]
        load = LayerwiseLoad([t[0] for t in kv], [t[1] for t in kv], [_FakeEvent(log, l) for l in range(3)],
                             n_tokens)
        return load, staging

    m = PrefixMatch(5, lambda d, n: None, lambda: log.append(("unpin", None)), layer_loader=layer_loader)
    load = m.load_layers()
    assert load.matched_tokens == 5 and m.matched_tokens == 5
    load.take(1)
    del staging
    gc.collect()
    assert staging_ref() is not None  # the match holds the staging until release
    m.release()
    assert log == [("wait", 1), ("synchronize", 2), ("unpin", None)]  # the last layer's event, then the pin
    gc.collect()
    assert staging_ref() is None


def test_enqueue_layers_runs_the_store_copy_of_each_layer_in_order():
    layout = KVLayout(num_layers=3, kv_heads=2, head_dim=5, dtype=torch.float16)
    calls = []

    def copy_layer(layer, kv):
        calls.append((layer, tuple(kv.shape), kv.dtype, kv.is_contiguous()))
        kv[0].fill_(layer)
        kv[1].fill_(-layer)

    load = enqueue_layers(layout, 7, torch.device("cpu"), None, copy_layer)
    assert calls == [(l, (2, 1, 2, 7, 5), torch.float16, True) for l in range(3)]
    assert len(load) == 3 and load.matched_tokens == 7 and load.stream is None and load.ready()
    for l in range(3):
        k, v = load.take(l)
        assert k.shape == (1, 2, 7, 5) and torch.equal(k, torch.full_like(k, l)) and torch.equal(v, -torch.full_like(v, l))


def test_enqueue_layers_passes_a_copy_error_on():
    layout = KVLayout(num_layers=3, kv_heads=1, head_dim=2, dtype=torch.float32)
    done = []

    def copy_layer(layer, kv):
        if layer == 1:
            raise RuntimeError("disk gone")
        done.append(layer)

    with pytest.raises(RuntimeError, match="disk gone"):
        enqueue_layers(layout, 4, torch.device("cpu"), None, copy_layer)
    assert done == [0]


def test_layerwise_load_checks_its_lists():
    with pytest.raises(Exception, match="one of each per layer"):
        LayerwiseLoad([torch.zeros(1)], [], [None], 1)


def test_chunk_file_store_falls_back_to_a_synchronous_load(tmp_path):
    # files without per-layer checksums (as written before they existed) are loaded whole, at once
    s = ChunkFileStore(tmp_path / "kv", chunk_tokens=4, slice_checksums=False)
    keys, values = prefix_kv(A)
    assert s.update_kv(A, keys, values) == 28
    for cap, n in [(None, 28), (13, 13)]:
        ref_k, ref_v, load, k, v = _load_both(s, A, max_tokens=cap)
        assert load.matched_tokens == n and len(set(map(id, load.events))) == 1 and load.ready()
        _assert_identical(ref_k, ref_v, k, v, n, contiguous=False)  # load()'s views of its packed tensor
    assert s.pinned() == 0
    with s.lookup(A) as m:
        load = m.load_layers(stream=Stream("cpu"))  # an inert stream is accepted and ignored on the CPU
        assert m.keys is None and m.packed is None  # the match keeps no copy of what the caller owns
        assert torch.equal(load.values[1], values[1][:, :, :28])
    s.close()


# ----------------------------------------------------------------------------------------------------
# GPU (run on the device machine)
# ----------------------------------------------------------------------------------------------------

GPU_PER_TOKEN = 4 * 2 * 8 * 128 * 2  # bytes of one token's KV in the GPU tests (4 layers, bf16)


def _cuda_radix(ids_list, layers=4, heads=8, head_dim=128, dtype=torch.bfloat16, capacity_bytes=1 << 28):
    s = RadixStore(capacity_bytes=capacity_bytes)
    for ids in ids_list:
        keys, values = prefix_kv(ids, layers, heads, head_dim, dtype)
        s.update_kv(ids, [k.cuda() for k in keys], [v.cuda() for v in values])
    return s


@pytest.mark.gpu
@pytest.mark.parametrize("stream_kind", ["default", "kvstream", "torch"])
def test_gpu_layerwise_equals_load(cuda_device, stream_kind):
    big = list(range(1000, 1600))
    s = _cuda_radix([big, big[:200] + [5] * 50, big[:200] + [5] * 50 + [6] * 80])
    assert next(iter(s._data.values())).is_pinned()
    stream = {"default": None, "kvstream": Stream(cuda_device), "torch": torch.cuda.Stream(cuda_device)}[stream_kind]
    for probe, cap in [(big, None), (big[:200] + [5] * 50 + [6] * 80, None), (big, 333), (big[:200] + [5] * 50, 201)]:
        ref_k, ref_v, load, keys, values = _load_both(s, probe, device=cuda_device, stream=stream, max_tokens=cap)
        assert keys[0].is_cuda and all(e.is_cuda for e in load.events) and len(set(map(id, load.events))) == 4
        assert load.stream is not None and load.stream != torch.cuda.current_stream(cuda_device)
        torch.cuda.synchronize()
        _assert_identical(ref_k, ref_v, keys, values, load.matched_tokens)
    assert s.pinned() == 0
    s.close()


@pytest.mark.gpu
def test_gpu_copies_wait_for_the_compute_stream(cuda_device):
    """Memory the allocator hands back may still be written by queued compute: the side stream must wait."""
    ids = list(range(2000, 2512))
    s = _cuda_radix([ids])
    want_k, want_v = prefix_kv(ids, 4, 8, 128, torch.bfloat16)
    for _ in range(3):
        junk = [torch.empty((2, 1, 8, 512, 128), dtype=torch.bfloat16, device=cuda_device) for _ in range(5)]
        torch.cuda._sleep(50_000_000)  # the compute stream is busy ...
        for j in junk:
            j.fill_(7)  # ... then writes these, after the copies would land if they did not wait
        del junk  # freed on the compute stream: load_layers may get the same blocks back
        with s.lookup(ids) as m:
            load = m.load_layers(cuda_device)
            taken = [load.take(l) for l in range(len(load))]
            for l, (k, v) in enumerate(taken):
                assert torch.equal(k.cpu(), want_k[l]) and torch.equal(v.cpu(), want_v[l])
    s.close()


@pytest.mark.gpu
def test_gpu_release_waits_then_the_blob_may_go(cuda_device):
    ids = list(range(300))
    s = _cuda_radix([ids], capacity_bytes=400 * GPU_PER_TOKEN)  # room for one sequence: the next evicts it
    want_k, want_v = prefix_kv(ids, 4, 8, 128, torch.bfloat16)
    m = s.lookup(ids)
    torch.cuda._sleep(50_000_000)  # copies queue behind compute (the side stream waits for it)
    load = m.load_layers(cuda_device, stream=Stream(cuda_device))
    assert not load.events[-1].query()  # still in flight: the host did not block
    m.release()  # blocks until the last layer landed
    assert all(e.query() for e in load.events)
    for i in range(3):  # evict the blob; its pinned block is reused
        other = [5000 + i] * 300
        k2, v2 = prefix_kv(other, 4, 8, 128, torch.bfloat16)
        s.update_kv(other, [k.cuda() for k in k2], [v.cuda() for v in v2])
    assert s.query(ids) == 0
    for l in range(4):
        assert torch.equal(load.keys[l].cpu(), want_k[l]) and torch.equal(load.values[l].cpu(), want_v[l])
    s.close()


@pytest.mark.gpu
def test_gpu_chunk_file_store_fallback(tmp_path, cuda_device):
    ids = list(range(300))
    keys, values = prefix_kv(ids, 4, 8, 128, torch.bfloat16)
    s = ChunkFileStore(tmp_path / "kv", chunk_tokens=64)
    assert s.update_kv(ids, [k.cuda() for k in keys], [v.cuda() for v in values]) == 256
    with s.lookup(ids, max_tokens=200) as m:
        load = m.load_layers(cuda_device)
        assert load.events[0].is_cuda and load.matched_tokens == 200
        for l in range(4):
            k, v = load.take(l)
            assert torch.equal(k.cpu(), keys[l][:, :, :200]) and torch.equal(v.cpu(), values[l][:, :, :200])
    s.close()
