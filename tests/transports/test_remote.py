"""RemoteHostTransport: chunks between processes over gloo, in any fetch order; dead peers fail fast."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from kvstream.errors import ChunkNotFound, ConfigError, CorruptChunkError, LayoutError, PeerError, TransportError
from kvstream.layout import Region
from kvstream.transports.peer import ChunkTimeout, rendezvous_store
from kvstream.transports.remote import RemoteHostTransport
from kvstream.chunk import ChunkHeader, decode_frames, encode_frame

FAST = dict(timeout_s=10.0, heartbeat_s=0.1, dead_after_s=1.5)


@pytest.fixture
def pair():
    a, b = RemoteHostTransport.pair(**FAST)
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8])
def test_round_trip_bit_exact_with_header(pair, seed, dtype):
    a, b = pair
    chunk = (torch.randn(2, 2, 1, 3, 5, 7) * 100).to(dtype)
    region = Region(layers=(0, 2), tokens=(0, 5), batch=(0, 1), heads=(0, 3))
    a.flush("req/seg000000/layer0000", chunk, region=region, meta={"step": 3}).wait()
    out = torch.full_like(chunk, 7)
    b.fetch("req/seg000000/layer0000", out).wait()
    assert torch.equal(out, chunk)
    h = b.describe("req/seg000000/layer0000")
    assert (h.dtype, h.shape, h.region, h.meta) == (dtype, tuple(chunk.shape), region, {"step": 3})


def test_fetch_order_differs_from_flush_order_and_both_directions(pair, seed):
    a, b = pair
    chunks = {f"s/seg{i:06d}/layer0000": torch.randn(4, 9) for i in range(6)}
    handles = [a.flush(k, v) for k, v in chunks.items()]
    a.flush("s/manifest", torch.arange(5, dtype=torch.uint8))
    assert torch.equal(b.fetch_new("s/manifest"), torch.arange(5, dtype=torch.uint8))  # flushed last, read first
    for k in reversed(list(chunks)):
        assert torch.equal(b.fetch_new(k), chunks[k])
    for h in handles:
        assert h.done()
    b.flush("reply", torch.ones(3)).wait()
    assert torch.equal(a.fetch_new("reply"), torch.ones(3))
    assert b.keys("s/seg") == sorted(chunks) and a.keys() == ["reply"]
    assert b.delete("s/manifest") and not b.delete("s/manifest") and not b.contains("s/manifest")


def test_concurrent_flushes_from_threads(pair, seed):
    a, b = pair
    data = {f"t{i}/c{j}": torch.randn(50) for i in range(4) for j in range(5)}

    def send(i):
        for j in range(5):
            a.flush(f"t{i}/c{j}", data[f"t{i}/c{j}"]).wait()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, v in data.items():
        assert torch.equal(b.fetch_new(k), v)


def test_replacing_a_key_gives_the_new_chunk(pair):
    a, b = pair
    a.flush("k", torch.zeros(4)).wait()
    a.flush("k", torch.ones(4)).wait()
    deadline = time.monotonic() + 5
    while not torch.equal(b.fetch_new("k"), torch.ones(4)):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_empty_and_scalar_chunks(pair):
    a, b = pair
    a.flush("empty", torch.empty(0, 3)).wait()
    a.flush("scalar", torch.tensor(2.5)).wait()
    assert b.fetch_new("empty").shape == (0, 3)
    assert torch.equal(b.fetch_new("scalar"), torch.tensor(2.5))


def test_bad_out_and_bad_input(pair):
    a, b = pair
    a.flush("k", torch.zeros(2, 3)).wait()
    with pytest.raises(LayoutError, match=r"expected \[2, 3\], got \[3, 2\]"):
        b.fetch("k", torch.empty(3, 2))
    with pytest.raises(LayoutError, match="contiguous"):
        a.flush("x", torch.zeros(4, 4).t())
    with pytest.raises(LayoutError, match="Invalid chunk key"):
        a.flush("/abs", torch.zeros(1))
    with pytest.raises(ConfigError, match="rank and peer must differ"):
        RemoteHostTransport(None, 1, 1)


def test_missing_key_times_out_as_chunk_not_found(pair):
    _, b = pair
    t0 = time.monotonic()
    with pytest.raises(ChunkNotFound, match="did not arrive from peer rank 0 within 0.2 s") as e:
        b.fetch("never", torch.empty(1), timeout=0.2)
    assert isinstance(e.value, PeerError) and isinstance(e.value, KeyError)
    assert time.monotonic() - t0 < 5
    assert not b.contains("never")


def test_peer_close_ends_waits_and_flushes(pair):
    a, b = pair
    a.flush("last", torch.ones(2)).wait()
    a.close()
    with pytest.raises(ChunkTimeout, match="closed without sending 'other'"):
        b.fetch("other", torch.empty(2), timeout=5)
    assert torch.equal(b.fetch_new("last"), torch.ones(2))  # what arrived stays readable
    with pytest.raises(PeerError, match="closed"):
        b.flush("x", torch.ones(1))
    with pytest.raises(TransportError, match="closed"):
        a.keys()
    a.close()  # idempotent


class _FlipOneByte:
    """A gloo group proxy that corrupts the first payload byte on the wire."""

    def __init__(self, group):
        self.group = group

    def send(self, tensors, peer, tag):
        bad = tensors[0].clone()
        bad[0] ^= 0xFF
        return self.group.send([bad], peer, tag)


def test_corrupted_payload_raises_corrupt_chunk(pair):
    a, b = pair
    a._group = _FlipOneByte(a._group)
    a.flush("bad", torch.arange(16, dtype=torch.uint8)).wait()
    with pytest.raises(CorruptChunkError, match="'bad' from peer rank 0 failed its checksum"):
        b.fetch("bad", torch.empty(16, dtype=torch.uint8), timeout=5)


def test_wire_header_round_trip():
    """A chunk is announced with one binary frame: seq, key and the unpadded header (the user's meta in it)."""
    h = ChunkHeader.for_tensor(torch.zeros(3), meta={"user": 1})
    [(key, seq, raw)] = decode_frames(encode_frame("a/b", 42, h.to_bytes(pad=False)), "test")
    back = ChunkHeader.from_bytes(raw, source="test", padded=False)
    assert (key, seq, back) == ("a/b", 42, h)


def test_flushed_frame_carries_key_seq_and_user_meta(pair):
    """What RemoteHostTransport writes to the store is one frame that decodes to the chunk's key, seq, header."""
    a, b = pair
    sets, real = [], a._store

    class Recording:
        def set(self, k, v):
            sets.append((k, v))
            real.set(k, v)

        def __getattr__(self, name):
            return getattr(real, name)

    a._store = Recording()
    chunk = torch.arange(6, dtype=torch.float16).view(2, 3)
    a.flush("req/seg000000/layer0000", chunk, meta={"step": 3}).wait()
    [(name, raw)] = [(k, v) for k, v in sets if k.startswith("hdr/")]
    [(key, seq, header_bytes)] = decode_frames(raw, "test")
    header = ChunkHeader.from_bytes(header_bytes, source="test", padded=False)
    assert (name, key, seq) == ("hdr/0/1", "req/seg000000/layer0000", 1)
    assert (header.shape, header.dtype, header.meta) == ((2, 3), torch.float16, {"step": 3})
    assert header == b.describe("req/seg000000/layer0000")


@pytest.mark.parametrize("raw, match", [
    (encode_frame("k", 1, b"{not a kvstream header}"), "header 1 from rank 0: bad magic"),
    (encode_frame("k", 1, b"KVS"), "header 1 from rank 0: truncated header"),
    (encode_frame("k", 1, b"")[:-3], "header 1 from rank 0: truncated frame prefix"),
    (encode_frame("k", 2, ChunkHeader.for_tensor(torch.zeros(1)).to_bytes(pad=False)), "carries sequence number 2"),
    (encode_frame("k", 1, b"x") * 2, "2 frames under hdr/0/1, expected one"),
])
def test_corrupt_header_frame_fails_the_link_and_names_its_source(pair, raw, match):
    """A frame that does not decode is a CorruptChunkError naming the header and the peer; the receiver stops
    and every waiting or later fetch raises PeerError with that reason."""
    a, b = pair
    a._store.set("hdr/0/1", raw)
    with pytest.raises(PeerError, match=match):
        b.fetch("k", torch.empty(1), timeout=5)
    assert isinstance(b.peer_error, PeerError) and match.split(": ")[-1] in str(b.peer_error)


# ------------------------------------------------------------------------------------------------------
# Two processes: a peer in a subprocess, killed with SIGKILL.
# ------------------------------------------------------------------------------------------------------
PEER = textwrap.dedent("""
    import sys, time, torch
    from kvstream.transports.peer import rendezvous_store
    from kvstream.transports.remote import RemoteHostTransport
    port, serve, n = int(sys.argv[1]), sys.argv[2] == "server", int(sys.argv[3])
    store = rendezvous_store("127.0.0.1", port, is_server=serve, timeout_s=20)
    if serve:  # keep the server object alive: the store lives in this process
        server = store
        print("port", server.port, flush=True)
        store = rendezvous_store("127.0.0.1", server.port, is_server=False, timeout_s=20)
    t = RemoteHostTransport(store, 1, 0, timeout_s=20, heartbeat_s=0.1, dead_after_s=1.5)
    g = torch.Generator().manual_seed(5)
    for i in range(n):
        t.flush(f"req/seg{i:06d}/layer0000", torch.randn(1, 2, 1, 2, 33, 8, generator=g)).wait()
    back = t.fetch_new("from-parent")
    t.flush("echo", back * 2).wait()
    print("ready", flush=True)
    time.sleep(600)
""")


def _spawn(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", PEER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)


def _expected(n):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(1, 2, 1, 2, 33, 8, generator=g) for _ in range(n)]


def _exchange_then_kill(proc, t):
    want = _expected(3)
    t.flush("from-parent", torch.arange(6.0)).wait()
    for i in (2, 0, 1):
        assert torch.equal(t.fetch_new(f"req/seg{i:06d}/layer0000"), want[i])
    assert torch.equal(t.fetch_new("echo"), torch.arange(6.0) * 2)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    t0 = time.monotonic()
    with pytest.raises(PeerError) as e:
        t.fetch("req/seg000009/layer0000", torch.empty(1, 2, 1, 2, 33, 8), timeout=60)
    assert time.monotonic() - t0 < 10  # fails fast: far below the 60 s fetch timeout
    assert not isinstance(e.value, ChunkTimeout)
    with pytest.raises(PeerError):
        t.flush("after-death", torch.ones(4)).wait(timeout=20)
    assert torch.equal(t.fetch_new("echo"), torch.arange(6.0) * 2)  # what arrived stays readable
    return str(e.value)


def test_killed_peer_fails_fast_parent_hosts_store():
    server = rendezvous_store("127.0.0.1", 0, is_server=True, timeout_s=20)
    proc = _spawn(server.port, "client", 3)
    try:
        t = RemoteHostTransport(rendezvous_store("127.0.0.1", server.port, is_server=False), 0, 1,
                                timeout_s=20, heartbeat_s=0.1, dead_after_s=1.5)
        message = _exchange_then_kill(proc, t)
        assert "rank 1" in message
        t.close()
    finally:
        proc.kill()


def test_killed_peer_fails_fast_peer_hosts_store():
    proc = _spawn(0, "server", 3)
    try:
        line = proc.stdout.readline().split()
        assert line[0] == "port"
        t = RemoteHostTransport(rendezvous_store("127.0.0.1", int(line[1]), is_server=False), 0, 1,
                                timeout_s=20, heartbeat_s=0.1, dead_after_s=1.5)
        _exchange_then_kill(proc, t)
        t.close()
    finally:
        proc.kill()


def test_concurrent_large_flushes_keep_sequence_order(pair):
    """Threads flushing chunks larger than a socket buffer: sends must go out in sequence-number order,
    or the receiver (taking headers in order) and a blocked send wait on each other."""
    a, b = pair
    data = {(i, j): torch.full((1 << 20,), i * 10 + j, dtype=torch.uint8) for i in range(6) for j in range(4)}
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def work(i):
        try:
            barrier.wait()
            for j in range(4):
                a.flush(f"t{i}/{j}", data[i, j]).wait(timeout=30)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:2]
    assert all(torch.equal(b.fetch_new(f"t{i}/{j}"), v) for (i, j), v in data.items())


