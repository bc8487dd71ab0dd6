"""What the Triton launchers and their torch twins share: input checks, and the int64 tables that let one
launch cover many layers.

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

import math
import threading
from collections import OrderedDict
from typing import NamedTuple, Sequence

import torch

from ..errors import ConfigError, LayoutError

#: Largest vector the kernels ask for, in bytes: Hopper's widest global load/store (``ld.global.v4.b32``).
VECTOR_BYTES = 16
#: Grid axis 1 indexes table entries; CUDA caps grid axes 1 and 2 at 65535.
MAX_ENTRIES = 65535
#: Tables kept per process. A model has one table per (tensor set, batch/head offset); 256 covers several
#: caches with room to spare, at about 2 KiB of device memory each.
MAX_CACHED_TABLES = 256

# The integer type with the same element size: the kernels move bits, so they see every dtype as one of
# these (NaN payloads, fp8 and bf16 pass unchanged, and one compiled kernel serves all dtypes of a size).
_BITS_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

_tables: "OrderedDict[tuple, _Cached]" = OrderedDict()
_tables_lock = threading.Lock()


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as the signed integer dtype of the same element size (no copy)."""
    try:
        return t.view(_BITS_DTYPES[t.element_size()])
    except KeyError:
        raise LayoutError(f"Unsupported element size {t.element_size()} bytes ({t.dtype})") from None


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype the kernels move ``dtype`` as."""
    return _BITS_DTYPES[torch.empty((), dtype=dtype).element_size()]


def check_backend(device: torch.device, kernel) -> None:
    """Raise :class:`ConfigError` unless ``kernel`` (a ``@triton.jit`` function) can run on ``device``.

    CUDA tensors run compiled; CPU tensors only under the Triton interpreter, which ``TRITON_INTERPRET=1``
    turns on when it is set before triton is first imported.
    """
    if device.type == "cuda":
        if type(kernel).__name__ == "InterpretedFunction":
            raise ConfigError("Triton runs in interpreter mode (TRITON_INTERPRET=1) but the tensors are on "
                              f"{device}; unset TRITON_INTERPRET to run the compiled kernels")
        return
    if device.type == "cpu" and type(kernel).__name__ == "InterpretedFunction":
        return
    raise ConfigError(f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
                      f"triton is imported; got tensors on {device}. Use backend='torch' or 'auto' instead")


def layer_ids(layers: range | Sequence[int] | None, num_layers: int) -> list[int]:
    """The selected layer indices as a list: every layer for ``None``, else ``layers`` checked.

    Raises
    ------
    LayoutError
        If an index is outside ``[0, num_layers)``, repeats, or none is selected.
    """
    if layers is None:
        ids = list(range(num_layers))
    else:
        try:
            ids = [int(l) for l in layers]
        except TypeError:
            raise LayoutError(f"layers must be a range or a sequence of ints, got {layers!r}") from None
    if not ids:
        raise LayoutError("No layers selected")
    if len(ids) > MAX_ENTRIES // 2:
        raise LayoutError(f"{len(ids)} layers in one launch; at most {MAX_ENTRIES // 2}")
    bad = [l for l in ids if not 0 <= l < num_layers]
    if bad:
        raise LayoutError(f"Layer indices {bad} out of range for the {num_layers} layers given")
    if len(set(ids)) != len(ids):
        raise LayoutError(f"Layer indices repeat: {ids}")
    return ids


def check_layer_list(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], ids: list[int],
                     free_axis: int, names: tuple[str, str] = ("keys", "values"),
                     ) -> tuple[tuple[int, ...], torch.dtype, torch.device]:
    """Check that the selected layers' key and value tensors agree; return the common shape, dtype, device.

    Every tensor must be 4-D, with stride 1 on its last axis (``head_dim``) and the same size as the first
    key tensor on every axis but ``free_axis``: axis 2 (``seq``) for the HF layout, whose sliding-window
    layers hold fewer positions, and axis 0 (``num_blocks``) for the paged layout.

    Returns
    -------
    shape : tuple of int
        The first selected key tensor's shape (other layers may differ on ``free_axis``).
    dtype, device
        Shared by all tensors.

    Raises
    ------
    LayoutError
        With the layer and the numbers on a mismatch.
    """
    if len(keys) != len(values):
        raise LayoutError(f"{len(keys)} {names[0]} tensors but {len(values)} {names[1]} tensors")
    first = keys[ids[0]]
    shape = tuple(first.shape)
    if len(shape) != 4:
        axes = "[batch, kv_heads, seq, head_dim]" if free_axis == 2 else "[num_blocks, block_size, kv_heads, head_dim]"
        raise LayoutError(f"Invalid shape of {names[0]}[{ids[0]}]: expected {axes}, got {list(shape)}")
    free = free_axis
    expected = [str(s) for s in shape]
    expected[free] = "*"
    dtype, device = first.dtype, first.device
    for l in ids:
        for kind, t in ((names[0], keys[l]), (names[1], values[l])):
            s = t.shape
            if len(s) != 4 or any(s[a] != shape[a] for a in range(4) if a != free):
                raise LayoutError(f"Invalid shape of {kind}[{l}]: expected [{', '.join(expected)}], got {list(s)}")
            if t.dtype != dtype:
                raise LayoutError(f"{kind}[{l}] has dtype {t.dtype}, expected {dtype}")
            if t.device != device:
                raise LayoutError(f"{kind}[{l}] is on {t.device}, expected {device}")
            if s[3] > 1 and t.stride(3) != 1:
                raise LayoutError(f"{kind}[{l}] has stride {t.stride(3)} on head_dim; head_dim must be contiguous "
                                  "(stride 1)")
    return shape, dtype, device


def _check_device(t: torch.Tensor, device: torch.device, name: str) -> None:
    if t.device == device:
        return
    if device.type == "cuda" and t.device.type == "cpu" and t.is_pinned():
        return  # pinned host memory: the GPU reads and writes it directly (UVA zero-copy)
    raise LayoutError(f"{name} is on {t.device} but the KV tensors are on {device}; it must be on the same device "
                      "or, for CUDA tensors, in pinned host memory")


def packed_out(out: torch.Tensor | None, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``out`` checked against the packed ``shape``/``dtype``/``device``, or a new tensor when ``out`` is None.

    ``out`` may be pinned host memory when ``device`` is CUDA.

    Raises
    ------
    LayoutError
        If ``out`` is not contiguous or has another shape, dtype or device.
    """
    if out is None:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    check_chunk(out, shape, dtype, device, name="out")
    return out


