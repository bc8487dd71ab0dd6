"""Session manifests and replay, without a model: a StreamingCache fed random KV, history rewritten, then
loaded back and compared bit for bit with the live cache."""

import pytest
import torch

import kvstream
from kvstream.errors import CorruptChunkError
from kvstream.models import tiny_config
from kvstream.streaming.replay import plan, replay
from kvstream.streaming.session import (Crop, Manifest, Prefill, Repeat, Reset, Rows, SessionRecorder, Step,
                                        segment_from_dict, segment_to_dict)
from kvstream.streaming.streamer import KVStreamer

LAYERS, HEADS, DIM = 3, 2, 8


@pytest.fixture
def host():
    t = kvstream.HostTransport(capacity_bytes=64 << 20)
    yield t
    t.close()


def forward(cache, gen, batch, tokens, layers=LAYERS, heads=HEADS, dim=DIM, device="cpu"):
    """One "forward pass": every layer's update with fresh random KV of ``tokens`` new tokens."""
    for l in range(layers):
        k = torch.randn(batch, heads, tokens, dim, generator=gen).to(device)
        v = torch.randn(batch, heads, tokens, dim, generator=gen).to(device)
        cache.update(k, v, l)


def check_same_cache(live, loaded):
    assert loaded.get_seq_length() == live.get_seq_length()
    assert len(loaded.layers) == len(live.layers)
    for a, b in zip(live.layers, loaded.layers):
        assert a.get_seq_length() == b.get_seq_length()
        if a.get_seq_length() == 0:
            continue
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def roundtrip(cache, host, **kw):
    cache.wait()
    return kvstream.StreamingCache.load(host, cache.session, stream=False, **kw)


@pytest.mark.parametrize("ops", [
    [],
    ["reorder"],
    ["select"],
    ["repeat"],
    ["crop"],
    ["crop0"],
    ["reset"],
    ["reorder", "crop", "repeat", "select"],
    ["crop", "crop", "reorder"],
])
def test_replay_matches_the_live_cache(host, ops, seed):
    cache = kvstream.StreamingCache(transport=host, session=f"s-{'-'.join(ops) or 'plain'}")
    batch = 3
    forward(cache, seed, batch, 20)  # a prefill: one chunk per layer
    for _ in range(3):
        forward(cache, seed, batch, 1)  # decode steps: one chunk for all layers
    for op in ops:
        if op == "reorder":
            cache.reorder_cache(torch.tensor([2, 0, 0])[:batch])
        elif op == "select":
            cache.batch_select_indices(torch.tensor([1, 0]) if batch >= 2 else torch.tensor([0]))
            batch = 2 if batch >= 2 else 1
        elif op == "repeat":
            cache.batch_repeat_interleave(2)
            batch *= 2
        elif op == "crop":
            cache.crop(-2)
        elif op == "crop0":
            cache.crop(0)
        elif op == "reset":
            cache.reset()
        forward(cache, seed, batch, 1)
        forward(cache, seed, batch, 17)  # a long forward after the rewrite (assisted decoding's check)
    check_same_cache(cache, roundtrip(cache, host))


def test_select_with_a_boolean_mask(host, seed):
    cache = kvstream.StreamingCache(transport=host, session="mask")
    forward(cache, seed, 4, 5)
    cache.batch_select_indices(torch.tensor([True, False, True, True]))
    forward(cache, seed, 3, 1)
    check_same_cache(cache, roundtrip(cache, host))


def test_row_operations_on_an_empty_cache_change_nothing(host, seed):
    cache = kvstream.StreamingCache(transport=host, session="empty-ops")
    cache.batch_repeat_interleave(3)  # generate expands inputs before the cache holds anything
    forward(cache, seed, 2, 4)
    forward(cache, seed, 2, 1)
    check_same_cache(cache, roundtrip(cache, host))


def test_sliding_window_layers_replay(host, seed):
    config = tiny_config("mistral", num_layers=2, sliding_window=6)
    cache = kvstream.StreamingCache(config=config, transport=host, session="sw")
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    forward(cache, seed, 2, 10, layers=2, heads=heads, dim=dim)
    for _ in range(4):
        forward(cache, seed, 2, 1, layers=2, heads=heads, dim=dim)
    loaded = roundtrip(cache, host, config=config)
    check_same_cache(cache, loaded)
    assert loaded.layers[0].keys.shape[2] == 5  # the window minus one, as the live layer keeps


