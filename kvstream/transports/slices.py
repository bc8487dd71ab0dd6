"""Slices of a chunk file under :class:`~kvstream.transports.disk.DiskTransport`: per-slice checksums written
beside the payload's, and parallel reads that verify each slice on its own.

A slice is one of a payload's equal parts along its first axis: for a packed chunk
``[layers, 2, batch, kv_heads, tokens, head_dim]`` one layer's keys and values, contiguous in the file.
A whole-payload checksum proves a file only once all of it was read; per-slice checksums
(:data:`~kvstream.chunk.SLICE_CHECKSUMS` in the header's meta) prove each layer as soon as its bytes are
in, so a reader can copy a layer onward (to the GPU) while other layers are still being read, and never
moves an unverified byte.

Reads go through a pool of ``queue_depth`` threads, each ``preadv`` of one slice (``O_DIRECT`` when the
transport and the alignment allow it), so that many reads are in flight at once: one synchronous stream
of reads leaves an NVMe SSD idle between requests, several saturate it (the ``file_store_read_vs_raw``
ceiling of bench/NOTES.md reads the same files at the same queue depth).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import xxhash

from ..chunk import CHECKSUM_PREFIX, SLICE_CHECKSUMS, ChunkHeader, slice_bounds, slice_digests
from ..errors import CorruptChunkError, TransportError
from .diskio import ALIGN, read_block, read_errors, set_direct

#: Default slice reads in flight per transport: NVMe SSDs reach their sequential read rate with 8-32
#: outstanding reads of 1 MiB (a layer of a 256-token Llama-3-8B chunk); 16 is the middle of that range,
#: checked against raw reads at the same depth by the prefix topic (bench/NOTES.md).
DEFAULT_QUEUE_DEPTH = 16


class SliceHasher:
    """The slice checksums of a payload being written block by block (the header's :data:`SLICE_CHECKSUMS`).

    Parameters
    ----------
    proto : ChunkHeader
        The chunk's header; slices are hashed only if its meta holds the :data:`SLICE_CHECKSUMS` placeholder.
    data : memoryview
        The payload's bytes (filled block by block before :meth:`feed` is told about them).
    submit : callable or None
        ``submit(fn, *args) -> Future`` of a hashing thread; ``None``: hash on the calling thread.
    """

    def __init__(self, proto: ChunkHeader, data: memoryview, submit: Callable[..., Future] | None):
        self.active = SLICE_CHECKSUMS in (proto.meta or {})
        self._slices, self._size = slice_bounds(proto) if self.active else (0, 0)
        self._data, self._submit = data, submit
        self._done = 0
        self._parts: list = []

    def feed(self, end: int) -> None:
        """Bytes ``[0, end)`` of the payload are in place: hash every slice they complete."""
        if not self.active:
            return
        upto = self._slices if end >= self._slices * self._size else end // max(self._size, 1)
        if upto > self._done:
            part = self._data[self._done * self._size:upto * self._size]
            n = upto - self._done
            self._parts.append(self._submit(slice_digests, part, n) if self._submit else slice_digests(part, n))
            self._done = upto

    def wait(self) -> None:
        """Let every hash in flight finish (before the payload's memory may go)."""
        for p in self._parts:
            if isinstance(p, Future):
                p.exception()

    def meta(self, meta: dict | None) -> dict | None:
        """``meta`` with the slice checksums filled in (unchanged when slices are not hashed)."""
        if not self.active:
            return meta
        self.feed(self._slices * self._size)
        digests = "".join(p.result() if isinstance(p, Future) else p for p in self._parts)
        return {**(meta or {}), SLICE_CHECKSUMS: digests}


def slice_placeholder(header_meta: dict | None, slices: int) -> dict:
    """Meta with a placeholder of the slice checksums' final length, so that the header's size is checked up front."""
    return {**(header_meta or {}), SLICE_CHECKSUMS: "0" * 16 * slices}


class _CloseAfter:
    """Closes ``fd`` once ``count`` reads of it have finished (each calls :meth:`done` once)."""

    def __init__(self, fd: int, count: int):
        self._fd, self._left = fd, count
        self._lock = threading.Lock()

    def done(self) -> None:
        """One read finished (thread-safe); the last of ``count`` calls closes ``fd``."""
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            os.close(self._fd)


def read_slices(pool: ThreadPoolExecutor, fd: int, header: ChunkHeader, data: memoryview, checksums: list[str], *,
                key: str, path: Path, direct: bool, verify: bool) -> list[Future]:
    """Submit one read of each slice of the open chunk file ``fd`` into ``data`` to ``pool``; one future per slice.

    ``direct``: the buffer is page-aligned and ``O_DIRECT`` may be used (it is, when slices are whole pages).
    ``fd`` is closed by the last read. Each future raises :class:`CorruptChunkError` if its slice is short
    or (with ``verify``) its checksum differs from ``checksums[s]``, :class:`TransportError` on an I/O error.

    Raises
    ------
    TransportError
        If ``pool`` was shut down (a concurrent close): the reads already submitted still run.
    """
    n, size = slice_bounds(header)
    direct = direct and size % ALIGN == 0
    try:
        if direct:
            set_direct(fd)
    except OSError as e:
        os.close(fd)
        raise TransportError(f"Cannot read chunk {key!r} ({path}) with O_DIRECT: {e}") from e
    if n == 0:
        os.close(fd)
        return []
    closer = _CloseAfter(fd, n)
    futures = []
    for s in range(n):
        try:
            futures.append(pool.submit(_read_one, fd, data, s, size, checksums[s], key, path, direct, verify, closer))
        except RuntimeError:
            for _ in range(n - s):
                closer.done()
            raise TransportError("DiskTransport is closed") from None
    return futures


def _read_one(fd: int, data: memoryview, s: int, size: int, want: str, key: str, path: Path, direct: bool,
              verify: bool, closer: _CloseAfter) -> None:
    a, b = s * size, (s + 1) * size
    try:
        with read_errors(key, path, b, slice_index=s):
            read_block(fd, data, a, b, direct)
    finally:
        closer.done()
    if verify:
        got = CHECKSUM_PREFIX + xxhash.xxh3_64_hexdigest(data[a:b])
        if got != want:
            raise CorruptChunkError(f"chunk {key!r} ({path}): slice {s} checksum {got} does not match the header's "
                                    f"{want}")


__all__ = ["DEFAULT_QUEUE_DEPTH", "SliceHasher", "slice_placeholder", "read_slices"]
