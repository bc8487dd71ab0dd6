"""The fast path of eager decode steps (:func:`kvstream.integrations.hf.tail.hook_edges`): between the first and
the last KV layer a step does not enter kvstream at all, the result is the same, and what is not a regular step
(or a step that skipped a middle layer) is never streamed at the wrong positions."""

import gc
import weakref

import pytest
import torch
from transformers import DynamicCache, StaticCache

import kvstream
from kvstream.errors import KVStreamError
from kvstream.integrations.hf.keywords import cache_kwargs
from kvstream.models import batch_of_prompts, build_model, tiny_config

MAX_LEN = 48


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config("llama", num_layers=4), seed=11)


@pytest.fixture
def host():
    t = kvstream.HostTransport(capacity_bytes=64 << 20)
    yield t
    t.close()


def _gen(model, ids, cache, new):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), pad_token_id=0,
                              do_sample=False, max_new_tokens=new, min_new_tokens=new, return_dict_in_generate=True,
                              output_scores=True)


def _make(flavour, model, host, session, **kw):
    if flavour == "static":
        return kvstream.StreamingStaticCache(model.config, MAX_LEN, host, session=session, **kw)
    return kvstream.StreamingCache(config=model.config, transport=host, session=session, **kw)


def _ref(flavour, model):
    return StaticCache(config=model.config, max_cache_len=MAX_LEN) if flavour == "static" else DynamicCache(config=model.config)


@pytest.mark.parametrize("flavour", ["dynamic", "static"])
def test_middle_layers_skip_the_hook_and_nothing_changes(model, host, flavour, monkeypatch):
    cls = kvstream.StreamingStaticCache if flavour == "static" else kvstream.StreamingCache
    calls = []
    real = cls.update

    def spy(self, key_states, value_states, layer_idx, *args, **kwargs):
        calls.append((layer_idx, key_states.shape[-2]))
        return real(self, key_states, value_states, layer_idx, *args, **kwargs)

    monkeypatch.setattr(cls, "update", spy)
    ids = batch_of_prompts(2, 20)
    ref_cache = _ref(flavour, model)
    ref = _gen(model, ids, ref_cache, 10)  # a prefill and 9 decode steps
    cache = _make(flavour, model, host, f"f{flavour}", steps_per_chunk=4)
    out = _gen(model, ids, cache, 10)
    assert torch.equal(ref.sequences, out.sequences)
    assert all(torch.equal(x, y) for x, y in zip(ref.scores, out.scores))
    # the prefill and the first two decode steps enter the hook at every layer (the second step ending proves a
    # run of eager decode steps); from the third on, none enters the class's update
    assert calls == [(l, 20) for l in range(4)] + [(l, 1) for l in range(4)] * 2
    assert "update" in cache.__dict__ and cache._hooked is not None
    cache.wait()  # closes the tail: the hooks go
    assert "update" not in cache.__dict__ and cache._hooked is None
    assert all("update" not in layer.__dict__ for layer in cache.layers)
    back = kvstream.StreamingCache.load(host, f"f{flavour}", config=model.config, stream=False)
    for l, layer in enumerate(back.layers):
        assert torch.equal(layer.keys, ref_cache.layers[l].keys[:, :, :29])
        assert torch.equal(layer.values, ref_cache.layers[l].values[:, :, :29])


@pytest.mark.parametrize("flavour", ["dynamic", "static"])
def test_a_longer_forward_after_decode_steps_closes_the_fast_path(model, host, flavour):
    """generate, then generate again from the whole sequence (a prefill of the new tokens): same as the
    reference both times, and the session loads the whole cache bit for bit."""
    ids = batch_of_prompts(2, 12)
    ref_cache = _ref(flavour, model)
    ref1 = _gen(model, ids, ref_cache, 6)
    nxt = torch.cat([ref1.sequences, batch_of_prompts(2, 18)[:, :5]], dim=1)
    ref2 = _gen(model, nxt, ref_cache, 5)
    cache = _make(flavour, model, host, f"l{flavour}", steps_per_chunk=16)
    out1 = _gen(model, ids, cache, 6)
    assert cache._hooked is not None  # 5 decode steps pending, hooked
    out2 = _gen(model, nxt, cache, 5)
    cache.wait()
    assert torch.equal(out1.sequences, ref1.sequences) and torch.equal(out2.sequences, ref2.sequences)
    seq = nxt.shape[1] + 4
    back = kvstream.StreamingCache.load(host, f"l{flavour}", config=model.config, stream=False)
    for l, layer in enumerate(back.layers):
        assert torch.equal(layer.keys, ref_cache.layers[l].keys[:, :, :seq])
        assert torch.equal(layer.values, ref_cache.layers[l].values[:, :, :seq])


def _kv_maker(cfg):
    """New ``[1, H, n, D]`` keys and values of ``cfg``'s shape, seeded."""
    H, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    return lambda n: [torch.randn(1, H, n, D, generator=gen) for _ in range(2)]


def test_a_step_that_skips_a_middle_layer_is_refused_not_streamed(model, host):
    cache = kvstream.StreamingCache(config=model.config, transport=host, session="skip", steps_per_chunk=3)
    kv = _kv_maker(model.config)
    for l in range(4):
        cache.update(*kv(8), l)
    for _ in range(2):  # two regular steps: the tail is open and its middle layers skip the hook
        for l in range(4):
            cache.update(*kv(1), l)
    assert cache._hooked is not None
    with pytest.raises(KVStreamError, match="KV layer 2 holds 10 positions where the pending decode steps end at 11"):
        for l in (0, 1, 3):  # layer 2 skipped: the chunk due now would put its KV at the wrong positions
            cache.update(*kv(1), l)


