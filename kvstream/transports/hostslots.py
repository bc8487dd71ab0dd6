"""What :class:`~kvstream.transports.host.HostTransport` keeps per chunk (:class:`Slot`: its header, its bytes,
the events of copies in flight on them) and the pool its flushes' ready events are recorded from
(:class:`ReadyEvents`). Inside a model's forward every driver call costs ~100 µs of host time, cold, creating an
event included (bench/NOTES.md, "Results, 2026-12-01, sixth session"), so fired ready events are recorded again
rather than made anew."""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass, field

import torch

from ..chunk import ChunkHeader
from ..cuda import Event

#: Flushes between two harvests of fired ready events (:meth:`ReadyEvents.watch`).
HARVEST = 32


def _done(event: Event | None) -> bool:
    return event is None or event.query()


@dataclass
class Slot:
    """One stored chunk: its header, its bytes, and the CUDA events of copies in flight on them."""

    header: ChunkHeader
    buf: torch.Tensor  # uint8 [nbytes], pinned when CUDA is in use
    ready: Event | None = None  # the flush's device-to-host copy (None: landed, or nothing to wait for)
    uses: list = field(default_factory=list)  # events of host-to-device fetches reading ``buf``

    def busy(self) -> bool:
        """Whether a copy into or out of ``buf`` may still be running."""
        return not _done(self.ready) or not all(e.query() for e in self.uses)

    def wait_ready(self) -> None:
        """Block until the flush's copy into ``buf`` has landed."""
        if self.ready is not None:
            self.ready.synchronize()

    def synchronize(self) -> None:
        """Block until no copy touches ``buf`` any more."""
        self.wait_ready()
        for e in self.uses:
            e.synchronize()


class ReadyEvents:
    """The flushes' ready events: recorded from a pool of fired ones (:meth:`record`), given back to it by
    :meth:`watch` once per :data:`HARVEST` flushes.

    :meth:`watch` and :meth:`clear` are called under the transport's lock, which also guards every read of a
    slot's ``ready`` that enqueues work on it. A recycled event may have been waited on (``cudaStreamWaitEvent``
    waits for the record it saw) or be synchronized on by a reader that read ``slot.ready`` just before, which
    then waits for a later copy: too long, never too short.
    """

    def __init__(self):
        self._flushed: deque = deque()  # (ready event, weakref to its slot) that may not have fired, in flush order
        self._pool: dict[int | None, list[Event]] = {}  # fired ready events by device index

    def record(self, device: torch.device, stream: int) -> Event:
        """An event recorded on ``stream`` (a raw ``cudaStream_t``) after a copy into a slot: a fired one of the
        pool, or a new one."""
        pool = self._pool.get(device.index)
        event = pool.pop() if pool else Event(device)
        return event.record(stream)

    def watch(self, event: Event, slot: Slot) -> None:
        """List ``slot``'s ready ``event``; every :data:`HARVEST` flushes, the older half of the list is checked,
        oldest first, until an event has not fired (each check is a driver call), and the fired ones go back to
        the pool (their slots' ``ready`` set to ``None``)."""
        flushed = self._flushed
        flushed.append((event, weakref.ref(slot)))
        if len(flushed) < HARVEST:
            return
        for _ in range(len(flushed) // 2):
            event, ref = flushed[0]
            if not event.query():
                return
            held = ref()
            if held is not None and held.ready is event:
                held.ready = None
            self._pool.setdefault(event.device.index, []).append(event)
            flushed.popleft()

    def clear(self) -> None:
        """Forget the listed events (the transport closed)."""
        self._flushed.clear()


__all__ = ["HARVEST", "ReadyEvents", "Slot"]
