"""The exceptions kvstream raises.

Every error derives from :class:`KVStreamError`, so callers can catch the family at once. Errors about
bad input also derive from the builtin a Python user expects (``ValueError``, ``KeyError``), so
``except KeyError`` around ``transport.fetch`` works as it does around a dict lookup.

Hierarchy::

    KVStreamError
    ├── ConfigError            (ValueError)  a bad argument, option or environment setting
    ├── LayoutError            (ValueError)  a tensor's shape, dtype, stride or device does not fit the layout
    ├── CudaError              (RuntimeError) a CUDA runtime call failed (stream, event, copy)
    └── TransportError                       a flush or fetch could not be carried out
        ├── ChunkNotFound      (KeyError)    no chunk is stored under the key
        ├── CorruptChunkError                a stored chunk fails its header or checksum check
        ├── CapacityError                    the transport or store is full (host capacity, a full disk)
        └── PeerError                        a remote peer is dead, hung or closed the connection
"""

from __future__ import annotations


class KVStreamError(Exception):
    """Base class of every error raised by kvstream."""


class ConfigError(KVStreamError, ValueError):
    """A bad argument, option or environment setting (for example ``KVSTREAM_LEVEL=7``)."""


class LayoutError(KVStreamError, ValueError):
    """A tensor does not fit the layout it was declared with: shape, dtype, stride or device."""


class CudaError(KVStreamError, RuntimeError):
    """A CUDA runtime call (through cuda-python) returned an error: stream, event, copy or host allocation."""


class TransportError(KVStreamError):
    """A flush or fetch could not be carried out. Subclasses say why."""


class ChunkNotFound(TransportError, KeyError):
    """No chunk is stored under the key. Also a ``KeyError``."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "chunk not found"


class CorruptChunkError(TransportError):
    """A stored chunk is truncated, has a bad header, or its payload fails the checksum."""


class CapacityError(TransportError):
    """The destination is full: a host transport past its capacity, or a disk with no space left.

    Nothing partial is left visible when this is raised.
    """


class PeerError(TransportError):
    """A remote peer is dead, timed out or closed the connection."""


__all__ = [
    "KVStreamError",
    "ConfigError",
    "LayoutError",
    "CudaError",
    "TransportError",
    "ChunkNotFound",
    "CorruptChunkError",
    "CapacityError",
    "PeerError",
]
