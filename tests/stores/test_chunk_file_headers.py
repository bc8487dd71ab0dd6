"""ChunkFileStore reads the headers of a match's files in parallel, on the transport's reader threads: a file's
slices are queued without waiting for the headers of the files after it, and a bad header in the middle of a
run still shortens the match (and drops the file) as before, buffered and with O_DIRECT."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

from kvstream.chunk import HEADER_BYTES
from kvstream.errors import ChunkNotFound, ConfigError, CorruptChunkError
from kvstream.stores import ChunkFileStore, chunk_read
from kvstream.transports import slices as slices_mod
from kvstream.transports.diskio import O_DIRECT
from store_helpers import prefix_kv

C = 4
HEAD_DIM = 128  # a layer of a chunk is 2 * 2 heads * 4 tokens * 128 * 4 bytes = 8192: whole pages, for O_DIRECT
IDS = list(range(300, 322))  # 22 tokens: 5 full chunks
OTHER = list(range(400, 420))
#: Deadlock guard of the ordering test (never reached when the headers are read in parallel).
GUARD_S = 30


def _kv(ids):
    return prefix_kv(ids, head_dim=HEAD_DIM)


def _page_aligned_empty(shape, dtype=torch.uint8, **_):
    """A CPU tensor on a page boundary (what pinned staging is on a GPU host), so that O_DIRECT reads engage."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(nbytes + 4096, dtype=torch.uint8)
    return raw[(-raw.data_ptr()) % 4096:][:nbytes].view(dtype).view(shape)


@pytest.fixture(params=[False, True], ids=["buffered", "direct"])
def store(request, tmp_path, monkeypatch):
    direct = request.param
    if direct and not O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    try:
        s = ChunkFileStore(tmp_path / "kv", chunk_tokens=C, queue_depth=3, direct=direct)
    except ConfigError:
        pytest.skip("the filesystem under the temp directory has no O_DIRECT")
    direct_reads = []
    if direct:
        monkeypatch.setattr(chunk_read, "host_empty", _page_aligned_empty)
        real_set_direct = slices_mod.set_direct

        def counting_set_direct(fd):
            direct_reads.append(fd)
            return real_set_direct(fd)

        monkeypatch.setattr(slices_mod, "set_direct", counting_set_direct)
    for ids in (IDS, OTHER):
        keys, values = _kv(ids)
        s.update_kv(ids, keys, values)
    s.direct_reads = direct_reads  # for the tests: files read with O_DIRECT
    yield s
    s.close()


def _load(m, layerwise):
    if layerwise:
        load = m.load_layers()
        return list(load.keys), list(load.values)
    return m.load()


def _assert_kv(got_k, got_v, n):
    keys, values = _kv(IDS[:n])
    for l in range(len(keys)):
        assert torch.equal(got_k[l], keys[l]) and torch.equal(got_v[l], values[l]), f"layer {l}"


def _damage(store, chunk, how):
    path = store.path(store.keys_for(IDS)[chunk])
    if how == "garbage":
        raw = bytearray(path.read_bytes())
        raw[:7] = b"garbage"
        path.write_bytes(bytes(raw))
    elif how == "copied":  # another sequence's chunk under this key: same shape, wrong KV
        shutil.copyfile(store.path(store.keys_for(OTHER)[chunk]), path)
    else:  # truncated inside the header
        path.write_bytes(path.read_bytes()[:HEADER_BYTES // 2])
    return path


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("how", ["garbage", "copied", "truncated"])
def test_a_bad_header_in_the_middle_shortens_the_match_and_drops_the_file(store, layerwise, how):
    bad = _damage(store, 2, how)
    after = [store.path(k) for k in store.keys_for(IDS)[3:5]]
    with store.lookup(IDS) as m:
        assert m.matched_tokens == 20  # the files exist; the reads find the damage
        got_k, got_v = _load(m, layerwise)
        assert m.matched_tokens == 8  # the two chunks before the bad one, exact; never the bad one's KV
        _assert_kv(got_k, got_v, 8)
    assert not bad.exists() and all(p.exists() for p in after)  # only the bad file is dropped
    assert store.query(IDS) == 8 and store.pinned() == 0
    assert (len(store.direct_reads) >= 2) == store._transport._direct  # the files served were read with O_DIRECT
    keys, values = _kv(IDS)
    store.update_kv(IDS, keys, values)  # rewritten; the later files are kept
    with store.lookup(IDS) as m:
        got_k, got_v = _load(m, layerwise)
        assert m.matched_tokens == 20
        _assert_kv(got_k, got_v, 20)


def test_the_bad_header_s_error_and_message_are_fetch_slices_own(store):
    _damage(store, 2, "copied")
    reads = store._reads(store.keys_for(IDS)[:5])
    assert reads.finish() == 2
    assert isinstance(reads.bad[2], CorruptChunkError) and "written under another key" in str(reads.bad[2])
    store._transport.delete(store.keys_for(IDS)[1])
    reads = store._reads(store.keys_for(IDS)[:2])
    assert reads.finish() == 1 and isinstance(reads.bad[1], ChunkNotFound)  # missing: shortened, nothing dropped


def test_file_0_s_slices_are_queued_while_a_later_header_is_still_unread(store, monkeypatch):
    """File 1's header read waits until the last file's reads are queued, which waits until file 0's are: read
    one after another on one thread, the headers could not get past file 1 (the guard would fail the test)."""
    keys = store.keys_for(IDS)
    real = store._transport.fetch_slices
    queued = {k: threading.Event() for k in keys}
    order = []

    def fetch_slices(key, out):
        if key == keys[1]:
            assert queued[keys[-1]].wait(GUARD_S), "the last file's header was not read while file 1's waited"
        elif key == keys[-1]:
            assert queued[keys[0]].wait(GUARD_S), "file 0's slices were not queued before the last header was read"
        handles = real(key, out)
        order.append(key)
        queued[key].set()
        return handles

    monkeypatch.setattr(store._transport, "fetch_slices", fetch_slices)
    for layerwise in (False, True):
        order.clear()
        for e in queued.values():
            e.clear()
        with store.lookup(IDS) as m:
            got_k, got_v = _load(m, layerwise)
            assert m.matched_tokens == 20
            _assert_kv(got_k, got_v, 20)
        assert order.index(keys[0]) < order.index(keys[-1]) < order.index(keys[1])
