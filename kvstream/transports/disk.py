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
* **Verified reads.** The header carries the xxh3-64 of the payload (:func:`~kvstream.chunk.payload_checksum`);
  ``fetch`` recomputes it and raises :class:`~kvstream.errors.CorruptChunkError` naming the key and
  file on a mismatch, a short file or a bad header. With ``flush(slices=True)`` each layer has its own
  checksum too, and :meth:`DiskTransport.fetch_slices` reads and verifies layers in parallel (:mod:`.slices`).
* **Large sequential I/O, no extra copies.** The payload moves in ``block_bytes`` (16 MiB) ``pwrite``
  / ``preadv`` calls straight from the chunk's memory or into ``out``'s (a CUDA chunk or ``out`` goes
  through one pinned staging buffer, copied block by block on the stream captured at call time so the
  PCIe copy of block *i+1* overlaps the disk I/O of block *i*). The checksum runs on its own thread,
  block by block, beside the I/O (xxh3 releases the GIL). The 4096-byte header keeps the payload
  aligned, so ``direct=True`` can use ``O_DIRECT`` (as the ``dd`` ceiling of bench/NOTES.md's disk topic does).
* **Background writes.** I/O runs on a pool of ``io_threads`` threads; handles are
  :class:`~kvstream.transports.base.FutureHandle`.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch
import xxhash

from ..chunk import CHECKSUM_PREFIX, HEADER_BYTES, ChunkHeader, byte_view, chunk_header, slice_checksums, tensor_bytes
from ..cuda import Event, host_empty
from ..errors import ChunkNotFound, ConfigError, CorruptChunkError, LayoutError, TransportError
from ..layout import Region, check_packed
from ..handles import FutureHandle, Handle
from .base import Transport
from .diskio import (ALIGN, O_DIRECT, ShortRead, blocks, chunk_entries, fsync_dir, probe_direct, read_block,
                     set_direct, walk_chunks, write_block, write_error, write_header)
from .slices import DEFAULT_QUEUE_DEPTH, SliceHasher, read_slices, slice_placeholder

#: File name suffix of a stored chunk.
SUFFIX = ".kvc"
#: Directory under the root that holds files being written (skipped by :meth:`DiskTransport.keys`).
TMP_DIR = ".tmp"
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

    def __init__(self, root: str | os.PathLike, *, fsync: bool = False, io_threads: int = 4,
                 block_bytes: int = DEFAULT_BLOCK_BYTES, direct: bool = False, verify: bool = True,
                 queue_depth: int = DEFAULT_QUEUE_DEPTH):
        super().__init__()
        for name, v in (("io_threads", io_threads), ("queue_depth", queue_depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"DiskTransport {name} must be an int >= 1, got {v!r}")
        if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes <= 0 \
                or block_bytes % ALIGN:
            raise ConfigError(f"DiskTransport block_bytes must be a positive multiple of {ALIGN}, got {block_bytes!r}")
        if direct and not O_DIRECT:
            raise ConfigError("DiskTransport(direct=True) needs O_DIRECT, which this platform lacks")
        self._root = Path(root)
        self._tmp = self._root / TMP_DIR
        try:
            os.makedirs(self._tmp, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"DiskTransport cannot create its directory {self._tmp}: {e}") from e
        self._fsync = bool(fsync)
        self._block_bytes = block_bytes
        self._direct = bool(direct)
        self._verify = bool(verify)
        if self._direct:
            probe_direct(self._tmp, self._root)
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="kvstream-disk-io")
        # One thread, so the blocks of one payload are hashed in order (FIFO).
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="kvstream-disk-hash")
        self._readers = ThreadPoolExecutor(queue_depth, thread_name_prefix="kvstream-disk-read")

    @property
    def root(self) -> Path:
        """The store's directory."""
        return self._root

    # -- paths ---------------------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        """The file of ``key``; raises LayoutError for keys that cannot map to one safely."""
        self._check_key(key)
        parts = key.split("/")
        for p in parts:
            if p in ("", ".", "..") or "\x00" in p or len(p.encode()) > 250:
                raise LayoutError(f"Invalid chunk key {key!r}: part {p!r} is empty, '.', '..', has NUL or is too long")
        if parts[0] == TMP_DIR:
            raise LayoutError(f"Invalid chunk key {key!r}: {TMP_DIR!r} is the store's temp directory")
        if any(p.endswith(SUFFIX) for p in parts[:-1]):
            raise LayoutError(f"Invalid chunk key {key!r}: a directory part may not end in {SUFFIX!r}")
        return self._root.joinpath(*parts[:-1], parts[-1] + SUFFIX)

    def path(self, key: str) -> Path:
        """The file that holds (or would hold) ``key``: ``<root>/<key>.kvc``."""
        return self._path(key)

    def _open(self, key: str) -> tuple[Path, int]:
        path = self._path(key)
        try:
            return path, os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise ChunkNotFound(f"No chunk {key!r} in DiskTransport at {self._root} (no file {path})") from None
        except OSError as e:
            raise TransportError(f"Cannot open chunk {key!r} ({path}): {e}") from e

    @staticmethod
    def _read_header(fd: int, key: str, path: Path) -> ChunkHeader:
        source = f"chunk {key!r} ({path})"
        header = ChunkHeader.from_bytes(os.pread(fd, HEADER_BYTES, 0), source=source)
        size = os.fstat(fd).st_size
        if size != HEADER_BYTES + header.nbytes:
            raise CorruptChunkError(f"{source}: file is {size} bytes, the header says {HEADER_BYTES} + "
                                    f"{header.nbytes} (truncated or overwritten)")
        if not header.checksum.startswith(CHECKSUM_PREFIX):
            raise CorruptChunkError(f"{source}: unknown checksum {header.checksum!r}; expected {CHECKSUM_PREFIX}...")
        return header

    def _submit(self, fn, *args) -> Future:
        try:
            return self._io.submit(fn, *args)
        except RuntimeError:  # the pool was shut down by a concurrent close()
            raise TransportError("DiskTransport is closed") from None

    def _hash(self, hasher, data: memoryview, nbytes: int, pending: list) -> None:
        if nbytes <= HASH_INLINE_BYTES:
            hasher.update(data)
        else:
            pending.append(self._hasher.submit(hasher.update, data))

    def _direct_ok(self, buf: torch.Tensor) -> bool:
        return self._direct and buf.numel() > 0 and buf.data_ptr() % ALIGN == 0

    # -- flush ---------------------------------------------------------------------------------------
    def flush(self, key: str, chunk: torch.Tensor, region: Region | None = None,
              meta: dict | None = None, *, slices: bool = False) -> Handle:
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
        path = self._path(key)
        self._check_chunk(chunk)
        if slices:
            meta = slice_placeholder(meta, chunk.shape[0] if chunk.dim() else 1)
        proto = chunk_header(chunk, region, meta, CHECKSUM_PREFIX + "0" * 16)
        if not chunk.is_cuda:
            return FutureHandle(self._submit(self._write, key, path, byte_view(chunk), proto, []))
        stream = torch.cuda.current_stream(chunk.device)
        src, events = host_empty(proto.nbytes, pin=True), []
        whole = byte_view(chunk)
        for a, b in blocks(proto.nbytes, self._block_bytes):
            src[a:b].copy_(whole[a:b], non_blocking=True)
            events.append(Event(chunk.device).record(stream))
        try:
            return FutureHandle(self._submit(self._write, key, path, src, proto, events))
        except TransportError:
            for e in events[-1:]:
                e.synchronize()  # ``src`` must outlive the copies into it
            raise

    def _write(self, key: str, path: Path, src: torch.Tensor, proto: ChunkHeader, events: list) -> None:
        nbytes = proto.nbytes
        data = tensor_bytes(src)
        direct = self._direct_ok(src)
        tmp = self._tmp / f"{uuid.uuid4().hex}-{os.getpid()}.tmp"
        fd, pending = -1, []
        sliced = SliceHasher(proto, data, self._hasher.submit if nbytes > HASH_INLINE_BYTES else None)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | (O_DIRECT if direct else 0),
                         0o644)
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
            os.makedirs(path.parent, exist_ok=True)
            os.replace(tmp, path)
        except BaseException as e:
            for f in pending:
                f.result()  # the hash thread must be done with ``data`` before it is freed
            sliced.wait()
            if events:
                events[-1].synchronize()
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise write_error(e, key, nbytes, path) from e
            raise
        if self._fsync:  # make the rename itself durable
            try:
                fsync_dir(path.parent)
            except OSError as e:
                raise TransportError(f"Chunk {key!r} is in place at {path} but its directory could not be "
                                     f"synced: {e}") from e

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
            header = self._read_header(fd, key, path)
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
        except ShortRead as e:
            raise CorruptChunkError(f"chunk {key!r} ({path}): file ends at byte {HEADER_BYTES + e.args[0]}, "
                                    f"the header says {HEADER_BYTES + nbytes}") from None
        except OSError as e:
            raise TransportError(f"I/O error reading chunk {key!r} ({path}): {e}") from e
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
        (:mod:`kvstream.transports.slices`). Opening and the header checks happen here, as in :meth:`fetch`.
        A chunk written without ``slices=True`` is read and verified whole: every handle completes with it.

        Returns one handle per slice; ``handles[s].wait()`` returns once ``out[s]`` holds verified bytes, and
        raises :class:`CorruptChunkError` (short file, checksum mismatch) or ``TransportError``. Raises
        ``ChunkNotFound``, ``CorruptChunkError`` (header) or ``LayoutError`` (``out``) at once, as :meth:`fetch`.
        """
        self._check_open()
        self._check_chunk(out, "out")
        if out.device.type != "cpu":
            raise LayoutError(f"fetch_slices reads into host memory; out is on {out.device}")
        path, fd = self._open(key)
        try:
            header = self._read_header(fd, key, path)
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
            return self._read_header(fd, key, path)
        finally:
            os.close(fd)

    def contains(self, key: str) -> bool:
        """Whether ``<root>/<key>.kvc`` exists (files appear only complete, by rename)."""
        self._check_open()
        return self._path(key).is_file()

    def delete(self, key: str) -> bool:
        """Unlink ``<root>/<key>.kvc``; ``True`` if it existed. Fetches already started still complete."""
        self._check_open()
        path = self._path(key)
        try:
            path.unlink()
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            raise TransportError(f"Cannot delete chunk {key!r} ({path}): {e}") from e

    def keys(self, prefix: str = "") -> list[str]:
        """Every stored key starting with ``prefix``, sorted; walks only the directories that can match."""
        self._check_open()
        return sorted(key for key, _ in walk_chunks(self._root, prefix, SUFFIX, TMP_DIR))

    def entries(self, prefix: str = "") -> Iterator[tuple[str, Path, os.stat_result]]:
        """Every stored chunk whose key starts with ``prefix``, as ``(key, file, stat)``, in no set order.

        For housekeeping by age and size (a store's garbage collection): ``stat`` is the file's
        ``os.stat_result`` (``st_mtime``, ``st_atime``, ``st_size`` = 4096 header bytes + payload bytes),
        taken while the walk passes it. A file removed meanwhile is skipped. The walk is lazy and,
        like :meth:`keys`, visits only the directories that can match. Raises ``TransportError`` if closed.

        Examples
        --------
        >>> old = [key for key, _, st in transport.entries("req-42/") if st.st_mtime < cutoff]  # doctest: +SKIP
        """
        self._check_open()
        return chunk_entries(self._root, prefix, SUFFIX, TMP_DIR)

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


__all__ = ["DiskTransport", "SUFFIX", "TMP_DIR", "DEFAULT_BLOCK_BYTES"]
