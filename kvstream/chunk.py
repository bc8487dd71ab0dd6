"""The only home of kvstream's chunk format: the header, its checksums, byte views, and the wire frame.

A packed chunk (:mod:`kvstream.layout` says what its axes are) travels and rests as a
:class:`ChunkHeader` followed by its payload bytes. The header is a fixed 4096-byte frame holding a magic
number, the JSON length, an xxh3 of the JSON (so that no header field can be edited unnoticed) and a
small JSON document (dtype, shape, region, payload bytes, payload checksum, the digest of the key it was
written under, meta). It is never pickled. 4096 bytes keep the payload aligned for direct I/O.

Reading a header validates it strictly before anything is allocated from it (:meth:`ChunkHeader.from_bytes`):
types (an int is an int, not a float, string or bool), ranges (at most :data:`MAX_DIMS` dimensions, none
negative, at most :data:`MAX_PAYLOAD_BYTES` of payload, ``nbytes == prod(shape) * itemsize``), known
fields only, and a JSON document bounded by the frame (deep nesting is a :class:`CorruptChunkError`,
never a ``RecursionError``). Every header problem is a :class:`CorruptChunkError`.

Point-to-point transports announce each chunk with a *frame*: ``(sequence number, key, header)``
(:func:`encode_frame` / :func:`decode_frames`), sent in batches; the receiver decodes the header and then
receives the payload.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from .errors import CorruptChunkError, LayoutError
from .layout import DTYPES, PACKED_AXES, Region, dtype_name

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
            "axes": list(PACKED_AXES) if len(self.shape) == 6 else None,
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
        try:
            region = _parse_region(doc.get("region"))
        except LayoutError as e:
            raise CorruptChunkError(f"region: {e}") from None
        return cls(dtype=dtype, shape=shape, nbytes=nbytes, checksum=checksum, region=region, meta=meta,
                   key_digest=key)


#: Deepest nesting of lists and objects a header's ``meta`` may have.
MAX_META_DEPTH = 32


def _depth(v: Any, limit: int) -> int:
    """Nesting depth of a JSON value, counted no further than ``limit + 1``."""
    if limit < 0 or not isinstance(v, (dict, list)):
        return 0
    items = v.values() if isinstance(v, dict) else v
    return 1 + max((_depth(x, limit - 1) for x in items), default=0)


def chunk_header(chunk: torch.Tensor, region: Region | None, meta: dict | None, checksum: str, *,
                 key: str | None = None) -> ChunkHeader:
    """The :class:`ChunkHeader` of ``chunk`` with ``checksum``, checked to encode (JSON-able ``meta``, fits).

    ``key``: the key the chunk is stored under, recorded as its :func:`key_digest` (for transports that
    check it on read).

    Raises
    ------
    LayoutError
        Unsupported dtype, ``region`` not a :class:`Region`, ``meta`` not a JSON-able dict (or nested deeper
        than :data:`MAX_META_DEPTH`), or a header over :data:`HEADER_BYTES`.
    """
    dtype_name(chunk.dtype)
    if region is not None and not isinstance(region, Region):
        raise LayoutError(f"region must be a kvstream.layout.Region, got {type(region).__name__}")
    if meta is not None:
        if not isinstance(meta, dict):
            raise LayoutError(f"meta must be a dict, got {type(meta).__name__}")
        try:
            meta = json.loads(json.dumps(meta))  # a private, JSON-clean copy
        except (TypeError, ValueError, RecursionError) as e:
            raise LayoutError(f"meta must be JSON-able: {type(e).__name__}: {e}") from None
        if _depth(meta, MAX_META_DEPTH) > MAX_META_DEPTH:
            raise LayoutError(f"meta is nested deeper than {MAX_META_DEPTH} levels")
    header = ChunkHeader(dtype=chunk.dtype, shape=tuple(int(s) for s in chunk.shape),
                         nbytes=chunk.numel() * chunk.element_size(), checksum=checksum, region=region, meta=meta,
                         key_digest=None if key is None else key_digest(key))
    header.to_bytes()  # raises LayoutError if it would not fit a persisted chunk
    return header


# ----------------------------------------------------------------------------------------------------
# Slice checksums: the payload's equal parts along its first axis (a packed chunk's layers), hashed one by one
# ----------------------------------------------------------------------------------------------------

#: Meta key of the slice checksums: one string of 16 hex digits (xxh3-64) per slice, concatenated.
SLICE_CHECKSUMS = "slice_xxh3"
_SLICE_HEX = 16


def slice_bounds(header: ChunkHeader) -> tuple[int, int]:
    """``(slices, bytes per slice)`` of a payload cut along its first axis (a packed chunk: one slice per layer).

    Raises
    ------
    LayoutError
        If the payload has no first axis.
    """
    if not header.shape:
        raise LayoutError("a 0-d payload has no slices")
    n = int(header.shape[0])
    return n, (header.nbytes // n if n else 0)


def slice_digests(data: Any, slices: int) -> str:
    """The :data:`SLICE_CHECKSUMS` value of ``data`` (buffer protocol) cut into ``slices`` equal parts."""
    view = memoryview(data).cast("B")
    size = len(view) // slices if slices else 0
    return "".join(xxhash.xxh3_64_hexdigest(view[i * size:(i + 1) * size]) for i in range(slices))


def slice_checksums(header: ChunkHeader, *, source: str = "chunk") -> list[str] | None:
    """The per-slice checksums a header carries (``"xxh3_64:<hex>"`` each), or ``None`` if it has none.

    Chunks written before slice checksums existed carry none: only their whole payload can be verified.

    Raises
    ------
    CorruptChunkError
        If the header's slice checksums are malformed or do not count one per slice.
    """
    raw = (header.meta or {}).get(SLICE_CHECKSUMS)
    if raw is None:
        return None
    n, _ = slice_bounds(header)
    if not isinstance(raw, str) or len(raw) != n * _SLICE_HEX or any(c not in "0123456789abcdef" for c in raw):
        raise CorruptChunkError(f"{source}: malformed {SLICE_CHECKSUMS} in its header (expected {n} xxh3-64 digests)")
    return [CHECKSUM_PREFIX + raw[i * _SLICE_HEX:(i + 1) * _SLICE_HEX] for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# The wire frame: (sequence number, key, header), in batches
# ----------------------------------------------------------------------------------------------------

#: A frame's fixed prefix: sequence number, key length and header length in bytes (little-endian).
_FRAME = struct.Struct("<QII")


def encode_frame(key: str, seq: int, header: bytes) -> bytes:
    """One chunk's announcement: the prefix (seq, key bytes, header bytes), the key (UTF-8), then ``header``
    (:meth:`ChunkHeader.to_bytes` with ``pad=False``). Frames concatenate into a batch."""
    kb = key.encode("utf-8", "surrogatepass")
    return _FRAME.pack(seq, len(kb), len(header)) + kb + header


def decode_frames(raw: bytes, source: str) -> list[tuple[str, int, bytes]]:
    """Split a batch of frames into ``(key, seq, header bytes)`` (inverse of :func:`encode_frame`).

    Raises
    ------
    CorruptChunkError
        If a frame is truncated, or a header is longer than :data:`HEADER_BYTES`.
    """
    out, at, end = [], 0, len(raw)
    while at < end:
        if end - at < _FRAME.size:
            raise CorruptChunkError(f"{source}: truncated frame prefix at byte {at} of {end}")
        seq, nk, nh = _FRAME.unpack_from(raw, at)
        at += _FRAME.size
        if nh > HEADER_BYTES or at + nk + nh > end:
            raise CorruptChunkError(f"{source}: frame at byte {at - _FRAME.size} claims a {nk}-byte key and a "
                                    f"{nh}-byte header; {end - at} bytes are left (headers are <= {HEADER_BYTES})")
        try:
            key = raw[at:at + nk].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as e:
            raise CorruptChunkError(f"{source}: frame key is not UTF-8: {e}") from None
        out.append((key, seq, raw[at + nk:at + nk + nh]))
        at += nk + nh
    return out


__all__ = ["CHUNK_MAGIC", "CHUNK_FORMAT", "HEADER_BYTES", "CHECKSUM_PREFIX", "NO_CHECKSUM", "MAX_DIMS",
           "MAX_PAYLOAD_BYTES", "MAX_META_DEPTH", "tensor_bytes", "byte_view", "payload_checksum", "key_digest",
           "ChunkHeader", "chunk_header", "encode_frame", "decode_frames", "SLICE_CHECKSUMS", "slice_bounds",
           "slice_digests", "slice_checksums"]
