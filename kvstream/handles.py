"""Handles: an operation in flight (a flush, a fetch, a gather), waited for or polled.

Every transport call returns one; the streamer and the stores combine them. ``stream_ordered`` says whether
the operation's device work was enqueued on the caller's current CUDA stream, so that work enqueued later
on that stream needs no host wait.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import Iterable

from .cuda import Event


class Handle(ABC):
    """An operation in flight. ``wait()`` blocks until it completed (and re-raises its error)."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> None:
        """Block until the operation has completed; raise its error if it failed.

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait at most. ``TimeoutError`` if the operation is still running then.
        """

    @abstractmethod
    def done(self) -> bool:
        """True when the operation has completed (successfully or not); never blocks."""

    @property
    def stream_ordered(self) -> bool:
        """True when all of the operation's work was enqueued on the CUDA stream current at the call, before
        the call returned: work enqueued later on that stream sees its result without a host wait."""
        return False


class CompletedHandle(Handle):
    """A handle for an operation that already finished (or failed) by the time the call returned."""

    def __init__(self, error: BaseException | None = None):
        self._error = error

    def wait(self, timeout: float | None = None) -> None:
        """Return at once, raising the stored error if there is one."""
        if self._error is not None:
            raise self._error

    def done(self) -> bool:
        """Always ``True``."""
        return True


class FutureHandle(Handle):
    """A handle over a ``concurrent.futures.Future`` (work on a background thread)."""

    def __init__(self, future: Future):
        self._future = future

    def wait(self, timeout: float | None = None) -> None:
        """Block until the future resolves; re-raise its exception."""
        self._future.result(timeout=timeout)

    def done(self) -> bool:
        """Whether the future has resolved."""
        return self._future.done()

    def add_done_callback(self, fn) -> None:
        """Call ``fn()`` (on the thread that resolves the future, or now if resolved) once it resolves."""
        self._future.add_done_callback(lambda _: fn())


class EventHandle(Handle):
    """A handle over a :class:`kvstream.cuda.Event` recorded after the operation's last stream-ordered step.

    ``then`` (optional) is a handle for host work that must also finish (for example a disk write that
    starts when the event fires).
    """

    def __init__(self, event: Event, then: Handle | None = None):
        self._event = event
        self._then = then

    @property
    def event(self) -> Event:
        """The CUDA event; another stream waits for it with ``event.wait(stream)`` instead of blocking the host."""
        return self._event

    @property
    def stream_ordered(self) -> bool:
        """True unless trailing host work follows the event (see :attr:`Handle.stream_ordered`)."""
        return self._then is None

    def wait(self, timeout: float | None = None) -> None:
        """Synchronize the event, then wait for the trailing host work if any."""
        self._event.synchronize()
        if self._then is not None:
            self._then.wait(timeout)

    def done(self) -> bool:
        """Whether the event has fired and the trailing host work finished."""
        return self._event.query() and (self._then is None or self._then.done())


class AllHandle(Handle):
    """A handle that completes when every one of ``handles`` has; ``wait`` raises the first error."""

    def __init__(self, handles: Iterable[Handle]):
        self._handles = list(handles)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for each handle in turn; the first error is raised after all were waited for."""
        first: BaseException | None = None
        for h in self._handles:
            try:
                h.wait(timeout)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                first = first or e
        if first is not None:
            raise first

    def done(self) -> bool:
        """Whether every handle is done."""
        return all(h.done() for h in self._handles)

    @property
    def stream_ordered(self) -> bool:
        """True when every handle is stream-ordered."""
        return all(h.stream_ordered for h in self._handles)


__all__ = ["Handle", "CompletedHandle", "FutureHandle", "EventHandle", "AllHandle"]
