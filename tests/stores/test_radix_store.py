"""RadixStore: longest-prefix match, node splitting, LRU eviction with pruning, pins, the shared-memory mode."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import uuid
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstream.errors import ConfigError, LayoutError
from kvstream.stores import PinError, RadixStore
from store_helpers import HEAD_DIM, HEADS, LAYERS, assert_match_is_prefix_kv, prefix_kv

PER_TOKEN = LAYERS * 2 * HEADS * HEAD_DIM * 4  # bytes of one token's KV (float32)


def put(store, ids, start=0):
    keys, values = prefix_kv(ids)
    return store.update_kv(ids, [k[:, :, start:] for k in keys], [v[:, :, start:] for v in values], start=start)


def load(store, ids, **kw):
    with store.fetch_prefix(ids, **kw) as m:
        assert_match_is_prefix_kv(m, ids, m.matched_tokens)
        return m.matched_tokens


def test_insert_split_match():
    s = RadixStore(capacity_bytes=1 << 20)
    assert put(s, [1, 2, 3, 4]) == 4
    assert put(s, [1, 2, 5]) == 3  # diverges inside the first edge: split after [1, 2]
    assert s.edges() == [(1, 2, 3, 4), (1, 2, 5)]
    st_ = s.stats()
    assert st_["nodes"] == 3 and st_["blobs"] == 2 and st_["tokens"] == 5
    assert st_["used_bytes"] == (4 + 1) * PER_TOKEN  # the second update stored only its new token
    assert s.query([1, 2, 3, 4, 9]) == 4 and s.query([1, 2, 5, 4]) == 3 and s.query([1, 7]) == 1
    assert s.query([7]) == 0 and s.query([]) == 0
    assert load(s, [1, 2, 3, 4, 9]) == 4
    assert load(s, [1, 2, 5]) == 3
    assert load(s, [1, 2, 3], max_tokens=2) == 2
    assert load(s, [8, 8]) == 0
    assert s.pinned() == 0 and s.stats()["pins"] == 0


def test_update_after_a_prefix_and_gaps():
    s = RadixStore(capacity_bytes=1 << 20)
    assert put(s, [1, 2, 3, 4, 5, 6], start=2) == 0  # the first 2 tokens are not stored: nothing can attach
    assert put(s, [1, 2]) == 2
    assert put(s, [1, 2, 3, 4, 5, 6], start=2) == 4
    assert load(s, [1, 2, 3, 4, 5, 6]) == 6
    assert put(s, [1, 2, 3]) == 3  # all there already: nothing copied
    assert s.stats()["blobs"] == 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=8),
       st.lists(st.integers(0, 3), max_size=14))
def test_matches_a_brute_force_reference(seqs, probe):
    s = RadixStore(capacity_bytes=1 << 24)
    for seq in seqs:
        assert put(s, seq) == len(seq)

    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    for q in seqs + [probe]:
        want = max(common(q, seq) for seq in seqs)
        assert s.query(q) == want
        assert load(s, q) == want  # and the KV is the prefix's, bit for bit
    leaves = {tuple(x) for x in seqs if not any(len(y) > len(x) and y[:len(x)] == x for y in seqs)}
    assert set(s.edges()) == leaves
    assert s.stats()["tokens"] == len({tuple(seq[:i]) for seq in seqs for i in range(1, len(seq) + 1)})


def test_lru_eviction_and_pruning():
    s = RadixStore(capacity_bytes=12 * PER_TOKEN)
    a, b, c = [1] * 4, [2] * 4, [3] * 4
    put(s, a), put(s, b), put(s, c)
    assert s.stats()["used_bytes"] == 12 * PER_TOKEN
    assert s.query(a) == 4  # query does not touch the LRU clock
    with s.lookup(a):  # a lookup does
        pass
    put(s, [4] * 4)  # evicts the least recently used: b
    assert s.query(b) == 0 and s.query(a) == 4 and s.query(c) == 4
    # a branch: [5,5] + two children; evicting both children prunes the whole branch
    s2 = RadixStore(capacity_bytes=6 * PER_TOKEN)
    put(s2, [5, 5, 1, 1]), put(s2, [5, 5, 2, 2])
    assert s2.stats()["nodes"] == 3
    put(s2, [9] * 6)  # needs everything
    assert s2.edges() == [(9,) * 6] and s2.stats()["nodes"] == 1
    assert s2.stats()["used_bytes"] == 6 * PER_TOKEN


def test_pinned_match_survives_eviction_under_pressure():
    s = RadixStore(capacity_bytes=16 * PER_TOKEN)
    hot = list(range(10, 18))
    put(s, hot)
    match = s.lookup(hot + [99])
    assert match.matched_tokens == 8 and s.pinned() == 1
    for i in range(6):  # far more than the capacity; everything unpinned goes, the pinned path stays
        assert put(s, [100 + i] * 8) == 8
    assert s.query(hot) == 8
    assert s.stats()["used_bytes"] <= 16 * PER_TOKEN
    match.load()
    assert_match_is_prefix_kv(match, hot, 8)
    # while pinned, an update that needs the pinned bytes stores only what fits
    assert put(s, [7] * 12) == 8
    match.release()
    assert s.pinned() == 0
    put(s, [8] * 16)
    assert s.query(hot) == 0  # unpinned now, so it could go


def test_split_of_a_pinned_node_keeps_the_match_valid():
    s = RadixStore(capacity_bytes=1 << 20)
    put(s, [1, 2, 3, 4, 5])
    with s.lookup([1, 2, 3, 4, 5]) as m:
        put(s, [1, 2, 9])  # splits the pinned node after [1, 2]
        m.load()
        assert_match_is_prefix_kv(m, [1, 2, 3, 4, 5], 5)
    assert s.stats()["pins"] == 0


def test_pin_counts_never_go_negative():
    s = RadixStore(capacity_bytes=1 << 20)
    put(s, [1, 2, 3])
    m1, m2 = s.lookup([1, 2, 3]), s.lookup([1, 2])
    assert s.pinned() == 2 and s.stats()["pins"] == 2
    m1.release()
    with pytest.raises(PinError, match="twice"):
        m1.release()
    with pytest.raises(PinError, match="after release"):
        m1.load()
    assert s.pinned() == 1 and s.stats()["pins"] == 1
    m2.release()
    assert s.pinned() == 0 and s.stats()["pins"] == 0


def test_a_dropped_match_releases_its_pins_with_a_warning():
    s = RadixStore(capacity_bytes=1 << 20)
    put(s, [1, 2, 3])
    m = s.lookup([1, 2, 3])
    assert s.pinned() == 1
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        del m
        gc.collect()
    assert s.pinned() == 0 and s.stats()["pins"] == 0
    assert any(issubclass(x.category, ResourceWarning) for x in w)


def test_bad_input():
    with pytest.raises(ConfigError):
        RadixStore(capacity_bytes=0)
    s = RadixStore(capacity_bytes=1 << 20)
    put(s, [1, 2])
    keys, values = prefix_kv([1, 2, 3], head_dim=8)
    with pytest.raises(LayoutError, match="layout"):
        s.update_kv([1, 2, 3], keys, values)
    keys, values = prefix_kv([1, 2])
    with pytest.raises(LayoutError):
        s.update_kv([1, 2, 3], keys, values)  # the KV holds 2 tokens, the ids 3
    with pytest.raises(ConfigError):
        s.update_kv([1, 2], keys, values, start=3)
    with pytest.raises(ConfigError):
        s.query(torch.zeros(2, 3, dtype=torch.long))
    s.close()
    s.close()


# ----------------------------------------------------------------------------------------------------
# Shared between processes
# ----------------------------------------------------------------------------------------------------

_CHILD = r"""
import os, sys
sys.path.insert(0, {helpers!r})
from kvstream.stores import RadixStore
from store_helpers import prefix_kv
s = RadixStore(capacity_bytes={cap}, shared_name={name!r}, shm_dir={shm!r})
ids = {ids!r}
keys, values = prefix_kv(ids)
print("stored", s.update_kv(ids, keys, values))
m = s.lookup(ids)                  # pinned ...
print("matched", m.matched_tokens, flush=True)
if {die!r}:
    os._exit(0)                    # ... and the process dies without releasing
