"""The static-cache flavour of the hook: a transformers ``StaticCache`` that streams like StreamingCache.

HF's fast generation preallocates every layer's KV (``StaticCache``, ``[B, H, max_cache_len, D]`` per
layer) so that a decode step has static shapes and addresses and can run compiled, as CUDA graphs.
:class:`StreamingStaticCache` keeps that: its layers are HF's own ``StaticLayer`` and its ``update`` first
does what ``StaticCache`` does. Then

* a long forward (more than ``layer_chunk_min_tokens`` new tokens) streams each layer's new KV as it is
  produced, exactly as :class:`~kvstream.integrations.hf.cache.StreamingCache` does;
* a short forward (a decode step) streams one chunk of every layer after the last one: run eagerly, the
  step's new KV stacked in one torch call (what ``index_copy_`` wrote into the buffers); compiled, packed
  straight from the static buffers at the step's positions, whose addresses never change, so the pointer
  table and launch geometry are made once (:func:`kvstream.kernels.plan_newest`) and a step costs one
  launch and one flush.

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
                 *, level: int | str | None = None, layer_chunk_min_tokens: int = 16, **kwargs):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        bad = sorted({type(l).__name__ for l in self.layers if type(l) is not StaticLayer})
        if bad:
            raise ConfigError(f"StreamingStaticCache streams full-attention StaticLayers only; this config has {bad} "
                              "(use StreamingCache)")
        self._init_streaming(config, transport, session, level, layer_chunk_min_tokens)
        self._streams = transport is not None
        self._host_len = 0  # position length, kept on the host (the layers keep theirs on the device)
        self._plans: dict[int, Any] = {}
        ids = self._kv_layer_ids()
        self._last_layer = ids[-1] if ids else -1
        self._first_layer = ids[0] if ids else -1
        self._step_kv: tuple[list, list] = ([], [])  # an eager decode step's new K and V, layer by layer
        ops.register(self)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """``StaticCache.update``, then stream the new ``key_states``/``value_states`` ``[B, H, T_new, D]``."""
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self._streams:
            n = key_states.shape[-2]
            if n > self.layer_chunk_min_tokens:
                if torch.compiler.is_compiling():
                    torch.ops.kvstream.stream_layer(keys, key_states, value_states, layer_idx)
                else:
                    self._stream_new(layer_idx, key_states, value_states)
            elif torch.compiler.is_compiling():
                if layer_idx == self._last_layer:
                    ids = self._kv_layer_ids()
                    torch.ops.kvstream.stream_step([self.layers[l].keys for l in ids],
                                                   [self.layers[l].values for l in ids], layer_idx, n)
            else:  # eager: keep the step's new KV (what index_copy_ just wrote) for one stacked chunk
                step = self._step_kv
                if layer_idx == self._first_layer:
                    step[0].clear()
                    step[1].clear()
                step[0].append(key_states)
                step[1].append(value_states)
                if layer_idx == self._last_layer:
                    self._stream_step(n, keys.device, *step, new_kv=True)
        return keys, values

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

    def _stream_step(self, n: int, device: torch.device, keys: list | None = None, values: list | None = None,
                     new_kv: bool = False) -> None:
        """A short forward of ``n`` tokens: one chunk of every KV layer. ``new_kv`` (eager): ``keys``/``values``
        are the step's new KV of every KV layer (``[B, H, n, D]`` each), stacked by
        :meth:`~kvstream.streaming.streamer.KVStreamer.scatter_step`; otherwise (compiled) they are the static
        buffers the op was handed (``None``: the layers' own), packed at the step's positions by a plan."""
        self._finish_forward()
        streamer = self.streamer or self._ensure_streamer(device)
        start = self._forward_start(None, n)
        ids = self._kv_ids or self._kv_layer_ids()
        if new_kv and len(keys) != len(ids):  # not every KV layer was updated: pack from the layers' buffers
            keys = values = None
        elif new_kv:  # every KV layer's new KV
            first = keys[0]
            if self._batch is None:
                self._first_chunk(first.shape[0], first.shape[1], first.shape[3], values[0].shape[3], first.dtype)
            self._recorder.begin("all", start, n, self._batch)
            streamer.scatter_step(self._recorder.end_step(ids), keys, values, meta=self._chunk_meta)
            return
        plan = self._plan(n, keys, values)
        if self._batch is None:
            self._first_chunk(*plan.keys[0].shape[:2], *plan.head_dims, plan.dtype)
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
