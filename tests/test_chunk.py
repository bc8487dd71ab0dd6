"""The chunk header is validated strictly before anything is allocated from it (issue 13, item 5).

Each test reproduces a header that the format-1 reader accepted or crashed on: deep JSON nesting raised
``RecursionError``, negative dimensions whose product is right passed, floats/strings/bools in ``shape``
were coerced, and fields outside the payload checksum (meta, region) could be edited unnoticed.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
import xxhash

from kvstream.chunk import (CHUNK_FORMAT, CHUNK_MAGIC, HEADER_BYTES, MAX_META_DEPTH, MAX_PAYLOAD_BYTES, ChunkHeader,
                            chunk_header, key_digest)
from kvstream.errors import CorruptChunkError, LayoutError
from kvstream.layout import Region


def _raw(doc: dict | str) -> bytes:
    """A header frame around ``doc`` with a *valid* header checksum, so the schema itself is what is tested."""
    body = (doc if isinstance(doc, str) else json.dumps(doc)).encode()
    out = struct.pack("<8sIQ", CHUNK_MAGIC, len(body), xxhash.xxh3_64_intdigest(body)) + body
    return out + b"\x00" * (HEADER_BYTES - len(out))


def _doc(**fields) -> dict:
    doc = {"format": CHUNK_FORMAT, "dtype": "float32", "shape": [2, 3], "axes": None, "nbytes": 24,
           "checksum": "none", "region": None, "meta": None, "key": None}
    doc.update(fields)
    return doc


def test_a_valid_document_parses():
    h = ChunkHeader.from_bytes(_raw(_doc()))
    assert h.shape == (2, 3) and h.nbytes == 24 and h.dtype == torch.float32


def test_deep_nesting_is_a_corrupt_chunk_not_a_recursion_error():
    deep = '{"format":2,"meta":' + "[" * 2000 + "]" * 2000 + "}"
    with pytest.raises(CorruptChunkError, match="malformed header JSON"):
        ChunkHeader.from_bytes(_raw(deep))


@pytest.mark.parametrize("shape, nbytes", [([-2, -3], 24), ([2.0, 3], 24), (["2", 3], 24), ([True, 6], 24),
                                           ([2, 3, 1, 1, 1, 1, 1, 1, 1], 24), ([1 << 41], 1 << 43)],
                         ids=["negative", "float", "string", "bool", "too-many-dims", "huge"])
def test_shape_entries_must_be_ints_in_range(shape, nbytes):
    with pytest.raises(CorruptChunkError, match="shape|nbytes"):
        ChunkHeader.from_bytes(_raw(_doc(shape=shape, nbytes=nbytes)))


@pytest.mark.parametrize("fields, match", [
    ({"nbytes": 24.0}, "nbytes"), ({"nbytes": "24"}, "nbytes"), ({"nbytes": 25}, "needs 24"),
    ({"nbytes": MAX_PAYLOAD_BYTES + 1, "shape": [MAX_PAYLOAD_BYTES + 1], "dtype": "uint8"}, "shape|nbytes"),
    ({"format": True}, "format"), ({"format": 1}, "format"), ({"dtype": "float4"}, "dtype"),
    ({"checksum": 5}, "checksum"), ({"checksum": "xxh3_64:zz"}, "checksum"), ({"key": "k"}, "key"),
    ({"meta": [1]}, "meta"), ({"region": {"layers": [0.5, 1], "tokens": [0, 3]}}, "region"),
    ({"region": {"layers": [2, 1], "tokens": [0, 3]}}, "region"), ({"region": {"tokens": [0, 3]}}, "region"),
    ({"extra": 1}, "unknown fields"), ({"axes": "layer"}, "axes")])
def test_every_field_is_type_and_range_checked(fields, match):
    with pytest.raises(CorruptChunkError, match=match):
        ChunkHeader.from_bytes(_raw(_doc(**fields)))


def test_not_an_object():
    with pytest.raises(CorruptChunkError, match="JSON object"):
        ChunkHeader.from_bytes(_raw("[1, 2]"))


def test_fields_outside_the_payload_checksum_cannot_be_edited_unnoticed():
    t = torch.arange(6, dtype=torch.float32).view(2, 3)
    raw = bytearray(ChunkHeader.for_tensor(t, region=Region(layers=(0, 1), tokens=(0, 3)),
                                           meta={"session": "a"}).to_bytes())
    for old, new in ((b'"session":"a"', b'"session":"b"'), (b'"tokens":[0,3]', b'"tokens":[1,4]')):
        edited = bytes(raw).replace(old, new)
        assert edited != bytes(raw)
        with pytest.raises(CorruptChunkError, match="header checksum"):
            ChunkHeader.from_bytes(edited)


def test_a_format_1_chunk_is_refused_with_a_clear_message():
    raw = bytearray(ChunkHeader.for_tensor(torch.zeros(2)).to_bytes())
    raw[:8] = b"KVSTRM\x00\x01"
    with pytest.raises(CorruptChunkError, match="format-1 chunk"):
        ChunkHeader.from_bytes(bytes(raw))


def test_the_key_digest_round_trips_and_separates_keys():
    h = chunk_header(torch.zeros(3), None, {"x": 1}, "none", key="req/seg000000/layer0000")
    back = ChunkHeader.from_bytes(h.to_bytes())
    assert back == h and back.key_digest == key_digest("req/seg000000/layer0000") != key_digest("req/x")


def test_a_writer_refuses_meta_no_reader_could_parse():
    deep: list = []
    for _ in range(MAX_META_DEPTH + 1):
        deep = [deep]
    with pytest.raises(LayoutError, match="nested deeper"):
        chunk_header(torch.zeros(1), None, {"d": deep}, "none")
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(LayoutError, match="JSON-able"):
        chunk_header(torch.zeros(1), None, loop, "none")


# ----------------------------------------------------------------------------------------------------
# K and V of different head dims (issue 14, item 4)
# ----------------------------------------------------------------------------------------------------

def test_a_chunk_of_one_head_dim_is_byte_identical_to_before_head_dims_existed():
    """Header and payload digests of this chunk as the parent commit of the change (1947f27) wrote them."""
    from kvstream import kernels
    from kvstream.chunk import payload_checksum, with_head_dims

    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(2, 2, 5, 8, generator=g) for _ in range(3)]
    values = [torch.randn(2, 2, 5, 8, generator=g) for _ in range(3)]
    region = Region(layers=(0, 3), tokens=(1, 4))
    chunk = kernels.pack_tokens(keys, values, region, backend="torch")
    meta = {"session": "s", "layer": 0}
    assert with_head_dims(meta, 8, 8) is meta
    h = chunk_header(chunk, region.resolve(2, 2), with_head_dims(meta, 8, 8), payload_checksum(chunk),
                     key="s/seg000000/layer0000")
    assert xxhash.xxh3_64_hexdigest(h.to_bytes()) == "f473c7550ab0a72f"
    assert xxhash.xxh3_64_hexdigest(chunk.numpy().tobytes()) == "a370ab09d87ad355"
    assert h.head_dims == (8, 8)


def test_split_head_dims_round_trip_and_are_checked():
    from kvstream.chunk import HEAD_DIMS, with_head_dims
    from kvstream.layout import PACKED_SPLIT_AXES

    chunk = torch.zeros(3, 2, 1, 4, 24)
    h = chunk_header(chunk, None, with_head_dims({"layer": 1}, 16, 8), "none")
    back = ChunkHeader.from_bytes(h.to_bytes())
    assert back.head_dims == (16, 8) and back.meta == {"layer": 1, HEAD_DIMS: [16, 8]}
    assert json.loads(h.to_bytes(pad=False)[20:])["axes"] == list(PACKED_SPLIT_AXES)
    for bad in ([16, 16], [8, 8, 8], [16, 9], [16.0, 8], [True, 23], [-8, 32]):
        with pytest.raises(LayoutError, match="head dims"):
            chunk_header(chunk, None, {HEAD_DIMS: bad}, "none")
        doc = _doc(shape=[3, 2, 1, 4, 24], nbytes=chunk.numel() * 4, meta={HEAD_DIMS: bad})
        with pytest.raises(CorruptChunkError, match="head dims"):
            ChunkHeader.from_bytes(_raw(doc))
    with pytest.raises(LayoutError, match="head dims"):  # a 6-D chunk has no split
        chunk_header(torch.zeros(3, 2, 1, 1, 4, 12), None, {HEAD_DIMS: [16, 8]}, "none")
