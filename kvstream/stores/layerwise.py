"""Layer-by-layer prefix loads: the :class:`LayerwiseLoad` a store hands out, and the side-stream loop behind it.

A prefix load of many layers need not land all at once: prefill of layer ``l`` needs only layer ``l``'s KV.
So a store that can address one layer's bytes copies layer 0 first, then layer 1, ..., on a side stream,
recording one event per layer; the compute stream waits for each layer's event just before it uses the
layer, while later layers still travel (LMCache's layer-wise mode, SGLang's HiCache layer-wise loading;
FlashInfer's ``plan()`` once / ``run()`` per layer shape). :func:`enqueue_layers` is that loop, written
once: the store says how one layer's KV is copied (:class:`~kvstream.stores.radix.RadixStore`: pitched
copies of its token-major blobs), the loop owns allocation, stream order, events and errors.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from ..cuda import Event, Stream, side_stream
from ..errors import ConfigError
from ..layout import KVLayout
from ..streaming.layerwise import LayerwiseLoad

#: ``layer_loader(device, matched_tokens, stream) -> (LayerwiseLoad, hold)``; ``stream`` is a
#: ``torch.cuda.Stream`` of ``device`` (``None`` on the CPU); the loader allocates on the current stream,
#: then makes ``stream`` wait for the current stream before its first copy (:func:`enqueue_layers` does
#: both); ``hold`` is what the copies still use (device staging), kept by the match until it is released.
LayerLoader = Callable[[torch.device, int, "torch.cuda.Stream | None"], "tuple[LayerwiseLoad, Any]"]

#: ``copy_layer(layer, kv)``: enqueue on the current stream the copies that fill ``kv``
#: ``[2, 1, kv_heads, tokens, head_dim]`` with layer ``layer``'s keys (``kv[0]``) and values (``kv[1]``).
CopyLayer = Callable[[int, torch.Tensor], None]

#: Name of the process-wide side stream (:func:`kvstream.cuda.side_stream`) layer-wise loads use
#: when the caller names none.
PREFIX_STREAM = "kvstream-prefix"


def load_stream(device: torch.device, stream: Any) -> "torch.cuda.Stream | None":
    """The torch view of the side stream a layer-wise load onto ``device`` uses (``None`` on the CPU).

    Parameters
    ----------
    device : torch.device
        The load's device (a CUDA device with its index, or the CPU).
    stream : kvstream.cuda.Stream, torch.cuda.Stream or None
        The caller's side stream; ``None``: ``side_stream(device, PREFIX_STREAM)``. Ignored on the CPU.

    Raises
    ------
    TypeError
        If ``stream`` is not a stream.
    ConfigError
        If ``stream`` is inert or belongs to another device.
    """
    if stream is not None and not isinstance(stream, (Stream, torch.cuda.Stream)):
        raise TypeError("stream must be a kvstream.cuda.Stream or torch.cuda.Stream, "
                        f"got {type(stream).__name__}")
    if device.type != "cuda":
        return None
    if stream is None:
        stream = side_stream(device, PREFIX_STREAM)
    if isinstance(stream, Stream):
        if not stream.is_cuda:
            raise ConfigError(f"load_layers onto {device} needs a CUDA stream; got an inert one of {stream.device}")
        stream = stream.torch_stream
    if stream.device != device:
        raise ConfigError(f"load_layers onto {device} was given a stream of {stream.device}")
    return stream


def enqueue_layers(layout: KVLayout, n_tokens: int, device: torch.device, stream: "torch.cuda.Stream | None",
                   copy_layer: CopyLayer, *, start: int = 0) -> LayerwiseLoad:
    """Allocate every layer's destination, then enqueue layer by layer, on ``stream``, its copies and its event.

    The destinations are allocated on the **current** stream (the compute stream); ``stream`` then waits
    for the current stream, so that memory the caching allocator handed back is no longer used by
    compute when a copy lands. Per layer, layer 0 first: ``copy_layer(layer, kv)`` with ``stream`` as
    the current stream, then the layer's event. On the CPU (``stream`` ``None``) the same steps run
    synchronously and the events are inert.

    Parameters
    ----------
    layout : kvstream.layout.KVLayout
        Layers, ``kv_heads``, ``head_dim`` and dtype of the stored KV.
    n_tokens : int
        Tokens to load per layer.
    device : torch.device
        Where the KV goes (a CUDA device with its index, or the CPU).
    stream : torch.cuda.Stream or None
        The side stream of ``device`` (:func:`load_stream`); ``None`` on the CPU.
    copy_layer : callable
        See :data:`CopyLayer`. Whatever else it writes (staging) must be allocated before this call, on
        the compute stream, and kept by the caller until the load has landed.
    start : int
        The first token's position in the prefix (the load holds tokens ``[start, start + n_tokens)``).

    Returns
    -------
    LayerwiseLoad
        Per layer, ``keys[l]`` and ``values[l]`` are the halves of one contiguous
        ``[2, 1, kv_heads, n_tokens, head_dim]`` allocation.

    Raises
    ------
    Exception
        Whatever ``copy_layer`` raises, after the copies already enqueued have finished (they may read
        memory the caller frees while unwinding).
    """
    shape = (2, 1, layout.kv_heads, int(n_tokens), layout.head_dim)
    kvs = [torch.empty(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)]
    events = [Event(device) for _ in range(layout.num_layers)]
    ctx = contextlib.nullcontext()
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device))
        ctx = torch.cuda.stream(stream)
    try:
        with ctx:
            for layer, kv in enumerate(kvs):
                copy_layer(layer, kv)
                events[layer].record(stream)
    except BaseException:
        if stream is not None:  # copies in flight read the source: let them finish before unwinding
            stream.synchronize()
        raise
    return LayerwiseLoad([kv[0] for kv in kvs], [kv[1] for kv in kvs], events, start + n_tokens, stream=stream,
                         start=start)


__all__ = ["LayerwiseLoad", "LayerLoader", "CopyLayer", "PREFIX_STREAM", "load_stream", "enqueue_layers"]
