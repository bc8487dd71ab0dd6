"""CUDA streams, events and async copies through cuda-python, usable from torch; no-ops on the CPU.

Streams are created with ``cudaStreamCreateWithPriority(cudaStreamNonBlocking, ...)`` so they never
synchronize implicitly with the legacy default stream, and wrapped in ``torch.cuda.ExternalStream`` so
torch ops and Triton launches can run on them (``with stream: ...``). Events are created with
``cudaEventDisableTiming`` (cheaper to record and wait on) unless timing is asked for.

On a machine without CUDA every class works and does nothing asynchronous: a :class:`Stream` is a
context manager that changes nothing, :class:`Event` methods return at once, and :func:`memcpy_async`
copies synchronously. The runtime above therefore has one code path for CPU tensors and CUDA tensors.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ..errors import CudaError
from .memory import cuda_usable

_RT = None  # cuda.bindings.runtime, imported once on first use (a per-call import cost ~1 us on an H200 host)
_SUCCESS = None
_NOT_READY = None

# torch's C entry points behind torch.cuda.current_stream / set_stream, which cost 5-10 us of Python per call
# (device-index resolution, Stream objects) where a decode step needs a few per step; absent on CPU builds.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_get_stream = getattr(torch._C, "_cuda_getCurrentStream", None)
_set_stream = getattr(torch._C, "_cuda_setStream", None)


def _cudart():
    global _RT, _SUCCESS, _NOT_READY
    if _RT is None:
        from cuda.bindings import runtime as cudart

        _SUCCESS, _NOT_READY = cudart.cudaError_t.cudaSuccess, cudart.cudaError_t.cudaErrorNotReady
        _RT = cudart
    return _RT


def _check(result: Any, what: str) -> Any:
    err = result[0] if type(result) is tuple else result
    if _RT is None:
        _cudart()
    if err != _SUCCESS:
        raise CudaError(f"{what} failed: {getattr(err, 'name', err)}")
    if type(result) is tuple and len(result) > 1:
        return result[1]
    return None


def _device_of(device: torch.device | str | int | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if cuda_usable() else torch.device("cpu")
    if isinstance(device, int):
        return torch.device("cuda", device)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def stream_handle(stream: "Stream | torch.cuda.Stream | int | None", device: torch.device | None = None) -> int:
    """The raw ``cudaStream_t`` (an int) of a kvstream or torch stream, or ``stream`` itself when it is one
    already (an int); torch's current stream of ``device`` (default: the current device) if ``None``."""
    if stream is None:
        return current_stream_handle(device)
    if type(stream) is int:
        return stream
    if isinstance(stream, Stream):
        return stream.handle
    return int(stream.cuda_stream)


def current_stream_handle(device: torch.device | None = None) -> int:
    """The raw ``cudaStream_t`` of torch's current stream on ``device`` (a CUDA device; default the current one).

    What ``torch.cuda.current_stream(device).cuda_stream`` returns, through the C entry point that Triton and
    Inductor launchers use, at a tenth of its host cost.
    """
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    if _raw_stream is not None:
        return _raw_stream(index)
    return int(torch.cuda.current_stream(index).cuda_stream)


