"""Ceilings, measured in the same run as what is compared with them (the machines are shared and figures
move from run to run): :func:`ceiling_d2d` (a device-to-device copy, bytes read + written per second),
:func:`ceiling_memcpy` (pinned ``cudaMemcpyAsync`` device-to-host / host-to-device) and :func:`ceiling_disk`
(raw ``O_DIRECT`` writes and reads of 16 MiB blocks, like ``dd``), with the raw disk I/O behind it.
"""

from __future__ import annotations

import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .inputs import pinned_empty, random_tensor, tensor_nbytes
from .timing import Stat

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


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned anonymous memory of ``nbytes`` filled with random bytes (for O_DIRECT I/O)."""
    buf = mmap.mmap(-1, nbytes)
    buf[:] = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).numpy().tobytes()
    return buf


def raw_write(path: str | Path, nbytes: int, buf: mmap.mmap, *, direct: bool, block_bytes: int = RAW_DISK_BLOCK_BYTES) -> None:
    """Write ``nbytes`` from ``buf`` to ``path`` in ``block_bytes`` writes (``O_DIRECT`` if ``direct``), then fsync."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(buf)
        left = nbytes
        while left:
            n = min(block_bytes, left, len(buf))
            written = os.write(fd, view[:n])
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


def ceiling_disk(run: Run, directory: str | Path, file_bytes: int, num_files: int, *, bench: str, x: Any,
                 reps: int = 2, queue_depths: tuple[int, ...] = (1, 4, 16)) -> tuple[Stat, Stat, str]:
    """The disk's best raw write and read of ``num_files`` files of ``file_bytes`` each in ``directory``.

    Every queue depth of ``queue_depths`` is measured (``1``: one stream, like ``dd``; ``q > 1``: ``q`` files
    written, or pieces read, in flight at once from threads, which is how
    :class:`~kvstream.transports.disk.DiskTransport` moves a batch of chunks), each with two I/O sizes: 16 MiB
    blocks (providers ``raw-odirect-qd<q>``) and one ``pwrite``/``preadv`` of the whole file, as the transport
    moves a chunk (``raw-odirect-qd<q>-whole``, where files are larger than a block). ``O_DIRECT`` where the
    filesystem allows it, else buffered I/O with fsync and page-cache eviction (``raw-buffered-…``). Writes
    include the fsync. A ceiling the measured thing beats is no ceiling, so the best of them is the ceiling
    (bench/NOTES.md: one stream of 16 MiB blocks read 1.58 GB/s where the transport read 1.87).

    Returns
    -------
    (write GB/s, read GB/s, provider): the best of each and a label naming the depths and sizes.

    Raises
    ------
    ValueError
        If ``file_bytes`` is not a multiple of 4096 (O_DIRECT needs aligned sizes).
    """
    if file_bytes % DIRECT_ALIGN_BYTES:
        raise ValueError(f"file_bytes must be a multiple of {DIRECT_ALIGN_BYTES}, got {file_bytes}")
    directory = Path(directory)
    direct = supports_direct_io(directory)
    kind = "raw-odirect" if direct else "raw-buffered"
    block = min(RAW_DISK_BLOCK_BYTES, file_bytes)
    sizes = [(block, "")] + ([(file_bytes, "-whole")] if file_bytes > block else [])
    paths = [directory / f"raw{i:04d}.bin" for i in range(num_files)]
    bufs = {piece: aligned_buffer(piece) for piece, _ in sizes}  # made before any timing; writers share them

    def _write_all(q: int, piece: int) -> None:
        if q == 1:
            for p in paths:
                raw_write(p, file_bytes, bufs[piece], direct=direct, block_bytes=piece)
            return
        with ThreadPoolExecutor(q) as pool:  # the threads write from one page-aligned buffer (only read)
            for f in [pool.submit(lambda p=p: raw_write(p, file_bytes, bufs[piece], direct=direct, block_bytes=piece))
                      for p in paths]:
                f.result()

    def _read_all(q: int, piece: int) -> None:
        if not direct:
            evict_tree(directory)
        if q == 1:
            for p in paths:
                if raw_read(p, bufs[piece], direct=direct, block_bytes=piece) != file_bytes:
                    raise OSError(f"raw read of {p} returned a wrong size")
        else:
            raw_parallel_read(paths, piece_bytes=piece, queue_depth=q, direct=direct)

    total = file_bytes * num_files
    best_w = best_r = None
    try:
        for q in queue_depths:
            for piece, suffix in sizes:
                provider = f"{kind}-qd{q}{suffix}"
                w = run.add_time_and_bandwidth(f"{bench}.write", provider, x,
                                               run.time_host(lambda q=q, b=piece: _write_all(q, b), reps=reps, warmup=0),
                                               total, time_unit="s")
                r = run.add_time_and_bandwidth(f"{bench}.read", provider, x,
                                               run.time_host(lambda q=q, b=piece: _read_all(q, b), reps=reps, warmup=0),
                                               total, time_unit="s")
                best_w = w if best_w is None or w.p50 > best_w.p50 else best_w
                best_r = r if best_r is None or r.p50 > best_r.p50 else best_r
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
        for b in bufs.values():
            b.close()
    what = "16 MiB blocks and whole files" if len(sizes) > 1 else f"{block // (1 << 20) or block} MiB blocks"
    return best_w, best_r, f"{kind} (best of queue depths {', '.join(map(str, queue_depths))}; {what})"


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
