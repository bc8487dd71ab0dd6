"""Decode-step chunks packed straight into the transport's stored buffer: no chunk on the device, no copy.

A transport whose buffers a kernel may write (:class:`~kvstream.streaming.protocols.WritableTransport`: a pinned
:class:`~kvstream.transports.host.HostTransport`) hands its new buffer to ``write(buf)``
(``flush_into``); the pointer-table pack writes the chunk there over PCIe on the current stream (zero-copy), and
the transport records one event after it. Inside a model's forward every driver call costs ~100 µs of host time,
cold (bench/NOTES.md, "Results, 2026-12-01, sixth session"): this path makes a launch and an event, where pack +
copy on the side stream made seven calls. The pack holds the current stream for the PCIe time (~45 µs per 2 MiB
on an H200), so the streamer takes it for decode-step chunks, not for a prompt's layers.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import kernels
from ..chunk import with_head_dims
from ..handles import Handle


class _Unfit(Exception):
    """Raised inside a zero-copy write whose tensors the plan does not fit: nothing was written."""


def planned_in_place(streamer: Any, key: str, plan, start: int, meta: dict | None) -> Handle:
    """Positions ``[start, start + n)`` of a :func:`kvstream.kernels.plan_newest` plan's tensors packed into
    ``streamer``'s transport's new buffer under ``key`` (``meta`` already carries the head dims); the tracked
    handle."""
    h = streamer.transport.flush_into(key, plan.shape, plan.dtype, lambda buf: plan.run_into(start, buf),
                                      device=streamer.device, meta=meta)
    streamer._count_out(plan.nbytes)
    return streamer.inflight.track(h)


def positions_in_place(streamer: Any, plans: dict, key: str, keys: Sequence[torch.Tensor],
                       values: Sequence[torch.Tensor], start: int, num_tokens: int, meta: dict | None) -> Handle | None:
    """Positions ``[start, start + num_tokens)`` of every layer's tensors packed into ``streamer``'s transport's new
    buffer under ``key``, by a plan per chunk geometry kept in ``plans`` (made once with the full checks, which
    raise ``LayoutError``, and detached: it holds no tensor) and pointed at the tensors as they are
    (:meth:`kvstream.kernels.tokens.NewestPlan.pack_into`). The tracked handle, or ``None`` (nothing stored) when
    the tensors do not fit that plan (strides or addresses it was not made for)."""
    first, first_v = keys[0], values[0]
    sig = (num_tokens, len(keys), first.shape[0], first.shape[1], first.shape[-1], first_v.shape[-1], first.dtype,
           first.device)
    plan = plans.get(sig)
    if plan is None:
        plan = kernels.plan_newest(keys, values, num_tokens=num_tokens)
        plan.detach()
        if len(plans) >= 8:
            plans.clear()
        plans[sig] = plan

    def _write(buf: torch.Tensor) -> None:
        """Pack into the transport's ``buf`` (flat uint8), or raise ``_Unfit`` having written nothing."""
        if not plan.pack_into(keys, values, start, buf):
            raise _Unfit

    try:
        h = streamer.transport.flush_into(key, plan.shape, plan.dtype, _write, device=streamer.device,
                                          meta=with_head_dims(meta, *plan.head_dims))
    except _Unfit:
        return None
    streamer._count_out(plan.nbytes)
    return streamer.inflight.track(h)


__all__ = ["planned_in_place", "positions_in_place"]
