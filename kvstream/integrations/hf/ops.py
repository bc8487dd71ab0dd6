"""The static cache's streaming calls as torch custom ops, so that a compiled forward keeps them whole.

``torch.compile`` would break the graph at kvstream's Python (locks, exceptions, per-step key strings) and
recompile once per key; a custom op is one opaque node instead: Dynamo traces only its fake (a no-op
returning nothing), and at run time the compiled code calls the real implementation, which finds the
cache by the address of the static buffer it was handed and runs the eager streaming code on real tensors.
No per-cache value reaches the graph, so a new cache (a new ``generate`` call) reuses the compiled graph.

The ops are marked side-effectful (``torch.fx.node.has_side_effect``: nothing reads their result, and
dead-code elimination would drop them) and ``cudagraph_unsafe`` where torch has that tag: under
``mode="reduce-overhead"`` (what ``generate`` picks for a static cache on a GPU) Inductor keeps them out
of its CUDA graphs, so they run at every step rather than only while a graph is captured.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch

from ...errors import ConfigError

_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()  # every StreamingStaticCache alive
_BY_PTR: dict[int, "weakref.ref[Any]"] = {}         # static key buffer address -> its cache
_PURGE_AT = 4096


def register(cache: Any) -> None:
    """Make ``cache`` findable by the ops (called by its constructor; held weakly)."""
    _LIVE.add(cache)


def _holds(cache: Any, layer_idx: int, ptr: int) -> bool:
    layers = cache.layers
    return layer_idx < len(layers) and layers[layer_idx].keys is not None and layers[layer_idx].keys.data_ptr() == ptr


def owner(keys: torch.Tensor, layer_idx: int) -> Any:
    """The live streaming cache whose layer ``layer_idx`` holds the key buffer ``keys`` (else the only fresh
    one, else the only one).

    Raises
    ------
    ConfigError
        If no live StreamingStaticCache holds that buffer and there is more than one candidate.
    """
    ptr = keys.data_ptr()
    ref = _BY_PTR.get(ptr)
    cache = ref() if ref is not None else None
    if cache is None or not _holds(cache, layer_idx, ptr):
        live = [c for c in list(_LIVE) if c._streams]
        cache = next((c for c in live if _holds(c, layer_idx, ptr)), None)
        if cache is None:
            # A compiled prefill allocates the buffers inside the graph (the layers get them after it), and a
            # backend that does not write the cache in place hands over copies: then the one fresh cache, or
            # the one streaming cache alive, is the owner.
            fresh = [c for c in live if layer_idx < len(c.layers) and c.layers[layer_idx].keys is None]
            if len(fresh) == 1:
                return fresh[0]
            if len(live) == 1:
                return live[0]
            raise ConfigError(f"kvstream: a compiled forward streamed layer {layer_idx} of a buffer that none of the "
                              f"{len(live)} live StreamingStaticCaches holds; with several caches alive, compile "
                              "with a backend that updates the cache in place (inductor, the default) and call "
                              "cache.early_initialization(...) before a compiled prefill")
        if len(_BY_PTR) > _PURGE_AT:
            for p in [p for p, r in _BY_PTR.items() if r() is None]:
                del _BY_PTR[p]
        _BY_PTR[ptr] = weakref.ref(cache)
    return cache


_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()
_OP_OPTIONS = {"mutates_args": ()}
if _TAGS and "tags" in inspect.signature(torch.library.custom_op).parameters:
    _OP_OPTIONS["tags"] = _TAGS


@torch.library.custom_op("kvstream::stream_layer", **_OP_OPTIONS)
def stream_layer(keys: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> None:
    """A long forward's new KV of one layer (``key_states``/``value_states`` ``[B, H, T, D]``), streamed by the
    cache that holds ``keys`` (that layer's static buffer)."""
    cache = owner(keys, layer_idx)
    if cache._level < 2:
        # levels 0-1 keep the new KV until the forward ends, and a compiled graph reuses its intermediates
        key_states, value_states = key_states.clone(), value_states.clone()
    cache._stream_new(layer_idx, key_states, value_states)


@stream_layer.register_fake
def _stream_layer_fake(keys, key_states, value_states, layer_idx) -> None:
    return None


@torch.library.custom_op("kvstream::stream_step", **_OP_OPTIONS)
def stream_step(keys: list[torch.Tensor], values: list[torch.Tensor], layer_idx: int, num_tokens: int) -> None:
    """A short forward of ``num_tokens`` tokens, streamed as one chunk of every layer by the cache whose last
    KV layer ``layer_idx`` holds ``keys[-1]``. ``keys``/``values`` are the KV layers' buffers after the
    forward's updates: the chunk is read from them (so the compiler orders the op after the updates)."""
    owner(keys[-1], layer_idx)._stream_step(num_tokens, keys[-1].device, keys, values)


@stream_step.register_fake
def _stream_step_fake(keys, values, layer_idx, num_tokens) -> None:
    return None


_mark = getattr(torch.fx.node, "has_side_effect", None)
for _op in (torch.ops.kvstream.stream_layer.default, torch.ops.kvstream.stream_step.default):
    if _mark is not None:
        _mark(_op)
    else:  # older torch: the set behind it
        torch.fx.node._side_effectful_functions.add(_op)


__all__ = ["register", "owner", "stream_layer", "stream_step"]
