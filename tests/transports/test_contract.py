"""The transport contract (kvstream/transports/base.py), checked for every factory in factories.py."""

from __future__ import annotations

import threading

import pytest
import torch

from factories import (FACTORIES, all_sentinel, guards_intact, random_chunk, same_bytes, sentinel_out)
from kvstream import transports
from kvstream.errors import ChunkNotFound, ConfigError, LayoutError, TransportError
from kvstream.chunk import ChunkHeader
from kvstream.layout import Region
from kvstream.transports import REGISTRY, DiskTransport, HostTransport, Transport

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.float8_e4m3fn, torch.uint8]
SHAPES = [
    (2, 2, 3, 2, 5, 7),  # packed [layers, 2, batch, heads, tokens, head_dim], odd head_dim
    (1, 2, 1, 1, 1, 3),  # one layer, one token
    (5000,),  # several disk blocks of the contract factories (8192 bytes)
    (),  # 0-d
    (0,),  # empty
    (2, 2, 0, 4),  # empty in the middle
]
DEVICES = [
    ("cpu", "cpu"),
    pytest.param("cuda", "cpu", marks=pytest.mark.gpu),
    pytest.param("cpu", "cuda", marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=list(FACTORIES.values()))
def transport(request, tmp_path):
    gen = request.param(tmp_path)
    t = next(gen)
    yield t
    t.close()
    next(gen, None)


def _flush(t: Transport, key: str, chunk: torch.Tensor, **kw) -> None:
    t.flush(key, chunk, **kw).wait(timeout=60)


# -- round trips -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("src,dst", DEVICES)
def test_round_trip_is_bit_exact(transport, dtype, shape, src, dst, seed):
    data = random_chunk(shape, dtype, seed, device=src)
    region = Region(layers=(0, 2), tokens=(3, 8), batch=(0, 2), heads=(0, 2))
    meta = {"session": "req-42", "step": 3}
    _flush(transport, "req-42/seg0/layer0007", data, region=region, meta=meta)

    header = transport.describe("req-42/seg0/layer0007")
    assert isinstance(header, ChunkHeader)
    assert (header.dtype, header.shape, header.nbytes) == (dtype, tuple(shape), data.numel() * data.element_size())
    assert header.region == region and header.meta == meta
    big, out = sentinel_out(shape, dtype, device=dst)
    transport.fetch("req-42/seg0/layer0007", out).wait(timeout=60)
    assert same_bytes(out, data)
    assert guards_intact(big)
    assert transport.contains("req-42/seg0/layer0007")
    assert transport.keys() == ["req-42/seg0/layer0007"]


def test_flush_keeps_a_copy(transport, seed):
    data = random_chunk((3, 1000), torch.float16, seed)
    chunk = data.clone()
    _flush(transport, "k", chunk)
    chunk.zero_()  # the caller may reuse the chunk once the flush completed
    assert same_bytes(transport.fetch_new("k"), data)


def test_flush_many_fetch_many(transport, seed):
    chunks = {f"s/{i}": random_chunk((i + 1, 33), torch.bfloat16, seed) for i in range(5)}
    transport.flush_many(list(chunks.items())).wait(timeout=60)
    outs = {k: torch.empty_like(c) for k, c in chunks.items()}
    transport.fetch_many(list(outs.items())).wait(timeout=60)
    assert all(same_bytes(outs[k], c) for k, c in chunks.items())


# -- missing keys and bad input ----------------------------------------------------------------------
def test_missing_key_raises_chunk_not_found(transport):
    _flush(transport, "present", torch.ones(4))
    big, out = sentinel_out((4,), torch.float32)
    for call in (lambda: transport.fetch("absent", out), lambda: transport.describe("absent"),
                 lambda: transport.fetch("present/below", out)):
        with pytest.raises(ChunkNotFound, match="absent|present/below"):
            call()
        with pytest.raises(KeyError):
            call()
    assert all_sentinel(big)
    assert not transport.contains("absent")
    assert transport.delete("absent") is False


@pytest.mark.parametrize("bad_out", [
    lambda: torch.empty(3, 2, dtype=torch.float16),  # shape
    lambda: torch.empty(2, 3, dtype=torch.bfloat16),  # dtype, same size
    lambda: torch.empty(2, 3, 2, dtype=torch.float16)[:, :, 0],  # not contiguous
    lambda: torch.empty(6, dtype=torch.float16),  # same bytes, other shape
])
def test_mismatched_out_raises_layout_error(transport, bad_out, seed):
    data = random_chunk((2, 3), torch.float16, seed)
    _flush(transport, "k", data)
    out = bad_out()
    before = out.clone()
    with pytest.raises(LayoutError):
        transport.fetch("k", out)
    assert same_bytes(out, before)
    assert same_bytes(transport.fetch_new("k"), data)  # the stored chunk is unharmed


@pytest.mark.parametrize("bad_chunk", [
    lambda: torch.ones(4, 6)[:, ::2],  # not contiguous
    lambda: torch.ones(4, dtype=torch.bool),  # unsupported dtype
    lambda: torch.ones(4, dtype=torch.complex64),
    lambda: [1.0, 2.0],  # not a tensor
])
def test_bad_chunk_raises_layout_error(transport, bad_chunk):
    with pytest.raises(LayoutError):
        transport.flush("k", bad_chunk())
    assert transport.keys() == [] and not transport.contains("k")


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", 7])
def test_bad_key_raises_layout_error(transport, key):
    with pytest.raises(LayoutError):
        transport.flush(key, torch.ones(2))
    assert transport.keys() == []


# -- replace, delete, keys -------------------------------------------------------------------------
def test_replace_is_whole(transport, seed):
    first = random_chunk((4, 100), torch.float32, seed)
    second = random_chunk((2, 3, 7), torch.bfloat16, seed)
    _flush(transport, "a/k", first, meta={"v": 1})
    _flush(transport, "a/k", second, meta={"v": 2})
    header = transport.describe("a/k")
    assert (header.dtype, header.shape, header.meta) == (torch.bfloat16, (2, 3, 7), {"v": 2})
    assert same_bytes(transport.fetch_new("a/k"), second)
    assert transport.keys() == ["a/k"]


def test_delete(transport):
    _flush(transport, "x/1", torch.ones(8))
    _flush(transport, "x/2", torch.zeros(8))
    assert transport.delete("x/1") is True
    assert not transport.contains("x/1") and transport.contains("x/2")
    with pytest.raises(ChunkNotFound):
        transport.fetch("x/1", torch.empty(8))
    assert transport.delete("x/1") is False
    assert transport.keys() == ["x/2"]
    _flush(transport, "x/1", torch.full((8,), 3.0))  # a deleted key can be written again
    assert torch.equal(transport.fetch_new("x/1"), torch.full((8,), 3.0))


def test_keys_by_prefix(transport):
    names = ["a/b/1", "a/b/2", "a/c", "ab", "b", "a/bc/1"]
    for i, k in enumerate(names):
        _flush(transport, k, torch.full((2,), float(i)))
    assert transport.keys() == sorted(names)
    assert transport.keys("") == sorted(names)
    assert transport.keys("a/") == ["a/b/1", "a/b/2", "a/bc/1", "a/c"]
    assert transport.keys("a") == ["a/b/1", "a/b/2", "a/bc/1", "a/c", "ab"]
    assert transport.keys("a/b") == ["a/b/1", "a/b/2", "a/bc/1"]
    assert transport.keys("a/b/") == ["a/b/1", "a/b/2"]
    assert transport.keys("a/b/1") == ["a/b/1"]
    assert transport.keys("zz") == [] and transport.keys("a/zz/") == []


# -- close -------------------------------------------------------------------------------------------
def test_close_is_idempotent_and_final(transport):
    _flush(transport, "k", torch.ones(3))
    transport.close()
    transport.close()
    assert transport.closed
    out = torch.empty(3)
    calls = [
        lambda: transport.flush("k2", torch.ones(3)),
        lambda: transport.fetch("k", out),
        lambda: transport.describe("k"),
        lambda: transport.contains("k"),
        lambda: transport.delete("k"),
        lambda: transport.keys(),
        lambda: transport.fetch_new("k"),
        lambda: transport.flush_many([("k3", torch.ones(3))]),
    ]
    for call in calls:
        with pytest.raises(TransportError, match="closed"):
            call()


def test_close_waits_for_flushes_in_flight(transport, seed):
    chunks = [random_chunk((50_000,), torch.uint8, seed) for _ in range(6)]
    handles = [transport.flush(f"k{i}", c) for i, c in enumerate(chunks)]
    transport.close()
    assert all(h.done() for h in handles)
    for h in handles:
        h.wait(timeout=0)  # none failed


# -- threads -------------------------------------------------------------------------------------------
def test_concurrent_flush_fetch(transport, seed):
    """Threads write their own keys and all replace one shared key while reading it: every read is one
    whole version (never a mix), every private key round-trips."""
    n_threads, rounds = 6, 6
    shared_bytes = 40_000  # several disk blocks
    versions = {i: torch.full((shared_bytes,), i + 1, dtype=torch.uint8) for i in range(n_threads)}
    private = {(i, j): random_chunk((j + 1, 257), torch.float16, seed)
               for i in range(n_threads) for j in range(rounds)}
    _flush(transport, "shared", versions[0])
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []
    seen: list[int] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            out = torch.empty(shared_bytes, dtype=torch.uint8)
            for j in range(rounds):
                transport.flush(f"t{i}/c{j}", private[i, j]).wait(timeout=60)
                transport.flush("shared", versions[i]).wait(timeout=60)
                transport.fetch("shared", out).wait(timeout=60)
                first = int(out[0])
                if not (1 <= first <= n_threads and bool((out == first).all())):
                    raise AssertionError(f"torn shared chunk: values {out.unique().tolist()}")
                seen.append(first)
                if not same_bytes(transport.fetch_new(f"t{i}/c{j}"), private[i, j]):
                    raise AssertionError(f"t{i}/c{j} came back different")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors[:3]
    assert len(seen) == n_threads * rounds
    assert transport.keys("t") == sorted(f"t{i}/c{j}" for i in range(n_threads) for j in range(rounds))
    final = transport.fetch_new("shared")
    assert any(torch.equal(final, v) for v in versions.values())


# -- CUDA stream semantics -----------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_flush_reads_the_chunk_on_the_current_stream(transport, seed):
    """The flush's reads are ordered after earlier work on the current stream and before later work."""
    data = random_chunk((8, 2, 4, 64, 128), torch.bfloat16, seed, device="cuda")
    chunk = torch.zeros_like(data)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the stream busy so that an unordered read would see zeros
        chunk.copy_(data)
        handle = transport.flush("k", chunk)
        chunk.zero_()  # the caller reuses the chunk right away, on the same stream
    handle.wait(timeout=60)
    assert same_bytes(transport.fetch_new("k"), data)


@pytest.mark.gpu
def test_cuda_fetch_writes_out_on_the_current_stream(transport, seed):
    data = random_chunk((8, 2, 4, 64, 128), torch.bfloat16, seed)
    _flush(transport, "k", data)
    out = torch.empty(data.shape, dtype=data.dtype, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        out.fill_(7.0)  # earlier work on the stream: the fetch must land after it
        handle = transport.fetch("k", out)
    handle.wait(timeout=60)
    side.synchronize()
    assert same_bytes(out, data)


# -- the registry -------------------------------------------------------------------------------------
def test_every_registered_transport_has_a_factory():
    missing = set(REGISTRY) - {p.id for p in FACTORIES.values()}
    assert not missing, f"add a factory to tests/transports/factories.py for {sorted(missing)}"


def test_registry_loads_classes():
    assert REGISTRY["host"] is HostTransport and REGISTRY["disk"] is DiskTransport
    assert "disk" in REGISTRY and "nope" not in REGISTRY
    assert all(issubclass(REGISTRY[name], Transport) for name in ("host", "disk"))


def test_registry_unknown_or_broken_name_raises_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="Unknown transport 'nope'.*disk"):
        REGISTRY["nope"]
    monkeypatch.setitem(transports._SPECS, "broken", "kvstream.transports.no_such_module:Broken")
    with pytest.raises(ConfigError, match="'broken'.*failed to load.*no_such_module"):
        REGISTRY["broken"]
    monkeypatch.setitem(transports._SPECS, "not-a-transport", "kvstream.errors:ConfigError")
    with pytest.raises(ConfigError, match="not a kvstream Transport"):
        REGISTRY["not-a-transport"]
