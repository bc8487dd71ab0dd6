"""What the streaming floor needs of the objects it hands chunks to, as structural types.

A chunk leaves the streamer through a *transport* (:mod:`kvstream.transports`: every kvstream transport
subclasses :class:`kvstream.transports.base.Transport`, which has these methods and more); stream_out and
stream_in move chunks through a transport or through a *streamer*. Streaming depends on these shapes, not on
the transports package, so the floors stay in the order a chunk travels.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from ..handles import Handle
from ..layout import Region


@runtime_checkable
class ChunkTransport(Protocol):
    """The transport calls the streaming floor makes (the contract of :class:`kvstream.transports.base.Transport`)."""

    def flush(self, key: str, chunk: torch.Tensor, region: Region | None = None,
              meta: dict | None = None) -> Handle:
        """Store a copy of the contiguous ``chunk`` under ``key``."""

    def fetch(self, key: str, out: torch.Tensor) -> Handle:
        """Fill ``out`` with the chunk stored under ``key``."""

    def fetch_many(self, items: Sequence[tuple[str, torch.Tensor]]) -> Handle:
        """Fetch several ``(key, out)`` pairs; one handle for all."""

    def fetch_new(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """A new tensor holding the chunk stored under ``key``."""


@runtime_checkable
class WritableTransport(ChunkTransport, Protocol):
    """A transport whose stored buffers a pack may write itself (:class:`kvstream.transports.host.HostTransport`):
    the streamer's decode-step chunks skip the device chunk and the copy when ``zero_copy`` is true on a GPU
    (on the CPU, always)."""

    zero_copy: bool

    def flush_into(self, key: str, shape: Sequence[int], dtype: torch.dtype, write, *, device: torch.device,
                   region: Region | None = None, meta: dict | None = None) -> Handle:
        """Store the chunk that ``write(buf)`` writes into the new stored buffer ``buf`` (flat uint8)."""


@runtime_checkable
class Streams(Protocol):
    """What stream_out/stream_in need of a streamer (:class:`~kvstream.streaming.streamer.KVStreamer`):
    ``scatter`` (pack and flush a region) and ``gather`` (fetch and unpack one)."""

    def scatter(self, key: str, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], region: Region, *,
                meta: dict | None = None) -> Handle:
        """Pack ``region`` of the per-layer tensors and flush it under ``key``."""

    def gather(self, key: str, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
               region: Region) -> Handle:
        """Fetch the chunk under ``key`` and unpack it into ``region``."""


__all__ = ["ChunkTransport", "Streams", "WritableTransport"]