m.release()
s.close()
"""


def _child(name, shm, ids, cap, die=False):
    code = _CHILD.format(helpers=os.path.dirname(__file__), cap=cap, name=name, shm=shm, ids=ids, die=die)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def shared_name():
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    assert RadixStore.remove_shared(name)


def test_shared_store_across_processes(shared_name):
    cap = 64 * PER_TOKEN
    mine = RadixStore(capacity_bytes=cap, shared_name=shared_name)
    put(mine, [1, 2, 3, 4])
    out = _child(shared_name, None, [1, 2, 3, 4, 5, 6, 7], cap)  # attaches, extends our sequence
    assert "stored 7" in out and "matched 7" in out
    assert mine.query([1, 2, 3, 4, 5, 6, 7, 8]) == 7
    assert load(mine, [1, 2, 3, 4, 5, 6, 7]) == 7  # reads the other process's blob, bit for bit
    assert mine.stats()["blobs"] == 2 and mine.stats()["pins"] == 0
    with pytest.raises(ConfigError, match="capacity"):
        RadixStore(capacity_bytes=cap + 1, shared_name=shared_name).query([1])
    mine.close()


def test_pins_of_a_dead_process_are_dropped(shared_name):
    cap = 16 * PER_TOKEN
    out = _child(shared_name, None, [5] * 8, cap, die=True)
    assert "matched 8" in out
    mine = RadixStore(capacity_bytes=cap, shared_name=shared_name)
    assert mine.stats()["pins"] == 0  # the dead child's pin was reaped when we took the lock
    put(mine, [6] * 16)  # so its node can be evicted
    assert mine.query([5] * 8) == 0 and mine.query([6] * 16) == 16
    mine.close()


def test_shared_pinned_match_survives_another_process_evicting(shared_name, tmp_path):
    cap = 16 * PER_TOKEN
    mine = RadixStore(capacity_bytes=cap, shared_name=shared_name)
    put(mine, [3] * 8)
    with mine.lookup([3] * 8) as m:
        out = _child(shared_name, None, [4] * 16, cap)  # needs all the room: may evict only unpinned data
        assert "stored 8" in out  # half of it fits beside our pinned 8 tokens
        m.load()
        assert_match_is_prefix_kv(m, [3] * 8, 8)
    assert mine.stats()["pins"] == 0
    blobs = [f for f in os.listdir(mine._dir) if f.startswith("blob-")]
    assert len(blobs) == mine.stats()["blobs"]  # evicted blobs were unlinked, nothing orphaned
    mine.close()


def test_release_after_close_is_harmless():
    s = RadixStore(capacity_bytes=1 << 20)
    put(s, [1, 2, 3])
    m = s.lookup([1, 2, 3])
    s.close()
    m.release()
    assert s.pinned() == 0
    with pytest.raises(PinError):
        m.release()
