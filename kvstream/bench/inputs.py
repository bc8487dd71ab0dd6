"""Inputs: random tensors and HF-layout caches, pinned buffers, byte counts, the bit-exact check of a
packed region, and the model that the generate, levels and prefix topics share.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from kvstream.cuda import default_allocator, host_empty

from .timing import progress, sync

if TYPE_CHECKING:
    from .harness import Run


def random_tensor(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor of random values (never zeros: they hide unwritten outputs and can run faster)."""
    if dtype.is_floating_point:
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return torch.randn(tuple(shape), device=device).to(dtype)
        return torch.randn(tuple(shape), dtype=dtype, device=device)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), tuple(shape), dtype=dtype, device=device)


def random_hf_cache(num_layers: int, batch: int, kv_heads: int, seq: int, head_dim: int, dtype: torch.dtype,
                    device: torch.device | str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer key and value tensors ``[batch, kv_heads, seq, head_dim]`` (HF layout), random."""
    keys = [random_tensor((batch, kv_heads, seq, head_dim), dtype, device) for _ in range(num_layers)]
    values = [random_tensor((batch, kv_heads, seq, head_dim), dtype, device) for _ in range(num_layers)]
    return keys, values


def pinned_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An empty host tensor in pinned memory from kvstream's allocator (:func:`kvstream.cuda.host_empty`);
    plain host memory without a GPU."""
    return host_empty(tuple(shape), dtype, pin=True)


def tensor_nbytes(tensors: Iterable[torch.Tensor] | torch.Tensor) -> int:
    """Bytes of a tensor or of several, from ``numel() * element_size()``."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_region(chunk: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], layers: range,
                 t0: int, t1: int, what: str) -> None:
    """Raise ``RuntimeError`` unless ``chunk[i, 0]``/``chunk[i, 1]`` equal ``keys``/``values[l][:, :, t0:t1]`` bit for bit."""
    for i, l in enumerate(layers):
        for kv, src in ((0, keys[l]), (1, values[l])):
            part = chunk[i, kv]
            ref = src[:, :, t0:t1]
            if part.device != ref.device:
                ref = ref.to(part.device)
            if not torch.equal(part, ref):
                raise RuntimeError(f"{what}: layer {l} {'KV'[kv]} differs from its source; not timing a wrong result")


def free_memory() -> None:
    """Drop unreferenced tensors and return cached CUDA and pinned host memory to the driver (between topics)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        default_allocator().trim()


_MODELS: dict[tuple, torch.nn.Module] = {}


def shared_model(run: Run, layers: int | None = None) -> torch.nn.Module:
    """The benchmark model, built once per process and reused across topics.

    Full runs: the Llama-3-8B shape with ``layers`` (default ``--layers``) decoder layers, bf16, built
    directly on the GPU (``kvstream.models.build_model``; 16 GB of weights at 32 layers). ``--quick``: a
    tiny Llama of ``layers`` (default: at most 2) layers, float32. A model of another shape replaces the one
    held.
    """
    from kvstream.models import build_model, llama3_8b_config, tiny_config

    if layers is None:
        layers = min(run.args.layers, 2) if run.quick else run.args.layers
    key = (run.quick, layers, str(run.device))
    if key not in _MODELS:
        _MODELS.clear()
        free_memory()
        if run.quick:
            cfg, dtype = tiny_config("llama", num_layers=layers), torch.float32
        else:
            cfg = llama3_8b_config(num_layers=layers)
            dtype = torch.bfloat16 if run.is_cuda else torch.float32
        progress(f"building {'tiny llama' if run.quick else 'Llama-3-8B-shaped'} model, {cfg.num_hidden_layers} layers, "
                 f"{dtype} on {run.device}")
        _MODELS[key] = build_model(cfg, device=run.device, dtype=dtype)
        sync(run.device)
        progress("model built")
    return _MODELS[key]


def release_models() -> None:
    """Drop the shared model (end of the suite)."""
    _MODELS.clear()
    free_memory()