class Stream:
    """A non-blocking CUDA stream made with cuda-python, usable by torch and Triton.

    Parameters
    ----------
    device : torch.device, str or int, optional
        The CUDA device; a CPU device (or no CUDA) gives an inert stream.
    priority : int
        CUDA stream priority; lower numbers run first (``-1`` is high on Hopper). Side streams that copy
        KV use the default 0 so that compute keeps its priority.

    Examples
    --------
    >>> side = Stream()                    # doctest: +SKIP
    >>> with side:                         # torch ops and Triton launches go to `side`
    ...     out = pack_tokens(keys, values, region)
    """

    def __init__(self, device: torch.device | str | int | None = None, *, priority: int = 0):
        self.device = _device_of(device)
        self.handle = 0
        self._torch: torch.cuda.Stream | None = None
        if self.device.type == "cuda":
            cudart = _cudart()
            with torch.cuda.device(self.device):
                raw = _check(cudart.cudaStreamCreateWithPriority(cudart.cudaStreamNonBlocking, priority),
                             "cudaStreamCreateWithPriority")
            self._raw = raw
            self.handle = int(raw)
            self._torch = torch.cuda.ExternalStream(self.handle, device=self.device)
            self._ids = (self._torch.stream_id, self._torch.device_index, self._torch.device_type)
        self._tls = threading.local()  # per thread: what each ``with`` replaced (torch's current stream is per thread)

    @property
    def is_cuda(self) -> bool:
        """Whether this is a real CUDA stream."""
        return self._torch is not None

    @property
    def torch_stream(self) -> "torch.cuda.Stream | None":
        """The ``torch.cuda.ExternalStream`` view of this stream (``None`` on the CPU)."""
        return self._torch

    def __enter__(self) -> "Stream":
        stack = self._tls.__dict__.setdefault("stack", [])
        if self._torch is None:
            stack.append(None)
        elif _set_stream is not None and self._ids[1] == torch.cuda.current_device():
            # torch.cuda.stream's own steps for a stream of the current device, without its Python layers
            stack.append(_get_stream(self._ids[1]))
            _set_stream(stream_id=self._ids[0], device_index=self._ids[1], device_type=self._ids[2])
        else:
            ctx = torch.cuda.stream(self._torch)
            ctx.__enter__()
            stack.append(ctx)
        return self

    def __exit__(self, *exc) -> None:
        prev = self._tls.stack.pop()
        if type(prev) is tuple:
            _set_stream(stream_id=prev[0], device_index=prev[1], device_type=prev[2])
        elif prev is not None:
            prev.__exit__(*exc)

    def wait_event(self, event: "Event") -> None:
        """Make later work on this stream wait for ``event`` (no host blocking)."""
        if self._torch is not None and event._raw is not None:
            _check(_RT.cudaStreamWaitEvent(self.handle, event.handle, 0), "cudaStreamWaitEvent")

    def wait_stream(self, other: "Stream | torch.cuda.Stream | None" = None) -> None:
        """Make later work on this stream wait for everything enqueued so far on ``other`` (torch's current
        stream if ``None``)."""
        if self.is_cuda:
            ev = Event(self.device)
            ev.record(other)
            self.wait_event(ev)

    def record_event(self, event: "Event | None" = None) -> "Event":
        """Record ``event`` (a new one if ``None``) on this stream and return it."""
        event = event or Event(self.device)
        event.record(self)
        return event

    def synchronize(self) -> None:
        """Block the host until every operation on this stream has finished."""
        if self.is_cuda:
            _check(_cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        """Synchronize and destroy the stream. Idempotent.

        Never close a stream that tensors were ``record_stream``-ed on while they may still be alive: use
        :func:`side_stream` for those.
        """
        if self.is_cuda and self.handle:
            self.synchronize()
            _check(_cudart().cudaStreamDestroy(self._raw), "cudaStreamDestroy")
            self.handle = 0
            self._torch = None

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            if self.handle:
                _cudart().cudaStreamDestroy(self._raw)
        except Exception:
            pass


class Event:
    """A CUDA event made with cuda-python; inert on the CPU.

    Parameters
    ----------
    device : torch.device, str or int, optional
        The CUDA device; CPU (or no CUDA) gives an event that is always complete.
    timing : bool
        Whether :meth:`elapsed_ms` is needed (otherwise ``cudaEventDisableTiming``, which is cheaper).
    """

    def __init__(self, device: torch.device | str | int | None = None, *, timing: bool = False):
        if type(device) is not torch.device or device.index is None:  # an indexed torch.device: the hot case
            device = _device_of(device)
        self.device = device
        self.handle = 0
        self._raw = None
        if device.type == "cuda":
            cudart = _RT or _cudart()
            flags = cudart.cudaEventDefault if timing else cudart.cudaEventDisableTiming
            if device.index == torch.cuda.current_device():  # the common case: no device switch
                self._raw = _check(cudart.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")
            else:
                with torch.cuda.device(device):
                    self._raw = _check(cudart.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")
            self.handle = int(self._raw)

    @property
    def is_cuda(self) -> bool:
        """Whether this is a real CUDA event."""
        return self._raw is not None

    def record(self, stream: "Stream | torch.cuda.Stream | int | None" = None) -> "Event":
        """Record on ``stream`` (a raw ``cudaStream_t`` int too; torch's current stream if ``None``). Returns ``self``."""
        if self._raw is not None:
            handle = stream.handle if type(stream) is Stream else stream_handle(stream, self.device)
            _check(_RT.cudaEventRecord(self._raw, handle), "cudaEventRecord")
        return self

    def query(self) -> bool:
        """Whether all work captured by the event has completed (never blocks)."""
        if self._raw is None:
            return True
        err = _RT.cudaEventQuery(self._raw)[0]
        if err == _SUCCESS:
            return True
        if err == _NOT_READY:
            return False
        raise CudaError(f"cudaEventQuery failed: {getattr(err, 'name', err)}")

    def synchronize(self) -> None:
        """Block the host until the event has completed."""
        if self.is_cuda:
            _check(_cudart().cudaEventSynchronize(self._raw), "cudaEventSynchronize")

    def wait(self, stream: "Stream | torch.cuda.Stream | None" = None) -> None:
        """Make ``stream`` (torch's current stream if ``None``) wait for this event, without blocking the host."""
        if self.is_cuda:
            _check(_cudart().cudaStreamWaitEvent(stream_handle(stream, self.device), self._raw, 0),
                   "cudaStreamWaitEvent")

    def elapsed_ms(self, end: "Event") -> float:
        """Milliseconds between this event and ``end`` (both made with ``timing=True``)."""
        if not self.is_cuda:
            return 0.0
        return float(_check(_cudart().cudaEventElapsedTime(self._raw, end._raw), "cudaEventElapsedTime"))

    def __del__(self):  # pragma: no cover
        try:
            if self._raw is not None:
                _cudart().cudaEventDestroy(self._raw)
        except Exception:
            pass


def memcpy_async(dst: torch.Tensor, src: torch.Tensor, stream: "Stream | torch.cuda.Stream | int | None" = None) -> None:
    """Copy ``src`` into ``dst`` (same number of bytes, both contiguous) with ``cudaMemcpyAsync``.

    Either side may be device memory or (pinned) host memory; the direction is inferred through unified
    addressing (``cudaMemcpyDefault``). On the CPU, a plain synchronous copy.

    Raises
    ------
    ValueError
        If the byte counts differ or a tensor is not contiguous.
    """
    nbytes = src.numel() * src.element_size()
    if dst.numel() * dst.element_size() != nbytes:
        raise ValueError(f"memcpy_async: {dst.numel() * dst.element_size()} destination bytes for {nbytes} source bytes")
    if not (dst.is_contiguous() and src.is_contiguous()):
        raise ValueError("memcpy_async needs contiguous tensors")
    if nbytes == 0:
        return
    if dst.device.type == "cpu" and src.device.type == "cpu":
        dst.view(torch.uint8).reshape(-1).copy_(src.view(torch.uint8).reshape(-1))
        return
    cudart = _cudart()
    dev = src.device if src.device.type == "cuda" else dst.device
    _check(cudart.cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), nbytes, cudart.cudaMemcpyKind.cudaMemcpyDefault,
                                  stream_handle(stream, dev)), "cudaMemcpyAsync")


def memcpy_2d_async(dst: torch.Tensor, src: torch.Tensor, stream: "Stream | torch.cuda.Stream | None" = None) -> None:
    """Copy a ``[rows, cols]``-shaped strided view ``src`` into ``dst`` of the same shape with one ``cudaMemcpy2DAsync``.

    Both views must be dense along their last dimension (stride 1 there) and may have any row stride:
    for example ``[batch * heads, tokens * head_dim]`` slices of a KV buffer with a larger token capacity.
    The copy engine walks the rows, so a strided host<->device copy costs one call and no staging.
    On the CPU, a plain synchronous copy.

    Raises
    ------
    ValueError
        If shapes or dtypes differ, a view is not 2-D, or a last dimension is not dense.
    """
    if dst.shape != src.shape or dst.dim() != 2 or dst.dtype != src.dtype:
        raise ValueError(f"memcpy_2d_async: needs 2-D views of one shape and dtype, got {list(dst.shape)} {dst.dtype} "
                         f"and {list(src.shape)} {src.dtype}")
    if (dst.shape[1] > 1 and dst.stride(1) != 1) or (src.shape[1] > 1 and src.stride(1) != 1):
        raise ValueError("memcpy_2d_async: the last dimension must be dense (stride 1)")
    rows, cols = src.shape
    if rows == 0 or cols == 0:
        return
    if dst.device.type == "cpu" and src.device.type == "cpu":
        dst.copy_(src)
        return
    isz = src.element_size()
    cudart = _cudart()
    dev = src.device if src.device.type == "cuda" else dst.device
    _check(cudart.cudaMemcpy2DAsync(dst.data_ptr(), dst.stride(0) * isz, src.data_ptr(), src.stride(0) * isz,
                                    cols * isz, rows, cudart.cudaMemcpyKind.cudaMemcpyDefault,
                                    stream_handle(stream, dev)), "cudaMemcpy2DAsync")


_SIDE_STREAMS: dict[tuple[int, str], Stream] = {}
_SIDE_LOCK = __import__("threading").Lock()


def side_stream(device: torch.device | str | int | None = None, name: str = "side") -> Stream:
    """A process-wide side stream of ``device`` for one role (``"side"``, ``"prefetch"``, ...), never destroyed.

    Tensors read on a side stream are marked with ``record_stream``; torch's caching allocator then records
    an event on that stream *when the tensor is freed*, which may be long after the reader is done. A
    stream destroyed before that makes the allocator's ``cudaEventRecord`` fail inside a destructor
    (a process abort, seen on an H200). So side streams live as long as the process, like the streams of
    ``torch.cuda.Stream``'s pool. Returns an inert stream on the CPU.
    """
    dev = _device_of(device)
    if dev.type != "cuda":
        return Stream(dev)
    with _SIDE_LOCK:
        s = _SIDE_STREAMS.get((dev.index, name))
        if s is None:
            s = _SIDE_STREAMS[(dev.index, name)] = Stream(dev)
        return s


__all__ = ["Stream", "Event", "memcpy_async", "memcpy_2d_async", "stream_handle", "current_stream_handle", "side_stream"]
