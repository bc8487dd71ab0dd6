"""K and V of different head dims (MLA: a tiny DeepSeek-V3, whose cache holds one head of a 16-element latent as
keys and of an 8-element rotary key as values): streamed, stored and resumed like any other model, and
models whose cache layers kvstream cannot stream are refused when the cache is built."""

import pytest
import torch
import transformers as tf
from transformers import DynamicCache, StaticCache

import kvstream
from kvstream.chunk import HEAD_DIMS
from kvstream.errors import ConfigError, CorruptChunkError
from kvstream.layout import KVLayout, packed_kv
from kvstream.models import batch_of_prompts, build_model, tiny_config

from test_static import MAX_LEN, _gen, _same, host  # noqa: F401 - host is a fixture


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config("deepseek_v3"), seed=7)


def _same_kv(a, b):
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


def test_the_model_has_k_and_v_of_different_head_dims(model):
    layout = KVLayout.from_config(model.config)
    assert (layout.kv_heads, layout.head_dim, layout.head_dim_v) == (1, 16, 8) and layout.split
    cache = DynamicCache(config=model.config)
    _gen(model, batch_of_prompts(1, 8), cache, new=2)
    assert cache.layers[0].keys.shape[-1] == 16 and cache.layers[0].values.shape[-1] == 8
    assert layout.bytes_per_token(2) == 4 * 2 * 1 * (16 + 8) * 4


@pytest.mark.parametrize("level", [3, 1, 0])
def test_tokens_scores_identical_and_chunks_carry_both_head_dims(model, host, level):
    ids = batch_of_prompts(2, 24)
    ref_cache = DynamicCache(config=model.config)
    ref = _gen(model, ids, ref_cache)
    cache = kvstream.StreamingCache(config=model.config, transport=host, session=f"m{level}", level=level)
    out = _gen(model, ids, cache)
    cache.wait()
    _same(ref, out)
    _same_kv(ref_cache, cache)
    prefill, step = host.describe(f"m{level}/seg000000/layer0000"), host.describe(f"m{level}/seg000001/all")
    assert prefill.shape == (1, 2, 1, 24, 24) and prefill.meta[HEAD_DIMS] == [16, 8] and prefill.head_dims == (16, 8)
    assert step.shape == (4, 2, 1, 5, 24) and step.head_dims == (16, 8)  # the 5 decode steps, one chunk
    k, v = packed_kv(host.fetch_new(f"m{level}/seg000001/all", "cpu"), 16)
    for l, layer in enumerate(ref_cache.layers):
        assert torch.equal(k[l], layer.keys[:, :, 24:29]) and torch.equal(v[l], layer.values[:, :, 24:29])
    assert cache.manifest()["head_dim"] == 16 and cache.manifest()["head_dim_v"] == 8
    assert cache.layout() == KVLayout(num_layers=4, kv_heads=1, head_dim=16, dtype=torch.float32, head_dim_v=8)


def test_session_loads_and_continues_identically(model, tmp_path):
    ids = batch_of_prompts(2, 20)
    full = _gen(model, ids, DynamicCache(config=model.config), new=10)
    transport = kvstream.DiskTransport(str(tmp_path / "kv"))
    cache = kvstream.StreamingCache(config=model.config, transport=transport, session="r")
    first = _gen(model, ids, cache, new=5)
    cache.wait()
    loaded = kvstream.StreamingCache.load(transport, "r", config=model.config)
    _same_kv(cache, loaded)
    more = _gen(model, first.sequences, loaded, new=5)
    assert torch.equal(more.sequences, full.sequences)
    loaded.wait()  # the continued session (two runs) loads again, whole
    again = kvstream.StreamingCache.load(transport, "r", config=model.config, stream=False)
    assert again.get_seq_length() == full.sequences.shape[1] - 1
    transport.close()


def test_beam_search_replays_the_rewritten_history(model, host):
    ids = batch_of_prompts(2, 20)
    ref = _gen(model, ids, DynamicCache(config=model.config), num_beams=3)
    cache = kvstream.StreamingCache(config=model.config, transport=host, session="beam")
    out = _gen(model, ids, cache, num_beams=3)
    cache.wait()
    assert torch.equal(ref.sequences, out.sequences)
    assert "reorder" in {s["kind"] for s in cache.manifest()["segments"]}
    _same_kv(cache, kvstream.StreamingCache.load(host, "beam", config=model.config))


