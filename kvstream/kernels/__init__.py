"""Pack and unpack KV cache regions: Triton kernels on CUDA, torch twins on the CPU.

A step of a chunk's path (layout → chunk → **kernels** → streaming → transports): a region of per-layer KV
tensors becomes one contiguous chunk (pack) and back (unpack), for every layer and both K and V in one
launch. Three families:

========================  ===================================================  ==================================
op                        from / to                                            chunk shape
========================  ===================================================  ==================================
``pack_tokens``           token range of HF-layout layers (prefill streaming)   ``[L, 2, B, H, T, head_dim]``
``pack_newest``           newest ``n`` tokens of every layer (decode streaming) ``[L, 2, B, H, n, head_dim]``
``pack_blocks``           paged blocks by id (vLLM/FlashInfer NHD)              ``[L, 2, nb, block_size, H, head_dim]``
========================  ===================================================  ==================================

each with its ``unpack_*`` inverse. Keys and values of different head dims (MLA: per layer ``[B, H, S, Dk]``
and ``[B, H, S, Dv]``) pack in the same launch into ``[L, B, H, T, Dk + Dv]`` (``[L, nb, block_size, H,
Dk + Dv]`` paged): each row's keys, then its values (:data:`kvstream.layout.PACKED_SPLIT_AXES`;
:func:`kvstream.layout.packed_kv` gives the two parts). ``backend`` picks the implementation: ``"auto"`` runs the Triton kernels
for CUDA tensors (a token region of one layer with its chunk on the GPU: one ``torch.stack`` of its two
views, or the twin's two copies for K and V of different head dims, cheaper on the host than a launch) and the torch twins (:mod:`kvstream.kernels.reference`) for CPU tensors; ``"triton"``
forces the kernels (on CPU tensors only under ``TRITON_INTERPRET=1``, else :class:`ConfigError`);
``"torch"`` forces the twins. Both produce identical bytes.

Examples
--------
>>> import torch
>>> from kvstream.layout import Region
>>> from kvstream import kernels
>>> keys = [torch.randn(2, 4, 10, 8) for _ in range(3)]
>>> values = [torch.randn(2, 4, 10, 8) for _ in range(3)]
>>> chunk = kernels.pack_tokens(keys, values, Region(layers=(0, 3), tokens=(2, 6)))
>>> tuple(chunk.shape)
(3, 2, 2, 4, 4, 8)
>>> kernels.unpack_tokens(chunk, keys, values, Region(layers=(0, 3), tokens=(2, 6)))
"""

from __future__ import annotations

import importlib
from typing import Sequence

import torch

from ..errors import ConfigError, LayoutError
from ..layout import Region, check_hf_layers
from . import reference

BACKENDS = ("auto", "triton", "torch")


def _impl(op: str, module: str, backend: str, tensors: Sequence[torch.Tensor]):
    """The function that runs ``op``: the Triton launcher in ``kvstream.kernels.<module>`` or its torch twin."""
    if backend not in BACKENDS:
        raise ConfigError(f"Unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return getattr(reference, op)
    if backend == "auto":
        try:
            first = tensors[0]
        except (IndexError, TypeError, KeyError):
            raise LayoutError(f"{op}: no per-layer tensors given") from None
        if not isinstance(first, torch.Tensor) or first.device.type != "cuda":
            return getattr(reference, op)
    # Imported on first use: triton reads TRITON_INTERPRET when the kernels are defined.
    return getattr(importlib.import_module(f"{__name__}.{module}"), op)


def _one_layer_on_device(region: Region, keys: Sequence[torch.Tensor], chunk: torch.Tensor | None) -> bool:
    """Whether ``"auto"`` takes the torch twin for a CUDA region: one layer, chunk on the KV's device.

    Such a region is two strided copies, which torch enqueues with less host time than the kernel's pointer
    table and launch (a 4 MiB one-layer ``scatter`` went from ~440 to ~120-140 us of host time on an H200 host
    with this and the streamer's other cuts, bench/NOTES.md); a chunk in pinned host memory keeps the kernel,
    which reads and writes it in place without a host sync.
    """
    try:
        one = len(region.layers) == 1
        first = keys[region.layers.start]
    except (AttributeError, TypeError, IndexError, KeyError):
        return False  # the launcher raises the right error
    return (one and isinstance(first, torch.Tensor) and first.is_cuda
            and (chunk is None or (isinstance(chunk, torch.Tensor) and chunk.device == first.device)))


def _stack_one_layer(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], region: Region) -> torch.Tensor:
    """The ``[1, 2, B, H, T, D]`` chunk of a resolved one-layer region as one ``torch.stack`` of its K and V views
    (one call where the twin allocates and copies twice)."""
    l = region.layers.start
    sl = (slice(region.batch.start, region.batch.stop), slice(region.heads.start, region.heads.stop),
          slice(region.tokens.start, region.tokens.stop))
    return torch.stack((keys[l][sl], values[l][sl])).unsqueeze(0)


