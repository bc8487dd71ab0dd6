"""StreamingStaticCache: identical to HF's StaticCache inside generate, the same session as StreamingCache,
and no graph breaks or recompiles under torch.compile."""

import gc
import json

import pytest
import torch
from transformers import StaticCache

import kvstream
from kvstream.errors import ConfigError
from kvstream.integrations.hf.keywords import cache_kwargs
from kvstream.models import batch_of_prompts, build_model, tiny_config

MAX_LEN = 48


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config("llama"), seed=7)


@pytest.fixture
def host():
    t = kvstream.HostTransport(capacity_bytes=64 << 20)
    yield t
    t.close()


def _gen(model, ids, cache, new=6, **kw):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), pad_token_id=0,
                              max_new_tokens=new, min_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                              output_scores=True, **kw)


def _same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.scores) == len(b.scores) and all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))


def _session_chunks(t, session):
    return {k[len(session):]: t.fetch_new(k, "cpu") for k in t.keys(session + "/") if not k.endswith("manifest")}


@pytest.mark.parametrize("level,steps_per_chunk", [(3, 16), (3, 1), (1, 16), (0, 2)])
@pytest.mark.parametrize("prompt", [24, 8])  # a prompt streamed per layer, and one short enough to be a "step"
def test_tokens_scores_and_session_match(model, host, level, prompt, steps_per_chunk):
    ids = batch_of_prompts(2, prompt)
    ref_cache = StaticCache(config=model.config, max_cache_len=MAX_LEN)
    ref = _gen(model, ids, ref_cache)
    opts = dict(level=level, steps_per_chunk=steps_per_chunk)
    cache = kvstream.StreamingStaticCache(model.config, MAX_LEN, host, session=f"s{level}-{prompt}", **opts)
    out = _gen(model, ids, cache)
    cache.wait()
    _same(ref, out)
    # the session holds exactly the KV StaticCache ended with, bit for bit
    back = kvstream.StreamingCache.load(host, f"s{level}-{prompt}", config=model.config, stream=False)
    seq = prompt + 5
    for l, layer in enumerate(back.layers):
        assert torch.equal(layer.keys, ref_cache.layers[l].keys[:, :, :seq])
        assert torch.equal(layer.values, ref_cache.layers[l].values[:, :, :seq])
    # and is laid out as StreamingCache lays out the same generate: same keys, same manifest
    dyn = kvstream.StreamingCache(config=model.config, transport=host, session=f"d{level}-{prompt}", **opts)
    _gen(model, ids, dyn)
    dyn.wait()
    a, b = _session_chunks(host, f"s{level}-{prompt}"), _session_chunks(host, f"d{level}-{prompt}")
    step_chunks = -(-5 // steps_per_chunk)  # the 5 decode steps, steps_per_chunk to a chunk
    assert a.keys() == b.keys() and len(a) == step_chunks + (4 if prompt > 16 else 1)
    assert all(a[k].shape == b[k].shape for k in a)
    def same_form(doc, name):  # a run's own id (random) and the checksum over it differ by design
        doc = {k: v for k, v in doc.items() if k not in ("run", "runs", "checksum")}
        return json.dumps(doc).replace(f'"{name}', '"S')

    assert same_form(cache.manifest(), f"s{level}-{prompt}") == same_form(dyn.manifest(), f"d{level}-{prompt}")


def test_load_either_into_either(model, host):
    ids = batch_of_prompts(2, 20)
    full = _gen(model, ids, StaticCache(config=model.config, max_cache_len=MAX_LEN), new=10)
    c = kvstream.StreamingStaticCache(model.config, MAX_LEN, host, session="st2")
    first = _gen(model, ids, c, new=5)
    c.wait()
    dyn = kvstream.StreamingCache.load(host, "st2", config=model.config, stream=False)
    more = _gen(model, first.sequences, dyn, new=5)
    assert torch.equal(more.sequences, full.sequences)
    d = kvstream.StreamingCache(config=model.config, transport=host, session="dy")
    first = _gen(model, ids, d, new=5)
    d.wait()
    st = kvstream.StreamingStaticCache.load(host, "dy", config=model.config, max_cache_len=MAX_LEN)
    more = _gen(model, first.sequences, st, new=5)
    assert torch.equal(more.sequences, full.sequences)


def test_refuses_sliding_window_layers():
    cfg = tiny_config("mistral", sliding_window=8)
    cfg.layer_types = ["sliding_attention"] * cfg.num_hidden_layers
    with pytest.raises(ConfigError, match="StaticLayer"):
        kvstream.StreamingStaticCache(cfg, MAX_LEN, None)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_forward_no_graph_breaks_no_recompiles(backend, host):
    """``model.forward = torch.compile(model.forward)``: the same tokens, scores and KV as HF's StaticCache
    under the same compiled forward, no graph break, and a second cache reuses the graphs of the first."""
    import torch._dynamo as dynamo

    model = build_model(tiny_config("llama", num_layers=2), seed=7)
    ids = batch_of_prompts(2, 24)
    dynamo.reset()
    model.forward = torch.compile(model.forward, backend=backend)
    try:
        ref_cache = StaticCache(config=model.config, max_cache_len=MAX_LEN)
        ref = _gen(model, ids, ref_cache, new=4)
        dynamo.utils.counters.clear()
        for i in range(2):
            gc.collect()  # caches of earlier tests are gone
            session = f"c{backend}{i}"
            cache = kvstream.StreamingStaticCache(model.config, MAX_LEN, host, session=session)
            out = _gen(model, ids, cache, new=4)
            cache.wait()
            _same(ref, out)
            del cache, out  # one streaming cache alive at a time (aot_eager hands the op copies of the buffers)
            back = kvstream.StreamingCache.load(host, session, config=model.config, stream=False)
            for l, layer in enumerate(back.layers):
                assert torch.equal(layer.keys, ref_cache.layers[l].keys[:, :, :27])
                assert torch.equal(layer.values, ref_cache.layers[l].values[:, :, :27])
        counters = dynamo.utils.counters
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == 2  # the prefill and the decode step, for both caches
    finally:
        del model.forward
        dynamo.reset()
