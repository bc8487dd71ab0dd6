"""Torch twins of the Triton kernels: the same operations with plain torch indexing, one ``copy_`` per layer
and K/V.

Each function has the signature of its kernel's launcher (without the tuning overrides), checks its input
the same way and raises the same errors. Tests compare the kernels against these bit-exactly, the CPU path
runs them, and the benchmarks use them as "torch's strided copy" baseline.

Examples
--------
>>> import torch
>>> from kvstream.layout import Region
>>> keys = [torch.arange(2 * 3 * 5 * 4.).view(2, 3, 5, 4) for _ in range(2)]
>>> chunk = pack_tokens(keys, keys, Region(layers=(0, 2), tokens=(1, 3)))
>>> tuple(chunk.shape), bool(chunk[1, 0, 1, 2, 0, 3] == keys[1][1, 2, 1, 3])
((2, 2, 2, 3, 2, 4), True)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import ConfigError
from ..layout import Region, check_hf_layers, packed_kv
from . import _checks


def _region_slices(region: Region) -> tuple[slice, slice, slice]:
    return (slice(region.batch.start, region.batch.stop), slice(region.heads.start, region.heads.stop),
            slice(region.tokens.start, region.tokens.stop))


def pack_tokens(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], region: Region,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of :func:`kvstream.kernels.pack_tokens` (documented there): ``out[i, 0] = keys[l][b, h, t]``,
    ``out[i, 1]`` from ``values``, for the ``i``-th layer ``l`` of the region."""
    return pack_resolved(keys, values, check_hf_layers(keys, values, region), out)


def pack_resolved(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], region: Region,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`pack_tokens` of a region that :func:`kvstream.layout.check_hf_layers` returned for these tensors:
    the tensors are not checked again (``out`` still is)."""
    first, dk = keys[region.layers.start], keys[region.layers.start].shape[3]
    out = _checks.packed_out(out, region.packed_shape(dk, values[region.layers.start].shape[3]), first.dtype,
                             first.device)
    out_k, out_v = packed_kv(out, dk)
    b, h, t = _region_slices(region)
    for i, l in enumerate(region.layers):
        out_k[i].copy_(keys[l][b, h, t])
        out_v[i].copy_(values[l][b, h, t])
    return out


def unpack_tokens(chunk: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                  region: Region) -> None:
    """Twin of :func:`kvstream.kernels.unpack_tokens` (documented there): ``keys[l][b, h, t] = chunk[i, 0]``
    and likewise for ``values``."""
    region = check_hf_layers(keys, values, region)
    first, dk = keys[region.layers.start], keys[region.layers.start].shape[3]
    _checks.check_chunk(chunk, region.packed_shape(dk, values[region.layers.start].shape[3]), first.dtype,
                        first.device)
    in_k, in_v = packed_kv(chunk, dk)
    b, h, t = _region_slices(region)
    for i, l in enumerate(region.layers):
        keys[l][b, h, t].copy_(in_k[i])
        values[l][b, h, t].copy_(in_v[i])


def _host_starts(starts) -> list[int]:
    return starts.tolist() if isinstance(starts, torch.Tensor) else starts


def pack_newest(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *, num_tokens: int = 1,
                layers: range | Sequence[int] | None = None, starts=None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of :func:`kvstream.kernels.pack_newest` (documented there): ``out[i, 0] = keys[l][:, :, s_i:s_i + n]``,
    with ``s_i = keys[l].shape[2] - n`` unless ``starts`` is given.

    Unlike the kernel, it reads device ``starts`` back to the host (a sync) and checks them.
    """
    ids, scan, resolved = _checks.newest_args(keys, values, layers, num_tokens, starts)
    if isinstance(resolved, torch.Tensor):
        return pack_newest(keys, values, num_tokens=num_tokens, layers=ids, starts=resolved.tolist(), out=out)
    out = _checks.packed_out(out, _checks.newest_shape(ids, scan, num_tokens), scan.dtype, scan.device)
    out_k, out_v = packed_kv(out, scan.shape[3])
    for i, (l, s) in enumerate(zip(ids, resolved)):
        out_k[i].copy_(keys[l][:, :, s:s + num_tokens])
        out_v[i].copy_(values[l][:, :, s:s + num_tokens])
    return out


