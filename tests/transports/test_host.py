"""HostTransport beyond the contract: capacity accounting, the zero-copy view, pinned memory."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from factories import random_chunk, same_bytes
from kvstream.errors import CapacityError, ConfigError, LayoutError
from kvstream.layout import Region
from kvstream.transports import HostTransport
from kvstream.handles import CompletedHandle, EventHandle
from kvstream.chunk import NO_CHECKSUM, ChunkHeader


def _bytes(n: int, value: int = 1) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.uint8)


def test_capacity_exceeded_stores_nothing():
    t = HostTransport(capacity_bytes=100)
    t.flush("a", _bytes(80)).wait()
    with pytest.raises(CapacityError, match=r"'b' needs 40 bytes but 80 of 100 are in use.*20 free"):
        t.flush("b", _bytes(40))
    assert t.keys() == ["a"] and not t.contains("b")
    assert t.used_bytes == 80
    assert torch.equal(t.fetch_new("a"), _bytes(80))


def test_capacity_freed_by_delete():
    t = HostTransport(capacity_bytes=100)
    t.flush("a", _bytes(80)).wait()
    assert t.delete("a")
    assert t.used_bytes == 0
    t.flush("b", _bytes(100, 2)).wait()  # exactly full is allowed
    assert t.used_bytes == 100
    assert torch.equal(t.fetch_new("b"), _bytes(100, 2))


def test_replace_needs_room_for_both_versions():
    t = HostTransport(capacity_bytes=100)
    t.flush("k", _bytes(60, 1)).wait()
    with pytest.raises(CapacityError, match="60 bytes but 60 of 100"):
        t.flush("k", _bytes(60, 2))
    assert torch.equal(t.fetch_new("k"), _bytes(60, 1))  # the old version is intact
    t.flush("k", _bytes(40, 3)).wait()  # 60 + 40 fit: the replace goes through
    assert t.used_bytes == 40
    assert torch.equal(t.fetch_new("k"), _bytes(40, 3))


def test_capacity_counts_payload_bytes_of_every_dtype():
    t = HostTransport(capacity_bytes=1 << 20)
    t.flush("bf16", torch.zeros(3, 5, dtype=torch.bfloat16)).wait()
    t.flush("f32", torch.zeros(7, dtype=torch.float32)).wait()
    t.flush("scalar", torch.tensor(1.5, dtype=torch.float64)).wait()
    t.flush("empty", torch.zeros(0, 4)).wait()
    assert t.used_bytes == 3 * 5 * 2 + 7 * 4 + 8 + 0
    assert t.capacity_bytes == 1 << 20


def test_zero_capacity_holds_only_empty_chunks():
    t = HostTransport(capacity_bytes=0)
    t.flush("empty", torch.zeros(0)).wait()
    with pytest.raises(CapacityError):
        t.flush("one", torch.zeros(1, dtype=torch.uint8))
    assert t.keys() == ["empty"]


def test_concurrent_flushes_never_exceed_capacity():
    t = HostTransport(capacity_bytes=1000)
    n_threads, per_thread = 4, 10
    stored, refused = [], []
    barrier = threading.Barrier(n_threads)

    def work(i: int) -> None:
        barrier.wait()
        for j in range(per_thread):
            try:
                t.flush(f"t{i}/{j}", _bytes(100, i + 1)).wait()
                stored.append((i, j))
            except CapacityError:
                refused.append((i, j))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(stored) == 10 and len(refused) == n_threads * per_thread - 10
    assert t.used_bytes == 1000 and len(t.keys()) == 10
    assert all(torch.equal(t.fetch_new(f"t{i}/{j}"), _bytes(100, i + 1)) for i, j in stored)


@pytest.mark.parametrize("capacity", [-1, 1.5, True, "1GB"])
def test_bad_capacity_raises_config_error(capacity):
    with pytest.raises(ConfigError, match="capacity_bytes"):
        HostTransport(capacity_bytes=capacity)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_pinned_without_cuda_raises_config_error():
    with pytest.raises(ConfigError, match=r"pinned=True\) needs CUDA"):
        HostTransport(capacity_bytes=1024, pinned=True)
    assert HostTransport(capacity_bytes=1024).pinned is False


def test_header_has_no_checksum_and_keeps_region_and_meta(seed):
    t = HostTransport(capacity_bytes=1 << 20)
    region = Region(layers=(0, 4), tokens=(0, 16))
    t.flush("k", random_chunk((4, 2, 1, 2, 16, 8), torch.float16, seed), region=region, meta={"step": 0}).wait()
    header = t.describe("k")
    assert header.checksum == NO_CHECKSUM
    assert header.region == region and header.meta == {"step": 0}
    assert header.to_bytes()  # a host chunk's header can be persisted as is


def test_cached_headers_follow_every_change_of_meta_shape_and_region(seed):
    # the header cache must never serve a stale header: metas equal in Python but not in JSON, other shapes,
    # other regions; chunks flushed after a cached header round-trip bit-exactly
    t = HostTransport(capacity_bytes=1 << 20)
    region = Region(layers=(0, 1), tokens=(0, 4)).resolve(2, 2)
    chunks = {}
    for i, meta in enumerate([{"x": 1}, {"x": True}, {"x": 1.0}, {"x": 1}, {"x": -0.0}, {"x": 0.0}, None, {},
                              {"x": 1, "layer": 3}, {"layer": 3, "x": 1}]):
        for j, (shape, r) in enumerate([((1, 2, 2, 2, 4, 8), region), ((1, 2, 2, 2, 4, 8), None),
                                        ((1, 2, 2, 2, 5, 8), Region(layers=(0, 1), tokens=(0, 5)).resolve(2, 2))]):
            key = f"c/{i}/{j}"
            chunks[key] = random_chunk(shape, torch.bfloat16, seed)
            t.flush(key, chunks[key], region=r, meta=meta).wait()
            h = t.describe(key)
            assert json.dumps(h.meta, sort_keys=True) == json.dumps(meta, sort_keys=True)
            assert h.shape == shape and h.region == r
            assert h.checksum == NO_CHECKSUM and ChunkHeader.from_bytes(h.to_bytes()) == h
    for key, chunk in chunks.items():
        assert same_bytes(t.fetch_new(key), chunk)
    t.close()


@pytest.mark.parametrize("meta,region", [({"x": object()}, None), (["not", "a", "dict"], None),
                                         (None, (0, 4)), ({"big": "x" * 5000}, None)])
def test_bad_meta_or_region_raises_layout_error(meta, region):
    t = HostTransport(capacity_bytes=1 << 20)
    with pytest.raises(LayoutError):
        t.flush("k", torch.zeros(4), region=region, meta=meta)
    assert t.keys() == [] and t.used_bytes == 0


def test_meta_is_copied():
    t = HostTransport(capacity_bytes=1 << 20)
    meta = {"step": 1}
    t.flush("k", torch.zeros(4), meta=meta).wait()
    meta["step"] = 2
    assert t.describe("k").meta == {"step": 1}


# -- the zero-copy view ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 2, 3, 2, 5, 7), (), (0,), (3, 0)], ids=str)
def test_view_is_the_stored_chunk_without_a_copy(shape, seed):
    t = HostTransport(capacity_bytes=1 << 20)
    data = random_chunk(shape, torch.bfloat16, seed)
    t.flush("k", data).wait()
    v1, v2 = t.view("k"), t.view("k")
    assert same_bytes(v1, data)
    assert v1.device.type == "cpu"
    if data.numel():
        assert v1.data_ptr() == v2.data_ptr()  # both alias the stored bytes


def test_view_keeps_the_old_bytes_after_replace(seed):
    t = HostTransport(capacity_bytes=1 << 20)
    old, new = random_chunk((1000,), torch.float32, seed), random_chunk((1000,), torch.float32, seed)
    t.flush("k", old).wait()
    view = t.view("k")
    t.flush("k", new).wait()
    t.flush("other", random_chunk((1000,), torch.float32, seed)).wait()
    assert same_bytes(view, old)
    assert same_bytes(t.view("k"), new)


def test_cpu_calls_return_completed_handles():
    t = HostTransport(capacity_bytes=1 << 20)
    assert isinstance(t.flush("k", torch.zeros(4)), CompletedHandle)
    assert isinstance(t.fetch("k", torch.empty(4)), CompletedHandle)


def test_close_frees_everything():
    t = HostTransport(capacity_bytes=1 << 20)
    t.flush("k", torch.zeros(64)).wait()
    t.close()
    assert t.used_bytes == 0


# -- GPU ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_chunks_live_in_pinned_memory_and_return_event_handles(seed):
    t = HostTransport(capacity_bytes=1 << 24)
    assert t.pinned
    data = random_chunk((4, 2, 2, 8, 33, 128), torch.bfloat16, seed, device="cuda")
    h = t.flush("k", data)
    assert isinstance(h, EventHandle)
    view = t.view("k")  # waits for the device-to-host copy
    assert view.is_pinned()
    assert same_bytes(view, data)
    out = torch.empty_like(data)
    h = t.fetch("k", out)
    assert isinstance(h, EventHandle)
    h.wait()
    assert same_bytes(out, data)


@pytest.mark.gpu
def test_gpu_fetch_in_flight_survives_replace_and_delete(seed):
    """A freed pinned block is reused at once by the allocator: the buffer that an H2D copy still reads
    must stay out of reach until that copy's event fired."""
    t = HostTransport(capacity_bytes=1 << 28)
    nbytes = 8 << 20
    old = random_chunk((nbytes,), torch.uint8, seed)
    t.flush("k", old).wait()
    out = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # the fetch's copy runs long after the host calls below
        handle = t.fetch("k", out)
    t.flush("k", torch.full((nbytes,), 1, dtype=torch.uint8)).wait()
    t.delete("k")
    for i in range(4):  # same size class: would reuse the old block if it were released
        t.flush(f"filler{i}", torch.full((nbytes,), 2, dtype=torch.uint8)).wait()
    handle.wait()
    assert same_bytes(out.cpu(), old)


