"""ChunkFileStore: chunked files by chained hash, atomic and verified; corruption, full disk, GC and pins,
concurrent writers and readers across processes."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from kvstream.errors import CapacityError, ConfigError
from kvstream.chunk import HEADER_BYTES, ChunkHeader
from kvstream.stores import ChunkFileStore, PinError
from kvstream.stores.chunk_file import PINS_DIR
from store_helpers import assert_match_is_prefix_kv, prefix_kv

C = 4  # tokens per chunk
IDS = list(range(100, 118))  # 18 tokens: 4 full chunks and a partial one


def put(store, ids, start=0, **kw):
    keys, values = prefix_kv(ids)
    return store.update_kv(ids, [k[:, :, start:] for k in keys], [v[:, :, start:] for v in values], start=start, **kw)


def load(store, ids, **kw):
    with store.fetch_prefix(ids, **kw) as m:
        assert_match_is_prefix_kv(m, ids, m.matched_tokens)
        return m.matched_tokens


@pytest.fixture
def store(tmp_path):
    s = ChunkFileStore(tmp_path / "kv", chunk_tokens=C)
    yield s
    s.close()


def chunk_files(root):
    return sorted(p for p in root.rglob("*.kvc") if ".tmp" not in p.parts)


def test_round_trip_and_partial_chunk(store):
    assert put(store, IDS) == 16  # the trailing 2 tokens are not stored
    files = chunk_files(store.root)
    assert len(files) == 4
    for f, key in zip(sorted(files, key=lambda p: store.keys_for(IDS).index(
            "/".join(p.relative_to(store.root).parts)[:-4])), store.keys_for(IDS)):
        assert f.relative_to(store.root).as_posix() == key + ".kvc"
        assert len(f.relative_to(store.root).parts) == 3  # two directory levels
    assert store.query(IDS) == 16 and store.query(IDS[:7]) == 4 and store.query([1] + IDS) == 0
    assert load(store, IDS) == 16
    assert load(store, IDS, max_tokens=13) == 13  # ends inside the fourth chunk
    assert load(store, IDS[:3]) == 0
    assert store.pinned() == 0 and store.pin_counts() == {}
    assert os.listdir(store.root / PINS_DIR) == []
    # the header describes the chunk: its region and its key
    header = ChunkHeader.from_bytes(files[0].read_bytes()[:HEADER_BYTES])
    assert header.shape == (2, 2, 1, 2, C, 4) and header.region.tokens.stop - header.region.tokens.start == C
    assert header.meta["prefix_key"] == files[0].name[:-4]


def test_update_with_a_prefix_and_skip_existing(store):
    assert put(store, IDS[:8]) == 8
    inodes = {p: p.stat().st_ino for p in chunk_files(store.root)}
    assert put(store, IDS, start=8) == 8  # chunks 3 and 4 from KV that starts at token 8
    assert load(store, IDS) == 16
    assert all(p.stat().st_ino == i for p, i in inodes.items())  # existing chunks were not rewritten (renamed over)
    with pytest.raises(ConfigError, match="multiple"):
        put(store, IDS, start=6)


def test_corrupted_chunk_shortens_the_match_and_is_rewritten(store):
    put(store, IDS)
    third = store.path(store.keys_for(IDS)[2])
    raw = bytearray(third.read_bytes())
    raw[HEADER_BYTES + 5] ^= 0x40  # one payload bit
    third.write_bytes(bytes(raw))
    assert store.query(IDS) == 16  # existence only
    assert load(store, IDS) == 8  # the first two chunks, exact; never the corrupt one
    assert not third.exists()  # dropped, so that the next update rewrites it
    put(store, IDS)
    assert load(store, IDS) == 16


@pytest.mark.parametrize("damage", ["truncate", "header", "missing"])
def test_damaged_or_missing_chunk_shortens_the_match(store, damage):
    put(store, IDS)
    second = store.path(store.keys_for(IDS)[1])
    if damage == "truncate":
        second.write_bytes(second.read_bytes()[:HEADER_BYTES + 7])
    elif damage == "header":
        second.write_bytes(b"garbage" + second.read_bytes()[7:])
    else:
        second.unlink()
    assert load(store, IDS) == 4


def test_full_disk_raises_capacity_error_and_leaves_nothing_torn(tmp_path, monkeypatch):
    s = ChunkFileStore(tmp_path / "kv", chunk_tokens=C, io_threads=1)
    real, calls = os.pwrite, [0]

    def pwrite(fd, data, offset):
        calls[0] += 1
        if calls[0] > 2:  # the payload and header of the first chunk fit, then the disk is full
            os.write(fd, bytes(data)[:3])  # a partial write first, as a real full disk may do
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(CapacityError, match="1 of 4 new chunks"):
        put(s, IDS)
    monkeypatch.undo()
    assert s.query(IDS) == 4
    assert load(s, IDS) == 4  # what was stored is complete and verified
    assert os.listdir(s.root / ".tmp") == []  # no temp file left behind
    assert len(chunk_files(s.root)) == 1
    assert put(s, IDS) == 16  # room again: the rest goes in
    assert load(s, IDS) == 16
    s.close()


def test_pins(store):
    put(store, IDS)
    m1 = store.lookup(IDS)
    m2 = store.lookup(IDS[:9])
    keys = store.keys_for(IDS)
    assert store.pinned() == 2
    assert store.pin_counts() == {keys[0]: 2, keys[1]: 2, keys[2]: 1, keys[3]: 1}
    assert len(os.listdir(store.root / PINS_DIR)) == 2
    m1.release()
    with pytest.raises(PinError):
        m1.release()
    assert store.pin_counts() == {keys[0]: 1, keys[1]: 1}
    m2.release()
    assert store.pin_counts() == {} and os.listdir(store.root / PINS_DIR) == []


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_gc_deletes_by_last_access_and_skips_pinned(store):
    put(store, IDS)
    other = [7] * 8
    put(store, other)
    for f in chunk_files(store.root):
        _age(f, 100)
    assert load(store, IDS[:5]) == 4  # a read refreshes the access time of the chunk it read
    with store.lookup(other) as m:  # pinned chunks survive even when old
        assert store.gc(ttl_s=50) == 3  # chunks 2-4 of IDS
        m.load()
        assert_match_is_prefix_kv(m, other, 8)
    assert store.query(IDS) == 4 and store.query(other) == 8
    assert store.gc(ttl_s=50) == 0  # loading the match refreshed its chunks
    for f in chunk_files(store.root):
        _age(f, 100)
    assert store.gc(ttl_s=50) == 3  # unpinned and old now
    assert store.query(other) == 0
    with pytest.raises(ConfigError, match="ttl"):
        store.gc()


def test_gc_honours_other_processes_pins_until_their_lease_ends(store):
    put(store, IDS)
    pin = store.root / PINS_DIR / "otherhost-1234-0000.pin"  # a reader on another host pinned these chunks
    pin.write_text("\n".join(k.rsplit("/", 1)[-1] for k in store.keys_for(IDS)))
    assert store.gc(ttl_s=0) == 0
    _age(pin, store.pin_lease_s + 10)  # ... and died long ago
    leftover = store.root / ".tmp" / "dead-writer.tmp"
    leftover.write_bytes(b"x")
    _age(leftover, 10 * 3600)
    assert store.gc(ttl_s=0) == 4
    assert not pin.exists() and not leftover.exists()


def test_gc_leaves_files_of_other_depths_in_the_root_alone(store):
    from kvstream.transports import DiskTransport

    put(store, IDS)
    other = DiskTransport(store.root)  # files under the same root that are not this store's chunks
    for key in ("stray", "a/b/c/d"):
        other.flush(key, torch.ones(3)).wait()
    assert store.gc(ttl_s=0) == 4  # only the store's chunks, found at its directory depth
    assert other.keys() == ["a/b/c/d", "stray"]
    other.close()


def test_background_gc(tmp_path):
    s = ChunkFileStore(tmp_path / "kv", chunk_tokens=C, ttl_s=0, gc_interval_s=0.05)
    put(s, IDS)
    deadline = time.time() + 10
    while s.query(IDS) and time.time() < deadline:
        time.sleep(0.05)
    assert s.query(IDS) == 0 and s.last_gc_error is None
    s.close()
    s.close()


def test_gc_with_concurrent_readers(tmp_path):
    """Readers pin, then load; a GC with TTL 0 deletes every unpinned chunk all the time; writers put
    chunks back. A match must load in full what its lookup promised, bit for bit."""
    s = ChunkFileStore(tmp_path / "kv", chunk_tokens=C)
    seqs = [IDS, [5] + IDS[1:], [9] * 16]
    for seq in seqs:
        put(s, seq)
    stop, errors, loads = threading.Event(), [], [0]

    def reader(seq):
        try:
            while not stop.is_set():
                with s.lookup(seq) as m:
                    promised = m.matched_tokens
                    time.sleep(0.002)  # the window in which an unpinned chunk would go
                    m.load()
                    assert m.matched_tokens == promised
                    if promised:
                        assert_match_is_prefix_kv(m, seq, promised)
                        loads[0] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def collector():
        while not stop.is_set():
            s.gc(ttl_s=0)

    def writer():
        while not stop.is_set():
            for seq in seqs:
                put(s, seq)

    threads = [threading.Thread(target=reader, args=(q,)) for q in seqs]
    threads += [threading.Thread(target=collector), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert loads[0] > 0
    assert s.pinned() == 0
    s.close()


_WRITER = r"""
import sys
sys.path.insert(0, {helpers!r})
from kvstream.stores import ChunkFileStore
from store_helpers import prefix_kv
s = ChunkFileStore({root!r}, chunk_tokens={c})
ids = {ids!r}
keys, values = prefix_kv(ids)
for _ in range({rounds}):
    assert s.update_kv(ids, keys, values, overwrite=True) == len(ids) // {c} * {c}
    {gc}
