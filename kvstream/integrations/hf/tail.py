"""Decode steps streamed in bulk: the newest tokens of ``steps_per_chunk`` steps go out as one chunk.

Every decode step adds one token per layer, and streaming it at once costs the host the same fixed work
(pack the new KV of every layer, one flush) whatever its size: ~85-93 us per step on the H200 host in a tight
loop (bench/NOTES.md, "Results, 2026-12-01 evening"), and 3-7x that inside a forward, where the host's caches are
cold and each driver call costs ~100 us ("sixth session"), against a step whose own cache updates take ~20 us a
layer.
The new tokens stay in the cache anyway, so the hook lets ``steps_per_chunk`` steps pass with no work but a
counter and then streams their tokens, still in the cache's layers, as one ``[L, 2, B, H, n, D]`` chunk (a
:class:`~kvstream.streaming.session.Step` segment of ``n`` tokens, which replays like any other). The host
pays that fixed work once per ``steps_per_chunk`` steps, at a step boundary (the "do it in bulk at
step boundaries" of DéjàVu's token path, amortized). Into a pinned HostTransport the chunk is one kernel that
packs those positions of every layer straight into the stored buffer
(:meth:`~kvstream.streaming.streamer.KVStreamer.scatter_positions`, zero-copy): a launch and two events.

What is streamed is always what the cache holds: anything that reads or rewrites history as a whole
(``wait``, ``manifest``, ``crop``, beam-search reorders, a long forward) first streams the pending steps.
A producer killed between two chunks loses at most ``steps_per_chunk - 1`` steps of the stored session;
``StreamingCache.load(recover=True)`` returns the positions that did land and ``generate`` recomputes the rest.

Once a tail has counted two eager steps in a row (a run of decode steps, not a short prompt's prefill, after
which ``generate`` may compile the decode steps), the hook is not even called on the layers between the first
and the last KV layer (:func:`hook_edges`): the cache's ``update`` is, for that time, an instance attribute
that goes straight to the layer's own ``update`` (what transformers' ``Cache.update`` does), and only the
first and last KV layers' ``update`` is an :class:`EdgeHook` that counts the step. Whatever is not a regular
step (a longer forward, another batch, a forward that starts past the first layer or stops before the last)
closes the tail, which removes the hooks (:func:`unhook_edges`) before the cache's own ``update`` handles it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any

#: Decode steps per chunk by default: the host's fixed cost per chunk (~90 us) amortized to ~6 us a step,
#: and at most 15 steps for a ``recover=True`` load to recompute.
STEPS_PER_CHUNK = 16


@dataclass
class StepTail:
    """Decode steps applied to the cache but not yet streamed: positions ``[start, start + tokens)`` of
    every KV layer, ``steps`` forwards of ``n`` tokens each.

    ``first``/``last`` are the first and last KV layer ids; ``layers`` the number of KV layers (a step is
    regular when each was updated once); ``seen`` counts the layers of the forward in progress; ``cap`` the
    most tokens the chunk may hold (a sliding-window layer keeps only its window's).
    """

    start: int
    batch: int
    first: int
    last: int
    layers: int
    n: int
    cap: int
    per_chunk: int
    tokens: int = 0
    steps: int = 0
    seen: int = 0

    def step_ended(self) -> bool:
        """The forward in progress reached the last KV layer: count it. Returns whether the pending steps are
        due to be streamed (``per_chunk`` of them, or the next would pass ``cap``). Raises nothing; an
        irregular forward (``seen != layers``) is for the caller to check before."""
        self.seen = 0
        self.tokens += self.n
        self.steps += 1
        return self.steps >= self.per_chunk or self.tokens + self.n > self.cap

    def taken(self) -> None:
        """The pending steps were streamed: the next chunk starts where they ended."""
        self.start += self.tokens
        self.tokens = 0
        self.steps = 0


def window_cap(layers, ids) -> int:
    """Most tokens a pending chunk may hold: a sliding-window layer keeps only its last ``sliding_window - 1``
    tokens (transformers' ``DynamicSlidingWindowLayer``), so a chunk must not be older than that."""
    caps = [int(layers[i].sliding_window) - 1 for i in ids if getattr(layers[i], "sliding_window", None)]
    return min(caps) if caps else 1 << 62


def _layer_update(layers: list, key_states, value_states, layer_idx: int, *args, **kwargs):
    """A decode step's update of a middle KV layer while an eager tail is open: the layer's own ``update``,
    as transformers' ``Cache.update`` calls it (the cache's lazy layers and HF offloading rule a tail out)."""
    return layers[layer_idx].update(key_states, value_states, *args, **kwargs)


class EdgeHook:
    """The ``update`` of the first or last KV layer while an eager tail is open: calls the cache's
    ``_edge_update(layer_idx, key_states, value_states, args, kwargs)``, which updates the layer and counts
    the step.

    It holds the cache by a weak reference: the cache holds its layers, and a cycle would keep a dropped
    cache's KV alive until the cyclic GC runs.
    """

    def __init__(self, cache: Any, layer_idx: int):
        self._cache = weakref.ref(cache)
        self._layer = weakref.ref(cache.layers[layer_idx])
        self.layer_idx = layer_idx

    def __call__(self, key_states, value_states, *args, **kwargs):
        cache = self._cache()
        if cache is None:  # the layer outlived its cache: it is a plain layer again
            layer = self._layer()
            layer.__dict__.pop("update", None)
            return layer.update(key_states, value_states, *args, **kwargs)
        return cache._edge_update(self.layer_idx, key_states, value_states, args, kwargs)


def edge_update(cache: Any, layer_idx: int, key_states, value_states, args: tuple, kwargs: dict):
    """An :class:`EdgeHook`'s work on ``cache`` (either flavour): the first or last KV layer's own update and the
    step's count. A first layer that does not start a step of ``t.n`` tokens of the tail's batch closes the tail
    (which removes the hooks) and goes through the cache's ``update``; a last layer whose forward did not begin
    at the first is the cache's ``_irregular_last(t, layer_idx, key_states, value_states, out)``. Returns the
    layer's ``(keys, values)``."""
    t = cache._tail
    layer = cache.layers[layer_idx]
    n = key_states.shape[-2]
    if layer_idx == t.first:
        if t.seen == 0 and n == t.n and key_states.shape[0] == t.batch:
            t.seen = 1
            out = type(layer).update(layer, key_states, value_states, *args, **kwargs)
            if layer_idx == t.last:
                t.seen = t.layers
                cache._tail_step_ended(t)
            return out
        cache._close_tail()  # a longer forward, another batch, or the last one stopped early
        return cache.update(key_states, value_states, layer_idx, *args, **kwargs)
    out = type(layer).update(layer, key_states, value_states, *args, **kwargs)
    if t.seen == 1 and n == t.n:
        t.seen = t.layers
        cache._tail_step_ended(t)
        return out
    return cache._irregular_last(t, layer_idx, key_states, value_states, out)


def hook_edges(cache: Any, t: StepTail) -> None:
    """Open the fast path of an eager tail on ``cache`` (see the module docstring): its ``update`` goes to the
    layers directly, its first and last KV layers' ``update`` is an :class:`EdgeHook`."""
    cache.update = partial(_layer_update, cache.layers)
    edges = sorted({t.first, t.last})
    for i in edges:
        cache.layers[i].update = EdgeHook(cache, i)
    cache._hooked = [cache.layers[i] for i in edges]


def unhook_edges(cache: Any) -> None:
    """Close the fast path (if open): the cache's and the edge layers' ``update`` are their classes' again."""
    layers, cache._hooked = cache._hooked, None
    if layers is None:
        return
    cache.__dict__.pop("update", None)
    for layer in layers:
        layer.__dict__.pop("update", None)


__all__ = ["STEPS_PER_CHUNK", "EdgeHook", "StepTail", "edge_update", "hook_edges", "unhook_edges", "window_cap"]