class NewestPlan:
    """Twin of the Triton :class:`~kvstream.kernels.tokens.NewestPlan` (see :func:`kvstream.kernels.plan_newest`):
    checks once, then :meth:`run` is :func:`pack_newest` at ``start`` on every planned layer."""

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], layers=None, num_tokens: int = 1):
        ids, scan, _ = _checks.newest_args(keys, values, layers, num_tokens, None)
        self.keys, self.values = [keys[l] for l in ids], [values[l] for l in ids]
        self.head_dims = (scan.shape[3], scan.head_dim_v)
        self._batch_heads = scan.shape[:2]
        self.shape = _checks.newest_shape(ids, scan, num_tokens)
        self.dtype, self.device = scan.dtype, scan.device
        self.num_tokens = num_tokens
        self.capacity = min(scan.sizes)

    def bind(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> bool:
        """Point the plan at other tensors of the planned shapes, strides, dtype and device; ``False`` if
        one differs (nothing changed). Raises ``ConfigError`` once :meth:`detach`-ed."""
        if self.keys is None:
            raise ConfigError("NewestPlan.bind: the plan was detached from its tensors (use pack_into)")
        sig = [(tuple(t.shape), t.stride(), t.dtype, t.device) for t in self.keys + self.values]
        new = list(keys) + list(values)
        if len(new) != len(sig) or any((tuple(t.shape), t.stride(), t.dtype, t.device) != s for t, s in zip(new, sig)):
            return False
        self.keys, self.values = list(keys), list(values)
        return True

    def run(self, start: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Positions ``[start, start + n)`` of every planned layer as one chunk (``out`` if given). Raises
        ``ConfigError`` once :meth:`detach`-ed."""
        if self.keys is None:
            raise ConfigError("NewestPlan.run: the plan was detached from its tensors (use pack_into)")
        return pack_newest(self.keys, self.values, num_tokens=self.num_tokens, starts=int(start), out=out)

    def run_into(self, start: int, buf: torch.Tensor) -> None:
        """:meth:`run` into the first :attr:`nbytes` bytes of the flat uint8 ``buf``."""
        self.run(start, out=buf[:self.nbytes].view(self.dtype).view(self.shape))

    def pack_into(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], start: int,
                  buf: torch.Tensor) -> bool:
        """Positions ``[start, start + n)`` of other tensors of the planned batch, heads, head dims, dtype and
        device (any length) into ``buf``; ``False`` if one does not fit (nothing written)."""
        b, h = self._batch_heads
        dims = self.head_dims
        if len(keys) != self.shape[0] or len(values) != len(keys) or any(
                t.dim() != 4 or t.shape[0] != b or t.shape[1] != h or t.shape[3] != d or t.dtype != self.dtype
                or t.device != self.device for pair in zip(keys, values) for t, d in zip(pair, dims)):
            return False
        pack_newest(keys, values, num_tokens=self.num_tokens, starts=int(start),
                    out=buf[:self.nbytes].view(self.dtype).view(self.shape))
        return True

    def detach(self) -> None:
        """Drop the planned tensors: only :meth:`pack_into` works afterwards."""
        self.keys = self.values = None

    @property
    def nbytes(self) -> int:
        """Bytes of one packed chunk."""
        return math.prod(self.shape) * self.dtype.itemsize


def unpack_newest(chunk: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], starts,
                  *, layers: range | Sequence[int] | None = None) -> None:
    """Twin of :func:`kvstream.kernels.unpack_newest` (documented there):
    ``keys[l][:, :, s_i:s_i + n] = chunk[i, 0]``.

    Unlike the kernel, it reads device ``starts`` back to the host (a sync) and checks them.
    """
    num_tokens = _checks.chunk_tokens(chunk)
    ids, scan, resolved = _checks.newest_args(keys, values, layers, num_tokens, _host_starts(starts))
    _checks.check_chunk(chunk, _checks.newest_shape(ids, scan, num_tokens), scan.dtype, scan.device)
    in_k, in_v = packed_kv(chunk, scan.shape[3])
    for i, (l, s) in enumerate(zip(ids, resolved)):
        keys[l][:, :, s:s + num_tokens].copy_(in_k[i])
        values[l][:, :, s:s + num_tokens].copy_(in_v[i])


def _host_ids(block_ids):
    return block_ids.cpu() if isinstance(block_ids, torch.Tensor) else block_ids


def pack_blocks(key_caches: Sequence[torch.Tensor], value_caches: Sequence[torch.Tensor], block_ids, *,
                layers: range | Sequence[int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of :func:`kvstream.kernels.pack_blocks` (documented there): ``out[i, 0] = key_caches[l][block_ids]``.

    Unlike the kernel, it reads device block ids back to the host (a sync) and checks them.
    """
    ids, scan, block_ids = _checks.paged_args(key_caches, value_caches, _host_ids(block_ids), layers, unique=False)
    out = _checks.packed_out(out, _checks.paged_shape(ids, scan, block_ids.numel()), scan.dtype, scan.device)
    out_k, out_v = packed_kv(out, scan.shape[3])
    for i, l in enumerate(ids):
        out_k[i].copy_(key_caches[l][block_ids])
        out_v[i].copy_(value_caches[l][block_ids])
    return out


def unpack_blocks(chunk: torch.Tensor, key_caches: Sequence[torch.Tensor], value_caches: Sequence[torch.Tensor],
                  block_ids, *, layers: range | Sequence[int] | None = None) -> None:
    """Twin of :func:`kvstream.kernels.unpack_blocks` (documented there):
    ``key_caches[l][block_ids] = chunk[i, 0]``.

    Unlike the kernel, it reads device block ids back to the host (a sync) and checks them (in range, no
    repeats).
    """
    ids, scan, block_ids = _checks.paged_args(key_caches, value_caches, _host_ids(block_ids), layers, unique=True)
    _checks.check_chunk(chunk, _checks.paged_shape(ids, scan, block_ids.numel()), scan.dtype, scan.device)
    in_k, in_v = packed_kv(chunk, scan.shape[3])
    for i, l in enumerate(ids):
        key_caches[l][block_ids] = in_k[i].to(scan.device)
        value_caches[l][block_ids] = in_v[i].to(scan.device)
