"""The streamer: DéjàVuLib's primitives — scatter/gather, flush/fetch, stream_out/stream_in — and its levels.

Source: DéjàVuLib (msr-fiddle/dejavu, ``src/fastertransformer/utils/cache_utils.cc``; paper §4 and Fig. 7).

* ``flush``/``fetch`` copy one contiguous chunk through the transport.
* ``scatter`` packs a non-contiguous region of the KV cache into one contiguous chunk (a Triton kernel,
  :mod:`kvstream.kernels`) and flushes it; ``gather`` fetches a chunk and unpacks it into the cache.
* ``stream_out``/``stream_in`` decide which region goes to or comes from which peer when the source and
  destination parallel layouts differ (:mod:`kvstream.streaming.placement`).

Levels (argument ``level`` or environment ``KVSTREAM_LEVEL``), as DéjàVuLib's ``DEJAVULIB_BASELINE``:

===== ============== ============================================================================
level name           what happens
===== ============== ============================================================================
0     naive          one copy per contiguous row (per layer, K/V, batch row, head), synchronous
1     buffered       pack into one chunk, one copy, synchronous
2     layer-by-layer 1 + prompt KV streamed per layer on a side stream while later layers compute
3     all (default)  2 + decode steps streamed in the background (the copy on the side stream, or the
                     pack straight into a writable transport's buffer: :mod:`.inplace`)
===== ============== ============================================================================

Every level lands the same bytes under the same keys; only the timing differs.

Where the work runs: the pack kernel runs **in order on the compute stream** and only the copy runs on
the side stream, in the copy engine; level 3 is background on the side stream, not on a thread (a pack
on a side stream takes SMs from the model's GEMMs, a thread fights for the GIL: bench/NOTES.md, "The
streaming overhead investigation").

Ordering on a GPU (level >= 2): the chunk is packed on the current (compute) stream, right after the
KV it reads, so its inputs need no lifetime tracking. The side stream then waits for an event recorded
after the pack and the transport's copy runs there; the streamer keeps the packed chunk referenced until
an event after that copy has fired (the flush handle's own event where it has one), so the caching
allocator cannot hand its memory to new compute work while the copy still reads it (``record_stream``'s
guarantee without its cost; :mod:`.inflight`). When the transport's reads are local
(``Transport.local_reads``), at most ``inflight.HOLD_BYTES`` (256 MiB) stay held that way: for older chunks
the compute stream waits for the copy's event, a layer or more after it finished, so the chunks on the GPU
stay bounded while the host runs ahead of a prefill. Otherwise (NCCL: a read may wait on a peer) the compute
stream never waits for the side stream.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .. import kernels
from ..chunk import with_head_dims
from ..errors import ConfigError, LayoutError
from ..layout import Region, check_hf_layers
from ..cuda import Event, Stream, side_stream
from ..handles import CompletedHandle, Handle
from .levels import copy_rows, resolve_level
from .direct import flush_direct, row_views
from .inplace import planned_in_place, positions_in_place
from .gather import gather_chunks
from .inflight import InFlight
from .handoff import stream_in, stream_out
from .placement import Placement
from .protocols import ChunkTransport, WritableTransport


@dataclass
class StreamStats:
    """What a streamer moved: chunks and bytes out (flushed) and in (fetched)."""

    chunks_out: int = 0
    bytes_out: int = 0
    chunks_in: int = 0
    bytes_in: int = 0
    row_copies: int = 0  # level-0 copies issued
    by_kind: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """A plain dict of the counters."""
        return {"chunks_out": self.chunks_out, "bytes_out": self.bytes_out, "chunks_in": self.chunks_in,
                "bytes_in": self.bytes_in, "row_copies": self.row_copies}


class KVStreamer:
    """Moves regions of an HF-layout KV cache through a transport, at one of DéjàVuLib's four levels.

    Parameters
    ----------
    transport : Transport
        Where chunks go (:class:`~kvstream.HostTransport`, :class:`~kvstream.DiskTransport`, ...): a
        :class:`kvstream.transports.base.Transport` (the streamer uses its :class:`ChunkTransport` calls).
    level : int or str, optional
        0-3 (see the module docstring); default ``KVSTREAM_LEVEL`` or 3.
    device : torch.device or str, optional
        The GPU whose KV is streamed; a side stream is created on it. ``None``: the current CUDA device
        if there is one, else the CPU (everything synchronous).

    Examples
    --------
    >>> streamer = KVStreamer(kvstream.HostTransport(capacity_bytes=1 << 30))          # doctest: +SKIP
    >>> region = Region(layers=range(0, 32), tokens=range(0, 1500))
    >>> streamer.scatter("req-1/prompt", keys, values, region)                          # doctest: +SKIP
    >>> streamer.wait()
    >>> streamer.gather("req-1/prompt", keys2, values2, region).wait()                  # doctest: +SKIP
    """

    def __init__(self, transport: ChunkTransport, *, level: int | str | None = None,
                 device: torch.device | str | None = None):
        if not isinstance(transport, ChunkTransport):
            raise ConfigError(f"KVStreamer needs a kvstream Transport, got {type(transport).__name__}")
        self.transport = transport
        self.level = resolve_level(level)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.side = side_stream(self.device, "kvstream-stream-out") if self.device.type == "cuda" else None
        self._produced = Event(self.device) if self.side is not None else None  # re-recorded per chunk
        self.stats = StreamStats()
        self.inflight = InFlight(self.side)  # chunks in flight, and the packed ones held until read
        self._lock = threading.Lock()
        self._position_plans: dict = {}  # scatter_positions' plans by chunk geometry (detached: no tensors)
        # a transport whose buffers a pack may write (HostTransport: pinned on a GPU): planned packs go straight there
        # its reads complete without a peer: the chunks held until read are bounded (.inflight.HOLD_BYTES)
        self._local_reads = bool(getattr(transport, "local_reads", False))
        self._zero_copy = isinstance(transport, WritableTransport) and (self.device.type == "cpu" or transport.zero_copy)

    # ------------------------------------------------------------------------------------------------
    # flush / fetch: one contiguous chunk
    # ------------------------------------------------------------------------------------------------
    def flush(self, key: str, chunk: torch.Tensor, region: Region | None = None, meta: dict | None = None) -> Handle:
        """Flush one contiguous chunk through the transport (see :meth:`kvstream.transports.base.Transport.flush`)."""
        h = self.transport.flush(key, chunk, region=region, meta=meta)
        self._count_out(chunk.numel() * chunk.element_size())
        return h

    def _count_out(self, nbytes: int) -> None:
        with self._lock:
            self.stats.chunks_out += 1
            self.stats.bytes_out += nbytes

    def fetch(self, key: str, out: torch.Tensor) -> Handle:
        """Fetch one contiguous chunk into ``out`` (see :meth:`kvstream.transports.base.Transport.fetch`)."""
        h = self.transport.fetch(key, out)
        with self._lock:
            self.stats.chunks_in += 1
            self.stats.bytes_in += out.numel() * out.element_size()
        return h

    # ------------------------------------------------------------------------------------------------
    # scatter / gather: a region of the cache
    # ------------------------------------------------------------------------------------------------
    def scatter(self, key: str, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], region: Region, *,
                meta: dict | None = None, background: bool | None = None, direct: bool = False) -> Handle:
        """Pack ``region`` of the per-layer tensors into one chunk and flush it under ``key``.

        Parameters
        ----------
        keys, values : sequence of torch.Tensor
            Per-layer ``[batch, kv_heads, seq, head_dim]`` tensors (any strides, ``head_dim`` contiguous),
            on this streamer's device.
        region : Region
            What to send; the chunk is ``region.packed_shape(head_dim, head_dim_v)`` (the keys' and the values'
            head dims; the chunk's meta records them when they differ: :data:`kvstream.chunk.HEAD_DIMS`).
        background : bool, optional
            Run on the side stream without blocking (default: ``level >= 2``). Levels 0 and 1 always
            block until the chunk has landed.
        direct : bool
            Copy the region's rows straight from ``keys``/``values`` into the transport, no pack
            (:mod:`kvstream.streaming.direct`), when the transport takes rows and the region's tokens are
            dense within each head (levels 1-3); otherwise packed as usual. The copies read the tensors
            after this returns: the region must not be written until the handle completes.

        Returns
        -------
        Handle
            Completes when the chunk has landed at the destination.

        Raises
        ------
        LayoutError
            If the tensors do not fit the region.
        """
        region = check_hf_layers(keys, values, region)
        meta = with_head_dims(meta, keys[region.layers.start].shape[3], values[region.layers.start].shape[3])
        if self.level == 0:
            chunk = self._naive(keys, values, region, [region.tokens.start] * len(region.layers))
            return self._finish_sync(self.flush(key, chunk, region=region, meta=meta))
        if background is None:
            background = self.level >= 2
        if direct and hasattr(self.transport, "flush_rows"):
            parts = row_views(keys, values, region)
            if parts is not None:
                return flush_direct(self, key, parts, region.packed_shape(keys[region.layers.start].shape[3]),
                                    keys[region.layers.start].dtype, region, meta, background and self.level >= 2)
        return self._pack_and_flush(key, lambda: kernels.pack_resolved(keys, values, region), region, meta,
                                    background and self.level >= 2)

    def scatter_newest(self, key: str, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *,
                       num_tokens: int = 1, layers: range | None = None, meta: dict | None = None,
                       background: bool | None = None) -> Handle:
        """Pack the newest ``num_tokens`` tokens of every layer (one launch) and flush them as one chunk.

        This is DéjàVuLib's token path: after a decode step, the step's KV of all local layers goes out in a
        single chunk ``[L, 2, B, H, num_tokens, D]`` (``[L, B, H, num_tokens, Dk + Dv]`` for K and V of
        different head dims). Layer ``l``'s newest tokens are ``[seq_l - num_tokens, seq_l)``, so layers of
        different lengths (sliding windows) are fine.

        ``background`` defaults to ``level == 3`` (decode steps stream in the background only at level 3).
        """
        layers = range(0, len(keys)) if layers is None else layers
        b, h, _, d = keys[layers.start].shape
        meta = with_head_dims(meta, d, values[layers.start].shape[-1])
        if self.level == 0:
            region = Region(layers=layers, tokens=(0, num_tokens), batch=(0, b), heads=(0, h))
            starts = [keys[l].shape[2] - num_tokens for l in layers]
            chunk = self._naive(keys, values, region, starts)
            return self._finish_sync(self.flush(key, chunk, meta=meta))
        if background is None:
            background = self.level >= 3
        return self._pack_and_flush(
            key, lambda: kernels.pack_newest(keys, values, num_tokens=num_tokens, layers=layers), None, meta,
            background and self.level >= 3)

    def scatter_step(self, key: str, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *,
                     meta: dict | None = None, background: bool | None = None) -> Handle:
        """Flush a decode step's new KV — per-layer tensors that hold exactly the step's new tokens — as one
        chunk: the one :meth:`scatter_newest` makes from them, packed by a single ``torch.stack``.

        A decode step's ``key_states``/``value_states`` are fresh tensors every step: one torch call stacks
        them, where a pointer-table pack would be re-pointed at 2L new addresses (bench/NOTES.md).

        Parameters
        ----------
        keys, values : sequence of torch.Tensor
            ``L`` tensors each, ``[B, H, n, D]`` (any strides), one shape, dtype and device.
        meta, background
            As in :meth:`scatter_newest`.

        Returns
        -------
        Handle
            As :meth:`scatter_newest`; the chunk is ``[L, 2, B, H, n, D]``. K and V of different head dims
            go through :meth:`scatter_newest` (its ``[L, B, H, n, Dk + Dv]`` chunk).

        Raises
        ------
        LayoutError
            If the tensors differ in shape, dtype or device, or ``keys`` and ``values`` differ in count.
        """
        first = keys[0]
        if len(keys) != len(values) or first.dim() != 4 or values[0].shape[-1] != first.shape[-1] or self.level == 0:
            if len(keys) != len(values):
                raise LayoutError(f"scatter_step: {len(keys)} key tensors but {len(values)} value tensors")
            return self.scatter_newest(key, keys, values, num_tokens=first.shape[-2], meta=meta, background=background)
        dtype = first.dtype
        parts = [t for pair in zip(keys, values) for t in pair]
        for t in parts:
            if t.dtype is not dtype:
                raise LayoutError(f"scatter_step: tensors of dtypes {dtype} and {t.dtype}")
        b, h, n, d = first.shape

        def _pack() -> torch.Tensor:
            try:
                return torch.stack(parts).view(len(keys), 2, b, h, n, d)
            except RuntimeError as e:  # shapes or devices that differ
                raise LayoutError(f"scatter_step: per-layer tensors must share one shape and device: {e}") from None

        if background is None:
            background = self.level >= 3
        return self._pack_and_flush(key, _pack, None, meta, background and self.level >= 3)

    def scatter_positions(self, key: str, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], start: int,
                          *, num_tokens: int, meta: dict | None = None, background: bool | None = None) -> Handle:
        """Flush positions ``[start, start + num_tokens)`` of every layer as one chunk: the chunk
        :meth:`scatter_step` makes from the layers' narrowed views (a dynamic cache's pending decode steps,
        :mod:`kvstream.integrations.hf.tail`).

        At level 3 into a :class:`~.protocols.WritableTransport`, one pointer-table pack pointed at the layers
        as they are writes the stored chunk itself (:func:`.inplace.positions_in_place`); otherwise (other
        transports and levels, tensors its plan does not fit) :meth:`scatter_step` of the narrowed views.

        Parameters
        ----------
        keys, values : sequence of torch.Tensor
            ``L`` tensors each, ``[B, H, S_l, D]`` (``S_l >= start + num_tokens``; any strides), one batch,
            heads, dtype and device; the values' head dim may differ from the keys'.
        meta, background
            As in :meth:`scatter_newest`.

        Returns
        -------
        Handle
            As :meth:`scatter_step`.

        Raises
        ------
        LayoutError
            If the tensors differ in shape, dtype or device, or the positions fall outside one.
        """
        n = num_tokens
        if background is None:
            background = self.level >= 3
        if background and self.level >= 3 and self._zero_copy and keys and len(keys) == len(values):
            self.inflight.release_read()
            h = positions_in_place(self, self._position_plans, key, keys, values, start, n, meta)
            if h is not None:
                return h
        return self.scatter_step(key, [k.narrow(2, start, n) for k in keys], [v.narrow(2, start, n) for v in values],
                                 meta=meta, background=background)

    def scatter_planned(self, key: str, plan, start: int, *, meta: dict | None = None,
                        background: bool | None = None) -> Handle:
        """Pack positions ``[start, start + n)`` of every layer of a :func:`kvstream.kernels.plan_newest` plan
        (one launch, no per-layer host work) and flush them as one ``[L, 2, B, H, n, D]`` chunk.

        The static-cache token path: the same chunk :meth:`scatter_newest` makes from a decode step's new
        KV, read instead from buffers whose addresses never change. ``background`` defaults to
        ``level == 3``; level 0 copies row by row like :meth:`scatter_newest`.

        At level 3 into a :class:`~.protocols.WritableTransport` the pack writes the stored chunk itself on the
        current stream (:func:`.inplace.planned_in_place`: no chunk on the device, no side stream).

        Raises
        ------
        LayoutError
            If the positions fall outside the planned tensors.
        """
        n = plan.num_tokens
        meta = with_head_dims(meta, *plan.head_dims)
        if self.level == 0:
            b, h = plan.keys[0].shape[0], plan.keys[0].shape[1]
            region = Region(layers=(0, len(plan.keys)), tokens=(start, start + n), batch=(0, b), heads=(0, h))
            chunk = self._naive(plan.keys, plan.values, region, [start] * len(plan.keys))
            return self._finish_sync(self.flush(key, chunk, meta=meta))
        if background is None:
            background = self.level >= 3
        if background and self.level >= 3 and self._zero_copy and hasattr(plan, "run_into"):
            self.inflight.release_read()
            return planned_in_place(self, key, plan, start, meta)  # one launch and one event (.inplace)
        return self._pack_and_flush(key, lambda: plan.run(start), None, meta, background and self.level >= 3)

    def gather(self, key: str, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], region: Region) -> Handle:
        """Fetch the chunk under ``key`` and unpack it into ``region`` of the per-layer tensors.

        Parameters
        ----------
        keys, values : sequence of torch.Tensor
            Per-layer ``[batch, kv_heads, seq, head_dim]`` tensors (any strides, ``head_dim`` contiguous),
            written in place; ``seq >= region.tokens.stop``.
        region : Region
            Where the chunk goes; the stored chunk must be ``region.packed_shape(head_dim, head_dim_v)``.

        Returns
        -------
        Handle
            Already complete: the unpack is enqueued on the current stream (work enqueued later on that
            stream sees the data). A fetch that the transport enqueues on the current stream (host memory
            into a CUDA tensor) costs no host wait; others are waited for before the unpack.

        Raises
        ------
        ChunkNotFound, CorruptChunkError, PeerError
            From the transport's ``fetch``.
        LayoutError
            If the stored chunk's shape or dtype does not fit the region.
        """
        return self.gather_many([key], keys, values, region)

    def gather_many(self, chunk_keys: Sequence[str], keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                    region: Region, *, unpack_on: Stream | None = None, staging: torch.Tensor | None = None) -> Handle:
        """Fetch chunks that hold consecutive, equal slices of ``region``'s tokens and unpack them with one launch.

        DéjàVuLib's gather fetches a long range in pieces; here the pieces are, for example, the decode
        steps of a session: chunk ``j`` holds tokens ``[t0 + j*n, t0 + (j+1)*n)`` of every layer of the
        region (``n = len(region.tokens) / len(chunk_keys)``). They land side by side in one staging buffer
        ``[J, L, 2, B, H, n, D]``, one device copy puts them in packed order, and one unpack writes them.

        ``unpack_on`` (a CUDA :class:`~kvstream.cuda.Stream`): the reorder and unpack run there, behind an
        event after the fetch, so that the current stream's next fetch does not queue behind them (a
        session load's copies stay back to back; the caller records its layer events on ``unpack_on``).
        Without it, they run on the current stream after the fetch.

        ``staging`` (``uint8``, on the KV device, at least the chunks' bytes): land the chunks there instead of
        in a fresh allocation. The caller owns it and orders its reuse after this call's unpack (an event on
        ``unpack_on``); a session load cycles two such buffers rather than allocating one per chunk.

        Raises
        ------
        LayoutError
            If the region's tokens do not split evenly over the chunks, or a chunk does not fit its slice.
        ChunkNotFound, CorruptChunkError, PeerError
            From the transport's ``fetch``.
        """
        return gather_chunks(self, chunk_keys, keys, values, region, unpack_on=unpack_on, staging=staging)

    # ------------------------------------------------------------------------------------------------
    # stream_out / stream_in: placement across parallel layouts
    # ------------------------------------------------------------------------------------------------
    def stream_out(self, placement: Placement, rank: int, keys: Sequence[torch.Tensor],
                   values: Sequence[torch.Tensor], *, session: str, tokens: range | tuple[int, int],
                   batch: range | tuple[int, int] | None = None, meta: dict | None = None) -> Handle:
        """Send this rank's KV to the destination ranks that own it, through this streamer; see
        :func:`kvstream.streaming.handoff.stream_out`."""
        return stream_out(self, placement, rank, keys, values, session=session, tokens=tokens, batch=batch, meta=meta)

    def stream_in(self, placement: Placement, rank: int, keys: Sequence[torch.Tensor],
                  values: Sequence[torch.Tensor], *, session: str, tokens: range | tuple[int, int],
                  batch: range | tuple[int, int] | None = None) -> Handle:
        """Receive this rank's KV from the source ranks, through this streamer; see
        :func:`kvstream.streaming.handoff.stream_in`."""
        return stream_in(self, placement, rank, keys, values, session=session, tokens=tokens, batch=batch)

    # ------------------------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until every chunk flushed so far has landed; raise the first error."""
        self.inflight.wait()

    def close(self) -> None:
        """Wait for outstanding chunks (the transport stays open; the shared side stream lives on)."""
        self.wait()

    # ------------------------------------------------------------------------------------------------
    def _naive(self, keys, values, region: Region, starts: Sequence[int]) -> torch.Tensor:
        """Level 0: the region copied row by row into a host chunk (:func:`copy_rows`), counted."""
        chunk, copies = copy_rows(keys, values, region, starts)
        with self._lock:
            self.stats.row_copies += copies
        return chunk

    def _finish_sync(self, h: Handle) -> Handle:
        h.wait()
        return CompletedHandle()

    def _pack_and_flush(self, key, pack, region, meta, background: bool) -> Handle:
        chunk = pack()  # in order on the current stream, after the KV it reads
        if self.side is None or not background:
            h = self.flush(key, chunk, region=region, meta=meta)
            if not background:
                return self._finish_sync(h)
            return self.inflight.track(h)
        self._produced.record()  # on the compute stream, after the pack
        self.side.wait_event(self._produced)
        with self.side:
            h = self.flush(key, chunk, region=region, meta=meta)
        self.inflight.keep_until_read([chunk], h, nbytes=chunk.numel() * chunk.element_size(),
                                      bounded=self._local_reads)  # on the compute stream
        return self.inflight.track(h)


__all__ = ["KVStreamer", "StreamStats"]
