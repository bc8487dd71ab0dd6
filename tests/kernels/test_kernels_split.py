"""Keys and values of different head dims (MLA): the kernels against their torch twins, bit-exactly, and the twins
against the layout they promise (``[L, B, H, T, Dk + Dv]``: each row's keys, then its values)."""

import pytest
import torch

from kvstream import kernels
from kvstream.errors import ConfigError, LayoutError
from kvstream.kernels import reference as ref
from kvstream.layout import PACKED_SPLIT_AXES, Region, packed_kv, packed_kv_shape

from kvcases import (DTYPES, KINDS, assert_all_equal, assert_pads_untouched, hf_layers, paged_layers, rand,
                     sentinel_out, twin_result)

# (seq per layer, batch, heads, head_dim_k, head_dim_v, region)
CASES = {
    "deepseek-latent": ([6, 6, 6], 2, 1, 16, 8, Region(layers=(0, 3), tokens=(0, 6))),
    "v-wider": ([7, 7], 3, 2, 8, 24, Region(layers=(0, 2), tokens=(2, 6), batch=(1, 3), heads=(1, 2))),
    "odd-dims": ([5, 5], 2, 3, 7, 3, Region(layers=(1, 2), tokens=(1, 5))),
    "one-token": ([4, 4], 1, 2, 12, 4, Region(layers=(0, 2), tokens=(3, 4))),
    "sliding-window": ([9, 4, 9], 2, 1, 8, 16, Region(layers=(0, 3), tokens=(1, 4))),
}


def _layers(seed, device, case, kind, dtype):
    seq, batch, heads, dk, dv, region = CASES[case]
    return hf_layers(seed, seq=seq, batch=batch, heads=heads, head_dim=dk, head_dim_v=dv, dtype=dtype,
                     device=device, kind=kind), region, dk, dv


def test_shape_and_views():
    assert packed_kv_shape(3, (2, 1, 5), 16, 16) == (3, 2, 2, 1, 5, 16)
    assert packed_kv_shape(3, (2, 1, 5), 16, 8) == (3, 2, 1, 5, 24) and len(PACKED_SPLIT_AXES) == 5
    chunk = torch.arange(3 * 2 * 5 * 24.).view(3, 2, 1, 5, 24)
    k, v = packed_kv(chunk, 16)
    assert k.shape == (3, 2, 1, 5, 16) and v.shape == (3, 2, 1, 5, 8)
    assert k.data_ptr() == chunk.data_ptr() and float(v[0, 0, 0, 0, 0]) == 16.0
    with pytest.raises(LayoutError, match="Not a packed chunk"):
        packed_kv(chunk)
    assert Region(layers=(0, 3), tokens=(0, 5), batch=(0, 2), heads=(0, 1)).packed_shape(16, 8) == (3, 2, 1, 5, 24)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_pack_and_unpack_tokens_match_reference(seed, device, case, kind, dtype):
    (keys, values, bases), region, dk, dv = _layers(seed, device, case, kind, dtype)
    expected = ref.pack_tokens(keys, values, region)
    r = region.resolve(keys[region.layers.start].shape[0], keys[region.layers.start].shape[1])
    assert expected.shape == r.packed_shape(dk, dv)
    want_k, want_v = packed_kv(expected, dk)
    for i, l in enumerate(region.layers):  # the twin's layout, spelled out
        assert torch.equal(want_k[i], keys[l][r.batch.start:r.batch.stop, r.heads.start:r.heads.stop,
                                               r.tokens.start:r.tokens.stop])
        assert torch.equal(want_v[i], values[l][r.batch.start:r.batch.stop, r.heads.start:r.heads.stop,
                                                 r.tokens.start:r.tokens.stop])
    out, buf = sentinel_out(expected.shape, dtype, device)
    assert kernels.pack_tokens(keys, values, region, out, backend="triton") is out
    assert torch.equal(out, expected)
    assert_pads_untouched(buf)

    chunk = rand(seed, expected.shape, dtype, device)
    want = twin_result(bases, lambda: ref.unpack_tokens(chunk, keys, values, region))
    kernels.unpack_tokens(chunk, keys, values, region, backend="triton")
    assert_all_equal(bases, want, "cache buffer")


