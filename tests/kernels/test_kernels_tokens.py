"""Token-range and newest-token kernels against their torch twins, bit-exactly (CPU interpreter and GPU)."""

import pytest
import torch

from kvstream import kernels
from kvstream.errors import LayoutError
from kvstream.kernels import reference as ref
from kvstream.layout import Region

from kvcases import (DTYPES, KINDS, SENTINEL, assert_all_equal, assert_pads_untouched, clones, hf_layers, rand,
                     sentinel_out, twin_result)

# (seq per layer, batch, heads, head_dim, region): the shapes that break things.
CASES = {
    "full": ([6, 6, 6], 2, 3, 8, Region(layers=(0, 3), tokens=(0, 6))),
    "sub-batch-heads": ([7, 7, 7, 7], 3, 4, 8, Region(layers=(1, 3), tokens=(2, 6), batch=(1, 3), heads=(1, 3))),
    "one-token": ([5, 5], 2, 2, 16, Region(layers=(0, 2), tokens=(4, 5))),
    "one-layer": ([5, 5, 5], 1, 2, 4, Region(layers=(2, 3), tokens=(1, 4))),
    "odd-head-dim-7": ([5, 5], 2, 3, 7, Region(layers=(0, 2), tokens=(1, 5), heads=(2, 3))),
    "head-dim-80": ([4, 4], 1, 2, 80, Region(layers=(0, 2), tokens=(0, 3))),
    "head-dim-96": ([4], 2, 1, 96, Region(layers=(0, 1), tokens=(1, 4))),
    "head-dim-1": ([6, 6], 2, 2, 1, Region(layers=(0, 2), tokens=(0, 6))),
    "sliding-window": ([9, 4, 9], 2, 2, 8, Region(layers=(0, 3), tokens=(1, 4))),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_pack_and_unpack_tokens_match_reference(seed, device, case, kind, dtype):
    seq, batch, heads, head_dim, region = CASES[case]
    keys, values, bases = hf_layers(seed, seq=seq, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype,
                                    device=device, kind=kind)
    expected = ref.pack_tokens(keys, values, region)
    out, buf = sentinel_out(expected.shape, dtype, device)
    assert kernels.pack_tokens(keys, values, region, out, backend="triton") is out
    assert torch.equal(out, expected)
    assert_pads_untouched(buf)
    assert torch.equal(kernels.pack_tokens(keys, values, region, backend="triton"), expected)

    chunk = rand(seed, expected.shape, dtype, device)
    want = twin_result(bases, lambda: ref.unpack_tokens(chunk, keys, values, region))
    kernels.unpack_tokens(chunk, keys, values, region, backend="triton")
    assert_all_equal(bases, want, "cache buffer")


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_restores_exactly(seed, device, kind):
    keys, values, bases = hf_layers(seed, seq=[8, 8, 8], batch=2, heads=2, head_dim=16, dtype=torch.bfloat16,
                                    device=device, kind=kind)
    region = Region(layers=(0, 3), tokens=(3, 8), heads=(1, 2))
    original = clones(bases)
    chunk = kernels.pack_tokens(keys, values, region, backend="triton")
    for l in region.layers:
        keys[l][:, 1:2, 3:8] = SENTINEL
        values[l][:, 1:2, 3:8] = SENTINEL
    kernels.unpack_tokens(chunk, keys, values, region, backend="triton")
    assert_all_equal(bases, original, "cache buffer")


def test_random_regions(seed, device):
    for _ in range(8):
        def pick(lo, hi):
            return int(torch.randint(lo, hi + 1, (1,), generator=seed))

        layers, batch, heads = pick(1, 4), pick(1, 3), pick(1, 3)
        head_dim = [1, 3, 8, 12, 24][pick(0, 4)]
        seq = [pick(3, 9) for _ in range(layers)]
        dtype = DTYPES[pick(0, 2)]
        kind = KINDS[pick(0, len(KINDS) - 1)]
        keys, values, bases = hf_layers(seed, seq=seq, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype,
                                        device=device, kind=kind)
        l0 = pick(0, layers - 1)
        l1 = pick(l0 + 1, layers)
        stop = pick(1, min(seq[l0:l1]))
        b0, h0 = pick(0, batch - 1), pick(0, heads - 1)
        region = Region(layers=(l0, l1), tokens=(pick(0, stop - 1), stop), batch=(b0, pick(b0 + 1, batch)),
                        heads=(h0, pick(h0 + 1, heads)))
        what = f"{kind} {dtype} seq={seq} B={batch} H={heads} D={head_dim} {region}"
        expected = ref.pack_tokens(keys, values, region)
        assert torch.equal(kernels.pack_tokens(keys, values, region, backend="triton"), expected), what
        chunk = rand(seed, expected.shape, dtype, device)
        want = twin_result(bases, lambda: ref.unpack_tokens(chunk, keys, values, region))
        kernels.unpack_tokens(chunk, keys, values, region, backend="triton")
        assert_all_equal(bases, want, what)


@pytest.mark.parametrize("region", [Region(layers=(0, 2), tokens=(3, 3)), Region(layers=(0, 2), tokens=(0, 2),
                                                                                   heads=(1, 1))])
def test_empty_region_launches_nothing(seed, device, region):
    keys, values, bases = hf_layers(seed, seq=[4, 4], batch=2, heads=2, head_dim=8, dtype=torch.float16,
                                    device=device)
    out = kernels.pack_tokens(keys, values, region, backend="triton")
    assert out.numel() == 0 and out.shape == region.resolve(2, 2).packed_shape(8)
    before = clones(bases)
    kernels.unpack_tokens(out, keys, values, region, backend="triton")
    assert_all_equal(bases, before)
    assert kernels.pack_newest(keys, values, num_tokens=0, backend="triton").shape == (2, 2, 2, 2, 0, 8)


@pytest.mark.parametrize("head_dim_v", [None, 16], ids=["one-head-dim", "values-16"])  # 16: K and V differ (MLA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "static", "bshd"])
def test_newest_matches_reference_with_sliding_window_layers(seed, device, kind, dtype, head_dim_v):
    keys, values, bases = hf_layers(seed, seq=[9, 4, 9, 5], batch=2, heads=3, head_dim=8, dtype=dtype,
                                    device=device, kind=kind, head_dim_v=head_dim_v)
    for args in (dict(), dict(num_tokens=3), dict(layers=[3, 0]), dict(starts=[0, 1, 8, 4]), dict(starts=2),
                 dict(starts=torch.tensor([1, 0, 2, 3], dtype=torch.int32)), dict(layers=range(1, 3), starts=[3, 5])):
        expected = ref.pack_newest(keys, values, **args)
        out, buf = sentinel_out(expected.shape, dtype, device)
        kernels.pack_newest(keys, values, out=out, backend="triton", **args)
        assert torch.equal(out, expected), args
        assert_pads_untouched(buf)

        chunk = rand(seed, expected.shape, dtype, device)
        starts = args.get("starts")
        want = twin_result(bases, lambda: ref.unpack_newest(chunk, keys, values, starts, layers=args.get("layers")))
        kernels.unpack_newest(chunk, keys, values, starts, layers=args.get("layers"), backend="triton")
        assert_all_equal(bases, want, f"cache buffer after unpack_newest {args}")


def test_newest_round_trip(seed, device):
    keys, values, bases = hf_layers(seed, seq=[6, 3, 6], batch=2, heads=2, head_dim=16, dtype=torch.float16,
                                    device=device, kind="static")
    original = clones(bases)
    step = kernels.pack_newest(keys, values, num_tokens=2, backend="triton")
    for k, v in zip(keys, values):
        k[:, :, -2:] = SENTINEL
        v[:, :, -2:] = SENTINEL
    kernels.unpack_newest(step, keys, values, None, backend="triton")
    assert_all_equal(bases, original, "cache buffer")


def test_extra_dtypes_move_bits(seed, device):
    for dtype in (torch.float64, torch.float8_e4m3fn, torch.int8):
        keys = [torch.randint(-100, 100, (2, 2, 5, 8), generator=seed).to(dtype).to(device) for _ in range(2)]
        values = [torch.randint(-100, 100, (2, 2, 5, 8), generator=seed).to(dtype).to(device) for _ in range(2)]
        region = Region(layers=(0, 2), tokens=(1, 4))
        got = kernels.pack_tokens(keys, values, region, backend="triton")
        want = ref.pack_tokens(keys, values, region)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), dtype


