"""The radix store's blobs: token-major host tensors (``[tokens, layers, 2, 1, kv_heads, 1, head_dim]``, a packed
chunk per token), written and read by the kernels through per-layer strided views, and loaded onto a device
whole or layer by layer (:mod:`kvstream.stores.radix.store` describes the layout)."""

from __future__ import annotations

from typing import Sequence

import torch

from ...cuda import Event, memcpy_2d_async
from ...errors import KVStreamError
from ...kernels import pack_tokens, unpack_tokens
from ...layout import KVLayout, Region
from ..layerwise import LayerwiseLoad, enqueue_layers


def blob_shape(layout: KVLayout, n_tokens: int) -> tuple[int, ...]:
    """The shape of a token-major blob of ``n_tokens`` tokens: ``[tokens, layers, 2, 1, kv_heads, 1, head_dim]``."""
    return (int(n_tokens), layout.num_layers, 2, 1, layout.kv_heads, 1, layout.head_dim)


def token_major_views(rows: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer HF-layout views of token-major rows, for the kernels to read or write them in place.

    Parameters
    ----------
    rows : torch.Tensor
        ``[tokens, layers, 2, 1, kv_heads, 1, head_dim]`` (:func:`blob_shape`), any device, contiguous.

    Returns
    -------
    keys, values : list of torch.Tensor
        Per layer ``[1, kv_heads, tokens, head_dim]`` views (no copy) with a token stride of
        ``layers * 2 * kv_heads * head_dim`` elements and stride 1 on ``head_dim``.
    """
    hf = rows.select(5, 0).permute(1, 2, 3, 4, 0, 5)  # [layers, 2, 1, kv_heads, tokens, head_dim]
    return [hf[l, 0] for l in range(hf.shape[0])], [hf[l, 1] for l in range(hf.shape[0])]


def window(slices: list, start: int) -> list:
    """``(blob, offset, used)`` runs of a match without its first ``start`` tokens."""
    out = []
    for blob, offset, used in slices:
        skip = min(start, used)
        start -= skip
        if used > skip:
            out.append((blob, offset + skip, used - skip))
    return out


def write_blob(blob: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], lo: int) -> None:
    """Write positions ``[lo, lo + len(blob))`` of per-layer KV into a token-major blob.

    One ``pack_tokens`` on the KV's device, then one ``unpack_tokens`` into the blob's rows: directly on
    the CPU; for CUDA KV into device rows first, copied to the (pinned) blob in one contiguous transfer.

    Parameters
    ----------
    blob : torch.Tensor
        ``[tokens, layers, 2, 1, kv_heads, 1, head_dim]`` host tensor (:func:`blob_shape`).
    keys, values : sequence of torch.Tensor
        Per layer ``[1, kv_heads, >= lo + tokens, head_dim]``, one device, stride 1 on ``head_dim``.
    lo : int
        First position to store.
    """
    n_tokens, layers = blob.shape[0], len(keys)
    packed = pack_tokens(keys, values, Region(layers=(0, layers), tokens=(lo, lo + n_tokens)))
    rows = blob if packed.device == blob.device else torch.empty(blob.shape, dtype=blob.dtype, device=packed.device)
    unpack_tokens(packed, *token_major_views(rows), Region(layers=(0, layers), tokens=(0, n_tokens)))
    if rows is not blob:
        blob.copy_(rows, non_blocking=True)
        torch.cuda.current_stream(packed.device).synchronize()


def load_slices(slices, layout: KVLayout, n_tokens: int, device: torch.device):
    """Copy the tokens of ``slices`` (token-major, contiguous runs) to ``device``, then pack them there."""
    rows = torch.empty(blob_shape(layout, n_tokens), dtype=layout.dtype, device=device)
    non_blocking = device.type == "cuda"
    pos = 0
    for blob, offset, used in slices:
        take = min(used, n_tokens - pos)
        if take <= 0:
            break
        rows[pos:pos + take].copy_(blob[offset:offset + take], non_blocking=non_blocking)
        pos += take
    packed = pack_tokens(*token_major_views(rows), Region(layers=(0, layout.num_layers), tokens=(0, n_tokens)))
    # release() waits for the event before the host blobs may be evicted
    return packed, (Event(device).record() if non_blocking else None)

def load_layers(slices, layout: KVLayout, n_tokens: int, device: torch.device,
                 stream: "torch.cuda.Stream | None", start: int = 0) -> tuple[LayerwiseLoad, torch.Tensor]:
    """Enqueue the layer-wise load of ``slices`` on ``stream`` (see the module docstring); ``(load, staging)``.

    The staging is allocated here on the current stream (the compute stream), before
    :func:`~kvstream.stores.layerwise.enqueue_layers` makes ``stream`` wait for it. Per layer: one
    ``memcpy_2d_async`` per run of tokens into the one staging buffer, one ``pack_tokens`` into the
    layer's destination; consecutive nodes that slice one blob contiguously (the halves of a split)
    form one run. The staging is reused by every layer, which one in-order stream makes safe and
    costs nothing (the layers' copies run one after the other on the copy engine anyway).
    """
    heads, head_dim = layout.kv_heads, layout.head_dim
    row = 2 * heads * head_dim  # one token's K and V of one layer, contiguous in a blob
    staging = torch.empty((n_tokens, 2, heads, head_dim), dtype=layout.dtype, device=device)
    staging_rows = staging.view(n_tokens, row)
    runs: list[list] = []  # [blob, first token, tokens]: consecutive nodes cut from one blob merge into one run
    pos = 0
    for blob, offset, used in slices:
        take = min(used, n_tokens - pos)
        if take <= 0:
            break
        if runs and runs[-1][0] is blob and runs[-1][1] + runs[-1][2] == offset:
            runs[-1][2] += take  # a split node's halves: one copy, not two
        else:
            runs.append([blob, offset, take])
        pos += take
    pieces = []  # (blob rows [take, layers, row] on the host, staging rows [take, row])
    pos = 0
    for blob, offset, take in runs:
        pieces.append((blob[offset:offset + take].view(take, layout.num_layers, row), staging_rows[pos:pos + take]))
        pos += take
    if pos != n_tokens:
        raise KVStreamError(f"RadixStore: the matched nodes hold {pos} tokens, the match {n_tokens}")
    staged_k, staged_v = token_major_views(staging.view(n_tokens, 1, 2, 1, heads, 1, head_dim))
    one_layer = Region(layers=(0, 1), tokens=(0, n_tokens))

    def copy_layer(layer: int, kv: torch.Tensor) -> None:
        """Layer ``layer``'s rows of every run into the staging, then into ``kv`` in packed order."""
        for src, dst in pieces:
            memcpy_2d_async(dst, src[:, layer], stream)
        pack_tokens(staged_k, staged_v, one_layer, out=kv.unsqueeze(0))

    return enqueue_layers(layout, n_tokens, device, stream, copy_layer, start=start), staging


__all__ = ["blob_shape", "token_major_views", "window", "write_blob", "load_slices", "load_layers"]
