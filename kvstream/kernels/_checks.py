"""Input checks and argument building shared by the Triton launchers and their torch twins.

Each ``*_args`` function checks one op family's inputs and returns what its launcher needs: the selected
layers, the :class:`~kvstream.kernels._tables.Scan` of their tensors and the resolved starts or block ids.
The fast path is one :func:`~kvstream.kernels._tables.scan_layers` pass; when it finds anything off, the full
validators below (or :func:`kvstream.layout.check_hf_layers`) raise with the numbers. Nothing here imports
triton.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError, LayoutError
from ..layout import check_hf_layers, check_packed, packed_kv_shape
from ._tables import scan_layers

#: Grid axis 1 indexes table entries; CUDA caps grid axes 1 and 2 at 65535.
MAX_ENTRIES = 65535


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
    key tensor on every axis but ``free_axis`` (axis 2, ``seq``, for the HF layout, whose sliding-window
    layers hold fewer positions; axis 0, ``num_blocks``, for the paged layout) and, for value tensors, the
    last one: values have the first value tensor's ``head_dim`` (MLA's differs from the keys').

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
    first_v = values[ids[0]]
    shape_v = shape[:3] + (first_v.shape[3] if first_v.dim() == 4 else shape[3],)
    dtype, device = first.dtype, first.device
    for l in ids:
        for kind, t, want in ((names[0], keys[l], shape), (names[1], values[l], shape_v)):
            s = t.shape
            if len(s) != 4 or any(s[a] != want[a] for a in range(4) if a != free):
                expected = ["*" if a == free else str(want[a]) for a in range(4)]
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


def newest_shape(ids: list[int], scan, num_tokens: int) -> tuple[int, ...]:
    """The chunk shape of ``num_tokens`` tokens of the layers ``ids`` scanned in ``scan`` (HF layout)."""
    b, h, _, d = scan.shape
    return packed_kv_shape(len(ids), (b, h, num_tokens), d, scan.head_dim_v)


def paged_shape(ids: list[int], scan, num_ids: int) -> tuple[int, ...]:
    """The chunk shape of ``num_ids`` blocks of the layers ``ids`` scanned in ``scan`` (paged layout)."""
    _, block_size, heads, head_dim = scan.shape
    return packed_kv_shape(len(ids), (num_ids, block_size, heads), head_dim, scan.head_dim_v)


def chunk_tokens(chunk: torch.Tensor) -> int:
    """Tokens per layer (``n``) of a ``[L, 2, B, H, n, head_dim]`` chunk (or ``[L, B, H, n, Dk + Dv]``: K and V
    of different head dims). Raises :class:`LayoutError` for a tensor of another rank."""
    if not isinstance(chunk, torch.Tensor) or chunk.dim() not in (5, 6):
        got = list(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
        raise LayoutError(f"chunk must be a 6-D [L, 2, B, H, n, head_dim] tensor (5-D [L, B, H, n, head_dim_k + "
                          f"head_dim_v] for K and V of different head dims), got {got}")
    return chunk.shape[chunk.dim() - 2]


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
