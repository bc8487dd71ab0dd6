"""Reading a :class:`~kvstream.stores.chunk_file.ChunkFileStore` match: its chunk files into host memory, every
layer verified, then onto the device all at once or layer by layer.

One match reads its chunk files (those from the load's ``start`` on) with
:meth:`~kvstream.transports.disk.DiskTransport.fetch_slices`: every layer of every file is one read,
``queue_depth`` of them in flight, each checked against the layer's own checksum on the host before
anything copies it onward. The reads land in one host staging buffer ``[files, layers, 2, 1, heads,
chunk_tokens, head_dim]`` (pinned for a GPU; kvstream's allocator caches it). They can start early
(:meth:`~kvstream.stores.match.PrefixMatch.prefetch`), beside whatever the caller computes meanwhile.

**Headers in parallel.** Only the first file's header is read on the calling thread (the staging is allocated
from it). Every file's ``fetch_slices`` (open, header checks, slice reads queued) then runs on a reader thread
(:meth:`~kvstream.transports.disk.DiskTransport.submit_read`), all of them queued before any slice read: the
cold header reads are in flight together, and a file's slice reads are queued as soon as its own header is in,
not behind the headers of the files after it (read one after another on the calling thread, cold headers of
~4 ms each held the reads in flight to 7-10 of 16 on the H200 machine's NVMe, 2026-12-01).

**When the length is final.** A file that fails a check (short, a bad slice or header, missing, another
geometry) shortens the match to the files before it, and is deleted if it is corrupt; the files after it may
still be read, and are waited for but never used. The model must never see a match that is later
shortened, so every slice is verified before the load hands out its first layer: a layer-wise load
waits for the reads, layer by layer, copying each verified layer to the device while later ones are
still read, and returns once all are in; the copies onto the device keep landing layer by layer
behind the prefill, one event per layer (:func:`~kvstream.stores.layerwise.enqueue_layers`). The disk
time itself is hidden by the compute/load split (:mod:`kvstream.stores.cost`), which gives the disk the
recompute of the prefix's first tokens to run beside.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import Future
from typing import Callable

import torch

from ..chunk import ChunkHeader
from ..cuda import Event, host_empty, memcpy_2d_async
from ..errors import ChunkNotFound, CorruptChunkError, LayoutError, TransportError
from ..kernels import unpack_tokens
from ..layout import KVLayout, Region
from .layerwise import LayerwiseLoad, enqueue_layers

logger = logging.getLogger(__name__)

#: Back-off (seconds) of a reader that finds a pinned chunk missing: the GC is putting it back.
RETRY_DELAYS_S = (0.002, 0.01, 0.05, 0.2)


def retry(op: Callable, key: str, *args):
    """``op(key, *args)`` (a transport call) that waits out the GC's put-back window of a pinned chunk."""
    for delay in RETRY_DELAYS_S:
        try:
            return op(key, *args)
        except ChunkNotFound:
            time.sleep(delay)
    return op(key, *args)


def chunk_shape(header: ChunkHeader, chunk_tokens: int, key: str) -> tuple[int, ...]:
    """The stored shape ``[layers, 2, 1, heads, chunk_tokens, head_dim]``; raises ``CorruptChunkError`` otherwise."""
    shape = tuple(header.shape)
    if len(shape) != 6 or shape[1] != 2 or shape[2] != 1 or shape[4] != chunk_tokens:
        raise CorruptChunkError(f"chunk {key}: shape {list(shape)} is not [layers, 2, 1, heads, {chunk_tokens}, "
                                "head_dim]")
    return shape


