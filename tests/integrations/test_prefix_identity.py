"""from_prefix never fills a cache with another model's KV (issue 13, item 3): a store takes the
fingerprint of the model it is used with as its namespace, and what it loads is checked against the
config (KV heads, head_dim, layers) with a LayoutError at load time. Before, both models matched each
other's prefixes, and a mismatched geometry failed later, inside attention."""

import pytest
import torch

import kvstream
from kvstream.errors import LayoutError
from kvstream.models import build_model, encode_text, prompts, tiny_config
from kvstream.integrations.hf.keywords import cache_kwargs


def _turn(model, store, ids):
    cache = kvstream.StreamingCache.from_prefix(store, ids, config=model.config, layerwise=False)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=4,
                             do_sample=False, pad_token_id=0)
    store.update(out, cache)
    return cache.matched_tokens, out


@pytest.mark.parametrize("kind", ["file", "radix"])
def test_two_models_of_one_shape_do_not_share_prefixes(tmp_path, kind):
    a_cfg, b_cfg = tiny_config("llama"), tiny_config("llama")
    a_cfg._name_or_path, b_cfg._name_or_path = "org/a", "org/b"
    a, b = build_model(a_cfg, seed=1), build_model(b_cfg, seed=2)
    make = (lambda: kvstream.ChunkFileStore(tmp_path / "kv", chunk_tokens=8)) if kind == "file" else \
        (lambda: kvstream.RadixStore(capacity_bytes=8 << 20))
    store = make()
    ids = torch.tensor([encode_text(prompts()[0], 33)])
    assert _turn(a, store, ids)[0] == 0
    matched, out = _turn(a, store, ids)
    assert matched > 0  # model a reuses its own prefix
    with pytest.raises(LayoutError, match="another model"):
        _turn(b, store, out)  # the same store object, tied to model a
    if kind == "file":
        assert _turn(b, make(), out)[0] == 0  # the same directory through another store object: no match


def test_a_prefix_of_another_geometry_is_refused_at_load(tmp_path):
    stored = tiny_config("llama")
    store = kvstream.ChunkFileStore(tmp_path / "kv", chunk_tokens=8, namespace="shared-by-choice")
    ids = torch.tensor([encode_text(prompts()[1], 33)])
    _turn(build_model(stored, seed=1), store, ids)
    other = tiny_config("llama")
    other.num_key_value_heads = 4  # an explicit namespace skips the fingerprint; the geometry is still checked
    with pytest.raises(LayoutError, match="KV heads"):
        kvstream.StreamingCache.from_prefix(store, ids, config=other)
    assert store.pinned() == 0
