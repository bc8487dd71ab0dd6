"""Pinned (page-locked) host memory through cuda-python, with a caching allocator.

Only page-locked memory lets ``cudaMemcpyAsync`` run asynchronously at full PCIe speed (about 3.5x
pageable memory's rate device-to-host; bench/NOTES.md has the measurements), and it is what the GPU can
read and write directly (zero-copy) through unified virtual addressing.

``cudaHostAlloc`` is slow (it maps and locks pages: tens of ms per GiB) so blocks are cached: a freed
block goes back to a per-size free list and the next request of that size class reuses it, like
PyTorch's ``CachingHostAllocator``. Size classes are powers of two up to 2 MiB and multiples of 2 MiB
above, so a cached block wastes at most 2 MiB or half its size.

On a machine without a CUDA driver the same functions return plain (pageable) CPU tensors, so callers
need no second code path.
"""

from __future__ import annotations

import bisect
import ctypes
import threading
import weakref
from typing import Sequence

import torch

from ..errors import CapacityError, CudaError

_SMALL_LIMIT = 2 << 20  # 2 MiB: above this, round to a multiple of it instead of a power of two
_MIN_BLOCK = 4096  # one page; also keeps every block 4096-aligned for O_DIRECT


def cuda_usable() -> bool:
    """Whether a CUDA device and driver are present (``torch.cuda.is_available()``)."""
    return torch.cuda.is_available()


def size_class(nbytes: int) -> int:
    """Bytes actually reserved for a request of ``nbytes`` (see the module docstring)."""
    if nbytes <= _MIN_BLOCK:
        return _MIN_BLOCK
    if nbytes <= _SMALL_LIMIT:
        return 1 << (nbytes - 1).bit_length()
    return -(-nbytes // _SMALL_LIMIT) * _SMALL_LIMIT


def _cudart():
    from cuda.bindings import runtime as cudart

    return cudart


def _check(result, what: str):
    err = result[0] if isinstance(result, tuple) else result
    cudart = _cudart()
    if err != cudart.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        if err == cudart.cudaError_t.cudaErrorMemoryAllocation:
            raise CapacityError(f"{what}: out of pinned host memory ({name})")
        raise CudaError(f"{what} failed: {name}")
    if isinstance(result, tuple):
        return result[1] if len(result) == 2 else result[1:]
    return None


class _Block:
    """One cudaHostAlloc'd region; lives in the allocator's cache or inside a tensor.

    ``base`` is what the driver returned (and what ``cudaFreeHost`` takes); ``ptr`` is ``base`` rounded up
    to 4096 bytes. The driver page-aligns large allocations but sub-allocates small ones (seen on an H200:
    blocks of 32 KiB and less were not 4096-aligned), so every block asks for one page more.
    """

    __slots__ = ("base", "ptr", "nbytes", "__weakref__")

    def __init__(self, base: int, nbytes: int):
        self.base = base
        self.ptr = -(-base // _MIN_BLOCK) * _MIN_BLOCK
        self.nbytes = nbytes


class PinnedAllocator:
    """A caching allocator of page-locked host memory (``cudaHostAlloc`` with ``cudaHostAllocPortable``).

    Parameters
    ----------
    max_cached_bytes : int
        Freed blocks beyond this many cached bytes are returned to the driver (``cudaFreeHost``).

    Notes
    -----
    Thread safe. Tensors returned by :meth:`empty` keep their block alive; when the last tensor
    viewing a block is freed, the block returns to the cache.
    """

    def __init__(self, max_cached_bytes: int = 8 << 30):
        self.max_cached_bytes = int(max_cached_bytes)
        self._free: dict[int, list[_Block]] = {}
        self._cached_bytes = 0
        self._live_bytes = 0
        self._lock = threading.Lock()

    @property
    def live_bytes(self) -> int:
        """Bytes held by live tensors."""
        return self._live_bytes

    @property
    def cached_bytes(self) -> int:
        """Bytes held in the free cache."""
        return self._cached_bytes

    def empty(self, nbytes: int) -> torch.Tensor:
        """A pinned uint8 tensor of ``nbytes`` bytes (contents undefined), 4096-byte aligned.

        Without CUDA this is a plain CPU tensor.

        Raises
        ------
        CapacityError
            If the driver cannot lock more host memory.
        ValueError
            If ``nbytes`` is negative.
        """
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"PinnedAllocator.empty: nbytes must be >= 0, got {nbytes}")
        if not cuda_usable():
            return torch.empty(nbytes, dtype=torch.uint8)
        cls = size_class(nbytes)
        with self._lock:
            bucket = self._free.get(cls)
            block = bucket.pop() if bucket else None
            if block is not None:
                self._cached_bytes -= cls
            self._live_bytes += cls
        if block is None:
            try:
                block = self._alloc(cls)
            except BaseException:
                with self._lock:
                    self._live_bytes -= cls
                raise
        buf = (ctypes.c_uint8 * cls).from_address(block.ptr)
        weakref.finalize(buf, self._release, block)
        return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)

    def _alloc(self, cls: int) -> _Block:
        cudart = _cudart()
        size = cls + _MIN_BLOCK  # room to align the start to a page
        try:
            ptr = _check(cudart.cudaHostAlloc(size, cudart.cudaHostAllocPortable), f"cudaHostAlloc({size})")
        except CapacityError:
            self.trim()  # give cached blocks back and try once more
            ptr = _check(cudart.cudaHostAlloc(size, cudart.cudaHostAllocPortable), f"cudaHostAlloc({size})")
        return _Block(int(ptr), cls)

    def _release(self, block: _Block) -> None:
        free_now = None
        with self._lock:
            self._live_bytes -= block.nbytes
            if self._cached_bytes + block.nbytes <= self.max_cached_bytes:
                self._free.setdefault(block.nbytes, []).append(block)
                self._cached_bytes += block.nbytes
            else:
                free_now = block
        if free_now is not None:
            _cudart().cudaFreeHost(free_now.base)

    def trim(self) -> int:
        """Return every cached block to the driver. Returns the bytes freed."""
        with self._lock:
            blocks = [b for bucket in self._free.values() for b in bucket]
            self._free.clear()
            self._cached_bytes = 0
        for b in blocks:
            _cudart().cudaFreeHost(b.base)
        return sum(b.nbytes for b in blocks)