def unchunk(chunks: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Chunks ``[n, L, 2, 1, H, c, D]`` in token order -> packed ``[L, 2, 1, H, n_tokens, D]`` (one copy each).

    ``n_tokens <= n * c``: the result is a view of the first ``n_tokens`` of ``n * c`` tokens.
    """
    n, layers, _, _, heads, c, head_dim = chunks.shape
    full = torch.empty((layers, 2, 1, heads, n * c, head_dim), dtype=chunks.dtype, device=chunks.device)
    keys, values = [full[l, 0] for l in range(layers)], [full[l, 1] for l in range(layers)]
    for i in range(n):
        unpack_tokens(chunks[i], keys, values, Region(layers=(0, layers), tokens=(i * c, (i + 1) * c)))
    return full if n_tokens == n * c else full[:, :, :, :, :n_tokens]


def _start_file(fetch_slices: Callable, key: str, out: torch.Tensor, last: Callable[[], None]) -> list:
    """``fetch_slices(key, out)`` (on a reader thread: open, header checks, slice reads queued), waiting out the
    GC's put-back window (:func:`retry`); ``last`` becomes every slice handle's done-callback."""
    handles = retry(fetch_slices, key, out)
    for h in handles:
        if hasattr(h, "add_done_callback"):
            h.add_done_callback(last)
    return handles


class _LastResolved:
    """When the last of a run's reads resolved: the reads' done-callback.

    A callback object of its own, not a bound method of :class:`ChunkReads`: a future keeps its callbacks, so
    a bound method would make a reference cycle (reads -> handles -> futures -> reads) that keeps the host
    staging alive until Python's cyclic GC runs; pinned staging must go back to the allocator's cache as
    soon as its match is dropped, or the next load allocates (``cudaHostAlloc``) a new block.
    """

    def __init__(self, t0: float):
        self.t = t0

    def __call__(self) -> None:
        self.t = max(self.t, time.perf_counter())


class ChunkReads:
    """The reads of a run of chunk files (in token order) into one host staging buffer, started at once.

    Parameters
    ----------
    transport : DiskTransport
        The store's transport.
    keys : list of str
        The files to read, in token order (non-empty).
    chunk_tokens : int
        Tokens per file.
    drop : callable
        ``drop(key, error)``: delete a corrupt file.
    touch : callable
        ``touch(key)``: record an access (the GC's clock).
    observe : callable
        ``observe(nbytes, seconds)``: the time the reads took (the store's calibration).
    expects : callable, optional
        ``expects(shape, dtype)``: whether a chunk of that shape and dtype is the store's model's (its
        geometry); the first file is checked before the staging is allocated from its header, the others
        must have the same shape and dtype (``fetch_slices`` checks them against the staging).

    Notes
    -----
    Nothing is raised for a bad file: its error goes to :attr:`bad` (its index -> the exception) and
    shortens the run. The first file's header errors are found here; every other file's open and header
    errors (``fetch_slices`` raises them at once, on its reader thread) are found when the file is first
    waited for (:meth:`slices`, from :meth:`wait_layer` or :meth:`finish`), with the same exceptions and
    messages as ``fetch_slices`` raises them.
    """

    def __init__(self, transport, keys: list[str], chunk_tokens: int, *,
                 drop: Callable[[str, Exception], None], touch: Callable[[str], None],
                 observe: Callable[[int, float], None], expects: Callable[[tuple, torch.dtype], bool] | None = None):
        self.keys, self.chunk_tokens = keys, chunk_tokens
        self._drop, self._touch, self._observe = drop, touch, observe
        self._t0 = time.perf_counter()
        self._last = _LastResolved(self._t0)  # the reads' own end, not when they were waited for
        self.files: list[Future] = []  # per file: its slice handles, once its header is read (:func:`_start_file`)
        self.bad: dict[int, Exception] = {}
        self.staging: torch.Tensor | None = None
        self.layout: KVLayout | None = None
        self._good: int | None = None
        try:
            header = retry(transport.describe, keys[0])
            shape = chunk_shape(header, chunk_tokens, keys[0])
            if expects is not None and not expects(shape, header.dtype):
                raise CorruptChunkError(f"chunk {keys[0]}: {header.dtype} {list(shape)} is not a chunk of this "
                                        "store's model")
        except (ChunkNotFound, CorruptChunkError) as e:
            self.bad[0] = e
            return
        except TransportError as e:  # behind a link, or unreadable: not this store's chunk
            self.bad[0] = e
            return
        self.layout = KVLayout(num_layers=shape[0], kv_heads=shape[3], head_dim=shape[5], dtype=header.dtype)
        self.staging = host_empty((len(keys), *shape), header.dtype)  # pinned when a GPU exists
        for i, key in enumerate(keys):  # every file's header on a reader thread, queued before any slice read
            try:
                self.files.append(transport.submit_read(_start_file, transport.fetch_slices, key, self.staging[i],
                                                        self._last))
            except TransportError as e:  # closed meanwhile
                self.bad[i] = e
                break

    def intact(self) -> int:
        """Files known good so far: those before the first failure found (all, while no read has failed)."""
        return min(self.bad, default=len(self.files))

    def slices(self, i: int) -> list:
        """File ``i``'s slice handles, once its header is read and its reads queued; ``[]`` if it failed there
        (recorded in :attr:`bad`: a file that does not fit the match as :class:`CorruptChunkError`)."""
        try:
            return self.files[i].result()
        except LayoutError as e:  # another geometry than the run's first file: not this match's chunk
            self.bad.setdefault(i, CorruptChunkError(f"chunk {self.keys[i]} does not fit the match: {e}"))
        except (ChunkNotFound, CorruptChunkError, TransportError) as e:
            self.bad.setdefault(i, e)
        return []

    def wait_layer(self, layer: int) -> int:
        """Wait until ``layer`` of every file submitted is read and verified; returns :meth:`intact`."""
        for i in range(len(self.files)):
            for h in self.slices(i)[layer:layer + 1]:
                self._wait(i, h)
        return self.intact()

    def _wait(self, i: int, handle) -> None:
        try:
            handle.wait()
        except (CorruptChunkError, TransportError) as e:
            self.bad.setdefault(i, e)

    def finish(self) -> int:
        """Wait for every read (the staging must outlive them), then settle: files intact, in order.

        The first failed file is deleted if it is corrupt; the intact ones are touched; the time the
        reads took is observed. Idempotent; returns the intact files.
        """
        if self._good is not None:
            return self._good
        for i in range(len(self.files)):
            for h in self.slices(i):
                self._wait(i, h)
        good = self.intact()
        self._good = good
        if good < len(self.keys) and isinstance(self.bad.get(good), CorruptChunkError):
            self._drop(self.keys[good], self.bad[good])
        for key in self.keys[:good]:
            self._touch(key)
        if good and self.staging is not None:
            self._observe(good * self.staging[0].numel() * self.staging.element_size(), self._last.t - self._t0)
        return good

    # -- onto the device ---------------------------------------------------------------------------------
    def packed(self, device: torch.device, n_tokens: int) -> torch.Tensor:
        """The KV of the first ``n_tokens`` tokens read, packed ``[L, 2, 1, H, m, D]`` on ``device``
        (``m <= n_tokens``: what was read intact). Synchronous."""
        good = self.finish()
        if good == 0:
            return torch.empty((0, 2, 1, 0, 0, 0))
        n = min(n_tokens, good * self.chunk_tokens)
        chunks = self.staging[:good]
        if device.type == "cpu":
            return unchunk(chunks, n)
        buf = torch.empty(chunks.shape, dtype=chunks.dtype, device=device)
        buf.copy_(chunks, non_blocking=True)
        Event(device).record().synchronize()  # the staging goes back to the allocator after this
        return unchunk(buf, n)

    def layered(self, device: torch.device, n_tokens: int, stream, start: int) -> tuple[LayerwiseLoad, torch.Tensor]:
        """A layer-wise load of the first ``n_tokens`` tokens read (positions from ``start``) and the staging its
        copies read (keep it until the load landed); see the module docstring for when it returns."""
        if self.staging is None:
            self.finish()
            return LayerwiseLoad([], [], [], start, start=start), None
        c, heads, head_dim = self.chunk_tokens, self.layout.kv_heads, self.layout.head_dim
        total = len(self.keys) * c

        def copy_layer(layer: int, kv: torch.Tensor) -> None:
            """Layer ``layer`` of every file verified so far into its tokens of ``kv`` [2, 1, H, total, D]."""
            rows = kv.view(2 * heads, total * head_dim)
            for i in range(self.wait_layer(layer)):
                memcpy_2d_async(rows[:, i * c * head_dim:(i + 1) * c * head_dim],
                                self.staging[i, layer].view(2 * heads, c * head_dim))

        try:
            load = enqueue_layers(self.layout, total, device, stream, copy_layer, start=start)
        finally:
            good = self.finish()
        n = min(n_tokens, good * c)
        if n < total:  # shortened (or capped inside the last chunk): views of the verified tokens
            load = LayerwiseLoad([k[:, :, :n] for k in load.keys], [v[:, :, :n] for v in load.values], load.events,
                                 start + n, stream=load.stream, start=start)
        return load, self.staging

    def close(self) -> None:
        """Wait for reads still in flight (a match released without loading what it prefetched)."""
        self._good = self.finish() if self._good is None else self._good


#: Slices and bytes of the big probe file of :func:`probe_fetch` (32 slices of 1 MiB: a layer of a 256-token chunk).
PROBE_SHAPE = (32, 1 << 20)


def probe_fetch(transport) -> tuple[float, float]:
    """Measure ``transport``'s cold read rate: ``(bytes per second, seconds of latency)``.

    Writes a one-page probe and a 32 MiB probe (32 slices) under ``calibration/``, drops them from the
    page cache (:meth:`~kvstream.transports.disk.DiskTransport.drop_page_cache`), reads each back through
    :meth:`~kvstream.transports.disk.DiskTransport.fetch_slices` and deletes them. The one-page read is
    the latency; the bandwidth is the big probe's bytes over the time it took beyond that.
    """
    times = []
    for i, shape in enumerate([(1, 4096), PROBE_SHAPE]):
        key = f"calibration/probe-{uuid.uuid4().hex}-{i}"
        data = torch.randint(0, 256, shape, dtype=torch.uint8)
        try:
            transport.flush(key, data, slices=True).wait()
            transport.drop_page_cache(key)
            out = host_empty(shape, torch.uint8)
            t0 = time.perf_counter()
            for h in transport.fetch_slices(key, out):
                h.wait()
            times.append(time.perf_counter() - t0)
        finally:
            transport.delete(key)
    latency, big = times
    return PROBE_SHAPE[0] * PROBE_SHAPE[1] / max(big - latency, 1e-9), latency


__all__ = ["ChunkReads", "probe_fetch", "PROBE_SHAPE", "RETRY_DELAYS_S", "retry", "chunk_shape", "unchunk"]
