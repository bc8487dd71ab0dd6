"""Offloading: every layer's KV history in pinned host memory, only the layer in flight and the next on the GPU.

Each step only the *new* tokens cross device→host (appended to the layer's host mirror on a side stream),
plus one host→device prefetch per layer, of layer ``l + 1`` while layer ``l`` computes. HF's own
offloaded cache instead copies each whole layer both ways every step (``Cache.offload/prefetch`` in
transformers' ``cache_utils.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from ...cuda import Event, Stream, host_empty, memcpy_2d_async, side_stream


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """``[B, H, T, D]`` as a ``[B * H, T * D]`` view with one row pitch, or ``None`` if no such view exists."""
    b, h, n, d = t.shape
    try:
        return t.view(b * h, n * d)
    except RuntimeError:
        return None


class HostMirror:
    """One layer's KV history in pinned host memory, ``[B, H, capacity, D]`` for K and for V.

    Parameters
    ----------
    like : torch.Tensor
        A ``[B, H, T, D]`` KV tensor giving rows, heads, head_dim and dtype; pinned when it is on CUDA.
    capacity : int
        Tokens the host buffers hold before :meth:`append` grows them (a grow synchronizes).

    Used by :class:`Offloader` (layer by layer within a forward) and by the pipeline engine's microbatch
    swapping (:mod:`kvstream.serving.pipeline.swap`).
    """

    def __init__(self, like: torch.Tensor, capacity: int):
        b, h, _, d = like.shape
        self.shape = (b, h, d)
        self.dtype = like.dtype
        self.n = 0
        self.k = host_empty((b, h, capacity, d), like.dtype, pin=like.is_cuda)
        self.v = host_empty((b, h, capacity, d), like.dtype, pin=like.is_cuda)
        self.ready: Event | None = None  # the last append's completion

    @property
    def capacity(self) -> int:
        """Tokens the host buffers can hold before they grow."""
        return self.k.shape[2]

    def _grow(self, need: int) -> None:
        if need <= self.capacity:
            return
        if self.ready is not None:
            self.ready.synchronize()
        cap = max(need, 2 * self.capacity)
        b, h, d = self.shape
        for name in ("k", "v"):
            old = getattr(self, name)
            new = host_empty((b, h, cap, d), self.dtype, pin=old.is_pinned())
            new[:, :, :self.n].copy_(old[:, :, :self.n])
            setattr(self, name, new)

    def append(self, keys: torch.Tensor, values: torch.Tensor, n_new: int, stream: Stream | None) -> None:
        """Copy the newest ``n_new`` tokens of the device tensors ``keys``/``values`` ``[B, H, n + n_new, D]``."""
        self._grow(self.n + n_new)
        b, h, d = self.shape
        for src, dst in ((keys, self.k), (values, self.v)):
            s = src[:, :, self.n:self.n + n_new]
            t = dst[:, :, self.n:self.n + n_new]
            s2, t2 = _rows(s), _rows(t)
            if s2 is not None and t2 is not None:
                memcpy_2d_async(t2, s2, stream)
            else:  # rows not expressible as one pitched copy (an unusual stride): let torch copy
                t.copy_(s, non_blocking=True)
        if stream is not None and stream.is_cuda:
            self.ready = stream.record_event()
        self.n += n_new

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Host views ``[B, H, n, D]`` of the stored history, keys and values."""
        return self.k[:, :, :self.n], self.v[:, :, :self.n]

    def to_device(self, device: torch.device, extra: int, stream: Stream | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Device tensors ``[B, H, n + extra, D]`` whose first ``n`` tokens are this history (copied on ``stream``)."""
        b, h, d = self.shape
        out = []
        for src in (self.k, self.v):
            buf = torch.empty(b, h, self.n + extra, d, dtype=self.dtype, device=device)
            memcpy_2d_async(_rows(buf[:, :, :self.n]), _rows(src[:, :, :self.n]), stream)
            out.append(buf)
        return out[0], out[1]

    def append_after_compute(self, keys: torch.Tensor, values: torch.Tensor, n_new: int, stream: Stream | None) -> None:
        """:meth:`append` on ``stream`` once the current stream's work so far (the compute that made the
        tokens) is done; the device tensors are marked as used there. ``stream=None``: a plain append."""
        if stream is None or not stream.is_cuda:
            self.append(keys, values, n_new, None)
            return
        stream.wait_stream()
        keys.record_stream(stream.torch_stream)
        values.record_stream(stream.torch_stream)
        with stream:
            self.append(keys, values, n_new, stream)

    def prefetch(self, device: torch.device, extra: int, stream: Stream | None) -> tuple[torch.Tensor, torch.Tensor, Event | None]:
        """:meth:`to_device` on ``stream`` after the last append, for use on the current stream.

        Returns ``(keys, values, ready)``: ``ready.wait()`` makes the current stream wait for the copy;
        ``ready`` is ``None`` when the copy already finished (``stream=None``: a synchronous copy).
        """
        if stream is None or not stream.is_cuda:
            k, v = self.to_device(device, extra, None)
            return k, v, None
        if self.ready is not None:
            stream.wait_event(self.ready)
        with stream:
            k, v = self.to_device(device, extra, stream)
        compute = torch.cuda.current_stream(device)
        k.record_stream(compute)
        v.record_stream(compute)
        return k, v, stream.record_event()

    def apply(self, fn) -> None:
        """Replace both buffers by ``fn(view)`` (row ops such as index_select), keeping capacity semantics."""
        if self.ready is not None:
            self.ready.synchronize()
        k, v = fn(self.k[:, :, :self.n]), fn(self.v[:, :, :self.n])
        self.shape = (k.shape[0], k.shape[1], k.shape[3])
        self.n = 0
        cap = max(k.shape[2], 1)
        self.k = host_empty((*k.shape[:2], cap, k.shape[3]), k.dtype, pin=self.k.is_pinned())
        self.v = host_empty((*v.shape[:2], cap, v.shape[3]), v.dtype, pin=self.v.is_pinned())
        self.k[:, :, :k.shape[2]].copy_(k)
        self.v[:, :, :v.shape[2]].copy_(v)
        self.n = k.shape[2]


class Offloader:
    """The offload state of one :class:`~kvstream.integrations.hf.cache.StreamingCache`: host mirrors,
    prefetched layers and the two side streams (``kvstream-offload`` for device→host appends,
    ``kvstream-prefetch`` for host→device prefetches).

    Parameters
    ----------
    cache : StreamingCache
        The cache whose ``layers`` this offloads (read through ``cache.layers`` and ``cache._kv_layer_ids()``).
    """

    def __init__(self, cache: Any):
        self._cache = cache
        self._mirrors: dict[int, HostMirror] = {}
        self._prefetched: dict[int, tuple] = {}
        self._side: Stream | None = None
        self._prefetch_stream: Stream | None = None

    @property
    def active(self) -> bool:
        """Whether any layer's history lives in host memory."""
        return bool(self._mirrors)

    def clear(self) -> None:
        """Forget every mirror and prefetch (the cache was reset)."""
        self._mirrors.clear()
        self._prefetched.clear()

    @staticmethod
    def _offloadable(layer: Any) -> bool:
        return isinstance(layer, DynamicLayer) and not getattr(layer, "is_sliding", False)

    def _streams(self, device: torch.device) -> tuple[Stream | None, Stream | None]:
        if device.type != "cuda":
            return None, None
        if self._side is None:
            self._side = side_stream(device, "kvstream-offload")
            self._prefetch_stream = side_stream(device, "kvstream-prefetch")
        return self._side, self._prefetch_stream

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, layer_idx: int, *args, **kwargs):
        """The layer's ``update`` with its history in host memory: returns device ``(keys, values)``
        ``[B, H, n + n_new, D]`` for this forward, appends the new tokens to the host mirror on a side stream
        and prefetches the next layer."""
        layer = self._cache.layers[layer_idx]
        if not self._offloadable(layer):
            return layer.update(k_new, v_new, *args, **kwargs)
        device = k_new.device
        side, _ = self._streams(device)
        n_new = k_new.shape[-2]
        mirror = self._mirrors.get(layer_idx)
        if mirror is not None and mirror.n > 0:
            pf = self._prefetched.pop(layer_idx, None)
            if pf is None:  # not prefetched: fetch now on the current stream
                if mirror.ready is not None:
                    mirror.ready.wait()
                kbuf, vbuf = mirror.to_device(device, n_new, None)
                extra = n_new
            else:
                kbuf, vbuf, extra, event = pf
                if event is not None:
                    event.wait()  # the compute stream waits for the prefetch, the host does not
            if extra == n_new:
                kbuf[:, :, mirror.n:].copy_(k_new)
                vbuf[:, :, mirror.n:].copy_(v_new)
                layer.keys, layer.values = kbuf, vbuf
                keys, values = kbuf, vbuf
            else:
                layer.keys, layer.values = kbuf[:, :, :mirror.n], vbuf[:, :, :mirror.n]
                keys, values = layer.update(k_new, v_new, *args, **kwargs)
        else:
            keys, values = layer.update(k_new, v_new, *args, **kwargs)
            mirror = self._mirrors[layer_idx] = HostMirror(keys, capacity=max(2 * keys.shape[2], 64))
        # the newest tokens go to host memory on the side stream, after the compute that made them
        mirror.append_after_compute(keys, values, n_new, side)
        layer.keys, layer.values = mirror.views()
        self._prefetch_next(layer_idx, device)
        return keys, values

    def _prefetch_next(self, layer_idx: int, device: torch.device) -> None:
        ids = [i for i in self._cache._kv_layer_ids() if self._offloadable(self._cache.layers[i]) and i in self._mirrors]
        if not ids:
            return
        later = [i for i in ids if i > layer_idx]
        nxt = later[0] if later else ids[0]
        if nxt == layer_idx or nxt in self._prefetched:
            return
        mirror = self._mirrors[nxt]
        _, pstream = self._streams(device)
        k, v, ready = mirror.prefetch(device, 1, pstream)
        self._prefetched[nxt] = (k, v, 1, ready)

    def apply(self, fn) -> None:
        """Apply a batch-row operation (reorder, select, repeat) to every host mirror."""
        if not self._mirrors:
            return
        self._prefetched.clear()
        for l, m in self._mirrors.items():
            m.apply(fn)
            self._cache.layers[l].keys, self._cache.layers[l].values = m.views()

    def adopt(self, layer_idx: int) -> None:
        """Move a layer's device KV (a loaded session) into a host mirror; the layer then views the mirror."""
        layer = self._cache.layers[layer_idx]
        if not self._offloadable(layer):
            return
        k, v = layer.keys, layer.values
        m = HostMirror(k, capacity=max(2 * k.shape[2], 64))
        side, _ = self._streams(k.device)
        m.append(k, v, k.shape[2], side)
        if m.ready is not None:
            m.ready.synchronize()
        self._mirrors[layer_idx] = m
        layer.keys, layer.values = m.views()


__all__ = ["Offloader", "HostMirror"]
