"""Ceilings, measured in the same run as what is compared with them (the machines are shared and figures
move from run to run): :func:`ceiling_d2d` (a device-to-device copy, bytes read + written per second),
:func:`ceiling_memcpy` (pinned ``cudaMemcpyAsync`` device-to-host / host-to-device) and :func:`ceiling_disk`
(raw ``O_DIRECT`` writes and reads of 16 MiB blocks, like ``dd``), with the raw disk I/O behind it.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import torch

from .inputs import pinned_empty, random_tensor, tensor_nbytes
from .timing import Stat, alternating

if TYPE_CHECKING:
    from .harness import Run

#: Block size of the raw disk ceiling: 16 MiB, the block size of the ``dd`` O_DIRECT runs on the H100 machine
#: (bench/NOTES.md: 1.9 GB/s write, 1.1 GB/s read).
RAW_DISK_BLOCK_BYTES = 16 << 20
#: Alignment O_DIRECT needs for offsets, sizes and buffers (a page covers every common logical block).
DIRECT_ALIGN_BYTES = 4096


def ceiling_d2d(run: Run, nbytes: int, *, bench: str, x: Any) -> Stat:
    """Device-to-device copy of ``nbytes`` (one contiguous buffer into another), recorded as provider ``d2d-copy``.

    Returns the bandwidth in GB/s counting bytes read plus bytes written (``2 * nbytes``), the convention
    of the 2926 GB/s measured on the H100 machine (bench/NOTES.md).
    """
    src = random_tensor((nbytes // 2,), torch.bfloat16, run.device)
    dst = torch.empty_like(src)
    ms = run.time(lambda: dst.copy_(src))
    bw = run.add_time_and_bandwidth(bench, "d2d-copy", x, ms, 2 * tensor_nbytes(src))
    del src, dst
    return bw


def ceiling_memcpy(run: Run, chunk_bytes: int, num_chunks: int, *, direction: str, bench: str, x: Any) -> Stat:
    """``num_chunks`` pinned ``cudaMemcpyAsync`` copies of ``chunk_bytes`` each (torch ``copy_(non_blocking=True)``).

    Parameters
    ----------
    direction : {"d2h", "h2d"}
        Device to pinned host, or pinned host to device.

    Returns the bandwidth in GB/s of the bytes moved (``chunk_bytes * num_chunks``), timed on the host clock
    between synchronizations like the transports it is compared with; recorded as provider ``memcpy``.
    """
    if direction not in ("d2h", "h2d"):
        raise ValueError(f"direction must be 'd2h' or 'h2d', got {direction!r}")
    n = chunk_bytes // 2
    dev = [random_tensor((n,), torch.bfloat16, run.device) for _ in range(num_chunks)]
    host = [pinned_empty((n,), torch.bfloat16) for _ in range(num_chunks)]
    for h, d in zip(host, dev):  # random host bytes too (the h2d source)
        h.copy_(d)
    pairs = list(zip(host, dev)) if direction == "d2h" else list(zip(dev, host))

    def _copy_all() -> None:
        for d, s in pairs:
            d.copy_(s, non_blocking=True)

    ms = run.time_host(_copy_all, reps=5)
    return run.add_time_and_bandwidth(bench, "memcpy", x, ms, chunk_bytes * num_chunks)


def fs_type(path: str | Path) -> str:
    """Filesystem type of the mount holding ``path`` ("ext4", "xfs", "overlay", "tmpfs"; "unknown")."""
    p = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (p == parts[1] or p.startswith(parts[1].rstrip("/") + "/")) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def supports_direct_io(directory: str | Path) -> bool:
    """Whether files in ``directory`` can be opened with ``O_DIRECT`` (tmpfs and some overlays cannot)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = Path(directory) / ".odirect-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        os.close(fd)
        return True
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def aligned_buffer(nbytes: int, source=None) -> mmap.mmap:
    """Page-aligned anonymous memory of ``nbytes`` (for O_DIRECT I/O), filled with the first ``nbytes`` of
    ``source`` (any buffer, e.g. ``tensor.numpy()``) or with random bytes."""
    buf = mmap.mmap(-1, nbytes)
    if source is None:
        buf[:] = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).numpy().tobytes()
    else:
        buf[:] = memoryview(source).cast("B")[:nbytes]
    return buf


