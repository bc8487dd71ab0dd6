"""NcclTransport: the header exchange, receive-ahead, zero-copy fetch and failure logic on the CPU with a fake
communicator; the real thing on two GPUs (``gpu2``)."""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest
import torch
import torch.distributed as dist

from kvstream.errors import ChunkNotFound, ConfigError, CorruptChunkError, LayoutError, PeerError, TransportError
from kvstream.chunk import HEADER_BYTES, ChunkHeader
from kvstream.layout import Region
from kvstream import chunk as chunk_mod
from kvstream.transports.nccl import NcclTransport, init_comm
from kvstream.transports.nccl import comm as comm_mod, endpoint as endpoint_mod, receiver as receiver_mod, \
    sender as sender_mod
from kvstream.transports.peer import ChunkTimeout, LoopbackTransport, rendezvous_store

FAST = dict(timeout_s=10.0, heartbeat_s=0.05, dead_after_s=1.0)


class FakeComm:
    """A two-rank "communicator" on CPU tensors: send queues a copy, recv takes the next one in order."""

    def __init__(self, links, me):
        self.links, self.me = links, me
        self.aborted = threading.Event()
        self.calls = []

    def send(self, buf, peer, *, stream=None):
        self.calls.append(("send", buf.numel()))
        self.links[(self.me, peer)].put(buf.clone())

    def recv(self, buf, peer, *, stream=None):
        self.calls.append(("recv", buf.numel()))
        while True:
            if self.aborted.is_set():
                raise RuntimeError("ncclCommAbort: aborted")
            try:
                data = self.links[(peer, self.me)].get(timeout=0.05)
                break
            except queue.Empty:
                continue
        buf.copy_(data)

    def get_async_error(self):
        return 0

    def abort(self):
        self.aborted.set()


def _fake_pair(**kw):
    links = {(0, 1): queue.Queue(), (1, 0): queue.Queue()}
    store = dist.HashStore()
    comms = FakeComm(links, 0), FakeComm(links, 1)
    opts = dict(FAST, **kw)
    a = NcclTransport(store, 0, 1, role="send", device="cpu", comm=comms[0], **opts)
    b = NcclTransport(store, 1, 0, role="recv", device="cpu", comm=comms[1], **opts)
    return a, b, comms


@pytest.fixture
def fake():
    a, b, comms = _fake_pair()
    yield a, b, comms
    a.close()
    b.close()


def test_round_trip_keeps_header_and_bytes(fake, seed):
    a, b, _ = fake
    chunk = torch.randn(2, 2, 1, 3, 4, 5).to(torch.bfloat16)
    region = Region(layers=(0, 2), tokens=(0, 4), batch=(0, 1), heads=(0, 3))
    a.flush("r/seg000000/layer0000", chunk, region=region, meta={"x": 1}).wait()
    h = b.describe("r/seg000000/layer0000")
    assert (h.shape, h.dtype, h.region, h.meta, h.checksum) == (tuple(chunk.shape), torch.bfloat16, region, {"x": 1}, "none")
    out = torch.full_like(chunk, 3)
    b.fetch("r/seg000000/layer0000", out).wait()
    assert torch.equal(out, chunk)
    assert b.contains("r/seg000000/layer0000") and b.keys("r/") == ["r/seg000000/layer0000"]
    assert b.delete("r/seg000000/layer0000") and not b.delete("r/seg000000/layer0000")


def test_fetch_in_another_order_than_flush(fake, seed):
    a, b, _ = fake
    layers = {f"s/seg000000/layer{l:04d}": torch.randn(1, 2, 1, 2, 7, 4) for l in range(5)}
    for k, v in layers.items():
        a.flush(k, v)
    a.flush("s/manifest", torch.arange(9, dtype=torch.uint8))
    assert torch.equal(b.fetch_new("s/manifest"), torch.arange(9, dtype=torch.uint8))
    for k in sorted(layers, reverse=True):
        assert torch.equal(b.fetch_new(k), layers[k])


class _Background:
    """Run ``fn`` in a thread; ``result()`` returns its value or raises its exception."""

    def __init__(self, fn):
        self.value, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to result()
            self.error = e

    def result(self, timeout=20):
        self.thread.join(timeout)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.value


