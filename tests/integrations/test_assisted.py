"""Assisted decoding (``generate(..., assistant_model=...)``) crops the cache after every step and ends with
``crop(0)``: the stored session reloads to exactly the live cache, and generation continues from it with
the same tokens (issue 13, item 4)."""

import torch

import kvstream
from kvstream.models import build_model, encode_text, prompts, tiny_config
from kvstream.integrations.hf.keywords import cache_kwargs


def _generate(model, ids, cache, n, **kw):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


def test_an_assisted_session_reloads_to_the_live_cache_and_continues(tmp_path):
    main = build_model(tiny_config("llama"), seed=1)
    assistant = build_model(tiny_config("llama", num_layers=2), seed=2)
    ids = torch.tensor([encode_text(prompts()[0], 20)])
    disk = kvstream.DiskTransport(tmp_path / "kv")
    cache = kvstream.StreamingCache(config=main.config, transport=disk, session="assisted")
    crops = []
    real_crop = cache.crop
    cache.crop = lambda n: (crops.append(n), real_crop(n))[1]
    out = _generate(main, ids, cache, 12, assistant_model=assistant)
    assert crops and crops[-1] == 0 and any(n < 0 for n in crops)  # what assisted decoding does
    cache.wait()
    loaded = kvstream.StreamingCache.load(disk, "assisted", config=main.config, stream=False)
    assert loaded.get_seq_length() == cache.get_seq_length() == out.shape[1] - 1
    for a, b in zip(cache.layers, loaded.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    more_live = _generate(main, out, cache, 6)
    more_loaded = _generate(main, out, loaded, 6)
    assert torch.equal(more_live, more_loaded)
    disk.close()
