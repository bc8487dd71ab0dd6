"""Cache builders and checks shared by the kernel tests (imported by name: tests/kernels has no __init__)."""

from __future__ import annotations

import os

import torch

#: Written wherever nothing may be written; far outside randn's range, exact in every float dtype tested.
SENTINEL = 12352.0
#: Float dtypes every test runs over (the kernels move them as 2- and 4-byte bit patterns).
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def rand(gen: torch.Generator, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Random values of ``dtype`` on ``device`` drawn from the seeded CPU generator ``gen``."""
    return torch.randn(tuple(shape), generator=gen).to(dtype).to(device)


#: Storage kinds of HF-layout layers: how each [B, H, S, D] tensor is laid out in memory.
KINDS = ("contiguous", "static", "bshd", "sliced", "unaligned")


def hf_layers(gen, *, seq, batch, heads, head_dim, dtype, device, kind="contiguous", head_dim_v=None):
    """Per-layer K and V tensors ``[batch, heads, seq[l], head_dim]`` (V: ``head_dim_v`` if given: MLA) stored
    as ``kind``:

    * ``contiguous`` — DynamicCache;
    * ``static`` — StaticCache: a ``[B, H, seq + 3, D]`` buffer viewed to ``[:, :, :seq]``;
    * ``bshd`` — ``[B, S, H, D]`` storage transposed (seq stride ``H * D``);
    * ``sliced`` — a window of a larger buffer in every axis but ``head_dim`` (storage offset, odd strides);
    * ``unaligned`` — contiguous, but one element into its buffer (no 16-byte vectors possible).

    Returns ``(keys, values, bases)``: the views and the buffers behind them (compare those whole, to see
    that nothing outside a view was touched).
    """
    keys, values, bases = [], [], []
    for s in seq:
        for out, d in ((keys, head_dim), (values, head_dim_v or head_dim)):
            if kind == "contiguous":
                base = rand(gen, (batch, heads, s, d), dtype, device)
                view = base
            elif kind == "static":
                base = rand(gen, (batch, heads, s + 3, d), dtype, device)
                view = base[:, :, :s]
            elif kind == "bshd":
                base = rand(gen, (batch, s, heads, d), dtype, device)
                view = base.transpose(1, 2)
            elif kind == "unaligned":
                base = rand(gen, (batch * heads * s * d + 1,), dtype, device)
                view = base[1:].view(batch, heads, s, d)
            elif kind == "sliced":
                base = rand(gen, (batch + 2, heads + 1, s + 2, d), dtype, device)
                view = base[1:batch + 1, 1:heads + 1, 2:s + 2]
            else:
                raise ValueError(kind)
            out.append(view)
            bases.append(base)
    return keys, values, bases


def paged_layers(gen, *, layers, num_blocks, block_size, heads, head_dim, dtype, device, kind="nhd",
                 head_dim_v=None):
    """Per-layer paged caches ``[num_blocks, block_size, heads, head_dim]``:

    * ``nhd`` — one contiguous tensor per layer and K/V (V of ``head_dim_v`` if given);
    * ``flashinfer`` — ``[num_blocks, 2, block_size, H, D]`` per layer, K = ``[:, 0]``, V = ``[:, 1]``;
    * ``vllm`` — ``[2, num_blocks, block_size, H, D]`` per layer, K = ``[0]``, V = ``[1]``.

    Returns ``(key_caches, value_caches, bases)``.
    """
    kc, vc, bases = [], [], []
    for _ in range(layers):
        if kind == "nhd":
            k = rand(gen, (num_blocks, block_size, heads, head_dim), dtype, device)
            v = rand(gen, (num_blocks, block_size, heads, head_dim_v or head_dim), dtype, device)
            bases += [k, v]
        elif kind == "flashinfer":
            base = rand(gen, (num_blocks, 2, block_size, heads, head_dim), dtype, device)
            k, v = base[:, 0], base[:, 1]
            bases.append(base)
        elif kind == "vllm":
            base = rand(gen, (2, num_blocks, block_size, heads, head_dim), dtype, device)
            k, v = base[0], base[1]
            bases.append(base)
        else:
            raise ValueError(kind)
        kc.append(k)
        vc.append(v)
    return kc, vc, bases


def sentinel_out(shape, dtype, device, pad: int = 5, pin: bool = False):
    """A contiguous ``shape`` tensor cut from the middle of a sentinel-filled buffer; returns ``(out, buffer)``.

    The ``pad`` elements either side must still hold the sentinel after a kernel wrote ``out``.
    """
    numel = 1
    for s in shape:
        numel *= s
    buf = torch.full((numel + 2 * pad,), SENTINEL, dtype=dtype, device=device, pin_memory=pin)
    return buf[pad:pad + numel].view(tuple(shape)), buf


def assert_pads_untouched(buf: torch.Tensor, pad: int = 5) -> None:
    fill = torch.full((pad,), SENTINEL, dtype=buf.dtype, device=buf.device)
    assert torch.equal(buf[:pad], fill) and torch.equal(buf[-pad:], fill), "wrote outside out"


def clones(tensors):
    return [t.clone() for t in tensors]


def assert_all_equal(got, expected, what="tensor") -> None:
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert torch.equal(g, e), f"{what} {i} differs"


def twin_result(bases, run_twin):
    """Run ``run_twin()`` (a torch-twin unpack writing into the tensors behind ``bases``), return the buffers it
    produced and put the original contents back, so the kernel under test starts from the same state."""
    saved = clones(bases)
    run_twin()
    want = clones(bases)
    for b, s in zip(bases, saved):
        b.copy_(s)
    return want