def check_chunk(chunk: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                *, name: str = "chunk") -> None:
    """Check a packed chunk: contiguous, of ``shape`` and ``dtype``, on ``device`` (or pinned host for CUDA).

    Raises
    ------
    LayoutError
        On any mismatch, with the numbers.
    """
    from ..layout import check_packed

    if not isinstance(chunk, torch.Tensor):
        raise LayoutError(f"{name} must be a torch.Tensor, got {type(chunk).__name__}")
    check_packed(chunk, shape, dtype, name=name)
    _check_device(chunk, device, name)


def resolve_starts(starts, ids: list[int], seq_lens: list[int], num_tokens: int,
                   device: torch.device) -> list[int] | torch.Tensor:
    """Per-layer first token positions for the newest-token ops.

    Parameters
    ----------
    starts : None, int, sequence of int or int32/int64 tensor of shape ``[len(ids)]``
        ``None``: each layer's last ``num_tokens`` positions (``seq - num_tokens``). An int applies to every
        layer. A tensor on the KV device is returned as int64 on that device without reading it back (no
        host sync): its values are not checked on the host, and positions outside a layer's ``seq`` are
        neither read nor written by the kernels.
    ids, seq_lens : list of int
        Selected layers and their ``seq`` sizes.
    num_tokens : int
        Tokens per layer.

    Returns
    -------
    list of int, or torch.Tensor
        Checked positions, or the device tensor.

    Raises
    ------
    LayoutError
        If a start is negative, ``start + num_tokens`` exceeds the layer's ``seq``, or the count is wrong.
    """
    if isinstance(starts, torch.Tensor):
        if starts.dim() != 1 or starts.shape[0] != len(ids):
            raise LayoutError(f"Invalid shape of starts: expected [{len(ids)}] (one per layer), got {list(starts.shape)}")
        if starts.dtype not in (torch.int32, torch.int64):
            raise LayoutError(f"starts must be an int32 or int64 tensor, got {starts.dtype}")
        if starts.device.type == "cuda" and device.type == "cuda":
            if starts.device != device:
                raise LayoutError(f"starts is on {starts.device} but the KV tensors are on {device}")
            return starts.to(torch.int64)
        starts = starts.tolist()
    if starts is None:
        out = [s - num_tokens for s in seq_lens]
    elif isinstance(starts, int):
        out = [starts] * len(ids)
    else:
        out = [int(s) for s in starts]
        if len(out) != len(ids):
            raise LayoutError(f"starts has {len(out)} entries for {len(ids)} layers")
    for l, s, n in zip(ids, out, seq_lens):
        if s < 0 or s + num_tokens > n:
            raise LayoutError(f"Layer {l}: tokens [{s}, {s + num_tokens}) fall outside its {n} positions "
                              f"(keys[{l}] has seq {n}, num_tokens={num_tokens})")
    return out


