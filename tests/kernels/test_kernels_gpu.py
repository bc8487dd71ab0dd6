"""What only a GPU can show: zero-copy into pinned host memory, the table cache across streams and CUDA
graphs, Llama-shaped sizes, a second device. Every test here is marked ``gpu`` (or ``gpu2``)."""

import pytest
import torch

from kvstream import kernels
from kvstream.errors import ConfigError, LayoutError
from kvstream.kernels import _tables
from kvstream.kernels import reference as ref
from kvstream.layout import Region

from kvcases import (SENTINEL, assert_all_equal, assert_pads_untouched, hf_layers, interpreting, paged_layers, rand,
                     sentinel_out, twin_result)

CUDA = torch.device("cuda", 0)


@pytest.mark.gpu
def test_zero_copy_into_and_out_of_pinned_host_memory(seed):
    keys, values, bases = hf_layers(seed, seq=[40, 24, 40], batch=3, heads=4, head_dim=128, dtype=torch.bfloat16,
                                    device=CUDA, kind="static")
    expected = ref.pack_newest(keys, values).cpu()
    out, buf = sentinel_out(expected.shape, torch.bfloat16, "cpu", pin=True)
    assert out.is_pinned()
    kernels.pack_newest(keys, values, out=out)  # auto: Triton, writing over PCIe
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    assert_pads_untouched(buf)

    region = Region(layers=(0, 3), tokens=(3, 20), batch=(1, 3), heads=(1, 3))
    expected = ref.pack_tokens(keys, values, region).cpu()
    out, buf = sentinel_out(expected.shape, torch.bfloat16, "cpu", pin=True)
    kernels.pack_tokens(keys, values, region, out)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    assert_pads_untouched(buf)

    chunk = rand(seed, expected.shape, torch.bfloat16, "cpu").pin_memory()
    want = twin_result(bases, lambda: ref.unpack_tokens(chunk.to(CUDA), keys, values, region))
    kernels.unpack_tokens(chunk, keys, values, region)  # the kernel reads pinned host memory directly
    torch.cuda.synchronize()
    assert_all_equal(bases, want, "cache buffer")


@pytest.mark.gpu
def test_pageable_host_out_is_rejected(seed):
    keys, values, _ = hf_layers(seed, seq=[8], batch=1, heads=2, head_dim=16, dtype=torch.float16, device=CUDA)
    with pytest.raises(LayoutError, match="pinned host memory"):
        kernels.pack_newest(keys, values, out=torch.empty(1, 2, 1, 2, 1, 16, dtype=torch.float16))


@pytest.mark.gpu
def test_auto_runs_triton_on_cuda(seed, monkeypatch):
    from kvstream.kernels import tokens

    keys, values, _ = hf_layers(seed, seq=[8], batch=1, heads=2, head_dim=16, dtype=torch.float16, device=CUDA)
    monkeypatch.setattr(tokens, "pack_newest", lambda *args, **kw: "triton")
    assert kernels.pack_newest(keys, values) == "triton"


@pytest.mark.gpu
def test_cpu_tensors_with_triton_backend_need_the_interpreter(seed):
    if interpreting():
        pytest.skip("TRITON_INTERPRET=1 is set: CPU tensors are valid for the Triton backend")
    keys, values, _ = hf_layers(seed, seq=[4], batch=1, heads=1, head_dim=8, dtype=torch.float32, device="cpu")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        kernels.pack_newest(keys, values, backend="triton")


@pytest.mark.gpu
def test_table_cache_hits_and_side_streams(seed):
    _tables.clear_tables()
    keys, values, _ = hf_layers(seed, seq=[64, 64], batch=2, heads=2, head_dim=64, dtype=torch.bfloat16, device=CUDA,
                                kind="static")
    for t in range(3):  # StaticCache decode: same tensors, moving start -> one table
        kernels.pack_newest(keys, values, starts=t)
    assert len(_tables._tables) == 1
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chunk = kernels.pack_newest(keys, values, starts=5)
        expected = ref.pack_newest(keys, values, starts=5)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(chunk, expected) and len(_tables._tables) == 1
    kernels.pack_tokens(keys, values, Region(layers=(0, 2), tokens=(0, 9)))  # another batch/head offset: same
    assert len(_tables._tables) == 1
    kernels.pack_tokens(keys, values, Region(layers=(0, 2), tokens=(0, 9), heads=(1, 2)))  # a new table
    assert len(_tables._tables) == 2

    # A table read on another stream is not freed while that stream may still read it.
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # keeps the side stream busy for a while
        kernels.pack_newest(keys, values, starts=3)
    _tables.clear_tables()
    assert len(_tables._tables) == 0 and len(_tables._retired) == 1
    torch.cuda.synchronize()
    kernels.pack_newest(keys, values, starts=1)  # a miss prunes what has finished
    assert len(_tables._retired) == 0
    _tables.clear_tables()


