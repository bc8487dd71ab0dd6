"""Placement: which (layer, head, token) goes from which source rank to which destination rank."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstream.errors import ConfigError, LayoutError
from kvstream.streaming.placement import Placement, PipelineConfig, localize, split_heads, split_layers, transfer_key
from kvstream.streaming.handoff import stream_in, stream_out
from kvstream.handles import CompletedHandle
from kvstream.transports.base import Transport
from kvstream.errors import ChunkNotFound

SENTINEL = -7777.0


class _DictTransport(Transport):
    """A minimal in-memory transport so these tests exercise placement alone."""

    name = "dict"

    def __init__(self):
        super().__init__()
        self.chunks: dict[str, torch.Tensor] = {}

    def flush(self, key, chunk, region=None, meta=None):
        self.chunks[key] = chunk.clone()
        return CompletedHandle()

    def fetch(self, key, out):
        if key not in self.chunks:
            raise ChunkNotFound(key)
        out.copy_(self.chunks[key])
        return CompletedHandle()

    def describe(self, key):
        raise NotImplementedError

    def contains(self, key):
        return key in self.chunks

    def delete(self, key):
        return self.chunks.pop(key, None) is not None

    def keys(self, prefix=""):
        return sorted(k for k in self.chunks if k.startswith(prefix))


def test_split_layers_balanced_and_divisible():
    assert split_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert split_layers(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert split_layers(1, 1) == [range(0, 1)]
    with pytest.raises(ConfigError, match="pp_depth 5 exceeds num_layers 4"):
        split_layers(4, 5)


def test_split_heads_contiguous_and_replicated():
    assert split_heads(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert split_heads(5, 2) == [range(0, 3), range(3, 5)]
    assert split_heads(2, 4) == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert split_heads(2, 3) == [range(0, 1), range(0, 1), range(1, 2)]
    with pytest.raises(ConfigError):
        split_heads(0, 2)


def test_pipeline_config_validation_and_coords():
    cfg = PipelineConfig(pp_depth=2, tp_size=3)
    assert cfg.world_size == 6
    assert cfg.coords(4) == (1, 1) and cfg.rank(1, 1) == 4
    with pytest.raises(ConfigError, match=r"rank 6 outside \[0, 6\)"):
        cfg.coords(6)
    with pytest.raises(ConfigError, match="tp_size"):
        PipelineConfig(tp_size=0)


def test_pp2_to_pp4_buckets_layers_by_destination_stage():
    p = Placement(PipelineConfig(pp_depth=2), PipelineConfig(pp_depth=4), num_layers=8, kv_heads=8)
    got = [(t.src, t.dst, t.region.layers, t.region.heads) for t in p.transfers(tokens=(0, 4))]
    assert got == [(0, 0, range(0, 2), range(0, 8)), (0, 1, range(2, 4), range(0, 8)),
                   (1, 2, range(4, 6), range(0, 8)), (1, 3, range(6, 8), range(0, 8))]


def test_pp3_to_pp2_splits_a_destination_stage_over_two_sources():
    p = Placement(PipelineConfig(pp_depth=3), PipelineConfig(pp_depth=2), num_layers=6, kv_heads=2)
    got = [(t.src, t.dst, t.region.layers) for t in p.transfers(tokens=(0, 1))]
    assert got == [(0, 0, range(0, 2)), (1, 0, range(2, 3)), (1, 1, range(3, 4)), (2, 1, range(4, 6))]


def test_tp_merge_and_split():
    merge = Placement(PipelineConfig(tp_size=4), PipelineConfig(tp_size=2), num_layers=1, kv_heads=8)
    assert [(t.src, t.dst, t.region.heads) for t in merge.transfers(tokens=(0, 1))] == [
        (0, 0, range(0, 2)), (1, 0, range(2, 4)), (2, 1, range(4, 6)), (3, 1, range(6, 8))]
    split = merge.reversed()
    assert [(t.src, t.dst, t.region.heads) for t in split.transfers(tokens=(0, 1))] == [
        (0, 0, range(0, 2)), (0, 1, range(2, 4)), (1, 2, range(4, 6)), (1, 3, range(6, 8))]


def test_replicated_source_heads_spread_over_holders():
    # 2 KV heads on tp 4: ranks 0,1 hold head 0; ranks 2,3 head 1. A tp-1 destination takes both heads
    # from one holder each; a tp-4 destination takes each replica from a distinct holder.
    p = Placement(PipelineConfig(tp_size=4), PipelineConfig(tp_size=4), num_layers=1, kv_heads=2)
    assert [(t.src, t.dst, t.region.heads) for t in p.transfers(tokens=(0, 1))] == [
        (0, 0, range(0, 1)), (1, 1, range(0, 1)), (2, 2, range(1, 2)), (3, 3, range(1, 2))]


def test_localize_checks_bounds():
    p = Placement(PipelineConfig(pp_depth=2, tp_size=2), PipelineConfig(), num_layers=4, kv_heads=4)
    shard = p.src_shard(3)
    assert (shard.layers, shard.heads) == (range(2, 4), range(2, 4))
    t = next(t for t in p.transfers(tokens=(0, 5)) if t.src == 3)
    local = localize(t.region, shard)
    assert (local.layers, local.heads, local.tokens) == (range(0, 2), range(0, 2), range(0, 5))
    with pytest.raises(LayoutError, match=r"outside rank 3's layers \[2, 4\)"):
        localize(p.transfers(tokens=(0, 5))[0].region.__class__(layers=(0, 2), tokens=(0, 5), heads=(2, 4)), shard)


def test_transfer_key_is_deterministic():
    p = Placement(PipelineConfig(pp_depth=2), PipelineConfig(), num_layers=4, kv_heads=2)
    keys = [transfer_key("req-1", t) for t in p.transfers(tokens=(3, 9))]
    assert keys == ["req-1/xfer/s0000-d0000/l0-2/h0-2/b*/t3-9", "req-1/xfer/s0001-d0000/l2-4/h0-2/b*/t3-9"]
    assert keys == [transfer_key("req-1", t) for t in p.transfers(tokens=(3, 9))]


layouts = st.builds(PipelineConfig, pp_depth=st.integers(1, 4), tp_size=st.integers(1, 5))


@settings(max_examples=150, deadline=None)
@given(src=layouts, dst=layouts, num_layers=st.integers(4, 12), kv_heads=st.integers(1, 8),
       t0=st.integers(0, 5), n=st.integers(1, 5))
def test_every_layer_head_lands_exactly_once_on_its_owner(src, dst, num_layers, kv_heads, t0, n):
    p = Placement(src, dst, num_layers=num_layers, kv_heads=kv_heads)
    count = torch.zeros(dst.world_size, num_layers, kv_heads, dtype=torch.int64)
    for t in p.transfers(tokens=(t0, t0 + n)):
        s, d = p.src_shard(t.src), p.dst_shard(t.dst)
        r = t.region
        assert r.tokens == range(t0, t0 + n)
        for own in (s, d):  # the source owns what it sends, the destination what it receives
            assert own.layers.start <= r.layers.start < r.layers.stop <= own.layers.stop
            assert own.heads.start <= r.heads.start < r.heads.stop <= own.heads.stop
        count[t.dst, r.layers.start:r.layers.stop, r.heads.start:r.heads.stop] += 1
    expected = torch.zeros_like(count)
    for d in range(dst.world_size):
        sh = p.dst_shard(d)
        expected[d, sh.layers.start:sh.layers.stop, sh.heads.start:sh.heads.stop] = 1
    assert torch.equal(count, expected)


def _global_cache(num_layers, batch, kv_heads, seq, head_dim, dtype, gen):
    def one():
        return torch.randn(batch, kv_heads, seq, head_dim, generator=gen).to(dtype)

    return [one() for _ in range(num_layers)], [one() for _ in range(num_layers)]


def _shard_of(keys, values, shard):
    h = shard.heads
    return ([keys[l][:, h.start:h.stop].clone() for l in shard.layers],
            [values[l][:, h.start:h.stop].clone() for l in shard.layers])


def _empty_shard(shard, batch, seq, head_dim, dtype):
    def one():
        return torch.full((batch, len(shard.heads), seq, head_dim), SENTINEL, dtype=dtype)

    return [one() for _ in shard.layers], [one() for _ in shard.layers]


def _move(p, src_caches, dst_caches, session, tokens):
    transport = _DictTransport()
    for rank, (k, v) in enumerate(src_caches):
        stream_out(transport, p, rank, k, v, session=session, tokens=tokens, meta={"step": 0}).wait()
    for rank, (k, v) in enumerate(dst_caches):
        stream_in(transport, p, rank, k, v, session=session, tokens=tokens).wait()
    return transport


@settings(max_examples=40, deadline=None)
@given(src=layouts, dst=layouts, num_layers=st.integers(4, 6), kv_heads=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), t0=st.integers(0, 2),
       n=st.integers(1, 3), head_dim=st.sampled_from([1, 3, 8]))
def test_round_trip_src_dst_src_is_bit_exact(src, dst, num_layers, kv_heads, dtype, t0, n, head_dim):
    gen = torch.Generator().manual_seed(7)
    batch, seq = 2, 6
    keys, values = _global_cache(num_layers, batch, kv_heads, seq, head_dim, dtype, gen)
    p = Placement(src, dst, num_layers=num_layers, kv_heads=kv_heads)
    tokens = range(t0, t0 + n)
    src_caches = [_shard_of(keys, values, p.src_shard(r)) for r in range(src.world_size)]
    dst_caches = [_empty_shard(p.dst_shard(r), batch, seq, head_dim, dtype) for r in range(dst.world_size)]
    _move(p, src_caches, dst_caches, "fwd", tokens)
    for r, (k, v) in enumerate(dst_caches):
        sh = p.dst_shard(r)
        want_k, want_v = _shard_of(keys, values, sh)
        for got, want in zip(k + v, want_k + want_v):
            assert torch.equal(got[:, :, tokens.start:tokens.stop], want[:, :, tokens.start:tokens.stop])
            outside = torch.cat([got[:, :, :tokens.start], got[:, :, tokens.stop:]], dim=2)
            assert torch.equal(outside, torch.full_like(outside, SENTINEL))
    back = [_empty_shard(p.src_shard(r), batch, seq, head_dim, dtype) for r in range(src.world_size)]
    for (k0, v0), (k1, v1) in zip(src_caches, back):  # tokens that did not move are the original's
        for orig, t in zip(k0 + v0, k1 + v1):
            t[:, :, :tokens.start] = orig[:, :, :tokens.start]
            t[:, :, tokens.stop:] = orig[:, :, tokens.stop:]
    _move(p.reversed(), dst_caches, back, "back", tokens)
    for (k0, v0), (k1, v1) in zip(src_caches, back):
        for a, b in zip(k0 + v0, k1 + v1):
            assert torch.equal(a, b)


def test_stream_out_checks_local_layer_count(seed):
    p = Placement(PipelineConfig(pp_depth=2), PipelineConfig(), num_layers=4, kv_heads=2)
    k = [torch.zeros(1, 2, 4, 8) for _ in range(3)]
    with pytest.raises(LayoutError, match=r"rank 0 owns 2 layers \[0, 2\), got 3 key"):
        stream_out(_DictTransport(), p, 0, k, k, session="s", tokens=(0, 4))
    k = [torch.zeros(1, 1, 4, 8) for _ in range(2)]
    with pytest.raises(LayoutError, match=r"expected \[batch, 2, seq, head_dim\]"):
        stream_out(_DictTransport(), p, 0, k, k, session="s", tokens=(0, 4))


def test_stream_out_needs_a_transport_per_peer(seed):
    p = Placement(PipelineConfig(), PipelineConfig(pp_depth=2), num_layers=2, kv_heads=1)
    k = [torch.randn(1, 1, 3, 4) for _ in range(2)]
    with pytest.raises(ConfigError, match="No transport given for peer rank 1"):
        stream_out({0: _DictTransport()}, p, 0, k, k, session="s", tokens=(0, 3))


def test_stream_in_missing_chunk_raises(seed):
    p = Placement(PipelineConfig(), PipelineConfig(), num_layers=1, kv_heads=1)
    k = [torch.zeros(1, 1, 3, 4)]
    with pytest.raises(ChunkNotFound):
        stream_in(_DictTransport(), p, 0, k, [torch.zeros(1, 1, 3, 4)], session="s", tokens=(0, 3))


def test_stream_through_a_streamer_and_point_to_point_transports(seed):
    """pp=1, tp=2 prompt side to pp=2 token side: one KVStreamer over host memory, and one gloo link
    (RemoteHostTransport) per (source, destination) pair, as each process would hold them."""
    from kvstream.streaming.streamer import KVStreamer
    from kvstream.transports.host import HostTransport
    from kvstream.transports.remote import RemoteHostTransport

    gen = torch.Generator().manual_seed(11)
    keys, values = _global_cache(4, 2, 4, 9, 8, torch.bfloat16, gen)
    p = Placement(PipelineConfig(tp_size=2), PipelineConfig(pp_depth=2), num_layers=4, kv_heads=4)
    src = [_shard_of(keys, values, p.src_shard(r)) for r in range(2)]
    links = {(s, d): RemoteHostTransport.loopback(timeout_s=20) for s in range(2) for d in range(2)}
    streamer = KVStreamer(HostTransport(capacity_bytes=1 << 22), level=1, device="cpu")
    try:
        for shared in (True, False):
            dst = [_empty_shard(p.dst_shard(r), 2, 9, 8, torch.bfloat16) for r in range(2)]
            for r, (k, v) in enumerate(src):
                if shared:  # the streamer's own stream_out delegates to handoff.stream_out
                    streamer.stream_out(p, r, k, v, session="s", tokens=(0, 9)).wait()
                else:
                    stream_out({d: links[r, d] for d in range(2)}, p, r, k, v, session="s", tokens=(0, 9)).wait()
            for r, (k, v) in enumerate(dst):
                if shared:
                    streamer.stream_in(p, r, k, v, session="s", tokens=(0, 9))
                else:
                    stream_in({s: links[s, r] for s in range(2)}, p, r, k, v, session="s", tokens=(0, 9))
                want_k, want_v = _shard_of(keys, values, p.dst_shard(r))
                assert all(torch.equal(a, b) for a, b in zip(k + v, want_k + want_v))
        assert links[1, 1].keys() == ["s/xfer/s0001-d0001/l2-4/h2-4/b*/t0-9"]
    finally:
        for t in links.values():
            t.close()
