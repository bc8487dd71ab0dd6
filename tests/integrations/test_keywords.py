"""``cache=`` where transformers has it, ``past_key_values=`` where it does not: one helper decides, and
both keywords hand the cache to generate."""

import pytest
import torch

import kvstream
from kvstream.integrations.hf import keywords
from kvstream.models import batch_of_prompts, build_model, tiny_config


@pytest.fixture
def fresh_keyword():
    keywords.cache_keyword.cache_clear()
    yield
    keywords.cache_keyword.cache_clear()


def test_keyword_follows_the_installed_transformers(monkeypatch, fresh_keyword):
    from transformers.generation import utils

    expected = "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"
    assert keywords.cache_keyword() == expected
    assert kvstream.cache_kwargs(7) == {expected: 7}
    keywords.cache_keyword.cache_clear()
    monkeypatch.setattr(utils, "ALL_CACHE_NAMES", ["past_key_values", "mems"], raising=False)
    assert keywords.cache_keyword() == "past_key_values"
    keywords.cache_keyword.cache_clear()
    monkeypatch.setattr(utils, "ALL_CACHE_NAMES", ["cache", "state"], raising=False)
    assert keywords.cache_keyword() == "cache"


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_both_keywords_reach_generate(name):
    if name == "cache" and keywords.cache_keyword() != "cache":
        pytest.skip("this transformers takes the cache only as past_key_values=")
    model = build_model(tiny_config("llama"), seed=7)
    ids = batch_of_prompts(2, 20)
    t = kvstream.HostTransport(capacity_bytes=16 << 20)
    cache = kvstream.StreamingCache(config=model.config, transport=t, session="kw")
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, max_new_tokens=4,
                             do_sample=False, **{name: cache})
    cache.wait()
    assert cache.stats["chunks_out"] > 0 and cache.get_seq_length() == out.shape[1] - 1
    t.close()