def test_a_step_that_skips_a_middle_layer_at_one_step_per_chunk_is_streamed_as_it_happened(model, host):
    """At one step per chunk each step counts its layers (no fast path), as the per-step path always did."""
    cache = kvstream.StreamingCache(config=model.config, transport=host, session="skip1", steps_per_chunk=1)
    kv = _kv_maker(model.config)
    for layers, n in [(range(4), 8), (range(4), 1), ((0, 1, 3), 1)]:
        for l in layers:
            cache.update(*kv(n), l)
    assert cache._hooked is None
    cache.wait()
    steps = [s["layers"] for s in cache.manifest()["segments"] if s["kind"] == "all"]
    assert steps == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 3]]  # the 8-token forward, a step, the step without layer 2


@pytest.mark.parametrize("flavour", ["dynamic", "static"])
def test_a_dropped_cache_with_hooked_layers_is_freed_without_the_cyclic_gc(model, host, flavour):
    ids = batch_of_prompts(1, 10)
    gc.collect()
    gc.disable()
    try:
        cache = _make(flavour, model, host, f"g{flavour}", steps_per_chunk=16)
        _gen(model, ids, cache, 4)
        assert cache._hooked is not None
        ref = weakref.ref(cache.layers[1].keys)
        first = cache.layers[0]  # a hooked edge layer that outlives its cache
        del cache
        assert ref() is None
        k = torch.ones_like(first.keys[:, :, :1])
        n0 = int(first.get_seq_length())
        with torch.inference_mode():  # the cache was filled inside generate's inference mode
            keys, _ = first.update(k, k)  # a plain layer again
        assert "update" not in first.__dict__ and torch.equal(keys[:, :, n0:n0 + 1], k)
    finally:
        gc.enable()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_forward_compiled_while_an_eager_tail_is_hooked(host, backend):
    """Eager decode steps (hooked), then ``model.forward`` compiled and generate continued on the same cache: the
    traced hooks do what the compiled update does, the step's op closes the fast path, and the session holds the
    cache bit for bit."""
    import torch._dynamo as dynamo

    gc.collect()  # the caches of earlier tests are gone (aot_eager hands the op copies of the buffers)
    model = build_model(tiny_config("llama", num_layers=3), seed=5)
    ids = batch_of_prompts(2, 20)
    ref_cache = StaticCache(config=model.config, max_cache_len=MAX_LEN)
    cache = kvstream.StreamingStaticCache(model.config, MAX_LEN, host, session=f"mix{backend}")
    ref1, out1 = _gen(model, ids, ref_cache, 4), _gen(model, ids, cache, 4)
    assert cache._hooked is not None
    dynamo.reset()
    model.forward = torch.compile(model.forward, backend=backend)
    try:
        ref2 = _gen(model, ref1.sequences, ref_cache, 5)
        out2 = _gen(model, out1.sequences, cache, 5)
    finally:
        del model.forward
        dynamo.reset()
    assert torch.equal(ref1.sequences, out1.sequences) and torch.equal(ref2.sequences, out2.sequences)
    assert cache._hooked is None
    cache.wait()
    seq = ref2.sequences.shape[1] - 1
    back = kvstream.StreamingCache.load(host, f"mix{backend}", config=model.config, stream=False)
    for l, layer in enumerate(back.layers):
        assert torch.equal(layer.keys, ref_cache.layers[l].keys[:, :, :seq])
        assert torch.equal(layer.values, ref_cache.layers[l].values[:, :, :seq])


def test_generate_compiling_the_decode_steps_itself_after_a_short_eager_prefill(host):
    """What ``generate`` does for a static cache on a GPU (the decode steps compiled, the prefill not), with a
    prompt short enough to open a tail: the hooks are never installed, nothing breaks the graph, and a second
    cache runs on the graphs of the first."""
    import torch._dynamo as dynamo
    from transformers import CompileConfig

    gc.collect()
    model = build_model(tiny_config("llama", num_layers=3), seed=5)
    ids = batch_of_prompts(2, 8)  # <= layer_chunk_min_tokens: the eager prefill is streamed as one step
    config = CompileConfig(backend="eager", fullgraph=False)
    config._compile_all_devices = True  # transformers' own switch to compile off a GPU
    dynamo.reset()
    try:
        ref_cache = StaticCache(config=model.config, max_cache_len=MAX_LEN)
        with torch.inference_mode():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(ref_cache), pad_token_id=0,
                                 do_sample=False, max_new_tokens=6, min_new_tokens=6, compile_config=config)
        graphs = []
        for i in range(2):
            gc.collect()
            cache = kvstream.StreamingStaticCache(model.config, MAX_LEN, host, session=f"hf{i}")
            dynamo.utils.counters.clear()
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), pad_token_id=0,
                                     do_sample=False, max_new_tokens=6, min_new_tokens=6, compile_config=config)
            assert cache._hooked is None
            cache.wait()
            assert torch.equal(out, ref)
            assert sum(dynamo.utils.counters["graph_break"].values()) == 0, dict(dynamo.utils.counters["graph_break"])
            graphs.append(dynamo.utils.counters["stats"]["unique_graphs"])
            del cache
            back = kvstream.StreamingCache.load(host, f"hf{i}", config=model.config, stream=False)
            for l, layer in enumerate(back.layers):
                assert torch.equal(layer.keys, ref_cache.layers[l].keys[:, :, :13])
        assert graphs[0] >= 1 and graphs[1] == 0  # generate compiled the decode step, once for both caches
    finally:
        dynamo.reset()
