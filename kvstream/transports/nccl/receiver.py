"""The receiving role of an NCCL link: a thread that posts receives as headers arrive, and the fetches
that take the chunks.

The receiver thread waits for header batches in order (``hdr/<n>``, a blocking ``store.wait`` on its own
connection: :class:`~kvstream.transports.peer.KeyWaiter`), decodes each header once per distinct value
(:func:`kvstream.chunk.decode_frames`, :meth:`ChunkHeader.from_bytes <kvstream.chunk.ChunkHeader.from_bytes>`),
posts the receives of a batch in one NCCL launch (``nccl.group()``) on its own stream, then acknowledges
the batch (``ack``, a counter):

* into the caller's ``out`` when a fetch for that key is already waiting (zero copy: the chunk is
  delivered, not kept);
* otherwise into a new buffer on the receiving GPU (receive-ahead), which a later fetch copies from on the
  caller's stream (device to device).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from ...chunk import ChunkHeader, byte_view, decode_frames
from ...errors import ChunkNotFound, LayoutError, PeerError, TransportError
from ...layout import check_packed
from ...handles import AllHandle, CompletedHandle, Handle
from ..base import Transport
from ..peer import ChunkTimeout, KeyWaiter
from .comm import HEADER_CACHE, load_nccl, raw_stream
from .endpoint import Endpoint, LinkOptions, OpHandle

#: How often a fetch waiting for its receive to be posted checks the link (seconds): the bound on how late
#: it notices a failure that the receiver thread could not hand to it.
POST_POLL_S = 0.05


@dataclass
class _Arrived:
    """A chunk whose receive was posted: header, the buffer (None once delivered into a fetch's out), event."""

    header: ChunkHeader
    buf: torch.Tensor | None
    event: Any


class _Waiting:
    """A fetch registered before its chunk's header arrived; the receiver thread posts the receive into ``out``."""

    def __init__(self, key: str, out: torch.Tensor, ready_event: Any):
        self.key, self.out, self.ready_event = key, out, ready_event
        self.posted = threading.Event()
        self.op: Handle | None = None
        self.error: BaseException | None = None

    def post(self, op: Handle | None, error: BaseException | None = None) -> None:
        """The receive was posted (``op``), or the fetch failed (``error``)."""
        self.op, self.error = op, error
        self.posted.set()


class Receiver(Endpoint):
    """The receiving endpoint of one direction (``role="recv"``); see :class:`~.endpoint.Endpoint` for the
    parameters, and ``fetch_timeout_s``: how long a fetch or describe waits for a key to arrive (seconds).
    :class:`~kvstream.transports.nccl.NcclTransport` checks them and delegates fetches and queries here.

    Raises ``PeerError`` if the peer does not connect within ``options.timeout_s``."""

    role = "recv"

    def __init__(self, store, rank: int, peer: int, options: LinkOptions, fetch_timeout_s: float):
        self.fetch_timeout_s = float(fetch_timeout_s)
        self._arrived: dict[str, _Arrived] = {}
        self._pending: dict[str, _Waiting] = {}
        self._peer_closed = False
        self._headers_seen: dict[bytes, ChunkHeader] = {}  # header bytes -> header (meta None only)
        super().__init__(store, rank, peer, options)
        self._waiter = KeyWaiter(self._store)
        self._start_threads(self._receive_loop)

    def fetch_many(self, items) -> Handle:
        """Fetch several ``(key, out)`` pairs; those not yet arrived are all registered before waiting, so
        each of them is received straight into its ``out``. See :meth:`NcclTransport.fetch
        <kvstream.transports.nccl.NcclTransport.fetch>` (what it raises, what the handle follows)."""
        for key, out in items:
            Transport._check_key(key)
            Transport._check_chunk(out, "out")
        plan: list[tuple[str, torch.Tensor, _Arrived | _Waiting]] = []
        ready: dict[torch.device, Any] = {}  # one event per device marks every out as ready: same stream point
        with self._cond:
            self._raise_error()
            for key, out in items:
                entry = self._arrived.get(key)
                if entry is None:
                    if self._peer_closed:
                        self._withdraw([w for _, _, w in plan if isinstance(w, _Waiting)])
                        raise ChunkTimeout(f"Peer rank {self.peer} closed without sending {key!r}")
                    if key in self._pending:
                        self._withdraw([w for _, _, w in plan if isinstance(w, _Waiting)])
                        raise TransportError(f"A fetch of {key!r} is already waiting for it to arrive")
                    if out.is_cuda and out.device not in ready:
                        ready[out.device] = self._record(torch.cuda.current_stream(out.device), None)
                    entry = self._pending[key] = _Waiting(key, out, ready.get(out.device))
                plan.append((key, out, entry))
        handles: list[Handle] = []
        deadline = time.monotonic() + self.fetch_timeout_s
        waiting = [w for _, _, w in plan if isinstance(w, _Waiting)]
        try:
            for key, out, entry in plan:
                if isinstance(entry, _Arrived):
                    handles.append(self._copy_out(key, entry, out))
                    continue
                if not self._await_posted(entry, deadline):
                    if self._withdraw([entry]):
                        raise ChunkTimeout(f"{key!r} did not arrive from peer rank {self.peer} within "
                                           f"{self.fetch_timeout_s} s")
                    self._await_posted(entry, None)  # the receiver thread took it meanwhile
                if entry.error is not None:
                    raise entry.error
                handles.append(entry.op)
        except BaseException:
            self._withdraw(waiting)
            raise
        return handles[0] if len(handles) == 1 else AllHandle(handles)

    def _await_posted(self, entry: _Waiting, deadline: float | None) -> bool:
        """Wait until the receiver thread posted ``entry``'s receive (True) or ``deadline`` passed (False),
        checking the link every :data:`POST_POLL_S`: a fetch the receiver thread already took when the link
        failed is never posted, so its wait ends with the link's ``PeerError`` (or ``TransportError`` once
        closed)."""
        while True:
            left = POST_POLL_S if deadline is None else min(POST_POLL_S, deadline - time.monotonic())
            if entry.posted.wait(max(0.0, left)):
                return True
            self._raise_error()
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def _copy_out(self, key: str, entry: _Arrived, out: torch.Tensor) -> Handle:
        check_packed(out, entry.header.shape, entry.header.dtype, name=f"out for {key!r}")
        if entry.buf is None:
            raise ChunkNotFound(f"{key!r} was delivered straight into an earlier fetch's out and is not kept")
        src = entry.buf.view(entry.header.dtype).view(entry.header.shape)
        if not self._cuda:
            out.copy_(src)
            return CompletedHandle()
        if out.is_cuda:
            stream = torch.cuda.current_stream(out.device)
            entry.event.wait(stream)
            with torch.cuda.stream(stream):
                out.copy_(src)
            if out.device == self.device:
                entry.buf.record_stream(stream)  # the allocator keeps it until the copy ran
                return OpHandle(self, self._record(stream, None), f"copy of {key!r}")
            # a peer copy to another GPU: finish it before the buffer can be deleted (a rare path)
            handle = OpHandle(self, self._record(stream, None), f"copy of {key!r}")
            handle.wait()
            return handle
        OpHandle(self, entry.event, f"receive of {key!r}").wait()  # bounded: the receive may hang
        out.copy_(src)
        return CompletedHandle()

    def describe(self, key: str, timeout: float | None = None) -> ChunkHeader:
        """The header of ``key``'s chunk as flushed, waiting up to ``timeout`` (default ``fetch_timeout_s``) for it.

        Raises ``ChunkTimeout`` if it does not arrive, ``PeerError`` if the peer fails.
        """
        Transport._check_key(key)
        timeout = self.fetch_timeout_s if timeout is None else float(timeout)
        deadline = time.monotonic() + timeout
        with self._cond:
            while key not in self._arrived:
                self._raise_error()
                if self._peer_closed:
                    raise ChunkTimeout(f"Peer rank {self.peer} closed without sending {key!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChunkTimeout(f"{key!r} did not arrive from peer rank {self.peer} within {timeout} s")
                self._cond.wait(min(left, 0.1))
            return self._arrived[key].header

    def contains(self, key: str) -> bool:
        """Whether ``key``'s chunk has arrived and is kept (not delivered into a fetch's ``out``)."""
        with self._lock:
            entry = self._arrived.get(key)
            return entry is not None and entry.buf is not None

    def delete(self, key: str) -> bool:
        """Drop ``key``'s chunk (its GPU buffer returns to the caching allocator)."""
        with self._lock:
            return self._arrived.pop(key, None) is not None

    def keys(self, prefix: str = "") -> list[str]:
        """Keys of every chunk that arrived (kept or delivered) starting with ``prefix``, sorted."""
        with self._lock:
            return sorted(k for k in self._arrived if k.startswith(prefix))

    def _receive_loop(self) -> None:
        batch_no = 1
        try:
            if self._cuda:
                torch.cuda.set_device(self.device)
            while self.error is None:
                name = f"hdr/{batch_no}"
                raw = self._waiter.get(name, self._stop)
                if raw is None or self.error is not None:
                    return
                if not raw:  # the sender closed after its last batch
                    with self._cond:
                        self._peer_closed = True
                        for p in self._pending.values():
                            p.post(None, ChunkTimeout(f"Peer rank {self.peer} closed without sending {p.key!r}"))
                        self._pending.clear()
                        self._cond.notify_all()
                    return
                frames = decode_frames(raw, source=f"header batch {batch_no} from rank {self.peer}")
                self._receive_batch(frames)  # every receive is posted first: the store round trips come after
                self.acks.bump(len(frames))
                self._store.delete_key(name)
                batch_no += 1
        except Exception as e:  # noqa: BLE001 - every waiter gets it as a PeerError
            if not self._stop.is_set():
                self._fail(e if isinstance(e, PeerError) else
                           PeerError(f"Receiving from peer rank {self.peer} failed: {e}"))

    def _decode_header(self, raw: bytes) -> ChunkHeader:
        """The header of a frame (``raw``: without its padding), decoded once per distinct header without
        ``meta``; one with ``meta`` is decoded every time (its ``meta`` dict is the fetching caller's to keep).

        Raises ``CorruptChunkError`` (:meth:`ChunkHeader.from_bytes <kvstream.chunk.ChunkHeader.from_bytes>`).
        """
        header = self._headers_seen.get(raw)
        if header is None:
            header = ChunkHeader.from_bytes(raw, source=f"chunk header from rank {self.peer}", padded=False)
            if header.meta is None:
                if len(self._headers_seen) >= HEADER_CACHE:
                    self._headers_seen.clear()
                self._headers_seen[raw] = header
        return header

    def _receive_batch(self, frames: list[tuple[str, int, bytes]]) -> None:
        """Post the receives of one header batch (:func:`decode_frames`) in one NCCL launch (a group), in header
        order; then publish the chunks and hand each waiting fetch its handle."""
        stream = self._stream
        decoded = [(key, self._decode_header(raw)) for key, _, raw in frames]
        with self._cond:
            if self._closed:
                return
            pendings = [self._pending.pop(key, None) for key, _ in decoded]
        posts: list[tuple[str, ChunkHeader, _Waiting | None, torch.Tensor | None, torch.Tensor]] = []
        waited: set[int] = set()  # ids of ready events the stream already waits for (fetch_many shares one)
        # receive-ahead buffers are allocated on the receive stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for (key, header), pending in zip(decoded, pendings):
                target = None
                if pending is not None:
                    try:
                        check_packed(pending.out, header.shape, header.dtype, name=f"out for {key!r}")
                        if pending.out.device == self.device:
                            target = pending.out
                    except LayoutError as e:
                        pending.post(None, e)
                        pending = None
                if target is None:
                    buf = torch.empty(header.nbytes, dtype=torch.uint8, device=self.device)
                else:
                    buf = byte_view(target)
                    if stream is not None:
                        ready = pending.ready_event
                        if ready is not None and id(ready) not in waited:
                            ready.wait(stream)
                            waited.add(id(ready))
                        target.record_stream(stream)
                posts.append((key, header, pending, target, buf))
        bufs = [buf for _, header, _, _, buf in posts if header.nbytes]
        if bufs:
            self._nccl(f"receive of {len(bufs)} chunk(s)", lambda: self._recv_all(bufs, stream))
        event = self._record(stream, f"receive of {posts[0][0]!r} and {len(posts) - 1} more" if len(posts) > 1
                             else f"receive of {posts[0][0]!r}")
        handed: list[tuple[str, _Arrived, _Waiting, torch.Tensor | None]] = []
        with self._cond:
            for key, header, pending, target, buf in posts:
                entry = self._arrived[key] = _Arrived(header, None if target is not None else buf, event)
                if pending is None:  # a fetch that registered while the receives were being posted
                    pending = self._pending.pop(key, None)
                if pending is not None:
                    handed.append((key, entry, pending, target))
            self._cond.notify_all()
        for key, entry, pending, target in handed:
            if target is not None:
                pending.post(OpHandle(self, event, f"receive of {key!r}"))
                continue
            try:  # out on another device or the CPU, or a late fetch: copy once the receive landed
                check_packed(pending.out, entry.header.shape, entry.header.dtype, name=f"out for {key!r}")
            except LayoutError as e:
                pending.post(None, e)
                continue
            pending.post(OpHandle(self, event, f"receive of {key!r}",
                                  then=lambda k=key, e=entry, p=pending: self._copy_out(k, e, p.out).wait()))

    def _recv_all(self, bufs: list[torch.Tensor], stream) -> None:
        """``comm.recv`` into each of ``bufs`` in order; several at once inside one ``nccl.group()`` (one launch)."""
        with load_nccl().group() if self._cuda and len(bufs) > 1 else contextlib.nullcontext():
            for buf in bufs:
                self._data_comm.recv(buf, self._peer_index, stream=raw_stream(stream))

    def _withdraw(self, waiting: list[_Waiting]) -> bool:
        """Unregister fetches that gave up; False if the receiver thread took one of them meanwhile."""
        all_ours = True
        with self._cond:
            for w in waiting:
                if self._pending.get(w.key) is w:
                    del self._pending[w.key]
                else:
                    all_ours = False
        return all_ours

    # -- close and failure ---------------------------------------------------------------------------
    def _take_waiting(self) -> list[_Waiting]:
        """Unregister and return the fetches waiting for a chunk (called under the lock)."""
        pending, self._pending = list(self._pending.values()), {}
        return pending

    def _unblock(self) -> None:
        """Wake the receiver thread from its blocking store wait."""
        self._waiter.wake(self._threads[0])

    def _release(self) -> None:
        """Drop every chunk that arrived (GPU buffers go back to the caching allocator)."""
        self._arrived.clear()


__all__ = ["Receiver", "POST_POLL_S"]
