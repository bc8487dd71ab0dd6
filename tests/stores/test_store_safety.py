"""Prefix stores never serve wrong KV: a chunk file at another chunk's path, a chunk that does not fit,
another model's KV, a read-only disk (issue 13, items 2, 3, 5 and 9). Each test reproduces what the
stores before it did: served the copied chunk's KV, kept a misfit chunk to fail every later request,
matched another model's prefixes, or raised a bare OSError and left a temp pin behind."""

from __future__ import annotations

import errno
import os
import pathlib
import shutil

import pytest
import torch

from kvstream.errors import LayoutError
from kvstream.models import tiny_config
from kvstream.stores import ChunkFileStore, RadixStore
from kvstream.stores.chunk_file import PINS_DIR
from store_helpers import assert_match_is_prefix_kv, prefix_kv

from test_chunk_file_store import C, IDS, put, store  # noqa: F401  (store: the fixture)

OTHER = list(range(200, 216))


def test_a_chunk_file_copied_over_another_is_refused_and_dropped(store):
    put(store, IDS)
    put(store, OTHER)
    victim = store.path(store.keys_for(IDS)[2])
    shutil.copyfile(store.path(store.keys_for(OTHER)[2]), victim)  # same shape, another sequence's KV
    with store.fetch_prefix(IDS) as m:
        assert_match_is_prefix_kv(m, IDS, 2 * C)  # shortened before the copy; no wrong KV
    assert not victim.exists()  # dropped, so the next update rewrites it
    put(store, IDS)
    with store.fetch_prefix(IDS) as m:
        assert_match_is_prefix_kv(m, IDS, 4 * C)


def test_a_chunk_that_does_not_fit_the_match_is_dropped_not_kept_to_fail_again(store):
    put(store, IDS)
    key = store.keys_for(IDS)[1]
    keys, values = prefix_kv(IDS, heads=3)  # another geometry, written under the right key
    store._transport.flush(key, torch.cat([torch.stack([keys[l][:, :, 4:8], values[l][:, :, 4:8]])
                                           for l in range(2)]).view(2, 2, 1, 3, C, 4)).wait()
    for _ in range(2):  # the second request no longer meets it
        with store.fetch_prefix(IDS) as m:
            assert_match_is_prefix_kv(m, IDS, C)
    assert not store.path(key).exists()


def test_garbage_in_the_first_chunk_is_dropped(store):
    put(store, IDS)
    path = store.path(store.keys_for(IDS)[0])
    path.write_bytes(b"{" * 5000)
    with store.fetch_prefix(IDS) as m:
        assert m.matched_tokens == 0
    assert not path.exists()


def _two_models():
    a, b = tiny_config("llama"), tiny_config("llama")  # the same shape...
    a._name_or_path, b._name_or_path = "org/model-a", "org/model-b"  # ... other models
    return a, b


def test_two_models_of_one_shape_do_not_share_prefixes_by_default(tmp_path):
    a, b = _two_models()
    keys, values = prefix_kv(IDS, layers=4, heads=2, head_dim=16)
    writer = ChunkFileStore(tmp_path / "kv", chunk_tokens=C, config=a)
    writer.update_kv(IDS, keys, values)
    assert ChunkFileStore(tmp_path / "kv", chunk_tokens=C, config=a).query(IDS) == 16
    assert ChunkFileStore(tmp_path / "kv", chunk_tokens=C, config=b).query(IDS) == 0
    explicit = ChunkFileStore(tmp_path / "kv", chunk_tokens=C, namespace="shared", config=b)
    assert explicit.namespace == "shared" and explicit.query(IDS) == 0  # an explicit namespace still works
    radix = RadixStore(capacity_bytes=1 << 20, config=a)
    radix.update_kv(IDS, keys, values)
    with pytest.raises(LayoutError, match="another model"):
        radix.bind_model(b)  # from_prefix / load_prefix_into with model b's config
    unbound = RadixStore(capacity_bytes=1 << 20)
    unbound.bind_model(b)
    assert unbound.fingerprint is not None and unbound.query(IDS) == 0
    adopted = RadixStore(capacity_bytes=1 << 20)
    adopted.update_kv(IDS, keys, values)  # stored before any model was known ...
    adopted.bind_model(a)
    assert adopted.query(IDS) == len(IDS)  # ... kept for the model the store binds to
    with pytest.raises(LayoutError, match="another model"):
        adopted.bind_model(b)
    with pytest.raises(LayoutError, match="config says"):
        unbound.update_kv(IDS, *prefix_kv(IDS, layers=4, heads=3, head_dim=16))  # not model b's geometry


def test_lookups_work_on_a_disk_that_refuses_pin_files(store, monkeypatch):
    put(store, IDS)
    real = pathlib.Path.write_text

    def refuse(self, *args, **kwargs):
        if self.name.startswith("pin-"):
            real(self, "partial")  # a write that fails after creating the temp file
            raise OSError(errno.EROFS, "Read-only file system")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", refuse)
    with store.fetch_prefix(IDS) as m:
        assert_match_is_prefix_kv(m, IDS, 16)
        assert store.pin_counts()  # pinned in this process
    assert store.pin_file_failures == 1 and store.pinned() == 0 and store.pin_counts() == {}
    assert os.listdir(store.root / ".tmp") == [] and os.listdir(store.root / PINS_DIR) == []


def test_a_store_opens_read_only_without_a_pins_directory(tmp_path, monkeypatch):
    s = ChunkFileStore(tmp_path / "kv", chunk_tokens=C)
    put(s, IDS)
    s.close()
    os.rmdir(tmp_path / "kv" / PINS_DIR)
    real = os.makedirs

    def refuse(path, *args, **kwargs):
        if str(path).endswith(PINS_DIR):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", refuse)
    reader = ChunkFileStore(tmp_path / "kv", chunk_tokens=C)
    with reader.fetch_prefix(IDS) as m:
        assert_match_is_prefix_kv(m, IDS, 16)
    assert reader.pin_file_failures >= 1
    reader.close()
