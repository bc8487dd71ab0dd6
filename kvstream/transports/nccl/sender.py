"""The sending role of an NCCL link: ``flush`` enqueues the send on the caller's stream and announces the
chunk's header through the store.

The receiver must know a chunk's shape before it posts the receive, and it may be asked for chunks in
another order than they were flushed. So the sender numbers its chunks and queues each one's frame
(:func:`kvstream.chunk.encode_frame`: sequence number, key, unpadded header) *before* enqueueing the send; a
publisher thread coalesces the queued frames into one store write (``hdr/<n>``) and keeps one batch in
flight: it publishes the next only once the receiver acknowledged the last, so batches grow to the
receiver's pace and back-to-back flushes cost a fraction of a store round trip each. A flush's handle
completes once its send is done and the receiver acknowledged its chunk
(:class:`~kvstream.transports.peer.AckedHandle`).

A header's bytes depend only on ``(dtype, shape, region, meta)``, so they are encoded once per distinct
value and cached: the next send cannot be enqueued before ``flush`` returns, so its host cost is kept to a
few µs.
"""

from __future__ import annotations

import json
import queue
import threading
import time

import torch

from ...chunk import NO_CHECKSUM, chunk_header, encode_frame
from ...errors import PeerError
from ...layout import Region
from ...handles import Handle
from ..base import Transport
from ..peer import POLL_MIN_S, AckedHandle, poll
from .comm import HEADER_CACHE, raw_stream
from .endpoint import Endpoint, LinkOptions, OpHandle


class Sender(Endpoint):
    """The sending endpoint of one direction (``role="send"``); see :class:`~.endpoint.Endpoint` for the
    parameters. :class:`~kvstream.transports.nccl.NcclTransport` checks them and delegates ``flush`` here.

    Raises ``PeerError`` if the peer does not connect within ``options.timeout_s``."""

    role = "send"

    def __init__(self, store, rank: int, peer: int, options: LinkOptions):
        self._send_lock = threading.Lock()
        self._send_seq = 0
        self._header_bytes: dict[tuple, bytes] = {}  # (dtype, shape, region, meta JSON) -> header bytes
        self._headers: queue.Queue = queue.Queue()
        super().__init__(store, rank, peer, options)
        self._start_threads(self._publish_loop)

    def flush(self, key: str, chunk: torch.Tensor, region: Region | None = None, meta: dict | None = None) -> Handle:
        """Send ``chunk`` to the peer, enqueued on the current CUDA stream; see :meth:`NcclTransport.flush
        <kvstream.transports.nccl.NcclTransport.flush>` (what it raises, when the handle completes)."""
        Transport._check_key(key)
        Transport._check_chunk(chunk)
        self._raise_error()
        if chunk.device != self.device:
            chunk = chunk.to(self.device)
        header = self._encode_header(chunk, region, meta)
        what = f"send of {key!r}"
        with self._send_lock:  # header order == NCCL issue order
            self._send_seq += 1
            seq = self._send_seq
            self._headers.put(encode_frame(key, seq, header))
            stream = torch.cuda.current_stream(self.device) if self._cuda else None
            if chunk.numel():  # view, not byte_view's reshape: contiguous (checked), and reshape costs µs more
                flat = chunk.view(-1).view(torch.uint8)
                self._nccl("send", lambda: self._data_comm.send(flat, self._peer_index, stream=raw_stream(stream)))
            event = self._record(stream, what)
        return AckedHandle(self, OpHandle(self, event, what), seq, f"flush of {key!r}")

    def _encode_header(self, chunk: torch.Tensor, region: Region | None, meta: dict | None) -> bytes:
        """``chunk``'s header bytes without padding (:func:`~kvstream.chunk.chunk_header`: raises its
        ``LayoutError``), cached by ``(dtype, shape, region, JSON of meta)``, which determine them. Only headers
        that encoded are cached, so a bad region or meta raises on every flush."""
        try:
            cache_key = (chunk.dtype, chunk.shape, region, None if meta is None else json.dumps(meta))
            header = self._header_bytes.get(cache_key)
        except (TypeError, ValueError):  # unhashable region, meta not JSON-able: chunk_header says which
            cache_key, header = None, None
        if header is None:
            header = chunk_header(chunk, region, meta, NO_CHECKSUM).to_bytes(pad=False)
            if cache_key is not None:
                if len(self._header_bytes) >= HEADER_CACHE:
                    self._header_bytes.clear()
                self._header_bytes[cache_key] = header
        return header

    def _publish_loop(self) -> None:
        batch_no = published = 0
        while True:
            frames = [self._headers.get()]
            try:
                # Flow control: one batch in flight. While the receiver takes the last one (its store round
                # trips, its receive launch), the headers of later flushes queue up and go out together:
                # batches grow to the receiver's pace and the store costs a fraction of a round trip a chunk.
                if frames[0] is not None and not self._await_taken(published):
                    return
                while True:
                    try:
                        frames.append(self._headers.get_nowait())
                    except queue.Empty:
                        break
                closing = None in frames
                frames = [f for f in frames if f is not None]
                if frames:
                    batch_no += 1
                    self._store.set(f"hdr/{batch_no}", b"".join(frames))
                    published += len(frames)
                if closing:  # an empty batch after the last one: the receiver stops waiting
                    self._store.set(f"hdr/{batch_no + 1}", b"")
                    return
            except Exception as e:  # noqa: BLE001 - the store died with the peer
                self._fail(PeerError(f"Publishing chunk headers to peer rank {self.peer} failed: {e}"))
                return

    def _await_taken(self, published: int) -> bool:
        """Wait until the receiver acknowledged the first ``published`` chunks; False if the link failed
        (or failed now: the receiver took nothing for ``timeout_s``)."""
        deadline = time.monotonic() + self.timeout_s
        while not self.acks.reached(published):
            if self.error is not None or self._stop.is_set():
                return False
            if time.monotonic() > deadline:
                self._fail(PeerError(f"Peer rank {self.peer} took no chunk header for {self.timeout_s} s "
                                     f"({self.acks.count} of {published} taken): dead or hung"))
                return False
            time.sleep(POLL_MIN_S)
        return True


    def _finish(self) -> None:
        """Publish the last headers, then wait (until ``timeout_s``) for the sends in flight and their
        acknowledgements; a failed link skips the wait."""
        if self.error is not None:
            return
        self._headers.put(None)
        self._threads[0].join(timeout=self.timeout_s)
        with self._lock:
            inflight = [e for e, _, _ in self._inflight]
        deadline = time.monotonic() + self.timeout_s
        try:
            for e in inflight:
                if not poll(e.query, deadline, self._raise_peer):
                    break
            self.acks.wait(self._send_seq, deadline, self._raise_peer)
        except PeerError:
            pass


__all__ = ["Sender"]
