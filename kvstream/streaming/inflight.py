"""What a :class:`~kvstream.streaming.streamer.KVStreamer` has enqueued and not yet seen land: the handles of
chunks in flight, and the packed chunks (and row views) held until the side stream's copies have read them.

Holding a packed chunk until an event after its copy has fired is ``record_stream``'s guarantee without its
cost: the caching allocator cannot hand the chunk's memory to new compute work while the copy still reads it.
Every driver call here costs ~100 µs of host time inside a model's forward, cold (bench/NOTES.md, "Results,
2026-12-01, sixth session"), so handles are trimmed once in :data:`TRACK_TRIM`, a flush's own event marks its
chunk read where it has one, and fired events of our own are recorded again. Where the transport's reads are
local, the bytes held are bounded (:data:`HOLD_BYTES`): past the bound, the compute stream waits for the oldest
chunk's read instead of the host, so a host far ahead of the GPU does not pile chunks up.
"""

from __future__ import annotations

import threading
from collections import deque

from ..handles import EventHandle, Handle

#: Handles tracked between two trims of the landed ones (each ``done()`` is a driver call).
TRACK_TRIM = 16
#: Bytes of packed chunks held at most when the transport's reads are local (``Transport.local_reads``): beyond
#: them, the compute stream waits for the oldest chunk's read and the chunk is dropped (the newest always
#: stays). The host runs many layers ahead of a GPU-bound prefill (19 of 32 at B16 P2000: 2.5 GB of 131 MB
#: chunks held, bench/NOTES.md, "Results, 2026-12-02"); a copy is ~1/10 of a layer's compute there, so a wait
#: two chunks back never stalls the model. Below the bound (a B1 prefill's 2 MiB layers, 32 chunks of 4 MiB)
#: no wait is enqueued at all: each is a driver call of ~2 µs, hot.
HOLD_BYTES = 256 << 20


class InFlight:
    """The chunks in flight of one streamer (see the module docstring).

    Parameters
    ----------
    side : kvstream.cuda.Stream or None
        The streamer's side stream, where every held chunk's copy runs (``None`` on a CPU: nothing is held).
    """

    def __init__(self, side=None):
        self.side = side
        self.lock = threading.Lock()
        self.pending: deque = deque()  # handles of chunks in flight, in stream order
        self.reading: deque = deque()  # (event after a copy, the tensors it reads, ours?, bytes), in stream order
        self.held_bytes = 0  # of the tensors in ``reading``
        self._free_events: list = []  # fired events of ours, recorded again

    def track(self, h: Handle) -> Handle:
        """Remember ``h`` until :meth:`wait`; every :data:`TRACK_TRIM` handles the landed ones are dropped, oldest
        first. Returns ``h``."""
        with self.lock:
            pending = self.pending
            if len(pending) >= TRACK_TRIM:
                while pending and pending[0].done():
                    pending.popleft()
            pending.append(h)
        return h

    def keep_until_read(self, tensors: list, flushed: Handle | None = None, *, nbytes: int = 0,
                        bounded: bool = False) -> None:
        """Hold ``tensors`` (``nbytes`` in all) until the side stream's work so far has read them: until the
        event of ``flushed`` (the flush just enqueued there) when it is an :class:`EventHandle`, recorded after
        the flush's last stream-ordered step, so no event of our own is recorded; else until an event recorded
        now on the side stream (ours, reused once fired). The chunks read already are dropped first, oldest
        first. An event the transport recycles after it fired is recorded again later, so it reads as fired
        too late, never too early.

        ``bounded`` (the transport's reads are local): while more than :data:`HOLD_BYTES` are held, the
        **current** stream (call this on the compute stream, where the chunks were allocated) waits for the
        oldest chunk's event, so the caching allocator's stream order already puts any reuse of its memory
        after the read, and it is dropped; the newest stays. A wait on an event recorded again later waits
        longer, never less.
        """
        reading = self.reading
        while reading and reading[0][0].query():
            self._drop_oldest()
        if type(flushed) is EventHandle:
            reading.append((flushed.event, tensors, False, nbytes))
        else:
            reading.append((self.side.record_event(self._free_events.pop() if self._free_events else None),
                            tensors, True, nbytes))
        self.held_bytes += nbytes
        if bounded:
            while self.held_bytes > HOLD_BYTES and len(reading) > 1:
                reading[0][0].wait()  # the current (compute) stream: no host blocking
                self._drop_oldest()

    def _drop_oldest(self) -> None:
        event, _, own, nbytes = self.reading.popleft()
        self.held_bytes -= nbytes
        if own:
            self._free_events.append(event)

    def release_read(self) -> None:
        """Drop every held chunk once the newest has been read (one event query): the decode chunks that write
        a transport in place hold nothing, so without this a prefill's packed layers (4.2 GB at B16 P2000)
        stayed on the GPU until :meth:`wait`. Every held chunk's event is recorded on the side stream, in
        order, so the newest having fired means all have."""
        reading = self.reading
        if reading and reading[-1][0].query():
            self._free_events.extend(e for e, _, own, _ in reading if own)
            reading.clear()
            self.held_bytes = 0

    def wait(self) -> None:
        """Block until every tracked chunk has landed; raise the first error (after waiting for all)."""
        with self.lock:
            pending, self.pending = list(self.pending), deque()
        first: BaseException | None = None
        for h in pending:
            try:
                h.wait()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                first = first or e
        with self.lock:
            self.reading.clear()  # every pack ran before the copies waited for above
            self.held_bytes = 0
        if first is not None:
            raise first


__all__ = ["HOLD_BYTES", "TRACK_TRIM", "InFlight"]