# ------------------------------------------------------------------------------------------------------
# A receiver whose connection stays open when it stops: gloo's send would wait its whole timeout (30 s
# here); the heartbeats must end every wait within dead_after_s (1.5 s).
# ------------------------------------------------------------------------------------------------------
SILENT_PEER = textwrap.dedent("""
    import os, sys, time
    from kvstream.transports.peer import rendezvous_store
    from kvstream.transports.remote import RemoteHostTransport
    store = rendezvous_store("127.0.0.1", int(sys.argv[1]), is_server=False, timeout_s=20)
    t = RemoteHostTransport(store, 1, 0, timeout_s=30, heartbeat_s=0.1, dead_after_s=1.5)
    if sys.argv[2] == "kill" and os.fork() == 0:  # a child keeps every socket open, reads nothing
        time.sleep(600)
        os._exit(0)
    print("ready", flush=True)
    time.sleep(600)
""")


def _bounded(fn, limit_s):
    """Run ``fn`` on a thread; (what it raised or None, seconds taken), or fail if it is still running after
    ``limit_s`` (the wait regressed to gloo's timeout: fail, do not hang)."""
    result = {}

    def run():
        t0 = time.monotonic()
        try:
            fn()
            result["error"] = None
        except BaseException as e:  # noqa: BLE001 - returned to the test
            result["error"] = e
        result["s"] = time.monotonic() - t0

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"still waiting after {limit_s} s"
    return result["error"], result["s"]


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_flush_wait_to_a_silent_peer_ends_within_the_heartbeat_deadline(how):
    server = rendezvous_store("127.0.0.1", 0, is_server=True, timeout_s=20)
    proc = subprocess.Popen([sys.executable, "-c", SILENT_PEER, str(server.port), how], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            start_new_session=True)
    try:
        t = RemoteHostTransport(rendezvous_store("127.0.0.1", server.port, is_server=False), 0, 1,
                                timeout_s=30, heartbeat_s=0.1, dead_after_s=1.5)
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        error, took = _bounded(lambda: t.flush("k", torch.ones(16)).wait(), 10)
        assert isinstance(error, PeerError) and took < 8, (error, took)
        assert "rank 1" in str(error)
        error, took = _bounded(lambda: t.fetch("never", torch.empty(4), timeout=60), 5)
        assert isinstance(error, PeerError) and not isinstance(error, ChunkTimeout) and took < 1
        error, took = _bounded(t.close, 5)
        assert error is None and took < 3
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
