"""The header build's caches: a meta key that never joins metas of different JSON, a cached meta copy that is
never shared or stale, and a fit bound that never lets a header past its frame."""

from __future__ import annotations

import json

import pytest
import torch

from kvstream.chunk import HEADER_BYTES, ChunkHeader, chunk_header, key_digest, meta_key, payload_checksum
from kvstream.chunk import build
from kvstream.errors import LayoutError
from kvstream.layout import Region


def test_meta_key_separates_what_json_separates():
    assert meta_key(None) == () != meta_key({})
    assert meta_key({"a": 1, "b": "x"}) == meta_key({"b": "x", "a": 1})
    ones = [meta_key({"a": v}) for v in (1, 1.0, True)]
    assert len(set(ones)) == 3  # equal and equally hashed in Python, not in JSON
    assert meta_key({"a": 0.0}) != meta_key({"a": -0.0})
    assert meta_key({"a": None}) != meta_key({"a": "None"})
    assert meta_key({"head_dims": [512, 64]}) == meta_key({"head_dims": [512, 64]})
    assert meta_key({"head_dims": [512, 64]}) != meta_key({"head_dims": [64, 512]})
    for unkeyed in ({"a": {"b": 1}}, {"a": [True]}, {"a": [1.5]}, {1: "x"}, {"a": (1, 2)}, ["a"]):
        assert meta_key(unkeyed) is None


def _uncached(chunk, region, meta, checksum, key=None) -> ChunkHeader:
    """The header chunk_header made before its caches: every field built from scratch."""
    return ChunkHeader(dtype=chunk.dtype, shape=tuple(chunk.shape), nbytes=chunk.numel() * chunk.element_size(),
                       checksum=checksum, region=region, meta=None if meta is None else json.loads(json.dumps(meta)),
                       key_digest=None if key is None else key_digest(key))


def test_a_cached_meta_gives_the_same_bytes_and_a_private_copy():
    chunk = torch.arange(1 * 2 * 1 * 2 * 3 * 4, dtype=torch.float32).view(1, 2, 1, 2, 3, 4)
    region = Region(layers=(5, 6), tokens=(0, 3)).resolve(1, 2)
    meta = {"session": "s", "run": "r", "layer": 5}
    first = chunk_header(chunk, region, meta, "none")
    first.meta["layer"] = 99  # a caller that edits a header's meta ...
    meta["layer"] = 6  # ... or its own dict after the call
    meta["layer"] = 5
    for _ in range(3):  # the cached path, again and again
        h = chunk_header(chunk, region, meta, payload_checksum(chunk), key="s/l5")
        assert h.meta == {"session": "s", "run": "r", "layer": 5} and h.meta is not meta
        assert h.to_bytes() == _uncached(chunk, region, meta, payload_checksum(chunk), key="s/l5").to_bytes()
        assert ChunkHeader.from_bytes(h.to_bytes()) == h
    split = {"head_dims": [16, 8]}
    a = chunk_header(torch.zeros(1, 1, 1, 1, 24), None, split, "none")
    a.meta["head_dims"].append(1)
    assert chunk_header(torch.zeros(1, 1, 1, 1, 24), None, split, "none").meta == {"head_dims": [16, 8]}


def test_a_changed_meta_or_shape_is_not_served_a_stale_header():
    chunk = torch.zeros(1, 2, 1, 1, 2, 4)
    for v in (1, True, 1.0, -0.0, 0.0):
        h = chunk_header(chunk, None, {"x": v}, "none")
        assert json.dumps(h.meta) == json.dumps({"x": v}) and type(h.meta["x"]) is type(v)
    with pytest.raises(LayoutError, match="head_dims"):  # checked against every shape, cached meta or not
        chunk_header(torch.zeros(1, 1, 1, 1, 23), None, {"head_dims": [16, 8]}, "none")
    assert chunk_header(torch.zeros(2, 1, 1, 1, 24), None, {"head_dims": [16, 8]}, "none").shape == (2, 1, 1, 1, 24)


@pytest.mark.parametrize("fill", ["x", "\u00e9", "\n"])  # plain, and characters JSON escapes (6 or 2 bytes each)
def test_the_fit_bound_never_lets_a_header_past_its_frame(fill):
    chunk = torch.zeros(3, 2, 1, 8, 5, 16, dtype=torch.bfloat16)
    region = Region(layers=(0, 3), tokens=(10 ** 6, 10 ** 6 + 5)).resolve(1, 8)
    base = len(_uncached(chunk, region, {"m": ""}, "none", key="k").to_bytes(pad=False))
    room = (HEADER_BYTES - base) // len(json.dumps(fill)[1:-1])
    for n in range(max(0, room - 40), room + 40):
        meta = {"m": fill * n}
        try:
            fits = bool(_uncached(chunk, region, meta, "none", key="k").to_bytes())
        except LayoutError:
            fits = False
        if fits:
            assert chunk_header(chunk, region, meta, "none", key="k").meta == meta
        else:
            with pytest.raises(LayoutError, match="at most"):
                chunk_header(chunk, region, meta, "none", key="k")
    small = chunk_header(chunk, region, {"m": fill}, "none", key="k")
    assert build._json_bound(small, len(json.dumps({"m": fill}, separators=(",", ":"))), "bfloat16") >= \
        len(small.to_bytes(pad=False)) - 20  # the bound covers the JSON it stands for
    huge = Region(layers=(0, 3), tokens=(10 ** 30, 10 ** 30 + 5))  # past the bound's digits: encoded to check
    assert build._json_bound(chunk_header(chunk, huge, None, "none"), 4, "bfloat16") is None
