"""StreamingCache(offload=True, gpu_budget_bytes=N): the layers whose KV fits in N stay resident, only the rest
goes to host memory (spread over the depth), and generate is identical to DynamicCache at every budget."""

import pytest
import torch
from transformers import DynamicCache

import kvstream
from kvstream.errors import ConfigError
from kvstream.integrations.hf.offload import spread_order
from kvstream.models import batch_of_prompts, build_model, tiny_config

from test_static import _gen  # generate for exactly ``new`` tokens (default 6), with scores

LAYERS = 8
PROMPT, NEW = 20, 6  # NEW: _gen's default


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config("llama", num_layers=LAYERS), seed=7)


def _layer_bytes(config, batch, tokens):
    """One layer's K and V: tiny llama has 2 KV heads of head_dim 16, float32."""
    return batch * 2 * tokens * (16 + 16) * 4


def test_spread_order_is_nested_and_even():
    assert spread_order(list(range(8))) == [0, 4, 2, 6, 1, 3, 5, 7]
    order = spread_order(list(range(32)))
    assert sorted(order) == list(range(32))
    assert sorted(order[:16]) == list(range(0, 32, 2)) and sorted(order[:8]) == list(range(0, 32, 4))
    assert spread_order([3, 5, 9]) == [3, 5, 9] and spread_order([]) == []


@pytest.mark.parametrize("resident", [0, 2, 4, 6, 8])
def test_generate_identical_and_the_budget_decides_the_resident_layers(model, resident):
    ids = batch_of_prompts(2, PROMPT)
    ref_cache = DynamicCache(config=model.config)
    ref = _gen(model, ids, ref_cache)
    end = PROMPT + NEW - 1  # tokens each layer holds at the end
    budget = resident * _layer_bytes(model.config, 2, end)
    cache = kvstream.StreamingCache(config=model.config, offload=True, gpu_budget_bytes=budget)
    out = _gen(model, ids, cache)
    assert torch.equal(ref.sequences, out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.scores, out.scores))
    offloaded = cache.offloaded_layers
    assert offloaded == sorted(spread_order(list(range(LAYERS)))[:LAYERS - resident])
    for l, (layer, want) in enumerate(zip(cache.layers, ref_cache.layers)):
        assert torch.equal(layer.keys, want.keys) and torch.equal(layer.values, want.values)
        # an offloaded layer views its host mirror (room for more tokens); a resident one holds its KV as
        # DynamicCache does (exactly its tokens)
        held = layer.keys.untyped_storage().nbytes() // layer.keys.element_size()
        assert (held > layer.keys.numel()) == (l in offloaded), l
    # the budget holds at the end: what stayed resident fits
    assert (LAYERS - len(offloaded)) * _layer_bytes(model.config, 2, end) <= budget


def test_layers_move_out_as_the_sequence_grows_and_never_back(model):
    ids = batch_of_prompts(1, PROMPT)
    budget = 4 * _layer_bytes(model.config, 1, PROMPT)  # 4 layers of the prompt; 3 once a token is added
    cache = kvstream.StreamingCache(config=model.config, offload=True, gpu_budget_bytes=budget)
    first = _gen(model, ids, cache, new=1)  # the prefill only
    after_prefill = cache.offloaded_layers
    more = _gen(model, first.sequences, cache, new=3)
    assert len(after_prefill) == 4 and len(cache.offloaded_layers) == 5
    assert set(after_prefill) <= set(cache.offloaded_layers)
    assert torch.equal(more.sequences, _gen(model, ids, DynamicCache(config=model.config), new=4).sequences)


def test_a_budget_for_everything_offloads_nothing_and_allows_crop(model):
    cache = kvstream.StreamingCache(config=model.config, offload=True, gpu_budget_bytes=1 << 30)
    _gen(model, batch_of_prompts(1, PROMPT), cache, new=3)
    assert cache.offloaded_layers == []
    cache.crop(-1)  # nothing lives on the host: crop works as in DynamicCache
    assert cache.get_seq_length() == PROMPT + 1


def test_budget_without_offload_or_negative_is_refused(model):
    with pytest.raises(ConfigError, match="needs offload=True"):
        kvstream.StreamingCache(config=model.config, gpu_budget_bytes=1 << 20)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="non-negative int"):
            kvstream.StreamingCache(config=model.config, offload=True, gpu_budget_bytes=bad)


def test_reset_forgets_the_plan(model):
    ids = batch_of_prompts(1, PROMPT)
    cache = kvstream.StreamingCache(config=model.config, offload=True,
                                    gpu_budget_bytes=4 * _layer_bytes(model.config, 1, PROMPT + 1))
    _gen(model, ids, cache, new=2)
    assert len(cache.offloaded_layers) == 4
    cache.reset()
    assert cache.offloaded_layers == []
    out = _gen(model, ids, cache, new=2)
    assert torch.equal(out.sequences, _gen(model, ids, DynamicCache(config=model.config), new=2).sequences)


def test_load_offloads_what_the_budget_does_not_keep(model):
    ids = batch_of_prompts(1, PROMPT)
    host = kvstream.HostTransport(capacity_bytes=16 << 20)
    cache = kvstream.StreamingCache(config=model.config, transport=host, session="b")
    first = _gen(model, ids, cache, new=3)
    cache.wait()
    budget = 6 * _layer_bytes(model.config, 1, PROMPT + 2)
    loaded = kvstream.StreamingCache.load(host, "b", config=model.config, offload=True, gpu_budget_bytes=budget,
                                          stream=False)
    assert loaded.offloaded_layers == sorted(spread_order(list(range(LAYERS)))[:2])
    more = _gen(model, first.sequences, loaded, new=3)
    assert torch.equal(more.sequences, _gen(model, ids, DynamicCache(config=model.config), new=6).sequences)
    host.close()
