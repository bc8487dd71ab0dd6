"""Offloading: KV history in pinned host memory, only the layers in flight on the GPU; within a budget, the
layers that fit stay resident.

Each step only the *new* tokens cross device→host (appended to the layer's :class:`~.mirror.HostMirror` on
a side stream), plus one host→device prefetch per offloaded layer, of the next offloaded layer while the
layers before it compute. HF's own offloaded cache instead copies each whole layer both ways every step
(``Cache.offload/prefetch`` in transformers' ``cache_utils.py``).

With ``gpu_budget_bytes`` (:class:`Offloader`) the layers whose KV fits in the budget stay on the GPU as
``DynamicCache`` keeps them, and only the rest is offloaded, so the cost grows with the offloaded fraction.
The offloaded layers are spread evenly over the depth (:func:`spread_order`): while the resident layers
between two offloaded ones compute, the next offloaded layer's copy runs, so a step costs about
``max(compute, offloaded bytes / PCIe bandwidth)`` rather than their sum (with the offloaded layers in one
block, their copies would have no compute to hide behind).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from ...cuda import Stream, side_stream
from ...errors import ConfigError
from .mirror import HostMirror


def spread_order(ids: list[int]) -> list[int]:
    """``ids`` in an order whose every prefix is spread evenly over them: each next id is the one farthest from
    those before it, counted around the ring of positions (a step's last offloaded layer and the next
    step's first one have the layers between them, wrapping around, to hide a copy); ties go to the lower id.

    Examples
    --------
    >>> spread_order(list(range(8)))
    [0, 4, 2, 6, 1, 3, 5, 7]
    """
    n = len(ids)
    if n == 0:
        return []
    gap = [min(j, n - j) for j in range(n)]  # distance of each position to the chosen ones (position 0 first)
    order = [0]
    while len(order) < n:
        nxt = max(range(n), key=lambda j: (gap[j], -j))
        order.append(nxt)
        gap = [min(g, abs(j - nxt), n - abs(j - nxt)) for j, g in enumerate(gap)]
    return [ids[j] for j in order]


class Offloader:
    """The offload state of one :class:`~kvstream.integrations.hf.cache.StreamingCache`: which layers live in
    host memory, their host mirrors, prefetched layers and the two side streams (``kvstream-offload`` for
    device→host appends, ``kvstream-prefetch`` for host→device prefetches).

    Parameters
    ----------
    cache : StreamingCache
        The cache whose ``layers`` this offloads (read through ``cache.layers`` and ``cache._kv_layer_ids()``).
    gpu_budget_bytes : int, optional
        Bytes of KV the full-attention layers may keep on the GPU. Before each forward the layers that do
        not fit (all layers hold the same tokens, so ``budget // bytes of one layer`` fit) move to host
        memory, the first ones of :func:`spread_order` first; a layer once offloaded stays offloaded (until
        ``reset``). The streaming working set comes on top: while a forward runs, at most two offloaded
        layers are on the GPU (the one computing and the next, prefetched), and a resident layer briefly
        holds its old and new KV while ``DynamicLayer.update`` concatenates. Sliding-window layers
        (bounded by their window) are never offloaded and not counted. ``None``: offload every
        full-attention layer.

    Raises
    ------
    ConfigError
        If ``gpu_budget_bytes`` is not a non-negative int.
    """

    def __init__(self, cache: Any, gpu_budget_bytes: int | None = None):
        if gpu_budget_bytes is not None and (isinstance(gpu_budget_bytes, bool) or not isinstance(gpu_budget_bytes, int)
                                             or gpu_budget_bytes < 0):
            raise ConfigError(f"gpu_budget_bytes must be a non-negative int of bytes, got {gpu_budget_bytes!r}")
        self._cache = cache
        self.gpu_budget_bytes = gpu_budget_bytes
        self._mirrors: dict[int, HostMirror] = {}
        self._host_ids: list[int] = []  # layers with a mirror, ascending
        self._prefetched: dict[int, tuple] = {}
        self._side: Stream | None = None
        self._prefetch_stream: Stream | None = None
        self._order: list[int] = []  # offloadable layers in the order they are offloaded
        self._planned: set[int] = set()  # layers to offload: a prefix of _order
        self._plan_key: tuple | None = None

    @property
    def active(self) -> bool:
        """Whether any layer's history lives in host memory."""
        return bool(self._mirrors)

    @property
    def offloaded_layers(self) -> list[int]:
        """The layers whose history lives in host memory, ascending."""
        return list(self._host_ids)

    def clear(self) -> None:
        """Forget every mirror, prefetch and plan (the cache was reset)."""
        self._mirrors.clear()
        self._host_ids.clear()
        self._prefetched.clear()
        self._planned.clear()
        self._plan_key = None

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

    def _plan(self, layer: Any, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Extend the set of offloaded layers to what the budget needs once this forward's tokens are in."""
        tokens = layer.get_seq_length() + k_new.shape[-2]
        ids = self._cache._kv_layer_ids()
        key = (tokens, k_new.shape[0], len(ids))
        if key == self._plan_key:
            return
        self._plan_key = key
        if len(self._order) != len(ids) or not self._order:
            self._order = spread_order([i for i in ids if self._offloadable(self._cache.layers[i])])
        if self.gpu_budget_bytes is None:
            count = len(self._order)
        else:
            b, h = k_new.shape[0], k_new.shape[1]
            layer_bytes = b * h * tokens * (k_new.shape[-1] + v_new.shape[-1]) * k_new.element_size()
            count = len(self._order) - min(len(self._order), self.gpu_budget_bytes // max(layer_bytes, 1))
        if count > len(self._planned):
            self._planned.update(self._order[:count])

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, layer_idx: int, *args, **kwargs):
        """The layer's ``update``: ``DynamicLayer.update`` for a resident layer; for an offloaded one (or one
        the budget offloads now) its history comes from host memory, and the device ``(keys, values)``
        ``[B, H, n + n_new, D]`` for this forward are returned while the new tokens go to the host mirror on a
        side stream and the next offloaded layer is prefetched."""
        layer = self._cache.layers[layer_idx]
        if not self._offloadable(layer):
            return layer.update(k_new, v_new, *args, **kwargs)
        mirror = self._mirrors.get(layer_idx)
        if mirror is None:
            self._plan(layer, k_new, v_new)
            if layer_idx not in self._planned:
                return layer.update(k_new, v_new, *args, **kwargs)
        device = k_new.device
        side, _ = self._streams(device)
        n_new = k_new.shape[-2]
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
        else:  # the layer's first update, or a resident layer the budget offloads now: all its tokens go
            keys, values = layer.update(k_new, v_new, *args, **kwargs)
            mirror = self._add_mirror(layer_idx, keys, values)
        # the tokens the host lacks go to host memory on the side stream, after the compute that made them
        mirror.append_after_compute(keys, values, keys.shape[-2] - mirror.n, side)
        layer.keys, layer.values = mirror.views()
        self._prefetch_next(layer_idx, device)
        return keys, values

    def _add_mirror(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> HostMirror:
        mirror = self._mirrors[layer_idx] = HostMirror(keys, capacity=max(2 * keys.shape[2], 64), values_like=values)
        self._host_ids = sorted(self._mirrors)
        self._planned.add(layer_idx)
        return mirror

    def _prefetch_next(self, layer_idx: int, device: torch.device) -> None:
        ids = self._host_ids
        if not ids:
            return
        nxt = next((i for i in ids if i > layer_idx), ids[0])
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
        """Move a layer's device KV (a loaded session) into a host mirror if the budget offloads it; the layer
        then views the mirror."""
        layer = self._cache.layers[layer_idx]
        if not self._offloadable(layer):
            return
        k, v = layer.keys, layer.values
        self._plan(layer, k[:, :, :0], v[:, :, :0])
        if layer_idx not in self._planned:
            return
        m = self._add_mirror(layer_idx, k, v)
        side, _ = self._streams(k.device)
        m.append(k, v, k.shape[2], side)
        if m.ready is not None:
            m.ready.synchronize()
        layer.keys, layer.values = m.views()


__all__ = ["Offloader", "HostMirror", "spread_order"]
