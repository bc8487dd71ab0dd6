"""The shared RadixStore does not trust its directory: planted index entries, symlinks, stray entries,
foreign or open directories and a damaged index never serve other bytes as KV, unlink other files or crash."""

from __future__ import annotations

import json
import os
import stat
import uuid

import pytest

from kvstream.errors import ConfigError, CorruptChunkError
from kvstream.stores import RadixStore
from store_helpers import HEAD_DIM, HEADS, LAYERS, assert_match_is_prefix_kv, prefix_kv

PER_TOKEN = LAYERS * 2 * HEADS * HEAD_DIM * 4  # bytes of one token's KV (float32)
CAP = 16 * PER_TOKEN


def put(store, ids):
    keys, values = prefix_kv(ids)
    return store.update_kv(ids, keys, values)


@pytest.fixture
def shm(tmp_path):
    return str(tmp_path / "shm")


@pytest.fixture
def name():
    return f"safety-{uuid.uuid4().hex[:8]}"


def _filled(shm, name, ids=(1, 2, 3, 4)):
    """A closed shared store holding ``ids``; returns its directory and its one blob's name."""
    s = RadixStore(capacity_bytes=CAP, shared_name=name, shm_dir=shm)
    put(s, list(ids))
    s.close()
    directory = RadixStore.shared_dir(name, shm)
    with open(os.path.join(directory, "index.json")) as f:
        (blob,) = json.load(f)["blobs"]
    return directory, blob


def _rename_blob(directory, old, new):
    path = os.path.join(directory, "index.json")
    with open(path) as f:
        doc = json.load(f)
    doc["blobs"][new] = doc["blobs"].pop(old)
    for row in doc["nodes"]:
        if row[3] == old:
            row[3] = new
    with open(path, "w") as f:
        json.dump(doc, f)


def _secret(path, nbytes):
    with open(path, "wb") as f:
        f.write(b"A" * nbytes)
    return path


def test_directory_is_private_and_blobs_match_the_store(shm, name):
    directory, blob = _filled(shm, name)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert len(blob) == 32 and int(blob, 16) >= 0
    s = RadixStore(capacity_bytes=CAP, shared_name=name, shm_dir=shm)
    with s.fetch_prefix([1, 2, 3, 4]) as m:  # the mmap path still reads the other process's blob bit for bit
        assert_match_is_prefix_kv(m, [1, 2, 3, 4], 4)
    s.unlink()


def test_planted_traversal_name_is_never_mapped_nor_unlinked(shm, name):
    directory, blob = _filled(shm, name)
    secret = _secret(os.path.join(shm, "secret"), 4 * PER_TOKEN)
    os.mkdir(os.path.join(directory, "blob-"))  # so that "blob-/../../secret" resolves to shm/secret
    _rename_blob(directory, blob, "/../../secret")
    s = RadixStore(capacity_bytes=CAP, shared_name=name, shm_dir=shm)  # the stray directory does not crash it
    assert s.query([1, 2, 3, 4]) == 4  # the index says so ...
    with s.fetch_prefix([1, 2, 3, 4]) as m:
        assert m.matched_tokens == 0  # ... but the planted file is never served as KV
    assert put(s, [9] * 16) == 16  # evicts the planted node
    assert s.query([1, 2, 3, 4]) == 0
    with open(secret, "rb") as f:
        assert f.read() == b"A" * 4 * PER_TOKEN  # eviction did not unlink it
    s.unlink()


def test_symlinked_or_short_blob_stops_the_match(shm, name):
    directory, blob = _filled(shm, name, ids=(1, 2, 3, 4))
    s = RadixStore(capacity_bytes=CAP, shared_name=name, shm_dir=shm)
    put(s, [1, 2, 3, 4, 5, 6])  # a second blob below the first
    blobs = sorted(f for f in os.listdir(directory) if f.startswith("blob-"))
    second = [f for f in blobs if f != f"blob-{blob}"][0]
    s.close()
    secret = _secret(os.path.join(shm, "secret"), 4 * PER_TOKEN)
    path = os.path.join(directory, f"blob-{blob}")
    os.unlink(path)
    os.symlink(secret, path)
    other = RadixStore(capacity_bytes=CAP, shared_name=name, shm_dir=shm)
    with other.fetch_prefix([1, 2, 3, 4, 5, 6]) as m:
        assert m.matched_tokens == 0  # O_NOFOLLOW: the symlink's target is not read
    os.truncate(os.path.join(directory, second), 1)  # a blob shorter than the index says
    os.unlink(path)
    other.close()
    fresh = RadixStore(capacity_bytes=CAP, shared_name=name, shm_dir=shm)
    put(fresh, [7] * 16)  # evicts both (the missing and the short blob) without crashing
    assert fresh.query([1, 2]) == 0
    with open(secret, "rb") as f:
        assert f.read() == b"A" * 4 * PER_TOKEN
    fresh.unlink()


