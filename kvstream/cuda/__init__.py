"""CUDA on the ground floor: streams, events and async copies (:mod:`.streams`), pinned host memory
(:mod:`.memory`), all through cuda-python and all inert on a machine without a GPU, so every floor above
has one code path for CPU and CUDA tensors."""

from __future__ import annotations

from .memory import (PinnedAllocator, PinnedArena, cuda_usable, default_allocator, host_empty,
                     pinned_is_device_addressable, size_class)
from .streams import (Event, Stream, current_stream_handle, memcpy_2d_async, memcpy_async, side_stream,
                      stream_handle)

__all__ = ["Stream", "Event", "memcpy_async", "memcpy_2d_async", "stream_handle", "current_stream_handle", "side_stream", "cuda_usable",
           "size_class", "PinnedAllocator", "PinnedArena", "host_empty", "default_allocator", "pinned_is_device_addressable"]
