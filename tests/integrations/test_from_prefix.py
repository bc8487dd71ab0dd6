"""StreamingCache.from_prefix: a prefix from a store, then generate prefills only the rest, output unchanged."""

import pytest
import torch
from transformers import DynamicCache

import kvstream
from kvstream.integrations.hf.keywords import cache_kwargs
from kvstream.models import build_model, encode_text, prompts, tiny_config


def _greedy(model, ids, cache, n=6):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=n,
                              do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("store_kind", ["radix", "file"])
def test_multi_turn_reuse_identical(layerwise, store_kind, tmp_path):
    model = build_model(tiny_config("llama"), seed=3)
    store = (kvstream.RadixStore(capacity_bytes=8 << 20) if store_kind == "radix"
             else kvstream.ChunkFileStore(str(tmp_path / "kv"), chunk_tokens=8))
    conversation = torch.tensor([encode_text(prompts()[0], 40)])
    matched = []
    for turn in range(3):
        ref = _greedy(model, conversation, DynamicCache(config=model.config))
        cache = kvstream.StreamingCache.from_prefix(store, conversation, config=model.config, layerwise=layerwise)
        out = _greedy(model, conversation, cache)
        assert torch.equal(out.sequences, ref.sequences)
        # Logits are not bit-identical: the suffix prefill multiplies matrices of another row count than a
        # full prefill, so float32 sums run in another order (~1e-6 relative here). Tokens are the contract.
        for a, b in zip(out.scores, ref.scores):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
        matched.append(cache.matched_tokens)
        assert cache._pending is None  # every layer was taken and the pins released
        store.update(out.sequences, cache)
        follow_up = torch.tensor([encode_text(prompts()[turn + 1], 12)])
        conversation = torch.cat([out.sequences, follow_up], dim=1)
    assert matched[0] == 0 and all(m > 0 for m in matched[1:])
    assert store.pinned() == 0
    store.close()


def test_layerwise_refuses_a_transport():
    model = build_model(tiny_config("llama"), seed=3)
    store = kvstream.RadixStore(capacity_bytes=1 << 20)
    with pytest.raises(kvstream.ConfigError, match="layerwise"):
        kvstream.StreamingCache.from_prefix(store, torch.tensor([[1, 2, 3]]), config=model.config, layerwise=True,
                                            transport=kvstream.HostTransport(capacity_bytes=1 << 20))