def _until_waiting(b, key):
    deadline = time.monotonic() + 10
    while key not in b._endpoint._pending:
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_fetch_before_flush_receives_straight_into_out(fake, seed):
    a, b, comms = fake
    out = torch.full((4, 6), -1.0)
    job = _Background(lambda: b.fetch("early", out).wait(5))
    _until_waiting(b, "early")
    want = torch.randn(4, 6)
    a.flush("early", want).wait()
    job.result()
    assert torch.equal(out, want)
    assert b.describe("early").shape == (4, 6)
    assert not b.contains("early")  # delivered, not kept
    with pytest.raises(ChunkNotFound, match="delivered straight into an earlier fetch"):
        b.fetch("early", torch.empty(4, 6))
    assert ("recv", 24 * 4) in comms[1].calls


def test_fetch_many_registers_every_out_before_waiting(fake, seed):
    a, b, _ = fake
    outs = {f"k{i}": torch.full((3, 5), -1.0) for i in range(4)}
    job = _Background(lambda: b.fetch_many(list(outs.items())).wait(5))
    _until_waiting(b, "k3")
    want = {k: torch.randn(3, 5) for k in outs}
    for k in reversed(list(want)):
        a.flush(k, want[k])
    job.result()
    assert all(torch.equal(outs[k], want[k]) for k in outs)
    assert not any(b.contains(k) for k in outs)


def test_waiting_fetch_with_wrong_out_fails_and_chunk_is_kept(fake, seed):
    a, b, _ = fake
    out = torch.full((3, 3), 5.0)
    job = _Background(lambda: b.fetch("k", out))
    _until_waiting(b, "k")
    a.flush("k", torch.ones(2, 2)).wait()
    with pytest.raises(LayoutError, match=r"expected \[2, 2\], got \[3, 3\]"):
        job.result()
    assert torch.equal(out, torch.full((3, 3), 5.0))
    assert torch.equal(b.fetch_new("k"), torch.ones(2, 2))  # the bytes were received ahead


def test_second_waiting_fetch_of_a_key_is_refused(fake):
    a, b, _ = fake
    job = _Background(lambda: b.fetch("k", torch.empty(2)).wait(5))
    _until_waiting(b, "k")
    with pytest.raises(TransportError, match="already waiting"):
        b.fetch("k", torch.empty(2))
    a.flush("k", torch.ones(2)).wait()
    job.result()


def test_arrived_chunk_with_wrong_out_raises_at_fetch(fake):
    a, b, _ = fake
    a.flush("k", torch.zeros(5)).wait()
    assert b.contains("k")  # the flush handle completes once the receiver acknowledged the chunk
    with pytest.raises(LayoutError, match=r"expected \[5\], got \[4\]"):
        b.fetch("k", torch.empty(4))


def test_missing_key_times_out_and_is_withdrawn():
    a, b, _ = _fake_pair(fetch_timeout_s=0.2)
    try:
        t0 = time.monotonic()
        with pytest.raises(ChunkTimeout, match="within 0.2 s"):
            b.fetch("never", torch.empty(1))
        with pytest.raises(ChunkNotFound):
            b.describe("never")
        assert time.monotonic() - t0 < 5
        assert "never" not in b._endpoint._pending
        a.flush("never", torch.ones(1)).wait()
        assert torch.equal(b.fetch_new("never"), torch.ones(1))
    finally:
        a.close()
        b.close()


def test_roles_are_one_directional(fake):
    a, b, _ = fake
    with pytest.raises(TransportError, match="role='recv'"):
        b.flush("k", torch.zeros(1))
    with pytest.raises(TransportError, match="role='send'"):
        a.fetch("k", torch.zeros(1))
    with pytest.raises(TransportError, match="role='send'"):
        a.keys()


def test_peer_close_ends_waiting_and_later_fetches(fake):
    a, b, _ = fake
    a.flush("last", torch.ones(3)).wait()
    job = _Background(lambda: b.fetch("other", torch.empty(3)))
    _until_waiting(b, "other")
    a.close()
    with pytest.raises(ChunkTimeout, match="closed without sending 'other'"):
        job.result()
    with pytest.raises(ChunkTimeout, match="closed without sending 'x'"):
        b.fetch("x", torch.empty(1))
    assert torch.equal(b.fetch_new("last"), torch.ones(3))
    a.close()


def test_silent_peer_is_declared_dead_and_the_communicator_aborted(seed):
    a, b, comms = _fake_pair()
    try:
        a.flush("k", torch.ones(2)).wait()
        job = _Background(lambda: b.fetch("never", torch.empty(2)))
        _until_waiting(b, "never")
        a._endpoint._live.stop()  # the sender goes silent: no heartbeats, no close
        t0 = time.monotonic()
        with pytest.raises(PeerError, match="no heartbeat"):
            job.result(timeout=30)
        assert time.monotonic() - t0 < 10
        assert comms[1].aborted.is_set()
        with pytest.raises(PeerError):
            b.fetch("k", torch.empty(2))
    finally:
        a.close()
        b.close()


