"""Load or recompute by cost, and the compute/load split: the decision with fake tiers and timings, the split at
several points on several architectures (tokens identical to no reuse), the measured inputs and their caches."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

import kvstream
from kvstream.errors import ConfigError
from kvstream.integrations.hf import reuse
from kvstream.models import build_model, encode_text, prompts, tiny_config
from kvstream.stores.cost import Calibration, PrefillTime, TierCost, plan_reuse, predict
from kvstream.integrations.hf.keywords import cache_kwargs

#: A prefill time where 1000 tokens cost 0.1 s (plus 5 ms per forward).
PREFILL = PrefillTime(a_s=5e-3, b_s=1e-4, c_s=0.0)
FAST = TierCost(fetch_Bps=None, copy_Bps=1e12)   # host memory, a fast copy engine
SLOW = TierCost(fetch_Bps=1e3, copy_Bps=1e12)    # a disk reading a kilobyte per second


def _greedy(model, ids, cache, n=5):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=n,
                              do_sample=False, pad_token_id=0)


def _conversation(model, store, tokens=60):
    """One turn stored; returns the next turn's prompt (the stored turn plus a follow-up) and its reference output."""
    ids = torch.tensor([encode_text(prompts()[0], tokens)])
    cache = DynamicCache(config=model.config)
    out = _greedy(model, ids, cache)
    store.update(out, cache)
    nxt = torch.cat([out, torch.tensor([encode_text(prompts()[1], 10)])], dim=1)
    return nxt, _greedy(model, nxt, DynamicCache(config=model.config))


@pytest.fixture(scope="module")
def llama():
    return build_model(tiny_config("llama"), seed=3)


# -- the decision --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layerwise", [False, True])
def test_a_slow_tier_is_not_used_and_a_fast_one_is(llama, layerwise):
    store = kvstream.RadixStore(capacity_bytes=8 << 20)
    nxt, ref = _conversation(llama, store)
    store.tier_cost = SLOW
    cache = kvstream.StreamingCache.from_prefix(store, nxt, config=llama.config, prefill=PREFILL, layerwise=layerwise)
    plan = cache.reuse_plan
    assert plan.choice == "recompute" and plan.loaded_tokens == 0 and plan.recomputed_tokens == nxt.shape[1]
    assert cache.matched_tokens == 0 and cache.get_seq_length() == 0 and store.pinned() == 0
    assert plan.predicted_s == plan.recompute_s == pytest.approx(PREFILL(nxt.shape[1]))
    assert torch.equal(_greedy(llama, nxt, cache), ref)
    assert plan.actual_s is not None and plan.actual_s > 0

    store.tier_cost = FAST
    cache = kvstream.StreamingCache.from_prefix(store, nxt, config=llama.config, prefill=PREFILL, layerwise=layerwise)
    plan = cache.reuse_plan
    assert plan.choice == "load" and plan.loaded_tokens == plan.stored_tokens == cache.matched_tokens > 0
    assert plan.predicted_s < plan.recompute_s
    assert torch.equal(_greedy(llama, nxt, cache), ref)
    assert store.pinned() == 0 and plan.actual_s > 0
    store.close()


def test_a_middling_tier_is_split_when_the_model_is_given(llama):
    store = kvstream.RadixStore(capacity_bytes=8 << 20)
    nxt, ref = _conversation(llama, store)
    # a model 10x slower than PREFILL: the lookup's measured host time (part of every prediction) stays far
    # below the margin even on a loaded machine, so the choice depends on the costs alone
    prefill = PrefillTime(a_s=10 * PREFILL.a_s, b_s=10 * PREFILL.b_s, c_s=0.0)
    m = store.query(nxt[0, :-1])
    per_token = store.lookup(nxt).bytes_per_token
    # a tier that loads the prefix in exactly the time the model recomputes it: both halves at once win
    store.tier_cost = TierCost(fetch_Bps=per_token / prefill.b_s, copy_Bps=1e15)
    cache = kvstream.StreamingCache.from_prefix(store, nxt, model=llama, prefill=prefill, layerwise=False)
    plan = cache.reuse_plan
    assert plan.choice == "split" and 0 < plan.front_tokens < m
    assert plan.front_tokens + plan.loaded_tokens == plan.stored_tokens == cache.matched_tokens
    front, load = prefill(plan.front_tokens), store.tier_cost.fetch_s(plan.loaded_tokens * per_token)
    assert abs(front - load) <= 2 * prefill.b_s  # both halves finish together (within a token)
    assert torch.equal(_greedy(llama, nxt, cache), ref)
    # the same tier without the model cannot split: it loads (or recomputes) whole
    cache = kvstream.StreamingCache.from_prefix(store, nxt, config=llama.config, prefill=prefill)
    assert cache.reuse_plan.choice in ("load", "recompute")
    store.close()