s.close()
print("ok")
"""


def test_two_processes_write_the_same_chunks_while_a_third_reads(tmp_path):
    root = tmp_path / "kv"
    ids = list(range(64))
    code = _WRITER.format(helpers=os.path.dirname(__file__), root=str(root), c=C, ids=ids, rounds=60, gc="")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    reader = ChunkFileStore(root, chunk_tokens=C)
    reads = 0
    while any(p.poll() is None for p in procs):
        with reader.fetch_prefix(ids) as m:  # every chunk there is complete and verified
            if m.matched_tokens:
                assert_match_is_prefix_kv(m, ids, m.matched_tokens)
                reads += 1
    for p in procs:
        out, err = p.communicate()
        assert p.returncode == 0 and "ok" in out, err
    assert load(reader, ids) == 64  # nothing was found corrupt and dropped on the way
    assert len(chunk_files(root)) == 16
    assert os.listdir(root / ".tmp") == []
    reader.close()


def test_gc_in_another_process_never_removes_a_pinned_chunk(tmp_path):
    root = tmp_path / "kv"
    ids = list(range(32))
    s = ChunkFileStore(root, chunk_tokens=C)
    put(s, ids)
    gc_code = ("import time; from kvstream.stores import ChunkFileStore\n"
               f"s = ChunkFileStore({str(root)!r}, chunk_tokens={C})\n"
               "end = time.time() + 2.5\n"
               "while time.time() < end:\n    s.gc(ttl_s=0)\n"
               "print('ok')")
    proc = subprocess.Popen([sys.executable, "-c", gc_code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    full = 0
    while proc.poll() is None and time.time() < deadline:
        with s.lookup(ids) as m:
            promised = m.matched_tokens
            m.load()
            assert m.matched_tokens == promised
            if promised:
                assert_match_is_prefix_kv(m, ids, promised)
        if promised == 0:
            put(s, ids)
        else:
            full += 1
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert full > 0


def test_bad_options(tmp_path):
    for kw in (dict(chunk_tokens=0), dict(dir_levels=20), dict(ttl_s=-1), dict(gc_interval_s=1.0),
               dict(pin_lease_s=0)):
        with pytest.raises(ConfigError):
            ChunkFileStore(tmp_path, **({"chunk_tokens": C} | kw))
