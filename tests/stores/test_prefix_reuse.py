"""Prefix reuse inside HF generate: outputs identical to no reuse over several turns and architectures."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvstream.errors import ConfigError, LayoutError
from kvstream.models import build_model, encode_text, prompts, tiny_config
from kvstream.integrations.hf.prefix import load_prefix_into
from kvstream.integrations.hf.keywords import cache_kwargs
from kvstream.stores import ChunkFileStore, RadixStore, kv_from_cache

NEW_TOKENS = 6


def _generate(model, ids, cache=None):
    with torch.inference_mode():
        return model.generate(ids, **cache_kwargs(cache), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)


def _store(kind, tmp_path):
    if kind == "radix":
        return RadixStore(capacity_bytes=1 << 26)
    return ChunkFileStore(tmp_path / "kv", chunk_tokens=8)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "bloom", "qwen2", "mistral"])
@pytest.mark.parametrize("kind", ["radix", "file"])
def test_reuse_is_identical_to_full_prefill_over_turns(arch, kind, tmp_path):
    model = build_model(tiny_config(arch, num_layers=2), seed=0)
    store = _store(kind, tmp_path)
    history: list[int] = []
    texts = prompts()
    for turn in range(3):
        ids = torch.tensor([history + encode_text(texts[turn % len(texts)], 20)])
        ref = _generate(model, ids)
        cache = DynamicCache(config=model.config)
        matched = load_prefix_into(cache, store, ids)
        assert cache.get_seq_length() == matched
        if turn:  # everything of the turns before is stored (whole chunks of it in the file store)
            expected = len(history) - 1 if kind == "radix" else (len(history) - 1) // 8 * 8
            assert matched == expected
        out = _generate(model, ids, cache)
        assert torch.equal(out, ref), f"turn {turn}: reuse changed the output"
        assert store.update(out, cache) == (out.shape[1] - 1 if kind == "radix" else (out.shape[1] - 1) // 8 * 8)
        history = out[0].tolist()
    assert store.pinned() == 0
    store.close()


def test_match_is_capped_one_token_short_and_lazy_layers_work():
    model = build_model(tiny_config("llama", num_layers=2), seed=0)
    store = RadixStore(capacity_bytes=1 << 24)
    ids = torch.tensor([encode_text(prompts()[0], 16)])
    cache = DynamicCache(config=model.config)
    out = _generate(model, ids, cache)
    store.update(out, cache)
    lazy = DynamicCache()  # no config: layers are created by update
    assert load_prefix_into(lazy, store, out[:, :10]) == 9  # generate must still feed one token
    assert len(lazy.layers) == 2
    for i in range(2):
        assert torch.equal(lazy.layers[i].keys, cache.layers[i].keys[:, :, :9])
        assert torch.equal(lazy.layers[i].values, cache.layers[i].values[:, :, :9])
    assert load_prefix_into(DynamicCache(config=model.config), store, out[:, :1]) == 0
    with pytest.raises(ConfigError, match="empty"):
        load_prefix_into(lazy, store, out)
    three = DynamicCache(config=build_model(tiny_config("llama", num_layers=3), seed=0).config)
    with pytest.raises(LayoutError, match="layers"):
        load_prefix_into(three, store, out)
    assert store.pinned() == 0


def test_sliding_window_layers_that_dropped_history_cannot_be_stored():
    model = build_model(tiny_config("mistral", num_layers=2, sliding_window=12), seed=0)
    store = RadixStore(capacity_bytes=1 << 24)
    short = torch.tensor([encode_text(prompts()[0], 4)])
    cache = DynamicCache(config=model.config)
    out = _generate(model, short, cache)  # 9 tokens in the cache: within the window
    assert store.update(out, cache) == out.shape[1] - 1
    ids = torch.cat([out, torch.tensor([encode_text(prompts()[1], 3)])], dim=1)
    ref = _generate(model, ids)
    cache = DynamicCache(config=model.config)
    assert load_prefix_into(cache, store, ids) == out.shape[1] - 1
    out2 = _generate(model, ids, cache)
    assert torch.equal(out2, ref)  # the window layers kept their window by themselves
    with pytest.raises(ConfigError, match="sliding window 12.*dropped history"):
        store.update(out2, cache)


def test_kv_from_cache_rejects_caches_without_kv():
    with pytest.raises(ConfigError, match="no layers"):
        kv_from_cache(DynamicCache())


def test_a_static_cache_stores_only_its_filled_slots():
    from transformers import StaticCache

    model = build_model(tiny_config("llama", num_layers=2), seed=0)
    store = RadixStore(capacity_bytes=1 << 24)
    ids = torch.tensor([encode_text(prompts()[0], 20)])
    static = StaticCache(config=model.config, max_cache_len=64)
    out = _generate(model, ids, static)
    assert static.layers[0].keys.shape[2] == 64
    assert store.update(out, static) == out.shape[1] - 1  # not the 64 slots
    more = torch.cat([out, torch.tensor([encode_text(prompts()[1], 8)])], dim=1)
    cache = DynamicCache(config=model.config)
    assert load_prefix_into(cache, store, more) == out.shape[1] - 1
    assert torch.equal(_generate(model, more, cache), _generate(model, more))
