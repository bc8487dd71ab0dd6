"""Chunks kept in (pinned) host memory: DéjàVuLib's ``LocalCacheManager`` as a transport.

DéjàVu keeps every microbatch's KV in page-locked host memory and copies it with ``cudaMemcpyAsync``
(msr-fiddle/dejavu, ``cache_utils.cc``: ``LocalCacheManager::flush/fetch``); page-locked memory is what
lets those copies run asynchronously at full PCIe speed (54.7 GB/s pinned against 15.5 GB/s pageable,
device to host, measured on one H100 80GB over PCIe gen5 x16; the pinned figure is bench/NOTES.md's ceiling).

Each flush copies the chunk into a fresh buffer from :func:`kvstream.cuda.host_empty`
(cached ``cudaHostAlloc`` blocks) and swaps it in under a lock, so a replaced key flips from the old
buffer to the new one atomically and a reader never sees a mix. Old buffers that an asynchronous copy
still reads or writes are kept alive until that copy's CUDA event has fired.

Checksums: host chunks carry ``checksum="none"`` in their :class:`~kvstream.chunk.ChunkHeader`. Host
memory is not a medium that corrupts silently the way a disk or a network can, and hashing every chunk
(about 10-20 GB/s for xxh3 on one core) would cost more than the 50 GB/s PCIe copy it guards. A chunk
written on to disk gets its xxh3 there (:class:`~kvstream.transports.disk.DiskTransport`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import CapacityError, ChunkNotFound, ConfigError, LayoutError, TransportError
from ..chunk import NO_CHECKSUM, ChunkHeader, byte_view, chunk_header, meta_key
from ..layout import Region, check_packed
from ..cuda import (Event, PinnedArena, current_stream_handle, host_empty, memcpy_2d_async, memcpy_async,
                    pinned_is_device_addressable)
from ..handles import CompletedHandle, EventHandle, Handle
from .base import Transport
from .hostslots import ReadyEvents, Slot


class HostTransport(Transport):
    """Chunks in host memory (pinned when CUDA is available), with a capacity in bytes.

    Parameters
    ----------
    capacity_bytes : int
        Most payload bytes stored at once (the sum of ``chunk.numel() * chunk.element_size()`` over
        stored keys; the pinned allocator's rounding to size classes is not counted). A replaced key's
        old bytes count until the new chunk is in, so replacing needs room for both.
    pinned : bool, optional
        Keep chunks in page-locked memory. Default: ``torch.cuda.is_available()``.
    preallocate : bool
        Lock the whole capacity now, in one :class:`~kvstream.cuda.memory.PinnedArena`, instead of a
        ``cudaHostAlloc`` per new chunk. What a server wants: page-locking on the host's critical path
        made streaming decode steps 5% slower on an H200 (one fresh 2 MiB chunk per step). Chunks are
        rounded to 4096 bytes in the arena, which gets 2% + 1 MiB of room for that; a fragmented arena
        raises ``CapacityError`` like a full one.

    Raises
    ------
    ConfigError
        ``capacity_bytes`` negative or not an int, or ``pinned=True`` without CUDA.

    Notes
    -----
    * ``flush`` of a CUDA chunk enqueues one device-to-host copy on the current stream and returns an
      :class:`EventHandle`; of a CPU chunk, copies at once and returns a completed handle.
    * ``fetch`` into a CUDA ``out`` enqueues one host-to-device copy on the current stream (after the
      flush that stored the chunk, through its event) and returns an :class:`EventHandle`; into a CPU
      ``out``, copies at once.
    * :meth:`view` gives the stored bytes without a copy.
    * :meth:`flush_into` lets a kernel write a chunk straight into its stored buffer (zero-copy, when
      :attr:`zero_copy`): the streamer's decode-step chunks go that way (one launch and one event, no copy).
    * A flush's ready event goes back to a pool once it has fired (checked every :data:`~.hostslots.HARVEST` flushes) and
      is recorded again for a later flush: a handle kept long after its copy landed may then wait for a later
      copy, never for less than its own.

    Examples
    --------
    >>> t = HostTransport(capacity_bytes=1 << 20)
    >>> t.flush("req-42/layer0000", torch.arange(6, dtype=torch.float16).view(2, 3)).wait()
    >>> t.fetch_new("req-42/layer0000").tolist()
    [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    >>> t.used_bytes
    12
    """

    name = "host"
    local_reads = True  # the device-to-host copy

    def __init__(self, capacity_bytes: int, *, pinned: bool | None = None, preallocate: bool = False):
        super().__init__()
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ConfigError(f"HostTransport capacity_bytes must be an int >= 0, got {capacity_bytes!r}")
        cuda = torch.cuda.is_available()
        if pinned is None:
            pinned = cuda
        if pinned and not cuda:
            raise ConfigError("HostTransport(pinned=True) needs CUDA; torch.cuda.is_available() is False")
        self._capacity = capacity_bytes
        self._pinned = bool(pinned)
        self._slots: dict[str, Slot] = {}
        self._used = 0  # bytes of stored chunks
        self._reserved = 0  # bytes of flushes between their capacity check and their commit
        self._retired: list[Slot] = []  # replaced/deleted slots whose buffers a copy still touches
        self._headers: dict[tuple, ChunkHeader] = {}  # see _header
        self._ready = ReadyEvents()  # the flushes' ready events, recycled once fired
        # Preallocated: every chunk is carved from one pinned arena locked now, so no flush pays for
        # cudaHostAlloc (measured on an H200: that made streaming decode steps 5% slower end to end).
        self._arena = (PinnedArena(capacity_bytes + capacity_bytes // 50 + (1 << 20))
                       if preallocate and self._pinned and capacity_bytes else None)

    # -- accounting ----------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        """The capacity given at construction, in payload bytes."""
        return self._capacity

    @property
    def used_bytes(self) -> int:
        """Payload bytes of the chunks stored now (flushes in flight not counted until they are in)."""
        return self._used

    @property
    def pinned(self) -> bool:
        """Whether chunks live in page-locked memory."""
        return self._pinned

    @property
    def zero_copy(self) -> bool:
        """Whether a GPU kernel may write chunks straight into the stored buffers (:meth:`flush_into`): they are
        pinned, and the GPU reaches pinned memory at its host address
        (:func:`kvstream.cuda.memory.pinned_is_device_addressable`)."""
        return self._pinned and pinned_is_device_addressable()

    def _alloc(self, nbytes: int) -> torch.Tensor:
        if self._arena is not None:
            return self._arena.empty(nbytes)
        if self._pinned:
            return host_empty(nbytes, pin=True)
        return host_empty(nbytes, pin=False)

    def _retire(self, slot: Slot | None) -> None:
        """Drop a replaced/deleted slot, keeping its buffer while a copy uses it (call under the lock)."""
        if self._retired:
            self._retired = [s for s in self._retired if s.busy()]
        if slot is not None and slot.busy():
            self._retired.append(slot)

    def _header(self, dtype: torch.dtype, shape: Sequence[int], region: Region | None, meta: dict | None,
                chunk: torch.Tensor | None = None) -> ChunkHeader:
        """:func:`~kvstream.chunk.chunk_header` of a ``shape`` ``dtype`` chunk (``chunk`` itself, or a meta tensor),
        cached by (dtype, shape, region, :func:`~kvstream.chunk.meta_key`): its checks cost more host time than a
        decode step's copy, and a stream repeats a few headers."""
        mkey = meta_key(meta)
        sig = (dtype, tuple(shape), region, mkey)
        try:
            header = self._headers.get(sig) if mkey is not None else None
        except TypeError:  # an unhashable region: chunk_header refuses it
            mkey = None
            header = None
        if header is None:
            if chunk is None:
                chunk = torch.empty(tuple(shape), dtype=dtype, device="meta")
            header = chunk_header(chunk, region, meta, NO_CHECKSUM)
            if mkey is not None:  # a meta that has no key (nested, other types) is built (and checked) every time
                if len(self._headers) >= 4096:
                    self._headers.clear()
                self._headers[sig] = header
        return header

    # -- the contract --------------------------------------------------------------------------------
    def flush(self, key: str, chunk: torch.Tensor, region: Region | None = None,
              meta: dict | None = None) -> Handle:
        """Copy ``chunk`` into host memory under ``key``; see :meth:`Transport.flush`.

        Raises
        ------
        CapacityError
            ``used_bytes`` + in-flight flushes + this chunk would exceed ``capacity_bytes``; nothing is
            stored and a previous chunk under ``key`` stays.
        """
        self._check_open()
        self._check_key(key)
        self._check_chunk(chunk)

        def copy_in(buf: torch.Tensor) -> Event | None:
            """Copy ``chunk`` into the slot's ``buf``; the copy's event on a GPU (``None``: done)."""
            if chunk.is_cuda:  # one cudaMemcpyAsync on the current stream, then its event (no torch dispatch)
                stream = current_stream_handle(chunk.device)
                memcpy_async(buf, chunk, stream)  # contiguous, and as many bytes as buf: no byte view needed
                return self._ready.record(chunk.device, stream)
            buf.copy_(byte_view(chunk))
            return None

        return self._store(key, self._header(chunk.dtype, chunk.shape, region, meta, chunk), copy_in)

    def flush_rows(self, key: str, parts: Sequence[torch.Tensor], shape: Sequence[int], dtype: torch.dtype,
                   region: Region | None = None, meta: dict | None = None) -> Handle:
        """Store under ``key`` the chunk of ``shape`` and ``dtype`` whose bytes are ``parts`` one after the other,
        each copied straight into the stored buffer: no contiguous chunk is made first.

        Parameters
        ----------
        parts : sequence of torch.Tensor
            2-D ``[rows, cols]`` views of ``dtype`` on one device, dense along ``cols`` and with any row
            stride (a one-layer region of a ``[B, H, S, D]`` cache is ``[B*H, T*D]``:
            :func:`kvstream.streaming.direct.row_views`). On a GPU each part is one ``cudaMemcpy2DAsync``
            on the current stream, and one event follows them all; they are read after this returns, so
            they must not be written before the handle completes.
        shape, dtype, region, meta
            The chunk as :meth:`flush` would store it (its header: ``describe`` and ``fetch`` see a chunk
            like any other).

        Raises
        ------
        LayoutError
            If a part is not a 2-D view of ``dtype`` with dense rows, the parts span several devices, or
            their bytes are not the chunk's.
        CapacityError
            As :meth:`flush`.
        """
        self._check_open()
        self._check_key(key)
        device, nbytes = None, 0
        for p in parts:
            if p.dim() != 2 or p.dtype != dtype or (p.shape[1] > 1 and p.stride(1) != 1):
                raise LayoutError(f"flush_rows {key!r}: parts must be 2-D {dtype} views with dense rows, got "
                                  f"{list(p.shape)} {p.dtype} strides {p.stride()}")
            if device is not None and p.device != device:
                raise LayoutError(f"flush_rows {key!r}: parts on {device} and {p.device}")
            device, nbytes = p.device, nbytes + p.numel() * p.element_size()
        header = self._header(dtype, shape, region, meta)
        if nbytes != header.nbytes:
            raise LayoutError(f"flush_rows {key!r}: the parts hold {nbytes} bytes, a {list(shape)} {dtype} chunk "
                              f"{header.nbytes}")

        def copy_in(buf: torch.Tensor) -> Event | None:
            """Copy the parts one after the other into the slot's ``buf`` (a 2-D copy each); one event after
            them on a GPU (``None``: done)."""
            cuda = device is not None and device.type == "cuda"
            stream = current_stream_handle(device) if cuda else None
            at = 0
            for p in parts:
                n = p.numel() * p.element_size()
                memcpy_2d_async(buf[at:at + n].view(dtype).view(p.shape), p, stream)
                at += n
            return self._ready.record(device, stream) if cuda else None

        return self._store(key, header, copy_in)

    def flush_into(self, key: str, shape: Sequence[int], dtype: torch.dtype, write, *, device: torch.device,
                   region: Region | None = None, meta: dict | None = None) -> Handle:
        """Store under ``key`` the ``shape`` ``dtype`` chunk that ``write(buf)`` writes straight into the stored
        buffer: a kernel packs KV into pinned host memory over PCIe (zero-copy), with no chunk on the device and
        no copy after it. Needs :attr:`zero_copy` for a CUDA ``device``.

        Parameters
        ----------
        write : callable
            ``write(buf)``, ``buf`` a flat uint8 tensor of the chunk's bytes (page-aligned; pinned host memory
            whose address the GPU uses as is): enqueues on ``device``'s current stream what fills it
            (:meth:`kvstream.kernels.tokens.NewestPlan.run_into`), or fills it at once on the CPU. The
            handle's event is recorded after it on that stream.
        device : torch.device
            Where ``write`` runs: a CUDA device, or the CPU.
        shape, dtype, region, meta
            The chunk as :meth:`flush` would store it.

        Raises
        ------
        ConfigError
            ``device`` is CUDA and the buffers are not zero-copy (:attr:`zero_copy` is False).
        CapacityError
            As :meth:`flush`.
        """
        self._check_open()
        self._check_key(key)
        cuda = device.type == "cuda"
        if cuda and not self.zero_copy:
            raise ConfigError("HostTransport.flush_into on a GPU needs pinned, device-addressable buffers "
                              "(HostTransport.zero_copy is False)")
        header = self._header(dtype, shape, region, meta)

        def copy_in(buf: torch.Tensor) -> Event | None:
            """Let ``write`` fill the slot's ``buf``; the event after it on a GPU (``None``: done)."""
            write(buf)
            return self._ready.record(device, current_stream_handle(device)) if cuda else None

        return self._store(key, header, copy_in)

    def _store(self, key: str, header: ChunkHeader, copy_in) -> Handle:
        """Reserve ``header.nbytes``, let ``copy_in(buf)`` fill a new buffer (returns the copy's event, or
        ``None`` when done), and swap the slot in under ``key`` (the old one retired). Raises
        ``CapacityError`` with nothing stored when the bytes do not fit."""
        nbytes = header.nbytes
        with self._lock:
            self._check_open()
            if self._used + self._reserved + nbytes > self._capacity:
                raise CapacityError(
                    f"HostTransport full: chunk {key!r} needs {nbytes} bytes but {self._used} of "
                    f"{self._capacity} are in use and {self._reserved} reserved by flushes in flight "
                    f"({self._capacity - self._used - self._reserved} free)")
            self._reserved += nbytes
        try:
            buf = self._alloc(nbytes)
            event = copy_in(buf)
        except BaseException:
            with self._lock:
                self._reserved -= nbytes
            raise
        slot = Slot(header=header, buf=buf, ready=event)
        with self._lock:
            self._reserved -= nbytes
            if self._closed:
                slot.synchronize()
                raise TransportError(f"HostTransport was closed while chunk {key!r} was being flushed")
            old = self._slots.get(key)
            self._slots[key] = slot
            self._used += nbytes - (old.header.nbytes if old is not None else 0)
            self._retire(old)
            if event is not None:
                self._ready.watch(event, slot)
        return CompletedHandle() if event is None else EventHandle(event)

    def _slot(self, key: str) -> Slot:
        """The slot under ``key`` (call under the lock)."""
        self._check_open()
        self._check_key(key)
        slot = self._slots.get(key)
        if slot is None:
            raise ChunkNotFound(f"No chunk {key!r} in HostTransport ({len(self._slots)} keys stored)")
        return slot

    def fetch(self, key: str, out: torch.Tensor) -> Handle:
        """Copy the chunk under ``key`` into ``out``; see :meth:`Transport.fetch`."""
        self._check_chunk(out, "out")
        with self._lock:
            slot = self._slot(key)
            check_packed(out, slot.header.shape, slot.header.dtype, name=f"out for chunk {key!r}")
            if out.is_cuda:
                # Enqueue under the lock so that the slot cannot be retired before its use is recorded.
                stream = current_stream_handle(out.device)
                if slot.ready is not None:
                    slot.ready.wait(stream)
                memcpy_async(byte_view(out), slot.buf, stream)
                event = Event(out.device).record(stream)
                slot.uses = [e for e in slot.uses if not e.query()] + [event]
                return EventHandle(event)
        slot.wait_ready()  # our reference keeps ``slot.buf`` alive through the copy
        byte_view(out).copy_(slot.buf)
        return CompletedHandle()

    def fetch_many(self, items: Sequence[tuple[str, torch.Tensor]]) -> Handle:
        """Fetch several ``(key, out)`` pairs; into CUDA tensors of one device, every copy is enqueued under one
        lock on the current stream and one event follows them all (a batch of small chunks, such as a
        session's decode steps, costs one event instead of one per chunk). Otherwise as single fetches."""
        items = list(items)
        for _, out in items:
            self._check_chunk(out, "out")
        devices = {out.device for _, out in items}
        if len(devices) != 1 or not items[0][1].is_cuda:
            return super().fetch_many(items)
        device = items[0][1].device
        with self._lock:
            slots = [self._slot(key) for key, _ in items]
            for (key, out), slot in zip(items, slots):
                check_packed(out, slot.header.shape, slot.header.dtype, name=f"out for chunk {key!r}")
            stream = current_stream_handle(device)
            for (_, out), slot in zip(items, slots):
                if slot.ready is not None:
                    slot.ready.wait(stream)
                memcpy_async(byte_view(out), slot.buf, stream)
            event = Event(device).record(stream)
            for slot in slots:
                slot.uses = [e for e in slot.uses if not e.query()] + [event]
        return EventHandle(event)

    def view(self, key: str) -> torch.Tensor:
        """The stored chunk itself, without a copy: a CPU tensor of the stored dtype and shape.

        Waits for the flush that stored it (a host sync on its CUDA event, if any). Treat the result as
        read-only: writing into it changes the stored chunk. It keeps showing (and keeping alive) the
        bytes it was taken from after the key is replaced or deleted. If you copy out of it
        asynchronously, keep the tensor alive until that copy has finished.

        Raises
        ------
        ChunkNotFound
            Nothing is stored under ``key``.
        """
        with self._lock:
            slot = self._slot(key)
        slot.wait_ready()
        return slot.buf.view(slot.header.dtype).view(slot.header.shape)

    def describe(self, key: str) -> ChunkHeader:
        """The stored chunk's header (``checksum == "none"``). Raises ``ChunkNotFound``."""
        with self._lock:
            return self._slot(key).header

    def contains(self, key: str) -> bool:
        """Whether a chunk is stored under ``key``."""
        self._check_open()
        self._check_key(key)
        with self._lock:
            return key in self._slots

    def delete(self, key: str) -> bool:
        """Remove the chunk under ``key`` and free its bytes; ``True`` if one was there."""
        self._check_open()
        self._check_key(key)
        with self._lock:
            slot = self._slots.pop(key, None)
            if slot is None:
                return False
            self._used -= slot.header.nbytes
            self._retire(slot)
            return True

    def keys(self, prefix: str = "") -> list[str]:
        """Every stored key starting with ``prefix``, sorted."""
        self._check_open()
        with self._lock:
            return sorted(k for k in self._slots if k.startswith(prefix))

    def close(self) -> None:
        """Wait for copies in flight on stored buffers, then drop every chunk. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            slots = list(self._slots.values()) + self._retired
            self._slots.clear()
            self._retired = []
            self._used = 0
            self._ready.clear()
        for slot in slots:
            slot.synchronize()


__all__ = ["HostTransport"]