def raw_write(path: str | Path, nbytes: int, buf: mmap.mmap, *, direct: bool, block_bytes: int = RAW_DISK_BLOCK_BYTES) -> None:
    """Write ``nbytes`` from ``buf`` to ``path`` in ``block_bytes`` writes (``O_DIRECT`` if ``direct``), then fsync:
    ``buf`` in order when it holds ``nbytes``, else its first block again and again (like ``dd``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(buf)
        whole = len(buf) >= nbytes
        left = nbytes
        while left:
            n = min(block_bytes, left, len(buf))
            at = nbytes - left if whole else 0
            written = os.write(fd, view[at:at + n])
            if written <= 0:
                raise OSError(f"short write to {path}: {written} of {n} bytes")
            left -= written
        os.fsync(fd)
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_read(path: str | Path, buf: mmap.mmap, *, direct: bool, block_bytes: int = RAW_DISK_BLOCK_BYTES) -> int:
    """Read ``path`` to its end in ``block_bytes`` reads into ``buf`` (``O_DIRECT`` if ``direct``). Returns bytes read."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    total = 0
    try:
        view = memoryview(buf)[:min(block_bytes, len(buf))]
        while True:
            n = os.readv(fd, [view])
            if n <= 0:
                break
            total += n
    finally:
        os.close(fd)
    return total


