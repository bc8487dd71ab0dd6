"""DiskTransport never serves a chunk under a key it was not written under, never leaves its root through
a link, refuses sparse forgeries before allocating them, and cleans temp files of killed writers
(issue 13, items 2, 5 and 8). Each test reproduces what the reader before it accepted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import xxhash

from kvstream.chunk import CHUNK_FORMAT, CHUNK_MAGIC, HEADER_BYTES, key_digest
from kvstream.errors import ChunkNotFound, CorruptChunkError, TransportError
from kvstream.transports import DiskTransport


@pytest.fixture
def disk(tmp_path):
    t = DiskTransport(tmp_path / "store")
    yield t
    t.close()


# -- item 2: a chunk file at the wrong path ----------------------------------------------------------------
@pytest.mark.parametrize("how", ["copy", "rename"])
def test_a_chunk_file_moved_to_another_key_is_refused(disk, how):
    disk.flush("s/seg000000/layer0000", torch.full((8,), 1.0)).wait()
    disk.flush("s/seg000000/layer0001", torch.full((8,), 2.0)).wait()
    src, dst = disk.path("s/seg000000/layer0000"), disk.path("s/seg000000/layer0001")
    (shutil.copyfile if how == "copy" else os.replace)(src, dst)
    with pytest.raises(CorruptChunkError, match="another key"):
        disk.describe("s/seg000000/layer0001")
    out = torch.zeros(8)
    with pytest.raises(CorruptChunkError, match="another key"):
        disk.fetch("s/seg000000/layer0001", out).wait()
    assert bool((out == 0).all())  # refused before anything was read


# -- item 8: links inside the root --------------------------------------------------------------------------
def test_a_symlinked_directory_inside_the_root_is_refused(disk, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, disk.root / "evil")
    with pytest.raises(TransportError, match="symbolic link"):
        disk.flush("evil/k", torch.ones(4)).wait()
    assert list(outside.iterdir()) == [] and os.listdir(disk.root / ".tmp") == []  # nothing written anywhere
    # a chunk that sits outside (written there by another transport) is not read through the link
    other = DiskTransport(outside)
    other.flush("k", torch.ones(4)).wait()
    other.close()
    os.symlink(outside, disk.root / "evil2")
    with pytest.raises(TransportError, match="symbolic link"):
        disk.fetch("evil2/k", torch.empty(4))
    with pytest.raises(TransportError, match="symbolic link"):
        disk.describe("evil2/k")
    assert not disk.contains("evil2/k") and disk.keys("evil2/") == []
    with pytest.raises(TransportError, match="symbolic link"):
        disk.delete("evil2/k")
    assert (outside / "k.kvc").exists()  # delete did not unlink through the link


def test_a_symlinked_chunk_file_is_refused(disk):
    disk.flush("a", torch.ones(4)).wait()
    os.symlink(disk.path("a"), disk.path("b"))
    with pytest.raises(TransportError, match="symbolic link"):
        disk.fetch("b", torch.empty(4))
    assert not disk.contains("b")


# -- item 5: a sparse file that declares a large payload -----------------------------------------------------
def test_a_sparse_file_declaring_a_large_payload_is_refused_before_allocation(disk):
    nbytes = 64 << 20
    doc = {"format": CHUNK_FORMAT, "dtype": "uint8", "shape": [nbytes], "axes": None, "nbytes": nbytes,
           "checksum": "xxh3_64:" + "0" * 16, "region": None, "meta": None, "key": key_digest("big")}
    body = json.dumps(doc).encode()
    head = struct.pack("<8sIQ", CHUNK_MAGIC, len(body), xxhash.xxh3_64_intdigest(body)) + body
    path = disk.path("big")
    with open(path, "wb") as f:
        f.write(head + b"\x00" * (HEADER_BYTES - len(head)))
        f.truncate(HEADER_BYTES + nbytes)  # the right size, all of it a hole
    with pytest.raises(CorruptChunkError, match="sparse"):
        disk.describe("big")
    with pytest.raises(CorruptChunkError, match="sparse"):
        disk.fetch_new("big")  # describe() refuses it before fetch_new allocates 64 MiB


# -- item 8: temp files of a writer killed mid-flush ---------------------------------------------------------
_WRITER = """
import os, sys, time, torch
import kvstream.transports.disk as disk
real = disk.write_block
def slow(fd, data, a, b, direct):
    real(fd, data, a, b, direct)
    open(sys.argv[2], "w").close()   # a temp file with data in it exists now
    time.sleep(600)
disk.write_block = slow
t = disk.DiskTransport(sys.argv[1], block_bytes=1 << 16)
t.flush("victim", torch.ones(1 << 20, dtype=torch.uint8)).wait()
"""


def kill_writer_mid_flush(root: Path, marker: Path) -> None:
    """Start a real writer process on ``root``, SIGKILL it while its flush is half written (bounded waits)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the writer died early"
            assert time.monotonic() < deadline, "the writer never started its write"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_temp_files_of_a_sigkilled_writer_are_swept_at_open_and_by_gc(tmp_path):
    from kvstream.stores import ChunkFileStore

    root = tmp_path / "store"
    kill_writer_mid_flush(root, tmp_path / "ready1")
    left = os.listdir(root / ".tmp")
    assert len(left) == 1 and os.path.getsize(root / ".tmp" / left[0]) > 0
    DiskTransport(root, temp_max_age_s=3600).close()  # younger than the bound: maybe a live writer's, kept
    assert os.listdir(root / ".tmp") == left
    time.sleep(1.2)
    DiskTransport(root, temp_max_age_s=1.0).close()  # swept at open
    assert os.listdir(root / ".tmp") == []
    kill_writer_mid_flush(root, tmp_path / "ready2")
    store = ChunkFileStore(root, chunk_tokens=4, temp_max_age_s=1.0)
    try:
        assert len(os.listdir(root / ".tmp")) == 1
        time.sleep(1.2)
        store.gc(ttl_s=3600)  # and by the store's GC
        assert os.listdir(root / ".tmp") == []
    finally:
        store.close()


def test_missing_directories_are_chunk_not_found(disk):
    disk.flush("x", torch.ones(1)).wait()
    with pytest.raises(ChunkNotFound):
        disk.fetch("x/y", torch.empty(1))  # the file x.kvc exists, the directory x does not
    assert not disk.contains("nope/nope")
