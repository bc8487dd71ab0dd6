"""The only home of kvstream's chunk format: the header, its checksums, byte views, and the wire frame.

A packed chunk (:mod:`kvstream.layout` says what its axes are) travels and rests as a
:class:`ChunkHeader` followed by its payload bytes. The header is a fixed 4096-byte frame holding a magic
number, the JSON length, an xxh3 of the JSON (so that no header field can be edited unnoticed) and a
small JSON document (dtype, shape, region, payload bytes, payload checksum, the digest of the key it was
written under, meta). It is never pickled. 4096 bytes keep the payload aligned for direct I/O. A chunk of
keys and values with different head dims (:data:`kvstream.layout.PACKED_SPLIT_AXES`) records the two in its
meta (:data:`HEAD_DIMS`, :func:`with_head_dims`); every other chunk's header is as it was.

Reading a header validates it strictly before anything is allocated from it (:meth:`ChunkHeader.from_bytes`):
types (an int is an int, not a float, string or bool), ranges (at most :data:`MAX_DIMS` dimensions, none
negative, at most :data:`MAX_PAYLOAD_BYTES` of payload, ``nbytes == prod(shape) * itemsize``), known
fields only, and a JSON document bounded by the frame (deep nesting is a :class:`CorruptChunkError`,
never a ``RecursionError``). Every header problem is a :class:`CorruptChunkError`.

Point-to-point transports announce each chunk with a *frame*: ``(sequence number, key, header)``
(:func:`encode_frame` / :func:`decode_frames`), sent in batches; the receiver decodes the header and then
receives the payload.

One module per job: :mod:`.header` (the header, checksums, byte views), :mod:`.build` (the checked header of
a chunk being written, and the meta key writers cache it by), :mod:`.slices` (per-layer slice checksums),
:mod:`.frames` (the wire frame); every name is importable from ``kvstream.chunk``.
"""

from .build import MAX_META_DEPTH, chunk_header, meta_key
from .frames import decode_frames, encode_frame
from .header import (CHECKSUM_PREFIX, CHUNK_FORMAT, CHUNK_MAGIC, HEAD_DIMS, HEADER_BYTES, MAX_DIMS, MAX_PAYLOAD_BYTES,
                     NO_CHECKSUM, ChunkHeader, byte_view, key_digest, payload_checksum, tensor_bytes, with_head_dims)
from .slices import SLICE_CHECKSUMS, slice_bounds, slice_checksums, slice_digests

__all__ = ["CHUNK_MAGIC", "CHUNK_FORMAT", "HEADER_BYTES", "CHECKSUM_PREFIX", "NO_CHECKSUM", "MAX_DIMS",
           "MAX_PAYLOAD_BYTES", "MAX_META_DEPTH", "HEAD_DIMS", "with_head_dims", "tensor_bytes", "byte_view",
           "payload_checksum", "key_digest", "ChunkHeader", "chunk_header", "meta_key", "encode_frame", "decode_frames",
           "SLICE_CHECKSUMS", "slice_bounds", "slice_digests", "slice_checksums"]