def evict_tree(root: str | Path) -> None:
    """fsync every file under ``root`` and drop it from the page cache (so reads hit the disk)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class RawDisk:
    """The raw cases of the disk ceiling: ``num_files`` files of ``file_bytes`` in ``directory``, written and read
    at every queue depth of ``queue_depths`` in two I/O sizes (see :func:`ceiling_disk`).

    ``cases`` maps a provider (``raw-odirect-qd<q>`` in 16 MiB blocks, ``raw-odirect-qd<q>-whole`` in one call
    per file where files are larger than a block; ``raw-buffered-qd<q>`` in blocks, written with fsync and
    dropped from the page cache before reads; the buffered cases in both sizes where the filesystem refuses
    ``O_DIRECT``) to a :class:`DiskCase`; ``label`` names what they cover. :meth:`close` removes the files and
    frees the buffers. Every case writes the same paths, so a read measures the latest write's files.
    ``sources`` (one buffer of at least ``file_bytes`` per file, e.g. the transport's chunks as
    ``tensor.view(torch.uint8).numpy()``): each file is written with its own bytes, copied into page-aligned
    memory before any timing; without it every file repeats one random buffer per I/O size.

    Raises
    ------
    ValueError
        If ``file_bytes`` is not a multiple of 4096 (O_DIRECT needs aligned sizes), or ``sources`` does not
        have one buffer per file.
    """

    def __init__(self, directory: str | Path, file_bytes: int, num_files: int, queue_depths: tuple[int, ...] = (1, 4, 16),
                 sources: list | None = None):
        if file_bytes % DIRECT_ALIGN_BYTES:
            raise ValueError(f"file_bytes must be a multiple of {DIRECT_ALIGN_BYTES}, got {file_bytes}")
        if sources is not None and len(sources) != num_files:
            raise ValueError(f"sources: {len(sources)} buffers for {num_files} files")
        directory = Path(directory)
        self.direct = direct = supports_direct_io(directory)
        block = min(RAW_DISK_BLOCK_BYTES, file_bytes)
        sizes = [(block, "")] + ([(file_bytes, "-whole")] if file_bytes > block else [])
        self.paths = paths = [directory / f"raw{i:04d}.bin" for i in range(num_files)]
        # made before any timing: one shared buffer per I/O size, or each file's own bytes (then every write
        # moves distinct data, as a transport's do; a storage layer that deduplicates cannot flatter the ceiling)
        self._bufs = bufs = {piece: aligned_buffer(piece) for piece, _ in sizes}
        self._files = [aligned_buffer(file_bytes, src) for src in sources] if sources is not None else None
        source = (lambda i, piece: self._files[i]) if sources is not None else (lambda i, piece: bufs[piece])

        def _write_all(q: int, piece: int, odirect: bool) -> None:
            if q == 1:
                for i, p in enumerate(paths):
                    raw_write(p, file_bytes, source(i, piece), direct=odirect, block_bytes=piece)
                return
            with ThreadPoolExecutor(q) as pool:  # the threads only read the page-aligned buffers
                for f in [pool.submit(lambda i=i, p=p: raw_write(p, file_bytes, source(i, piece), direct=odirect,
                                                                 block_bytes=piece))
                          for i, p in enumerate(paths)]:
                    f.result()

        # the readers' page-aligned buffers, as many per I/O size as reads in flight, touched before any timing
        self._readers = {piece: [aligned_buffer(piece) for _ in range(max(queue_depths))] for piece, _ in sizes}
        free = {piece: queue.SimpleQueue() for piece in self._readers}
        for piece, held in self._readers.items():
            for b in held:
                free[piece].put(b)

        def _read_one(p: Path, piece: int, odirect: bool) -> None:
            buf = free[piece].get()
            try:
                if raw_read(p, buf, direct=odirect, block_bytes=piece) != file_bytes:
                    raise OSError(f"raw read of {p} returned a wrong size")
            finally:
                free[piece].put(buf)

        def _read_all(q: int, piece: int, odirect: bool) -> None:
            if q == 1:
                for p in paths:
                    _read_one(p, piece, odirect)
                return
            with ThreadPoolExecutor(q) as pool:  # q files in flight, each read in order: a transport's fetch batch
                for f in [pool.submit(_read_one, p, piece, odirect) for p in paths]:
                    f.result()

        def _case(q: int, piece: int, odirect: bool) -> DiskCase:
            return DiskCase(lambda: _write_all(q, piece, odirect), lambda: _read_all(q, piece, odirect),
                            None if odirect else (lambda: evict_tree(directory)))

        # O_DIRECT where the filesystem has it, in both I/O sizes; buffered I/O (fsync, then the files dropped from
        # the page cache before reading) in blocks as well, since the kernel's readahead can beat O_DIRECT
        # (bench/NOTES.md: a buffered DiskTransport read 15 % faster than any O_DIRECT case on the dev VM's disk)
        self.cases: dict[str, DiskCase] = {}
        for odirect in ((True, False) if direct else (False,)):
            kind = "raw-odirect" if odirect else "raw-buffered"
            for q in queue_depths:
                for piece, suffix in (sizes if odirect or not direct else sizes[:1]):
                    self.cases[f"{kind}-qd{q}{suffix}"] = _case(q, piece, odirect)
        what = "16 MiB blocks and whole files" if len(sizes) > 1 else f"{block // (1 << 20) or block} MiB blocks"
        kinds = "raw-odirect and raw-buffered (blocks)" if direct else "raw-buffered"
        self.label = f"{kinds} (best of queue depths {', '.join(map(str, queue_depths))}; {what})"

    def close(self) -> None:
        """Remove the files and free the buffers. Idempotent."""
        for p in self.paths:
            p.unlink(missing_ok=True)
        for b in [*self._bufs.values(), *(self._files or []), *(b for held in self._readers.values() for b in held)]:
            b.close()
        self._bufs, self._files, self._readers = {}, None, {}


class DiskCase(NamedTuple):
    """One provider of a disk comparison: ``write()`` makes its files durable, ``read()`` reads them all back,
    ``before_read()`` (or ``None``) drops them from the page cache first, untimed."""

    write: Callable[[], Any]
    read: Callable[[], Any]
    before_read: Callable[[], Any] | None = None


def time_disk_cases(cases: dict[str, DiskCase], *, reps: int) -> dict[str, dict[str, list[float]]]:
    """Milliseconds of every case's write and read, in ``reps`` :func:`~kvstream.bench.timing.alternating`
    rounds (a raw ceiling and the transport it bounds take turns, so a shared disk's drift lands on both;
    bench/NOTES.md: timed one after the other, two repetitions each, the transport beat the raw figures by
    6-26 %). In each turn a case writes, then reads what it wrote. Returns ``{name: {"write": [...],
    "read": [...]}}``."""
    samples = {name: {"write": [], "read": []} for name in cases}
    for _, name in alternating(list(cases), max(1, reps)):
        case = cases[name]
        t0 = time.perf_counter()
        case.write()
        samples[name]["write"].append((time.perf_counter() - t0) * 1e3)
        if case.before_read is not None:
            case.before_read()
        t0 = time.perf_counter()
        case.read()
        samples[name]["read"].append((time.perf_counter() - t0) * 1e3)
    return samples


def best_of(samples: dict[str, dict[str, list[float]]], names, op: str) -> tuple[str, Stat]:
    """The name among ``names`` whose median ``op`` ("write" or "read") time is lowest, and that time's Stat."""
    name = min(names, key=lambda n: Stat.of(samples[n][op]).p50)
    return name, Stat.of(samples[name][op])


