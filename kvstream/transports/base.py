"""The one small interface every transport implements (its calls return :mod:`kvstream.handles`).

A transport ships *packed chunks* (contiguous tensors, see :mod:`kvstream.layout`) to a destination
under a string key and brings them back. DéjàVuLib calls these two primitives ``flush`` and ``fetch``
(msr-fiddle/dejavu, ``cache_utils.h``: ``CacheManager::flush/fetch``).

Contract (checked by ``tests/transports/test_contract.py`` for every registered transport):

* ``flush(key, chunk)`` stores a copy of ``chunk`` under ``key`` and returns a
  :class:`~kvstream.handles.Handle`.
  ``chunk`` is a contiguous tensor on the CPU or a CUDA device.

  - For a **CUDA** chunk, every read the transport makes of ``chunk`` is enqueued on the *current CUDA
    stream* at the time of the call, so the caller may overwrite ``chunk`` with work enqueued later on
    that same stream (this is what lets the streamer reuse staging buffers without a host sync).
  - For a **CPU** chunk, the caller must leave ``chunk`` unchanged until ``handle.done()``.
  - Flushing an existing key replaces it atomically: a reader sees the old chunk or the new, never a mix.
* ``fetch(key, out)`` fills ``out`` (same shape and dtype as the stored chunk, CPU or CUDA, contiguous)
  and returns a :class:`~kvstream.handles.Handle`; the bytes are in ``out`` once ``handle.wait()`` returns.
  Raises :class:`~kvstream.errors.ChunkNotFound` for a missing key and
  :class:`~kvstream.errors.LayoutError` if ``out`` does not match; a checksum mismatch raises
  :class:`~kvstream.errors.CorruptChunkError` (from ``fetch`` or from ``wait``).
* ``describe(key)`` returns the stored chunk's :class:`~kvstream.chunk.ChunkHeader` so a reader can
  allocate ``out``; ``contains``, ``delete`` (``True`` if something was removed) and ``keys(prefix)``
  are what their names say; ``close()`` first completes the flushes already in flight, is idempotent,
  and every call after it raises ``TransportError``.
* Methods are safe to call from several threads at once.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Sequence

import torch

from ..chunk import ChunkHeader
from ..errors import LayoutError, TransportError
from ..handles import AllHandle, Handle
from ..layout import Region


class Transport(ABC):
    """Base class of every transport: see the module docstring for the contract.

    Subclasses implement the abstract methods; the batched ``flush_many``/``fetch_many`` loop over the
    single calls unless a subclass does better.
    """

    #: Short name used in CLI options and benchmark tables.
    name: str = "transport"
    #: Whether every read of a CUDA chunk that ``flush`` enqueues on the stream completes without another
    #: process (a local copy: HostTransport, DiskTransport). Then the streamer may make the compute stream wait
    #: for those reads, which bounds the packed chunks it holds on the GPU; never where a read waits on a peer
    #: (NCCL's send), since a dead peer would then stall the model.
    local_reads: bool = False

    def __init__(self) -> None:
        self._closed = False
        self._lock = threading.RLock()

    # -- the contract --------------------------------------------------------------------------------
    @abstractmethod
    def flush(self, key: str, chunk: torch.Tensor, region: Region | None = None,
              meta: dict | None = None) -> Handle:
        """Store a copy of the contiguous tensor ``chunk`` under ``key``.

        Parameters
        ----------
        key : str
            Destination key; ``/`` separates levels (``"req-42/seg000003/layer0007"``).
        chunk : torch.Tensor
            Contiguous, any supported dtype, on the CPU or a CUDA device.
        region : Region, optional
            Which part of a cache the chunk holds; kept in its header.
        meta : dict, optional
            Small JSON-able extras kept in its header.

        Raises
        ------
        LayoutError
            ``chunk`` is not contiguous or has an unsupported dtype.
        CapacityError
            The destination is full; nothing is stored.
        TransportError
            The transport is closed or failed.
        """

    @abstractmethod
    def fetch(self, key: str, out: torch.Tensor) -> Handle:
        """Fill ``out`` with the chunk stored under ``key``.

        Raises
        ------
        ChunkNotFound
            Nothing is stored under ``key``.
        LayoutError
            ``out`` does not have the stored shape and dtype, or is not contiguous.
        CorruptChunkError
            The stored bytes fail their checksum (may also come from ``wait()``).
        """

    @abstractmethod
    def describe(self, key: str) -> ChunkHeader:
        """The stored chunk's header (dtype, shape, region, ...). Raises ``ChunkNotFound``."""

    @abstractmethod
    def contains(self, key: str) -> bool:
        """Whether a complete chunk is stored under ``key``."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the chunk under ``key``; ``True`` if one was removed, ``False`` if none was there."""

    @abstractmethod
    def keys(self, prefix: str = "") -> list[str]:
        """Every stored key starting with ``prefix``, sorted."""

    def close(self) -> None:
        """Complete flushes in flight, then release resources. Idempotent; later calls raise ``TransportError``."""
        self._closed = True

    # -- conveniences --------------------------------------------------------------------------------
    def flush_many(self, items: Sequence[tuple[str, torch.Tensor]]) -> Handle:
        """Flush several ``(key, chunk)`` pairs; one handle for all."""
        return AllHandle([self.flush(k, c) for k, c in items])

    def fetch_many(self, items: Sequence[tuple[str, torch.Tensor]]) -> Handle:
        """Fetch several ``(key, out)`` pairs; one handle for all."""
        return AllHandle([self.fetch(k, o) for k, o in items])

    def fetch_new(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Allocate a tensor of the stored shape on ``device``, fetch into it and wait. Returns it."""
        h = self.describe(key)
        out = torch.empty(h.shape, dtype=h.dtype, device=device)
        self.fetch(key, out).wait()
        return out

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"{type(self).__name__} is closed")

    @staticmethod
    def _check_chunk(chunk: torch.Tensor, what: str = "chunk") -> None:
        if not isinstance(chunk, torch.Tensor):
            raise LayoutError(f"{what} must be a torch.Tensor, got {type(chunk).__name__}")
        if not chunk.is_contiguous():
            raise LayoutError(f"{what} must be contiguous (a packed chunk), got shape {list(chunk.shape)} "
                              f"strides {chunk.stride()}")

    def check_key(self, key: str) -> None:
        """Raise :class:`~kvstream.errors.LayoutError` unless this transport can store a chunk under ``key``.

        What ``flush`` checks first; callers that derive keys from a name (a cache's session) call it when
        they are built, so that a bad name fails there and not at the first flush. Transports with stricter
        keys override it (:class:`~kvstream.transports.disk.DiskTransport`: the key must map to a file safely).
        """
        self._check_key(key)

    @staticmethod
    def _check_key(key: str) -> None:
        if not isinstance(key, str) or not key or key.startswith("/") or ".." in key.split("/"):
            raise LayoutError(f"Invalid chunk key {key!r}: a non-empty relative string without '..' parts")

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Transport"]
