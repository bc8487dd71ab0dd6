"""Paged-block kernels against their torch twins, bit-exactly (CPU interpreter and GPU)."""

import pytest
import torch

from kvstream import kernels
from kvstream.errors import LayoutError
from kvstream.kernels import reference as ref

from kvcases import DTYPES, SENTINEL, assert_all_equal, assert_pads_untouched, paged_layers, rand, sentinel_out, twin_result

LAYOUTS = ("nhd", "flashinfer", "vllm")


# (layout, dtype, head_dim, id dtype): a Latin square over the values that break things.
COMBOS = [(kind, dtype, head_dim, id_dtype)
          for i, kind in enumerate(LAYOUTS) for j, dtype in enumerate(DTYPES)
          for head_dim, id_dtype in [((8, 7, 80)[(i + j) % 3], (torch.int32, torch.int64)[(i + 2 * j) % 2])]]


@pytest.mark.parametrize("kind, dtype, head_dim, id_dtype", COMBOS, ids=str)
def test_pack_and_unpack_blocks_match_reference(seed, device, kind, dtype, head_dim, id_dtype):
    kc, vc, bases = paged_layers(seed, layers=3, num_blocks=6, block_size=4, heads=2, head_dim=head_dim, dtype=dtype,
                                 device=device, kind=kind)
    for block_ids, layers in (([5, 0, 3], None), ([2], [2, 0]), ([1, 4, 0, 2, 3, 5], range(1, 2))):
        ids = torch.tensor(block_ids, dtype=id_dtype)
        expected = ref.pack_blocks(kc, vc, ids, layers=layers)
        out, buf = sentinel_out(expected.shape, dtype, device)
        assert kernels.pack_blocks(kc, vc, ids, layers=layers, out=out, backend="triton") is out
        assert torch.equal(out, expected), (block_ids, layers)
        assert_pads_untouched(buf)

        chunk = rand(seed, expected.shape, dtype, device)
        want = twin_result(bases, lambda: ref.unpack_blocks(chunk, kc, vc, ids, layers=layers))
        kernels.unpack_blocks(chunk, kc, vc, ids.to(device), layers=layers, backend="triton")
        assert_all_equal(bases, want, f"cache buffer after unpack {block_ids} {layers}")


def test_blocks_round_trip_and_sequence_ids(seed, device):
    kc, vc, bases = paged_layers(seed, layers=2, num_blocks=5, block_size=3, heads=2, head_dim=16,
                                 dtype=torch.bfloat16, device=device, kind="flashinfer")
    original = [b.clone() for b in bases]
    chunk = kernels.pack_blocks(kc, vc, [4, 1], backend="triton")
    for k, v in zip(kc, vc):
        k[[4, 1]] = SENTINEL
        v[[4, 1]] = SENTINEL
    kernels.unpack_blocks(chunk, kc, vc, [4, 1], backend="triton")
    assert_all_equal(bases, original, "cache buffer")


def test_no_blocks_is_an_empty_chunk(seed, device):
    kc, vc, bases = paged_layers(seed, layers=2, num_blocks=3, block_size=2, heads=1, head_dim=8,
                                 dtype=torch.float16, device=device)
    out = kernels.pack_blocks(kc, vc, torch.empty(0, dtype=torch.int64), backend="triton")
    assert out.shape == (2, 2, 0, 2, 1, 8)
    before = [b.clone() for b in bases]
    kernels.unpack_blocks(out, kc, vc, [], backend="triton")
    assert_all_equal(bases, before)


def test_device_block_ids_out_of_range_are_skipped(seed, device, monkeypatch):
    """Ids on the KV device are not read back to the host; the kernel must not touch memory for ids outside
    ``[0, num_blocks)``. (On the CPU the public API checks CPU ids, so the host check is patched away.)"""
    from kvstream.kernels import _checks

    if device.type == "cpu":
        monkeypatch.setattr(_checks, "check_block_ids", lambda ids, *args, **kw: ids)

    kc, vc, bases = paged_layers(seed, layers=2, num_blocks=4, block_size=2, heads=2, head_dim=8,
                                 dtype=torch.float16, device=device)
    ids = torch.tensor([3, -1, 4, 0], dtype=torch.int64, device=device)
    out, buf = sentinel_out((2, 2, 4, 2, 2, 8), torch.float16, device)
    kernels.pack_blocks(kc, vc, ids, out=out, backend="triton")
    for j, blk in enumerate([3, -1, 4, 0]):
        for l in range(2):
            want = (torch.stack([kc[l][blk], vc[l][blk]]) if 0 <= blk < 4
                    else torch.full((2, 2, 2, 8), SENTINEL, dtype=torch.float16, device=device))
            assert torch.equal(out[l, :, j], want), (l, blk)
    assert_pads_untouched(buf)
    before = [b.clone() for b in bases]
    kernels.unpack_blocks(torch.full_like(out, SENTINEL), kc, vc, ids, backend="triton")
    for b, orig in zip(bases, before):
        assert torch.equal(b[[1, 2]], orig[[1, 2]])  # blocks no valid id names
        assert (b[[0, 3]] == SENTINEL).all()


def test_errors(seed, device):
    kc, vc, _ = paged_layers(seed, layers=2, num_blocks=4, block_size=2, heads=2, head_dim=8, dtype=torch.float16,
                             device=device)
    with pytest.raises(LayoutError, match=r"block_ids span \[0, 4\] but the caches hold 4 blocks"):
        kernels.pack_blocks(kc, vc, [0, 4], backend="triton")
    with pytest.raises(LayoutError, match="repeat"):
        kernels.unpack_blocks(torch.zeros(2, 2, 2, 2, 2, 8, dtype=torch.float16, device=device), kc, vc, [1, 1],
                              backend="triton")
    with pytest.raises(LayoutError, match="int32 or int64"):
        kernels.pack_blocks(kc, vc, torch.tensor([0.0]), backend="triton")
    with pytest.raises(LayoutError, match=r"Invalid shape of block_ids"):
        kernels.pack_blocks(kc, vc, torch.zeros(1, 1, dtype=torch.int64), backend="triton")
    with pytest.raises(LayoutError, match=r"Invalid shape of value_caches\[1\]: expected \[\*, 2, 2, 8\], got \[4, 2, 3, 8\]"):
        kernels.pack_blocks(kc, [vc[0], torch.zeros(4, 2, 3, 8, dtype=torch.float16, device=device)], [0],
                            backend="triton")
    with pytest.raises(LayoutError, match=r"Invalid shape of chunk: expected \[1, 2, 1, 2, 2, 8\]"):
        kernels.unpack_blocks(torch.zeros(1, 2, 2, 2, 2, 8, dtype=torch.float16, device=device), kc, vc, [3],
                              layers=[1], backend="triton")


@pytest.mark.parametrize("block_rows", [1, 4, 16])
def test_tiles_within_a_block(seed, device, block_rows):
    from kvstream.kernels import paged

    kc, vc, bases = paged_layers(seed, layers=2, num_blocks=5, block_size=3, heads=2, head_dim=8,
                                 dtype=torch.float16, device=device, kind="vllm")
    ids = torch.tensor([2, 0, 4])
    expected = ref.pack_blocks(kc, vc, ids)
    assert torch.equal(paged.pack_blocks(kc, vc, ids, block_rows=block_rows), expected)
    chunk = rand(seed, expected.shape, torch.float16, device)
    want = twin_result(bases, lambda: ref.unpack_blocks(chunk, kc, vc, ids))
    paged.unpack_blocks(chunk, kc, vc, ids, block_rows=block_rows)
    assert_all_equal(bases, want, "cache buffer")