def check_block_ids(block_ids, num_blocks: list[int], device: torch.device, *, unique: bool) -> torch.Tensor:
    """Block ids as a 1-D int32/int64 tensor on ``device``, checked against every layer's ``num_blocks``.

    Host ids (a sequence or a CPU tensor) are range-checked (and, for ``unique=True``, checked for
    repeats) before they are copied to ``device``. Ids already on a CUDA device are not read back (no host
    sync): the kernels leave ids outside ``[0, num_blocks)`` untouched instead.

    Raises
    ------
    LayoutError
        On a wrong dtype, shape or device, an id out of range, or a repeated id when ``unique``.
    """
    if not isinstance(block_ids, torch.Tensor):
        try:
            block_ids = torch.tensor([int(i) for i in block_ids], dtype=torch.int64)
        except TypeError:
            raise LayoutError(f"block_ids must be a 1-D int tensor or a sequence of ints, got {block_ids!r}") from None
    if block_ids.dtype not in (torch.int32, torch.int64):
        raise LayoutError(f"block_ids must be int32 or int64, got {block_ids.dtype}")
    if block_ids.dim() != 1:
        raise LayoutError(f"Invalid shape of block_ids: expected [num_ids], got {list(block_ids.shape)}")
    if block_ids.device.type == "cpu":
        if block_ids.numel():
            lo, hi = int(block_ids.min()), int(block_ids.max())
            if lo < 0 or hi >= min(num_blocks):
                raise LayoutError(f"block_ids span [{lo}, {hi}] but the caches hold {min(num_blocks)} blocks "
                                  f"(ids must lie in [0, {min(num_blocks)}))")
            if unique and torch.unique(block_ids).numel() != block_ids.numel():
                raise LayoutError("block_ids repeat; unpacking two blocks into one place is ambiguous")
        if device.type == "cuda":
            return block_ids.pin_memory().to(device, non_blocking=True)
        return block_ids
    if block_ids.device != device:
        raise LayoutError(f"block_ids is on {block_ids.device} but the caches are on {device}")
    return block_ids


def region_args(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], region) -> tuple:
    """Checked arguments of the token-range ops: ``(region resolved, Scan)``.

    Raises
    ------
    LayoutError
        From :func:`kvstream.layout.check_hf_layers`, with the offending layer and the numbers.
    """
    from ..layout import check_hf_layers

    layers = region.layers
    scan = None
    if len(layers) and layers.stop <= len(keys) and isinstance(keys[layers.start], torch.Tensor) \
            and keys[layers.start].dim() == 4:
        first = keys[layers.start]
        region = region.resolve(batch_size=first.shape[0], kv_heads=first.shape[1])
        scan = scan_layers(keys, values, list(layers), 2, (region.batch.start, region.heads.start))
    if scan is None or min(scan.sizes) < region.tokens.stop:
        check_hf_layers(keys, values, region)
        raise LayoutError(f"keys/values do not fit {region}")  # not reached: check_hf_layers raised
    return region, scan


def newest_args(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], layers, num_tokens: int,
                starts) -> tuple:
    """Checked arguments of the newest-token ops: ``(layer ids, Scan, starts)``.

    ``starts`` comes from :func:`resolve_starts`: a list of ints, or an int64 tensor on the KV device.

    Raises
    ------
    LayoutError
        On any mismatch, a negative ``num_tokens``, or keys and values of a layer with different ``seq``.
    """
    ids = layer_ids(layers, len(keys))
    scan = scan_layers(keys, values, ids, 2)
    if scan is None:
        check_layer_list(keys, values, ids, free_axis=2)
        raise LayoutError("keys/values do not agree")  # not reached: check_layer_list raised
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise LayoutError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
    seq = scan.sizes[0::2]
    for l, nk, nv in zip(ids, seq, scan.sizes[1::2]):
        if nk != nv:
            raise LayoutError(f"Layer {l}: keys hold {nk} positions but values {nv}")
    return ids, scan, resolve_starts(starts, ids, seq, num_tokens, scan.device)