def test_without_a_prefill_time_whatever_matched_is_loaded(llama):
    store = kvstream.RadixStore(capacity_bytes=8 << 20)
    nxt, ref = _conversation(llama, store)
    store.tier_cost = SLOW  # not consulted: there is nothing to compare it with
    cache = kvstream.StreamingCache.from_prefix(store, nxt, config=llama.config)
    assert cache.reuse_plan.choice == "load (unplanned)" and cache.matched_tokens > 0
    assert torch.equal(_greedy(llama, nxt, cache), ref)
    cache = kvstream.StreamingCache.from_prefix(store, nxt, config=llama.config, prefill=PREFILL, reuse="load")
    assert cache.reuse_plan.choice == "load" and cache.matched_tokens > 0
    with pytest.raises(ConfigError, match="reuse"):
        kvstream.StreamingCache.from_prefix(store, nxt, config=llama.config, reuse="sometimes")
    with pytest.raises(ConfigError, match="front_tokens"):
        kvstream.StreamingCache.from_prefix(store, nxt, config=llama.config, front_tokens=8)
    assert store.pinned() == 0
    store.close()


def test_plan_reuse_balances_compute_and_load():
    per_token = 1000.0
    tier = TierCost(fetch_Bps=per_token / 2e-4, copy_Bps=1e15)  # loading a token costs twice computing it
    plan = plan_reuse(2000, 1800, per_token, tier, PREFILL, layers=4, granularity=16)
    assert plan.choice == "split" and plan.front_tokens % 16 == 0
    assert abs(PREFILL(plan.front_tokens) - tier.fetch_s((1800 - plan.front_tokens) * per_token)) < 16 * 2e-4
    whole = predict(2000, 1800, 0, per_token, tier, PREFILL, layers=4, layerwise=True)
    assert plan.predicted_s < min(whole, plan.recompute_s)
    assert plan_reuse(2000, 1800, per_token, tier, PREFILL, layers=4, split=False).choice == "recompute"
    assert plan_reuse(2000, 0, per_token, tier, PREFILL, layers=4).choice == "none"


# -- the split -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("store_kind", ["radix", "file"])
@pytest.mark.parametrize("layerwise", [False, True])
def test_split_at_several_points_is_identical_to_no_reuse(arch, store_kind, layerwise, tmp_path):
    model = build_model(tiny_config(arch), seed=3)
    store = (kvstream.RadixStore(capacity_bytes=8 << 20) if store_kind == "radix"
             else kvstream.ChunkFileStore(tmp_path / "kv", chunk_tokens=8, config=model.config))
    nxt, ref = _conversation(model, store)
    m = store.query(nxt[0, :-1])
    assert m >= 48
    for x in (8, 24, m - 8):
        cache = kvstream.StreamingCache.from_prefix(store, nxt, model=model, front_tokens=x, layerwise=layerwise)
        plan = cache.reuse_plan
        assert plan.choice == "split" and plan.front_tokens == x and plan.loaded_tokens == m - x
        assert cache.matched_tokens == m and cache.get_seq_length() == m
        out = _greedy(model, nxt, cache)
        assert torch.equal(out, ref), (arch, store_kind, layerwise, x)
        assert store.pinned() == 0 and plan.actual_s > 0
    store.close()


