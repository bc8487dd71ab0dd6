"""The static-cache flavour of the hook: a transformers ``StaticCache`` that streams like StreamingCache.

HF's fast generation preallocates every layer's KV (``StaticCache``, ``[B, H, max_cache_len, D]`` per
layer) so that a decode step has static shapes and addresses and can run compiled, as CUDA graphs.
:class:`StreamingStaticCache` keeps that: its layers are HF's own ``StaticLayer`` and its ``update`` first
does what ``StaticCache`` does. Then

* a long forward (more than ``layer_chunk_min_tokens`` new tokens) streams each layer's new KV as it is
  produced, exactly as :class:`~kvstream.integrations.hf.cache.StreamingCache` does;
* decode steps stream one chunk of every layer every ``steps_per_chunk`` steps (:mod:`.tail`), packed
  straight from the static buffers at the steps' positions, whose addresses never change, so the pointer
  table and launch geometry are made once (:func:`kvstream.kernels.plan_newest`) and a chunk costs one
  launch and one flush; between chunks an eager step costs a counter, a compiled one an op call.

The session is the same as StreamingCache's (same keys, same chunks, same manifest), so either class loads
what the other streamed. Under ``torch.compile`` the streaming calls are custom ops (:mod:`.ops`): no graph
breaks, no recompiles. Only full-attention layers are supported (a sliding-window ``StaticSlidingWindowLayer``
rolls its buffer, so its newest token has no fixed place): use StreamingCache for those models.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import StaticCache, StaticLayer

from ... import kernels
from ...errors import ConfigError, LayoutError
from ...transports.base import Transport
from . import ops
from .base import _SessionStreaming
from .cache import StreamingCache
from .resume import continue_record
from .tail import STEPS_PER_CHUNK, StepTail, edge_update, unhook_edges


class StreamingStaticCache(_SessionStreaming, StaticCache):
    """A transformers ``StaticCache`` that streams each forward's new KV to a transport, compiled or not.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The model's config (every layer must be full attention).
    max_cache_len : int
        Positions preallocated per layer (prompt + new tokens), as for ``StaticCache``.
    transport : Transport, optional
        Where KV goes; ``None``: no streaming (a plain StaticCache).
    session : str
        Key prefix of this request's chunks.
    level : int or str, optional
        DéjàVuLib level 0-3 (default ``KVSTREAM_LEVEL`` or 3).
    layer_chunk_min_tokens : int
        Forwards with more new tokens than this stream one chunk per layer; others one chunk of all layers.
    steps_per_chunk : int
        Decode steps streamed together, as in StreamingCache (default 16): between chunks a step costs the
        host a counter (eager) or one op call (compiled).
    **kwargs
        Passed to ``StaticCache`` (``offloading``, ...).

    Raises
    ------
    ConfigError
        If a layer is not a full-attention ``StaticLayer`` (sliding windows, linear attention), or the
        session name is not a relative key prefix.

    Examples
    --------
    ``generate`` refuses ``cache_implementation="static"`` together with a cache object: pass the cache
    instead (``kvstream.cache_kwargs`` picks ``cache=`` or ``past_key_values=`` for the installed transformers).

    >>> cache = kvstream.StreamingStaticCache(model.config, max_cache_len=P + N, transport=t, session="r1")  # doctest: +SKIP
    >>> model.forward = torch.compile(model.forward)                                                        # optional
    >>> out = model.generate(input_ids, **kvstream.cache_kwargs(cache), max_new_tokens=N)
    >>> cache.wait()
    """

    def __init__(self, config: Any, max_cache_len: int, transport: Transport | None = None, session: str = "default",
                 *, level: int | str | None = None, layer_chunk_min_tokens: int = 16,
                 steps_per_chunk: int = STEPS_PER_CHUNK, **kwargs):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        bad = sorted({type(l).__name__ for l in self.layers if type(l) is not StaticLayer})
        if bad:
            raise ConfigError(f"StreamingStaticCache streams full-attention StaticLayers only; this config has {bad} "
                              "(use StreamingCache)")
        self._init_streaming(config, transport, session, level, layer_chunk_min_tokens, steps_per_chunk)
        self._streams = transport is not None
        self._host_len = 0  # position length, kept on the host (the layers keep theirs on the device)
        self._plans: dict[int, Any] = {}
        ids = self._kv_layer_ids()
        self._last_layer = ids[-1] if ids else -1
        self._first_layer = ids[0] if ids else -1
        self._tail_bufs: tuple | None = None  # the buffers a compiled step's op was handed, for the tail's chunk
        ops.register(self)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """``StaticCache.update``, then stream the new ``key_states``/``value_states`` ``[B, H, T_new, D]``."""
        keys, values = StaticCache.update(self, key_states, value_states, layer_idx, *args, **kwargs)
        if torch.compiler.is_compiling():  # first: traced code must not read the tail (per-cache state)
            if self._streams:
                n = key_states.shape[-2]
                if n > self.layer_chunk_min_tokens:
                    torch.ops.kvstream.stream_layer(keys, key_states, value_states, layer_idx)
                elif layer_idx == self._last_layer:
                    self._traced_step(layer_idx, n)
            return keys, values
        t = self._tail
        if t is not None:
            # eager decode steps without the edge hooks (one step per chunk, HF offloading): nothing on the
            # layers between the first and the last; the steps' tokens are
            # packed from the static buffers in bulk. (A skipped middle layer leaves its buffer as StaticCache
            # does, and the chunk holds what the buffers hold.)
            if layer_idx != t.first and layer_idx != t.last:
                return keys, values
            if layer_idx != t.first:  # the last KV layer
                if t.seen == 1:  # a whole step: it began at the first KV layer
                    t.seen = t.layers
                    self._tail_step_ended(t)
                    return keys, values
                self._close_tail()  # a forward that did not begin at the first KV layer: the per-step path
            elif t.seen == 0 and key_states.shape[-2] == t.n:
                t.seen = 1
                if layer_idx == t.last:
                    t.seen = t.layers
                    self._tail_step_ended(t)
                return keys, values
            else:
                self._close_tail()  # a longer forward, or the last one stopped before the last layer
        return self._after_update(layer_idx, key_states, value_states, keys, values)

    def _after_update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor, keys, values):
        """An eager update outside a tail: stream a long forward's layer, open a tail at a decode step's first
        KV layer, or stream a short forward that is not one. Returns ``keys, values``."""
        if not self._streams:
            return keys, values
        n = key_states.shape[-2]
        if n > self.layer_chunk_min_tokens:
            self._stream_new(layer_idx, key_states, value_states)
        elif layer_idx == self._first_layer:
            self._open_tail(n, key_states)
            if layer_idx == self._last_layer:
                self._tail.seen = self._tail.layers
                self._tail_step_ended(self._tail)
        # a short forward that starts past the first KV layer is not a decode step: the per-step path
        elif layer_idx == self._last_layer:
            self._stream_step(n, keys.device)
        return keys, values

    def _edge_update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor, args, kwargs):
        """The first or last KV layer's ``update`` while an eager tail is open (:class:`~.tail.EdgeHook`): the
        layer's own update and the step's count, as :meth:`update` does; anything irregular closes the tail
        (which removes the hooks) and goes the way of :meth:`update`.

        Traced (a forward compiled while an eager tail is open) it does what the compiled :meth:`update` does:
        a decode step's op at the last layer, whose call then closes the fast path (so the next call
        recompiles once without it); a long forward breaks the graph at its first layer, runs that layer
        eagerly, which closes the tail, and the layers after it are traced through :meth:`update`.
        """
        layer = self.layers[layer_idx]
        n = key_states.shape[-2]
        if torch.compiler.is_compiling():
            if n > self.layer_chunk_min_tokens:
                torch._dynamo.graph_break()
            else:
                keys, values = type(layer).update(layer, key_states, value_states, *args, **kwargs)
                if layer_idx == self._last_layer:
                    self._traced_step(layer_idx, n)
                return keys, values
        return edge_update(self, layer_idx, key_states, value_states, args, kwargs)

    def _traced_step(self, layer_idx: int, n: int) -> None:
        """Traced, at the last KV layer of a short forward: the op that streams it from every KV layer's
        buffers at run time (:func:`kvstream.integrations.hf.ops.stream_step`)."""
        ids = self._kv_layer_ids()
        torch.ops.kvstream.stream_step([self.layers[l].keys for l in ids], [self.layers[l].values for l in ids],
                                       layer_idx, n)

    def _irregular_last(self, t, layer_idx: int, key_states, value_states, out):
        """The last KV layer of a forward that did not begin at the first (already updated): the tail closes,
        then the per-step path streams the forward from the buffers."""
        self._close_tail()
        return self._after_update(layer_idx, key_states, value_states, *out)

    def _open_tail(self, n: int, key_states: torch.Tensor) -> None:
        """A decode step began (its first KV layer was updated): the tail that counts it and its successors."""
        self._finish_forward()
        self._ensure_streamer(key_states.device)
        if self._batch is None:
            v = self.layers[self._first_layer].values
            self._first_chunk(key_states.shape[0], key_states.shape[1], key_states.shape[3], v.shape[3],
                              key_states.dtype)
        ids = self._kv_layer_ids()
        self._tail = StepTail(start=self._host_len, batch=self._batch, first=ids[0], last=ids[-1], layers=len(ids),
                              n=n, cap=1 << 62, per_chunk=self.steps_per_chunk, seen=1)

    def _tail_step_ended(self, t) -> None:
        if t.seen == t.layers:
            self._host_len += t.n
        super()._tail_step_ended(t)

    def _stream_pending(self, key: str, t, ids: list, behind: frozenset) -> None:
        """The pending steps of every layer, packed from the static buffers at their positions (one launch of a
        plan made once per chunk length: the buffers never move)."""
        bufs, self._tail_bufs = self._tail_bufs, None
        plan = self._plan(t.tokens, *(bufs or (None, None)))
        self.streamer.scatter_planned(key, plan, t.start, meta=self._chunk_meta)

    def _partial_step(self, t) -> None:
        """A forward stopped before the last KV layer: the steps before it, then that forward as one chunk of
        every layer's buffers at its positions (what the per-step path streams for it)."""
        self._flush_tail(t)
        self._stream_step(t.n, self.layers[t.first].keys.device)

    # ------------------------------------------------------------------------------------------------
    def _forward_start(self, layer_idx: int | None, tokens: int) -> int:
        start = self._host_len
        self._host_len += tokens
        return start

    def _plan(self, n: int, keys: list | None, values: list | None):
        """The pack plan of ``n`` tokens over ``keys``/``values`` (default: the layers' static buffers), made
        again when they are other tensors than the plan's."""
        if keys is None:
            ids = self._kv_layer_ids()
            first, last = self.layers[ids[0]].keys, self.layers[ids[-1]].keys
        else:
            first, last = keys[0], keys[-1]
        plan = self._plans.get(n)
        if plan is None or plan.keys[0].data_ptr() != first.data_ptr() or plan.keys[-1].data_ptr() != last.data_ptr():
            if keys is None:
                keys, values = [self.layers[l].keys for l in ids], [self.layers[l].values for l in ids]
            plan = self._plans[n] = kernels.plan_newest(keys, values, num_tokens=n)
        return plan

    def _stream_step(self, n: int, device: torch.device, keys: list | None = None, values: list | None = None) -> None:
        """A short forward of ``n`` tokens not counted by a tail: one chunk of every KV layer, packed by a plan
        from ``keys``/``values`` (the static buffers a compiled step's op was handed; ``None``: the layers'
        own) at the forward's positions. A compiled decode step goes to the tail like an eager one."""
        if keys is not None:  # the op of a compiled decode step: counted by the tail, whose chunk reads these
            unhook_edges(self)  # compiled steps count here: an eager tail's hooks go (one recompile without them)
            t = self._tail
            if t is None or t.n != n:
                self._finish_forward()
                self._open_tail(n, keys[0])
                t = self._tail
            t.seen = 0
            self._tail_bufs = (keys, values)
            self._host_len += n
            if t.step_ended():
                self._flush_tail(t)
            return
        self._finish_forward()
        streamer = self.streamer or self._ensure_streamer(device)
        start = self._forward_start(None, n)
        plan = self._plan(n, keys, values)
        if self._batch is None:
            self._first_chunk(*plan.keys[0].shape[:2], *plan.head_dims, plan.dtype)
        ids = self._kv_ids or self._kv_layer_ids()
        self._recorder.begin("all", start, n, self._batch)
        streamer.scatter_planned(self._recorder.end_step(ids), plan, start, meta=self._chunk_meta)

    def _settle(self) -> None:
        super()._settle()
        self._plans.clear()  # a history-rewriting operation may replace the buffers

    def crop(self, tokens_to_remove: int) -> None:
        """``StaticCache.crop`` (a negative count of tokens to drop), recorded for replay."""
        super().crop(tokens_to_remove)
        self._host_len = self._seq_length()

    def reset(self) -> None:
        """Clear the cache (as ``StaticCache.reset``), and record it."""
        super().reset()
        self._host_len = 0

    @classmethod
    def load(cls, transport: Transport, session: str, *, config: Any, max_cache_len: int,
             device: torch.device | str | None = None, level: int | str | None = None,
             stream: bool = True) -> "StreamingStaticCache":
        """Rebuild a session's cache (streamed by either flavour) into a new static cache.

        The chunks are replayed as :meth:`StreamingCache.load <kvstream.integrations.hf.cache.StreamingCache.load>`
        does, then copied into the static buffers by each layer's own ``update``.

        Raises
        ------
        ChunkNotFound, CorruptChunkError
            A manifest or chunk is missing or corrupt.
        LayoutError
            The stored KV does not match ``config``, or holds more positions than ``max_cache_len``.
        """
        manifest = cls.read_manifest(transport, session)
        if manifest.seq_length > max_cache_len:
            raise LayoutError(f"{session}: {manifest.seq_length} stored positions do not fit max_cache_len={max_cache_len}")
        src = StreamingCache.load(transport, session, config=config, device=device, stream=False, layerwise=False)
        cache = cls(config, max_cache_len, transport if stream else None, session, level=level)
        for l in manifest.kv_layers:
            if src.layers[l].is_initialized and src.layers[l].keys.shape[-2]:
                cache.layers[l].update(src.layers[l].keys, src.layers[l].values)
        continue_record(cache, manifest)
        cache._host_len = manifest.seq_length
        return cache


__all__ = ["StreamingStaticCache"]
