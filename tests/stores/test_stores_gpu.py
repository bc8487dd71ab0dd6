"""Prefix stores on the GPU: pinned blobs, loads onto the device, reuse in generate (run on the device machine)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvstream.models import build_model, encode_text, prompts, tiny_config
from kvstream.integrations.hf.prefix import load_prefix_into
from kvstream.integrations.hf.keywords import cache_kwargs
from kvstream.stores import ChunkFileStore, RadixStore
from store_helpers import prefix_kv

pytestmark = pytest.mark.gpu


def _cuda_kv(ids, dtype=torch.bfloat16):
    keys, values = prefix_kv(ids, layers=4, heads=8, head_dim=128, dtype=dtype)
    return [k.cuda() for k in keys], [v.cuda() for v in values]


def _check(match, keys, values, n):
    assert match.matched_tokens == n
    for l in range(len(keys)):
        assert match.keys[l].is_cuda
        assert torch.equal(match.keys[l], keys[l][:, :, :n]) and torch.equal(match.values[l], values[l][:, :, :n])


def test_radix_store_pinned_round_trip_and_release_after_async_copies(cuda_device):
    ids = list(range(300))
    keys, values = _cuda_kv(ids)
    per_token = sum(k.numel() * k.element_size() for k in keys + values) // len(ids)
    s = RadixStore(capacity_bytes=400 * per_token)
    assert s.update_kv(ids, keys, values) == 300
    blob = next(iter(s._data.values()))
    assert blob.is_pinned()
    m = s.lookup(ids)
    m.load(cuda_device)
    m.release()  # waits for the copies out of the pinned blob; then the blob may go
    for i in range(4):  # evict it (and reuse its pinned block)
        other = [1000 + i] * 300
        k2, v2 = _cuda_kv(other)
        s.update_kv(other, k2, v2)
    assert s.query(ids) == 0
    torch.cuda.synchronize()
    for l in range(len(keys)):
        assert torch.equal(m.keys[l], keys[l]) and torch.equal(m.values[l], values[l])


@pytest.mark.parametrize("direct", [False, True])
def test_chunk_file_store_cuda_round_trip(tmp_path, cuda_device, direct):
    ids = list(range(300))
    keys, values = _cuda_kv(ids)
    s = ChunkFileStore(tmp_path / "kv", chunk_tokens=64, direct=direct)
    assert s.update_kv(ids, keys, values) == 256
    with s.fetch_prefix(ids, device=cuda_device) as m:
        _check(m, keys, values, 256)
    with s.fetch_prefix(ids, device=cuda_device, max_tokens=200) as m:
        _check(m, keys, values, 200)
    s.close()


@pytest.mark.parametrize("kind", ["radix", "file"])
def test_reuse_on_the_gpu_is_identical(tmp_path, cuda_device, kind):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_model(tiny_config("llama", num_layers=2), seed=0, device=cuda_device)
    store = RadixStore(capacity_bytes=1 << 26) if kind == "radix" else ChunkFileStore(tmp_path / "kv", chunk_tokens=8)
    history: list[int] = []
    for turn in range(3):
        ids = torch.tensor([history + encode_text(prompts()[turn], 24)], device=cuda_device)
        kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids),
                  pad_token_id=0)
        ref = model.generate(ids, **kw)
        cache = DynamicCache(config=model.config)
        matched = load_prefix_into(cache, store, ids, device=cuda_device)
        assert (matched > 0) == (turn > 0)
        out = model.generate(ids, **cache_kwargs(cache), **kw)
        assert torch.equal(out, ref)
        store.update(out, cache)
        history = out[0].tolist()
    store.close()
