"""Launch tuning shared by the Triton launchers: vector width, rows per program, the SM count, the device
guard, and :func:`launch`, which calls a specialization's compiled kernel directly after its first launch.
Nothing here imports triton.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..cuda.streams import current_stream_handle

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


# -- launching a compiled kernel directly ------------------------------------------------------------
#: Compiled kernels by specialization (see :func:`launch`): ``key -> (compiled, constexpr values in order)``.
_compiled: dict = {}
#: Kernels whose compiled launcher refused the arguments: launched through Triton always.
_no_direct: set = set()


def _spec(arg):
    """What Triton specializes a launch argument on: a tensor's dtype and 16-byte alignment; an int's width
    (32 or 64 bits), and whether it is 1 or a multiple of 16 (more than ``do_not_specialize`` needs: a key
    too fine costs one more launch through Triton, one too coarse would launch the wrong kernel)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or not isinstance(arg, int):
        return type(arg), arg
    return -2**31 <= arg < 2**31, arg == 1, arg % 16 == 0


def launch(kernel, grid: tuple, args: tuple, consts: dict, num_warps: int, device: torch.device) -> None:
    """``kernel[grid](*args, **consts, num_warps=num_warps)`` on the current stream of ``device``.

    ``kernel`` is a ``@triton.jit`` function, ``args`` its runtime arguments (tensors and ints, in order),
    ``consts`` every parameter after them by name (the constexprs). On a GPU, once a specialization has been
    launched through Triton, the compiled kernel it returned is launched directly
    (``CompiledKernel[grid](*args, stream=...)``): Triton's ``JITFunction.run`` binds the arguments, builds the
    specialization key and looks it up on every call, ~26 µs of host time on the H200 host in a tight loop and
    140-200 µs inside the generate hook, where the compiled launcher needs only its arguments (bench/NOTES.md,
    "Results, 2026-12-01, fifth session"). The cache's key holds what Triton specializes on (:func:`_spec`),
    the constexprs, ``num_warps`` and the device. A compiled launcher that refuses the arguments (another
    Triton's calling convention) raises ``TypeError`` before it launches; the kernel then always goes through
    Triton. On the CPU (the interpreter) it always does.
    """
    if device.type != "cuda" or kernel in _no_direct:
        kernel[grid](*args, **consts, num_warps=num_warps)
        return
    key = (kernel, num_warps, device.index, *consts.values(), *map(_spec, args))
    hit = _compiled.get(key)
    if hit is not None:
        compiled, tail = hit
        try:
            compiled[grid3(grid)](*map(_raw, args), *tail, stream=current_stream_handle(device))
            return
        except TypeError:  # this Triton's compiled launcher takes other arguments
            refuse_direct(kernel)
    compiled = kernel[grid](*args, **consts, num_warps=num_warps)
    names = list(getattr(kernel, "arg_names", ()))[len(args):]
    if kernel not in _no_direct and names and set(names) == set(consts) and hasattr(compiled, "__getitem__"):
        _compiled[key] = (compiled, [consts[n] for n in names])


def compiled_entry(kernel, args: tuple, consts: dict, num_warps: int, device: torch.device):
    """The ``(compiled kernel, constexpr values in parameter order)`` that :func:`launch` keeps for this
    specialization, or ``None`` (not launched yet, on the CPU, or launched through Triton always). A caller that
    keeps it may launch ``compiled[grid3](*raw_args, *tail, stream=...)`` itself, with raw addresses (ints) for
    pointers, as long as what Triton specializes on (:func:`_spec`) stays the same; a ``TypeError`` from that
    call means another calling convention (then :func:`refuse_direct` and go through :func:`launch`)."""
    if device.type != "cuda" or kernel in _no_direct:
        return None
    return _compiled.get((kernel, num_warps, device.index, *consts.values(), *map(_spec, args)))


def refuse_direct(kernel) -> None:
    """``kernel``'s compiled launcher refused its arguments: launch it through Triton from now on."""
    _no_direct.add(kernel)
    for key in [k for k in _compiled if k[0] is kernel]:
        del _compiled[key]


def grid3(grid: tuple) -> tuple:
    """``grid`` as the 3-D grid a compiled kernel's launcher takes."""
    return grid if len(grid) == 3 else (*grid, 1, 1)[:3]


def _raw(arg):
    """A launch argument as the compiled launcher takes it without a driver call: a CUDA tensor as its address
    (an int). Handed a tensor, Triton's launcher asks the driver for its device pointer
    (``cuPointerGetAttribute``), one call per pointer argument and launch, which costs ~100 µs of host time
    when the driver's code is cold, as it is inside a model's forward (bench/NOTES.md, "Results, 2026-12-01,
    sixth session"). Pinned host tensors stay tensors: Triton translates their address."""
    return arg.data_ptr() if type(arg) is torch.Tensor and arg.is_cuda else arg