def test_a_split_whose_load_is_shortened_keeps_the_front(llama, tmp_path):
    from kvstream.chunk import HEADER_BYTES

    store = kvstream.ChunkFileStore(tmp_path / "kv", chunk_tokens=8, config=llama.config)
    nxt, ref = _conversation(llama, store)
    path = store.path(store.keys_for(nxt[0].tolist())[3])  # tokens [24, 32)
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 100] ^= 0x10
    path.write_bytes(bytes(data))
    cache = kvstream.StreamingCache.from_prefix(store, nxt, model=llama, front_tokens=16, layerwise=True)
    assert cache.matched_tokens == 24 and cache.reuse_plan.loaded_tokens == 8
    assert torch.equal(_greedy(llama, nxt, cache), ref)
    store.close()


# -- measured inputs -----------------------------------------------------------------------------------------
def test_prefill_time_fit_recovers_its_coefficients():
    truth = PrefillTime(2e-3, 3e-5, 4e-9)
    samples = [(n, p, truth(n, p)) for n, p in [(128, 0), (512, 0), (2048, 0), (512, 1024), (4096, 0)]]
    fit = PrefillTime.fit(samples)
    for got, want in zip((fit.a_s, fit.b_s, fit.c_s), (truth.a_s, truth.b_s, truth.c_s)):
        assert got == pytest.approx(want, rel=1e-6)
    flat = PrefillTime.fit([(100, 0, 1.0), (200, 0, 1.0), (400, 0, 1.0)])  # no coefficient goes negative
    assert flat.a_s == pytest.approx(1.0) and flat.b_s >= 0 and flat.c_s >= 0


def test_prefill_time_is_measured_once_and_cached_per_model(llama, monkeypatch):
    calls = []
    real = reuse.measure_prefill

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, lengths=[16, 32, 64], reps=1)

    monkeypatch.setattr(reuse, "measure_prefill", counting)
    first = reuse.prefill_time(llama, torch.device("cpu"))
    again = reuse.prefill_time(llama, torch.device("cpu"))
    assert len(calls) == 1 and first == again and first.a_s >= 0 and first.b_s >= 0
    other = build_model(tiny_config("llama", num_layers=2), seed=3)
    reuse.prefill_time(other, torch.device("cpu"))
    assert len(calls) == 2  # another model, another entry
    doc = json.loads((kvstream.stores.cost.cache_dir() / "prefill.json").read_text())
    assert len(doc) == 2


def test_calibration_is_replaced_when_observed_loads_drift(tmp_path):
    cal = Calibration(tmp_path / "cost.json", "host:buffered")
    assert cal.get() is None
    cal.set(1e9, 1e-3, "probe")
    assert not cal.observe(int(1.1e9), 1.0)  # 10 %: within the drift bound
    assert Calibration(tmp_path / "cost.json", "host:buffered").get()["fetch_Bps"] == 1e9
    for _ in range(5):
        drifted = cal.observe(int(3e9), 1.0)
        if drifted:
            break
    assert drifted and cal.get()["how"] == "observed" and cal.get()["fetch_Bps"] > 1.25e9
    assert Calibration(tmp_path / "cost.json", "host:buffered").get()["fetch_Bps"] == cal.get()["fetch_Bps"]


@pytest.mark.gpu
@pytest.mark.parametrize("store_kind", ["radix", "file"])
def test_gpu_split_is_identical_to_no_reuse(store_kind, tmp_path, cuda_device, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # an exact float32 comparison
    model = build_model(tiny_config("llama"), seed=3, device=cuda_device)
    store = (kvstream.RadixStore(capacity_bytes=8 << 20) if store_kind == "radix"
             else kvstream.ChunkFileStore(tmp_path / "kv", chunk_tokens=8, config=model.config))
    ids = torch.tensor([encode_text(prompts()[0], 60)], device=cuda_device)
    cache = DynamicCache(config=model.config)
    out = _greedy(model, ids, cache)
    store.update(out, cache)
    nxt = torch.cat([out, torch.tensor([encode_text(prompts()[1], 10)], device=cuda_device)], dim=1)
    ref = _greedy(model, nxt, DynamicCache(config=model.config))
    for x in (8, 32):
        cache = kvstream.StreamingCache.from_prefix(store, nxt, model=model, front_tokens=x)  # layer-wise on a GPU
        assert cache.reuse_plan.choice == "split" and cache._pending is not None
        assert torch.equal(_greedy(model, nxt, cache), ref)
        assert store.pinned() == 0 and cache.reuse_plan.actual_s > 0
    store.close()
