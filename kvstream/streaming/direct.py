"""A region of the cache flushed with no pack: its rows copied straight from the cache into the transport.

A region of a ``[B, H, S, D]`` cache whose tokens are dense within each head (a contiguous cache, or any view
that keeps ``D``-element tokens back to back) is ``B*H`` rows of ``T*D`` elements per layer and K/V, ``S*D``
apart. ``cudaMemcpy2DAsync`` walks such rows in the copy engine, so a transport that takes rows
(:meth:`kvstream.HostTransport.flush_rows`) stores the packed chunk ``[L, 2, B, H, T, D]`` with one call per
layer and K/V: no pack kernel, no chunk on the GPU. DéjàVuLib packs first because its regions are
arbitrary; for whole-token rows the pack is one more launch and one more pass over the bytes (bench/NOTES.md:
``KVStreamer.scatter`` of 4 MiB chunks moved 18.6 GB/s against 52.3 GB/s for a plain copy, H200).

The copies read the cache after :meth:`~kvstream.streaming.streamer.KVStreamer.scatter` returns (in the
background on the side stream), where the pack took a snapshot in stream order: the region must not be
written until the handle completes. That is why it is asked for (``scatter(direct=True)``), not chosen.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..handles import Handle
from ..layout import Region

#: Most 2-D copies a direct flush may take (a region that splits into more row runs is packed instead).
MAX_PARTS = 256


def row_views(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], region: Region) -> list | None:
    """The bytes of ``region`` (resolved) in packed-chunk order, ``[L, 2, B, H, T, D]``, as 2-D views
    ``[rows, T*D]`` of the per-layer ``[B, H, S, D]`` tensors, each with dense rows.

    Returns ``None`` when a layer's region is not such rows (tokens not dense within a head, K and V of
    different head dims) or would take more than :data:`MAX_PARTS` copies.
    """
    b, h, t = region.batch, region.heads, region.tokens
    parts: list = []
    for l in region.layers:
        for x in (keys[l], values[l]):
            v = x[b.start:b.stop, h.start:h.stop, t.start:t.stop]
            nb, nh, nt, d = v.shape
            s0, s1, s2, s3 = v.stride()
            if (d > 1 and s3 != 1) or (nt > 1 and s2 != d) or d != keys[l].shape[3]:
                return None
            cols = nt * d
            if nb == 1 or nh == 1 or s0 == nh * s1:  # (batch row, head) pairs one stride apart
                parts.append(v.as_strided((nb * nh, cols), (s1 if nb == 1 or nh > 1 else s0, 1)))
            else:
                parts.extend(v[i].as_strided((nh, cols), (s1, 1)) for i in range(nb))
            if len(parts) > MAX_PARTS:
                return None
    return parts


def flush_direct(streamer: Any, key: str, parts: list, shape: Sequence[int], dtype: torch.dtype, region: Region,
                 meta: dict | None, background: bool) -> Handle:
    """Flush ``parts`` (:func:`row_views`) as the chunk ``shape``/``dtype`` through ``streamer``'s transport's
    ``flush_rows``: on the side stream behind an event on the compute stream when ``background`` (the parts
    held until the copies have read them), else on the current stream and waited for."""
    nbytes = sum(p.numel() for p in parts) * parts[0].element_size() if parts else 0

    def _flush() -> Handle:
        h = streamer.transport.flush_rows(key, parts, shape, dtype, region=region, meta=meta)
        streamer._count_out(nbytes)
        return h

    if streamer.side is None or not background:
        h = _flush()
        return streamer.inflight.track(h) if background else streamer._finish_sync(h)
    streamer._produced.record()  # on the compute stream, after the KV the parts view
    streamer.side.wait_event(streamer._produced)
    with streamer.side:
        h = _flush()
    streamer.inflight.keep_until_read(parts, h, nbytes=nbytes, bounded=streamer._local_reads)  # on the compute stream
    return streamer.inflight.track(h)


__all__ = ["MAX_PARTS", "flush_direct", "row_views"]
