"""File I/O under :class:`~kvstream.transports.disk.DiskTransport`: whole-buffer ``pwrite``/``preadv``, block
splitting and the page alignment ``O_DIRECT`` needs (the 4096-byte chunk header keeps payloads aligned)."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import uuid
from pathlib import Path
from typing import Iterator

from ..chunk import HEADER_BYTES
from ..errors import CapacityError, ConfigError, TransportError

#: O_DIRECT alignment of addresses, lengths and file offsets (one page; also the header size).
ALIGN = 4096
#: ``os.O_DIRECT`` where the platform has it, else 0.
O_DIRECT = getattr(os, "O_DIRECT", 0)


class ShortRead(Exception):
    """The file ended before the payload did (turned into CorruptChunkError with the key)."""


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
    what = f"chunk {key!r} ({nbytes} bytes) to {path}; nothing was stored and the previous version, if any, is intact: {e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return CapacityError(f"Disk full writing {what}")
    return TransportError(f"I/O error writing {what}")


def set_direct(fd: int) -> None:
    """Turn ``O_DIRECT`` on for the open file ``fd`` (its reads bypass the page cache)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | O_DIRECT)


def fsync_dir(directory: Path) -> None:
    """``fsync`` a directory, so that a rename inside it is durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def walk_chunks(root: str | os.PathLike, prefix: str, suffix: str, tmp_dir: str) -> Iterator[tuple[str, os.DirEntry]]:
    """``(key, directory entry)`` of every chunk file (``<key><suffix>``) under ``root`` whose key starts with
    ``prefix``; walks only the directories that can match and never ``tmp_dir`` or a symlinked directory."""
    dirs = prefix.split("/")[:-1]  # directories the prefix names in full
    if any(p in ("", ".", "..") for p in dirs) or (dirs and dirs[0] == tmp_dir):
        return
    stack = [(os.path.join(root, *dirs), "/".join(dirs))]
    while stack:
        directory, rel = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            name = f"{rel}/{e.name}" if rel else e.name
            if e.is_dir(follow_symlinks=False):
                if name != tmp_dir and (name.startswith(prefix) or prefix.startswith(name + "/")):
                    stack.append((e.path, name))
            elif e.name.endswith(suffix) and name[:-len(suffix)].startswith(prefix):
                yield name[:-len(suffix)], e


def chunk_entries(root: str | os.PathLike, prefix: str, suffix: str,
                  tmp_dir: str) -> Iterator[tuple[str, Path, os.stat_result]]:
    """:func:`walk_chunks` as ``(key, file, stat)``, skipping files removed while the walk runs."""
    for key, e in walk_chunks(root, prefix, suffix, tmp_dir):
        try:
            yield key, Path(e.path), e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue


__all__ = ["ALIGN", "O_DIRECT", "ShortRead", "pwrite_all", "preadinto_all", "blocks", "whole_pages_end", "page",
           "write_block", "read_block", "fsync_dir", "probe_direct", "walk_chunks", "chunk_entries",
           "write_header", "set_direct", "write_error"]
