"""Pack and unpack blocks of paged KV caches by block id: one Triton launch for every layer and both K and V.

Paged caches are vLLM/FlashInfer "NHD": per layer ``[num_blocks, block_size, kv_heads, head_dim]``, any
strides with ``head_dim`` stride 1 (so views such as ``kv[:, 0]`` of FlashInfer's
``[num_blocks, 2, block_size, kv_heads, head_dim]`` work). A request's KV lives in the blocks its block table
names; the chunk holds them in block-table order: ``[L, 2, num_ids, block_size, kv_heads, head_dim]``
(:data:`kvstream.layout.PACKED_PAGED_AXES`), or ``[L, num_ids, block_size, kv_heads, head_dim_k + head_dim_v]``
when keys and values have different head dims (as :mod:`.tokens` does it).

Grid: axis 1 walks the table entries (layer, K/V); axis 0 walks (id, tile): a program copies ``BLOCK_R``
rows — ``(block token, head)`` pairs, one ``head_dim`` vector each — of one block. ``block_size`` and
``kv_heads`` are compile-time constants (a model has one of each), so splitting a row index costs no
division.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import _checks, _launch, _tables
from .tokens import _move_rows

#: Target bytes per program: as for token ranges (16 KiB: 8 x 16-byte loads in flight per thread at 4 warps).
#: A vLLM block of 16 tokens x 8 heads x 128 bf16 is 32 KiB, so a program covers half a block.
MAX_TILE_BYTES = 16384
#: Rows per program shrink until the grid has this many programs per SM (a few blocks must still fill an H100).
MIN_PROGRAMS_PER_SM = 4
#: Warps per program (tuned in kvstream/bench/kernels_tune.py).
NUM_WARPS = 4


@triton.jit(do_not_specialize=["num_ids", "tiles"])
def _copy_blocks_kernel(table_ptr, chunk_ptr, ids_ptr, num_ids, tiles,
                        COLS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, ALIGN: tl.constexpr, UNPACK: tl.constexpr,
                        HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr):
    entry = tl.program_id(1)  # 2 * layer + (0: K, 1: V)
    j = tl.program_id(0) // tiles  # which id; a program copies BLOCK_R (block token, head) rows of its block
    rr = (tl.program_id(0) % tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    tok = rr // HEADS  # constexpr divisor: a multiply and a shift
    h = rr % HEADS
    bid = tl.load(ids_ptr + j + tl.zeros_like(rr)).to(tl.int64)  # one id, as a vector: the interpreter cannot
    # combine a scalar mask with a vector one (ValueError: mask has unsupported dtype)
    row = table_ptr + entry * COLS
    # Ids outside [0, num_blocks) (possible only for unchecked device ids) are never dereferenced.
    row_mask = (rr < BLOCK_SIZE * HEADS) & (bid >= 0) & (bid < tl.load(row + 4))
    base = tl.load(row).to(tl.pointer_type(chunk_ptr.dtype.element_ty))
    cache_off = bid * tl.load(row + 1) + tok * tl.load(row + 2) + h * tl.load(row + 3)
    if ALIGN > 1:  # the launcher checked every address and stride: 16-byte vector loads/stores
        base = tl.multiple_of(base, ALIGN * (chunk_ptr.dtype.element_ty.primitive_bitwidth // 8))  # bytes
        cache_off = tl.multiple_of(cache_off, ALIGN)
    if HEAD_DIM_V == HEAD_DIM:  # [L, 2, nb, block_size, H, D]
        chunk_row = (entry.to(tl.int64) * num_ids + j) * (BLOCK_SIZE * HEADS) + rr
        _move_rows(base + cache_off, row_mask, chunk_ptr + chunk_row * HEAD_DIM, HEAD_DIM, BLOCK_D, UNPACK)
    else:  # [L, nb, block_size, H, Dk + Dv]: a row's keys, then its values
        chunk_row = ((entry // 2).to(tl.int64) * num_ids + j) * (BLOCK_SIZE * HEADS) + rr
        row_ptr = chunk_ptr + chunk_row * (HEAD_DIM + HEAD_DIM_V)
        if entry % 2 == 0:
            _move_rows(base + cache_off, row_mask, row_ptr, HEAD_DIM, BLOCK_D, UNPACK)
        else:
            _move_rows(base + cache_off, row_mask, row_ptr + HEAD_DIM, HEAD_DIM_V, BLOCK_DV, UNPACK)


def _blocks(key_caches, value_caches, block_ids, layers, chunk, unpack, block_rows, num_warps):
    ids, scan, block_ids = _checks.paged_args(key_caches, value_caches, block_ids, layers, unique=unpack)
    _, block_size, heads, head_dim = scan.shape
    shape = _checks.paged_shape(ids, scan, block_ids.numel())
    if unpack:
        _checks.check_chunk(chunk, shape, scan.dtype, scan.device)
    else:
        chunk = _checks.packed_out(chunk, shape, scan.dtype, scan.device)
    device = scan.device
    _checks.check_backend(device, _copy_blocks_kernel)
    if chunk.numel() == 0:
        return chunk
    block_d, block_dv = triton.next_power_of_2(head_dim), triton.next_power_of_2(scan.head_dim_v)
    entries = 2 * len(ids)
    if block_rows is None:
        block_rows = _launch.block_rows(block_size * heads, entries * block_ids.numel(),
                                        max(block_d, block_dv) * chunk.element_size(), device, MAX_TILE_BYTES,
                                        MIN_PROGRAMS_PER_SM)
    tiles = triton.cdiv(block_size * heads, block_rows)
    with _launch.launch_guard(device):
        table = _tables.table(scan.rows, _tables.PAGED_COLS, device)
        _launch.launch(_copy_blocks_kernel, (block_ids.numel() * tiles, entries),
                       (table, _tables.as_bits(chunk), block_ids, block_ids.numel(), tiles),
                       dict(COLS=_tables.PAGED_COLS, BLOCK_SIZE=block_size, HEADS=heads, HEAD_DIM=head_dim,
                            BLOCK_D=block_d, BLOCK_R=block_rows, ALIGN=scan.vector, UNPACK=unpack,
                            HEAD_DIM_V=scan.head_dim_v, BLOCK_DV=block_dv),
                       num_warps or NUM_WARPS, scan.device)
    return chunk


def pack_blocks(key_caches: Sequence[torch.Tensor], value_caches: Sequence[torch.Tensor], block_ids, *,
                layers: range | Sequence[int] | None = None, out: torch.Tensor | None = None,
                block_rows: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Triton launcher of :func:`kvstream.kernels.pack_blocks`, which documents the parameters, result and errors.

    ``block_rows`` (``head_dim`` rows per program; default sized from :data:`MAX_TILE_BYTES` and
    :data:`MIN_PROGRAMS_PER_SM`) and ``num_warps`` (default :data:`NUM_WARPS`) override the tuning.
    """
    return _blocks(key_caches, value_caches, block_ids, layers, out, False, block_rows, num_warps)


def unpack_blocks(chunk: torch.Tensor, key_caches: Sequence[torch.Tensor], value_caches: Sequence[torch.Tensor],
                  block_ids, *, layers: range | Sequence[int] | None = None, block_rows: int | None = None,
                  num_warps: int | None = None) -> None:
    """Triton launcher of :func:`kvstream.kernels.unpack_blocks`, which documents the parameters and errors.

    ``block_rows`` (``head_dim`` rows per program; default sized from :data:`MAX_TILE_BYTES` and
    :data:`MIN_PROGRAMS_PER_SM`) and ``num_warps`` (default :data:`NUM_WARPS`) override the tuning.
    """
    _blocks(key_caches, value_caches, block_ids, layers, chunk, True, block_rows, num_warps)
