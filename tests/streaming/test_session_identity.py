"""A session loads its own KV or raises: runs, moved chunks, another model, crafted manifests (issue 13,
items 1, 2, 3 and 6). Each test reproduces what the loader before it did: it replayed run 1's manifest
over run 2's chunks, accepted a renamed chunk file, loaded another geometry into a config (failing later
inside attention), or allocated what a small manifest claimed."""

from __future__ import annotations

import json
import os

import pytest
import torch

import kvstream
from kvstream.errors import CorruptChunkError, LayoutError
from kvstream.models import tiny_config
from kvstream.streaming import replay as replay_mod
from kvstream.streaming.session import Manifest, SessionKeys
from kvstream.integrations.hf import resume

from test_session import check_same_cache, forward

LAYERS, HEADS, DIM = 3, 2, 8


@pytest.fixture(params=["host", "disk"])
def transport(request, tmp_path):
    t = (kvstream.HostTransport(capacity_bytes=64 << 20) if request.param == "host"
         else kvstream.DiskTransport(tmp_path / "kv"))
    yield t
    t.close()


def stream(transport, gen, session="req", steps=3, batch=2, config=None, commit=True, **forward_kw):
    cache = kvstream.StreamingCache(config=config, transport=transport, session=session)
    forward(cache, gen, batch, 20, **forward_kw)
    for _ in range(steps):
        forward(cache, gen, batch, 1, **forward_kw)
    if commit:
        cache.wait()
    else:
        cache._settle()
        cache.streamer.wait()  # every chunk landed ... and the process "dies" before wait()
    return cache


def test_a_reused_session_name_never_mixes_two_runs(transport, seed):
    run1 = stream(transport, seed)
    assert kvstream.StreamingCache.load(transport, "req", stream=False).get_seq_length() == 23
    run2 = stream(transport, seed, steps=1, commit=False)  # same name, other KV, no manifest
    assert run2.run_id != run1.run_id
    with pytest.raises(CorruptChunkError, match="written by run"):
        kvstream.StreamingCache.load(transport, "req", stream=False)  # run 1's manifest, run 2's chunks
    run2.wait()  # now run 2 commits: its session loads, and run 1's leftover step chunks are gone
    check_same_cache(run2, kvstream.StreamingCache.load(transport, "req", stream=False))
    assert sorted(transport.keys("req/")) == sorted(Manifest.keys(run2.session_manifest()) + ["req/manifest"])


def test_a_session_keeps_its_runs_when_a_load_continues_it(transport, seed):
    stream(transport, seed)
    more = kvstream.StreamingCache.load(transport, "req")
    forward(more, seed, 2, 1)
    more.wait()
    runs = kvstream.StreamingCache.read_manifest(transport, "req").runs
    assert [r for _, r in runs][-1] == more.run_id and len(runs) == 2 and runs[1][0] == 4  # a prefill and 3 steps before it
    check_same_cache(more, kvstream.StreamingCache.load(transport, "req", stream=False))


def test_a_renamed_session_chunk_file_is_refused(tmp_path, seed):
    disk = kvstream.DiskTransport(tmp_path / "kv")
    stream(disk, seed)
    a, b = disk.path("req/seg000001/all"), disk.path("req/seg000002/all")  # two decode steps, same shape
    os.replace(a, b)
    os.replace(disk.path("req/seg000003/all"), a)
    with pytest.raises(CorruptChunkError, match="another key"):
        kvstream.StreamingCache.load(disk, "req", stream=False)
    disk.close()


def test_a_session_of_one_geometry_refuses_another_config(transport, seed):
    a = tiny_config("llama", num_layers=LAYERS)
    heads, dim = a.num_key_value_heads, a.head_dim
    stream(transport, seed, config=a, layers=LAYERS, heads=heads, dim=dim)
    other_heads = tiny_config("llama", num_layers=LAYERS)
    other_heads.num_key_value_heads = 4
    with pytest.raises(LayoutError, match="KV heads"):
        kvstream.StreamingCache.load(transport, "req", config=other_heads, stream=False)
    renamed = tiny_config("llama", num_layers=LAYERS)
    renamed._name_or_path = "another/model"  # same shape, another model
    with pytest.raises(LayoutError, match="another model"):
        kvstream.StreamingCache.load(transport, "req", config=renamed, stream=False)
    declared = tiny_config("llama", num_layers=LAYERS)
    declared.dtype = torch.float16
    with pytest.raises(LayoutError, match="declares"):
        kvstream.StreamingCache.load(transport, "req", config=declared, stream=False)
    loaded = kvstream.StreamingCache.load(transport, "req", config=a, stream=False)
    assert loaded.get_seq_length() == 23


