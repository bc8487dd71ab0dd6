"""File I/O under :class:`~kvstream.transports.disk.DiskTransport`: whole-buffer ``pwrite``/``preadv``, block
splitting, the page alignment ``O_DIRECT`` needs (the 4096-byte chunk header keeps payloads aligned), and
the checks of a chunk file's header against its key and size before anything is read into memory."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import uuid
from pathlib import Path
from typing import Iterator

from ..chunk import CHECKSUM_PREFIX, HEADER_BYTES, ChunkHeader, key_digest
from ..errors import CapacityError, ConfigError, CorruptChunkError, TransportError

#: O_DIRECT alignment of addresses, lengths and file offsets (one page; also the header size).
ALIGN = 4096
#: ``os.O_DIRECT`` where the platform has it, else 0.
O_DIRECT = getattr(os, "O_DIRECT", 0)
#: Payloads from this size on must occupy at least half their file's bytes on disk: a sparse file that
#: declares gigabytes is refused before anything that large is allocated (kvstream writes every byte).
SPARSE_CHECK_BYTES = 16 << 20


class ShortRead(Exception):
    """The file ended before the payload did (turned into CorruptChunkError with the key)."""


@contextlib.contextmanager
def read_errors(key: str, path: Path, end: int, slice_index: int | None = None) -> Iterator[None]:
    """Turn the errors of reading chunk ``key``'s payload from ``path`` into kvstream's.

    Parameters
    ----------
    key, path : str, Path
        The chunk and its file, for the messages.
    end : int
        Payload byte (after the header) where the read should have ended: the header's size, or the
        slice's end.
    slice_index : int, optional
        The slice being read (its index names it in the messages); ``None`` for the whole payload.

    Raises
    ------
    CorruptChunkError
        On :class:`ShortRead` inside the block: the file ends before ``end``.
    TransportError
        On an ``OSError`` inside the block.
    """
    what = f"chunk {key!r}" if slice_index is None else f"slice {slice_index} of chunk {key!r}"
    try:
        yield
    except ShortRead as e:
        want = (f", the header says {HEADER_BYTES + end}" if slice_index is None else
                f" inside slice {slice_index}, which ends at {HEADER_BYTES + end}")
        got = HEADER_BYTES + e.args[0]
        raise CorruptChunkError(f"chunk {key!r} ({path}): file ends at byte {got}{want}") from None
    except OSError as e:
        raise TransportError(f"I/O error reading {what} ({path}): {e}") from e


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def preadinto_all(fd: int, buf: memoryview, offset: int) -> None:
    """Fill all of ``buf`` from ``offset``; raises :class:`ShortRead` at end of file."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise ShortRead(offset + done)
        done += n


def blocks(nbytes: int, block_bytes: int) -> list[tuple[int, int]]:
    """``[a, b)`` byte ranges of at most ``block_bytes`` covering ``nbytes``."""
    return [(a, min(a + block_bytes, nbytes)) for a in range(0, nbytes, block_bytes)]


def whole_pages_end(a: int, b: int, direct: bool) -> int:
    """End of the part of ``[a, b)`` that O_DIRECT can move as is (whole pages); ``b`` without O_DIRECT."""
    return a + (b - a) // ALIGN * ALIGN if direct else b


def page() -> memoryview:
    """A zeroed, page-aligned 4096-byte buffer (anonymous mmap) for O_DIRECT headers and tails."""
    return memoryview(mmap.mmap(-1, ALIGN))


def write_block(fd: int, data: memoryview, a: int, b: int, direct: bool) -> None:
    """Write payload bytes ``[a, b)`` of ``data`` after the header (a padded last page under O_DIRECT)."""
    mid = whole_pages_end(a, b, direct)
    pwrite_all(fd, data[a:mid], HEADER_BYTES + a)
    if mid < b:  # O_DIRECT and the payload's last partial page: pad it, truncate later
        tail = page()
        tail[:b - mid] = data[mid:b]
        pwrite_all(fd, tail, HEADER_BYTES + mid)