@pytest.mark.gpu
def test_cuda_graph_replays_the_decode_step(seed):
    keys, values, _ = hf_layers(seed, seq=[32, 32, 32], batch=4, heads=2, head_dim=128, dtype=torch.bfloat16,
                                device=CUDA, kind="static")
    host = torch.empty(3, 2, 4, 2, 1, 128, dtype=torch.bfloat16, pin_memory=True)
    _tables.clear_tables()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ConfigError, match="before capturing"):
        with torch.cuda.graph(graph):
            kernels.pack_newest(keys, values, starts=7, out=host)
    kernels.pack_newest(keys, values, starts=7, out=host)  # warm-up: caches the table, compiles the kernel
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.pack_newest(keys, values, starts=7, out=host)
    for k in keys:
        k[:, :, 7] = SENTINEL  # new contents at the captured position
    host.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(host, ref.pack_newest(keys, values, starts=7).cpu())
    assert (host[:, 0] == SENTINEL).all()


@pytest.mark.gpu
def test_llama_shaped_region_and_decode_step(seed):
    """32 layers, 8 KV heads, head_dim 128, bf16, a StaticCache with room for 512 tokens: the shapes of the
    benchmarks, at batch 2 so the test stays small."""
    keys, values, bases = hf_layers(seed, seq=[512] * 32, batch=2, heads=8, head_dim=128, dtype=torch.bfloat16,
                                    device=CUDA, kind="static")
    for region in (Region(layers=(0, 32), tokens=(17, 400)), Region(layers=(8, 24), tokens=(0, 512), heads=(2, 6)),
                   Region(layers=(0, 32), tokens=(300, 301), batch=(1, 2))):
        expected = ref.pack_tokens(keys, values, region)
        out, buf = sentinel_out(expected.shape, torch.bfloat16, CUDA)
        kernels.pack_tokens(keys, values, region, out)
        assert torch.equal(out, expected), region
        assert_pads_untouched(buf)
        chunk = rand(seed, expected.shape, torch.bfloat16, CUDA)
        want = twin_result(bases, lambda: ref.unpack_tokens(chunk, keys, values, region))
        kernels.unpack_tokens(chunk, keys, values, region)
        assert_all_equal(bases, want, f"cache buffer, {region}")
    starts = torch.arange(32, device=CUDA) * 7  # a device tensor: no host sync
    assert torch.equal(kernels.pack_newest(keys, values, starts=starts), ref.pack_newest(keys, values, starts=starts))


@pytest.mark.gpu
def test_vllm_shaped_blocks(seed):
    kc, vc, bases = paged_layers(seed, layers=32, num_blocks=64, block_size=16, heads=8, head_dim=128,
                                 dtype=torch.bfloat16, device=CUDA, kind="vllm")
    ids = torch.randperm(64, generator=seed)[:40].to(torch.int32)
    expected = ref.pack_blocks(kc, vc, ids)
    assert torch.equal(kernels.pack_blocks(kc, vc, ids.to(CUDA)), expected)
    chunk = rand(seed, expected.shape, torch.bfloat16, CUDA)
    want = twin_result(bases, lambda: ref.unpack_blocks(chunk, kc, vc, ids))
    kernels.unpack_blocks(chunk, kc, vc, ids)
    assert_all_equal(bases, want, "cache buffer")