def test_static_flavour_and_loads_either_into_either(model, host):
    ids = batch_of_prompts(2, 20)
    ref_cache = StaticCache(config=model.config, max_cache_len=MAX_LEN)
    full = _gen(model, ids, ref_cache, new=10)
    static = kvstream.StreamingStaticCache(model.config, MAX_LEN, host, session="st")
    first = _gen(model, ids, static, new=5)
    static.wait()
    _same(_gen(model, ids, StaticCache(config=model.config, max_cache_len=MAX_LEN), new=5), first)
    dyn = kvstream.StreamingCache.load(host, "st", config=model.config, stream=False)
    for l, layer in enumerate(dyn.layers):
        assert torch.equal(layer.keys, static.layers[l].keys[:, :, :24])
        assert torch.equal(layer.values, static.layers[l].values[:, :, :24])
    assert torch.equal(_gen(model, first.sequences, dyn, new=5).sequences, full.sequences)
    d = kvstream.StreamingCache(config=model.config, transport=host, session="dy")
    first = _gen(model, ids, d, new=5)
    d.wait()
    st = kvstream.StreamingStaticCache.load(host, "dy", config=model.config, max_cache_len=MAX_LEN)
    assert torch.equal(_gen(model, first.sequences, st, new=5).sequences, full.sequences)


@pytest.mark.parametrize("budget_layers", [None, 2])
def test_offload_identical(model, budget_layers):
    ids = batch_of_prompts(2, 20)
    ref = _gen(model, ids, DynamicCache(config=model.config))
    layer_bytes = 2 * 1 * 25 * (16 + 8) * 4  # B2, one head, 25 tokens at the end, fp32
    kw = {} if budget_layers is None else {"gpu_budget_bytes": budget_layers * layer_bytes}
    cache = kvstream.StreamingCache(config=model.config, offload=True, **kw)
    _same(ref, _gen(model, ids, cache))
    assert len(cache.offloaded_layers) == (4 if budget_layers is None else 2)
    for l in cache.offloaded_layers:
        assert cache.layers[l].values.shape[-1] == 8 and not cache.layers[l].keys.is_cuda


def test_a_chunk_whose_head_dims_do_not_match_the_manifest_is_refused(model, host):
    cache = kvstream.StreamingCache(config=model.config, transport=host, session="hd")
    _gen(model, batch_of_prompts(1, 20), cache, new=2)
    cache.wait()
    key = "hd/seg000000/layer0001"
    chunk = host.fetch_new(key, "cpu")
    meta = dict(host.describe(key).meta)
    host.flush(key, chunk, meta={**meta, HEAD_DIMS: [8, 16]}).wait()  # same shape, the parts swapped
    with pytest.raises(CorruptChunkError, match="head dims"):
        kvstream.StreamingCache.load(host, "hd", config=model.config)


def _indexed_config():
    return tf.DeepseekV32Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                vocab_size=320)


def _linear_config():
    return tf.Qwen3NextConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                              vocab_size=320)


@pytest.mark.parametrize("make, dynamic_layer, static_layer", [
    (_indexed_config, "DynamicIndexedLayer", "StaticIndexedLayer"),  # sparse attention: an indexer cache too
    (_linear_config, "LinearAttentionLayer", "LinearAttentionLayer"),  # recurrent state, no per-token KV
])
def test_caches_kvstream_cannot_stream_are_refused_when_built(make, dynamic_layer, static_layer):
    config = make()
    with pytest.raises(ConfigError, match=dynamic_layer):
        kvstream.StreamingCache(config=config)
    with pytest.raises(ConfigError, match=static_layer):
        kvstream.StreamingStaticCache(config, MAX_LEN, None)


def test_prefix_stores_refuse_k_and_v_of_different_head_dims(model):
    from kvstream.errors import LayoutError

    ids = batch_of_prompts(1, 20)
    cache = kvstream.StreamingCache(config=model.config)
    _gen(model, ids, cache, new=2)
    store = kvstream.RadixStore(capacity_bytes=1 << 20)
    with pytest.raises(LayoutError, match="one head_dim"):
        store.update(ids[0].tolist() + [0], cache)