@pytest.mark.parametrize("kind", ["contiguous", "static", "bshd"])
def test_plan_matches_reference(seed, device, kind):
    """(pack_newest/unpack_newest of split head dims: test_kernels_tokens.py's newest test, values-16.)"""
    keys, values, _ = hf_layers(seed, seq=[9, 4, 9], batch=2, heads=1, head_dim=16, head_dim_v=8,
                                dtype=torch.bfloat16, device=device, kind=kind)
    plan = kernels.plan_newest(keys, values, num_tokens=2, backend="triton")
    twin = kernels.plan_newest(keys, values, num_tokens=2, backend="torch")
    assert plan.head_dims == twin.head_dims == (16, 8) and plan.shape == twin.shape == (3, 2, 1, 2, 24)
    assert torch.equal(plan.run(1), twin.run(1))
    assert torch.equal(plan.run(1), ref.pack_newest(keys, values, num_tokens=2, starts=1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_match_reference(seed, device, dtype):
    kc, vc, bases = paged_layers(seed, layers=3, num_blocks=6, block_size=4, heads=1, head_dim=16, head_dim_v=8,
                                 dtype=dtype, device=device)
    ids = [4, 0, 2]
    expected = ref.pack_blocks(kc, vc, ids, layers=[2, 1])
    assert expected.shape == (2, 3, 4, 1, 24)
    k, v = packed_kv(expected, 16)
    assert torch.equal(k[0], kc[2][ids]) and torch.equal(v[1], vc[1][ids])
    out, buf = sentinel_out(expected.shape, dtype, device)
    kernels.pack_blocks(kc, vc, ids, layers=[2, 1], out=out, backend="triton")
    assert torch.equal(out, expected)
    assert_pads_untouched(buf)
    chunk = rand(seed, expected.shape, dtype, device)
    want = twin_result(bases, lambda: ref.unpack_blocks(chunk, kc, vc, ids, layers=[2, 1]))
    kernels.unpack_blocks(chunk, kc, vc, ids, layers=[2, 1], backend="triton")
    assert_all_equal(bases, want, "paged cache")


def test_errors_name_the_value_head_dim(seed, device):
    keys, values, _ = hf_layers(seed, seq=[5, 5], batch=2, heads=1, head_dim=16, head_dim_v=8, dtype=torch.float16,
                                device=device)
    region = Region(layers=(0, 2), tokens=(0, 4))
    bad = [values[0], torch.zeros(2, 1, 5, 16, dtype=torch.float16, device=device)]
    with pytest.raises(LayoutError, match=r"Invalid shape of values\[1\]: expected \[2, 1, >=4, 8\], got \[2, 1, 5, 16\]"):
        kernels.pack_tokens(keys, bad, region, backend="triton")
    with pytest.raises(LayoutError, match=r"Invalid shape of values\[1\]: expected \[2, 1, \*, 8\]"):
        kernels.pack_newest(keys, bad, backend="triton")
    with pytest.raises(LayoutError, match=r"Invalid shape of out: expected \[2, 2, 1, 4, 24\]"):
        kernels.pack_tokens(keys, values, region, torch.empty(2, 2, 2, 1, 4, 16, dtype=torch.float16, device=device),
                            backend="triton")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("head_dim_v", [16, 8])
def test_plan_run_into_writes_the_chunk_into_a_flat_buffer_and_nothing_past_it(seed, device, backend, head_dim_v):
    """``run_into`` (the transport's zero-copy write) packs what ``run`` packs, into the first ``nbytes`` bytes of a
    flat uint8 buffer: pinned host memory on a GPU, which the kernel writes over PCIe."""
    keys, values, _ = hf_layers(seed, seq=[9, 9, 9], batch=2, heads=2, head_dim=16, head_dim_v=head_dim_v,
                                dtype=torch.bfloat16, device=device, kind="static")
    plan = kernels.plan_newest(keys, values, num_tokens=3, backend=backend)
    assert plan.nbytes == 3 * 2 * 2 * 3 * (16 + head_dim_v) * 2
    pin = device.type == "cuda"
    for start in (0, 1, 6):
        buf = torch.full((plan.nbytes + 64,), 0xA5, dtype=torch.uint8, pin_memory=pin)
        plan.run_into(start, buf)
        if pin:
            torch.cuda.synchronize()
        want = ref.pack_newest(keys, values, num_tokens=3, starts=start).cpu()
        assert torch.equal(buf[:plan.nbytes].view(torch.bfloat16).view(plan.shape), want), start
        assert (buf[plan.nbytes:] == 0xA5).all(), "wrote past the chunk"
    with pytest.raises(LayoutError, match="outside"):
        plan.run_into(7, torch.empty(plan.nbytes, dtype=torch.uint8, pin_memory=pin))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("head_dim_v", [16, 8])
def test_plan_pack_into_other_tensors_of_any_length_and_holds_none(seed, device, backend, head_dim_v):
    """``pack_into`` (a dynamic cache's pending steps) packs positions of tensors that are longer, and strided
    otherwise, than the ones the plan was made from, keeps no reference to them, and refuses tensors that do not
    fit the plan without writing anything."""
    import weakref

    keys, values, _ = hf_layers(seed, seq=[6, 6, 6], batch=2, heads=2, head_dim=16, head_dim_v=head_dim_v,
                                dtype=torch.bfloat16, device=device, kind="contiguous")
    plan = kernels.plan_newest(keys, values, num_tokens=3, backend=backend)
    plan.detach()
    with pytest.raises(ConfigError, match="detached"):
        plan.run(0)
    pin = device.type == "cuda"
    for seq, kind in ((9, "contiguous"), (13, "static"), (11, "bshd")):
        ks, vs, bases = hf_layers(seed, seq=[seq] * 3, batch=2, heads=2, head_dim=16, head_dim_v=head_dim_v,
                                  dtype=torch.bfloat16, device=device, kind=kind)
        refs = [weakref.ref(t) for t in ks + vs]
        start = seq - 3 - 1
        buf = torch.full((plan.nbytes + 32,), 0x5A, dtype=torch.uint8, pin_memory=pin)
        assert plan.pack_into(ks, vs, start, buf)
        if pin:
            torch.cuda.synchronize()
        want = ref.pack_newest(ks, vs, num_tokens=3, starts=start).cpu()
        assert torch.equal(buf[:plan.nbytes].view(torch.bfloat16).view(plan.shape), want), kind
        assert (buf[plan.nbytes:] == 0x5A).all(), "wrote past the chunk"
        del ks, vs, bases
        assert all(r() is None for r in refs), "the plan kept a tensor"
    ks, vs, _ = hf_layers(seed, seq=[9] * 3, batch=2, heads=2, head_dim=16, head_dim_v=head_dim_v,
                          dtype=torch.bfloat16, device=device, kind="contiguous")
    buf = torch.full((plan.nbytes,), 0x5A, dtype=torch.uint8, pin_memory=pin)
    other_heads = [k[:, :1] for k in ks]
    assert not plan.pack_into(other_heads, [v[:, :1] for v in vs], 0, buf)
    assert not plan.pack_into(ks[:2], vs[:2], 0, buf)
    assert not plan.pack_into([k.float() for k in ks], [v.float() for v in vs], 0, buf)
    if backend == "triton":  # the kernel's promise of 16-byte vectors: tensors one element off cannot keep it
        uk, uv, _ = hf_layers(seed, seq=[9] * 3, batch=2, heads=2, head_dim=16, head_dim_v=head_dim_v,
                              dtype=torch.bfloat16, device=device, kind="unaligned")
        assert not plan.pack_into(uk, uv, 0, buf)
    assert (buf == 0x5A).all()
    with pytest.raises(LayoutError, match="outside"):
        plan.pack_into(ks, vs, 7, buf)