def test_errors(seed, device):
    keys, values, _ = hf_layers(seed, seq=[5, 5], batch=2, heads=2, head_dim=8, dtype=torch.float16, device=device)
    region = Region(layers=(0, 2), tokens=(0, 4))
    with pytest.raises(LayoutError, match=r"Invalid shape of out: expected \[2, 2, 2, 2, 4, 8\], got \[2, 2, 2, 2, 4, 7\]"):
        kernels.pack_tokens(keys, values, region, torch.empty(2, 2, 2, 2, 4, 7, dtype=torch.float16, device=device),
                            backend="triton")
    with pytest.raises(LayoutError, match="dtype of out"):
        kernels.pack_tokens(keys, values, region, torch.empty(2, 2, 2, 2, 4, 8, device=device), backend="triton")
    with pytest.raises(LayoutError, match="contiguous"):
        bad = torch.empty(2, 2, 2, 2, 8, 4, dtype=torch.float16, device=device).transpose(4, 5)
        kernels.pack_tokens(keys, values, region, bad, backend="triton")
    with pytest.raises(LayoutError, match=r"Invalid shape of values\[1\]: expected \[2, 2, >=4, 8\], got \[2, 3, 5, 8\]"):
        kernels.pack_tokens(keys, [values[0], torch.zeros(2, 3, 5, 8, dtype=torch.float16, device=device)], region,
                            backend="triton")
    with pytest.raises(LayoutError, match="head_dim must be contiguous"):
        strided = [torch.zeros(2, 2, 5, 16, dtype=torch.float16, device=device)[..., ::2] for _ in range(2)]
        kernels.pack_tokens(strided, strided, region, backend="triton")
    with pytest.raises(LayoutError, match=r"Layer 1: tokens \[5, 6\) fall outside its 5 positions"):
        kernels.pack_newest(keys, values, starts=[0, 5], backend="triton")
    with pytest.raises(LayoutError, match="repeat"):
        kernels.pack_newest(keys, values, layers=[1, 1], backend="triton")
    with pytest.raises(LayoutError, match=r"out of range for the 2 layers"):
        kernels.pack_newest(keys, values, layers=[2], backend="triton")
    with pytest.raises(LayoutError, match=r"starts has 1 entries for 2 layers"):
        kernels.pack_newest(keys, values, starts=[1], backend="triton")
    with pytest.raises(LayoutError, match=r"Invalid shape of chunk: expected \[2, 2, 2, 2, 1, 8\]"):
        kernels.unpack_newest(torch.zeros(2, 2, 2, 2, 1, 4, dtype=torch.float16, device=device), keys, values, 0,
                              backend="triton")
    with pytest.raises(LayoutError, match="6-D"):
        kernels.unpack_newest(torch.zeros(4, dtype=torch.float16, device=device), keys, values, 0, backend="triton")