# -- item 6: the manifest document ---------------------------------------------------------------------------
def _rewrite(transport, session, edit):
    """Replace a session's manifest by ``edit(doc)`` (a dict, or raw bytes), keeping its checksum as is."""
    key = SessionKeys(session).manifest
    doc = json.loads(bytes(transport.fetch_new(key).numpy()))
    new = edit(doc)
    raw = new if isinstance(new, bytes) else json.dumps(new).encode()
    transport.flush(key, torch.frombuffer(bytearray(raw), dtype=torch.uint8)).wait()


def test_an_edited_manifest_fails_its_checksum(transport, seed):
    stream(transport, seed)
    _rewrite(transport, "req", lambda d: {**d, "seq_length": 22, "segments": d["segments"][:-1]})
    with pytest.raises(CorruptChunkError, match="checksum"):
        kvstream.StreamingCache.load(transport, "req", stream=False)


@pytest.mark.parametrize("edit, match", [
    (lambda d: b'{"format": 2, "segments": ' + b"[" * 100000 + b"]" * 100000 + b"}", "valid JSON"),
    (lambda d: {k: v for k, v in d.items() if k != "session"}, "session"),
    (lambda d: {**d, "segments": 5}, "segments"),
    (lambda d: {**d, "kv_heads": 10 ** 9}, "kv_heads"),
    (lambda d: {**d, "runs": [[0, "not-a-run"]]}, "runs"),
], ids=["deep", "missing-field", "segments-not-a-list", "huge-heads", "bad-run"])
def test_malformed_manifests_are_corrupt_chunks(transport, seed, edit, match):
    stream(transport, seed)
    _rewrite(transport, "req", edit)
    with pytest.raises(CorruptChunkError, match=match):
        kvstream.StreamingCache.load(transport, "req", stream=False)


def test_a_manifest_over_the_size_bound_is_refused_before_it_is_fetched(transport, seed, monkeypatch):
    stream(transport, seed)
    monkeypatch.setattr(resume, "MAX_MANIFEST_BYTES", 64)
    fetched = []
    monkeypatch.setattr(transport, "fetch", lambda *a, **k: fetched.append(a))
    with pytest.raises(CorruptChunkError, match="over 64"):
        kvstream.StreamingCache.load(transport, "req", stream=False)
    assert fetched == []


def _sealed(doc: dict) -> Manifest:
    """A crafted manifest document with a valid checksum (a forger can compute it too)."""
    from kvstream.streaming.session import _doc_checksum

    doc = {k: v for k, v in doc.items() if k != "checksum"}
    return Manifest.from_dict({**doc, "checksum": _doc_checksum(doc)})


def test_a_small_manifest_cannot_make_the_replay_allocate_what_no_chunk_holds(transport, seed, monkeypatch):
    stream(transport, seed)
    doc = kvstream.StreamingCache.read_manifest(transport, "req").to_dict()
    prefill = {**doc["segments"][0], "tokens": 10 ** 7}  # claims 10M tokens (GBs of buffers); 20 are stored
    crafted = _sealed({**doc, "segments": [prefill]})
    allocated = []
    real_empty = torch.empty
    monkeypatch.setattr(replay_mod.torch, "empty", lambda *a, **k: allocated.append(a) or real_empty(*a, **k))
    with pytest.raises(CorruptChunkError, match="claims"):
        replay_mod.replay(crafted, kvstream.KVStreamer(transport), device="cpu")
    assert allocated == []  # refused from the chunk headers, before any buffer
    repeat = _sealed({**doc, "segments": doc["segments"] + [{"kind": "repeat", "repeats": 10 ** 6}]})
    with pytest.raises(CorruptChunkError, match="past any generate"):
        replay_mod.replay(repeat, kvstream.KVStreamer(transport), device="cpu")


def test_a_chunk_replaced_while_the_session_loads_is_refused(transport, seed, monkeypatch):
    """A new run streams under the name while the old session loads: the chunk checked before the read was
    replaced before the read; the check after the reads catches it (no wrong KV in the loaded cache)."""
    stream(transport, seed)
    key = "req/seg000002/all"
    newer = transport.fetch_new(key) + 1
    real_fetch = type(transport).fetch

    def fetch(self, k, out):
        if k == key:
            transport.flush(key, newer, meta={"session": "req", "run": "f" * 32}).wait()
        return real_fetch(self, k, out)

    monkeypatch.setattr(type(transport), "fetch", fetch)
    with pytest.raises(CorruptChunkError, match="written by run"):
        kvstream.StreamingCache.load(transport, "req", stream=False)
