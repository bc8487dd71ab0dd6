"""DiskTransport.entries: the stored chunks with their files and stat results, for housekeeping (a store's GC)."""

from __future__ import annotations

import os

import pytest
import torch

from kvstream.chunk import HEADER_BYTES
from kvstream.errors import TransportError
from kvstream.transports import DiskTransport


@pytest.fixture
def disk(tmp_path):
    t = DiskTransport(tmp_path / "store")
    yield t
    t.close()


def _stored(disk: DiskTransport, keys, numel: int = 6) -> None:
    for key in keys:
        disk.flush(key, torch.ones(numel, dtype=torch.float32)).wait()


def test_entries_name_every_key_with_its_file_and_stat(disk):
    keys = ["a/b", "a/c/d", "e", "req-42/layer0000"]
    _stored(disk, keys)
    found = {key: (path, st) for key, path, st in disk.entries()}
    assert sorted(found) == sorted(keys) == disk.keys()
    for key, (path, st) in found.items():
        assert path == disk.path(key) and path.is_file()
        assert st.st_size == HEADER_BYTES + 6 * 4  # header frame + payload bytes
        assert st.st_mtime == os.stat(path).st_mtime and st.st_ino == os.stat(path).st_ino


@pytest.mark.parametrize("prefix,expected", [
    ("", ["a/b", "a/c/d", "ab/x", "e"]),
    ("a", ["a/b", "a/c/d", "ab/x"]),
    ("a/", ["a/b", "a/c/d"]),
    ("a/c", ["a/c/d"]),
    ("a/c/", ["a/c/d"]),
    ("e", ["e"]),
    ("zz", []),
    ("zz/", []),
])
def test_entries_take_a_prefix_like_keys(disk, prefix, expected):
    _stored(disk, ["a/b", "a/c/d", "ab/x", "e"])
    assert sorted(key for key, _, _ in disk.entries(prefix)) == expected == disk.keys(prefix)


def test_entries_skip_temp_and_stray_files(disk):
    _stored(disk, ["a/b"])
    (disk.root / ".tmp" / "leftover.tmp").write_bytes(b"torn")
    (disk.root / ".tmp" / "looks-like.kvc").write_bytes(b"torn")
    (disk.root / "notes.txt").write_text("not a chunk")
    (disk.root / "a" / "b.kvc.partial").write_bytes(b"")
    assert [key for key, _, _ in disk.entries()] == ["a/b"]
    assert list(disk.entries(".tmp")) == [] and list(disk.entries(".tmp/")) == []


def test_entries_of_an_empty_store_and_of_deleted_keys(disk):
    assert list(disk.entries()) == []
    _stored(disk, ["a/b", "a/c"])
    assert disk.delete("a/b")
    assert [key for key, _, _ in disk.entries()] == ["a/c"]


def test_entries_see_the_modify_time_a_caller_sets(disk):
    _stored(disk, ["old", "new"])
    os.utime(disk.path("old"), (1_000_000, 1_000_000))
    ages = {key: st.st_mtime for key, _, st in disk.entries()}
    assert ages["old"] == 1_000_000 and ages["new"] > 1_000_000


def test_entries_skip_a_file_removed_while_the_walk_runs(disk):
    _stored(disk, [f"d/k{i}" for i in range(4)])
    walk = disk.entries()
    first, _, _ = next(walk)
    for i in range(4):
        if f"d/k{i}" != first:
            disk.delete(f"d/k{i}")
            break
    assert len([first] + [key for key, _, _ in walk]) == 3


def test_entries_of_a_closed_transport_raise(tmp_path):
    t = DiskTransport(tmp_path / "store")
    t.close()
    with pytest.raises(TransportError, match="closed"):
        t.entries()