def test_blob_that_is_a_directory_and_stray_entries(shm, name):
    directory, blob = _filled(shm, name)
    os.unlink(os.path.join(directory, f"blob-{blob}"))
    os.mkdir(os.path.join(directory, f"blob-{blob}"))  # named in the index, but a directory
    os.mkdir(os.path.join(directory, f"blob-{uuid.uuid4().hex}"))  # an "orphan" that is a directory
    os.mkdir(os.path.join(directory, "blob-zz"))
    with open(os.path.join(directory, "notes.txt"), "w") as f:
        f.write("stray")
    s = RadixStore(capacity_bytes=CAP, shared_name=name, shm_dir=shm)  # ignores what it does not know
    with s.fetch_prefix([1, 2, 3, 4]) as m:
        assert m.matched_tokens == 0
    assert put(s, [5] * 16) == 16  # evicting the directory "blob" does not crash
    with s.fetch_prefix([5] * 16) as m:
        assert_match_is_prefix_kv(m, [5] * 16, 16)
    assert os.path.exists(os.path.join(directory, "notes.txt")) and os.path.isdir(os.path.join(directory, "blob-zz"))
    s.unlink()


def test_open_foreign_or_symlinked_directory_is_refused(shm, name, tmp_path):
    directory = RadixStore.shared_dir(name, shm)
    os.makedirs(directory)
    os.chmod(directory, 0o777)
    with pytest.raises(ConfigError, match="writable by group or others") as e:
        RadixStore(capacity_bytes=CAP, shared_name=name, shm_dir=shm)
    assert directory in str(e.value) and "chmod 700" in str(e.value)
    os.chmod(directory, 0o700)
    try:
        os.chown(directory, os.geteuid() + 4242, -1)
    except PermissionError:
        pass  # not root: cannot give it away; the check is the same code path as the mode check
    else:
        with pytest.raises(ConfigError, match="belongs to uid"):
            RadixStore(capacity_bytes=CAP, shared_name=name, shm_dir=shm)
    os.rmdir(directory)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.symlink(elsewhere, directory)
    with pytest.raises(ConfigError, match="symlink"):
        RadixStore(capacity_bytes=CAP, shared_name=name, shm_dir=shm)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("text", ['{"format": 1, "capacity_bytes": %d, "nodes": 5}',
                                  "[" * 100000 + "]" * 100000,
                                  "not json"])
def test_damaged_index_is_a_clear_error(shm, name, text):
    directory, _ = _filled(shm, name)
    with open(os.path.join(directory, "index.json"), "w") as f:
        f.write(text % CAP if "%d" in text else text)
    with pytest.raises(CorruptChunkError, match="index.json") as e:
        RadixStore(capacity_bytes=CAP, shared_name=name, shm_dir=shm)
    assert "remove_shared" in str(e.value)
    assert RadixStore.remove_shared(name, shm)


def test_index_slicing_past_its_blob_is_a_clear_error(shm, name):
    directory, _ = _filled(shm, name)
    path = os.path.join(directory, "index.json")
    with open(path) as f:
        doc = json.load(f)
    doc["nodes"][0][4] = 3  # offset 3 of a 4-token blob, 4 tokens long
    with open(path, "w") as f:
        json.dump(doc, f)
    with pytest.raises(CorruptChunkError, match="consistent tree"):
        RadixStore(capacity_bytes=CAP, shared_name=name, shm_dir=shm)
    assert RadixStore.remove_shared(name, shm)


@pytest.mark.parametrize("bad", ["", "a/b", ".hidden", "nul\x00byte", "x" * 300])
def test_bad_shared_names(bad, shm):
    with pytest.raises(ConfigError, match="shared_name"):
        RadixStore(capacity_bytes=CAP, shared_name=bad, shm_dir=shm)
