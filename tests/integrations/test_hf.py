"""StreamingCache inside generate: identical to DynamicCache, and a stored session resumes exactly."""

import pytest
import torch
from transformers import DynamicCache

import kvstream
from kvstream.integrations.hf.keywords import cache_kwargs
from kvstream.models import batch_of_prompts, build_model, tiny_config

ARCHS = ["llama", "gpt2", "opt", "bloom"]


def _model(arch, **kw):
    return build_model(tiny_config(arch, **kw), seed=7)


def _inputs(batch=2, length=24, pad_rows=1):
    ids = batch_of_prompts(batch, length)
    mask = torch.ones_like(ids)
    for r in range(pad_rows):  # left padding, as batched generate uses
        ids[r, :5] = 0
        mask[r, :5] = 0
    return ids, mask


def _gen(model, ids, mask, cache, **kw):
    kw.setdefault("max_new_tokens", 6)
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, **cache_kwargs(cache), pad_token_id=0,
                              return_dict_in_generate=True, output_scores=True, **kw)


def check_same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.scores) == len(b.scores)
    for x, y in zip(a.scores, b.scores):
        assert torch.equal(x, y)


@pytest.fixture
def host():
    t = kvstream.HostTransport(capacity_bytes=64 << 20)
    yield t
    t.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_and_scores_identical(arch, host):
    model = _model(arch)
    ids, mask = _inputs()
    ref = _gen(model, ids, mask, DynamicCache(config=model.config), do_sample=False)
    cache = kvstream.StreamingCache(config=model.config, transport=host, session=f"g-{arch}")
    out = _gen(model, ids, mask, cache, do_sample=False)
    cache.wait()
    check_same(ref, out)
    assert cache.stats["bytes_out"] > 0
    assert host.contains(f"g-{arch}/manifest")


def test_sampling_identical(host):
    model = _model("llama")
    ids, mask = _inputs()
    torch.manual_seed(3)
    ref = _gen(model, ids, mask, DynamicCache(config=model.config), do_sample=True, top_k=20)
    torch.manual_seed(3)
    out = _gen(model, ids, mask, kvstream.StreamingCache(config=model.config, transport=host, session="s"),
               do_sample=True, top_k=20)
    check_same(ref, out)


def test_sliding_window_identical_and_resumes(host):
    model = _model("mistral", sliding_window=8)
    ids, mask = _inputs(pad_rows=0)
    ref = _gen(model, ids, mask, DynamicCache(config=model.config), do_sample=False, max_new_tokens=12)
    cache = kvstream.StreamingCache(config=model.config, transport=host, session="sw")
    out = _gen(model, ids, mask, cache, do_sample=False, max_new_tokens=6)
    cache.wait()
    cache2 = kvstream.StreamingCache.load(host, session="sw", config=model.config)
    for l1, l2 in zip(cache.layers, cache2.layers):
        assert torch.equal(l1.keys, l2.keys) and torch.equal(l1.values, l2.values)
        assert l1.get_seq_length() == l2.get_seq_length()
    more = _gen(model, out.sequences, torch.ones_like(out.sequences), cache2, do_sample=False, max_new_tokens=6)
    assert torch.equal(more.sequences, ref.sequences)


def test_beam_search_identical_and_replays(host):
    model = _model("llama")
    ids, mask = _inputs()
    ref = _gen(model, ids, mask, DynamicCache(config=model.config), num_beams=3, do_sample=False)
    cache = kvstream.StreamingCache(config=model.config, transport=host, session="beam")
    out = _gen(model, ids, mask, cache, num_beams=3, do_sample=False)
    cache.wait()
    assert torch.equal(ref.sequences, out.sequences)
    kinds = {s["kind"] for s in cache.manifest()["segments"]}
    assert "reorder" in kinds
    replay = kvstream.StreamingCache.load(host, session="beam", config=model.config)
    for l1, l2 in zip(cache.layers, replay.layers):
        assert torch.equal(l1.keys, l2.keys) and torch.equal(l1.values, l2.values)


@pytest.mark.parametrize("arch", ARCHS)
def test_resume_in_new_model_matches_uninterrupted(arch, tmp_path):
    ids, mask = _inputs(pad_rows=0)
    model = _model(arch)
    full = _gen(model, ids, mask, DynamicCache(config=model.config), do_sample=False, max_new_tokens=10)
    transport = kvstream.DiskTransport(str(tmp_path / "kv"))
    cache = kvstream.StreamingCache(config=model.config, transport=transport, session="r")
    first = _gen(model, ids, mask, cache, do_sample=False, max_new_tokens=5)
    cache.wait()
    del model, cache
    transport.close()
    model2 = _model(arch)  # a new model object with the same seeded weights
    transport2 = kvstream.DiskTransport(str(tmp_path / "kv"))
    cache2 = kvstream.StreamingCache.load(transport2, session="r", config=model2.config)
    assert cache2.get_seq_length() == first.sequences.shape[1] - 1
    more = _gen(model2, first.sequences, torch.ones_like(first.sequences), cache2, do_sample=False,
                max_new_tokens=5)
    assert torch.equal(more.sequences, full.sequences)
    transport2.close()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_offload_identical(arch):
    model = _model(arch)
    ids, mask = _inputs()
    ref = _gen(model, ids, mask, DynamicCache(config=model.config), do_sample=False)
    cache = kvstream.StreamingCache(config=model.config, offload=True)
    out = _gen(model, ids, mask, cache, do_sample=False)
    check_same(ref, out)


def test_levels_store_identical_bytes():
    model = _model("llama")
    ids, mask = _inputs()
    stored = []
    for level in (0, 1, 2, 3):
        t = kvstream.HostTransport(capacity_bytes=64 << 20)
        cache = kvstream.StreamingCache(config=model.config, transport=t, session="lv", level=level)
        _gen(model, ids, mask, cache, do_sample=False, max_new_tokens=4)
        cache.wait()
        keys = t.keys("lv/")
        stored.append({k: t.fetch_new(k) for k in keys if not k.endswith("manifest")})
        t.close()
    for other in stored[1:]:
        assert other.keys() == stored[0].keys()
        for k in stored[0]:
            assert torch.equal(other[k], stored[0][k]), k


def test_bad_level_and_unsupported_config():
    from kvstream.errors import ConfigError

    with pytest.raises(ConfigError):
        kvstream.StreamingCache(config=tiny_config("llama"), transport=kvstream.HostTransport(capacity_bytes=1 << 20),
                                level=7)


def test_missing_chunk_is_a_clear_error(host):
    model = _model("llama")
    ids, mask = _inputs()
    cache = kvstream.StreamingCache(config=model.config, transport=host, session="m")
    _gen(model, ids, mask, cache, do_sample=False, max_new_tokens=3)
    cache.wait()
    victim = [k for k in host.keys("m/") if "layer0002" in k][0]
    host.delete(victim)
    with pytest.raises(kvstream.ChunkNotFound, match="layer0002"):
        kvstream.StreamingCache.load(host, session="m", config=model.config)


@pytest.mark.parametrize("bad", ["", "/abs", "a/../b", ".."])
def test_bad_session_names(bad):
    from kvstream.errors import ConfigError

    with pytest.raises(ConfigError, match="session"):
        kvstream.StreamingCache(config=tiny_config("llama"), session=bad)
