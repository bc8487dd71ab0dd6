"""The chunk header: a fixed 4096-byte frame in front of every persisted chunk, its checksums and byte views.

See :mod:`kvstream.chunk` for the format; :mod:`.build` makes the checked header of a chunk being written.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from ..errors import CorruptChunkError, LayoutError
from ..layout import DTYPES, PACKED_AXES, PACKED_SPLIT_AXES, Region, dtype_name

#: Magic bytes at the start of every persisted chunk (the last byte is the frame layout's version).
CHUNK_MAGIC = b"KVSTRM\x00\x02"
#: The magic of format-1 chunks (no header checksum, no key digest): refused with a clear message.
_OLD_MAGIC = b"KVSTRM\x00\x01"
#: Current chunk format version.
CHUNK_FORMAT = 2
#: Size of the header frame in bytes. 4096 keeps the payload aligned for O_DIRECT reads.
HEADER_BYTES = 4096
#: Prefix of every payload checksum kvstream writes (xxh3, 64 bits).
CHECKSUM_PREFIX = "xxh3_64:"
#: Checksum field of chunks that are not hashed (host memory: see :class:`kvstream.transports.host.HostTransport`).
NO_CHECKSUM = "none"
#: Most dimensions a chunk may have (a packed chunk has 6, a paged one 6, an index 1).
MAX_DIMS = 8
#: Most payload bytes one header may declare: 1 TiB, far past any chunk (a 256-token chunk of a
#: 405B-parameter model is about 130 MiB), and small enough that a forged size is refused before it is allocated.
MAX_PAYLOAD_BYTES = 1 << 40
_PREFIX = struct.Struct("<8sIQ")  # magic, JSON length, xxh3_64 of the JSON bytes
_DIGEST = re.compile(r"xxh3_64:[0-9a-f]{16}")
_FIELDS = {"format", "dtype", "shape", "axes", "nbytes", "checksum", "region", "meta", "key"}
_REGION_FIELDS = {"layers", "tokens", "batch", "heads"}
#: Meta key of a chunk whose keys and values have different head dims: ``[head_dim_k, head_dim_v]``; the
#: payload is ``[..., head_dim_k + head_dim_v]`` (:data:`kvstream.layout.PACKED_SPLIT_AXES`).
HEAD_DIMS = "head_dims"


def with_head_dims(meta: dict | None, head_dim_k: int, head_dim_v: int) -> dict | None:
    """``meta`` as a chunk of keys of ``head_dim_k`` and values of ``head_dim_v`` elements per head records it:
    unchanged when the two are equal, else with :data:`HEAD_DIMS` added (a new dict)."""
    if head_dim_k == head_dim_v:
        return meta
    return {**(meta or {}), HEAD_DIMS: [int(head_dim_k), int(head_dim_v)]}


def _check_head_dims(meta: dict | None, shape: tuple, error: type) -> tuple[int, int] | None:
    """The ``(head_dim_k, head_dim_v)`` of :data:`HEAD_DIMS` in ``meta`` checked against ``shape`` (``None``
    without the key); raises ``error`` unless they are two different positive ints splitting a 5-D shape's
    last axis."""
    dims = (meta or {}).get(HEAD_DIMS)
    if dims is None:
        return None
    ok = isinstance(dims, list) and len(dims) == 2 and all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                           for d in dims)
    if not ok or dims[0] == dims[1] or len(shape) != 5 or shape[4] != dims[0] + dims[1]:
        raise error(f"meta[{HEAD_DIMS!r}] must be two different positive head dims splitting the last axis of a "
                    f"5-D chunk, got {dims!r} for shape {list(shape)}")
    return dims[0], dims[1]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, bf16 included).

    Raises
    ------
    LayoutError
        If ``t`` is not on the CPU or not contiguous.
    """
    if t.device.type != "cpu":
        raise LayoutError(f"tensor_bytes needs a CPU tensor, got one on {t.device}")
    if not t.is_contiguous():
        raise LayoutError("tensor_bytes needs a contiguous tensor")
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The bytes of the contiguous tensor ``t`` as a flat ``uint8`` tensor on the same device (no copy).

    Works for 0-d and empty tensors and every dtype of :data:`kvstream.layout.DTYPES` (bf16 included).
    """
    return t.reshape(-1).view(torch.uint8)


def payload_checksum(data: Any) -> str:
    """Checksum of a chunk's payload bytes: ``"xxh3_64:<16 hex digits>"``.

    ``data`` is anything with the buffer protocol (bytes, memoryview, a contiguous numpy array) or a
    contiguous CPU tensor. xxh3 runs at tens of GB/s, well above disk and PCIe rates.
    """
    if isinstance(data, torch.Tensor):
        data = tensor_bytes(data)
    return CHECKSUM_PREFIX + xxhash.xxh3_64_hexdigest(data)


def key_digest(key: str) -> str:
    """The digest of a chunk key that its header records: ``"xxh3_64:<16 hex digits>"`` of its UTF-8 bytes.

    A reader compares it with the key it asked for, so a chunk copied or renamed to another key is
    refused (:class:`CorruptChunkError`) instead of served as that key's KV.

    Examples
    --------
    >>> key_digest("req-42/layer0000") == key_digest("req-42/layer0000") != key_digest("req-42/layer0001")
    True
    """
    return CHECKSUM_PREFIX + xxhash.xxh3_64_hexdigest(key.encode("utf-8", "surrogatepass"))


def _int_field(v: Any, what: str, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
        raise CorruptChunkError(f"{what} must be an int in [0, {hi}], got {v!r}")
    return v


def _range_field(v: Any, what: str, optional: bool) -> list | None:
    if v is None and optional:
        return None
    if not isinstance(v, list) or len(v) != 2:
        raise CorruptChunkError(f"{what} must be a [start, stop] pair, got {v!r}")
    a, b = (_int_field(x, what, MAX_PAYLOAD_BYTES) for x in v)
    if b < a:
        raise CorruptChunkError(f"{what} must have start <= stop, got {v!r}")
    return [a, b]


def _parse_region(doc: Any) -> Region | None:
    if doc is None:
        return None
    if not isinstance(doc, dict) or not set(doc) <= _REGION_FIELDS:
        raise CorruptChunkError(f"region must be an object with fields {sorted(_REGION_FIELDS)}, got {doc!r}")
    parts = {name: _range_field(doc.get(name), f"region.{name}", name in ("batch", "heads")) for name in _REGION_FIELDS}
    return Region(**parts)


@dataclass(frozen=True)
class ChunkHeader:
    """The self-describing header in front of every persisted chunk.

    Parameters
    ----------
    dtype : torch.dtype
        Element type of the payload.
    shape : tuple of int
        Shape of the payload tensor (a packed chunk: :data:`kvstream.layout.PACKED_AXES` order).
    nbytes : int
        Payload size in bytes; must equal ``prod(shape) * itemsize``.
    checksum : str
        :func:`payload_checksum` of the payload, or :data:`NO_CHECKSUM`.
    region : Region, optional
        Which part of a cache the payload holds.
    meta : dict, optional
        Small JSON-able extras (session, step, ...).
    key_digest : str, optional
        :func:`key_digest` of the key the chunk was written under (transports that persist chunks by
        key record it, and check it on every read).

    Notes
    -----
    On disk: ``CHUNK_MAGIC`` (8 bytes), the JSON length (uint32 little-endian), the xxh3-64 of the JSON
    bytes (uint64 little-endian), the JSON document, zero padding to :data:`HEADER_BYTES`, then the
    payload. No pickle anywhere.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    checksum: str
    region: Region | None = None
    meta: dict | None = None
    key_digest: str | None = None

    @property
    def head_dims(self) -> tuple[int, int] | None:
        """``(head_dim_k, head_dim_v)`` of a packed KV chunk: its :data:`HEAD_DIMS` (a split chunk), else the
        last axis of a 6-D one twice; ``None`` for other payloads."""
        dims = (self.meta or {}).get(HEAD_DIMS)
        if dims is not None:
            return int(dims[0]), int(dims[1])
        return (self.shape[5], self.shape[5]) if len(self.shape) == 6 else None

    @classmethod
    def for_tensor(cls, t: torch.Tensor, region: Region | None = None, meta: dict | None = None,
                   checksum: str | None = None) -> "ChunkHeader":
        """Header describing the contiguous CPU tensor ``t`` (checksum computed unless given)."""
        nbytes = t.numel() * t.element_size()
        return cls(dtype=t.dtype, shape=tuple(t.shape), nbytes=nbytes,
                   checksum=checksum if checksum is not None else payload_checksum(t), region=region, meta=meta)

    def to_bytes(self, *, pad: bool = True) -> bytes:
        """Encode to :data:`HEADER_BYTES` bytes (``pad=False``: without the trailing zero padding).

        Raises
        ------
        LayoutError
            If the JSON does not fit in :data:`HEADER_BYTES`.
        """
        doc = {
            "format": CHUNK_FORMAT,
            "dtype": dtype_name(self.dtype),
            "shape": [int(s) for s in self.shape],
            "axes": list(PACKED_AXES) if len(self.shape) == 6 else
                    list(PACKED_SPLIT_AXES) if HEAD_DIMS in (self.meta or {}) else None,
            "nbytes": int(self.nbytes),
            "checksum": self.checksum,
            "region": None if self.region is None else self.region.to_dict(),
            "meta": self.meta,
            "key": self.key_digest,
        }
        body = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        if _PREFIX.size + len(body) > HEADER_BYTES:
            raise LayoutError(f"Chunk header JSON is {len(body)} bytes; at most {HEADER_BYTES - _PREFIX.size} fit")
        out = _PREFIX.pack(CHUNK_MAGIC, len(body), xxhash.xxh3_64_intdigest(body)) + body
        return out + b"\x00" * (HEADER_BYTES - len(out)) if pad else out

    @classmethod
    def from_bytes(cls, raw: bytes | memoryview, *, source: str = "chunk", padded: bool = True) -> "ChunkHeader":
        """Decode and validate a header frame (``padded=False``: one encoded with ``to_bytes(pad=False)``).

        Nothing is allocated from the header's numbers here; a caller that allocates ``nbytes`` checks it
        against what it expects (a file's size, an ``out`` tensor's shape) first.

        Raises
        ------
        CorruptChunkError
            If ``raw`` is short, the magic or version is wrong, the header checksum does not match, the
            JSON is malformed (nested too deep included), has unknown or mistyped fields, values out of
            range, or ``nbytes`` other than ``prod(shape) * itemsize``.
        """
        raw = bytes(raw[:HEADER_BYTES])
        if len(raw) < (HEADER_BYTES if padded else _PREFIX.size):
            raise CorruptChunkError(f"{source}: truncated header ({len(raw)} of {HEADER_BYTES} bytes)")
        magic, n, digest = _PREFIX.unpack_from(raw)
        if magic == _OLD_MAGIC:
            raise CorruptChunkError(f"{source}: a format-1 chunk (an older kvstream); this kvstream reads format "
                                    f"{CHUNK_FORMAT}")
        if magic != CHUNK_MAGIC:
            raise CorruptChunkError(f"{source}: bad magic {magic!r}; not a kvstream chunk")
        if n > min(HEADER_BYTES, len(raw)) - _PREFIX.size:
            raise CorruptChunkError(f"{source}: header length {n} out of range")
        body = raw[_PREFIX.size:_PREFIX.size + n]
        if xxhash.xxh3_64_intdigest(body) != digest:
            raise CorruptChunkError(f"{source}: header checksum mismatch (a header field was changed or damaged)")
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise CorruptChunkError(f"{source}: malformed header JSON: {type(e).__name__}: {e}") from None
        try:
            return cls._from_doc(doc)
        except CorruptChunkError as e:
            raise CorruptChunkError(f"{source}: malformed header: {e}") from None

    @classmethod
    def _from_doc(cls, doc: Any) -> "ChunkHeader":
        """The header a decoded JSON document describes, every field checked (raises CorruptChunkError)."""
        if not isinstance(doc, dict):
            raise CorruptChunkError(f"the header must be a JSON object, got {type(doc).__name__}")
        unknown = set(doc) - _FIELDS
        if unknown:
            raise CorruptChunkError(f"unknown fields {sorted(unknown)}")
        if doc.get("format") != CHUNK_FORMAT or isinstance(doc.get("format"), bool):
            raise CorruptChunkError(f"chunk format {doc.get('format')!r} (this kvstream reads {CHUNK_FORMAT})")
        dtype = DTYPES.get(doc.get("dtype")) if isinstance(doc.get("dtype"), str) else None
        if dtype is None:
            raise CorruptChunkError(f"unknown dtype {doc.get('dtype')!r}; known: {sorted(DTYPES)}")
        shape = doc.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS:
            raise CorruptChunkError(f"shape must be a list of at most {MAX_DIMS} ints, got {shape!r}")
        shape = tuple(_int_field(s, "a shape entry", MAX_PAYLOAD_BYTES) for s in shape)
        nbytes = _int_field(doc.get("nbytes"), "nbytes", MAX_PAYLOAD_BYTES)
        numel = 1
        for s in shape:
            numel *= s
        if numel * dtype.itemsize != nbytes:
            raise CorruptChunkError(f"nbytes is {nbytes} but shape {list(shape)} of {dtype} needs {numel * dtype.itemsize}")
        axes = doc.get("axes")
        if axes is not None and (not isinstance(axes, list) or len(axes) != len(shape)
                                 or not all(isinstance(a, str) for a in axes)):
            raise CorruptChunkError(f"axes must be null or one name per dimension, got {axes!r}")
        checksum = doc.get("checksum")
        if checksum != NO_CHECKSUM and not (isinstance(checksum, str) and _DIGEST.fullmatch(checksum)):
            raise CorruptChunkError(f"unknown checksum {checksum!r}; expected {CHECKSUM_PREFIX}<16 hex digits> "
                                    f"or {NO_CHECKSUM!r}")
        key = doc.get("key")
        if key is not None and not (isinstance(key, str) and _DIGEST.fullmatch(key)):
            raise CorruptChunkError(f"key must be null or {CHECKSUM_PREFIX}<16 hex digits>, got {key!r}")
        meta = doc.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise CorruptChunkError(f"meta must be null or an object, got {type(meta).__name__}")
        _check_head_dims(meta, shape, CorruptChunkError)
        try:
            region = _parse_region(doc.get("region"))
        except LayoutError as e:
            raise CorruptChunkError(f"region: {e}") from None
        return cls(dtype=dtype, shape=shape, nbytes=nbytes, checksum=checksum, region=region, meta=meta,
                   key_digest=key)


__all__ = ["CHUNK_MAGIC", "CHUNK_FORMAT", "HEADER_BYTES", "CHECKSUM_PREFIX", "NO_CHECKSUM", "MAX_DIMS",
           "MAX_PAYLOAD_BYTES", "HEAD_DIMS", "with_head_dims", "tensor_bytes", "byte_view", "payload_checksum",
           "key_digest", "ChunkHeader"]