def test_loaded_cache_keeps_streaming_into_the_session(host, seed):
    cache = kvstream.StreamingCache(transport=host, session="cont")
    forward(cache, seed, 1, 9)
    cache.wait()
    more = kvstream.StreamingCache.load(host, "cont")
    forward(more, seed, 1, 1)
    forward(more, seed, 1, 1)
    again = roundtrip(more, host)
    check_same_cache(more, again)
    assert again.get_seq_length() == 11
    assert more.stats["bytes_in"] > 0  # the load went through the streamer


def test_both_replay_orders_give_the_same_bytes(host, seed):
    cache = kvstream.StreamingCache(transport=host, session="orders")
    forward(cache, seed, 2, 12)
    forward(cache, seed, 2, 1)
    cache.wait()
    manifest = kvstream.StreamingCache.read_manifest(host, "orders")
    streamer = KVStreamer(host)
    fast = replay(manifest, streamer, device="cpu", layerwise=True)
    manifest.segments.append(Crop(length=13, tokens=0))  # a crop that removes nothing is no rewrite
    assert not plan(manifest).rewrites
    manifest.segments.append(Crop(length=12, tokens=-1))
    manifest.segments.append(Step(12, 1, 2, manifest.segments[1].key, manifest.segments[1].layers))
    assert plan(manifest).rewrites
    ordered = replay(manifest, streamer, device="cpu")
    for a, b in zip(fast.keys + fast.values, ordered.keys + ordered.values):
        assert a.shape == b.shape == (2, HEADS, 13, DIM)
        assert torch.equal(a[:, :, :12], b[:, :, :12])


def test_segments_round_trip_through_json():
    segs = [Prefill(0, 5, 2, {0: "s/seg000000/layer0000"}), Step(5, 1, 2, "s/seg000001/all", (0, 1)),
            Rows("reorder", "s/seg000002/index", 2), Repeat(3), Crop(4, -2), Reset()]
    for s in segs:
        assert segment_from_dict(segment_to_dict(s), "t", 4) == s


@pytest.mark.parametrize("bad, match", [
    ({"kind": "repeat", "repeats": 0}, "repeats"),
    ({"kind": "repeat", "repeats": "2"}, "repeats"),
    ({"kind": "all", "start": 0, "tokens": 1, "batch": 1, "key": "k", "layers": [0, 0]}, "distinct"),
    ({"kind": "all", "start": 0, "tokens": 1, "batch": 1, "key": "k", "layers": [9]}, "layer ids"),
    ({"kind": "layers", "start": -1, "tokens": 1, "batch": 1, "keys": {}}, "start"),
    ({"kind": "layers", "start": 0, "tokens": 1, "batch": 1, "keys": {"x": "k"}}, "layer key"),
    ({"kind": "teleport"}, "unknown segment kind"),
    (5, "JSON object"),
])
def test_bad_segments_are_corrupt(bad, match):
    with pytest.raises(CorruptChunkError, match=match):
        segment_from_dict(bad, "t", 4)


def manifest_of(*segments, batch=2):
    return Manifest(session="m", num_layers=2, kv_layers=[0, 1], kv_heads=1, head_dim=4, dtype=torch.float32,
                    batch=batch, segments=list(segments))


@pytest.mark.parametrize("segments, match", [
    ((Step(3, 1, 2, "k", (0, 1)),), "starts at position 3"),
    ((Step(0, 4, 2, "k", (0, 1)), Step(4, 1, 3, "k", (0, 1))), "batch 3"),
    ((Step(0, 4, 2, "k", (0, 1)), Crop(9, 0)), "crop to 9"),
    ((Step(0, 4, 2, "k", (0, 1)), Repeat(10 ** 6)), "past any generate"),
    ((Step(0, 4, 2, "k", (0, 1)), Rows("select", "i", 10 ** 6)), "past any generate"),
])
def test_contradicting_segments_are_corrupt(segments, match):
    with pytest.raises(CorruptChunkError, match=match):
        plan(manifest_of(*segments))