@pytest.mark.gpu
def test_gpu_flush_then_cpu_fetch_sees_the_new_bytes(seed):
    t = HostTransport(capacity_bytes=1 << 26)
    data = random_chunk((16 << 20,), torch.uint8, seed, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        t.flush("k", data)  # not waited for: the CPU fetch must wait on the flush's event
    out = torch.zeros(16 << 20, dtype=torch.uint8)
    t.fetch("k", out).wait()
    assert same_bytes(out, data)


@pytest.mark.gpu
def test_gpu_fetch_many_is_one_stream_ordered_batch(seed):
    t = HostTransport(capacity_bytes=1 << 24)
    chunks = [torch.randn(4, 64, generator=seed).cuda() for _ in range(5)]
    for i, c in enumerate(chunks):
        t.flush(f"k{i}", c)
    outs = [torch.full_like(c, float("nan")) for c in chunks]
    h = t.fetch_many([(f"k{i}", o) for i, o in enumerate(outs)])
    assert h.stream_ordered  # later work on this stream sees the bytes without a host wait
    same = [torch.equal(o, c) for o, c in zip(outs, chunks)]  # enqueued after the copies, same stream
    assert all(same)
    with pytest.raises(LayoutError):
        t.fetch_many([("k0", torch.empty(3, device="cuda"))])
    t.close()


def test_fetch_many_cpu_matches_single_fetches(seed):
    t = HostTransport(capacity_bytes=1 << 20)
    chunks = [torch.randn(3, 5, generator=seed) for _ in range(3)]
    for i, c in enumerate(chunks):
        t.flush(f"k{i}", c).wait()
    outs = [torch.empty_like(c) for c in chunks]
    t.fetch_many([(f"k{i}", o) for i, o in enumerate(outs)]).wait()
    assert all(torch.equal(o, c) for o, c in zip(outs, chunks))


# -- flush_into: a chunk written straight into the stored buffer ----------------------------------------------
def test_flush_into_stores_what_the_writer_wrote(seed):
    t = HostTransport(capacity_bytes=1 << 20)
    data = random_chunk((3, 2, 5, 8), torch.bfloat16, seed)
    seen = []

    def write(buf):
        seen.append((buf.dtype, buf.numel()))
        buf.copy_(data.view(torch.uint8).reshape(-1))

    h = t.flush_into("k", data.shape, data.dtype, write, device=torch.device("cpu"), meta={"layer": 3})
    assert isinstance(h, CompletedHandle)
    assert seen == [(torch.uint8, data.numel() * 2)]
    assert same_bytes(t.view("k"), data) and t.view("k").dtype == torch.bfloat16
    header = t.describe("k")
    assert header.shape == (3, 2, 5, 8) and header.meta == {"layer": 3}
    assert t.used_bytes == data.numel() * 2


def test_flush_into_a_failing_writer_stores_nothing_and_frees_its_bytes(seed):
    t = HostTransport(capacity_bytes=1024)
    t.flush("k", _bytes(100, 7)).wait()

    def write(buf):
        raise RuntimeError("the pack failed")

    with pytest.raises(RuntimeError, match="the pack failed"):
        t.flush_into("k", (900,), torch.uint8, write, device=torch.device("cpu"))
    assert torch.equal(t.view("k"), _bytes(100, 7))  # the old chunk stays
    assert t.used_bytes == 100
    t.flush_into("k2", (900,), torch.uint8, lambda buf: buf.fill_(1), device=torch.device("cpu")).wait()
    assert t.used_bytes == 1000  # nothing was left reserved by the failed flush


def test_flush_into_past_capacity_stores_nothing():
    t = HostTransport(capacity_bytes=1000)
    called = []
    with pytest.raises(CapacityError):
        t.flush_into("k", (1001,), torch.uint8, called.append, device=torch.device("cpu"))
    assert called == [] and not t.contains("k") and t.used_bytes == 0


def test_flush_into_on_a_gpu_needs_zero_copy_buffers():
    t = HostTransport(capacity_bytes=1 << 20, pinned=False)
    assert not t.zero_copy
    called = []
    with pytest.raises(ConfigError, match="zero_copy"):
        t.flush_into("k", (8,), torch.uint8, called.append, device=torch.device("cuda", 0))
    assert called == [] and not t.contains("k")


@pytest.mark.gpu
def test_gpu_flush_into_a_kernel_writes_the_pinned_buffer(seed):
    t = HostTransport(capacity_bytes=1 << 24, preallocate=True)
    assert t.zero_copy
    data = random_chunk((2, 8, 64, 128), torch.bfloat16, seed, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # the write runs after flush_into returns: the handle and view must wait for it
    h = t.flush_into("k", data.shape, data.dtype,
                     lambda buf: buf.view(torch.bfloat16).view(data.shape).copy_(data, non_blocking=True),
                     device=data.device)
    assert isinstance(h, EventHandle)
    assert same_bytes(t.view("k"), data)
    out = torch.full_like(data, float("nan"))
    t.fetch("k", out).wait()
    assert same_bytes(out, data)


@pytest.mark.gpu
def test_gpu_ready_events_are_recycled_and_fetches_stay_exact(seed, monkeypatch):
    """Past HARVEST flushes, fired ready events go back to a pool and are recorded again for later flushes:
    every chunk, old and new, still fetches exactly, and a fetch of an old chunk waits for nothing wrong."""
    from kvstream.transports import hostslots

    made = []

    class Counted(hostslots.Event):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(hostslots, "Event", Counted)
    t = HostTransport(capacity_bytes=1 << 26, preallocate=True)
    chunks = [random_chunk((64, 1024), torch.bfloat16, seed, device="cuda") for _ in range(3 * hostslots.HARVEST)]
    for i, c in enumerate(chunks):
        t.flush(f"k{i}", c)
        if i == hostslots.HARVEST:
            torch.cuda.synchronize()  # the first flushes' events have fired: the next harvest recycles them
    assert len(made) < len(chunks)  # later flushes recorded recycled events
    for i, c in enumerate(chunks):
        out = torch.zeros_like(c)
        t.fetch(f"k{i}", out).wait()
        assert same_bytes(out, c), i
    t.close()
