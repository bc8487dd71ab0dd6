"""DéjàVuLib's streaming levels (``KVSTREAM_LEVEL``) and level 0, its naive baseline of one copy per row.

Source: DéjàVuLib (msr-fiddle/dejavu, env ``DEJAVULIB_BASELINE``; DéjàVu paper §4 and Fig. 7).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from ..cuda import host_empty, memcpy_async
from ..errors import ConfigError
from ..layout import Region, packed_kv

LEVEL_NAMES = {0: "naive", 1: "buffered", 2: "layer-by-layer", 3: "all"}
DEFAULT_LEVEL = 3


def resolve_level(level: int | str | None = None, *, name: str = "level") -> int:
    """The streaming level from the argument, else ``KVSTREAM_LEVEL``, else 3.

    Parameters
    ----------
    level : int or str, optional
        0-3 or a name (``"buffered"``); ``None`` reads ``KVSTREAM_LEVEL``.
    name : str
        What the caller calls the argument (``"--level"`` for a flag), for the error message; an error in
        the environment variable names ``KVSTREAM_LEVEL``.

    Raises
    ------
    ConfigError
        If the value is not 0, 1, 2 or 3 (names such as ``"buffered"`` are accepted too).
    """
    if level is None:
        level, name = os.environ.get("KVSTREAM_LEVEL", DEFAULT_LEVEL), "KVSTREAM_LEVEL"
    if isinstance(level, str):
        names = {v: k for k, v in LEVEL_NAMES.items()}
        level = names.get(level.strip().lower(), level)
    try:
        value = int(level)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be 0-3 or one of {list(LEVEL_NAMES.values())}, got {level!r}") from None
    if value not in LEVEL_NAMES:
        raise ConfigError(f"{name} must be 0-3 (naive, buffered, layer-by-layer, all), got {value}")
    return value


def copy_rows(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], region: Region,
              starts: Sequence[int]) -> tuple[torch.Tensor, int]:
    """Level 0, DéjàVuLib's naive baseline: one ``cudaMemcpyAsync`` per contiguous row of ``region`` into a
    (pinned) host chunk, then a wait for all of them.

    ``starts[i]`` is the first position of the ``i``-th layer of the region (layers of different lengths:
    the newest tokens). Returns the chunk ``region.packed_shape(head_dim, head_dim_v)`` and the number of
    copies (keys and values of different head dims sit side by side in the chunk's rows: a copy per token).
    """
    first, dk = keys[region.layers.start], keys[region.layers.start].shape[3]
    n = len(region.tokens)
    shape = region.packed_shape(dk, values[region.layers.start].shape[3])
    chunk = host_empty(shape, first.dtype, pin=first.device.type == "cuda")
    parts = packed_kv(chunk, dk)
    copies = 0
    for li, l in enumerate(region.layers):
        s = starts[li]
        for part, src in zip(parts, (keys[l], values[l])):
            rows_contig = (src.stride(2) == src.shape[3] and part.stride(-2) == part.shape[-1]) or n == 1
            for bi, b in enumerate(region.batch):
                for hi, h in enumerate(region.heads):
                    if rows_contig:
                        memcpy_async(part[li, bi, hi], src[b, h, s:s + n])
                        copies += 1
                    else:  # a row per token
                        for t in range(n):
                            memcpy_async(part[li, bi, hi, t], src[b, h, s + t])
                            copies += 1
    if first.device.type == "cuda":
        torch.cuda.current_stream(first.device).synchronize()
    return chunk, copies


__all__ = ["LEVEL_NAMES", "DEFAULT_LEVEL", "resolve_level", "copy_rows"]
