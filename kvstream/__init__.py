"""kvstream: fast KV-cache streaming for LLM inference.

The path of one KV chunk, by package:

``layout`` (what a region of KV is) → ``chunk`` (its bytes: header, checksum, wire frame) → ``kernels``
(pack it into a contiguous chunk) → ``streaming`` (the layer-by-layer streamer, placement, sessions) →
``transports`` (ship it: host memory, disk, NCCL, a remote host) → ``stores`` (keep and find it: radix
tree, token-chunk hashes) → ``integrations`` (the Hugging Face ``generate`` hook) → ``serving``.
``cuda`` (streams, events, pinned memory) is the ground floor under all of them.

Public names are imported lazily, so ``import kvstream`` stays cheap and works without a GPU.

Example
-------
>>> import kvstream
>>> transport = kvstream.HostTransport(capacity_bytes=1 << 30)   # doctest: +SKIP
>>> cache = kvstream.StreamingCache(config=model.config, transport=transport, session="req-42")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib

from .errors import (CapacityError, ChunkNotFound, ConfigError, CorruptChunkError, KVStreamError, LayoutError,
                     PeerError, TransportError)
from .chunk import ChunkHeader
from .layout import KVLayout, Region

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "HostTransport": "kvstream.transports.host",
    "DiskTransport": "kvstream.transports.disk",
    "NcclTransport": "kvstream.transports.nccl",
    "RemoteHostTransport": "kvstream.transports.remote",
    "Transport": "kvstream.transports.base",
    "KVStreamer": "kvstream.streaming.streamer",
    "StreamingCache": "kvstream.integrations.hf.cache",
    "StreamingStaticCache": "kvstream.integrations.hf.static",
    "cache_kwargs": "kvstream.integrations.hf.keywords",
    "cache_keyword": "kvstream.integrations.hf.keywords",
    "RadixStore": "kvstream.stores.radix",
    "ChunkFileStore": "kvstream.stores.chunk_file",
    "TieredStore": "kvstream.stores.tiered",
    "PrefixStore": "kvstream.stores.base",
    "load_prefix_into": "kvstream.integrations.hf.prefix",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvstream' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "KVStreamError", "ConfigError", "LayoutError", "TransportError", "ChunkNotFound", "CorruptChunkError",
    "CapacityError", "PeerError", "Region", "KVLayout", "ChunkHeader", *_LAZY,
]