def test_construction_errors():
    with pytest.raises(ConfigError, match="role must be"):
        NcclTransport(dist.HashStore(), 0, 1, role="both", device="cpu", comm=object())
    with pytest.raises(ConfigError, match="rank and peer must differ"):
        NcclTransport(dist.HashStore(), 1, 1, role="send", device="cpu", comm=object())
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        NcclTransport(dist.HashStore(), 0, 1, role="send", device="cpu")


def test_header_bursts_are_coalesced(fake, seed):
    """Headers that queue up while a store write is in flight go out together in the next write."""
    a, b, _ = fake
    sets, entered, gate = [], threading.Event(), threading.Event()
    real = a._endpoint._store

    def gated_set(k, v):
        sets.append(k)
        if len(sets) == 1:
            entered.set()
            gate.wait(10)
        real.set(k, v)

    a._endpoint._store = types.SimpleNamespace(set=gated_set, **{n: getattr(real, n) for n in ("check", "get", "add")})
    chunks = [torch.full((3,), float(i)) for i in range(6)]
    a.flush("k0", chunks[0])
    assert entered.wait(10)
    handles = [a.flush(f"k{i}", chunks[i]) for i in range(1, 6)]
    gate.set()
    for i in range(6):
        assert torch.equal(b.fetch_new(f"k{i}"), chunks[i])
    for h in handles:
        h.wait()
    assert [k for k in sets if k.startswith("hdr/")] == ["hdr/1", "hdr/2"]


class _FakeNccl:
    """Stands in for ``nccl.core`` to test the unique-id exchange without libnccl."""

    class UniqueId:
        @staticmethod
        def from_bytes(b):
            return bytes(b)

    class NCCLConfig:
        def __init__(self, blocking):
            self.blocking = blocking

    def __init__(self):
        self.inits = []
        outer = self

        class Communicator:
            @staticmethod
            def init(n, me, uid, config):
                outer.inits.append((n, me, bytes(uid), config.blocking))
                return FakeComm({}, me)

        self.Communicator = Communicator

    @staticmethod
    def get_unique_id():
        return b"U" * 128


def _init_both(monkeypatch, **kw):
    """Both ranks' ``init_comm(**kw)`` against a fake ``nccl.core``; returns (fake, store, communicators)."""
    fake = _FakeNccl()
    monkeypatch.setattr(comm_mod, "load_nccl", lambda: fake)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    store = dist.HashStore()
    got = []
    t = threading.Thread(target=lambda: got.append(init_comm(store, 1, "cpu", 5.0, **kw)))
    t.start()
    got.append(init_comm(store, 0, "cpu", 5.0, **kw))
    t.join()
    return fake, store, got


def test_init_comm_exchanges_the_unique_id_through_the_store(monkeypatch):
    fake, _, _ = _init_both(monkeypatch)
    assert sorted((n, me, uid, blocking) for n, me, uid, blocking in fake.inits) == [
        (2, 0, b"U" * 128, False), (2, 1, b"U" * 128, False)]
    with pytest.raises(PeerError, match="No NCCL unique id from the peer within 0.2 s"):
        init_comm(dist.HashStore(), 1, "cpu", 0.2)


