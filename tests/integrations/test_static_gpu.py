"""StreamingStaticCache on a GPU: eager, ``torch.compile`` (inductor) and generate's own compile
(``reduce-overhead``: CUDA graphs, the streaming ops kept out of them); the KV streamed is exactly the cache's."""

import pytest
import torch
from transformers import StaticCache

import kvstream
from kvstream.integrations.hf.keywords import cache_kwargs
from kvstream.models import batch_of_prompts, build_model, tiny_config

CUDA = torch.device("cuda", 0)
MAX_LEN = 64


def _gen(model, ids, cache, new=8, **kw):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), pad_token_id=0,
                              max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)


def _check_session(host, session, ref_cache, model, seq):
    back = kvstream.StreamingCache.load(host, session, config=model.config, device=CUDA, stream=False)
    back.wait_loaded()  # the layers land on a side stream; read them only after
    for l, layer in enumerate(back.layers):
        assert torch.equal(layer.keys, ref_cache.layers[l].keys[:, :, :seq])
        assert torch.equal(layer.values, ref_cache.layers[l].values[:, :, :seq])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eager", "compiled", "generate-compile"])
def test_static_streams_exactly_its_cache_on_the_gpu(mode):
    model = build_model(tiny_config("llama", num_layers=4), seed=7, device=CUDA, dtype=torch.bfloat16)
    if mode == "compiled":
        model.forward = torch.compile(model.forward)
    kw = {"disable_compile": True} if mode == "eager" else {}
    ids = batch_of_prompts(2, 24, device=CUDA)
    host = kvstream.HostTransport(capacity_bytes=64 << 20)
    cache = kvstream.StreamingStaticCache(model.config, MAX_LEN, host, session=f"gpu-{mode}", steps_per_chunk=3)
    out = _gen(model, ids, cache, **kw)
    cache.wait()
    assert cache.stats["chunks_out"] == 4 + 3  # the prompt's 4 layers, then 7 decode steps in chunks of 3, 3, 1
    _check_session(host, f"gpu-{mode}", cache, model, out.shape[1] - 1)
    ref = _gen(model, ids, StaticCache(config=model.config, max_cache_len=MAX_LEN), **kw)
    if mode == "eager":  # compiled runs of bf16 may differ between graphs; eager ones are compared
        assert torch.equal(out, ref)
    host.close()