def test_device_starts_are_masked_to_each_layer(seed, device, monkeypatch):
    """Starts the kernel reads from a device tensor are not checked on the host: positions outside a layer
    must be neither read nor written. (On the CPU the public API checks tensor starts on the host, so the
    host check is patched away to reach the same code path.)"""
    from kvstream.kernels import _checks

    if device.type == "cpu":
        monkeypatch.setattr(_checks, "resolve_starts", lambda starts, *args: starts)
    keys, values, bases = hf_layers(seed, seq=[6, 6, 6, 6], batch=2, heads=2, head_dim=8, dtype=torch.float16,
                                    device=device, kind="static")
    starts = [4, -1, 5, 2]  # layer 1 starts before 0; layer 2's second token is past its end
    dev_starts = torch.tensor(starts, dtype=torch.int64, device=device)
    out, buf = sentinel_out((4, 2, 2, 2, 2, 8), torch.float16, device)
    kernels.pack_newest(keys, values, num_tokens=2, starts=dev_starts, out=out, backend="triton")
    for i, s in enumerate(starts):
        for t in range(2):
            inside = 0 <= s + t < 6
            want = (torch.stack([keys[i][:, :, s + t], values[i][:, :, s + t]]) if inside
                    else torch.full((2, 2, 2, 8), SENTINEL, dtype=torch.float16, device=device))
            assert torch.equal(out[i, :, :, :, t], want), (i, t)
    assert_pads_untouched(buf)

    before = clones(bases)
    chunk = torch.full_like(out, SENTINEL)
    kernels.unpack_newest(chunk, keys, values, dev_starts, backend="triton")
    for i, s in enumerate(starts):
        for kv, tensors in enumerate((keys, values)):
            written = tensors[i] == SENTINEL
            expect = torch.zeros_like(written)
            expect[:, :, max(s, 0):min(s + 2, 6)] = True
            assert torch.equal(written, expect), (i, kv)
    for b, orig in zip(bases, before):  # the spare StaticCache capacity behind each view is untouched
        assert torch.equal(b[:, :, 6:], orig[:, :, 6:])


@pytest.mark.parametrize("block_rows", [1, 2, 4, 8, 64])
def test_both_tilings(seed, device, block_rows):
    """Tiles of consecutive tokens of one (batch, head) when the range has at least ``block_rows`` tokens,
    tiles across (batch, head, token) rows otherwise: both must give the twin's bytes."""
    from kvstream.kernels import tokens

    keys, values, bases = hf_layers(seed, seq=[9, 9, 6], batch=2, heads=3, head_dim=8, dtype=torch.bfloat16,
                                    device=device, kind="sliced")
    for region in (Region(layers=(0, 3), tokens=(0, 6), heads=(1, 3)), Region(layers=(1, 2), tokens=(2, 5))):
        expected = ref.pack_tokens(keys, values, region)
        assert torch.equal(tokens.pack_tokens(keys, values, region, block_rows=block_rows), expected)
        chunk = rand(seed, expected.shape, torch.bfloat16, device)
        want = twin_result(bases, lambda: ref.unpack_tokens(chunk, keys, values, region))
        tokens.unpack_tokens(chunk, keys, values, region, block_rows=block_rows)
        assert_all_equal(bases, want, f"cache buffer, block_rows={block_rows}")
    expected = ref.pack_newest(keys, values, num_tokens=3)
    assert torch.equal(tokens.pack_newest(keys, values, num_tokens=3, block_rows=block_rows), expected)
