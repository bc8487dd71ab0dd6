"""Replay a session: its manifest and chunks back into per-layer KV tensors, layer by layer where it can.

Before anything is allocated, every chunk the replay will read has its header checked against the
manifest (:func:`check_chunks`): the run that wrote it, the model, and the shape and dtype the manifest
claims. So a session whose name a later run reused is refused rather than replayed over the other run's
chunks, and a small manifest cannot make the replay allocate what no stored chunk holds. The check runs
again after the reads: a chunk replaced in between (a new run streaming under the name while the old
session loads) fails it, so the reads got the bytes the first check vouched for.

Every chunk goes through :meth:`KVStreamer.gather <kvstream.streaming.streamer.KVStreamer.gather>`
(fetch into staging on the KV device, unpack with the kernels), so a load has the streamer's stats and
its kernels. On a GPU the copies run on a side stream, the unpacks on another behind them, and each layer
gets an event: a model that waits for layer ``l``'s event only starts computing while later layers still
travel.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..cuda import Event, side_stream
from ..errors import CorruptChunkError
from ..layout import Region, packed_kv_shape
from .layerwise import LayerwiseLoad
from .session import MODEL_META, RUN_META, Crop, Manifest, Prefill, Repeat, Rows, Segment, Step
from .streamer import KVStreamer

#: Name of the process-wide side stream (:func:`kvstream.cuda.side_stream`) session loads copy on.
LOAD_STREAM = "kvstream-session-load"
#: The side stream a layer-wise session load unpacks on, so that its copies run back to back.
UNPACK_STREAM = "kvstream-session-unpack"
#: Most rows a session's batch may grow to, as a multiple of its first batch (``generate`` expands by
#: ``num_beams * num_return_sequences``, far below): a repeat or selection past it is a corrupt manifest.
MAX_ROW_GROWTH = 4096


@dataclass
class _Plan:
    """What a symbolic pass over the segments found (see :func:`plan`)."""

    segments: list = field(default_factory=list)  # the segments that change the cache, in order
    capacity: int = 0  # the largest position length reached
    length: int = 0  # the final position length
    batch: int | None = None  # the final batch
    first_batch: int | None = None  # the batch of the first data segment
    rewrites: bool = False  # a row op, crop or reset: rows or positions change after they were written


def plan(manifest: Manifest) -> _Plan:
    """Walk the segments without touching data: the segments that act (row operations on an empty cache do
    nothing, as in transformers' layers), the buffers' capacity, the final length and batch, and whether
    history is ever rewritten.

    Raises
    ------
    CorruptChunkError
        If a segment contradicts the ones before it (a data segment that does not start where the cache
        ends or whose batch does not match, a crop that grows the cache, a repeat or selection past the
        rows the cache can have).
    """
    p = _Plan()
    where = f"{manifest.session}/manifest"
    max_rows = (manifest.batch or 1) * MAX_ROW_GROWTH
    for i, seg in enumerate(manifest.segments):
        if isinstance(seg, (Prefill, Step)):
            if seg.start != p.length:
                raise CorruptChunkError(f"{where} segment {i}: starts at position {seg.start}, the cache ends at "
                                        f"{p.length}")
            if p.length and seg.batch != p.batch:
                raise CorruptChunkError(f"{where} segment {i}: batch {seg.batch}, the cache has {p.batch} rows")
            if p.first_batch is None:
                p.first_batch = seg.batch
            elif p.length == 0 and seg.batch != p.batch:
                p.rewrites = True  # a reset cache refilled with another batch
            p.batch = seg.batch
            p.length += seg.tokens
            p.capacity = max(p.capacity, p.length)
        elif p.length == 0:
            continue  # a row operation, crop or reset of an empty cache changes nothing
        elif isinstance(seg, Rows):
            if seg.rows > max_rows:
                raise CorruptChunkError(f"{where} segment {i}: selects {seg.rows} rows, past any generate")
            p.rewrites = True
            p.batch = seg.rows
        elif isinstance(seg, Repeat):
            if p.batch * seg.repeats > max_rows:
                raise CorruptChunkError(f"{where} segment {i}: repeat {seg.repeats} of {p.batch} rows is past "
                                        f"any generate (the session started with {manifest.batch})")
            p.rewrites = True
            p.batch *= seg.repeats
        elif isinstance(seg, Crop):
            if seg.length > p.length:
                raise CorruptChunkError(f"{where} segment {i}: crop to {seg.length} tokens of {p.length}")
            p.rewrites = p.rewrites or seg.length < p.length
            p.length = seg.length
        else:
            p.rewrites = True
            p.length = 0
        p.segments.append(seg)
    return p


def replay(manifest: Manifest, streamer: KVStreamer, *, device: torch.device | str,
           layerwise: bool | None = None) -> LayerwiseLoad:
    """Rebuild a session's per-layer KV from its chunks, through ``streamer`` (its transport, its stats).

    Parameters
    ----------
    manifest : Manifest
        The session's record.
    streamer : KVStreamer
        Reads the chunks (``gather``: fetch into staging on the KV device, unpack with the kernels).
    device : torch.device or str
        Where the KV goes.
    layerwise : bool, optional
        On a CUDA device (default there): return before the copies finish. The loads run on a side stream
        and each KV layer gets an event that fires when its KV has landed; the first layer's prefill
        chunks and the decode steps (small, every layer) come first, then each layer's prefill chunks in
        layer order, so layer 0 is usable long before the last layer; the unpacks run on a second side
        stream, so the copies follow each other without gaps. A session whose history was rewritten (reorders, crops, resets) replays
        in order and all layers share one event. ``False``: synchronous.

    Returns
    -------
    LayerwiseLoad
        ``keys[i]``/``values[i]``: ``[B, H, n, head_dim]`` of the ``i``-th KV layer (``manifest.kv_layers``
        order), ``n`` the final position length; ``events[i]``; ``matched_tokens = n``. Empty lists when the
        session holds no KV.

    Raises
    ------
    ChunkNotFound, CorruptChunkError, PeerError
        From the transport, or a manifest whose segments contradict each other, or a chunk of another run
        or model or shape than the manifest says (:func:`check_chunks`).
    LayoutError
        A chunk whose shape or dtype does not fit the manifest.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    p = plan(manifest)
    kv = manifest.kv_layers
    if p.batch is None or p.capacity == 0 or not kv:
        return LayerwiseLoad([], [], [], 0)
    check_chunks(manifest, streamer.transport)
    if layerwise is None:
        layerwise = device.type == "cuda"
    # A rewritten history replays on the current stream: its row operations allocate new buffers, which
    # must belong to the stream that reads them.
    side = side_stream(device, LOAD_STREAM) if layerwise and device.type == "cuda" and not p.rewrites else None
    unpack = side_stream(device, UNPACK_STREAM) if side is not None else None
    slot = {l: i for i, l in enumerate(kv)}
    # Destinations are allocated on the current (compute) stream, which will read them; the side stream
    # waits for these allocations before writing.
    bufs = [_buffers(manifest, p.first_batch, p.capacity, device) for _ in kv]
    if side is not None:
        side.wait_stream()
        unpack.wait_stream()
    with side if side is not None else contextlib.nullcontext():
        if p.rewrites:
            bufs, events = _replay_in_order(manifest, p.segments, streamer, bufs, slot, device)
        else:
            events = _replay_layerwise(manifest, p.segments, streamer, bufs, slot, device, unpack)
    # A second look once every read was issued: a chunk that still belongs to its run now was that run's
    # when it was read (a run writes each key once, before its manifest), so no replacement slipped in.
    check_chunks(manifest, streamer.transport)
    keys = [k[:, :, :p.length] for k, _ in bufs]
    values = [v[:, :, :p.length] for _, v in bufs]
    return LayerwiseLoad(keys, values, events, p.length, stream=side.torch_stream if side is not None else None)


def _buffers(manifest: Manifest, batch: int, capacity: int, device: torch.device) -> tuple:
    """One layer's ``(keys, values)`` ``[batch, H, capacity, D]`` destinations: the halves of one
    ``[2, ...]`` allocation, or two allocations when keys and values have different head dims."""
    shape = (batch, manifest.kv_heads, capacity)
    if manifest.head_dim_v == manifest.head_dim:
        kv = torch.empty((2, *shape, manifest.head_dim), dtype=manifest.dtype, device=device)
        return kv[0], kv[1]
    return (torch.empty((*shape, manifest.head_dim), dtype=manifest.dtype, device=device),
            torch.empty((*shape, manifest.head_dim_v), dtype=manifest.dtype, device=device))


#: Most bytes of decode steps staged for one batched gather (:meth:`KVStreamer.gather_many`).
STEP_GROUP_BYTES = 256 << 20


def _step_runs(steps: list, bufs: list, slot: dict) -> list:
    """Decode steps in runs: consecutive steps of the same layers, batch and length, up to
    :data:`STEP_GROUP_BYTES` of staging each. Returns ``[(steps, staging bytes)]``."""
    runs, i = [], 0
    while i < len(steps):
        first = steps[i]
        k, v = bufs[slot[first.layers[0]]]
        step_bytes = len(first.layers) * first.batch * first.tokens * k.shape[1] * (k.shape[3] + v.shape[3]) \
            * k.element_size()
        j = i + 1
        while (j < len(steps) and steps[j].layers == first.layers and steps[j].batch == first.batch
               and steps[j].tokens == first.tokens and steps[j].start == first.start + (j - i) * first.tokens
               and (j - i + 1) * step_bytes <= STEP_GROUP_BYTES):
            j += 1
        runs.append((steps[i:j], (j - i) * step_bytes))
        i = j
    return runs


def _gather_steps(streamer: KVStreamer, runs: list, bufs: list, slot: dict, ring: "_Ring | None" = None) -> None:
    """Decode steps in runs (:func:`_step_runs`): each run goes through one
    :meth:`~kvstream.streaming.streamer.KVStreamer.gather_many` (one staging buffer, one unpack) instead of a
    gather each."""
    for run, _ in runs:
        first = run[0]
        ks = [bufs[slot[l]][0] for l in first.layers]
        vs = [bufs[slot[l]][1] for l in first.layers]
        region = Region(layers=(0, len(ks)), tokens=(first.start, first.start + len(run) * first.tokens))
        _gather(streamer, [s.key for s in run], ks, vs, region, ring)


def _gather_prefill(streamer: KVStreamer, seg: Prefill, layer: int, bufs: list, slot: dict,
                    ring: "_Ring | None" = None) -> None:
    k, v = bufs[slot[layer]]
    _gather(streamer, [seg.keys[layer]], [k], [v], Region(layers=(0, 1), tokens=(seg.start, seg.start + seg.tokens)), ring)


def _gather(streamer: KVStreamer, chunk_keys: list, ks: list, vs: list, region: Region, ring: "_Ring | None") -> None:
    if ring is None:
        streamer.gather_many(chunk_keys, ks, vs, region)
        return
    staging = ring.next()
    streamer.gather_many(chunk_keys, ks, vs, region, unpack_on=ring.unpack, staging=staging)
    ring.unpacked()


class _Ring:
    """Two staging buffers a layer-wise load cycles through: chunk ``i + 1`` lands in one while chunk ``i`` is
    unpacked from the other (on ``unpack``), and a buffer is written again only after the unpack that read
    it (an event on ``unpack`` the copy stream waits for). Allocated once per load, on the copy stream."""

    def __init__(self, nbytes: int, device: torch.device, copy, unpack):
        self.unpack, self.copy = unpack, copy
        self.bufs = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self.read: list = [None, None]  # the event after the unpack that last read each buffer
        self.i = 1

    def next(self) -> torch.Tensor:
        """The other buffer (``uint8``, ``nbytes``, on the load device), once the copy stream has waited for the
        unpack that last read it (no host wait)."""
        self.i ^= 1
        if self.read[self.i] is not None:
            self.copy.wait_event(self.read[self.i])
        return self.bufs[self.i]

    def unpacked(self) -> None:
        """The unpack of the buffer :meth:`next` handed out is enqueued: record the event its reuse waits for."""
        self.read[self.i] = Event(self.unpack.device).record(self.unpack)

    def release(self) -> None:
        """The load is issued: the buffers go back to the allocator once the unpacks are past them."""
        for b in self.bufs:
            b.record_stream(self.unpack.torch_stream)
        self.bufs = []


def check_chunks(manifest: Manifest, transport) -> None:
    """Check the header of every chunk a replay of ``manifest`` reads (``transport.describe``): written by the
    run the manifest names for its segment, for the manifest's model, and (data chunks) of the shape and
    dtype the segment claims.

    Raises
    ------
    CorruptChunkError
        For a chunk that fails, naming it and what it holds.
    ChunkNotFound
        A chunk is missing.
    """
    acting = {id(seg) for seg in plan(manifest).segments}
    where = f"{manifest.session}/manifest"
    dims = (manifest.head_dim, manifest.head_dim_v)

    def _packed(layers: int, seg) -> tuple:
        return packed_kv_shape(layers, (seg.batch, manifest.kv_heads, seg.tokens), *dims)

    for i, seg in enumerate(manifest.segments):
        if id(seg) not in acting:
            continue
        if isinstance(seg, Prefill):
            want = [(seg.keys[l], _packed(1, seg)) for l in seg.keys]
        elif isinstance(seg, Step):
            want = [(seg.key, _packed(len(seg.layers), seg))]
        elif isinstance(seg, Rows):
            want = [(seg.key, None)]
        else:
            continue
        run = manifest.run_of(i)
        for key, shape in want:
            header = transport.describe(key)
            meta = header.meta or {}
            if run is not None and meta.get(RUN_META) != run:
                raise CorruptChunkError(f"{where}: chunk {key!r} was written by run {meta.get(RUN_META)!r}, not by run "
                                        f"{run} that this manifest says wrote it (a later run reused the session name "
                                        "and stopped before writing its manifest)")
            if manifest.model is not None and meta.get(MODEL_META) != manifest.model:
                raise CorruptChunkError(f"{where}: chunk {key!r} holds KV of model {meta.get(MODEL_META)!r}, the "
                                        f"session's is {manifest.model}")
            if shape is not None and (tuple(header.shape) != shape or header.dtype != manifest.dtype
                                      or header.head_dims != dims):
                raise CorruptChunkError(f"{where}: chunk {key!r} holds {header.dtype} {list(header.shape)} (head dims "
                                        f"{header.head_dims}), the manifest claims {manifest.dtype} {list(shape)} "
                                        f"(head dims {dims})")


def _check_layers(manifest: Manifest, seg: Segment, slot: dict) -> None:
    layers = seg.keys if isinstance(seg, Prefill) else seg.layers
    bad = [l for l in layers if l not in slot]
    if bad:
        raise CorruptChunkError(f"{manifest.session}/manifest: a segment names layers {bad}, which hold no KV "
                                f"(KV layers: {sorted(slot)})")


def _replay_layerwise(manifest: Manifest, segments: list, streamer: KVStreamer, bufs: list, slot: dict,
                      device: torch.device, unpack) -> list:
    """No history rewrites: positions are written once, so the order is free. The first layer's prefill
    chunks, then the decode steps (one gather of every layer each: the copy engine is busy with the first
    layer while the host issues them), then the other layers' prefill chunks in layer order; an event per
    layer after its last unpack, every one after the steps'. On a GPU the copies run on the current (load)
    stream back to back and the unpacks on ``unpack``, each behind its copy."""
    steps = [s for s in segments if isinstance(s, Step)]
    prefills = [s for s in segments if isinstance(s, Prefill)]
    for seg in steps + prefills:
        _check_layers(manifest, seg, slot)
    runs = _step_runs(steps, bufs, slot)
    ring = None
    if unpack is not None:
        largest = max([n for _, n in runs]
                      + [_prefill_bytes(seg, bufs[slot[l]]) for seg in prefills for l in seg.keys] or [0])
        ring = _Ring(largest, device, side_stream(device, LOAD_STREAM), unpack)
    events = []
    for i, l in enumerate(manifest.kv_layers):
        for seg in prefills:
            if l in seg.keys:
                _gather_prefill(streamer, seg, l, bufs, slot, ring)
        if i == 0:
            _gather_steps(streamer, runs, bufs, slot, ring)
        events.append(Event(device).record(unpack))
    if ring is not None:
        ring.release()
    return events


def _prefill_bytes(seg: Prefill, kv: tuple) -> int:
    k, v = kv
    return seg.batch * k.shape[1] * seg.tokens * (k.shape[3] + v.shape[3]) * k.element_size()


def _replay_in_order(manifest: Manifest, segments: list, streamer: KVStreamer, bufs: list, slot: dict,
                     device: torch.device) -> tuple[list, list]:
    """History was rewritten: replay the acting segments in order on the current stream; row operations
    remake the buffers."""
    transport = streamer.transport
    for seg in segments:
        if isinstance(seg, (Prefill, Step)) and bufs and bufs[0][0].shape[0] != seg.batch:
            # after a reset the cache is refilled with another batch (plan() checked it starts at 0)
            bufs = [_buffers(manifest, seg.batch, k.shape[2], device) for k, _ in bufs]
        if isinstance(seg, Prefill):
            _check_layers(manifest, seg, slot)
            for l in sorted(seg.keys):
                _gather_prefill(streamer, seg, l, bufs, slot)
        elif isinstance(seg, Step):
            _check_layers(manifest, seg, slot)
            _gather_steps(streamer, _step_runs([seg], bufs, slot), bufs, slot)
        elif isinstance(seg, Rows):
            index = transport.fetch_new(seg.key, "cpu")
            if index.dtype != torch.int64 or index.dim() != 1 or index.numel() != seg.rows:
                raise CorruptChunkError(f"{seg.key}: expected {seg.rows} int64 row indices, got {index.dtype} "
                                        f"{list(index.shape)}")
            rows = bufs[0][0].shape[0] if bufs else 0
            if seg.rows and (int(index.min()) < 0 or int(index.max()) >= rows):
                raise CorruptChunkError(f"{seg.key}: row indices outside the cache's {rows} rows")
            index = index.to(device)
            bufs = [(k.index_select(0, index), v.index_select(0, index)) for k, v in bufs]
        elif isinstance(seg, Repeat):
            bufs = [(k.repeat_interleave(seg.repeats, dim=0), v.repeat_interleave(seg.repeats, dim=0))
                    for k, v in bufs]
        # Crop and Reset only move the end of the history (the plan tracks it): later segments overwrite
        # the positions past it, and positions past the final length are never read.
    done = Event(device).record()
    return bufs, [done] * len(bufs)


__all__ = ["LOAD_STREAM", "UNPACK_STREAM", "MAX_ROW_GROWTH", "STEP_GROUP_BYTES", "plan", "check_chunks", "replay"]