class PinnedArena:
    """One page-locked region allocated up front and handed out in 4096-byte-aligned pieces.

    ``cudaHostAlloc`` locks pages and maps them for the GPU, which costs time on the host (the more so the
    larger the block) and is the wrong thing to do once per decode step: a :class:`~kvstream.HostTransport`
    that keeps every chunk cannot reuse freed blocks, so with the caching allocator each 2 MiB decode-step
    chunk paid a fresh ``cudaHostAlloc`` on the critical path. Serving systems size their host pool at
    start-up instead (vLLM's ``swap_space``, SGLang HiCache's host memory pool); so does this arena. Pieces
    are first-fit from a free list that coalesces neighbours on release.

    Parameters
    ----------
    capacity_bytes : int
        Bytes locked at construction (rounded up to 4096).

    Raises
    ------
    CapacityError
        If the driver cannot lock that much memory.

    Notes
    -----
    Without CUDA the arena is ordinary memory (same behaviour, nothing locked). Thread safe.
    """

    def __init__(self, capacity_bytes: int):
        cap = -(-int(capacity_bytes) // _MIN_BLOCK) * _MIN_BLOCK
        if cap <= 0:
            raise ValueError(f"PinnedArena capacity must be > 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = cap
        self._base_block: _Block | None = None
        if cuda_usable():
            self._base_block = _DEFAULT._alloc(cap)  # one cudaHostAlloc, page-aligned start
            self._buffer = (ctypes.c_uint8 * cap).from_address(self._base_block.ptr)
        else:
            self._buffer = (ctypes.c_uint8 * cap)()
        self._free: list[list[int]] = [[0, cap]]  # sorted [offset, size] runs
        self._used = 0
        self._lock = threading.Lock()
        weakref.finalize(self._buffer, PinnedArena._release_base, self._base_block)  # after the last piece

    @staticmethod
    def _release_base(block: "_Block | None") -> None:
        if block is not None:
            try:
                _cudart().cudaFreeHost(block.base)
            except Exception:  # interpreter shutdown
                pass

    @property
    def used_bytes(self) -> int:
        """Bytes handed out (rounded to 4096 per piece)."""
        return self._used

    def empty(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` bytes inside the arena (4096-aligned; contents undefined).

        The piece returns to the arena when the last tensor viewing it is freed.

        Raises
        ------
        CapacityError
            If no free run of the rounded size is left (full or fragmented).
        """
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"PinnedArena.empty: nbytes must be >= 0, got {nbytes}")
        size = max(-(-nbytes // _MIN_BLOCK) * _MIN_BLOCK, _MIN_BLOCK)
        with self._lock:
            for i, (off, run) in enumerate(self._free):
                if run >= size:
                    if run == size:
                        del self._free[i]
                    else:
                        self._free[i] = [off + size, run - size]
                    self._used += size
                    break
            else:
                raise CapacityError(f"PinnedArena: no free run of {size} bytes ({self._used} of "
                                    f"{self.capacity_bytes} in use, {len(self._free)} free runs)")
        view = (ctypes.c_uint8 * size).from_buffer(self._buffer, off)
        weakref.finalize(view, self._give_back, off, size)
        return torch.frombuffer(view, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)

    def _give_back(self, off: int, size: int) -> None:
        with self._lock:
            self._used -= size
            runs = self._free
            i = bisect.bisect_left(runs, [off, 0])
            runs.insert(i, [off, size])
            if i + 1 < len(runs) and runs[i][0] + runs[i][1] == runs[i + 1][0]:  # merge with the next run
                runs[i][1] += runs[i + 1][1]
                del runs[i + 1]
            if i > 0 and runs[i - 1][0] + runs[i - 1][1] == runs[i][0]:  # and with the previous one
                runs[i - 1][1] += runs[i][1]
                del runs[i]


_DEFAULT = PinnedAllocator()


def host_empty(shape: int | Sequence[int], dtype: torch.dtype = torch.uint8, *, pin: bool | None = None) -> torch.Tensor:
    """A host tensor of ``shape`` and ``dtype`` (contents undefined), 4096-byte aligned when pinned.

    Parameters
    ----------
    shape : int or sequence of int
        Elements per axis (an int: a 1-D tensor).
    dtype : torch.dtype
        Element type (default ``uint8``: bytes).
    pin : bool, optional
        ``True``: page-locked memory from the process-wide :class:`PinnedAllocator` (plain memory when no
        CUDA driver is present); ``False``: pageable memory; ``None`` (default): pinned exactly when a CUDA
        device is present, since page-locked memory pays only for host<->device copies.

    Raises
    ------
    CapacityError
        If the driver cannot lock more host memory.
    ValueError
        If a size is negative.

    Examples
    --------
    >>> buf = host_empty((2, 8, 1024, 128), torch.bfloat16)   # pinned when a GPU exists
    """
    shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"host_empty: negative size in shape {list(shape)}")
    if pin is None:
        pin = cuda_usable()
    numel = 1
    for s in shape:
        numel *= s
    if not pin or numel == 0:
        return torch.empty(shape, dtype=dtype)
    if dtype is torch.uint8 and len(shape) == 1:  # a transport's flat buffer: no views (each costs a torch call)
        return _DEFAULT.empty(numel)
    return _DEFAULT.empty(numel * dtype.itemsize).view(dtype).view(shape)


_same_address: bool | None = None


def pinned_is_device_addressable() -> bool:
    """Whether the GPU reaches this process's pinned host memory at its host address (unified virtual
    addressing: ``cudaHostGetDevicePointer`` of a ``cudaHostAlloc`` block returns the block's own address), so a
    kernel may be handed a pinned buffer's ``data_ptr()`` and write it directly. Asked of the driver once per
    process (one 4 KiB block); ``False`` without CUDA."""
    global _same_address
    if _same_address is None:
        if not cuda_usable():
            _same_address = False
        else:
            buf = _DEFAULT.empty(_MIN_BLOCK)
            dev = _check(_cudart().cudaHostGetDevicePointer(buf.data_ptr(), 0), "cudaHostGetDevicePointer")
            _same_address = int(dev) == buf.data_ptr()
    return _same_address


def default_allocator() -> PinnedAllocator:
    """The process-wide allocator behind :func:`host_empty` (for statistics and :meth:`trim`)."""
    return _DEFAULT


__all__ = ["cuda_usable", "size_class", "PinnedAllocator", "PinnedArena", "host_empty", "default_allocator",
           "pinned_is_device_addressable"]
