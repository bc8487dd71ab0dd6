"""Decode steps streamed in bulk (``steps_per_chunk``): the same tokens, the same KV back, and nothing lost
that the cache holds when the session is read, rewritten or recovered."""

import pytest
import torch
from transformers import DynamicCache

import kvstream
from kvstream.errors import ConfigError
from kvstream.integrations.hf.keywords import cache_kwargs
from kvstream.models import batch_of_prompts, build_model, tiny_config


def _model(arch="llama", **kw):
    return build_model(tiny_config(arch, **kw), seed=7)


def _gen(model, ids, cache, new):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), pad_token_id=0,
                              do_sample=False, max_new_tokens=new, min_new_tokens=new, return_dict_in_generate=True,
                              output_scores=True)


def _step_tokens(cache) -> list[int]:
    return [s["tokens"] for s in cache.manifest()["segments"] if s["kind"] == "all"]


def _same_kv(a, b):
    for x, y in zip(a.layers, b.layers):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)


@pytest.fixture
def host():
    t = kvstream.HostTransport(capacity_bytes=64 << 20)
    yield t
    t.close()


@pytest.mark.parametrize("steps_per_chunk,chunks", [(1, [1] * 9), (4, [4, 4, 1]), (16, [9])])
def test_tokens_identical_and_the_session_holds_every_step(host, steps_per_chunk, chunks):
    model = _model()
    ids = batch_of_prompts(2, 20)
    ref_cache = DynamicCache(config=model.config)
    ref = _gen(model, ids, ref_cache, 10)  # a prefill, then 9 decode steps
    cache = kvstream.StreamingCache(config=model.config, transport=host, session="c", steps_per_chunk=steps_per_chunk)
    out = _gen(model, ids, cache, 10)
    cache.wait()
    assert torch.equal(ref.sequences, out.sequences)
    assert all(torch.equal(x, y) for x, y in zip(ref.scores, out.scores))
    assert _step_tokens(cache) == chunks
    assert cache.stats["chunks_out"] == len(model.model.layers) + len(chunks)
    back = kvstream.StreamingCache.load(host, "c", config=model.config, stream=False)
    _same_kv(ref_cache, back)


def test_pending_steps_go_out_before_the_session_is_read_or_continued(host):
    model = _model()
    ids = batch_of_prompts(2, 20)
    full = _gen(model, ids, DynamicCache(config=model.config), 12)
    cache = kvstream.StreamingCache(config=model.config, transport=host, session="p", steps_per_chunk=8)
    first = _gen(model, ids, cache, 6)  # 5 decode steps: fewer than a chunk, all pending when generate returns
    assert not [k for k in host.keys("p/") if k.endswith("/all")]
    doc = cache.manifest()  # reading the record streams them first: its segments cover the cache
    assert _step_tokens(cache) == [5] and sum(s["tokens"] for s in doc["segments"]) == doc["seq_length"] == 25
    cache.wait()  # nothing left pending: the manifest goes out
    assert _step_tokens(cache) == [5]
    loaded = kvstream.StreamingCache.load(host, "p", config=model.config, steps_per_chunk=8)
    _same_kv(cache, loaded)
    more = _gen(model, first.sequences, loaded, 6)
    assert torch.equal(more.sequences, full.sequences)
    loaded.wait()
    again = kvstream.StreamingCache.load(host, "p", config=model.config, stream=False)
    assert again.get_seq_length() == full.sequences.shape[1] - 1


def test_sliding_window_chunks_never_outgrow_the_window(host):
    model = _model("mistral", sliding_window=4)  # a layer keeps its last 3 tokens
    ids = batch_of_prompts(2, 20)
    ref = _gen(model, ids, DynamicCache(config=model.config), 10)
    cache = kvstream.StreamingCache(config=model.config, transport=host, session="w", steps_per_chunk=16)
    out = _gen(model, ids, cache, 10)
    cache.wait()
    assert torch.equal(ref.sequences, out.sequences)
    assert _step_tokens(cache) == [3, 3, 3]
    back = kvstream.StreamingCache.load(host, "w", config=model.config, stream=False)
    _same_kv(cache, back)
    assert [l.get_seq_length() for l in back.layers] == [l.get_seq_length() for l in cache.layers]


