"""Installing a layer-wise load into a StreamingCache: placeholders until a layer is taken, never bytes in flight."""

import pytest
import torch

import kvstream
from kvstream.cuda import Event
from kvstream.integrations.hf.resume import install
from kvstream.streaming.layerwise import LayerwiseLoad


def _load(gen, layers=3, tokens=7):
    keys = [torch.randn(2, 2, tokens, 4, generator=gen) for _ in range(layers)]
    values = [torch.randn(2, 2, tokens, 4, generator=gen) for _ in range(layers)]
    # a stream that is not None marks a load still in flight (what a GPU side-stream load returns)
    return LayerwiseLoad(keys, values, [Event("cpu") for _ in range(layers)], tokens, stream=object())


def test_layers_hold_placeholders_until_taken(seed):
    cache = kvstream.StreamingCache()
    for _ in range(3):
        cache.layers.append(cache.layer_class_to_replicate())
    load = _load(seed)
    expect = [(k.clone(), v.clone()) for k, v in zip(load.keys, load.values)]
    released = []
    install(cache, load, [0, 1, 2], on_done=lambda: released.append(True))
    assert cache.get_seq_length() == 7 and cache.pending_load is load
    assert all(l.keys.device.type == "meta" for l in cache.layers)
    with pytest.raises((NotImplementedError, RuntimeError)):  # no read can see bytes still being written
        cache.layers[1].keys.sum().item()
    new = torch.randn(2, 2, 1, 4, generator=seed)
    cache.update(new, new, 0)  # the first update of layer 0 takes it
    assert torch.equal(cache.layers[0].keys[:, :, :7], expect[0][0]) and cache.layers[1].keys.device.type == "meta"
    assert not released
    cache.wait_loaded()  # everything else
    assert cache.pending_load is None and released == [True]
    assert torch.equal(cache.layers[2].values, expect[2][1])


def test_a_landed_load_is_installed_as_is(seed):
    cache = kvstream.StreamingCache()
    cache.layers.append(cache.layer_class_to_replicate())
    load = _load(seed, layers=1)
    load.stream = None
    released = []
    install(cache, load, [0], on_done=lambda: released.append(True))
    assert cache.pending_load is None and released == [True]
    assert cache.layers[0].keys is load.keys[0]


def test_store_update_lands_a_pending_load_first(seed, tmp_path):
    store = kvstream.RadixStore(capacity_bytes=1 << 20)
    cache = kvstream.StreamingCache()
    for _ in range(2):
        cache.layers.append(cache.layer_class_to_replicate())
    load = _load(seed, layers=2, tokens=5)
    load.keys = [k[:1] for k in load.keys]
    load.values = [v[:1] for v in load.values]
    install(cache, load, [0, 1], on_done=None)
    assert store.update(list(range(6)), cache) == 5  # kv_from_cache waits for the load, reads real tensors
    assert cache.pending_load is None
