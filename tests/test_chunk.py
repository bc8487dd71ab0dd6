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
