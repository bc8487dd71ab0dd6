"""One end of one direction of an NCCL link: what the sending and the receiving role share.

An :class:`Endpoint` holds the direction's store prefix, the heartbeats
(:class:`~kvstream.transports.peer.Liveness`), the setup and data communicators (:mod:`.comm`), its own
CUDA stream, the operations in flight, and failure, after DéjàVu's fault tolerance (heartbeats, then
abort): a watchdog thread checks every operation in flight, and a peer that stops heartbeating
(``dead_after_s``), a store that vanishes, or an operation still running after ``timeout_s`` leads to
``abort()`` of both communicators and a :class:`~kvstream.errors.PeerError` from every waiting and later
call. :class:`~.sender.Sender` and :class:`~.receiver.Receiver` each add one role.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from ...cuda import Event
from ...errors import PeerError, TransportError
from ...handles import Handle
from ..peer import Acks, Liveness, pair_namespace
from .comm import WATCHDOG_S, abort_all, bounded, init_comm, raw_stream, settle, wait_event


class OpHandle(Handle):
    """A stream-ordered NCCL operation: done when its CUDA event fired; a failed endpoint raises PeerError.

    ``event`` is a :class:`kvstream.cuda.Event` (``None`` when the operation ran synchronously, on the CPU);
    ``then`` (optional) runs once after the event fired, in the first successful :meth:`wait`.
    """

    def __init__(self, endpoint: "Endpoint", event: Any, what: str, then=None):
        self._t, self._event, self._what, self._then = endpoint, event, what, then

    @property
    def event(self) -> Any:
        """The CUDA event after the operation (``None`` when it ran synchronously)."""
        return self._event

    def done(self) -> bool:
        """Whether the operation completed (or the endpoint failed)."""
        return self._t.error is not None or self._event is None or self._event.query()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the event fired; ``TimeoutError`` after ``timeout``; ``PeerError`` if the endpoint failed.

        The event is polled (:func:`~.comm.wait_event`), never synchronized. Without ``timeout`` the wait is
        bounded by the endpoint's ``timeout_s``: an operation still running then fails the link (``PeerError``,
        both communicators aborted), as the watchdog would.
        """
        limit = self._t.timeout_s if timeout is None else timeout
        ok = wait_event(self._event, time.monotonic() + limit, self._t._raise_peer)
        self._t._raise_peer()
        if not ok:
            if timeout is None:
                self._t._fail(PeerError(f"NCCL {self._what} still running after {limit} s: the peer rank "
                                        f"{self._t.peer} is dead or hung"))
                self._t._raise_peer()
            raise TimeoutError(f"NCCL {self._what} still running after {limit} s")
        if self._then is not None:
            self._then()
            self._then = None


@dataclass(frozen=True)
class LinkOptions:
    """How an endpoint connects, as :class:`~kvstream.transports.nccl.NcclTransport` checked it: see its
    parameters of the same names (``device`` is a ``torch.device``, CUDA unless ``comm`` is given)."""

    device: torch.device
    namespace: str
    timeout_s: float
    heartbeat_s: float
    dead_after_s: float
    blocking_data: bool
    comm: Any = None
    data_comm: Any = None


