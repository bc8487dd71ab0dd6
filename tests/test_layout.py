import pytest
import torch

from kvstream.errors import CorruptChunkError, LayoutError
from kvstream.chunk import HEADER_BYTES, ChunkHeader, payload_checksum
from kvstream.layout import KVLayout, Region, check_hf_layers, check_packed


def test_region_resolve_and_packed_shape():
    r = Region(layers=range(0, 4), tokens=(3, 10))
    assert not r.is_resolved
    rr = r.resolve(batch_size=2, kv_heads=3)
    assert rr.batch == range(0, 2) and rr.heads == range(0, 3)
    assert rr.packed_shape(head_dim=5) == (4, 2, 2, 3, 7, 5)
    with pytest.raises(LayoutError):
        r.packed_shape(5)
    with pytest.raises(LayoutError, match="exceed batch size"):
        Region(layers=(0, 1), tokens=(0, 1), batch=(0, 3)).resolve(batch_size=2, kv_heads=1)


@pytest.mark.parametrize("bad", [range(0, 4, 2), (5, 2), (-1, 2), (1, 2, 3)])
def test_region_rejects_bad_ranges(bad):
    with pytest.raises(LayoutError):
        Region(layers=bad, tokens=(0, 1))


def test_region_roundtrip_dict():
    r = Region(layers=(1, 3), tokens=(0, 9), batch=(2, 4), heads=None)
    assert Region.from_dict(r.to_dict()) == r


def test_layout_from_configs():
    from kvstream.models import tiny_config

    lay = KVLayout.from_config(tiny_config("llama"), dtype=torch.float16)
    assert (lay.num_layers, lay.kv_heads, lay.head_dim) == (4, 2, 16)
    gpt2 = KVLayout.from_config(tiny_config("gpt2"))
    assert (gpt2.num_layers, gpt2.kv_heads, gpt2.head_dim) == (4, 4, 16)
    assert lay.bytes_per_token(batch_size=3) == 4 * 2 * 3 * 2 * 16 * 2
    assert KVLayout.from_dict(lay.to_dict()) == lay


def test_check_hf_layers_messages():
    k = [torch.zeros(2, 3, 8, 4) for _ in range(2)]
    v = [torch.zeros(2, 3, 8, 4) for _ in range(2)]
    r = check_hf_layers(k, v, Region(layers=(0, 2), tokens=(0, 8)))
    assert r.packed_shape(4) == (2, 2, 2, 3, 8, 4)
    with pytest.raises(LayoutError, match=r"keys\[0\]: expected \[2, 3, >=9, 4\]"):
        check_hf_layers(k, v, Region(layers=(0, 2), tokens=(0, 9)))
    v[1] = torch.zeros(2, 3, 8, 4, dtype=torch.float16)
    with pytest.raises(LayoutError, match="dtype"):
        check_hf_layers(k, v, Region(layers=(0, 2), tokens=(0, 8)))
    v[1] = torch.zeros(2, 3, 4, 8).transpose(2, 3)  # head_dim not contiguous
    with pytest.raises(LayoutError, match="stride"):
        check_hf_layers(k, v, Region(layers=(0, 2), tokens=(0, 4)))


def test_check_packed():
    check_packed(torch.zeros(2, 3), (2, 3), torch.float32)
    with pytest.raises(LayoutError, match="shape"):
        check_packed(torch.zeros(2, 3), (3, 2), torch.float32)
    with pytest.raises(LayoutError, match="contiguous"):
        check_packed(torch.zeros(3, 2).t(), (2, 3), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_header_roundtrip_and_corruption(dtype, seed):
    t = torch.randn(2, 2, 1, 3, 5, 7, generator=seed).to(dtype)
    h = ChunkHeader.for_tensor(t, region=Region(layers=(0, 2), tokens=(4, 9), batch=(0, 1), heads=(0, 3)),
                               meta={"session": "s"})
    raw = h.to_bytes()
    assert len(raw) == HEADER_BYTES
    back = ChunkHeader.from_bytes(raw)
    assert back == h
    assert back.checksum == payload_checksum(t)
    t2 = t.clone()
    t2.view(torch.uint8).reshape(-1)[0] ^= 1
    assert payload_checksum(t2) != h.checksum
    with pytest.raises(CorruptChunkError, match="magic"):
        ChunkHeader.from_bytes(b"X" * HEADER_BYTES)
    with pytest.raises(CorruptChunkError, match="truncated"):
        ChunkHeader.from_bytes(raw[:100])
    bad = bytearray(raw)
    i = bytes(raw).index(b'"nbytes":')
    bad[i + 9] = ord("9")  # nbytes no longer matches the shape
    with pytest.raises(CorruptChunkError):
        ChunkHeader.from_bytes(bytes(bad))


def test_layout_of_k_and_v_of_different_head_dims():
    from kvstream.models import tiny_config

    mla = KVLayout.from_config(tiny_config("deepseek_v3"), dtype=torch.bfloat16)
    assert (mla.kv_heads, mla.head_dim_k, mla.head_dim_v, mla.split) == (1, 16, 8, True)
    assert KVLayout.from_dict(mla.to_dict()) == mla and mla.to_dict()["head_dim_v"] == 8
    one = KVLayout(num_layers=2, kv_heads=2, head_dim=8)
    assert one.head_dim_v == 8 and not one.split and "head_dim_v" not in one.to_dict()
    assert mla.bytes_per_token(3) == 4 * 3 * 1 * (16 + 8) * 2
    with pytest.raises(LayoutError, match="head_dim_v"):
        KVLayout(num_layers=2, kv_heads=2, head_dim=8, head_dim_v=0)
