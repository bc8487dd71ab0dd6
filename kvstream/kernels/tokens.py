"""Pack and unpack token ranges of HF-layout KV caches: one Triton launch for every layer and both K and V.

Two uses share one kernel:

* **prefill streaming** — a token range ``[start, stop)`` of many layers (:func:`pack_tokens`,
  :func:`unpack_tokens`);
* **decode streaming** — the newest token(s) of every layer (:func:`pack_newest`, :func:`unpack_newest`),
  DéjàVu's single-token path: one launch instead of one copy per layer, K/V and row. Layers may hold
  different numbers of positions (sliding-window layers), so each layer has its own start.

Grid: axis 1 walks the table entries (layer, K/V); axis 0 walks tiles of ``BLOCK_R`` *rows* (one
``head_dim`` vector each). A long prefill range gives each program ``BLOCK_R`` consecutive tokens of one
(batch, head); a decode step of fewer tokens than ``BLOCK_R`` gives it ``(batch, head, token)`` rows
flattened, so tiny rows still make full tiles. Keys and values of different head dims (MLA) are one
launch too: the head dims are compile-time constants, a K entry moves ``HEAD_DIM`` elements of each row and
a V entry ``HEAD_DIM_V``, into the two parts of the chunk's last axis (:data:`kvstream.layout.PACKED_SPLIT_AXES`);
with one head dim that branch is not compiled.
"""

from __future__ import annotations

import array
import ctypes
import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from ..cuda import Event
from ..cuda.memory import pinned_is_device_addressable
from ..errors import ConfigError, LayoutError
from ..layout import Region
from . import _checks, _launch, _tables

#: Target bytes per program: 16 KiB is 8 x 16-byte loads in flight per thread at 4 warps, enough to cover
#: HBM latency on an H100 (a Llama-3-8B bf16 row of head_dim 128 is 256 bytes: 64 rows per program).
#: Predicted; kvstream/bench/kernels_tune.py measures the alternatives.
MAX_TILE_BYTES = 16384
#: Rows per program shrink until the grid has this many programs per SM, so a decode step of 2 MiB
#: (32 layers, B16, H8, bf16) spreads over every SM: 1024 programs of 2 KiB rather than 128 of 16 KiB.
MIN_PROGRAMS_PER_SM = 4
#: Warps per program: 4 warps move 16 KiB with 8 vector loads per thread; 8 warps halve that (tuned in bench).
NUM_WARPS = 4


@triton.jit
def _move_rows(cache_rows, row_mask, chunk_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               UNPACK: tl.constexpr):
    """Copy ``BLOCK_R`` rows of ``HEAD_DIM`` elements between a cache and a chunk (shared with paged.py).

    ``cache_rows``/``chunk_rows`` point at each row's first element; rows where ``row_mask`` is false are
    neither read nor written. Alignment hints must be set by the caller: Triton drops ``tl.multiple_of`` on
    the arguments of a called function (seen in the PTX: 2-byte loads instead of 16-byte ones).
    """
    d = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (d < HEAD_DIM)[None, :]
    cache_ptrs = cache_rows[:, None] + d[None, :]
    chunk_ptrs = chunk_rows[:, None] + d[None, :]
    if UNPACK:
        tl.store(cache_ptrs, tl.load(chunk_ptrs, mask=mask), mask=mask)
    else:
        tl.store(chunk_ptrs, tl.load(cache_ptrs, mask=mask), mask=mask)