def chunk_tokens(chunk: torch.Tensor) -> int:
    """Tokens per layer (``n``) of a ``[L, 2, B, H, n, head_dim]`` chunk. Raises :class:`LayoutError` if not 6-D."""
    if not isinstance(chunk, torch.Tensor) or chunk.dim() != 6:
        got = list(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
        raise LayoutError(f"chunk must be a 6-D [L, 2, B, H, n, head_dim] tensor, got {got}")
    return chunk.shape[4]


def paged_args(key_caches: Sequence[torch.Tensor], value_caches: Sequence[torch.Tensor], block_ids, layers,
               *, unique: bool) -> tuple:
    """Checked arguments of the paged ops: ``(layer ids, Scan, block ids on the KV device)``.

    Raises
    ------
    LayoutError
        On any mismatch of the caches or the block ids (see :func:`check_block_ids`).
    """
    ids = layer_ids(layers, len(key_caches))
    scan = scan_layers(key_caches, value_caches, ids, 0)
    if scan is None:
        check_layer_list(key_caches, value_caches, ids, free_axis=0, names=("key_caches", "value_caches"))
        raise LayoutError("key_caches/value_caches do not agree")  # not reached: check_layer_list raised
    num_blocks = [min(nk, nv) for nk, nv in zip(scan.sizes[0::2], scan.sizes[1::2])]
    return ids, scan, check_block_ids(block_ids, num_blocks, scan.device, unique=unique)


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


def vector_elems(elsize: int, byte_values: list[int]) -> int:
    """Widest vector, in elements of ``elsize`` bytes, whose byte size divides every value (a power of two,
    at most :data:`VECTOR_BYTES`; at least 1).

    ``byte_values`` holds addresses and strides in bytes; the kernels promise the compiler that addresses
    and offsets are multiples of the result (``tl.multiple_of``), which turns their loads and stores into
    16-byte ones.
    """
    g = math.gcd(*byte_values) if byte_values else 0
    v = VECTOR_BYTES
    while v > elsize and g % v:
        v //= 2
    return max(1, v // elsize)


def block_rows(rows: int, entries: int, row_bytes: int, device: torch.device, max_tile_bytes: int,
               min_programs_per_sm: int) -> int:
    """Rows of ``head_dim`` per program: tiles of about ``max_tile_bytes``, shrunk until the grid has at least
    ``min_programs_per_sm`` programs per SM (small decode copies need many programs in flight to hide
    latency). On the CPU (the interpreter) the largest tile: fewer programs run faster there."""
    r = 1
    while r * 2 * row_bytes <= max_tile_bytes:
        r *= 2
    r = min(r, max(1, 1 << (max(rows, 1) - 1).bit_length()))
    if device.type == "cuda":
        sms = _sm_count(device)
        while r > 1 and entries * -(-rows // r) < min_programs_per_sm * sms:
            r //= 2
    return r


_sms: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sms:
        _sms[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sms[idx]


def launch_guard(device: torch.device):
    """A context that makes ``device`` current for a kernel launch (a no-op when it already is)."""
    import contextlib

    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


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
    vector: int            #: :func:`vector_elems` of every address and stride
    shape: tuple[int, ...]  #: the first tensor's shape
    dtype: torch.dtype
    device: torch.device


def scan_layers(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], ids: list[int], free_axis: int,
                offsets: tuple[int, int] = (0, 0)) -> Scan | None:
    """Check the selected layers and build their table rows in one pass; ``None`` when anything is off.

    The launchers run this on every call, decode steps included, so it touches each tensor once and keeps
    to the cheapest attribute reads (a few hundred ns each); on ``None`` they run the full validators
    (:func:`kvstream.layout.check_hf_layers`, :func:`check_layer_list`), which raise with the numbers.

    Parameters
    ----------
    keys, values : sequence of torch.Tensor
        Per-layer 4-D tensors with ``head_dim`` last.
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
    first = keys[ids[0]]
    if not isinstance(first, torch.Tensor) or first.dim() != 4:
        return None
    shape = tuple(first.shape)
    dtype, device, es = first.dtype, first.device, first.element_size()
    hf = free_axis == 2
    n0, n1, head_dim = (shape[0], shape[1], shape[3]) if hf else (shape[1], shape[2], shape[3])
    o0, o1 = offsets
    rows: list[int] = []
    elems: list[int] = []
    sizes: list[int] = []
    try:
        for l in ids:
            for t in (keys[l], values[l]):
                x0, x1, x2, d = t.shape
                s0, s1, s2, s3 = t.stride()
                if d != head_dim or (s3 != 1 and d > 1) or t.dtype != dtype or t.device != device:
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
    return Scan(rows, sizes, vector_elems(es, elems), shape, dtype, device)
