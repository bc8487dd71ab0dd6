"""The int64 pointer tables that let one launch cover many layers, and their cache.

A *table* holds one int64 row per (layer, K/V) *entry* — the address of the entry's first element in the
region and its strides in elements — so one kernel launch reaches per-layer tensors that live in separate
allocations with separate strides. LMCache's ``multi_layer_kv_transfer`` keeps per-layer base pointers in a
GPU int64 table the same way. Row ``2 * i`` is the key tensor of the ``i``-th selected layer and row
``2 * i + 1`` its value tensor, which is the order of the packed chunk's ``(layer, kv)`` axes.

Tables on a CUDA device are cached by their contents (addresses and strides are plain numbers, so a cached
table is right whenever its numbers match): a StaticCache, whose tensors never move, reuses one table for
every prefill chunk and decode step and pays no host-to-device copy. Nothing here imports triton.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple, Sequence

import torch

from ..errors import ConfigError, LayoutError
from ._launch import vector_elems

#: Tables kept per process. A model has one table per (tensor set, batch/head offset); 256 covers several
#: caches with room to spare, at about 2 KiB of device memory each.
MAX_CACHED_TABLES = 256

# The integer type with the same element size: the kernels move bits, so they see every dtype as one of
# these (NaN payloads, fp8 and bf16 pass unchanged, and one compiled kernel serves all dtypes of a size).
_BITS_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

_tables: "OrderedDict[tuple, _Cached]" = OrderedDict()
_tables_lock = threading.Lock()


def bits_dtype(dtype: torch.dtype) -> torch.dtype:
    """The signed integer dtype of ``dtype``'s element size, which the kernels move. Raises ``LayoutError``
    for a size without one."""
    try:
        return _BITS_DTYPES[dtype.itemsize]
    except KeyError:
        raise LayoutError(f"Unsupported element size {dtype.itemsize} bytes ({dtype})") from None


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as the signed integer dtype of the same element size (no copy)."""
    try:
        return t.view(_BITS_DTYPES[t.element_size()])
    except KeyError:
        raise LayoutError(f"Unsupported element size {t.element_size()} bytes ({t.dtype})") from None


class _Cached:
    """A cached device table, the stream it was allocated on, and an event per other stream that read it."""

    __slots__ = ("tensor", "stream", "events")

    def __init__(self, tensor: torch.Tensor, stream: int) -> None:
        self.tensor, self.stream, self.events = tensor, stream, {}

    def busy(self) -> bool:
        """Whether a stream that used this table may still read it."""
        return any(not e.query() for e in list(self.events.values()))


_retired: list[_Cached] = []      # evicted while another stream may still read them
_captured: dict[tuple, _Cached] = {}  # read by a CUDA graph: kept for the life of the process


def table(rows: list[int], cols: int, device: torch.device) -> torch.Tensor:
    """An int64 ``[len(rows) // cols, cols]`` tensor of ``rows`` on ``device``, cached by its contents on CUDA.

    A miss copies through pinned memory without blocking the host (torch's pinned allocator keeps the
    staging buffer until the copy has run); the table then belongs to the current stream, on which
    torch's allocator orders its reuse. A hit from another stream records an event there, and an evicted
    table is freed only once those events have passed (not ``record_stream``, which would make freeing it
    fail once a short-lived stream is gone). A table used while a CUDA graph is captured is never freed.

    Raises
    ------
    ConfigError
        On a miss during CUDA graph capture (the copy would read a staging buffer reused after capture).
    """
    if device.type != "cuda":
        return torch.tensor(rows, dtype=torch.int64).view(-1, cols)
    key = (device, cols, tuple(rows))
    stream = torch.cuda.current_stream(device)
    capturing = torch.cuda.is_current_stream_capturing()
    with _tables_lock:
        entry = _captured.get(key) or _tables.get(key)
        if entry is not None and key in _tables:
            _tables.move_to_end(key)
            if capturing:
                _captured[key] = _tables.pop(key)
    if entry is not None:
        if stream.cuda_stream != entry.stream and not capturing:
            event = torch.cuda.Event()
            event.record(stream)
            entry.events[stream.cuda_stream] = event
        return entry.tensor
    if capturing:
        raise ConfigError("No cached pointer table for these tensors while a CUDA graph is being captured; run the "
                          "same call once before capturing (the table is then cached and the capture reads it)")
    host = torch.tensor(rows, dtype=torch.int64).view(-1, cols).pin_memory()
    entry = _Cached(host.to(device, non_blocking=True), stream.cuda_stream)
    with _tables_lock:
        _tables[key] = entry
        while len(_tables) > MAX_CACHED_TABLES:
            _, old = _tables.popitem(last=False)
            if old.busy():
                _retired.append(old)
        _retired[:] = [old for old in _retired if old.busy()]
    return entry.tensor


