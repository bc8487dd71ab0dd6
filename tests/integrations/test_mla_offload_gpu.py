"""On a GPU: a tiny DeepSeek-V3 (K and V of different head dims) streamed at every level and loaded layer by
layer, and the budgeted offload (side-stream appends, prefetches, events), checked bit-exactly against the
cache that ran (bf16 generate is not deterministic from run to run, so KV is compared, not tokens)."""

import pytest
import torch
from transformers import DynamicCache

import kvstream
from kvstream.integrations.hf.keywords import cache_kwargs
from kvstream.models import batch_of_prompts, build_model, tiny_config

CUDA = torch.device("cuda", 0)


def _gen(model, ids, cache, new=8):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), pad_token_id=0,
                              max_new_tokens=new, min_new_tokens=new, do_sample=False)


@pytest.mark.gpu
@pytest.mark.parametrize("level", [3, 2, 1, 0])
def test_mla_streams_and_loads_exactly_on_the_gpu(level):
    model = build_model(tiny_config("deepseek_v3"), seed=7, device=CUDA, dtype=torch.bfloat16)
    ids = batch_of_prompts(2, 24, device=CUDA)
    host = kvstream.HostTransport(capacity_bytes=64 << 20)
    cache = kvstream.StreamingCache(config=model.config, transport=host, session=f"mla{level}", level=level)
    _gen(model, ids, cache)
    cache.wait()
    back = kvstream.StreamingCache.load(host, f"mla{level}", config=model.config, device=CUDA, stream=False)
    back.wait_loaded()
    for a, b in zip(cache.layers, back.layers):
        assert b.values.shape[-1] == 8 and b.keys.shape[-1] == 16
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    host.close()


@pytest.mark.gpu
@pytest.mark.parametrize("arch, resident", [("llama", 0), ("llama", 2), ("llama", 4), ("deepseek_v3", 2)])
def test_budgeted_offload_holds_the_same_kv_on_the_gpu(arch, resident):
    model = build_model(tiny_config(arch, num_layers=4), seed=7, device=CUDA, dtype=torch.bfloat16)
    ids = batch_of_prompts(2, 24, device=CUDA)
    ref = DynamicCache(config=model.config)
    _gen(model, ids, ref)
    layer_bytes = sum(t.numel() * t.element_size() for t in (ref.layers[0].keys, ref.layers[0].values))
    cache = kvstream.StreamingCache(config=model.config, offload=True, gpu_budget_bytes=resident * layer_bytes)
    with torch.inference_mode():  # the reference's own inputs, through the cache's updates: same KV bits
        for l, layer in enumerate(ref.layers):
            cache.update(layer.keys[:, :, :24], layer.values[:, :, :24], l)
        for t in range(24, ref.layers[0].keys.shape[2]):
            for l, layer in enumerate(ref.layers):
                k, v = cache.update(layer.keys[:, :, t:t + 1], layer.values[:, :, t:t + 1], l)
                assert k.is_cuda and torch.equal(k, layer.keys[:, :, :t + 1]) and torch.equal(v, layer.values[:, :, :t + 1])
    torch.cuda.synchronize()
    assert len(cache.offloaded_layers) == 4 - resident
    for l in cache.offloaded_layers:
        assert not cache.layers[l].keys.is_cuda and cache.layers[l].keys.is_pinned()
        assert torch.equal(cache.layers[l].keys, ref.layers[l].keys.cpu())
        assert torch.equal(cache.layers[l].values, ref.layers[l].values.cpu())