@pytest.mark.gpu2
def test_tensors_on_the_second_gpu(seed):
    dev = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    keys, values, bases = hf_layers(seed, seq=[16, 16], batch=2, heads=2, head_dim=64, dtype=torch.float16,
                                    device=dev, kind="static")
    region = Region(layers=(0, 2), tokens=(2, 14))
    chunk = kernels.pack_tokens(keys, values, region)
    assert chunk.device == dev and torch.equal(chunk, ref.pack_tokens(keys, values, region))
    kc, vc, _ = paged_layers(seed, layers=2, num_blocks=8, block_size=4, heads=2, head_dim=64, dtype=torch.float16,
                             device=dev)
    assert torch.equal(kernels.pack_blocks(kc, vc, [7, 1]), ref.pack_blocks(kc, vc, [7, 1]))


@pytest.mark.gpu
def test_plan_newest_matches_the_twin_at_every_start(seed):
    keys, values, _ = hf_layers(seed, seq=[40, 40, 40], batch=3, heads=4, head_dim=128, dtype=torch.bfloat16,
                                device=CUDA, kind="static")
    plan = kernels.plan_newest(keys, values, num_tokens=2)
    twin = ref.NewestPlan(keys, values, None, 2)
    for start in (0, 17, 38):
        assert torch.equal(plan.run(start), twin.run(start))
    out, buf = sentinel_out(plan.shape, torch.bfloat16, "cpu", pin=True)
    plan.run(5, out=out)  # zero-copy into pinned host memory
    torch.cuda.synchronize()
    assert torch.equal(out, twin.run(5).cpu())
    assert_pads_untouched(buf)
    with pytest.raises(LayoutError, match="outside"):
        plan.run(39)


@pytest.mark.gpu
def test_plan_bind_follows_new_tensors_through_the_ring(seed):
    from kvstream.kernels.tokens import BIND_RING

    def step_kv():
        ks = [torch.randn(3, 1, 4, 128, generator=seed).to(torch.bfloat16).to(CUDA).transpose(1, 2) for _ in range(3)]
        vs = [torch.randn(3, 1, 4, 128, generator=seed).to(torch.bfloat16).to(CUDA).transpose(1, 2) for _ in range(3)]
        return ks, vs

    keys, values = step_kv()
    plan = kernels.plan_newest(keys, values, num_tokens=1)
    outs, expected = [], []
    for _ in range(2 * BIND_RING + 3):  # every ring slot reused: each launch must read its own step's table
        keys, values = step_kv()
        assert plan.bind(keys, values)
        outs.append(plan.run(0))
        expected.append(ref.pack_newest(keys, values, num_tokens=1))
    torch.cuda.synchronize()
    assert all(torch.equal(o, e) for o, e in zip(outs, expected))
    other = [torch.randn(3, 4, 2, 128, device=CUDA, dtype=torch.bfloat16) for _ in range(3)]
    assert not plan.bind(other, other)  # another shape: the plan stays as it was


@pytest.mark.gpu
def test_compiled_launches_pack_what_triton_launches_pack(seed):
    """After a specialization's first launch through Triton, `_launch.launch` calls its compiled kernel directly:
    the plan's and the region pack's later launches (other starts, 1 and multiples of 16 among them) must be
    bit-exact, and the direct path must be the one taken on this Triton."""
    from kvstream.kernels import _launch
    from kvstream.kernels.tokens import _copy_tokens_kernel

    keys, values, _ = hf_layers(seed, seq=[48, 48, 48], batch=2, heads=4, head_dim=128, dtype=torch.bfloat16,
                                device=CUDA, kind="static")
    plan = kernels.plan_newest(keys, values, num_tokens=3)
    starts = [0, 1, 2, 5, 16, 17, 32, 45]
    outs = [plan.run(s) for s in starts + starts]
    regions = [Region(layers=(0, 3), tokens=(s, s + 3), batch=(0, 2), heads=(0, 4)) for s in starts + starts]
    packs = [kernels.pack_tokens(keys, values, r) for r in regions]
    torch.cuda.synchronize()
    for s, o in zip(starts + starts, outs):
        assert torch.equal(o, ref.pack_tokens(keys, values, Region(layers=(0, 3), tokens=(s, s + 3))))
    for r, p in zip(regions, packs):
        assert torch.equal(p, ref.pack_tokens(keys, values, r))
    assert _copy_tokens_kernel not in _launch._no_direct
    assert any(k[0] is _copy_tokens_kernel for k in _launch._compiled), "no compiled kernel was cached"
