"""Loads that land layer by layer: per-layer tensors written on a side stream, one event per layer.

The shape of every load kvstream hands to a running model (a stored session, a stored prefix): the
model's layer ``l`` waits for ``events[l]`` only, so copies of later layers overlap the computation of
earlier ones (FlashInfer's plan-once/run-per-layer shape; LMCache's layer-wise mode; SGLang HiCache).
"""

from __future__ import annotations

from typing import Any

import torch

from ..cuda import Stream
from ..errors import ConfigError, LayoutError


class LayerwiseLoad:
    """A load in flight, layer by layer: per-layer tensors that land in order, one event per layer.

    Returned by :meth:`PrefixMatch.load_layers <kvstream.stores.match.PrefixMatch.load_layers>` and
    :func:`kvstream.streaming.replay.replay`. Layer ``l``'s tensors hold its KV once ``events[l]`` has
    completed; before that they are allocated but (on a CUDA device) still being written by the side
    stream. Read a layer only from a stream that waited for its event (:meth:`wait`), or after
    :meth:`synchronize`. Events complete in layer order (one side stream, layer 0 first).

    Attributes
    ----------
    keys, values : list of torch.Tensor
        One ``[batch, kv_heads, matched_tokens, head_dim]`` tensor per layer on the load device, dtype of the
        stored KV (a prefix has batch 1). From a store that loads layer by layer, ``keys[l]`` and
        ``values[l]`` are the two
        (contiguous) halves of one ``[2, 1, kv_heads, matched_tokens, head_dim]`` allocation made on the
        stream that was current at :meth:`PrefixMatch.load_layers` (the compute stream); otherwise they
        are :meth:`PrefixMatch.load`'s views of one packed tensor (stride 1 on ``head_dim``). The match
        keeps this object (so a layer's memory cannot be reused while the side stream still writes it)
        until :meth:`take` hands the layer over or the match is released; :meth:`take` from the compute
        stream lets each layer's memory go as soon as the caller drops it.
    events : list
        One per layer, each with ``wait(stream=None)`` (make ``stream``, default the current stream, wait
        without blocking the host), ``synchronize()`` (block the host) and ``query()`` (completed?):
        :class:`kvstream.cuda.Event` objects; inert (always complete) on the CPU. A store that
        loads synchronously gives every layer the same event.
    matched_tokens : int
        End of the tokens loaded (a prefix after a shortened read: what was read intact; a session: its length).
    start : int
        First token loaded: the tensors hold tokens ``[start, matched_tokens)`` (0 unless a prefix was
        loaded from ``start`` on, the load half of a compute/load split).
    stream : torch.cuda.Stream or None
        The side stream the copies were enqueued on (``None`` when the load was synchronous).

    Examples
    --------
    >>> with store.lookup(input_ids, max_tokens=T - 1) as match:                       # doctest: +SKIP
    ...     load = match.load_layers("cuda")         # returns at once; layer 0 is copied first
    ...     for l in range(len(load)):
    ...         k, v = load.take(l)                  # the compute stream waits for layer l only
    ...         attend(k, v)
    """

    __slots__ = ("keys", "values", "events", "matched_tokens", "stream", "start")

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], events: list[Any], matched_tokens: int,
                 stream: "torch.cuda.Stream | None" = None, *, start: int = 0):
        if not len(keys) == len(values) == len(events):
            raise LayoutError(f"LayerwiseLoad: {len(keys)} keys, {len(values)} values and {len(events)} events; "
                              "expected one of each per layer")
        self.keys = keys
        self.values = values
        self.events = events
        self.matched_tokens = int(matched_tokens)
        self.stream = stream
        self.start = int(start)

    def __len__(self) -> int:
        return len(self.events)

    def wait(self, layer: int, stream: "Stream | torch.cuda.Stream | None" = None) -> None:
        """Make ``stream`` (default: the current stream) wait for layer ``layer``'s copy; the host does not block."""
        self.events[layer].wait(stream)

    def take(self, layer: int, stream: "Stream | torch.cuda.Stream | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`wait` for layer ``layer``, then hand its ``(keys, values)`` over to the caller.

        Afterwards ``keys[layer]`` and ``values[layer]`` are ``None`` here: neither this load nor its match
        keeps the tensors alive, so they are freed when the caller drops them. Call it with the stream
        that was current at :meth:`PrefixMatch.load_layers` (the default, when it still is): the
        tensors were allocated there, and the caching allocator reuses their memory on that stream,
        which now waits for the copy.

        Raises
        ------
        ConfigError
            If the layer was already taken.
        """
        k, v = self.keys[layer], self.values[layer]
        if k is None:
            raise ConfigError(f"LayerwiseLoad: layer {layer} was already taken")
        self.wait(layer, stream)
        self.keys[layer] = self.values[layer] = None
        return k, v

    def synchronize(self) -> None:
        """Block the host until every layer has landed (the last layer's event: they complete in order)."""
        if self.events:
            self.events[-1].synchronize()

    def ready(self) -> bool:
        """Whether every layer has landed (never blocks)."""
        return all(e.query() for e in self.events)

    def __repr__(self) -> str:
        return f"LayerwiseLoad(layers={len(self)}, start={self.start}, matched_tokens={self.matched_tokens})"


__all__ = ["LayerwiseLoad"]
