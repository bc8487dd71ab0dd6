"""The torch twins against element-by-element expectations: the twins are the yardstick of every kernel
test, so they are checked by hand-written indexing here."""

import itertools

import pytest
import torch

from kvstream.errors import LayoutError
from kvstream.kernels import reference as ref
from kvstream.layout import Region

from kvcases import SENTINEL, hf_layers, paged_layers


def _hand_pack(keys, values, layers, batch, heads, starts, n, d):
    out = torch.empty(len(layers), 2, len(batch), len(heads), n, d, dtype=keys[0].dtype)
    for (i, l), kv, (bi, b), (hi, h), t, e in itertools.product(enumerate(layers), range(2), enumerate(batch),
                                                                  enumerate(heads), range(n), range(d)):
        src = keys[l] if kv == 0 else values[l]
        out[i, kv, bi, hi, t, e] = src[b, h, starts[i] + t, e]
    return out


@pytest.mark.parametrize("kind", ["static", "bshd"])
def test_pack_tokens_by_hand(seed, kind):
    keys, values, _ = hf_layers(seed, seq=[6, 6, 6], batch=3, heads=3, head_dim=3, dtype=torch.float32,
                                device="cpu", kind=kind)
    region = Region(layers=(1, 3), tokens=(2, 5), batch=(1, 3), heads=(0, 2))
    got = ref.pack_tokens(keys, values, region)
    assert torch.equal(got, _hand_pack(keys, values, [1, 2], range(1, 3), range(0, 2), [2, 2], 3, 3))


def test_unpack_tokens_by_hand(seed):
    keys, values, _ = hf_layers(seed, seq=[5, 5], batch=2, heads=2, head_dim=2, dtype=torch.float32, device="cpu",
                                kind="static")
    before_k, before_v = [k.clone() for k in keys], [v.clone() for v in values]
    chunk = torch.randn(1, 2, 1, 2, 2, 2, generator=seed)
    ref.unpack_tokens(chunk, keys, values, Region(layers=(1, 2), tokens=(3, 5), batch=(1, 2)))
    for l, kv, b, h, t, e in itertools.product(range(2), range(2), range(2), range(2), range(5), range(2)):
        got = (keys if kv == 0 else values)[l][b, h, t, e]
        inside = l == 1 and b == 1 and 3 <= t < 5
        want = chunk[0, kv, 0, h, t - 3, e] if inside else (before_k if kv == 0 else before_v)[l][b, h, t, e]
        assert got == want, (l, kv, b, h, t, e)


def test_pack_newest_by_hand_with_sliding_window_layers(seed):
    keys, values, _ = hf_layers(seed, seq=[7, 4, 7], batch=2, heads=2, head_dim=3, dtype=torch.float32,
                                device="cpu")
    got = ref.pack_newest(keys, values, num_tokens=2)
    assert torch.equal(got, _hand_pack(keys, values, [0, 1, 2], range(2), range(2), [5, 2, 5], 2, 3))
    got = ref.pack_newest(keys, values, layers=[2, 0], starts=[1, 3])
    assert torch.equal(got, _hand_pack(keys, values, [2, 0], range(2), range(2), [1, 3], 1, 3))


def test_unpack_newest_by_hand(seed):
    keys, values, _ = hf_layers(seed, seq=[4, 3], batch=1, heads=2, head_dim=2, dtype=torch.float32, device="cpu")
    chunk = torch.full((2, 2, 1, 2, 1, 2), SENTINEL)
    ref.unpack_newest(chunk, keys, values, starts=[0, 2])
    assert (keys[0][:, :, 0] == SENTINEL).all() and (values[1][:, :, 2] == SENTINEL).all()
    assert int((keys[0] == SENTINEL).sum()) == 4 and int((values[1] == SENTINEL).sum()) == 4


@pytest.mark.parametrize("kind", ["nhd", "flashinfer", "vllm"])
def test_pack_blocks_by_hand(seed, kind):
    kc, vc, _ = paged_layers(seed, layers=2, num_blocks=5, block_size=3, heads=2, head_dim=2, dtype=torch.float32,
                             device="cpu", kind=kind)
    ids = [4, 0, 2]
    got = ref.pack_blocks(kc, vc, torch.tensor(ids, dtype=torch.int32), layers=[1, 0])
    for (i, l), kv, (j, blk), t, h, e in itertools.product(enumerate([1, 0]), range(2), enumerate(ids), range(3),
                                                           range(2), range(2)):
        assert got[i, kv, j, t, h, e] == (kc if kv == 0 else vc)[l][blk, t, h, e]


def test_unpack_blocks_by_hand(seed):
    kc, vc, _ = paged_layers(seed, layers=1, num_blocks=4, block_size=2, heads=1, head_dim=2, dtype=torch.float32,
                             device="cpu")
    before = kc[0].clone()
    chunk = torch.full((1, 2, 2, 2, 1, 2), SENTINEL)
    ref.unpack_blocks(chunk, kc, vc, [3, 1])
    for blk in range(4):
        expect = torch.full_like(before[blk], SENTINEL) if blk in (1, 3) else before[blk]
        assert torch.equal(kc[0][blk], expect)
    assert (vc[0][[1, 3]] == SENTINEL).all() and not (vc[0][[0, 2]] == SENTINEL).any()


def test_reference_raises_on_bad_input(seed):
    keys, values, _ = hf_layers(seed, seq=[4, 4], batch=1, heads=2, head_dim=2, dtype=torch.float32, device="cpu")
    with pytest.raises(LayoutError, match=r"Invalid shape of keys\[0\]: expected \[1, 2, >=5, 2\]"):
        ref.pack_tokens(keys, values, Region(layers=(0, 2), tokens=(0, 5)))
    with pytest.raises(LayoutError, match="fall outside"):
        ref.pack_newest(keys, values, starts=[0, 4])
    kc, vc, _ = paged_layers(seed, layers=1, num_blocks=3, block_size=2, heads=1, head_dim=2, dtype=torch.float32,
                             device="cpu")
    with pytest.raises(LayoutError, match="hold 3 blocks"):
        ref.pack_blocks(kc, vc, [0, 3])
