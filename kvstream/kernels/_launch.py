"""Launch tuning shared by the Triton launchers: vector width, rows per program, the SM count, the device
guard. Nothing here imports triton.
"""

from __future__ import annotations

import contextlib
import math

import torch

#: Largest vector the kernels ask for, in bytes: Hopper's widest global load/store (``ld.global.v4.b32``).
VECTOR_BYTES = 16


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
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()