def ceiling_disk(run: Run, directory: str | Path, file_bytes: int, num_files: int, *, bench: str, x: Any,
                 reps: int = 2, queue_depths: tuple[int, ...] = (1, 4, 16)) -> tuple[Stat, Stat, str]:
    """The disk's best raw write and read of ``num_files`` files of ``file_bytes`` each in ``directory``.

    Every queue depth of ``queue_depths`` is measured (``1``: one stream, like ``dd``; ``q > 1``: ``q`` files
    written or read at once from threads, each in order, which is how
    :class:`~kvstream.transports.disk.DiskTransport` moves a batch of chunks), each with two I/O sizes: 16 MiB
    blocks (providers ``raw-odirect-qd<q>``) and one ``pwrite``/``preadv`` of the whole file, as the transport
    moves a chunk (``raw-odirect-qd<q>-whole``, where files are larger than a block). ``O_DIRECT`` where the
    filesystem allows it, and buffered I/O with fsync and page-cache eviction (``raw-buffered-…``). Writes
    include the fsync. A ceiling the measured thing beats is no ceiling, so the best of them is the ceiling
    (bench/NOTES.md: one stream of 16 MiB blocks read 1.58 GB/s where the transport read 1.87). The cases
    alternate (:func:`time_disk_cases`); to alternate them with the thing they bound as well, use
    :class:`RawDisk` and :func:`time_disk_cases` directly, as the disk topic does.

    Returns
    -------
    (write GB/s, read GB/s, provider): the best of each and a label naming the depths and sizes.

    Raises
    ------
    ValueError
        If ``file_bytes`` is not a multiple of 4096 (O_DIRECT needs aligned sizes).
    """
    raw = RawDisk(directory, file_bytes, num_files, queue_depths)
    try:
        samples = time_disk_cases(raw.cases, reps=reps)
    finally:
        raw.close()
    total = file_bytes * num_files
    best = {}
    for name in raw.cases:
        for op in ("write", "read"):
            bw = run.add_time_and_bandwidth(f"{bench}.{op}", name, x, Stat.of(samples[name][op]), total, time_unit="s")
            best[op] = bw if op not in best or bw.p50 > best[op].p50 else best[op]
    return best["write"], best["read"], raw.label


def raw_parallel_read(paths: list[Path], *, piece_bytes: int, queue_depth: int, direct: bool) -> int:
    """Read every file of ``paths`` whole in ``piece_bytes`` reads, ``queue_depth`` of them in flight.

    The disk's best for reading files like a :class:`~kvstream.transports.disk.DiskTransport` at its
    queue depth (``fetch_slices``): threads each ``preadv`` one piece into their own page-aligned buffer,
    ``O_DIRECT`` when ``direct`` (every file size and ``piece_bytes`` a multiple of 4096). Returns the
    bytes read.
    """
    sizes = [os.path.getsize(p) for p in paths]
    if direct and (piece_bytes % DIRECT_ALIGN_BYTES or any(s % DIRECT_ALIGN_BYTES for s in sizes)):
        raise ValueError("raw_parallel_read(direct=True) needs page-multiple pieces and file sizes")
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = [os.open(p, flags) for p in paths]
    local = threading.local()

    def _read(fd: int, offset: int, n: int) -> int:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = mmap.mmap(-1, -(-piece_bytes // DIRECT_ALIGN_BYTES) * DIRECT_ALIGN_BYTES)
        return os.preadv(fd, [memoryview(buf)[:n]], offset)

    try:
        with ThreadPoolExecutor(queue_depth) as pool:
            futures = [pool.submit(_read, fd, off, min(piece_bytes, size - off))
                       for fd, size in zip(fds, sizes) for off in range(0, size, piece_bytes)]
            total = sum(f.result() for f in futures)
    finally:
        for fd in fds:
            os.close(fd)
    if total != sum(sizes):
        raise OSError(f"raw_parallel_read read {total} of {sum(sizes)} bytes")
    return total