def write_header(fd: int, header: bytes, nbytes: int, direct: bool) -> None:
    """Write the 4096-byte ``header`` at offset 0 (through a page under O_DIRECT, then drop the padding of a
    payload of ``nbytes`` that does not end on a page)."""
    if not direct:
        pwrite_all(fd, memoryview(header), 0)
        return
    first = page()
    first[:] = header
    pwrite_all(fd, first, 0)
    if nbytes % ALIGN:
        os.ftruncate(fd, HEADER_BYTES + nbytes)  # drop the tail block's padding


def write_error(e: OSError, key: str, nbytes: int, path: Path) -> TransportError:
    """The error to raise for ``e`` from writing chunk ``key``: :class:`CapacityError` for a full disk
    (``ENOSPC``/``EDQUOT``), else :class:`TransportError`; the caller removed the temp file."""
    what = (f"chunk {key!r} ({nbytes} bytes) to {path}; nothing was stored and the previous version, if any, "
            f"is intact: {e}")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return CapacityError(f"Disk full writing {what}")
    return TransportError(f"I/O error writing {what}")


def set_direct(fd: int) -> None:
    """Turn ``O_DIRECT`` on for the open file ``fd`` (its reads bypass the page cache)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | O_DIRECT)


def read_block(fd: int, data: memoryview, a: int, b: int, direct: bool) -> None:
    """Read payload bytes ``[a, b)`` into ``data`` (the last partial page through a bounce page under O_DIRECT)."""
    mid = whole_pages_end(a, b, direct)
    preadinto_all(fd, data[a:mid], HEADER_BYTES + a)
    if mid < b:  # O_DIRECT and the payload's last partial page: read the page, keep its start
        tail = page()
        n = os.preadv(fd, [tail], HEADER_BYTES + mid)
        if n < b - mid:
            raise ShortRead(mid + n)
        data[mid:b] = tail[:b - mid]


def read_header(fd: int, key: str, path: Path) -> ChunkHeader:
    """The validated header of ``key``'s open chunk file ``path``: checked to be written under ``key``, to
    match the file's size (a sparse file of a large payload refused) and to carry an xxh3 checksum.

    Raises
    ------
    CorruptChunkError
        On any of these, or a malformed header (:meth:`ChunkHeader.from_bytes`).
    """
    source = f"chunk {key!r} ({path})"
    header = ChunkHeader.from_bytes(os.pread(fd, HEADER_BYTES, 0), source=source)
    if header.key_digest != key_digest(key):
        raise CorruptChunkError(f"{source}: the chunk was written under another key (copied or renamed)")
    st = os.fstat(fd)
    if st.st_size != HEADER_BYTES + header.nbytes:
        raise CorruptChunkError(f"{source}: file is {st.st_size} bytes, the header says {HEADER_BYTES} + "
                                f"{header.nbytes} (truncated or overwritten)")
    if header.nbytes >= SPARSE_CHECK_BYTES and 0 < st.st_blocks * 512 < st.st_size // 2:
        raise CorruptChunkError(f"{source}: a sparse file ({st.st_blocks * 512} of {st.st_size} bytes on disk); "
                                "kvstream writes every byte of a chunk")
    if not header.checksum.startswith(CHECKSUM_PREFIX):
        raise CorruptChunkError(f"{source}: unknown checksum {header.checksum!r}; expected {CHECKSUM_PREFIX}...")
    return header


def probe_direct(tmp: Path, root: Path) -> None:
    """Check that ``O_DIRECT`` writes work in the directory ``tmp`` (of the store at ``root``).

    Raises
    ------
    ConfigError
        If opening or writing with ``O_DIRECT`` fails there (tmpfs and some overlay filesystems).
    """
    probe = tmp / f"probe-{uuid.uuid4().hex}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_DIRECT, 0o644)
        try:
            pwrite_all(fd, page(), 0)
        finally:
            os.close(fd)
    except OSError as e:
        raise ConfigError(f"DiskTransport(direct=True): O_DIRECT does not work under {root}: {e}") from e
    finally:
        probe.unlink(missing_ok=True)


__all__ = ["ALIGN", "O_DIRECT", "SPARSE_CHECK_BYTES", "ShortRead", "read_errors", "read_header", "pwrite_all",
           "preadinto_all", "blocks", "whole_pages_end", "page", "write_block", "write_header", "write_error", "set_direct",
           "read_block", "probe_direct"]
