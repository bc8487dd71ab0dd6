"""The wire frame of point-to-point transports: ``(sequence number, key, header)`` per chunk, in batches."""

from __future__ import annotations

import struct

from ..errors import CorruptChunkError
from .header import HEADER_BYTES

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


__all__ = ["encode_frame", "decode_frames"]
