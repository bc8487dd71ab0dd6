"""TieredStore: lookups down the tiers, promotion up, write-through and write-back, pins across tiers."""

from __future__ import annotations

import pytest
import torch

import kvstream
from kvstream.errors import CapacityError, ConfigError
from kvstream.stores import ChunkFileStore, RadixStore, TieredStore
from store_helpers import HEADS, HEAD_DIM, LAYERS, assert_match_is_prefix_kv, prefix_kv
from kvstream.integrations.hf.keywords import cache_kwargs

C = 4
PER_TOKEN = LAYERS * 2 * HEADS * HEAD_DIM * 4
A = list(range(10, 30))   # 20 tokens
B = list(range(50, 70))   # 20 tokens, no common prefix with A
D = list(range(90, 110))


def _put(store, ids):
    keys, values = prefix_kv(ids)
    return store.update_kv(ids, keys, values)


def _tiers(tmp_path, capacity_tokens=64, **kw):
    upper = RadixStore(capacity_bytes=capacity_tokens * PER_TOKEN, pin_memory=False)
    lower = ChunkFileStore(tmp_path / "kv", chunk_tokens=C)
    return upper, lower, TieredStore([upper, lower], **kw)


def test_exported_from_kvstream():
    assert kvstream.TieredStore is TieredStore and kvstream.stores.TieredStore is TieredStore


def test_a_prefix_only_in_the_lower_tier_is_found_loaded_and_promoted(tmp_path):
    upper, lower, store = _tiers(tmp_path)
    _put(lower, A)
    assert upper.query(A) == 0 and store.query(A) == 20
    with store.lookup(A) as m:
        assert m.store is lower and m.matched_tokens == 20
        m.load()
        assert_match_is_prefix_kv(m, A, 20)
        assert lower.pinned() == 1 and upper.pinned() == 0
    store.wait()
    assert upper.query(A) == 20  # promoted once released
    with store.lookup(A) as m:
        assert m.store is upper
        m.load()
        assert_match_is_prefix_kv(m, A, 20)
    assert store.pinned() == 0
    store.close()
    assert upper.closed and lower.closed


def test_the_longest_match_wins_and_ties_go_up(tmp_path):
    upper, lower, store = _tiers(tmp_path, promote=False)
    _put(lower, A)
    _put(upper, A[:9])
    with store.lookup(A) as m:
        assert m.store is lower and m.matched_tokens == 20
    assert upper.pinned() == 0  # the shorter match was released at once
    _put(upper, A)
    with store.lookup(A, max_tokens=12) as m:
        assert m.store is upper and m.matched_tokens == 12
    store.wait()
    assert store.pinned() == 0
    store.close()


def test_write_through_writes_every_tier(tmp_path):
    upper, lower, store = _tiers(tmp_path)
    assert _put(store, A) == 20
    assert upper.query(A) == 20 and lower.query(A) == 20
    keys, values = prefix_kv(A + [1, 2, 3, 4, 5])
    assert store.update_kv(A + [1, 2, 3, 4, 5], [k[:, :, 18:] for k in keys], [v[:, :, 18:] for v in values],
                           start=18) == 7
    assert upper.query(A + [1, 2, 3, 4, 5]) == 25
    assert lower.query(A + [1, 2, 3, 4, 5]) == 24  # whole chunks, from the next boundary on
    store.close()


def test_write_back_demotes_on_eviction_and_never_loses_a_prefix(tmp_path):
    upper, lower, store = _tiers(tmp_path, capacity_tokens=45, write="back")
    _put(store, A)
    _put(store, B)
    assert upper.query(A) == 20 and lower.query(A) == 0 and lower.query(B) == 0  # write-back: the top tier only
    with store.lookup(B) as held:  # B pinned in the upper tier: it must survive the pressure
        _put(store, D)             # no room for D: A (least recently used, unpinned) is evicted, after demotion
        assert upper.query(A) == 0 and lower.query(A) == 20 and upper.query(B) == 20
        held.load()
        assert_match_is_prefix_kv(held, B, 20)
    with store.lookup(A) as m:
        assert m.store is lower
        m.load()
        assert_match_is_prefix_kv(m, A, 20)
    store.wait()
    assert store.pinned() == 0
    store.close()


