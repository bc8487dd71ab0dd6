"""DiskTransport beyond the contract: file format, corruption, a full disk, O_DIRECT, several processes."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing as mp
import os
import threading
import time

import pytest
import torch

from factories import random_chunk, same_bytes
from kvstream.errors import CapacityError, ChunkNotFound, ConfigError, CorruptChunkError, LayoutError, TransportError
from kvstream.chunk import HEADER_BYTES, ChunkHeader, byte_view, payload_checksum
from kvstream.transports import DiskTransport


def _aligned(nbytes: int) -> torch.Tensor:
    """A page-aligned CPU uint8 tensor (what pinned staging gives on a GPU machine)."""
    raw = torch.empty(nbytes + 4096, dtype=torch.uint8)
    off = (-raw.data_ptr()) % 4096
    return raw[off:off + nbytes]


def _tmp_files(t: DiskTransport) -> list[str]:
    return sorted(os.listdir(t.root / ".tmp"))


@pytest.fixture
def disk(tmp_path):
    t = DiskTransport(tmp_path / "store", block_bytes=8192)
    yield t
    t.close()


def test_chunks_after_a_cached_meta_keep_their_own_checksums(disk, seed):
    # the meta's checked copy is cached across flushes; each chunk's checksum and key digest are its own
    meta = {"session": "s", "run": "r", "layer": 0}
    chunks = [random_chunk((1, 2, 1, 2, 3, 8), torch.bfloat16, seed) for _ in range(3)]
    for i, c in enumerate(chunks):
        disk.flush(f"s/l{i}", c, meta=meta).wait()
    for i, c in enumerate(chunks):
        h = disk.describe(f"s/l{i}")
        assert h.checksum == payload_checksum(c) and h.meta == meta
        assert same_bytes(disk.fetch_new(f"s/l{i}"), c)  # fetch verifies the checksum


# -- file format ---------------------------------------------------------------------------------------
def test_file_is_header_frame_then_payload(disk, seed):
    data = random_chunk((2, 2, 1, 4, 9, 7), torch.bfloat16, seed)
    disk.flush("req-42/seg0/layer0003", data, meta={"step": 5}).wait()
    path = disk.root / "req-42" / "seg0" / "layer0003.kvc"
    assert disk.path("req-42/seg0/layer0003") == path
    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + data.numel() * 2
    header = ChunkHeader.from_bytes(raw[:HEADER_BYTES])
    assert header.checksum == payload_checksum(data)
    assert (header.dtype, header.shape, header.meta) == (torch.bfloat16, tuple(data.shape), {"step": 5})
    assert raw[HEADER_BYTES:] == bytes(byte_view(data).numpy())
    assert _tmp_files(disk) == []


@pytest.mark.parametrize("key", [".tmp/x", "a.kvc/b", "a//b", "./a", "a/./b", "a/", "x" * 300, "a\x00b"])
def test_keys_that_cannot_be_files_raise_layout_error(disk, key):
    with pytest.raises(LayoutError, match="Invalid chunk key"):
        disk.flush(key, torch.ones(2))
    assert disk.keys() == []


def test_keys_ignore_temp_and_stray_files(disk):
    disk.flush("a/b", torch.ones(2)).wait()
    (disk.root / ".tmp" / "leftover.tmp").write_bytes(b"torn")
    (disk.root / ".tmp" / "looks-like.kvc").write_bytes(b"torn")
    (disk.root / "notes.txt").write_text("not a chunk")
    (disk.root / "a" / "b.kvc.partial").write_bytes(b"")
    assert disk.keys() == ["a/b"]
    assert disk.keys(".tmp") == [] and disk.keys(".tmp/") == []


@pytest.mark.parametrize("options", [{"io_threads": 0}, {"io_threads": 1.5}, {"block_bytes": 1000},
                                     {"block_bytes": 0}])
def test_bad_options_raise_config_error(tmp_path, options):
    with pytest.raises(ConfigError):
        DiskTransport(tmp_path / "store", **options)


def test_root_that_cannot_be_created_raises_config_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot create"):
        DiskTransport(tmp_path / "file" / "store")


# -- corruption -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("nbytes,block_bytes", [(20_000, 8192), ((3 << 20) + 123, 64 << 10)],
                         ids=["hashed-inline", "hashed-beside-io"])
def test_corrupted_payload_byte_raises_on_fetch(tmp_path, seed, nbytes, block_bytes):
    with DiskTransport(tmp_path / "store", block_bytes=block_bytes) as t:
        data = random_chunk((nbytes,), torch.uint8, seed)
        t.flush("s/k", data).wait()
        assert same_bytes(t.fetch_new("s/k"), data)
        path = t.path("s/k")
        with open(path, "r+b") as f:
            f.seek(HEADER_BYTES + nbytes // 2)
            byte = f.read(1)
            f.seek(HEADER_BYTES + nbytes // 2)
            f.write(bytes([byte[0] ^ 0x01]))
        assert t.describe("s/k").nbytes == nbytes  # describe reads the header only
        with pytest.raises(CorruptChunkError, match=f"'s/k'.*{path}.*checksum"):
            t.fetch("s/k", torch.empty(nbytes, dtype=torch.uint8)).wait()


def test_verify_false_skips_the_checksum(tmp_path, seed):
    with DiskTransport(tmp_path / "store", verify=False) as t:
        data = random_chunk((1000,), torch.uint8, seed)
        t.flush("k", data).wait()
        with open(t.path("k"), "r+b") as f:
            f.seek(HEADER_BYTES)
            f.write(bytes([data[0].item() ^ 0xFF]))
        out = t.fetch_new("k")
        assert out[0].item() == data[0].item() ^ 0xFF and torch.equal(out[1:], data[1:])


@pytest.mark.parametrize("size", [HEADER_BYTES + 500, HEADER_BYTES, 100, 0, HEADER_BYTES + 1000 + 1],
                         ids=["mid-payload", "no-payload", "mid-header", "empty", "too-long"])
def test_wrong_file_size_raises_corrupt_chunk(disk, seed, size):
    data = random_chunk((1000,), torch.uint8, seed)
    disk.flush("k", data).wait()
    os.truncate(disk.path("k"), size)
    out = torch.full((1000,), 7, dtype=torch.uint8)
    with pytest.raises(CorruptChunkError, match="'k'"):
        disk.fetch("k", out).wait()
    with pytest.raises(CorruptChunkError):
        disk.describe("k")
    assert bool((out == 7).all())  # nothing read into out


def test_bad_header_raises_corrupt_chunk(disk):
    disk.flush("magic", torch.ones(4)).wait()
    with open(disk.path("magic"), "r+b") as f:
        f.write(b"NOTKVSTR")
    disk.flush("algo", torch.ones(4)).wait()
    header = ChunkHeader.for_tensor(torch.ones(4), checksum="md5:0123")
    with open(disk.path("algo"), "r+b") as f:
        f.write(header.to_bytes())
    for key, match in (("magic", "bad magic"), ("algo", "unknown checksum")):
        with pytest.raises(CorruptChunkError, match=match):
            disk.fetch(key, torch.empty(4))


# -- a full disk -----------------------------------------------------------------------------------------
def _fail_on_call(monkeypatch, name: str, n: int, err: int, partial: bool) -> None:
    """Make ``os.<name>`` fail with ``err`` from its ``n``-th call on, as a disk that filled up (the
    first failing call writes part of its data first)."""
    real = getattr(os, name)
    calls = []

    def fake(fd, *args):
        calls.append(1)
        if len(calls) >= n:
            if partial and len(calls) == n:
                real(fd, args[0][:100], *args[1:])
            raise OSError(err, os.strerror(err))
        return real(fd, *args)

    monkeypatch.setattr(os, name, fake)


@pytest.mark.parametrize("err,exc", [(errno.ENOSPC, CapacityError), (errno.EDQUOT, CapacityError),
                                     (errno.EIO, TransportError)], ids=["ENOSPC", "EDQUOT", "EIO"])
@pytest.mark.parametrize("call", [2, 4], ids=["second-block", "header"])
def test_write_error_leaves_the_old_version_and_no_temp(disk, seed, monkeypatch, err, exc, call):
    old = random_chunk((20_000,), torch.uint8, seed)  # 3 blocks of 8192, then the header: 4 pwrites
    disk.flush("s/k", old).wait()
    new = random_chunk((20_000,), torch.uint8, seed)
    _fail_on_call(monkeypatch, "pwrite", call, err, partial=True)
    with pytest.raises(exc, match=r"'s/k'.*nothing was stored") as info:
        disk.flush("s/k", new).wait()
    with pytest.raises(exc):
        disk.flush("s/fresh", new).wait()  # a new key: never becomes visible
    monkeypatch.undo()
    assert (exc is CapacityError) == isinstance(info.value, CapacityError)
    assert info.value.__cause__.errno == err
    assert _tmp_files(disk) == []
    assert same_bytes(disk.fetch_new("s/k"), old)
    assert disk.keys() == ["s/k"] and not disk.contains("s/fresh")


def test_full_disk_at_fsync_raises_capacity_error(tmp_path, seed, monkeypatch):
    with DiskTransport(tmp_path / "store", fsync=True) as t:
        old = random_chunk((5000,), torch.uint8, seed)
        t.flush("k", old).wait()
        _fail_on_call(monkeypatch, "fsync", 1, errno.ENOSPC, partial=False)
        with pytest.raises(CapacityError, match="Disk full"):
            t.flush("k", random_chunk((5000,), torch.uint8, seed)).wait()
        monkeypatch.undo()
        assert _tmp_files(t) == []
        assert same_bytes(t.fetch_new("k"), old)


# -- O_DIRECT ------------------------------------------------------------------------------------------------
def _spy_open_flags(monkeypatch) -> list[int]:
    real, flags = os.open, []

    def spy(path, fl, *args, **kw):
        flags.append(fl)
        return real(path, fl, *args, **kw)

    monkeypatch.setattr(os, "open", spy)
    return flags


@pytest.mark.parametrize("nbytes", [3 * 4096, 3 * 4096 + 5, 5, 70_003, 0])
def test_direct_io_round_trip(tmp_path, seed, monkeypatch, nbytes):
    with DiskTransport(tmp_path / "store", block_bytes=8192, direct=True) as t:
        data = _aligned(nbytes)
        data.copy_(random_chunk((nbytes,), torch.uint8, seed))
        flags = _spy_open_flags(monkeypatch)
        t.flush("k", data).wait()
        monkeypatch.undo()
        assert bool(flags[-1] & os.O_DIRECT) == (nbytes > 0)  # the temp file's open
        assert os.path.getsize(t.path("k")) == HEADER_BYTES + nbytes  # the padded tail is cut off
        for out in (_aligned(nbytes), torch.empty(nbytes + 1, dtype=torch.uint8)[1:]):  # direct and buffered
            out.fill_(0xA5)
            t.fetch("k", out).wait()
            assert same_bytes(out, data)
        unaligned = torch.empty(nbytes + 1, dtype=torch.uint8)[1:]
        unaligned.copy_(data)
        t.flush("k2", unaligned).wait()  # takes the buffered path
        assert same_bytes(t.fetch_new("k2"), data)


def test_direct_io_read_switches_the_descriptor(tmp_path, seed, monkeypatch):
    with DiskTransport(tmp_path / "store", block_bytes=8192, direct=True) as t:
        data = random_chunk((50_000,), torch.uint8, seed)
        t.flush("k", data).wait()
        real, set_flags = fcntl.fcntl, []

        def spy(fd, cmd, *args):
            if cmd == fcntl.F_SETFL:
                set_flags.append(args[0])
            return real(fd, cmd, *args)

        monkeypatch.setattr(fcntl, "fcntl", spy)
        out = _aligned(50_000)
        t.fetch("k", out).wait()
        assert set_flags and set_flags[0] & os.O_DIRECT
        assert same_bytes(out, data)


# -- versions, threads, processes -------------------------------------------------------------------------
def test_fetch_reads_the_version_it_opened(disk, seed, monkeypatch):
    old, new = random_chunk((30_000,), torch.uint8, seed), random_chunk((30_000,), torch.uint8, seed)
    disk.flush("k", old).wait()
    gate, real = threading.Event(), os.preadv

    def slow(fd, bufs, offset):
        gate.wait(30)
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", slow)
    out = torch.zeros(30_000, dtype=torch.uint8)
    handle = disk.fetch("k", out)
    disk.delete("k")
    disk.flush("k", new).wait()  # writes do not read: not held by the gate
    gate.set()
    handle.wait(timeout=60)
    assert same_bytes(out, old)
    monkeypatch.undo()
    assert same_bytes(disk.fetch_new("k"), new)


def test_drop_page_cache(disk, seed):
    data = random_chunk((100_000,), torch.uint8, seed)
    disk.flush("k", data).wait()
    disk.drop_page_cache("k")
    assert same_bytes(disk.fetch_new("k"), data)
    with pytest.raises(ChunkNotFound):
        disk.drop_page_cache("absent")


_SHARED_BYTES = 200_000  # 25 blocks of 8192: a torn file would mix versions


def _writer(root: str, key: str, value: int, rounds: int, ready, start) -> None:
    """Spawned process: write ``key`` ``rounds`` times, every byte ``value``."""
    with DiskTransport(root, block_bytes=8192) as t:
        chunk = torch.full((_SHARED_BYTES,), value, dtype=torch.uint8)
        ready.put(value)
        start.wait(60)
        for _ in range(rounds):
            t.flush(key, chunk).wait()


def test_two_processes_writing_one_key_leave_a_valid_chunk(tmp_path):
    """A spawned process and this one replace the same key concurrently while this one reads it: every
    read is one whole version, and a whole version remains (one child only: importing torch costs ~3 s)."""
    ctx = mp.get_context("spawn")
    ready, start = ctx.Queue(), ctx.Event()
    root = tmp_path / "store"
    child = ctx.Process(target=_writer, args=(str(root), "shared/k", 1, 25, ready, start))
    child.start()
    assert ready.get(timeout=120) == 1
    reads = []
    with DiskTransport(root, block_bytes=8192) as t:
        mine = threading.Thread(target=lambda: [t.flush("shared/k", torch.full((_SHARED_BYTES,), 2, dtype=torch.uint8))
                                                .wait() for _ in range(25)])
        start.set()
        mine.start()
        while child.is_alive() or mine.is_alive():
            try:
                out = t.fetch_new("shared/k")
            except ChunkNotFound:
                time.sleep(0.001)
                continue
            first = int(out[0])
            assert first in (1, 2) and bool((out == first).all()), f"torn chunk: {out.unique().tolist()}"
            reads.append(first)
        child.join(60)
        mine.join(60)
        assert child.exitcode == 0
        final = t.fetch_new("shared/k")
        assert int(final[0]) in (1, 2) and bool((final == final[0]).all())
        assert t.keys() == ["shared/k"] and _tmp_files(t) == []
        assert reads  # the reads overlapped the writes


# -- GPU ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("nbytes", [(3 << 20) + 5, 4096 * 5, 7], ids=["3MiB+5", "5-pages", "7B"])
def test_gpu_round_trip_through_pinned_staging(tmp_path, seed, monkeypatch, direct, nbytes):
    with DiskTransport(tmp_path / "store", block_bytes=64 << 10, direct=direct) as t:
        data = random_chunk((nbytes,), torch.uint8, seed, device="cuda")
        flags = _spy_open_flags(monkeypatch)
        t.flush("k", data).wait()
        monkeypatch.undo()
        assert bool(flags[-1] & os.O_DIRECT) == direct
        with open(t.path("k"), "rb") as f:
            assert ChunkHeader.from_bytes(f.read(HEADER_BYTES)).checksum == payload_checksum(data.cpu())
        out = torch.full((nbytes,), 0xA5, dtype=torch.uint8, device="cuda")
        t.fetch("k", out).wait()
        assert same_bytes(out, data)
