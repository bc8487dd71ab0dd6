"""A layer's KV history in pinned host memory: appended to from the device a few tokens at a time on a side
stream, copied back whole (the offload of :mod:`.offload`, the pipeline engine's microbatch swapping)."""

from __future__ import annotations

import torch

from ...cuda import Event, Stream, host_empty, memcpy_2d_async


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """``[B, H, T, D]`` as a ``[B * H, T * D]`` view with one row pitch, or ``None`` if no such view exists."""
    b, h, n, d = t.shape
    try:
        return t.view(b * h, n * d)
    except RuntimeError:
        return None


class HostMirror:
    """One layer's KV history in pinned host memory, ``[B, H, capacity, D]`` for K and ``[B, H, capacity, Dv]``
    for V.

    Parameters
    ----------
    like : torch.Tensor
        A ``[B, H, T, D]`` key tensor giving rows, heads, head_dim and dtype; pinned when it is on CUDA.
    capacity : int
        Tokens the host buffers hold before :meth:`append` grows them (a grow synchronizes).
    values_like : torch.Tensor, optional
        A value tensor whose ``head_dim`` differs from the keys' (MLA); default: values like ``like``.

    Used by :class:`~kvstream.integrations.hf.offload.Offloader` (layer by layer within a forward) and by
    the pipeline engine's microbatch swapping (:mod:`kvstream.serving.pipeline.swap`).
    """

    def __init__(self, like: torch.Tensor, capacity: int, *, values_like: torch.Tensor | None = None):
        b, h, _, d = like.shape
        self.shape = (b, h, d)
        self.head_dim_v = int(values_like.shape[-1]) if values_like is not None else d
        self.dtype = like.dtype
        self.n = 0
        self.k = host_empty((b, h, capacity, d), like.dtype, pin=like.is_cuda)
        self.v = host_empty((b, h, capacity, self.head_dim_v), like.dtype, pin=like.is_cuda)
        self.ready: Event | None = None  # the last append's completion

    def nbytes(self, tokens: int | None = None) -> int:
        """Bytes of ``tokens`` (default: the stored history's) of K and V."""
        b, h, d = self.shape
        return b * h * (self.n if tokens is None else tokens) * (d + self.head_dim_v) * self.k.element_size()

    @property
    def capacity(self) -> int:
        """Tokens the host buffers can hold before they grow."""
        return self.k.shape[2]

    def _grow(self, need: int) -> None:
        if need <= self.capacity:
            return
        if self.ready is not None:
            self.ready.synchronize()
        cap = max(need, 2 * self.capacity)
        b, h, d = self.shape
        for name, dim in (("k", d), ("v", self.head_dim_v)):
            old = getattr(self, name)
            new = host_empty((b, h, cap, dim), self.dtype, pin=old.is_pinned())
            new[:, :, :self.n].copy_(old[:, :, :self.n])
            setattr(self, name, new)

    def append(self, keys: torch.Tensor, values: torch.Tensor, n_new: int, stream: Stream | None) -> None:
        """Copy the newest ``n_new`` tokens of the device tensors ``keys``/``values`` ``[B, H, n + n_new, D]``."""
        self._grow(self.n + n_new)
        for src, dst in ((keys, self.k), (values, self.v)):
            s = src[:, :, self.n:self.n + n_new]
            t = dst[:, :, self.n:self.n + n_new]
            s2, t2 = _rows(s), _rows(t)
            if s2 is not None and t2 is not None:
                memcpy_2d_async(t2, s2, stream)
            else:  # rows not expressible as one pitched copy (an unusual stride): let torch copy
                t.copy_(s, non_blocking=True)
        if stream is not None and stream.is_cuda:
            self.ready = stream.record_event()
        self.n += n_new

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Host views ``[B, H, n, D]`` of the stored history, keys and values."""
        return self.k[:, :, :self.n], self.v[:, :, :self.n]

    def to_device(self, device: torch.device, extra: int, stream: Stream | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Device tensors ``[B, H, n + extra, D]`` whose first ``n`` tokens are this history (copied on ``stream``)."""
        b, h, _ = self.shape
        out = []
        for src in (self.k, self.v):
            buf = torch.empty(b, h, self.n + extra, src.shape[3], dtype=self.dtype, device=device)
            memcpy_2d_async(_rows(buf[:, :, :self.n]), _rows(src[:, :, :self.n]), stream)
            out.append(buf)
        return out[0], out[1]

    def append_after_compute(self, keys: torch.Tensor, values: torch.Tensor, n_new: int, stream: Stream | None) -> None:
        """:meth:`append` on ``stream`` once the current stream's work so far (the compute that made the
        tokens) is done; the device tensors are marked as used there. ``stream=None``: a plain append."""
        if stream is None or not stream.is_cuda:
            self.append(keys, values, n_new, None)
            return
        stream.wait_stream()
        keys.record_stream(stream.torch_stream)
        values.record_stream(stream.torch_stream)
        with stream:
            self.append(keys, values, n_new, stream)

    def prefetch(self, device: torch.device, extra: int, stream: Stream | None) -> tuple[torch.Tensor, torch.Tensor, Event | None]:
        """:meth:`to_device` on ``stream`` after the last append, for use on the current stream.

        Returns ``(keys, values, ready)``: ``ready.wait()`` makes the current stream wait for the copy;
        ``ready`` is ``None`` when the copy already finished (``stream=None``: a synchronous copy).
        """
        if stream is None or not stream.is_cuda:
            k, v = self.to_device(device, extra, None)
            return k, v, None
        if self.ready is not None:
            stream.wait_event(self.ready)
        with stream:
            k, v = self.to_device(device, extra, stream)
        compute = torch.cuda.current_stream(device)
        k.record_stream(compute)
        v.record_stream(compute)
        return k, v, stream.record_event()

    def apply(self, fn) -> None:
        """Replace both buffers by ``fn(view)`` (row ops such as index_select), keeping capacity semantics."""
        if self.ready is not None:
            self.ready.synchronize()
        k, v = fn(self.k[:, :, :self.n]), fn(self.v[:, :, :self.n])
        self.shape, self.head_dim_v = (k.shape[0], k.shape[1], k.shape[3]), v.shape[3]
        self.n = 0
        cap = max(k.shape[2], 1)
        self.k = host_empty((*k.shape[:2], cap, k.shape[3]), k.dtype, pin=self.k.is_pinned())
        self.v = host_empty((*v.shape[:2], cap, v.shape[3]), v.dtype, pin=self.v.is_pinned())
        self.k[:, :, :k.shape[2]].copy_(k)
        self.v[:, :, :v.shape[2]].copy_(v)
        self.n = k.shape[2]


__all__ = ["HostMirror"]
