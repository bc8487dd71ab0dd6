"""What the streaming caches share (:class:`~kvstream.integrations.hf.cache.StreamingCache`,
:class:`~kvstream.integrations.hf.static.StreamingStaticCache`): the session record and run identity, the
streamer, the streaming of each forward's new KV, and the history-rewriting operations recorded for replay
(:mod:`kvstream.streaming.session`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer

from ... import kernels
from ...errors import ConfigError, KVStreamError, LayoutError
from ...layout import KVLayout, Region, kv_fingerprint
from ...streaming.layerwise import LayerwiseLoad
from ...streaming.session import MANIFEST_FORMAT, Crop, Manifest, Repeat, Reset, SessionKeys, SessionRecorder
from ...streaming.levels import resolve_level
from ...streaming.streamer import KVStreamer
from ...transports.base import Transport
from .resume import PendingLoad, read_manifest, replaced_keys
from .tail import StepTail, hook_edges, unhook_edges, window_cap


def _is_kv_layer(layer: Any) -> bool:
    return isinstance(layer, (DynamicLayer, StaticLayer))


#: The cache layers :class:`~kvstream.integrations.hf.cache.StreamingCache` streams, by exact class: DynamicLayer
#: and its sliding-window subclass hold KV and nothing else; DummyLayer (shared-KV / MLP-only layers) holds
#: none. Other subclasses hold more than KV (DynamicIndexedLayer the indexer keys of sparse attention, the
#: hybrid layers a recurrent state), which a stored session would silently lose.
SUPPORTED_DYNAMIC = ("DynamicLayer", "DynamicSlidingWindowLayer", "DummyLayer")


def _supported(layer: Any) -> bool:
    return type(layer).__name__ in SUPPORTED_DYNAMIC


@dataclass
class _Forward:
    """The forward pass in progress: which layers were updated and with how many new tokens."""

    mode: str  # "layers" (one chunk per layer) or "all" (one chunk for all layers)
    tokens: int
    seg: int  # the segment number its keys use
    last_layer: int = -1
    parts: list | None = None  # "layers" at levels 0-1: [(layer_idx, key, k_new, v_new)] until the forward ends
    ids: list | None = None  # "all": the layers updated so far, and their new K and V, until the chunk is packed
    ks: list | None = None
    vs: list | None = None


class _SessionStreaming:
    """What both cache flavours share: the session record, the streamer, history-rewriting operations.

    A subclass puts this in front of a transformers ``Cache`` (``DynamicCache``, ``StaticCache``), calls
    :meth:`_init_streaming` from its ``__init__`` and :meth:`_stream_new` from its ``update``.
    """

    _offloader = None
    _pending = None  # a layer-wise load (a prefix, a session) not yet taken
    _hooked = None  # the edge layers hooked while an eager tail is open (:func:`.tail.hook_edges`)
    #: How ``from_prefix`` filled this cache (a :class:`~kvstream.stores.cost.ReusePlan`; ``None`` otherwise).
    reuse_plan: Any = None

    def _init_streaming(self, config: Any, transport: Transport | None, session: str, level: int | str | None,
                        layer_chunk_min_tokens: int, steps_per_chunk: int) -> None:
        if isinstance(steps_per_chunk, bool) or not isinstance(steps_per_chunk, int) or steps_per_chunk < 1:
            raise ConfigError(f"steps_per_chunk must be a positive int, got {steps_per_chunk!r}")
        if not isinstance(session, str) or not session or session.startswith("/") or ".." in session.split("/"):
            raise ConfigError(f"Invalid session name {session!r}: a non-empty relative key prefix without '..' parts")
        if transport is not None and hasattr(transport, "check_key"):  # the transport's own key rules, now
            try:
                transport.check_key(SessionKeys(session).layer(0, 0))
            except LayoutError as e:
                raise ConfigError(f"Invalid session name {session!r} for {type(transport).__name__}: {e}") from None
        self.config = config
        self.transport = transport
        self.session = session
        self.layer_chunk_min_tokens = int(layer_chunk_min_tokens)
        self.steps_per_chunk = steps_per_chunk
        self._tail: StepTail | None = None  # decode steps in the cache, not streamed yet (:mod:`.tail`)
        self.streamer: KVStreamer | None = None
        self._level = resolve_level(level) if transport is not None else level
        self._fwd: _Forward | None = None
        self._pending: PendingLoad | None = None  # a layer-wise load (a prefix, a session) not yet taken
        self.run_id = uuid.uuid4().hex
        self._runs = [(0, self.run_id)]  # (first segment, run) of the session's runs (a loaded cache adds its own)
        self._model: str | None = None  # kv_fingerprint of config and KV dtype, from the first chunk
        self._chunk_meta: dict = {"session": session, "run": self.run_id}
        self._committed = False  # a manifest of this run was written
        self._recorder = SessionRecorder(session)
        self._kv_ids: list[int] = []
        self._kv_ids_for = -1
        self._last_kv_layer: int | None = None
        self._batch: int | None = None
        self._geometry: tuple | None = None  # (kv_heads, head_dim, head_dim_v, dtype) of the first layer seen
        self._step_plan = None  # kernels.plan_newest of the last decode step's new KV

    def _forward_start(self, layer_idx: int, tokens: int) -> int:
        """The position a new forward of ``tokens`` tokens starts at (its first layer was just updated)."""
        return self.layers[layer_idx].get_seq_length() - tokens

    def _seq_length(self) -> int:
        """Position length of the cache, as an int (what the manifest records)."""
        return int(self.get_seq_length())


    def _first_chunk(self, batch: int, kv_heads: int, head_dim: int, head_dim_v: int, dtype: torch.dtype) -> None:
        """The session's geometry and the model fingerprint every chunk's meta carries, from its first chunk."""
        self._batch, self._geometry = batch, (kv_heads, head_dim, head_dim_v, dtype)
        if self.config is not None and self._model is None:
            self._model = kv_fingerprint(self.config, dtype)
            self._chunk_meta = {**self._chunk_meta, "model": self._model}

    def _ensure_streamer(self, device: torch.device) -> KVStreamer:
        if self.streamer is None:
            self.streamer = KVStreamer(self.transport, level=self._level, device=device)
        return self.streamer

    def _kv_layer_ids(self) -> list[int]:
        n = len(self.layers)
        if self._kv_ids_for != n:  # layers are created lazily without a config: recompute when they grow
            self._kv_ids = [i for i, l in enumerate(self.layers) if _is_kv_layer(l)]
            self._kv_ids_for = n
        return self._kv_ids

    def _stream_new(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[-2]
        fwd = self._fwd
        if fwd is not None and layer_idx > fwd.last_layer and n == fwd.tokens:
            # one more layer of the forward in progress
            fwd.last_layer = layer_idx
            if fwd.mode == "all":
                fwd.ids.append(layer_idx)
                fwd.ks.append(k)
                fwd.vs.append(v)
            else:
                self._stream_layer(fwd, layer_idx, k, v)
            if layer_idx == self._last_kv_layer:
                self._finish_forward()
            return
        if n == 0:
            return
        self._ensure_streamer(k.device)
        if self._batch is None:
            self._first_chunk(k.shape[0], k.shape[1], k.shape[3], v.shape[3], k.dtype)
        self._finish_forward()
        start = self._forward_start(layer_idx, n)
        mode = "layers" if n > self.layer_chunk_min_tokens else "all"
        kv_ids = self._kv_layer_ids()
        self._last_kv_layer = kv_ids[-1] if kv_ids and self.layer_class_to_replicate is None else None
        if (mode == "all" and self._last_kv_layer is not None and layer_idx == kv_ids[0] and self._offloader is None
                and self._pending is None and n <= window_cap(self.layers, kv_ids)):
            # a decode step over the known layers: counted, and streamed with the next ones (:mod:`.tail`)
            t = self._tail = StepTail(start=start, batch=k.shape[0], first=kv_ids[0], last=kv_ids[-1],
                                      layers=len(kv_ids), n=n, cap=window_cap(self.layers, kv_ids),
                                      per_chunk=self.steps_per_chunk, seen=1)
            if layer_idx == self._last_kv_layer:
                self._tail_step_ended(t)
            return
        seg = self._recorder.begin(mode, start, n, k.shape[0])
        fwd = self._fwd = _Forward(mode=mode, tokens=n, seg=seg, last_layer=layer_idx, parts=[])
        if mode == "all":
            fwd.ids, fwd.ks, fwd.vs = [layer_idx], [k], [v]
        else:
            self._stream_layer(fwd, layer_idx, k, v)
        if layer_idx == self._last_kv_layer:
            self._finish_forward()

    def _stream_layer(self, fwd: _Forward, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A long forward: this layer's chunk goes out now (levels 2-3) or after the forward (levels 0-1)."""
        key = self._recorder.prefill_key(fwd.seg, layer_idx)
        if self.streamer.level >= 2:
            self.streamer.scatter(key, [k], [v], Region(layers=(0, 1), tokens=(0, fwd.tokens)),
                                  meta={**self._chunk_meta, "layer": layer_idx})
        else:
            fwd.parts.append((layer_idx, key, k, v))

    # ------------------------------------------------------------------------------------------------
    # decode steps streamed in bulk (:mod:`.tail`)
    # ------------------------------------------------------------------------------------------------
    def _fast_path_allowed(self) -> bool:
        """Whether an eager tail may hook only its edge layers (:func:`.tail.hook_edges`): not while tracing,
        not under HF offloading (its ``update`` prefetches), and not at one step per chunk, where each step's
        own count of its layers streams a step that skipped a middle layer as it happened."""
        return self.steps_per_chunk > 1 and not getattr(self, "offloading", False) and not torch.compiler.is_compiling()

    def _tail_step_ended(self, t: StepTail) -> None:
        """The last KV layer of a decode step was updated: count the step (an irregular one, which skipped
        layers, closes the tail), and stream the pending steps when they are due."""
        if t.seen != t.layers:
            self._close_tail()
            return
        if self._hooked is None and t.steps and self._fast_path_allowed():
            # a second eager step in a row: a run of decode steps, whose next steps skip the hook in the middle
            # layers (not at the first step: a short prompt's prefill opens a tail too, and a compiled decode
            # step after it must not be traced over hooks it would then recompile without)
            hook_edges(self, t)
        if t.step_ended():
            self._flush_tail(t)

    def _flush_tail(self, t: StepTail, behind: frozenset = frozenset()) -> None:
        """Stream the pending steps ``[t.start, t.start + t.tokens)`` of every KV layer as one chunk (a
        :class:`~kvstream.streaming.session.Step` segment). ``behind``: layers that hold ``t.n`` newer tokens
        after them (a forward that stopped before the last layer)."""
        if t.tokens:
            ids = self._kv_layer_ids()
            self._recorder.begin("all", t.start, t.tokens, t.batch)
            self._stream_pending(self._recorder.end_step(ids), t, ids, behind)
            t.taken()

    def _close_tail(self) -> None:
        """Stream what the tail holds (also a forward in progress that did not reach the last KV layer) and
        drop it: the next short forward opens a new one."""
        t, self._tail = self._tail, None
        unhook_edges(self)
        if t is None:
            return
        if t.seen == 0:
            self._flush_tail(t)
        else:
            self._partial_step(t)

    def _stream_pending(self, key: str, t: StepTail, ids: list, behind: frozenset) -> None:
        """Pack and flush the pending steps of ``t`` under ``key`` (the layers' KV at the tail's positions).

        Raises
        ------
        KVStreamError
            A layer does not end where the pending steps do: a step skipped a layer between the first and
            the last KV layer (which the fast path does not see), so no chunk could say where its KV belongs.
        """
        ks, vs, ends = [], [], []
        pos = t.start + t.tokens
        for l in ids:
            layer = self.layers[l]
            extra = t.n if l in behind else 0
            if layer.get_seq_length() - extra != pos:
                raise KVStreamError(f"{self.session}: KV layer {l} holds {layer.get_seq_length() - extra} positions where "
                                    f"the pending decode steps end at {pos}: a step skipped that layer; stream such "
                                    "a model with steps_per_chunk=1")
            ends.append(layer.keys.shape[-2] - extra)
            ks.append(layer.keys)
            vs.append(layer.values)
        if min(ends) == max(ends):  # the steps sit at the same positions of every layer: one pack over the layers
            self.streamer.scatter_positions(key, ks, vs, ends[0] - t.tokens, num_tokens=t.tokens, meta=self._chunk_meta)
            return
        # sliding-window layers hold fewer positions than the others: each layer's last t.tokens, narrowed
        self.streamer.scatter_step(key, [k.narrow(2, e - t.tokens, t.tokens) for k, e in zip(ks, ends)],
                                   [v.narrow(2, e - t.tokens, t.tokens) for v, e in zip(vs, ends)], meta=self._chunk_meta)

    def _partial_step(self, t: StepTail) -> None:
        """A forward stopped before the last KV layer (an early-exit draft): the steps before it, then its
        own new KV of the layers it updated, as the per-step path records such a forward."""
        base = t.start + t.tokens
        grown = [l for l in self._kv_layer_ids() if self.layers[l].get_seq_length() > base]
        self._flush_tail(t, frozenset(grown))
        if grown:
            self._recorder.begin("all", base, t.n, t.batch)
            key = self._recorder.end_step(grown)
            self.streamer.scatter_step(key, [self.layers[l].keys[:, :, -t.n:] for l in grown],
                                       [self.layers[l].values[:, :, -t.n:] for l in grown], meta=self._chunk_meta)

    def _finish_forward(self) -> None:
        if self._tail is not None:
            self._close_tail()
        fwd, self._fwd = self._fwd, None
        if fwd is None:
            return
        streamer = self.streamer
        if fwd.mode == "layers":
            for layer_idx, key, k, v in fwd.parts:
                streamer.scatter(key, [k], [v], Region(layers=(0, 1), tokens=(0, fwd.tokens)),
                                 meta={**self._chunk_meta, "layer": layer_idx})
            return
        key = self._recorder.end_step(fwd.ids)  # the layers are in the manifest
        ks, vs = fwd.ks, fwd.vs
        if streamer.level == 0:
            streamer.scatter_newest(key, ks, vs, num_tokens=fwd.tokens, meta=self._chunk_meta)
        elif self._geometry is None or self._geometry[1] == self._geometry[2]:
            streamer.scatter_step(key, ks, vs, meta=self._chunk_meta)  # one torch.stack, no per-layer host work
        else:  # K and V of different head dims: the pointer-table pack, re-pointed at the step's tensors
            plan = self._step_plan
            if plan is None or plan.num_tokens != fwd.tokens or not plan.bind(ks, vs):
                plan = self._step_plan = kernels.plan_newest(ks, vs, num_tokens=fwd.tokens)
            streamer.scatter_planned(key, plan, 0, meta=self._chunk_meta)

    # ------------------------------------------------------------------------------------------------
    # history-rewriting operations: applied, then recorded for replay
    # ------------------------------------------------------------------------------------------------
    def wait_loaded(self) -> None:
        """Take every layer of a layer-wise load (:meth:`load`, :meth:`from_prefix`): the current stream waits
        for the copies (the host does not), and the layers hold their KV. ``generate`` needs no call (each
        layer's first ``update`` takes it); code that reads ``cache.layers[i].keys`` before the first forward
        does (until then those are meta placeholders)."""
        if self._pending is not None:
            self._pending.take()
            self._pending = None

    def _settle(self) -> None:
        """Before history is rewritten or read as a whole: every loaded layer taken, the forward flushed."""
        self.wait_loaded()
        self._finish_forward()

    def _record_rows(self, kind: str, index: torch.Tensor) -> None:
        if self.transport is None:
            return
        index = torch.as_tensor(index).detach()
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        idx = index.to("cpu", torch.int64).contiguous()
        key = self._recorder.rows(kind, idx.numel())
        self._ensure_streamer(index.device if index.is_cuda else torch.device("cpu")).flush(
            key, idx, meta=self._chunk_meta).wait()

    def _record(self, seg) -> None:
        if self.transport is not None:
            self._recorder.other(seg)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder batch rows (as ``DynamicCache``), and record it for replay."""
        self._settle()
        if self._offloader is not None:
            self._offloader.apply(lambda t: t.index_select(0, beam_idx.to("cpu")))
        super().reorder_cache(beam_idx)
        self._record_rows("reorder", beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only ``indices`` batch rows (as ``DynamicCache``), and record it."""
        self._settle()
        if self._offloader is not None:
            self._offloader.apply(lambda t: t[indices.to("cpu")])
        super().batch_select_indices(indices)
        self._record_rows("select", indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row ``repeats`` times (as ``DynamicCache``), and record it."""
        self._settle()
        if self._offloader is not None:
            self._offloader.apply(lambda t: t.repeat_interleave(repeats, dim=0))
        super().batch_repeat_interleave(repeats)
        if self._batch is not None:
            self._batch *= repeats
        self._record(Repeat(int(repeats)))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens (as ``DynamicCache.crop``, in the installed transformers' convention for
        its argument), and record the length it left."""
        self._settle()
        if self._offloader is not None and self._offloader.active:
            raise ConfigError("StreamingCache(offload=True) does not support crop (assisted decoding)")
        super().crop(tokens_to_remove)
        self._record(Crop(length=self._seq_length(), tokens=int(tokens_to_remove)))

    def reset(self) -> None:
        """Clear the cache (as ``DynamicCache.reset``), and record it."""
        self._settle()
        if self._offloader is not None:
            self._offloader.clear()
        super().reset()
        self._record(Reset())

    # ------------------------------------------------------------------------------------------------
    # completion and reload
    # ------------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """Bytes and chunks streamed so far (``bytes_out``, ``chunks_out``, ``bytes_in`` of a load, ...), and
        the segment count."""
        d = self.streamer.stats.as_dict() if self.streamer is not None else {"chunks_out": 0, "bytes_out": 0}
        d["segments"] = len(self._recorder.segments)
        return d

    @property
    def pending_load(self) -> "LayerwiseLoad | None":
        """The layer-wise load (a session from :meth:`load`, a prefix from :meth:`from_prefix`) whose layers the
        model has not taken yet: ``events[i]`` fires when its ``i``-th layer has landed; ``None`` once the first
        forward took every layer (or when nothing was loaded layer by layer)."""
        return self._pending.load if self._pending is not None else None

    def session_manifest(self) -> Manifest:
        """The session's :class:`~kvstream.streaming.session.Manifest`: layout, batch, ordered segments (decode
        steps still pending between two chunks are streamed first, so the segments cover the cache)."""
        t = self._tail
        if t is not None and t.seen == 0 and t.tokens:
            self._flush_tail(t)
        kv_heads, head_dim, head_dim_v, dtype = self._geometry if self._geometry else (None, None, None, None)
        return Manifest(session=self.session, num_layers=len(self.layers), kv_layers=list(self._kv_layer_ids()),
                        kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, batch=self._batch,
                        seq_length=self._seq_length(), segments=list(self._recorder.segments),
                        run=self.run_id, runs=list(self._runs), model=self._model, head_dim_v=head_dim_v)

    def manifest(self) -> dict:
        """The session manifest as its JSON document (what :meth:`load` replays)."""
        return self.session_manifest().to_dict()

    def wait(self) -> None:
        """Block until every chunk has landed, then write the session manifest (``S/manifest``).

        The first ``wait()`` of a fresh run that replaces another run's manifest then deletes that run's
        chunks (best effort; see the class notes).

        Raises the first transport error of any chunk (for example ``CapacityError``).
        """
        self._settle()
        if self.transport is None:
            return
        if self.streamer is not None:
            self.streamer.wait()
        manifest = self.session_manifest()
        fresh = not self._committed and len(self._runs) == 1
        replaced = replaced_keys(self.transport, self.session) if fresh else []
        self.transport.flush(SessionKeys(self.session).manifest, manifest.to_bytes()).wait()
        self._committed = True
        ours = set(manifest.keys())
        for key in replaced:
            if key not in ours:
                try:
                    self.transport.delete(key)
                except KVStreamError:
                    break

    @classmethod
    def read_manifest(cls, transport: Transport, session: str) -> Manifest:
        """Fetch, parse and check ``session``'s manifest. Raises ``ChunkNotFound`` or ``CorruptChunkError``."""
        return read_manifest(transport, session)

    def layout(self) -> KVLayout:
        """The :class:`~kvstream.layout.KVLayout` of what this cache holds (after the first update)."""
        if self._geometry is None:
            ids = self._kv_layer_ids()
            if not ids or not self.layers[ids[0]].is_initialized:
                raise LayoutError("StreamingCache.layout(): the cache is empty")
            k, v = self.layers[ids[0]].keys, self.layers[ids[0]].values
            self._geometry = (k.shape[1], k.shape[3], v.shape[3], k.dtype)
        kv_heads, head_dim, head_dim_v, dtype = self._geometry
        return KVLayout(num_layers=len(self._kv_layer_ids()), kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                        head_dim_v=head_dim_v)


__all__ = ["_SessionStreaming", "MANIFEST_FORMAT", "SUPPORTED_DYNAMIC"]