# ------------------------------------------------------------------------------------------------------
# Two GPUs
# ------------------------------------------------------------------------------------------------------
@pytest.mark.gpu2
@pytest.mark.parametrize("blocking_data", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_loopback_round_trip_any_order(dtype, blocking_data):
    t = NcclTransport.loopback((0, 1), timeout_s=60, blocking_data=blocking_data)
    try:
        assert (t.sender._endpoint._data_comm is not t.sender._endpoint._comm) == blocking_data
        g = torch.Generator(device="cuda:0").manual_seed(3)
        chunks = {f"s/seg000000/layer{l:04d}": torch.randn(1, 2, 2, 8, 129, 128, device="cuda:0", generator=g).to(dtype)
                  for l in range(4)}
        early = torch.full((1, 2, 2, 8, 129, 128), 7, dtype=dtype, device="cuda:1")
        pending = _Background(lambda: t.fetch("s/seg000000/layer0003", early).wait())  # straight into early
        _until_waiting(t.receiver, "s/seg000000/layer0003")
        handles = [t.flush(k, v) for k, v in chunks.items()]
        t.flush("s/manifest", torch.arange(100, dtype=torch.uint8, device="cuda:0"))
        assert torch.equal(t.fetch_new("s/manifest", "cuda:1").cpu(), torch.arange(100, dtype=torch.uint8))
        pending.result(60)
        assert torch.equal(early.cpu(), chunks["s/seg000000/layer0003"].cpu())
        assert not t.contains("s/seg000000/layer0003")
        for k in ("s/seg000000/layer0002", "s/seg000000/layer0000", "s/seg000000/layer0001"):
            out = torch.full_like(chunks[k], 7, device="cuda:1")
            t.fetch(k, out).wait()
            assert torch.equal(out.cpu(), chunks[k].cpu())
        for h in handles:
            h.wait()
        cpu_out = torch.empty(chunks["s/seg000000/layer0000"].shape, dtype=dtype)
        t.fetch("s/seg000000/layer0000", cpu_out).wait()
        assert torch.equal(cpu_out, chunks["s/seg000000/layer0000"].cpu())
    finally:
        t.close()


GPU_PEER = textwrap.dedent("""
    import sys, time, torch
    from kvstream.transports.nccl import NcclTransport
    from kvstream.transports.peer import rendezvous_store
    port = int(sys.argv[1])
    torch.cuda.set_device(1)
    t = NcclTransport(rendezvous_store("127.0.0.1", port, is_server=False), 1, 0, role="send", device="cuda:1",
                      timeout_s=60, heartbeat_s=0.1, dead_after_s=2.0)
    g = torch.Generator(device="cuda:1").manual_seed(9)
    for i in range(3):
        t.flush(f"k{i}", torch.randn(1 << 20, device="cuda:1", generator=g)).wait()
    print("sent", flush=True)
    time.sleep(600)
""")


@pytest.mark.gpu2
def test_gpu_killed_peer_fails_fast_and_aborts():
    server = rendezvous_store("127.0.0.1", 0, is_server=True, timeout_s=60)
    proc = subprocess.Popen([sys.executable, "-c", GPU_PEER, str(server.port)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        torch.cuda.set_device(0)
        t = NcclTransport(rendezvous_store("127.0.0.1", server.port, is_server=False), 0, 1, role="recv",
                          device="cuda:0", timeout_s=60, heartbeat_s=0.1, dead_after_s=2.0)
        g = torch.Generator(device="cuda:0").manual_seed(9)
        want = [torch.randn(1 << 20, device="cuda:0", generator=g) for _ in range(3)]
        for i in (2, 0, 1):
            assert torch.equal(t.fetch_new(f"k{i}", "cuda:0"), want[i])
        assert proc.stdout.readline().strip() == "sent"
        pending = _Background(lambda: t.fetch("k9", torch.empty(1 << 20, device="cuda:0")))
        _until_waiting(t, "k9")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        t0 = time.monotonic()
        with pytest.raises(PeerError):
            pending.result(60)
        assert time.monotonic() - t0 < 15
        t.close()
    finally:
        proc.kill()


class _CountingStore:
    """Forwards to a store and counts its round trips (heartbeats aside); each one takes ``delay_s``, as over TCP."""

    OPS = ("set", "get", "add", "check", "wait", "delete_key", "compare_set", "multi_get", "multi_set", "append")

    def __init__(self, inner, counts, delay_s):
        self._inner, self._counts, self._delay_s = inner, counts, delay_s

    def clone(self):
        return _CountingStore(self._inner.clone(), self._counts, self._delay_s)

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in self.OPS:
            return attr

        def counted(*args, **kwargs):
            key = args[0] if args and isinstance(args[0], str) else ""
            if not key.startswith("hb/"):
                self._counts.append((name, key))
                time.sleep(self._delay_s)
            return attr(*args, **kwargs)

        return counted


class _SlowLaunchComm(FakeComm):
    """A FakeComm whose every send/recv launch costs ``launch_s`` of host time, as NCCL's does."""

    launch_s = 200e-6

    def send(self, buf, peer, *, stream=None):
        time.sleep(self.launch_s)
        super().send(buf, peer, stream=stream)


def test_back_to_back_flushes_cost_amortized_store_round_trips(monkeypatch, seed):
    """Chunks flushed back to back and fetched in flush order: header publication is batched to the receiver's
    pace, so the steady state costs a fraction of one store round trip per chunk (not several)."""
    counts = []
    real_prefix = dist.PrefixStore
    monkeypatch.setattr(dist, "PrefixStore", lambda p, s: _CountingStore(real_prefix(p, s), counts, 1e-3))
    links = {(0, 1): queue.Queue(), (1, 0): queue.Queue()}
    store = dist.HashStore()
    a = NcclTransport(store, 0, 1, role="send", device="cpu", comm=_SlowLaunchComm(links, 0), **FAST)
    b = NcclTransport(store, 1, 0, role="recv", device="cpu", comm=FakeComm(links, 1), **FAST)
    try:
        n = 96
        chunks = [torch.full((2, 3), float(i)) for i in range(n)]
        outs = [torch.full((2, 3), -1.0) for _ in range(n)]
        job = _Background(lambda: b.fetch_many([(f"k{i:03d}", outs[i]) for i in range(n)]).wait(30))
        _until_waiting(b, f"k{n - 1:03d}")
        counts.clear()
        handles = [a.flush(f"k{i:03d}", c) for i, c in enumerate(chunks)]
        job.result(60)
        for h in handles:
            h.wait()
        trips = len(counts)
        print(f"store round trips per chunk: {trips / n:.2f} ({trips} for {n} chunks)")
        assert all(torch.equal(o, c) for o, c in zip(outs, chunks))
        batches = sum(1 for op, k in counts if op == "set" and k.startswith("hdr/"))
        # before batching to the receiver's pace: 1.6 round trips a chunk in ~30 batches; now ~0.7 in ~9
        assert trips / n <= 1.0 and batches <= n / 4, (batches, collections.Counter(op for op, _ in counts))
    finally:
        a.close()
        b.close()


def test_settle_spins_without_sleeping_while_a_launch_is_in_progress(monkeypatch):
    """A non-blocking launch reports ncclInProgress for tens of microseconds: settle spins, it does not sleep."""
    answers = [comm_mod.NCCL_IN_PROGRESS] * 3 + [comm_mod.NCCL_SUCCESS]
    comm = types.SimpleNamespace(get_async_error=lambda: answers.pop(0))
    monkeypatch.setattr(comm_mod, "poll", lambda *a: pytest.fail("settle fell back to sleeping polls"))
    comm_mod.settle(comm, time.monotonic() + 5, lambda: None, "send")
    assert answers == []


def test_receives_of_a_header_batch_are_one_launch(fake, monkeypatch, seed):
    """Every receive of one header batch is posted by one NCCL call (a group on the GPU), then settled once."""
    a, b, comms = fake
    launches = []
    real = endpoint_mod.settle
    monkeypatch.setattr(endpoint_mod, "settle", lambda comm, *r: (launches.append(comm), real(comm, *r))[1])
    chunks = {f"k{i}": torch.randn(3, 4) for i in range(5)}
    raw = b"".join(chunk_mod.encode_frame(k, i + 1, a._endpoint._encode_header(c, None, None))
                   for i, (k, c) in enumerate(chunks.items()))
    frames = chunk_mod.decode_frames(raw, "test")
    for k, c in chunks.items():
        comms[0].links[(0, 1)].put(chunk_mod.byte_view(c).clone())
    b._endpoint._receive_batch(frames)
    assert launches == [comms[1]]
    assert [n for op, n in comms[1].calls if op == "recv"] == [48] * 5
    assert all(torch.equal(b.fetch_new(k), c) for k, c in chunks.items())


# ------------------------------------------------------------------------------------------------------
# Two communicators: non-blocking setup, blocking data path (blocking_data=True)
# ------------------------------------------------------------------------------------------------------
class CountingComm(FakeComm):
    """A FakeComm that counts ``get_async_error`` calls (settle's polls)."""

    def __init__(self, links, me):
        super().__init__(links, me)
        self.polls = 0

    def get_async_error(self):
        self.polls += 1
        return 0


def _two_comm_pair(**kw):
    """Endpoints whose setup communicators (``comm``) and data communicators (``data_comm``) are separate fakes."""
    setup_links = {(0, 1): queue.Queue(), (1, 0): queue.Queue()}
    data_links = {(0, 1): queue.Queue(), (1, 0): queue.Queue()}
    store = dist.HashStore()
    setup = FakeComm(setup_links, 0), FakeComm(setup_links, 1)
    data = CountingComm(data_links, 0), CountingComm(data_links, 1)
    opts = dict(FAST, **kw)
    a = NcclTransport(store, 0, 1, role="send", device="cpu", comm=setup[0], data_comm=data[0], **opts)
    b = NcclTransport(store, 1, 0, role="recv", device="cpu", comm=setup[1], data_comm=data[1], **opts)
    return a, b, setup, data


def test_data_goes_through_the_data_communicator_after_a_warm_up(seed):
    a, b, setup, data = _two_comm_pair()
    try:
        assert a.blocking_data and b.blocking_data
        assert data[0].calls == [("send", 1)] and data[1].calls == [("recv", 1)]  # the warm-up, in the constructor
        chunks = {f"k{i}": torch.randn(3, 5) for i in range(3)}
        for k, c in chunks.items():
            a.flush(k, c).wait()
        for k, c in chunks.items():
            out = torch.full_like(c, -7.0)
            b.fetch(k, out).wait()
            assert torch.equal(out, c)
        assert setup[0].calls == [] and setup[1].calls == []  # the setup communicators carry no data
        assert data[0].calls == [("send", 1)] + [("send", 60)] * 3
        assert [n for op, n in data[1].calls] == [1, 60, 60, 60]
        # settle checks the blocking communicator once a call: no spinning on it
        assert data[0].polls == 1 + 3
    finally:
        a.close()
        b.close()


def test_dead_peer_aborts_both_communicators(seed):
    a, b, setup, data = _two_comm_pair()
    try:
        a.flush("k", torch.ones(2)).wait()
        job = _Background(lambda: b.fetch("never", torch.empty(2)))
        _until_waiting(b, "never")
        a._endpoint._live.stop()  # the sender goes silent
        with pytest.raises(PeerError, match="no heartbeat"):
            job.result(timeout=30)
        assert setup[1].aborted.is_set() and data[1].aborted.is_set()
        with pytest.raises(PeerError):
            b.fetch("k", torch.empty(2))
    finally:
        a.close()
        b.close()
    assert setup[0].aborted.is_set() and data[0].aborted.is_set()  # close aborts both too


def test_warm_up_with_an_absent_peer_is_bounded_and_aborts_both():
    links = {(0, 1): queue.Queue(), (1, 0): queue.Queue()}
    setup, data = FakeComm(links, 1), FakeComm({(0, 1): queue.Queue()}, 1)
    t0 = time.monotonic()
    with pytest.raises(PeerError):  # the peer never sends the warm-up chunk
        NcclTransport(dist.HashStore(), 1, 0, role="recv", device="cpu", comm=setup, data_comm=data,
                      timeout_s=0.3, heartbeat_s=0.05, dead_after_s=1.0)
    assert time.monotonic() - t0 < 5
    assert setup.aborted.is_set() and data.aborted.is_set()


class _StuckEvent:
    """A CUDA event stand-in that never fires; synchronize() would hang on a real hung kernel."""

    def query(self):
        return False

    def synchronize(self):
        pytest.fail("an unbounded synchronize() on an NCCL operation's event")


def test_handle_waits_are_bounded_and_fail_the_link(seed):
    a, b, setup, data = _two_comm_pair(timeout_s=0.3)
    try:
        handle = endpoint_mod.OpHandle(b._endpoint, _StuckEvent(), "receive of 'k'")
        assert not handle.done()
        with pytest.raises(TimeoutError, match="still running after 0.05 s"):
            handle.wait(0.05)
        assert b.peer_error is None  # an explicit timeout is the caller's business
        t0 = time.monotonic()
        with pytest.raises(PeerError, match="dead or hung"):
            handle.wait()
        assert time.monotonic() - t0 < 5
        assert setup[1].aborted.is_set() and data[1].aborted.is_set()
        assert handle.done()  # a failed link ends every wait
    finally:
        a.close()
        b.close()


def test_wait_event_spins_then_polls_until_the_deadline():
    fired = iter([False] * 5 + [True])
    assert comm_mod.wait_event(types.SimpleNamespace(query=lambda: next(fired)), time.monotonic() + 5, lambda: None)
    assert comm_mod.wait_event(None, time.monotonic(), lambda: None)
    assert not comm_mod.wait_event(_StuckEvent(), time.monotonic() + 0.1, lambda: None)


def test_bounded_gives_up_at_the_deadline_and_disposes_of_a_late_result():
    release, disposed = threading.Event(), []
    late = object()

    def stuck():
        release.wait(10)
        return late

    t0 = time.monotonic()
    with pytest.raises(PeerError, match="blocking communicator setup still running at its deadline"):
        comm_mod.bounded(stuck, time.monotonic() + 0.1, lambda: None, "blocking communicator setup",
                         on_late=disposed.append)
    assert time.monotonic() - t0 < 5
    release.set()
    deadline = time.monotonic() + 10
    while not disposed:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert disposed == [late]
    assert comm_mod.bounded(lambda: 5, time.monotonic() + 5, lambda: None, "x") == 5
    with pytest.raises(PeerError, match="NCCL x failed: boom"):
        comm_mod.bounded(lambda: (_ for _ in ()).throw(RuntimeError("boom")), time.monotonic() + 5, lambda: None, "x")


def test_init_comm_blocking_uses_its_own_unique_id(monkeypatch):
    fake, store, got = _init_both(monkeypatch, blocking=True, uid_key="uid_data")
    assert len(got) == 2 and store.check(["uid_data"]) and not store.check(["uid"])
    assert sorted(fake.inits) == [(2, 0, b"U" * 128, True), (2, 1, b"U" * 128, True)]


def test_blocking_data_false_keeps_one_communicator(fake, seed):
    a, b, comms = fake  # comm without data_comm: the old single-communicator path
    assert not a.blocking_data and a._endpoint._data_comm is a._endpoint._comm
    a.flush("k", torch.ones(4)).wait()
    assert comms[0].calls == [("send", 16)]  # no warm-up


# ------------------------------------------------------------------------------------------------------
# Host cost per chunk: cached header encoding/decoding, binary frames (counts, not times)
# ------------------------------------------------------------------------------------------------------
def test_headers_are_encoded_once_per_shape_and_decoded_once_without_meta(fake, monkeypatch, seed):
    """The sender encodes a header once per (dtype, shape, region, meta); the receiver decodes a header
    without meta once. Every chunk still arrives with its own key, header and bytes."""
    a, b, _ = fake
    encoded, decoded = [], []
    real_header, real_from = sender_mod.chunk_header, receiver_mod.ChunkHeader.from_bytes
    monkeypatch.setattr(sender_mod, "chunk_header", lambda *args: (encoded.append(1), real_header(*args))[1])
    monkeypatch.setattr(receiver_mod.ChunkHeader, "from_bytes",
                        classmethod(lambda cls, raw, **kw: (decoded.append(1), real_from(raw, **kw))[1]))
    region = Region(layers=(0, 2), tokens=(0, 3))
    chunks = {f"k{i}": torch.randn(2, 3) for i in range(8)}
    for k, c in chunks.items():
        a.flush(k, c, region=region).wait()
    a.flush("other-shape", torch.randn(3, 2), region=region).wait()
    a.flush("other-region", torch.randn(2, 3), region=Region(layers=(2, 4), tokens=(0, 3))).wait()
    a.flush("m1", torch.randn(2, 3), meta={"layer": 1}).wait()
    a.flush("m2", torch.randn(2, 3), meta={"layer": 1}).wait()
    assert len(encoded) == 4  # (2, 3)+region, (3, 2), other region, meta {"layer": 1}
    assert len(decoded) == 3 + 2  # meta headers are decoded every time: each chunk gets its own meta dict
    for k, c in chunks.items():
        h = b.describe(k)
        assert (h.shape, h.dtype, h.region, h.meta, h.checksum) == ((2, 3), torch.float32, region, None, "none")
        assert torch.equal(b.fetch_new(k), c)
    assert b.describe("other-region").region == Region(layers=(2, 4), tokens=(0, 3))
    b.describe("m1").meta["layer"] = 99
    assert b.describe("m2").meta == {"layer": 1} and b.describe("m1").meta == {"layer": 99}


@pytest.mark.parametrize("bad, match", [
    (dict(chunk=torch.zeros(2, dtype=torch.complex64)), "Unsupported KV dtype"),
    (dict(region=(0, 2)), "region must be a kvstream.layout.Region"),
    (dict(region=[0, 2]), "region must be a kvstream.layout.Region"),  # unhashable: not cacheable either
    (dict(meta=["not", "a", "dict"]), "meta must be a dict"),
    (dict(meta={"x": object()}), "meta must be JSON-able"),
    (dict(meta={"x": "y" * 5000}), "Chunk header JSON is"),
])
def test_bad_headers_raise_on_every_flush_and_take_no_sequence_number(fake, bad, match, seed):
    """Header errors raise before a sequence number is taken, every time (only good headers are cached),
    and later flushes still complete (their acknowledgements line up)."""
    a, b, _ = fake
    good = torch.randn(2)
    a.flush("before", good).wait()
    args = dict(dict(chunk=good, region=None, meta=None), **bad)
    for _ in range(2):
        with pytest.raises(LayoutError, match=match):
            a.flush("bad", args["chunk"], region=args["region"], meta=args["meta"])
    assert a._endpoint._send_seq == 1
    a.flush("after", good).wait(5)
    assert b.keys() == ["after", "before"] and torch.equal(b.fetch_new("after"), good)


def test_frames_round_trip_any_key_and_reject_truncation():
    header = ChunkHeader.for_tensor(torch.zeros(2, 3), checksum="none").to_bytes().rstrip(b"\x00")
    keys = ["a/b", "séance/层/layer0000", "lone\ud800surrogate", "k" * 5000]
    raw = b"".join(chunk_mod.encode_frame(k, i + 1, header) for i, k in enumerate(keys))
    assert chunk_mod.decode_frames(raw, "t") == [(k, i + 1, header) for i, k in enumerate(keys)]
    assert chunk_mod.decode_frames(b"", "t") == []
    one = chunk_mod.encode_frame("key", 7, header)
    for cut in (1, len(one) - len(header) - 1, len(one) - 1):
        with pytest.raises(CorruptChunkError, match="truncated|bytes are left"):
            chunk_mod.decode_frames(one[:cut], "t")
    too_long = chunk_mod.encode_frame("key", 1, b"{" * (HEADER_BYTES + 1))
    with pytest.raises(CorruptChunkError, match=f"headers are <= {HEADER_BYTES}"):
        chunk_mod.decode_frames(too_long, "t")


def test_corrupt_header_batch_fails_the_link(fake):
    """A batch that does not decode fails the receiver (PeerError to waiting fetches), it is never half-posted."""
    a, b, _ = fake
    job = _Background(lambda: b.fetch("k", torch.empty(2)))
    _until_waiting(b, "k")
    a._endpoint._store.set("hdr/1", chunk_mod.encode_frame("k", 1, b"{not a kvstream header}"))
    with pytest.raises(PeerError, match="malformed header|bad magic"):
        job.result()
    assert isinstance(b.peer_error, PeerError)


def test_fetch_registered_while_receives_are_posted_is_served(fake, monkeypatch, seed):
    """A fetch that registers after the receiver thread took the batch's waiting fetches, but before it
    published the chunks, gets its chunk (it used to wait for fetch_timeout_s)."""
    a, b, comms = fake
    want = torch.randn(3, 4)
    out = torch.full((3, 4), -1.0)
    jobs = []
    real_recv_all = b._endpoint._recv_all

    def recv_all_with_a_late_fetch(bufs, stream):
        jobs.append(_Background(lambda: b.fetch("late", out).wait(5)))
        _until_waiting(b, "late")
        real_recv_all(bufs, stream)

    monkeypatch.setattr(b._endpoint, "_recv_all", recv_all_with_a_late_fetch)
    t0 = time.monotonic()
    a.flush("late", want).wait()
    jobs[0].result(timeout=5)
    assert time.monotonic() - t0 < FAST["timeout_s"] / 2
    assert torch.equal(out, want) and b.contains("late")


def test_settle_returns_after_one_call_on_success_and_raises_nccl_errors():
    calls = []
    comm = types.SimpleNamespace(get_async_error=lambda: (calls.append(1), comm_mod.NCCL_SUCCESS)[1])
    comm_mod.settle(comm, time.monotonic() + 5, lambda: None, "send")
    assert calls == [1]
    bad = types.SimpleNamespace(get_async_error=lambda: 3, get_last_error=lambda: "boom")
    with pytest.raises(PeerError, match="NCCL send failed"):
        comm_mod.settle(bad, time.monotonic() + 5, lambda: None, "send")


class _FailingRecvComm(FakeComm):
    """A communicator whose receive fails (an NCCL error while the receiver thread posts a waiting fetch)."""

    def recv(self, buf, peer, *, stream=None):
        raise RuntimeError("ncclRemoteError: the peer's connection broke")


def test_waiting_fetch_ends_when_its_receive_fails(seed):
    links = {(0, 1): queue.Queue(), (1, 0): queue.Queue()}
    store = dist.HashStore()
    a = NcclTransport(store, 0, 1, role="send", device="cpu", comm=FakeComm(links, 0), **FAST)
    b = NcclTransport(store, 1, 0, role="recv", device="cpu", comm=_FailingRecvComm(links, 1),
                      **dict(FAST, fetch_timeout_s=60.0))
    try:
        job = _Background(lambda: b.fetch("k", torch.empty(4)))
        _until_waiting(b, "k")
        a.flush("k", torch.ones(4))  # the receiver thread takes the waiting fetch, then its receive fails
        t0 = time.monotonic()
        with pytest.raises(PeerError, match="ncclRemoteError"):
            job.result(timeout=5)  # not the 60 s fetch timeout (and then forever)
        assert time.monotonic() - t0 < 5
    finally:
        a.close()
        b.close()