class Endpoint:
    """The state one direction's endpoint keeps whatever its role; subclasses set :attr:`role`.

    Parameters
    ----------
    store : torch.distributed.Store
        The rendezvous store; the endpoint works under ``<namespace>/<lo>-<hi>/<src>to<dst>`` in it.
    rank, peer : int
        This process's and the peer's ids.
    options : LinkOptions
        Device, timeouts, heartbeats and communicators.

    A subclass sets up its own state, calls ``Endpoint.__init__`` (which connects: it raises
    :class:`~kvstream.errors.PeerError` if the peer does not join within ``timeout_s``), then starts its
    loop with :meth:`_start_threads`.
    """

    #: ``"send"`` or ``"recv"``: which direction of the pair this endpoint carries.
    role: str = ""

    def __init__(self, store, rank: int, peer: int, options: LinkOptions):
        import torch.distributed as dist

        comm, data_comm = options.comm, options.data_comm
        self.rank, self.peer, self.device, self.timeout_s = rank, peer, options.device, float(options.timeout_s)
        self._cuda = self.device.type == "cuda"
        src, dst = (rank, peer) if self.role == "send" else (peer, rank)
        self._store = dist.PrefixStore(f"{pair_namespace(options.namespace, rank, peer)}/{src}to{dst}", store)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._nccl_lock = threading.Lock()
        self._closed = False
        self.error: PeerError | None = None
        self._aborted = False
        self._stop = threading.Event()
        self._inflight: list[tuple[Any, float, str]] = []
        self._threads: list[threading.Thread] = []
        self.acks = Acks(self._store, "ack")  # one direction: the receiver bumps, the sender reads
        self._live = Liveness(self._store, rank, peer, heartbeat_s=options.heartbeat_s,
                              dead_after_s=options.dead_after_s, startup_s=self.timeout_s, on_change=self._on_liveness)
        self._stream = torch.cuda.Stream(device=self.device) if self._cuda else None  # receives and the warm-up
        self.blocking_data = bool(options.blocking_data) if comm is None else data_comm is not None
        try:
            self._comm = comm if comm is not None else init_comm(self._store, 0 if rank < peer else 1, self.device,
                                                                 self.timeout_s, self._raise_error)
            self._data_comm = self._comm
            if data_comm is not None:
                self._data_comm = data_comm
            elif comm is None and self.blocking_data:
                self._data_comm = init_comm(self._store, 0 if rank < peer else 1, self.device, self.timeout_s,
                                            self._raise_error, blocking=True, uid_key="uid_data")
            if self._data_comm is not self._comm:
                self._warm_up()
        except BaseException:
            self._live.stop()
            self._abort()
            raise

    def _warm_up(self) -> None:
        """One one-element send (or receive) on the data communicator, waited for, so that NCCL connects the
        peer's channels now and not in the first flush. Bounded by ``timeout_s`` (on a helper thread: the first
        operation of a blocking communicator blocks the host until the peer joins it)."""
        deadline = time.monotonic() + self.timeout_s
        buf = torch.zeros(1, dtype=torch.uint8, device=self.device)
        stream = self._stream

        def post():
            """The warm-up operation, enqueued on the endpoint's stream with its device current."""
            with torch.cuda.device(self.device) if self._cuda else contextlib.nullcontext():
                op = self._data_comm.send if self.role == "send" else self._data_comm.recv
                op(buf, self._peer_index, stream=raw_stream(stream))
            return self._record(stream, None)

        event = bounded(post, deadline, self._raise_error, "warm-up")
        settle(self._data_comm, deadline, self._raise_error, "warm-up")
        if not wait_event(event, deadline, self._raise_error):
            raise PeerError(f"NCCL warm-up with peer rank {self.peer} still running after {self.timeout_s} s: "
                            f"the peer is dead or hung")

    def _start_threads(self, loop) -> None:
        """Start the role's ``loop`` and, on a GPU, the watchdog."""
        self._start(loop, "publish" if self.role == "send" else "recv")
        if self._cuda:
            self._start(self._watchdog_loop, "watchdog")

    def _start(self, target, what: str) -> None:
        t = threading.Thread(target=target, name=f"kvstream-nccl-{what}-{self.rank}", daemon=True)
        t.start()
        self._threads.append(t)

    # -- NCCL calls, events, failure -----------------------------------------------------------------
    @property
    def _peer_index(self) -> int:
        return 1 if self.rank < self.peer else 0

    def _nccl(self, what: str, call) -> None:
        """Issue one NCCL call on the data communicator under the lock and check its state (:func:`settle`:
        one ``get_async_error`` on a blocking communicator, which never reports ``ncclInProgress``; a spin
        until it accepted the call on a non-blocking one)."""
        with self._nccl_lock:
            self._raise_error()
            try:
                with torch.cuda.device(self.device) if self._cuda else contextlib.nullcontext():
                    call()
                settle(self._data_comm, time.monotonic() + self.timeout_s, self._raise_error, what)
            except PeerError as e:
                self._fail(e)
                raise
            except Exception as e:  # noqa: BLE001 - NCCL errors surface as PeerError
                error = PeerError(f"NCCL {what} to/from peer rank {self.peer} failed: {e}")
                self._fail(error)
                raise error from e

    def _record(self, stream, what: str | None) -> Event | None:
        """A :class:`kvstream.cuda.Event` recorded on the torch ``stream`` (None on the CPU); tracked by the
        watchdog when ``what`` is given."""
        if stream is None:
            return None
        event = Event(stream.device).record(stream)
        if what is not None:
            with self._lock:
                self._inflight.append((event, time.monotonic() + self.timeout_s, what))
        return event

    def _watchdog_loop(self) -> None:
        while not self._stop.wait(WATCHDOG_S):
            now = time.monotonic()
            with self._lock:
                self._inflight = [(e, d, w) for e, d, w in self._inflight if not e.query()]
                late = [w for e, d, w in self._inflight if d < now]
            if late:
                self._fail(PeerError(f"NCCL {late[0]} still running after {self.timeout_s} s: the peer rank "
                                     f"{self.peer} is dead or hung"))
                return
            if self.error is not None:
                return

    def _on_liveness(self) -> None:
        if self._live.error is not None:
            self._fail(self._live.error)

    def _fail(self, error: PeerError) -> None:
        """Record the first failure, abort both communicators (ends stuck kernels) and wake every waiter."""
        with self._cond:
            if self.error is None:
                self.error = error
            waiting = self._take_waiting()
            self._cond.notify_all()
        for w in waiting:
            w.post(None, PeerError(f"fetch {w.key!r}: {self.error}"))
        self._abort()

    def _abort(self) -> None:
        """``abort()`` the data communicator, then the setup one (each once; safe from any thread)."""
        with self._lock:
            comms = [c for c in (getattr(self, "_data_comm", None), getattr(self, "_comm", None)) if c is not None]
            if self._aborted or not comms:
                return
            self._aborted = True
        abort_all(comms)

    def _raise_peer(self) -> None:
        if self.error is not None:
            raise PeerError(str(self.error)) from self.error

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("NcclTransport is closed")

    def _raise_error(self) -> None:
        self._raise_peer()
        self._check_open()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        return self._closed

    @property
    def peer_error(self) -> PeerError | None:
        """Why the link failed (peer dead, hung, NCCL error), or ``None``."""
        return self.error

    # -- what a role adds to close and failure -------------------------------------------------------
    def _take_waiting(self) -> list:
        """Unregister and return the fetches waiting for a chunk (called under the lock; none on a sender)."""
        return []

    def _finish(self) -> None:
        """Complete the work in flight before :meth:`close` stops the threads (the sender's last flushes)."""

    def _unblock(self) -> None:
        """Wake the role's thread from a blocking wait once ``_stop`` is set (the receiver's store wait)."""

    def _release(self) -> None:
        """Drop what the endpoint keeps (called under the lock, after the threads stopped)."""

    def close(self) -> None:
        """Finish (:meth:`_finish`), fail waiting fetches, stop the threads and abort the communicators.

        Abort, not destroy: ``ncclCommDestroy`` is an intra-node collective and would hang on a peer that
        already left; every operation of ours has completed by then. Idempotent.
        """
        with self._lock:
            if self._closed:
                return
        self._finish()
        with self._cond:
            self._closed = True
            waiting = self._take_waiting()
        for w in waiting:
            w.post(None, TransportError(f"fetch {w.key!r}: the NcclTransport was closed"))
        self._stop.set()
        self._live.stop()
        self._unblock()
        for t in self._threads:
            t.join(timeout=1.0)
        with self._cond:
            self._release()
            self._cond.notify_all()
        self._abort()


__all__ = ["LinkOptions", "Endpoint", "OpHandle"]