def test_manifest_documents_are_checked():
    good = manifest_of(Step(0, 1, 2, "k", (0, 1))).to_dict()
    assert Manifest.from_dict(good).segments[0] == Step(0, 1, 2, "k", (0, 1))
    for field, value, match in [("format", 99, "format"), ("segments", 5, "segments"),
                                ("kv_layers", [1, 0], "kv_layers"), ("num_layers", "2", "num_layers"),
                                ("dtype", "float13", "float13")]:
        with pytest.raises(CorruptChunkError, match=match):
            Manifest.from_dict({**good, field: value})
    with pytest.raises(CorruptChunkError, match="valid JSON"):
        Manifest.from_bytes(torch.frombuffer(bytearray(b"{not json"), dtype=torch.uint8))


def test_recorder_numbers_segments_in_order():
    r = SessionRecorder("s")
    seg = r.begin("layers", 0, 8, 1)
    assert r.prefill_key(seg, 1) == "s/seg000000/layer0001"
    r.begin("all", 8, 1, 1)
    assert r.step_key() == "s/seg000001/all"
    assert r.end_step([0, 1]) == "s/seg000001/all"
    assert r.rows("reorder", 1) == "s/seg000002/index"
    r.other(Crop(8, -1))
    assert r.begin("layers", 8, 20, 1) == 4
    assert [type(s).__name__ for s in r.segments] == ["Prefill", "Step", "Rows", "Crop", "Prefill"]


@pytest.mark.gpu
def test_layerwise_load_on_the_gpu_matches_the_cpu_load(seed, cuda_device):
    host = kvstream.HostTransport(capacity_bytes=64 << 20)
    cache = kvstream.StreamingCache(transport=host, session="gpu-load")
    forward(cache, seed, 2, 40)
    for _ in range(5):
        forward(cache, seed, 2, 1)
    cache.wait()
    cpu = kvstream.StreamingCache.load(host, "gpu-load", stream=False)
    manifest = kvstream.StreamingCache.read_manifest(host, "gpu-load")
    load = replay(manifest, KVStreamer(host, device=cuda_device), device=cuda_device)
    assert load.stream is not None and len(load.events) == LAYERS
    for i in range(LAYERS):
        k, v = load.take(i)  # the current stream waits for layer i only
        assert torch.equal(k.cpu(), cpu.layers[i].keys) and torch.equal(v.cpu(), cpu.layers[i].values)
    gpu = kvstream.StreamingCache.load(host, "gpu-load", device=cuda_device, stream=False)
    forward(gpu, seed, 2, 1, device=cuda_device)  # the first update of each layer takes it
    assert gpu._pending is None and gpu.get_seq_length() == cpu.get_seq_length() + 1
    host.close()


@pytest.mark.parametrize("then", ["crop", "reorder", "select", "repeat"])
@pytest.mark.parametrize("removed", range(0, 24))
def test_every_crop_value_replays_to_the_live_cache(host, seed, removed, then):
    """crop(-n) for every n a 23-token cache allows (crop(0) included: assisted decoding ends with it), then
    another rewrite and more tokens; the replay equals the live cache bit for bit (issue 13, item 4)."""
    cache = kvstream.StreamingCache(transport=host, session=f"crop-{removed}-{then}")
    forward(cache, seed, 2, 20)
    for _ in range(3):
        forward(cache, seed, 2, 1)
    cache.crop(-removed if removed else 0)
    assert cache.get_seq_length() == 23 - removed
    batch = 2
    if then == "crop":
        cache.crop(0)
    elif then == "reorder":
        cache.reorder_cache(torch.tensor([1, 0]))
    elif then == "select":
        cache.batch_select_indices(torch.tensor([1]))
        batch = 1 if removed < 23 else 2  # row operations of an empty cache change nothing (as transformers')
    else:
        cache.batch_repeat_interleave(3)
        batch = 6 if removed < 23 else 2
    forward(cache, seed, batch, 1)
    forward(cache, seed, batch, 18)
    check_same_cache(cache, roundtrip(cache, host))
