"""Chunks as files in a directory on local disk or a shared filesystem.

One file per key, ``<root>/<key>.kvc`` (a ``/`` in the key makes a subdirectory), holding a
:class:`~kvstream.chunk.ChunkHeader` frame (4096 bytes) followed by the payload. This is Vineyard's
file cache discipline (v6d ``modules/llm-cache``: write a temp file, then an atomic move) with
DéjàVuLib's flush/fetch interface; DéjàVu itself only mmaps one file and calls ``msync``.

Design:

* **Atomic replace.** A flush writes ``<root>/.tmp/<unique>.tmp`` (same filesystem) and ``os.replace``s
  it over ``<key>.kvc``: readers, other threads and other processes see the old file or the new one,
  never a torn one; the last rename wins. A failed write (a full disk: ``ENOSPC``/``EDQUOT``) deletes
  its temp file and raises :class:`~kvstream.errors.CapacityError`; the previous chunk stays.
* **Verified reads.** The header carries the payload's xxh3-64 and the digest of the key it was written
  under; ``fetch`` checks key and file size before reading, then the checksum, and raises
  :class:`~kvstream.errors.CorruptChunkError` naming key and file on a mismatch, a short or sparse file,
  a bad header, or a chunk copied or renamed from another key. With ``flush(slices=True)`` each layer
  has its own checksum too, and :meth:`DiskTransport.fetch_slices` reads and verifies layers in parallel.
* **No links.** Paths are walked from the root's descriptor without following links (:mod:`.diskpaths`):
  nothing is written or read outside the root. Temp files of killed writers are deleted once older than
  ``temp_max_age_s`` (at open and by :meth:`DiskTransport.sweep_temp`).
* **Large sequential I/O, no extra copies.** The payload moves in ``block_bytes`` (16 MiB) ``pwrite``
  / ``preadv`` calls straight from the chunk's memory or into ``out``'s (a CUDA chunk or ``out`` goes
  through one pinned staging buffer, copied block by block on the stream captured at call time so the
  PCIe copy of block *i+1* overlaps the disk I/O of block *i*). The checksum runs on its own thread,
  block by block, beside the I/O (xxh3 releases the GIL). The 4096-byte header keeps the payload
  aligned, so ``direct=True`` can use ``O_DIRECT`` (as the ``dd`` ceiling of bench/NOTES.md's disk topic does).
* **Background I/O.** A pool of ``io_threads`` threads; handles are :class:`~kvstream.handles.FutureHandle`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch
import xxhash

from ..chunk import CHECKSUM_PREFIX, ChunkHeader, byte_view, chunk_header, slice_checksums, tensor_bytes
from ..cuda import Event, host_empty
from ..errors import ChunkNotFound, ConfigError, CorruptChunkError, LayoutError, TransportError
from ..layout import Region, check_packed
from ..handles import FutureHandle, Handle
from .base import Transport
from .diskio import (ALIGN, O_DIRECT, SPARSE_CHECK_BYTES, blocks, probe_direct, read_block, read_errors, read_header,
                     set_direct, write_block, write_error, write_header)
from .diskpaths import SUFFIX, TEMP_MAX_AGE_S, TMP_DIR, DiskRoot, key_parts
from .slices import DEFAULT_QUEUE_DEPTH, SliceHasher, read_slices, slice_placeholder

#: Default I/O size: the block size of the ``dd`` ceiling measured on the H100 machine (bench/NOTES.md, disk).
DEFAULT_BLOCK_BYTES = 16 << 20
#: Payloads up to this size are hashed on the I/O thread; larger ones on the hash thread beside the I/O.
HASH_INLINE_BYTES = 1 << 20


class DiskTransport(Transport):
    """Chunks as verified files under ``root``, written atomically on background threads.

    Parameters
    ----------
    root : str or Path
        Directory of the store (created if missing). Several processes may share it.
    fsync : bool
        ``fsync`` each file (and its directory) before the handle completes: the chunk survives a
        power loss. Off by default (a crash of the process alone loses nothing written).
    io_threads : int
        Threads doing disk I/O; chunks flushed or fetched at once run in parallel up to this many.
    block_bytes : int
        Bytes per ``pwrite``/``preadv`` call and per pipelined staging copy; a multiple of 4096.
    direct : bool
        Use ``O_DIRECT`` (bypass the page cache) for page-aligned buffers: pinned staging (CUDA chunks
        and ``out``) and page-aligned CPU tensors; other CPU tensors take the buffered path.
    verify : bool
        Check the payload's xxh3 on every fetch.
    queue_depth : int
        Slice reads in flight at once (:meth:`fetch_slices`; :mod:`kvstream.transports.slices`).
    temp_max_age_s : float
        Temp files older than this are a dead writer's; they are deleted when the transport opens and by
        :meth:`sweep_temp`.

    Raises
    ------
    ConfigError
        A bad option, a root that cannot be created, or ``direct=True`` on a filesystem without O_DIRECT.

    Notes
    -----
    ``flush`` of a CUDA chunk enqueues its device-to-host copies into pinned staging on the current
    stream before it returns (so the caller may reuse the chunk in later work on that stream); the
    writer thread waits on their events. ``fetch`` into a CUDA ``out`` enqueues the host-to-device
    copies from the I/O thread on the stream current at the call, and the handle completes once they
    have landed. On a fetch, the payload is in ``out`` before it is verified: after a
    :class:`CorruptChunkError` the contents of ``out`` are undefined.

    Examples
    --------
    >>> import tempfile
    >>> t = DiskTransport(tempfile.mkdtemp())
    >>> t.flush("req-42/layer0000", torch.arange(6, dtype=torch.bfloat16)).wait()
    >>> t.keys("req-42/")
    ['req-42/layer0000']
    >>> t.fetch_new("req-42/layer0000").tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    >>> t.close()
    """

    name = "disk"
    local_reads = True  # the device-to-host copies into pinned staging

    def __init__(self, root: str | os.PathLike, *, fsync: bool = False, io_threads: int = 4,
                 block_bytes: int = DEFAULT_BLOCK_BYTES, direct: bool = False, verify: bool = True,
                 temp_max_age_s: float = TEMP_MAX_AGE_S, queue_depth: int = DEFAULT_QUEUE_DEPTH):
        super().__init__()
        for name, v in (("io_threads", io_threads), ("queue_depth", queue_depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"DiskTransport {name} must be an int >= 1, got {v!r}")
        if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes <= 0 \
                or block_bytes % ALIGN:
            raise ConfigError(f"DiskTransport block_bytes must be a positive multiple of {ALIGN}, got {block_bytes!r}")
        if direct and not O_DIRECT:
            raise ConfigError("DiskTransport(direct=True) needs O_DIRECT, which this platform lacks")
        if isinstance(temp_max_age_s, bool) or not isinstance(temp_max_age_s, (int, float)) or temp_max_age_s < 0:
            raise ConfigError(f"DiskTransport temp_max_age_s must be a number >= 0, got {temp_max_age_s!r}")
        self._root = Path(root)
        self._dirs = DiskRoot(self._root)
        self.temp_max_age_s = float(temp_max_age_s)
        self._dirs.sweep_temp(self.temp_max_age_s)
        self._fsync = bool(fsync)
        self._block_bytes = block_bytes
        self._direct = bool(direct)
        self._verify = bool(verify)
        if self._direct:
            try:
                probe_direct(self._root / TMP_DIR, self._root)
            except ConfigError:
                self._dirs.close()
                raise
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="kvstream-disk-io")
        # One thread, so the blocks of one payload are hashed in order (FIFO).
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="kvstream-disk-hash")
        self._readers = ThreadPoolExecutor(queue_depth, thread_name_prefix="kvstream-disk-read")

    @property
    def root(self) -> Path:
        """The store's directory."""
        return self._root

    # -- paths ---------------------------------------------------------------------------------------
    def _parts(self, key: str) -> list[str]:
        """The path parts of ``key``; raises LayoutError for keys that cannot map to a file safely."""
        self._check_key(key)
        return key_parts(key)

    def path(self, key: str) -> Path:
        """The file that holds (or would hold) ``key``: ``<root>/<key>.kvc``; ``LayoutError`` for a bad key."""
        parts = self._parts(key)
        return self._root.joinpath(*parts[:-1], parts[-1] + SUFFIX)

    check_key = path  # Transport.check_key: a key is good if it maps to a file safely

    def _open(self, key: str) -> tuple[Path, int]:
        """``(file, read descriptor)`` of ``key``, reached without following links."""
        parts = self._parts(key)
        path = self._root.joinpath(*parts[:-1], parts[-1] + SUFFIX)
        try:
            return path, self._dirs.open_chunk(parts)
        except ChunkNotFound:
            raise ChunkNotFound(f"No chunk {key!r} in DiskTransport at {self._root} (no file {path})") from None
        except OSError as e:
            raise TransportError(f"Cannot open chunk {key!r} ({path}): {e}") from e

    def _submit(self, fn, *args, pool: ThreadPoolExecutor | None = None) -> Future:
        try:
            return (pool or self._io).submit(fn, *args)
        except RuntimeError:  # the pool was shut down by a concurrent close()
            raise TransportError("DiskTransport is closed") from None

    def submit_read(self, fn, *args) -> Future:
        """Run ``fn(*args)`` on a slice-read thread, behind the reads already queued (first in, first out): for
        work that opens a file and queues its reads, such as :meth:`fetch_slices` of many files at once, whose
        headers are then read ``queue_depth`` at a time. Raises ``TransportError`` if the transport is closed."""
        return self._submit(fn, *args, pool=self._readers)

    def _hash(self, hasher, data: memoryview, nbytes: int, pending: list) -> None:
        if nbytes <= HASH_INLINE_BYTES:
            hasher.update(data)
        else:
            pending.append(self._hasher.submit(hasher.update, data))

    def _direct_ok(self, buf: torch.Tensor) -> bool:
        return self._direct and buf.numel() > 0 and buf.data_ptr() % ALIGN == 0

    # -- flush ---------------------------------------------------------------------------------------
    def flush(self, key: str, chunk: torch.Tensor, region: Region | None = None, meta: dict | None = None, *,
              slices: bool = False) -> Handle:
        """Write ``chunk`` to ``<root>/<key>.kvc`` on an I/O thread; see :meth:`Transport.flush`.

        ``slices=True`` also checksums each slice of the payload along its first axis (a packed chunk's
        layers) into the header's meta, so that :meth:`fetch_slices` can verify slices one by one.

        Raises
        ------
        CapacityError
            From ``wait()``: the disk is full (``ENOSPC``/``EDQUOT``); no file or temp file is left
            and the previous chunk under ``key``, if any, is intact.
        TransportError
            From ``wait()``: another I/O error, same guarantees.
        """
        self._check_open()
        parts = self._parts(key)
        self._check_chunk(chunk)
        if slices:
            meta = slice_placeholder(meta, chunk.shape[0] if chunk.dim() else 1)
        proto = chunk_header(chunk, region, meta, CHECKSUM_PREFIX + "0" * 16, key=key)
        if not chunk.is_cuda:
            return FutureHandle(self._submit(self._write, key, parts, byte_view(chunk), proto, []))
        stream = torch.cuda.current_stream(chunk.device)
        src, events = host_empty(proto.nbytes, pin=True), []
        whole = byte_view(chunk)
        for a, b in blocks(proto.nbytes, self._block_bytes):
            src[a:b].copy_(whole[a:b], non_blocking=True)
            events.append(Event(chunk.device).record(stream))
        try:
            return FutureHandle(self._submit(self._write, key, parts, src, proto, events))
        except TransportError:
            for e in events[-1:]:
                e.synchronize()  # ``src`` must outlive the copies into it
            raise

    def _write(self, key: str, parts: list[str], src: torch.Tensor, proto: ChunkHeader, events: list) -> None:
        nbytes = proto.nbytes
        data = tensor_bytes(src)
        direct = self._direct_ok(src)
        path = self._root.joinpath(*parts[:-1], parts[-1] + SUFFIX)
        tmp = f"{uuid.uuid4().hex}-{os.getpid()}.tmp"
        fd, pending = -1, []
        tmp_fd = self._dirs.tmp_fd
        sliced = SliceHasher(proto, data, self._hasher.submit if nbytes > HASH_INLINE_BYTES else None)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | (O_DIRECT if direct else 0),
                         0o644, dir_fd=tmp_fd)
            hasher = xxhash.xxh3_64()
            for i, (a, b) in enumerate(blocks(nbytes, self._block_bytes)):
                if events:
                    events[i].synchronize()
                self._hash(hasher, data[a:b], nbytes, pending)
                sliced.feed(b)
                write_block(fd, data, a, b, direct)
            for f in pending:
                f.result()
            header = dataclasses.replace(proto, checksum=CHECKSUM_PREFIX + hasher.hexdigest(),
                                         meta=sliced.meta(proto.meta)).to_bytes()
            write_header(fd, header, nbytes, direct)
            if self._fsync:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            self._dirs.place(tmp, parts, fsync=self._fsync)
        except BaseException as e:
            for f in pending:
                f.result()  # the hash thread must be done with ``data`` before it is freed
            sliced.wait()
            if events:
                events[-1].synchronize()
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=tmp_fd)
            if isinstance(e, OSError):
                raise write_error(e, key, nbytes, path) from e
            raise

    # -- fetch ---------------------------------------------------------------------------------------
    def fetch(self, key: str, out: torch.Tensor) -> Handle:
        """Read ``<root>/<key>.kvc`` into ``out`` on an I/O thread and verify it; see :meth:`Transport.fetch`.

        The file is opened before this returns, so a later replace or delete of ``key`` does not affect
        this fetch. Missing keys, a mismatched ``out`` and bad headers or sizes raise here; a checksum
        mismatch raises :class:`CorruptChunkError` from ``wait()``.
        """
        self._check_open()
        self._check_chunk(out, "out")
        path, fd = self._open(key)
        try:
            header = read_header(fd, key, path)
            check_packed(out, header.shape, header.dtype, name=f"out for chunk {key!r}")
            stream = torch.cuda.current_stream(out.device) if out.is_cuda else None
            return FutureHandle(self._submit(self._read, key, path, fd, header, out, stream))
        except BaseException:
            os.close(fd)
            raise

    def _read(self, key: str, path: Path, fd: int, header: ChunkHeader, out: torch.Tensor, stream) -> None:
        nbytes = header.nbytes
        dst = host_empty(nbytes, pin=True) if stream is not None else byte_view(out)
        data = tensor_bytes(dst)
        direct = self._direct_ok(dst)
        hasher = xxhash.xxh3_64() if self._verify else None
        pending, copied = [], False
        try:
            with read_errors(key, path, nbytes):
                if direct:
                    set_direct(fd)
                for a, b in blocks(nbytes, self._block_bytes):
                    read_block(fd, data, a, b, direct)
                    if hasher is not None:
                        self._hash(hasher, data[a:b], nbytes, pending)
                    if stream is not None:
                        with torch.cuda.stream(stream):
                            byte_view(out)[a:b].copy_(dst[a:b], non_blocking=True)
                        copied = True
        finally:
            os.close(fd)
            for f in pending:
                f.result()
            if copied:  # ``dst`` must outlive the copies out of it; the handle means "in out"
                Event(stream.device).record(stream).synchronize()
        if hasher is not None:
            got = CHECKSUM_PREFIX + hasher.hexdigest()
            if got != header.checksum:
                raise CorruptChunkError(f"chunk {key!r} ({path}): payload checksum {got} does not match the "
                                        f"header's {header.checksum}")

    def fetch_slices(self, key: str, out: torch.Tensor) -> list[Handle]:
        """Read chunk ``key`` into the contiguous CPU tensor ``out`` (its stored shape) slice by slice, in parallel.

        Slice ``s`` is ``out[s]`` (a packed chunk's layer ``s``), read by one of ``queue_depth`` threads
        (``O_DIRECT`` with ``direct=True`` when page-aligned) and verified against its own checksum
        (:mod:`kvstream.transports.slices`); opening and the header checks (key, size) are :meth:`fetch`'s. A
        chunk written without ``slices=True`` is read and verified whole: every handle completes with it.
        Returns one handle per slice: ``handles[s].wait()`` returns once ``out[s]`` holds verified bytes, or
        raises ``CorruptChunkError`` / ``TransportError``; ``ChunkNotFound``, a header ``CorruptChunkError``
        or a ``LayoutError`` (``out``) raise at once.
        """
        self._check_open()
        self._check_chunk(out, "out")
        if out.device.type != "cpu":
            raise LayoutError(f"fetch_slices reads into host memory; out is on {out.device}")
        path, fd = self._open(key)
        try:
            header = read_header(fd, key, path)
            check_packed(out, header.shape, header.dtype, name=f"out for chunk {key!r}")
            checksums = slice_checksums(header, source=f"chunk {key!r} ({path})")
            if checksums is None:
                return [FutureHandle(self._submit(self._read, key, path, fd, header, out, None))] * len(out)
        except BaseException:
            os.close(fd)
            raise
        return [FutureHandle(f) for f in read_slices(self._readers, fd, header, tensor_bytes(out), checksums, key=key,
                                                     path=path, direct=self._direct_ok(out), verify=self._verify)]

    # -- the rest of the contract --------------------------------------------------------------------
    def describe(self, key: str) -> ChunkHeader:
        """The stored chunk's header; reads the 4096-byte header frame only (and the file size).

        Raises
        ------
        ChunkNotFound
            No file for ``key``.
        CorruptChunkError
            A bad header, or a file size that does not match it.
        """
        self._check_open()
        path, fd = self._open(key)
        try:
            return read_header(fd, key, path)
        finally:
            os.close(fd)

    def contains(self, key: str) -> bool:
        """Whether ``<root>/<key>.kvc`` exists as a regular file (files appear only complete, by rename);
        ``False`` for one behind a symbolic link, which ``fetch`` refuses."""
        self._check_open()
        parts = self._parts(key)
        try:
            return self._dirs.is_file(parts)
        except TransportError:
            return False

    def delete(self, key: str) -> bool:
        """Unlink ``<root>/<key>.kvc``; ``True`` if it existed. Fetches already started still complete."""
        self._check_open()
        try:
            return self._dirs.unlink(self._parts(key))
        except OSError as e:
            raise TransportError(f"Cannot delete chunk {key!r} ({self.path(key)}): {e}") from e

    def touch(self, key: str) -> bool:
        """Set ``key``'s file's mtime to now (a store's access time); ``False`` if it is missing or cannot be."""
        self._check_open()
        try:
            return self._dirs.touch(self._parts(key))
        except (OSError, TransportError):
            return False

    def sweep_temp(self, max_age_s: float | None = None, now: float | None = None) -> int:
        """Delete temp files (of writers that died mid-flush) older than ``max_age_s`` (default
        ``temp_max_age_s``) seconds; returns how many. Best effort on a read-only disk."""
        self._check_open()
        return self._dirs.sweep_temp(self.temp_max_age_s if max_age_s is None else max_age_s, now)

    def keys(self, prefix: str = "") -> list[str]:
        """Every stored key starting with ``prefix``, sorted; walks only the directories that can match."""
        self._check_open()
        return sorted(key for key, _ in self._dirs.walk(prefix))

    def entries(self, prefix: str = "") -> Iterator[tuple[str, Path, os.stat_result]]:
        """Every stored chunk whose key starts with ``prefix``, as ``(key, file, stat)``, in no set order: for
        housekeeping by age and size (``st_mtime``, ``st_size`` = 4096 header bytes + payload bytes). Lazy;
        visits only the directories that can match and never enters a link. ``TransportError`` if closed.

        Examples
        --------
        >>> old = [key for key, _, st in transport.entries("req-42/") if st.st_mtime < cutoff]  # doctest: +SKIP
        """
        self._check_open()
        return self._dirs.entries(prefix)

    def drop_page_cache(self, key: str) -> None:
        """Ask the kernel to drop ``key``'s file from the page cache, so that the next fetch reads the disk.

        For cold-read benchmarks: writes back dirty pages (``fdatasync``) then ``posix_fadvise(DONTNEED)``.
        Raises ``ChunkNotFound``.
        """
        self._check_open()
        _, fd = self._open(key)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Finish the writes and reads in flight, then stop the I/O threads. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._io.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._hasher.shutdown(wait=True)
        self._dirs.close()


__all__ = ["DiskTransport", "SUFFIX", "TMP_DIR", "TEMP_MAX_AGE_S", "DEFAULT_BLOCK_BYTES", "SPARSE_CHECK_BYTES"]
