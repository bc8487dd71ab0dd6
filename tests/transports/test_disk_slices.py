"""DiskTransport slices: per-slice checksums written by flush(slices=True), parallel verified fetch_slices."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import xxhash

from factories import random_chunk, same_bytes
from kvstream.chunk import CHECKSUM_PREFIX, HEADER_BYTES, SLICE_CHECKSUMS, ChunkHeader, byte_view, slice_checksums
from kvstream.errors import ConfigError, CorruptChunkError, LayoutError, TransportError
from kvstream.transports import DiskTransport
from kvstream.transports.diskio import O_DIRECT


@pytest.fixture
def disk(tmp_path):
    t = DiskTransport(tmp_path / "store", block_bytes=8192, queue_depth=4)
    yield t
    t.close()


def _header(t: DiskTransport, key: str) -> ChunkHeader:
    with open(t.path(key), "rb") as f:
        return ChunkHeader.from_bytes(f.read(HEADER_BYTES))


def _flip(t: DiskTransport, key: str, payload_offset: int) -> None:
    with open(t.path(key), "r+b") as f:
        f.seek(HEADER_BYTES + payload_offset)
        b = f.read(1)
        f.seek(HEADER_BYTES + payload_offset)
        f.write(bytes([b[0] ^ 0xFF]))


# 3 slices of 10000 bytes: slices cross the 8192-byte blocks; 1 MiB + small: hashed on the hash thread.
@pytest.mark.parametrize("shape", [(3, 2, 5000), (4, 1, (1 << 18) + 7), (1, 3), (5, 0)])
def test_flush_records_one_checksum_per_slice(disk, seed, shape):
    data = random_chunk(shape, torch.float16, seed)
    disk.flush("k", data, meta={"note": 1}, slices=True).wait()
    header = _header(disk, "k")
    assert header.meta["note"] == 1
    sums = slice_checksums(header)
    raw = byte_view(data).numpy()
    size = len(raw) // shape[0]
    assert sums == [CHECKSUM_PREFIX + xxhash.xxh3_64_hexdigest(raw[i * size:(i + 1) * size]) for i in range(shape[0])]
    out = torch.full(shape, -1, dtype=torch.float16)
    handles = disk.fetch_slices("k", out)
    assert len(handles) == shape[0]
    for h in handles:
        h.wait()
    assert same_bytes(out, data)
    disk.fetch("k", torch.empty_like(out)).wait()  # the whole-payload checksum still holds


def test_a_corrupt_slice_fails_only_its_own_handle(disk, seed):
    data = random_chunk((4, 3000), torch.uint8, seed)
    disk.flush("k", data, slices=True).wait()
    _flip(disk, "k", 2 * 3000 + 17)
    out = torch.zeros_like(data)
    handles = disk.fetch_slices("k", out)
    for s in (0, 1, 3):
        handles[s].wait()
        assert torch.equal(out[s], data[s])
    with pytest.raises(CorruptChunkError, match="slice 2 checksum"):
        handles[2].wait()


def test_a_chunk_without_slice_checksums_is_read_and_verified_whole(disk, seed):
    data = random_chunk((3, 4000), torch.uint8, seed)
    disk.flush("k", data).wait()
    assert SLICE_CHECKSUMS not in (_header(disk, "k").meta or {})
    out = torch.zeros_like(data)
    handles = disk.fetch_slices("k", out)
    assert len(handles) == 3 and len({id(h) for h in handles}) == 1
    handles[1].wait()
    assert torch.equal(out, data)
    _flip(disk, "k", 10)
    with pytest.raises(CorruptChunkError, match="payload checksum"):
        disk.fetch_slices("k", out)[2].wait()


def test_malformed_slice_checksums_are_rejected_before_any_read(disk, seed):
    data = random_chunk((2, 64), torch.uint8, seed)
    disk.flush("k", data, slices=True).wait()
    path = disk.path("k")
    raw = bytearray(path.read_bytes())
    header = ChunkHeader.from_bytes(raw[:HEADER_BYTES])
    bad = dataclasses.replace(header, meta={**header.meta, SLICE_CHECKSUMS: "zz" * 16})  # keeps its key digest
    raw[:HEADER_BYTES] = bad.to_bytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptChunkError, match=SLICE_CHECKSUMS):
        disk.fetch_slices("k", torch.empty_like(data))


def test_fetch_slices_checks_out(disk, seed):
    disk.flush("k", random_chunk((2, 64), torch.uint8, seed), slices=True).wait()
    with pytest.raises(LayoutError):
        disk.fetch_slices("k", torch.empty((3, 64), dtype=torch.uint8))
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(LayoutError):
        disk.fetch_slices("k", torch.empty((2, 64), dtype=torch.int8))
    assert len(os.listdir("/proc/self/fd")) == fds  # the file was closed


def test_queue_depth_is_checked(tmp_path):
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ConfigError, match="queue_depth"):
            DiskTransport(tmp_path, queue_depth=bad)


def test_fetch_slices_closes_the_file_after_the_last_read(disk, seed):
    data = random_chunk((8, 4096), torch.uint8, seed)
    disk.flush("k", data, slices=True).wait()
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        for h in disk.fetch_slices("k", torch.empty_like(data)):
            h.wait()
    assert len(os.listdir("/proc/self/fd")) == fds


@pytest.mark.skipif(not O_DIRECT, reason="no O_DIRECT on this platform")
def test_direct_slice_reads(tmp_path, seed):
    try:
        t = DiskTransport(tmp_path / "store", direct=True)
    except ConfigError:
        pytest.skip("the filesystem under the temp directory has no O_DIRECT")
    raw = torch.empty(4 * 8192 + 4096, dtype=torch.uint8)
    out = raw[(-raw.data_ptr()) % 4096:][:4 * 8192].view(4, 8192)  # page-aligned, whole-page slices
    data = random_chunk((4, 8192), torch.uint8, seed)
    t.flush("k", data, slices=True).wait()
    for h in t.fetch_slices("k", out):
        h.wait()
    assert torch.equal(out, data)
    t.close()


def test_fetch_slices_of_many_files_on_the_reader_threads(disk, seed):
    """``submit_read(disk.fetch_slices, ...)``: each file's header is read on a reader thread, its slices queued
    from there; header errors come out of the future with fetch_slices' own type and message."""
    data = [random_chunk((3, 4096), torch.uint8, seed) for _ in range(3)]
    for i, d in enumerate(data):
        disk.flush(f"k{i}", d, slices=True).wait()
    outs = [torch.zeros_like(d) for d in data]
    futures = [disk.submit_read(disk.fetch_slices, f"k{i}", out) for i, out in enumerate(outs)]
    for f in futures:
        for h in f.result():
            h.wait()
    assert all(torch.equal(o, d) for o, d in zip(outs, data))
    with pytest.raises(LayoutError, match="out for chunk 'k0'"):
        disk.submit_read(disk.fetch_slices, "k0", torch.empty((2, 4096), dtype=torch.uint8)).result()
    disk.close()
    with pytest.raises(TransportError, match="closed"):
        disk.submit_read(disk.fetch_slices, "k0", outs[0])
