"""``scatter(direct=True)``: a region of whole-token rows copied straight into a HostTransport (no pack) lands
the same chunk as the pack, bit for bit; what is not such rows, or a transport without ``flush_rows``, is
packed as before; ``HostTransport.flush_rows`` checks what it is given."""

import pytest
import torch

import kvstream
from kvstream.errors import CapacityError, LayoutError
from kvstream.kernels import reference
from kvstream.layout import Region
from kvstream.streaming.direct import MAX_PARTS, row_views
from kvstream.streaming.streamer import KVStreamer


def _cache(gen, layers=3, b=2, h=3, s=11, d=5, dtype=torch.float32, device="cpu"):
    ks = [torch.randn(b, h, s, d, generator=gen).to(dtype).to(device) for _ in range(layers)]
    vs = [torch.randn(b, h, s, d, generator=gen).to(dtype).to(device) for _ in range(layers)]
    return ks, vs


REGIONS = [
    Region(layers=(1, 2), tokens=(0, 7)),                                   # one layer, all rows
    Region(layers=(0, 3), tokens=(3, 11)),                                  # every layer, a token range
    Region(layers=(0, 2), tokens=(2, 9), batch=(1, 2)),                     # one batch row
    Region(layers=(1, 3), tokens=(4, 5), batch=(0, 2), heads=(1, 3)),        # a head range: a copy per batch row
    Region(layers=(0, 1), tokens=(0, 11), batch=(0, 2), heads=(2, 3)),       # one head
]


@pytest.mark.parametrize("level", [1, 2, 3])
@pytest.mark.parametrize("region", REGIONS)
def test_direct_scatter_lands_the_packed_chunk(seed, level, region):
    ks, vs = _cache(seed)
    t = kvstream.HostTransport(capacity_bytes=1 << 20)
    st = KVStreamer(t, level=level, device="cpu")
    resolved = region.resolve(2, 3)
    assert row_views(ks, vs, resolved) is not None
    st.scatter("d", ks, vs, region, direct=True, meta={"run": "r"})
    st.scatter("p", ks, vs, region, meta={"run": "r"})
    st.wait()
    ref = reference.pack_tokens(ks, vs, resolved)
    assert torch.equal(t.fetch_new("d"), ref) and torch.equal(t.fetch_new("p"), ref)
    assert t.describe("d") == t.describe("p")
    assert st.stats.chunks_out == 2 and st.stats.bytes_out == 2 * ref.numel() * ref.element_size()


def test_rows_that_are_not_dense_are_packed_instead(seed):
    gen = seed
    # transposed views, as attention layers hand new KV over: a token's D elements are H*D apart from the next's
    ks = [torch.randn(2, 11, 3, 5, generator=gen).transpose(1, 2) for _ in range(2)]
    vs = [torch.randn(2, 11, 3, 5, generator=gen).transpose(1, 2) for _ in range(2)]
    region = Region(layers=(0, 2), tokens=(1, 6)).resolve(2, 3)
    assert row_views(ks, vs, region) is None
    t = kvstream.HostTransport(capacity_bytes=1 << 20)
    st = KVStreamer(t, level=3, device="cpu")
    st.scatter("x", ks, vs, region, direct=True)
    st.wait()
    assert torch.equal(t.fetch_new("x"), reference.pack_tokens(ks, vs, region))
    # K and V of different head dims: their chunk interleaves each row's K and V, no rows to copy
    vs5 = [torch.randn(2, 3, 11, 4, generator=gen) for _ in range(2)]
    kc = [k.contiguous() for k in ks]
    assert row_views(kc, vs5, region) is None


def test_a_region_of_too_many_row_runs_is_packed(seed):
    ks, vs = _cache(seed, layers=1, b=MAX_PARTS // 2 + 1, h=3)
    region = Region(layers=(0, 1), tokens=(0, 4), batch=(0, MAX_PARTS // 2 + 1), heads=(1, 3))
    assert row_views(ks, vs, region) is None
    assert row_views(ks, vs, Region(layers=(0, 1), tokens=(0, 4), batch=(0, 4), heads=(1, 3))) is not None


def test_a_transport_without_flush_rows_gets_the_pack(seed, tmp_path):
    ks, vs = _cache(seed)
    region = Region(layers=(0, 3), tokens=(2, 8))
    with kvstream.DiskTransport(tmp_path) as t:
        st = KVStreamer(t, level=3, device="cpu")
        st.scatter("k", ks, vs, region, direct=True)
        st.wait()
        assert torch.equal(t.fetch_new("k"), reference.pack_tokens(ks, vs, region.resolve(2, 3)))


def test_flush_rows_checks_its_parts(seed):
    t = kvstream.HostTransport(capacity_bytes=4096)
    rows = torch.randn(4, 8, generator=seed)
    with pytest.raises(LayoutError, match="hold 128 bytes"):
        t.flush_rows("a", [rows], (1, 2, 1, 1, 4, 8), torch.float32)  # 256 bytes asked, 128 given
    with pytest.raises(LayoutError, match="dense rows"):
        t.flush_rows("a", [rows.t()], (4, 8), torch.float32)
    with pytest.raises(LayoutError, match="2-D"):
        t.flush_rows("a", [rows.half()], (4, 8), torch.float32)
    t.flush_rows("a", [rows[:2], rows[2:]], (4, 8), torch.float32).wait()
    assert torch.equal(t.fetch_new("a"), rows)
    big = torch.randn(64, 32, generator=seed)
    with pytest.raises(CapacityError):
        t.flush_rows("a", [big], (64, 32), torch.float32)
    assert torch.equal(t.fetch_new("a"), rows) and t.used_bytes == rows.numel() * 4  # nothing lost
    assert not any(k != "a" for k in t.keys())


@pytest.mark.gpu
@pytest.mark.parametrize("level", [1, 3])
def test_gpu_direct_scatter_lands_the_packed_chunk(seed, level):
    ks, vs = _cache(seed, layers=4, b=4, h=8, s=300, d=128, dtype=torch.bfloat16, device="cuda")
    cpu = [k.cpu() for k in ks], [v.cpu() for v in vs]
    t = kvstream.HostTransport(capacity_bytes=1 << 28)
    st = KVStreamer(t, level=level, device="cuda")
    regions = [Region(layers=(l, l + 1), tokens=(0, 64)) for l in range(4)] + [
        Region(layers=(0, 4), tokens=(17, 290)), Region(layers=(1, 3), tokens=(5, 9), heads=(2, 6))]
    for i, r in enumerate(regions):
        st.scatter(f"d{i}", ks, vs, r, direct=True)
    st.wait()
    for i, r in enumerate(regions):
        assert torch.equal(t.fetch_new(f"d{i}"), reference.pack_tokens(*cpu, r.resolve(4, 8)))
    st.close()
    t.close()
