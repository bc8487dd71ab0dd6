import pytest
import torch

import kvstream
from kvstream.errors import ConfigError, LayoutError
from kvstream.layout import Region
from kvstream.streaming.levels import resolve_level
from kvstream.streaming.streamer import KVStreamer


def _cache(gen, layers=3, b=2, h=3, s=11, d=5, dtype=torch.float32, device="cpu"):
    ks = [torch.randn(b, h, s, d, generator=gen).to(dtype).to(device) for _ in range(layers)]
    vs = [torch.randn(b, h, s, d, generator=gen).to(dtype).to(device) for _ in range(layers)]
    return ks, vs


def test_resolve_level(monkeypatch):
    assert resolve_level(None) == 3
    assert resolve_level("buffered") == 1
    monkeypatch.setenv("KVSTREAM_LEVEL", "0")
    assert resolve_level(None) == 0
    for bad in ("7", "fast", -1):
        with pytest.raises(ConfigError):
            resolve_level(bad)


@pytest.mark.parametrize("level", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_gather_roundtrip_sentinels(level, dtype, seed):
    ks, vs = _cache(seed, dtype=dtype)
    t = kvstream.HostTransport(capacity_bytes=1 << 20)
    st = KVStreamer(t, level=level)
    region = Region(layers=(1, 3), tokens=(2, 9), batch=(1, 2), heads=(0, 2))
    st.scatter("r/x", ks, vs, region)
    st.wait()
    assert st.stats.chunks_out == 1
    chunk = t.fetch_new("r/x")
    assert chunk.shape == (2, 2, 1, 2, 7, 5)
    assert torch.equal(chunk[1, 1, 0, 1], vs[2][1, 1, 2:9])
    # gather into sentinel-filled tensors: only the region changes
    k2 = [torch.full_like(k, 7) for k in ks]
    v2 = [torch.full_like(v, 7) for v in vs]
    st.gather("r/x", k2, v2, region).wait()
    for l in range(3):
        for src, dst in ((ks[l], k2[l]), (vs[l], v2[l])):
            inside = torch.zeros_like(dst, dtype=torch.bool)
            if l in region.layers:
                inside[1:2, 0:2, 2:9] = True
            assert torch.equal(dst[inside], src[inside])
            assert (dst[~inside] == 7).all()
    if level == 0:
        assert st.stats.row_copies == 2 * 2 * 1 * 2  # layers x K/V x rows x heads
    st.close()
    t.close()


@pytest.mark.parametrize("level", [0, 1, 3])
def test_scatter_newest_layers_of_different_length(level, seed):
    ks, vs = _cache(seed)
    ks[1], vs[1] = ks[1][:, :, :6], vs[1][:, :, :6]  # a sliding-window layer holds fewer tokens
    t = kvstream.HostTransport(capacity_bytes=1 << 20)
    st = KVStreamer(t, level=level)
    st.scatter_newest("r/step", ks, vs, num_tokens=2)
    st.wait()
    chunk = t.fetch_new("r/step")
    assert chunk.shape == (3, 2, 2, 3, 2, 5)
    for l in range(3):
        n = ks[l].shape[2]
        assert torch.equal(chunk[l, 0], ks[l][:, :, n - 2:n])
        assert torch.equal(chunk[l, 1], vs[l][:, :, n - 2:n])


def test_bad_region_and_transport(seed):
    ks, vs = _cache(seed)
    st = KVStreamer(kvstream.HostTransport(capacity_bytes=1 << 20))
    with pytest.raises(LayoutError, match="exceed"):
        st.scatter("k", ks, vs, Region(layers=(0, 4), tokens=(0, 2)))
    with pytest.raises(ConfigError):
        KVStreamer(object())


def test_capacity_error_surfaces_from_wait(seed):
    ks, vs = _cache(seed)
    st = KVStreamer(kvstream.HostTransport(capacity_bytes=256), level=3)
    with pytest.raises(kvstream.CapacityError):
        st.scatter("k", ks, vs, Region(layers=(0, 3), tokens=(0, 11)))
        st.wait()


@pytest.mark.gpu
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_gpu_streamer_levels_same_bytes(level, seed):
    ks, vs = _cache(seed, layers=4, b=4, h=8, s=300, d=128, dtype=torch.bfloat16, device="cuda")
    cpu = [k.cpu() for k in ks], [v.cpu() for v in vs]
    t = kvstream.HostTransport(capacity_bytes=1 << 28)
    st = KVStreamer(t, level=level, device="cuda")
    region = Region(layers=(0, 4), tokens=(17, 290))
    st.scatter("g/p", ks, vs, region)
    st.scatter_newest("g/d", ks, vs, num_tokens=1)
    st.wait()
    ref = kvstream.kernels.reference.pack_tokens(*cpu, region)
    assert torch.equal(t.fetch_new("g/p"), ref)
    assert torch.equal(t.fetch_new("g/d"), kvstream.kernels.reference.pack_newest(*cpu, num_tokens=1))
    k2 = [torch.full_like(k, 3) for k in ks]
    v2 = [torch.full_like(v, 3) for v in vs]
    st.gather("g/p", k2, v2, region).wait()
    torch.cuda.synchronize()
    for l in range(4):
        assert torch.equal(k2[l][:, :, 17:290], ks[l][:, :, 17:290])
        assert (k2[l][:, :, :17] == 3).all() and (v2[l][:, :, 290:] == 3).all()
    st.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gather_many_puts_decode_steps_in_place(device, seed):
    ks, vs = _cache(seed, s=12, device=device)
    t = kvstream.HostTransport(capacity_bytes=1 << 20)
    st = KVStreamer(t, device=device)
    for j in range(4):  # four "decode steps" of two tokens each, positions 3..10
        region = Region(layers=(0, 3), tokens=(3 + 2 * j, 5 + 2 * j))
        st.scatter(f"s/step{j}", ks, vs, region)
    st.wait()
    k2 = [torch.full_like(k, -5.0) for k in ks]
    v2 = [torch.full_like(v, -5.0) for v in vs]
    st.gather_many([f"s/step{j}" for j in range(4)], k2, v2, Region(layers=(0, 3), tokens=(3, 11)))
    for a, b, c, d in zip(ks, vs, k2, v2):
        assert torch.equal(c[:, :, 3:11], a[:, :, 3:11]) and torch.equal(d[:, :, 3:11], b[:, :, 3:11])
        assert bool((c[:, :, :3] == -5).all()) and bool((c[:, :, 11:] == -5).all())
    assert st.stats.chunks_in == 4
    with pytest.raises(LayoutError, match="split into 3 equal"):
        st.gather_many(["s/step0", "s/step1", "s/step2"], k2, v2, Region(layers=(0, 3), tokens=(3, 11)))
    with pytest.raises(LayoutError):  # a chunk that does not fit its slice
        st.gather_many(["s/step0", "s/step1"], k2, v2, Region(layers=(0, 3), tokens=(3, 5)))


@pytest.mark.parametrize("level", [0, 1, 3])
@pytest.mark.parametrize("n", [1, 3])
def test_scatter_step_is_the_chunk_scatter_newest_makes(level, n, seed):
    # a decode step's new KV: tensors of exactly n tokens, some transposed views as HF's projections make them
    ks = [torch.randn(2, n, 3, 5, generator=seed).transpose(1, 2) for _ in range(4)]
    vs = [torch.randn(2, 3, n, 5, generator=seed) for _ in range(4)]
    t = kvstream.HostTransport(capacity_bytes=1 << 20)
    st = KVStreamer(t, level=level)
    st.scatter_step("s/step", ks, vs, meta={"run": "r"})
    st.scatter_newest("s/newest", ks, vs, num_tokens=n, meta={"run": "r"})
    st.wait()
    a, b = t.fetch_new("s/step"), t.fetch_new("s/newest")
    assert a.shape == (4, 2, 2, 3, n, 5) and torch.equal(a, b)
    assert t.describe("s/step").meta == t.describe("s/newest").meta
    t.close()


def test_scatter_step_refuses_mixed_tensors(seed):
    ks, vs = [torch.randn(1, 2, 1, 4) for _ in range(3)], [torch.randn(1, 2, 1, 4) for _ in range(3)]
    t = kvstream.HostTransport(capacity_bytes=1 << 20)
    st = KVStreamer(t, level=3)
    with pytest.raises(LayoutError, match="dtypes"):
        st.scatter_step("s/a", ks, vs[:2] + [vs[2].double()])
    with pytest.raises(LayoutError, match="one shape"):
        st.scatter_step("s/b", ks, vs[:2] + [torch.randn(1, 2, 2, 4)])
    with pytest.raises(LayoutError, match="value tensors"):
        st.scatter_step("s/c", ks, vs[:2])
    st.wait()
    assert t.keys() == []  # nothing half-stored
    t.close()


@pytest.mark.gpu
@pytest.mark.parametrize("level", [1, 3])
def test_gpu_scatter_step_and_one_layer_regions(level, seed):
    # scatter_step stacks a step's new KV (transposed views); a one-layer region takes torch's copy_ path
    ks, vs = _cache(seed, layers=4, b=4, h=8, s=300, d=128, dtype=torch.bfloat16, device="cuda")
    new_k = [torch.randn(4, 1, 8, 128, generator=seed).to(torch.bfloat16).cuda().transpose(1, 2) for _ in range(4)]
    new_v = [torch.randn(4, 8, 1, 128, generator=seed).to(torch.bfloat16).cuda() for _ in range(4)]
    t = kvstream.HostTransport(capacity_bytes=1 << 28, preallocate=True)
    st = KVStreamer(t, level=level, device="cuda")
    st.scatter_step("g/step", new_k, new_v)
    for l in range(4):
        st.scatter(f"g/l{l}", ks, vs, Region(layers=(l, l + 1), tokens=(5, 261), batch=(1, 3)))
    st.wait()
    cpu_k, cpu_v = [k.cpu() for k in new_k], [v.cpu() for v in new_v]
    assert torch.equal(t.fetch_new("g/step"), kvstream.kernels.reference.pack_newest(cpu_k, cpu_v, num_tokens=1))
    ck, cv = [k.cpu() for k in ks], [v.cpu() for v in vs]
    for l in range(4):
        region = Region(layers=(l, l + 1), tokens=(5, 261), batch=(1, 3))
        assert torch.equal(t.fetch_new(f"g/l{l}"), kvstream.kernels.reference.pack_tokens(ck, cv, region))
        k2, v2 = [torch.full_like(k, 2) for k in ks], [torch.full_like(v, 2) for v in vs]
        st.gather(f"g/l{l}", k2, v2, region).wait()
        torch.cuda.synchronize()
        assert torch.equal(k2[l][1:3, :, 5:261], ks[l][1:3, :, 5:261]) and bool((k2[l][0] == 2).all())
        assert torch.equal(v2[l][1:3, :, 5:261], vs[l][1:3, :, 5:261]) and bool((v2[l][:, :, 261:] == 2).all())
    st.close()
    t.close()


@pytest.mark.gpu
@pytest.mark.parametrize("transport_kind", ["host", "disk"])
def test_gpu_packed_chunks_live_until_their_copies_have_read_them(transport_kind, seed, tmp_path, monkeypatch):
    """A background scatter's packed chunk is held until the copy has read it: by the HostTransport flush's own
    event (no event of the streamer's), by an event of the streamer's for a transport whose handle has none. The
    compute stream then overwrites the freed chunk memory at once; every stored chunk must still be the region's.
    Both transports read locally, so at most HOLD_BYTES of chunks stay held while the host runs ahead of the GPU
    (a prefill; the bound set to two chunks here): the compute stream waits for the older ones' copies instead,
    and the host never blocks."""
    from kvstream.streaming import inflight

    chunk_bytes = 2 * 16 * 8 * 64 * 128 * 2
    monkeypatch.setattr(inflight, "HOLD_BYTES", 2 * chunk_bytes)
    ks, vs = _cache(seed, layers=16, b=16, h=8, s=128, d=128, dtype=torch.bfloat16, device="cuda")
    t = (kvstream.HostTransport(capacity_bytes=1 << 30) if transport_kind == "host"
         else kvstream.DiskTransport(tmp_path))
    st = KVStreamer(t, level=3, device="cuda")
    regions = [Region(layers=(l, l + 1), tokens=(0, 64)) for l in range(16)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda._sleep(200_000_000)  # ~0.1 s: the copies queue behind the packs; only the streamer holds the chunks
    for l, r in enumerate(regions):
        h = st.scatter(f"c{l}", ks, vs, r)
        event, held, own, nbytes = st.inflight.reading[-1]
        assert own is (transport_kind != "host")
        if transport_kind == "host":
            assert event is h.event
        assert len(held) == 1 and held[0].shape == (1, 2, 16, 8, 64, 128) and nbytes == chunk_bytes
        assert len(st.inflight.reading) == min(l + 1, 2) and st.inflight.held_bytes <= 2 * chunk_bytes
    assert not st.inflight.reading[0][0].query()  # still asleep: the bound came from stream waits, not the host
    assert torch.cuda.memory_allocated() - before <= 2 * chunk_bytes  # 16 chunks without the bound
    # new compute-stream work on freed blocks would overwrite any chunk not held
    scribble = [torch.full((4 << 20,), 7.0, device="cuda", dtype=torch.bfloat16) for _ in range(64)]
    if transport_kind == "host":
        # a decode chunk written in place holds nothing of its own; once the held chunks are read it drops them all
        plan = kvstream.kernels.plan_newest(ks, vs, num_tokens=1)
        st.scatter_planned("step", plan, 100)
        assert st.inflight.reading  # the copies still sleep behind the packs
        torch.cuda.synchronize()
        st.scatter_planned("step", plan, 101)
        assert not st.inflight.reading
    st.wait()
    assert not st.inflight.reading
    ck, cv = [k.cpu() for k in ks], [v.cpu() for v in vs]
    for l, r in enumerate(regions):
        assert torch.equal(t.fetch_new(f"c{l}"), kvstream.kernels.reference.pack_tokens(ck, cv, r))
    del scribble
    st.close()
    t.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("layers", [(1, 2), (0, 3)])
def test_scatter_checks_the_region_once(device, layers, seed, monkeypatch):
    # the streamer resolves the region and hands the resolved form to the pack: no second check_hf_layers
    import kvstream.layout as layout
    from kvstream import kernels
    from kvstream.streaming import streamer as streamer_mod

    ks, vs = _cache(seed, dtype=torch.bfloat16, device=device)
    calls = []
    real = layout.check_hf_layers
    for mod in (streamer_mod, kernels, kernels.reference):
        monkeypatch.setattr(mod, "check_hf_layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    t = kvstream.HostTransport(capacity_bytes=1 << 20)
    st = KVStreamer(t, level=3, device=device)
    region = Region(layers=layers, tokens=(2, 9), heads=(1, 3))
    st.scatter("r/once", ks, vs, region)
    st.wait()
    assert calls == [1]
    expected = kernels.reference.pack_tokens([k.cpu() for k in ks], [v.cpu() for v in vs], region)
    assert torch.equal(t.fetch_new("r/once"), expected)
    with pytest.raises(LayoutError, match=r"Invalid shape of keys\[1\]"):  # the one check still refuses
        st.scatter("r/bad", [ks[0], ks[1][:, :, :4]] + ks[2:], vs, region)
    t.close()


def test_gather_many_into_caller_staging_is_exact_and_checked():
    """gather_many(staging=...) lands the chunks in the caller's buffer: the same KV as its own allocation, and
    a buffer too small or of another dtype is refused."""
    from kvstream.errors import LayoutError

    t = kvstream.HostTransport(capacity_bytes=1 << 20)
    s = KVStreamer(t)
    g = torch.Generator().manual_seed(0)
    src = [torch.randn(2, 2, 6, 4, generator=g) for _ in range(4)]
    for j in range(3):  # three chunks of two tokens of layers 0-1
        s.scatter(f"c{j}", src[:2], src[2:], Region(layers=(0, 2), tokens=(2 * j, 2 * j + 2))).wait()
    keys = [f"c{j}" for j in range(3)]
    want = [torch.zeros(2, 2, 6, 4) for _ in range(4)]
    s.gather_many(keys, want[:2], want[2:], Region(layers=(0, 2), tokens=(0, 6)))
    got = [torch.zeros(2, 2, 6, 4) for _ in range(4)]
    staging = torch.full((4096,), 7, dtype=torch.uint8)
    s.gather_many(keys, got[:2], got[2:], Region(layers=(0, 2), tokens=(0, 6)), staging=staging)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and all(torch.equal(a, b) for a, b in zip(got, src))
    with pytest.raises(LayoutError, match="staging"):
        s.gather_many(keys, got[:2], got[2:], Region(layers=(0, 2), tokens=(0, 6)), staging=staging[:100])
    with pytest.raises(LayoutError, match="staging"):
        s.gather_many(keys, got[:2], got[2:], Region(layers=(0, 2), tokens=(0, 6)), staging=torch.zeros(2048))
    t.close()


def _host_and_disk_spied(device, monkeypatch, tmp_path):
    """A HostTransport (preallocated on a GPU) and a DiskTransport, each with the list of keys its ``flush`` gets."""
    for t in (kvstream.HostTransport(capacity_bytes=1 << 20, preallocate=device == "cuda"),
              kvstream.DiskTransport(tmp_path)):
        flushed = []
        real = t.flush
        monkeypatch.setattr(t, "flush", lambda *a, _real=real, _log=flushed, **k: _log.append(a[0]) or _real(*a, **k))
        yield t, flushed


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("level", [1, 3])
def test_scatter_planned_writes_a_host_transport_chunk_in_place_at_level_3(device, level, seed, monkeypatch, tmp_path):
    """At level 3 the planned pack writes the HostTransport's own buffer (flush_into: zero-copy on a GPU), with no
    flush of a packed chunk; at other levels, and into transports without flush_into, the chunk is flushed. The
    stored chunk is the plan's, bit-exactly, either way."""
    from kvstream import kernels
    from kvstream.kernels import reference as ref

    ks = [torch.randn(2, 3, 40, 8, generator=seed).to(torch.bfloat16).to(device) for _ in range(3)]
    vs = [torch.randn(2, 3, 40, 8, generator=seed).to(torch.bfloat16).to(device) for _ in range(3)]
    plan = kernels.plan_newest(ks, vs, num_tokens=4)
    for t, flushed in _host_and_disk_spied(device, monkeypatch, tmp_path):
        st = KVStreamer(t, level=level, device=device)
        for start in (0, 5, 36):
            st.scatter_planned(f"p/{start}", plan, start, meta={"step": start})
        st.wait()
        in_place = level == 3 and isinstance(t, kvstream.HostTransport)
        assert flushed == ([] if in_place else ["p/0", "p/5", "p/36"])
        assert st.stats.chunks_out == 3 and st.stats.bytes_out == 3 * plan.nbytes
        for start in (0, 5, 36):
            got = t.fetch_new(f"p/{start}")
            assert torch.equal(got.cpu(), ref.pack_newest(ks, vs, num_tokens=4, starts=start).cpu()), (t, start)
            assert t.describe(f"p/{start}").meta["step"] == start
        t.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_scatter_positions_packs_the_layers_in_place_or_falls_back_to_a_copy(device, seed, monkeypatch, tmp_path):
    """A dynamic cache's pending steps: into a HostTransport at level 3 the pointer-table pack writes the stored
    chunk (no flush), re-pointed at longer tensors each call; into a DiskTransport, or with tensors the Triton
    plan cannot vector (one element off), the narrowed views are flushed. Every chunk is scatter_step's, bit-exactly."""
    from kvstream.kernels import reference as ref

    def layers(seq, offset=0):
        def one():
            base = torch.randn(2 * 3 * seq * 8 + offset, generator=seed).to(torch.bfloat16).to(device)
            return base[offset:].view(2, 3, seq, 8)
        return [one() for _ in range(3)], [one() for _ in range(3)]

    for t, flushed in _host_and_disk_spied(device, monkeypatch, tmp_path):
        st = KVStreamer(t, level=3, device=device)
        cases = [(f"c{seq}-{off}", *layers(seq, off), seq - 4, off) for seq, off in ((20, 0), (36, 0), (37, 1))]
        for key, ks, vs, start, _ in cases:
            st.scatter_positions(key, ks, vs, start, num_tokens=4, meta={"s": start})
        st.wait()
        # the Triton pack (CUDA) promises the kernel 16-byte vectors; the torch twin (CPU) takes any alignment
        copied = [key for key, *_, off in cases if isinstance(t, kvstream.DiskTransport) or (off and device == "cuda")]
        assert flushed == copied
        for key, ks, vs, start, _ in cases:
            want = ref.pack_newest(ks, vs, num_tokens=4, starts=start).cpu()
            assert torch.equal(t.fetch_new(key).cpu(), want), (t, key)
            assert t.describe(key).meta["s"] == start
        t.close()