def test_a_killed_producer_loses_only_the_pending_steps(host):
    model = _model()
    ids = batch_of_prompts(2, 20)
    full = _gen(model, ids, DynamicCache(config=model.config), 12)
    cache = kvstream.StreamingCache(config=model.config, transport=host, session="k", steps_per_chunk=4)
    first = _gen(model, ids, cache, 10)  # 9 decode steps: two chunks of 4 landed, 1 step pending
    cache.streamer.wait()  # the chunks in flight land; no manifest, no flush of the pending step (as if killed)
    assert not host.contains("k/manifest")
    back = kvstream.StreamingCache.load(host, "k", config=model.config, recover=True)
    assert back.get_seq_length() == 20 + 8
    for x, y in zip(cache.layers, back.layers):
        assert torch.equal(x.keys[:, :, :28], y.keys) and torch.equal(x.values[:, :, :28], y.values)
    # generate recomputes what did not land and goes on exactly
    more = _gen(model, first.sequences[:, :29], back, 12 - 9)
    assert torch.equal(more.sequences, full.sequences[:, :32])


def test_a_forward_that_skips_the_last_layers_is_streamed_as_it_happened(host):
    """An early-exit draft updates only the first layers: the steps before it go out, then its own KV."""
    model = _model()
    cfg = model.config
    L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    caches = [kvstream.StreamingCache(config=cfg, transport=host, session=f"e{n}", steps_per_chunk=n) for n in (1, 3)]
    for tokens, layers in [(20, L), (1, L), (1, L), (1, 2), (1, 2)]:
        for l in range(layers):
            k, v = (torch.randn(2, H, tokens, D, generator=gen) for _ in range(2))
            for c in caches:
                c.update(k, v, l)
    for c in caches:
        c.wait()
    # the same history either way: two whole steps, then the partial forwards of layers 0-1
    for c in caches:
        steps = [(s["start"], s["tokens"], s["layers"]) for s in c.manifest()["segments"] if s["kind"] == "all"]
        assert [t for _, t, _ in steps] == ([1, 1, 1, 1] if c.steps_per_chunk == 1 else [2, 1, 1])
        assert steps[-1][2] == [0, 1] and steps[-2][2] == [0, 1]
    a, b = caches
    for l in range(L):
        assert a.layers[l].get_seq_length() == b.layers[l].get_seq_length() == (24 if l < 2 else 22)


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "8"])
def test_bad_steps_per_chunk(bad):
    with pytest.raises(ConfigError, match="steps_per_chunk"):
        kvstream.StreamingCache(transport=kvstream.HostTransport(capacity_bytes=1 << 20), steps_per_chunk=bad)


@pytest.mark.parametrize("flavour", ["dynamic", "static"])
def test_decode_chunks_are_written_in_place_into_a_host_transport(host, monkeypatch, flavour):
    """The step chunks go through HostTransport.flush_into (packed straight into the stored buffer; on a GPU,
    zero-copy), not through a packed chunk and flush; the prefill's layer chunks still go through flush. The
    session still loads to the cache bit-exactly."""
    model = _model()
    ids = batch_of_prompts(2, 20)
    flushed, written = [], []
    real_flush, real_into = host.flush, host.flush_into
    monkeypatch.setattr(host, "flush", lambda key, *a, **k: flushed.append(key) or real_flush(key, *a, **k))
    monkeypatch.setattr(host, "flush_into", lambda key, *a, **k: written.append(key) or real_into(key, *a, **k))
    if flavour == "dynamic":
        cache = kvstream.StreamingCache(config=model.config, transport=host, session="w", steps_per_chunk=4)
    else:
        cache = kvstream.StreamingStaticCache(model.config, 40, host, session="w", steps_per_chunk=4)
    _gen(model, ids, cache, 10)
    cache.wait()
    assert written and all(k.endswith("/all") for k in written)
    assert len(written) == len(_step_tokens(cache)) == 3  # 9 decode steps in chunks of 4, 4 and 1
    assert not any(k.endswith("/all") for k in flushed)
    assert sum(k.split("/")[-1].startswith("layer") for k in flushed) == len(model.model.layers)
    back = kvstream.StreamingCache.load(host, "w", config=model.config, stream=False)
    for layer, b in zip(cache.layers, back.layers):
        n = b.keys.shape[-2]
        assert torch.equal(layer.keys[:, :, :n], b.keys) and torch.equal(layer.values[:, :, :n], b.values)