def test_write_back_keeps_a_leaf_the_lower_tier_cannot_take(tmp_path, monkeypatch):
    upper, lower, store = _tiers(tmp_path, capacity_tokens=45, write="back", promote=False)
    _put(store, A)
    _put(store, B)

    def full(*args, **kwargs):
        raise CapacityError("disk full")

    monkeypatch.setattr(lower, "update_kv", full)
    with pytest.raises(CapacityError):  # no room above (nothing may go unwritten), and the disk is full
        _put(store, D)
    assert upper.query(A) == 20 and upper.query(B) == 20 and upper.query(D) == 5  # the part that fitted; nothing evicted unwritten
    monkeypatch.undo()
    assert _put(store, D) == 20 and upper.query(D) == 20 and lower.query(A) == 20  # A went down, then out
    store.close()


def test_an_update_the_upper_tier_cannot_hold_goes_down(tmp_path):
    upper, lower, store = _tiers(tmp_path, capacity_tokens=10, write="back")
    assert _put(store, A) == 20
    assert upper.query(A) == 10 and lower.query(A) == 20
    store.close()


def test_pins_hold_in_the_lower_tier_across_gc(tmp_path):
    upper, lower, store = _tiers(tmp_path, promote=False)
    _put(lower, A)
    with store.lookup(A) as m:
        assert lower.gc(ttl_s=0.0, now=1e12) == 0  # pinned: the GC keeps every file of the match
        m.load()
        assert_match_is_prefix_kv(m, A, 20)
    assert lower.gc(ttl_s=0.0, now=1e12) == 5
    store.close()


def test_bad_configurations(tmp_path):
    upper = RadixStore(capacity_bytes=1 << 20, pin_memory=False)
    lower = ChunkFileStore(tmp_path / "kv", chunk_tokens=C)
    with pytest.raises(ConfigError, match="at least one"):
        TieredStore([])
    with pytest.raises(ConfigError, match="write"):
        TieredStore([upper, lower], write="around")
    with pytest.raises(ConfigError, match="two tiers"):
        TieredStore([upper, upper])
    with pytest.raises(ConfigError, match="cannot report evictions"):
        TieredStore([lower, upper], write="back")
    upper.close()
    with pytest.raises(ConfigError, match="open PrefixStores"):
        TieredStore([upper, lower])
    lower.close()


def test_generate_reuse_through_tiers_is_identical(tmp_path):
    from transformers import DynamicCache

    from kvstream.models import build_model, encode_text, prompts, tiny_config

    model = build_model(tiny_config("llama"), seed=3)
    store = TieredStore([RadixStore(capacity_bytes=8 << 20), ChunkFileStore(tmp_path / "kv", chunk_tokens=8)],
                        write="back")
    ids = torch.tensor([encode_text(prompts()[0], 40)])
    for turn in range(3):
        with torch.inference_mode():
            ref = model.generate(ids, **cache_kwargs(DynamicCache(config=model.config)), max_new_tokens=5,
                                 do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
        cache = kvstream.StreamingCache.from_prefix(store, ids, config=model.config, layerwise=True)
        with torch.inference_mode():
            out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=5, do_sample=False, pad_token_id=0,
                                 attention_mask=torch.ones_like(ids))
        assert torch.equal(out, ref)
        assert turn == 0 or cache.matched_tokens > 0
        store.update(out, cache)
        ids = torch.cat([out, torch.tensor([encode_text(prompts()[turn + 1], 9)])], dim=1)
    store.wait()
    assert store.pinned() == 0
    store.close()