@triton.jit(do_not_specialize=["rows", "heads", "tokens", "tiles", "t0"])
def _copy_tokens_kernel(table_ptr, chunk_ptr, starts_ptr, rows, heads, tokens, tiles, t0,
                        COLS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                        ALIGN: tl.constexpr, DEVICE_STARTS: tl.constexpr, UNPACK: tl.constexpr,
                        ACROSS_ROWS: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr):
    entry = tl.program_id(1)  # 2 * layer + (0: K, 1: V), the order of the chunk's (layer, kv) axes
    if ACROSS_ROWS:
        # Few tokens (decode): a tile spans several (batch, head) rows; int32 divisions per row, rows < 2**31.
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        t = r % tokens
        bh = r // tokens
        in_rows = r < rows
    else:
        # Long token runs (prefill): a tile is BLOCK_R consecutive tokens of one (batch, head); no division
        # per row, which would otherwise cost more instructions than the 16-byte copies themselves.
        bh = tl.program_id(0) // tiles
        t = (tl.program_id(0) % tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_rows = t < tokens
    h = bh % heads
    b = bh // heads
    row = table_ptr + entry * COLS
    pos = t0 + tl.load(row + 5) + t
    if DEVICE_STARTS:
        pos += tl.load(starts_ptr + entry // 2)
    # Positions outside [0, seq) are never touched: unchecked device starts cannot reach past a layer.
    row_mask = in_rows & (pos >= 0) & (pos < tl.load(row + 4))
    base = tl.load(row).to(tl.pointer_type(chunk_ptr.dtype.element_ty))
    cache_off = b * tl.load(row + 1) + h * tl.load(row + 2) + pos * tl.load(row + 3)
    if ALIGN > 1:  # the launcher checked every address and stride: 16-byte vector loads/stores
        base = tl.multiple_of(base, ALIGN * (chunk_ptr.dtype.element_ty.primitive_bitwidth // 8))  # bytes
        cache_off = tl.multiple_of(cache_off, ALIGN)
    if HEAD_DIM_V == HEAD_DIM:  # [L, 2, B, H, T, D]: one row of HEAD_DIM per (entry, batch, head, token)
        chunk_row = (entry.to(tl.int64) * (rows // tokens) + bh) * tokens + t
        _move_rows(base + cache_off, row_mask, chunk_ptr + chunk_row * HEAD_DIM, HEAD_DIM, BLOCK_D, UNPACK)
    else:  # [L, B, H, T, Dk + Dv]: a row's keys, then its values
        chunk_row = ((entry // 2).to(tl.int64) * (rows // tokens) + bh) * tokens + t
        row_ptr = chunk_ptr + chunk_row * (HEAD_DIM + HEAD_DIM_V)
        if entry % 2 == 0:
            _move_rows(base + cache_off, row_mask, row_ptr, HEAD_DIM, BLOCK_D, UNPACK)
        else:
            _move_rows(base + cache_off, row_mask, row_ptr + HEAD_DIM, HEAD_DIM_V, BLOCK_DV, UNPACK)


def _geometry(scan, batch, heads, tokens, elsize, block_rows):
    """``(rows, block_d, block_rows, across_rows, tiles, grid, block_dv)`` of a launch over the scanned entries."""
    rows = batch * heads * tokens
    block_d = triton.next_power_of_2(scan.shape[3])
    block_dv = triton.next_power_of_2(scan.head_dim_v)
    entries = len(scan.sizes)
    if block_rows is None:
        block_rows = _launch.block_rows(rows, entries, max(block_d, block_dv) * elsize, scan.device, MAX_TILE_BYTES,
                                        MIN_PROGRAMS_PER_SM)
    across_rows = tokens < block_rows and rows < 2**31 - block_rows
    tiles = triton.cdiv(tokens, block_rows)
    grid = (triton.cdiv(rows, block_rows) if across_rows else batch * heads * tiles, entries)
    return rows, block_d, block_rows, across_rows, tiles, grid, block_dv


def _launch_kernel(scan, batch, heads, tokens, t0, device_starts, chunk, unpack, block_rows, num_warps):
    """Launch the kernel over the scanned entries for ``batch`` x ``heads`` x ``tokens`` rows from ``t0``."""
    device = scan.device
    _checks.check_backend(device, _copy_tokens_kernel)
    if batch * heads * tokens == 0:
        return
    rows, block_d, block_rows, across_rows, tiles, grid, block_dv = _geometry(scan, batch, heads, tokens,
                                                                              chunk.element_size(), block_rows)
    with _launch.launch_guard(device):
        table = _tables.table(scan.rows, _tables.TOKEN_COLS, device)
        _launch.launch(_copy_tokens_kernel, grid,
                       (table, _tables.as_bits(chunk), device_starts if device_starts is not None else table,
                        rows, heads, tokens, tiles, t0),
                       dict(COLS=_tables.TOKEN_COLS, HEAD_DIM=scan.shape[3], BLOCK_D=block_d, BLOCK_R=block_rows,
                            ALIGN=scan.vector, DEVICE_STARTS=device_starts is not None, UNPACK=unpack,
                            ACROSS_ROWS=across_rows, HEAD_DIM_V=scan.head_dim_v, BLOCK_DV=block_dv),
                       num_warps or NUM_WARPS, device)


#: Pointer tables a plan keeps in flight for :meth:`NewestPlan.bind` (one per step; a slot is reused only
#: once the launch that read it has run, so 16 steps of queue never wait).
BIND_RING = 16


class NewestPlan:
    """Triton side of :func:`kvstream.kernels.plan_newest` (documented there): the checks, pointer table and
    launch geometry of one set of per-layer tensors, made once; :meth:`run` is one launch."""

    def __init__(self, keys, values, layers, num_tokens, block_rows=None, num_warps=None):
        ids, scan, resolved = _checks.newest_args(keys, values, layers, num_tokens, None)
        _checks.check_backend(scan.device, _copy_tokens_kernel)
        b, h, _, d = scan.shape
        self.keys = [keys[l] for l in ids]  # kept alive: the table points at them
        self.values = [values[l] for l in ids]
        self.head_dims = (d, scan.head_dim_v)
        self.shape = _checks.newest_shape(ids, scan, num_tokens)
        self.dtype, self.device = scan.dtype, scan.device
        self.num_tokens = num_tokens
        self.capacity = min(scan.sizes)  # positions every layer holds
        self._heads = h
        self._batch = b
        self._geom = _geometry(scan, b, h, num_tokens, scan.dtype.itemsize, block_rows)
        self._align = scan.vector
        self._warps = num_warps or NUM_WARPS
        _, block_d, block_r, across_rows, _, _, block_dv = self._geom
        self._consts = dict(COLS=_tables.TOKEN_COLS, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_R=block_r, ALIGN=self._align,
                            DEVICE_STARTS=False, UNPACK=False, ACROSS_ROWS=across_rows, HEAD_DIM_V=scan.head_dim_v,
                            BLOCK_DV=block_dv)
        self._rows = scan.rows
        self._sig = [(tuple(t.shape), t.stride()) for l in ids for t in (keys[l], values[l])]
        self._ring = None  # pinned [BIND_RING, entries * TOKEN_COLS] int64, made by the first bind
        self._read: list = [None] * BIND_RING  # the event after the launch that read each slot
        self._slot = 0
        self._bound_slot: int | None = None  # the ring slot the table is in (None: the cached planned table)
        self._direct: dict = {}  # (specialization) -> (compiled runner, constexpr tail) for _launch_into
        with _launch.launch_guard(self.device):
            self._table = _tables.table(scan.rows, _tables.TOKEN_COLS, self.device)

    def bind(self, keys, values) -> bool:
        """Point the plan at other tensors with the planned shapes, strides, dtype and device (a dynamic
        cache's new KV of a step). ``False`` (nothing changed) if one differs or is not aligned as planned.

        Only addresses change, so the pointer table is patched on the host and written into a pinned slot
        that the kernel reads in place: no validation pass, no table upload, no host sync.
        """
        if self.keys is None:
            raise ConfigError("NewestPlan.bind: the plan was detached from its tensors (use pack_into)")
        if len(keys) != len(self.keys) or len(values) != len(self.values):
            return False
        rows, sig, cols = list(self._rows), self._sig, _tables.TOKEN_COLS
        dtype, device, align = self.dtype, self.device, self._align * self.dtype.itemsize
        i = 0
        for k, v in zip(keys, values):
            for t in (k, v):
                shape, stride = sig[i]
                addr = t.data_ptr()
                if t.shape != shape or t.stride() != stride or addr % align or t.dtype != dtype or t.device != device:
                    return False
                rows[i * cols] = addr
                i += 1
        slot = self._ring_rows(rows)
        table = self._ring_view(slot) if slot is not None else torch.tensor(rows, dtype=torch.int64).view(-1, cols)
        self._table, self.keys, self.values = table, list(keys), list(values)
        return True

    def run(self, start: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Pack positions ``[start, start + n)`` of every planned layer into ``out`` (a new chunk if ``None``).

        Raises
        ------
        LayoutError
            If the positions fall outside the planned tensors, or ``out`` does not fit.
        """
        n = self.num_tokens
        self._check_start("run", start)
        out = _checks.packed_out(out, self.shape, self.dtype, self.device)
        rows, _, _, _, tiles, grid, _ = self._geom
        if rows:
            with _launch.launch_guard(self.device):
                _launch.launch(_copy_tokens_kernel, grid,
                               (self._table, _tables.as_bits(out), self._table, rows, self._heads, n, tiles, start),
                               self._consts, self._warps, self.device)
                if self._bound_slot is not None:
                    self._mark_read()
        return out

    def run_into(self, start: int, buf: torch.Tensor) -> None:
        """Pack positions ``[start, start + n)`` of every planned layer into the first :attr:`nbytes` bytes of
        ``buf``, a flat uint8 tensor in the plan's device memory or in pinned host memory that the GPU reaches
        at its host address (the kernel then writes it over PCIe: zero-copy), aligned to 16 bytes and not
        checked otherwise: a transport's own buffer (:meth:`kvstream.transports.host.HostTransport.flush_into`).
        The launch is enqueued on the current stream; ``buf`` must outlive it.

        Cheaper on the host than :meth:`run` with ``out``: no chunk tensor is made or checked (the check of a
        pinned ``out`` asks the driver whether it is pinned), and from the second launch the compiled kernel
        gets raw addresses (no driver call per pointer; :func:`kvstream.kernels._launch.compiled_entry`).

        Raises
        ------
        LayoutError
            If the positions fall outside the planned tensors.
        ConfigError
            If the plan was :meth:`detach`-ed.
        """
        self._check_start("run_into", start)
        self._launch_into(start, self._table, buf)
        if self._bound_slot is not None:
            self._mark_read()

    def _check_start(self, what: str, start: int) -> None:
        """Raise ``ConfigError`` for a detached plan and ``LayoutError`` for positions outside the planned tensors."""
        if self._table is None:
            raise ConfigError(f"NewestPlan.{what}: the plan was detached from its tensors (use pack_into)")
        n = self.num_tokens
        if not 0 <= start <= self.capacity - n:
            raise LayoutError(f"NewestPlan.{what}: tokens [{start}, {start + n}) fall outside the {self.capacity} "
                              "positions of the planned tensors")

    def pack_into(self, keys, values, start: int, buf: torch.Tensor) -> bool:
        """Pack positions ``[start, start + n)`` of other per-layer tensors into ``buf`` (as :meth:`run_into`),
        without keeping them: a dynamic cache's layers at a chunk of decode steps, whose tensors are new, and
        longer, at every step.

        The tensors must have the planned batch, heads, head dims, dtype and device and addresses and strides
        aligned as planned; their sequence lengths and strides may differ from the plan's. Their table is
        written into a pinned ring slot (as :meth:`bind`) that the kernel reads in place, and the plan holds no
        reference to them afterwards: the launch is ordered before any later work of the current stream, so
        tensors that belong to that stream (a dynamic cache's ``torch.cat`` outputs) may be freed once this
        returns; others must not be written, or their memory reused by another stream, until it has run.

        Returns
        -------
        bool
            ``False`` (nothing launched) if a tensor does not fit the plan.

        Raises
        ------
        LayoutError
            If the positions fall outside a tensor.
        """
        if len(keys) != len(self._sig) // 2 or len(values) != len(keys):
            return False
        scan = _tables.scan_layers(keys, values, list(range(len(keys))), 2)
        if (scan is None or scan.vector % self._align or scan.dtype != self.dtype or scan.device != self.device
                or scan.shape[0] != self._batch or scan.shape[1] != self._heads
                or (scan.shape[3], scan.head_dim_v) != self.head_dims):
            return False
        n = self.num_tokens
        if not 0 <= start <= min(scan.sizes) - n:
            raise LayoutError(f"NewestPlan.pack_into: tokens [{start}, {start + n}) fall outside the "
                              f"{min(scan.sizes)} positions of the shortest tensor")
        slot = self._ring_rows(scan.rows)
        if slot is None:
            self._launch_into(start, torch.tensor(scan.rows, dtype=torch.int64).view(-1, _tables.TOKEN_COLS), buf)
        else:
            self._launch_into(start, self._ring_addr(slot), buf, lambda: self._ring_view(slot))
            self._mark_read()
        return True

    def detach(self) -> None:
        """Drop the planned tensors (and the table that points at them): only :meth:`pack_into` works from now
        on; :meth:`run`, :meth:`run_into` and :meth:`bind` raise ``ConfigError``."""
        self.keys = self.values = None
        self._table = None

    def _ring_rows(self, rows: list) -> int | None:
        """On a GPU, write ``rows`` into the next pinned ring slot (waiting, if need be, for the launch that read
        it :data:`BIND_RING` launches ago), which the kernel reads in place, and return the slot (also
        ``_bound_slot``); on the CPU ``None``."""
        if self.device.type != "cuda":
            self._bound_slot = None
            return None
        if self._ring is None:
            self._ring = torch.empty((BIND_RING, len(rows)), dtype=torch.int64, pin_memory=True)
        slot, self._slot = self._slot, (self._slot + 1) % BIND_RING
        if self._read[slot] is not None:
            self._read[slot].synchronize()  # BIND_RING launches behind: that launch must have read it
        packed = array.array("q", rows)  # named: it must outlive the copy out of it
        ctypes.memmove(self._ring_addr(slot), packed.buffer_info()[0], 8 * len(rows))
        self._bound_slot = slot
        return slot

    def _ring_addr(self, slot: int) -> int:
        return self._ring.data_ptr() + slot * self._ring.shape[1] * 8

    def _ring_view(self, slot: int) -> torch.Tensor:
        return self._ring[slot].view(-1, _tables.TOKEN_COLS)

    def _launch_into(self, start: int, table, buf: torch.Tensor, table_tensor=None) -> None:
        """One launch packing ``[start, start + n)`` through ``table`` (a tensor, or the address of a pinned ring
        slot whose tensor ``table_tensor()`` makes) into the flat ``buf`` (see :meth:`run_into`): the compiled
        kernel with raw addresses once this plan has launched the specialization through
        :func:`kvstream.kernels._launch.launch`."""
        rows, _, _, _, tiles, grid, _ = self._geom
        if not rows:
            return
        n, device = self.num_tokens, self.device
        t_addr = table if type(table) is int else table.data_ptr()
        o_addr = buf.data_ptr()
        key = (_launch._spec(start), t_addr % 16 == 0, o_addr % 16 == 0)
        hit = self._direct.get(key)
        if hit is not None:
            try:
                hit[0](t_addr, o_addr, t_addr, rows, self._heads, n, tiles, start, *hit[1],
                       stream=_launch.current_stream_handle(device))
                return
            except TypeError:  # another Triton's calling convention: through Triton from now on
                _launch.refuse_direct(_copy_tokens_kernel)
                self._direct.clear()
        if type(table) is int:
            table = table_tensor()
        args = (table, buf.view(_tables.bits_dtype(self.dtype)), table, rows, self._heads, n, tiles, start)
        with _launch.launch_guard(device):
            _launch.launch(_copy_tokens_kernel, grid, args, self._consts, self._warps, device)
        entry = _launch.compiled_entry(_copy_tokens_kernel, args, self._consts, self._warps, device)
        if entry is not None and pinned_is_device_addressable():
            self._direct[key] = (entry[0][_launch.grid3(grid)], entry[1])

    @property
    def nbytes(self) -> int:
        """Bytes of one packed chunk (:attr:`shape` of :attr:`dtype`)."""
        return math.prod(self.shape) * self.dtype.itemsize

    def _mark_read(self) -> None:
        """Record, after the launch, the event that frees the bound table's ring slot."""
        slot = self._bound_slot
        event = self._read[slot]
        if event is None:
            event = self._read[slot] = Event(self.device)
        event.record(_launch.current_stream_handle(self.device))


def _region(keys, values, region, chunk, unpack, block_rows, num_warps):
    region, scan = _checks.region_args(keys, values, region)
    shape = region.packed_shape(scan.shape[3], scan.head_dim_v)
    if unpack:
        _checks.check_chunk(chunk, shape, scan.dtype, scan.device)
    else:
        chunk = _checks.packed_out(chunk, shape, scan.dtype, scan.device)
    _launch_kernel(scan, len(region.batch), len(region.heads), len(region.tokens), region.tokens.start, None, chunk,
                   unpack, block_rows, num_warps)
    return chunk


def _newest(keys, values, layers, num_tokens, starts, chunk, unpack, block_rows, num_warps):
    ids, scan, resolved = _checks.newest_args(keys, values, layers, num_tokens, starts)
    b, h = scan.shape[:2]
    shape = _checks.newest_shape(ids, scan, num_tokens)
    if unpack:
        _checks.check_chunk(chunk, shape, scan.dtype, scan.device)
    else:
        chunk = _checks.packed_out(chunk, shape, scan.dtype, scan.device)
    if isinstance(resolved, torch.Tensor):
        _launch_kernel(scan, b, h, num_tokens, 0, resolved, chunk, unpack, block_rows, num_warps)
        return chunk
    t0 = min(resolved)
    if max(resolved) != t0:
        # Per-layer starts go into the table's start column. Equal starts (every full-attention model) stay
        # a launch argument instead, so a StaticCache's table is the same from step to step: a cache hit.
        for i, s in enumerate(resolved):
            scan.rows[(2 * i + 1) * _tables.TOKEN_COLS - 1] = scan.rows[(2 * i + 2) * _tables.TOKEN_COLS - 1] = s - t0
    _launch_kernel(scan, b, h, num_tokens, t0, None, chunk, unpack, block_rows, num_warps)
    return chunk


def pack_tokens(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], region: Region,
                out: torch.Tensor | None = None, *, block_rows: int | None = None,
                num_warps: int | None = None) -> torch.Tensor:
    """Triton launcher of :func:`kvstream.kernels.pack_tokens`, which documents the parameters, result and errors.

    ``block_rows`` (``head_dim`` rows per program; default sized from :data:`MAX_TILE_BYTES` and
    :data:`MIN_PROGRAMS_PER_SM`) and ``num_warps`` (default :data:`NUM_WARPS`) override the tuning.
    """
    return _region(keys, values, region, out, False, block_rows, num_warps)


def unpack_tokens(chunk: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], region: Region,
                  *, block_rows: int | None = None, num_warps: int | None = None) -> None:
    """Triton launcher of :func:`kvstream.kernels.unpack_tokens`, which documents the parameters and errors.

    ``block_rows`` (``head_dim`` rows per program; default sized from :data:`MAX_TILE_BYTES` and
    :data:`MIN_PROGRAMS_PER_SM`) and ``num_warps`` (default :data:`NUM_WARPS`) override the tuning.
    """
    _region(keys, values, region, chunk, True, block_rows, num_warps)


def pack_newest(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *, num_tokens: int = 1,
                layers: range | Sequence[int] | None = None, starts=None, out: torch.Tensor | None = None,
                block_rows: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Triton launcher of :func:`kvstream.kernels.pack_newest`, which documents the parameters, result and errors.

    ``block_rows`` (``head_dim`` rows per program; default sized from :data:`MAX_TILE_BYTES` and
    :data:`MIN_PROGRAMS_PER_SM`) and ``num_warps`` (default :data:`NUM_WARPS`) override the tuning.
    """
    return _newest(keys, values, layers, num_tokens, starts, out, False, block_rows, num_warps)


def unpack_newest(chunk: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], starts,
                  *, layers: range | Sequence[int] | None = None, block_rows: int | None = None,
                  num_warps: int | None = None) -> None:
    """Triton launcher of :func:`kvstream.kernels.unpack_newest`, which documents the parameters and errors.

    ``block_rows`` (``head_dim`` rows per program; default sized from :data:`MAX_TILE_BYTES` and
    :data:`MIN_PROGRAMS_PER_SM`) and ``num_warps`` (default :data:`NUM_WARPS`) override the tuning.
    """
    _newest(keys, values, layers, _checks.chunk_tokens(chunk), starts, chunk, True, block_rows, num_warps)