def pack_tokens(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], region: Region,
                out: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Pack a region (layers x batch rows x heads x tokens) of HF-layout K/V into one chunk.

    Parameters
    ----------
    keys, values : sequence of torch.Tensor
        Per-layer ``[batch, kv_heads, seq, head_dim]`` tensors with any strides but ``head_dim`` stride 1
        (DynamicCache, StaticCache's preallocated ``max_cache_len``, views); one dtype, one device.
    region : kvstream.layout.Region
        Contiguous layers and tokens, optional contiguous batch rows and heads (default all).
    out : torch.Tensor, optional
        Contiguous ``[L, 2, B, H, T, head_dim]`` (``[L, B, H, T, head_dim_k + head_dim_v]`` when keys and values
        have different head dims) of the KV dtype, on the KV device or, for CUDA KV, in pinned host memory
        (written directly by the kernel).
    backend : {"auto", "triton", "torch"}
        See the module docstring.

    Returns
    -------
    torch.Tensor
        The chunk, in :data:`kvstream.layout.PACKED_AXES` order.

    Raises
    ------
    LayoutError
        On a shape, dtype, stride or device mismatch, with the numbers.
    ConfigError
        On an unknown backend, or ``"triton"`` for CPU tensors without ``TRITON_INTERPRET=1``.

    Examples
    --------
    >>> chunk = pack_tokens(cache.key_cache, cache.value_cache, Region(layers=(0, 32), tokens=(0, 1500)))  # doctest: +SKIP
    """
    if backend == "auto" and _one_layer_on_device(region, keys, out):
        if out is None and keys[region.layers.start].shape[-1] == values[region.layers.start].shape[-1]:
            return _stack_one_layer(keys, values, check_hf_layers(keys, values, region))
        return reference.pack_tokens(keys, values, region, out)
    return _impl("pack_tokens", "tokens", backend, keys)(keys, values, region, out)


def pack_resolved(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], region: Region) -> torch.Tensor:
    """:func:`pack_tokens` (``backend="auto"``, no ``out``) of a region already checked against these tensors.

    What the streamer calls after its own :func:`kvstream.layout.check_hf_layers`, so that the tensors are not
    checked a second time (a check cost ~28 us of a one-layer ``scatter``'s host time on an H200 host,
    bench/NOTES.md; ~5 us on the 2-core dev CPU). The same bytes and the same implementation as
    :func:`pack_tokens` picks: a one-layer CUDA region of one head dim is one ``torch.stack``, CPU tensors take
    the torch twin (:func:`kvstream.kernels.reference.pack_resolved`), other CUDA regions the Triton launcher
    (which scans its layers for the pointer table anyway).

    Parameters
    ----------
    keys, values : sequence of torch.Tensor
        As in :func:`pack_tokens`.
    region : kvstream.layout.Region
        What ``check_hf_layers(keys, values, region)`` returned (resolved: batch and heads given). Anything
        else is the caller's bug: tensors that do not fit are not reported with a :class:`LayoutError`.

    Returns
    -------
    torch.Tensor
        The chunk, as :func:`pack_tokens` returns it, on the KV device.
    """
    first = keys[region.layers.start]
    if not first.is_cuda:
        return reference.pack_resolved(keys, values, region)
    if len(region.layers) == 1:
        if first.shape[-1] == values[region.layers.start].shape[-1]:
            return _stack_one_layer(keys, values, region)
        return reference.pack_resolved(keys, values, region)
    return _impl("pack_tokens", "tokens", "auto", keys)(keys, values, region, None)


def unpack_tokens(chunk: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], region: Region,
                  *, backend: str = "auto") -> None:
    """Write a chunk made by :func:`pack_tokens` back into the region of the K/V tensors.

    Parameters
    ----------
    chunk : torch.Tensor
        Contiguous ``[L, 2, B, H, T, head_dim]``, on the KV device or (CUDA KV) in pinned host memory.
    keys, values, region, backend
        As in :func:`pack_tokens`. Only the region's elements change.

    Raises
    ------
    LayoutError, ConfigError
        As in :func:`pack_tokens`; also when ``chunk`` does not match the region.
    """
    if backend == "auto" and _one_layer_on_device(region, keys, chunk):
        reference.unpack_tokens(chunk, keys, values, region)
        return
    _impl("unpack_tokens", "tokens", backend, keys)(chunk, keys, values, region)


def pack_newest(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *, num_tokens: int = 1,
                layers: range | Sequence[int] | None = None, starts=None, out: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """Pack the newest ``num_tokens`` tokens of every selected layer in one launch (decode streaming).

    DéjàVu's token path: a decode step's KV of all layers in one buffered copy rather than one copy per
    layer, K/V and row (Strati et al., "DéjàVu: KV-cache Streaming for Fast, Fault-tolerant Generative LLM
    Serving", ICML 2024; buffered copies ~95x over naive in its Fig. 7).

    Parameters
    ----------
    keys, values : sequence of torch.Tensor
        Per-layer ``[batch, kv_heads, seq, head_dim]``; ``seq`` may differ per layer (sliding windows).
    num_tokens : int
        Tokens per layer, ``n`` (0: an empty chunk).
    layers : range or sequence of int, optional
        Layers in chunk order; default all.
    starts : int, sequence of int or int tensor ``[L]``, optional
        First position per layer; default ``keys[l].shape[2] - n``. A CUDA tensor is used by the kernel
        without a host sync (unchecked; positions outside a layer are neither read nor written).
    out : torch.Tensor, optional
        Contiguous ``[L, 2, B, H, n, head_dim]``, on the KV device or pinned host memory (zero-copy).
    backend : {"auto", "triton", "torch"}
        See the module docstring.

    Returns
    -------
    torch.Tensor
        The chunk, ``[L, 2, B, H, n, head_dim]``.

    Raises
    ------
    LayoutError
        On a mismatch, a bad layer list, or starts outside a layer's positions.
    ConfigError
        On a bad backend.

    Examples
    --------
    >>> step = pack_newest(keys, values, out=torch.empty(32, 2, 16, 8, 1, 128, dtype=torch.bfloat16,
    ...                                                  pin_memory=True))  # doctest: +SKIP
    """
    return _impl("pack_newest", "tokens", backend, keys)(keys, values, num_tokens=num_tokens, layers=layers,
                                                          starts=starts, out=out)


def unpack_newest(chunk: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], starts,
                  *, layers: range | Sequence[int] | None = None, backend: str = "auto") -> None:
    """Write ``n`` tokens per layer from a chunk into the K/V tensors at per-layer ``starts``.

    Parameters
    ----------
    chunk : torch.Tensor
        Contiguous ``[L, 2, B, H, n, head_dim]``, on the KV device or (CUDA KV) in pinned host memory.
    keys, values : sequence of torch.Tensor
        Per-layer HF-layout tensors, written in place.
    starts : int, sequence of int, int tensor ``[L]``, or None
        First position per layer (``None``: the last ``n`` positions of each layer).
    layers : range or sequence of int, optional
        Layers of the chunk's layer axis; default all.
    backend : {"auto", "triton", "torch"}
        See the module docstring.

    Raises
    ------
    LayoutError, ConfigError
        As in :func:`pack_newest`.
    """
    _impl("unpack_newest", "tokens", backend, keys)(chunk, keys, values, starts, layers=layers)


def plan_newest(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *, num_tokens: int = 1,
                layers: range | Sequence[int] | None = None, backend: str = "auto"):
    """Check tensors that never move (a StaticCache's buffers) once, for many :func:`pack_newest` calls.

    FlashInfer's ``plan()`` once / ``run()`` per step: the plan validates the layers, builds their pointer
    table on the device and sizes the launch; ``plan.run(start, out=None)`` then packs positions
    ``[start, start + num_tokens)`` of every planned layer as one ``[L, 2, B, H, n, head_dim]`` chunk with
    a single launch and no per-layer host work. The plan keeps references to the tensors; it is right as
    long as they are the ones the cache holds (a cache that replaces its tensors makes a new plan).

    Parameters
    ----------
    keys, values, num_tokens, layers, backend
        As in :func:`pack_newest` (every layer must hold at least ``num_tokens`` positions).

    Returns
    -------
    NewestPlan
        With ``run(start, out=None) -> torch.Tensor`` (raises :class:`LayoutError` for positions outside the
        planned tensors), ``bind(keys, values) -> bool`` (point the plan at other tensors of the same
        shapes, strides, dtype and device, such as a dynamic cache's new KV of the next step: only the
        addresses change, so nothing is checked again; ``False`` when a tensor differs), ``keys`` and ``values`` (the planned layers' tensors, in chunk order), ``shape``,
        ``head_dims`` (``(head_dim_k, head_dim_v)``), ``dtype``, ``device`` and ``capacity`` (positions every
        layer holds).

    Raises
    ------
    LayoutError, ConfigError
        As in :func:`pack_newest`.

    Examples
    --------
    >>> plan = plan_newest([l.keys for l in cache.layers], [l.values for l in cache.layers])  # doctest: +SKIP
    >>> step = plan.run(start=seq_len - 1)                                                     # doctest: +SKIP
    """
    return _impl("NewestPlan", "tokens", backend, keys)(keys, values, layers, num_tokens)


def pack_blocks(key_caches: Sequence[torch.Tensor], value_caches: Sequence[torch.Tensor], block_ids, *,
                layers: range | Sequence[int] | None = None, out: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """Gather paged-cache blocks of every selected layer, K and V, into one chunk.

    Parameters
    ----------
    key_caches, value_caches : sequence of torch.Tensor
        Per-layer ``[num_blocks, block_size, kv_heads, head_dim]`` (vLLM/FlashInfer NHD), any strides with
        ``head_dim`` stride 1.
    block_ids : int32/int64 tensor ``[nb]`` or sequence of int
        Blocks in chunk order. Host ids are range-checked; CUDA ids are not read back (out-of-range ones are
        skipped by the kernel, leaving their chunk slots unwritten).
    layers : range or sequence of int, optional
        Layers in chunk order; default all.
    out : torch.Tensor, optional
        Contiguous ``[L, 2, nb, block_size, kv_heads, head_dim]``, on the KV device or pinned host memory.
    backend : {"auto", "triton", "torch"}
        See the module docstring.

    Returns
    -------
    torch.Tensor
        The chunk, in :data:`kvstream.layout.PACKED_PAGED_AXES` order.

    Raises
    ------
    LayoutError
        On a mismatch or host block ids out of range.
    ConfigError
        On a bad backend.
    """
    return _impl("pack_blocks", "paged", backend, key_caches)(key_caches, value_caches, block_ids, layers=layers,
                                                               out=out)


def unpack_blocks(chunk: torch.Tensor, key_caches: Sequence[torch.Tensor], value_caches: Sequence[torch.Tensor],
                  block_ids, *, layers: range | Sequence[int] | None = None, backend: str = "auto") -> None:
    """Scatter a chunk made by :func:`pack_blocks` into the blocks ``block_ids`` of the paged caches.

    Parameters
    ----------
    chunk : torch.Tensor
        Contiguous ``[L, 2, nb, block_size, kv_heads, head_dim]``, on the KV device or pinned host memory.
    key_caches, value_caches, layers, backend
        As in :func:`pack_blocks`.
    block_ids : int32/int64 tensor ``[nb]`` or sequence of int
        Destination blocks; host ids must be in range and distinct.

    Raises
    ------
    LayoutError, ConfigError
        As in :func:`pack_blocks`; also for repeated host ids.
    """
    _impl("unpack_blocks", "paged", backend, key_caches)(chunk, key_caches, value_caches, block_ids, layers=layers)


__all__ = ["BACKENDS", "pack_tokens", "pack_resolved", "unpack_tokens", "pack_newest", "unpack_newest", "plan_newest",
           "pack_blocks", "unpack_blocks", "reference"]
