"""The inbound half of the streamer: chunks fetched side by side into one staging buffer and unpacked into
the cache with one launch (:meth:`kvstream.streaming.streamer.KVStreamer.gather_many`, which documents it)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .. import kernels
from ..cuda import Event, Stream
from ..errors import LayoutError
from ..handles import CompletedHandle, Handle
from ..layout import Region, check_hf_layers


def gather_chunks(streamer: Any, chunk_keys: Sequence[str], keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                  region: Region, *, unpack_on: Stream | None = None, staging: torch.Tensor | None = None) -> Handle:
    """:meth:`KVStreamer.gather_many <kvstream.streaming.streamer.KVStreamer.gather_many>` through ``streamer``
    (its transport and counters); same parameters, result and errors."""
    region = check_hf_layers(keys, values, region)
    count, total = len(chunk_keys), len(region.tokens)
    if count == 0 or total % count:
        raise LayoutError(f"gather_many: {total} tokens do not split into {count} equal chunks")
    first = keys[region.layers.start]
    shape = list(region.packed_shape(first.shape[3], values[region.layers.start].shape[3]))
    tok = len(shape) - 2  # the token axis (the kv axis is there only when K and V share a head_dim)
    shape[tok] = total // count
    if staging is None:
        staging = torch.empty((count, *shape), dtype=first.dtype, device=first.device)
        own = True
    else:
        nbytes = count * first.element_size() * math.prod(shape)
        if staging.dtype != torch.uint8 or staging.numel() < nbytes or staging.device != first.device:
            raise LayoutError(f"gather_many: staging must be uint8 on {first.device} with >= {nbytes} bytes, got "
                              f"{staging.dtype} {staging.numel()} bytes on {staging.device}")
        staging = staging[:nbytes].view(first.dtype).view(count, *shape)
        own = False
    handle = streamer.transport.fetch_many([(k, staging[j]) for j, k in enumerate(chunk_keys)])
    with streamer._lock:
        streamer.stats.chunks_in += count
        streamer.stats.bytes_in += staging.numel() * staging.element_size()
    if not handle.stream_ordered:
        handle.wait()
    if unpack_on is None or not unpack_on.is_cuda:
        _unpack_staged(staging, shape, tok, total, keys, values, region)
        return CompletedHandle()
    unpack_on.wait_event(Event(first.device).record())  # after the fetch on the current stream
    with unpack_on:
        _unpack_staged(staging, shape, tok, total, keys, values, region)
    if own:
        staging.record_stream(unpack_on.torch_stream)  # read there: not reused before that stream is past it
    return CompletedHandle()


def _unpack_staged(staging: torch.Tensor, shape: list, tok: int, total: int, keys, values, region: Region) -> None:
    if staging.shape[0] == 1:
        chunk = staging[0]
    else:  # [J, ..., n, d] -> [..., J, n, d] -> [..., J * n, d]
        order = [*range(1, tok + 1), 0, *range(tok + 1, len(shape) + 1)]
        shape[tok] = total
        chunk = staging.permute(*order).contiguous().view(shape)
    kernels.unpack_tokens(chunk, keys, values, region)


__all__ = ["gather_chunks"]