def clear_tables() -> None:
    """Drop every cached table that no queued kernel or captured CUDA graph may still read (tests; or to
    return the few KiB they hold)."""
    with _tables_lock:
        _retired.extend(e for e in _tables.values() if e.busy())
        _tables.clear()
        _retired[:] = [e for e in _retired if e.busy()]


#: Columns of a token table row: entry address (bytes, at the region's first batch row and head), strides of
#: batch, head and seq (elements; 0 where the axis has size 1), seq size, and a per-entry start position.
TOKEN_COLS = 6
#: Columns of a paged table row: entry address (bytes), strides of block, block token and head (elements),
#: and num_blocks.
PAGED_COLS = 5


class Scan(NamedTuple):
    """What :func:`scan_layers` read off the per-layer tensors."""

    rows: list[int]        #: table rows, flat: TOKEN_COLS or PAGED_COLS values per (layer, K/V) entry
    sizes: list[int]       #: each entry's size on the free axis (seq, or num_blocks)
    vector: int            #: :func:`~kvstream.kernels._launch.vector_elems` of every address and stride
    shape: tuple[int, ...]  #: the first tensor's shape
    dtype: torch.dtype
    device: torch.device
    head_dim_v: int        #: the value tensors' head_dim (``shape[3]`` unless K and V differ: MLA)


def scan_layers(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], ids: list[int], free_axis: int,
                offsets: tuple[int, int] = (0, 0)) -> Scan | None:
    """Check the selected layers and build their table rows in one pass; ``None`` when anything is off.

    The launchers run this on every call, decode steps included, so it touches each tensor once and keeps
    to the cheapest attribute reads (a few hundred ns each); on ``None`` the callers in
    :mod:`kvstream.kernels._checks` run the full validators (:func:`kvstream.layout.check_hf_layers`,
    ``check_layer_list``), which raise with the numbers.

    Parameters
    ----------
    keys, values : sequence of torch.Tensor
        Per-layer 4-D tensors with ``head_dim`` last (one ``head_dim`` for every key tensor and one for every
        value tensor; the two may differ).
    ids : list of int
        Selected layers, in chunk order (already range-checked).
    free_axis : int
        2 for the HF layout ``[batch, kv_heads, seq, head_dim]`` (rows get :data:`TOKEN_COLS` columns, the
        start column 0); 0 for the paged layout ``[num_blocks, block_size, kv_heads, head_dim]``
        (:data:`PAGED_COLS` columns).
    offsets : (int, int)
        Start indices on axes 0 and 1 folded into each address (the region's first batch row and head).

    Returns
    -------
    Scan or None
    """
    if len(keys) != len(values):
        return None
    first, first_v = keys[ids[0]], values[ids[0]]
    if not isinstance(first, torch.Tensor) or first.dim() != 4 or not isinstance(first_v, torch.Tensor) \
            or first_v.dim() != 4:
        return None
    shape = tuple(first.shape)
    dtype, device, es = first.dtype, first.device, first.element_size()
    hf = free_axis == 2
    n0, n1, head_dim = (shape[0], shape[1], shape[3]) if hf else (shape[1], shape[2], shape[3])
    head_dim_v = first_v.shape[3]
    o0, o1 = offsets
    rows: list[int] = []
    elems: list[int] = []
    sizes: list[int] = []
    try:
        for l in ids:
            for t, want in ((keys[l], head_dim), (values[l], head_dim_v)):
                x0, x1, x2, d = t.shape
                s0, s1, s2, s3 = t.stride()
                if d != want or (s3 != 1 and d > 1) or t.dtype != dtype or t.device != device:
                    return None
                if hf:
                    if x0 != n0 or x1 != n1:
                        return None
                    free = x2
                elif x1 != n0 or x2 != n1:
                    return None
                else:
                    free = x0
                # a size-1 axis is never stepped along: stride 0 keeps it out of the alignment
                if x0 == 1:
                    s0 = 0
                if x1 == 1:
                    s1 = 0
                if x2 == 1:
                    s2 = 0
                addr = t.data_ptr() + (o0 * s0 + o1 * s1) * es
                rows.extend((addr, s0, s1, s2, free, 0) if hf else (addr, s0, s1, s2, free))
                elems.extend((addr, s0 * es, s1 * es, s2 * es))
                sizes.append(free)
    except (ValueError, TypeError, AttributeError):  # not 4-D, not a tensor
        return None
    return Scan(rows, sizes, vector_elems(es, elems), shape, dtype, device, head_dim_v)
