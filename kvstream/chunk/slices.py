"""Slice checksums: a payload's equal parts along its first axis (a packed chunk's layers), hashed one by one,
so that a reader of some layers verifies those alone (:class:`~kvstream.transports.disk.DiskTransport`'s
``fetch_slices``)."""

from __future__ import annotations

from typing import Any

import xxhash

from ..errors import CorruptChunkError, LayoutError
from .header import CHECKSUM_PREFIX, ChunkHeader

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


__all__ = ["SLICE_CHECKSUMS", "slice_bounds", "slice_digests", "slice_checksums"]
