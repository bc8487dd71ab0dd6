"""What both point-to-point transports stand on: rendezvous, liveness, acknowledgements, key waits, pairing.

:class:`~kvstream.transports.remote.RemoteHostTransport` (gloo, host memory) and
:class:`~kvstream.transports.nccl.NcclTransport` (NCCL, GPU memory) link two processes through a
rendezvous store (a ``TCPStore``: :func:`rendezvous_store`, :func:`store_from_env`) under a prefix per
pair (:func:`pair_namespace`). Through that store:

* a receiver thread waits for the next announcement key with :class:`KeyWaiter` (a blocking
  ``store.wait`` on a connection of its own: the server answers the moment the key is set);
* the receiver counts the chunks it took in (:class:`Acks`), and a flush's :class:`AckedHandle`
  completes once its chunk is counted;
* :class:`Liveness` heartbeats and watches the peer, after DéjàVu's controller (msr-fiddle/dejavu:
  heartbeats every second, a rank is dead after 3 s of silence): each endpoint bumps ``hb/<rank>`` every
  ``heartbeat_s``, and a peer whose counter has not moved for ``dead_after_s`` is dead or hung.

:func:`connect_pair` builds the two endpoints of a pair in one process and :class:`LoopbackTransport`
makes one :class:`~kvstream.transports.base.Transport` of them (what the contract test and single-process
demos use).
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from typing import Any, Callable

import torch

from ..errors import ChunkNotFound, ConfigError, PeerError
from ..chunk import ChunkHeader
from ..layout import Region
from ..handles import Handle
from .base import Transport

#: Polling interval bounds of the receiver thread (seconds): it starts at the low end after each chunk
#: and doubles while idle. 2 ms bounds the added latency of an idle receiver; a store check costs ~25 us.
POLL_MIN_S = 50e-6
POLL_MAX_S = 2e-3


class ChunkTimeout(ChunkNotFound, PeerError):
    """A fetched key did not arrive from the peer in time: not found here, and the peer may be hung.

    Both a :class:`~kvstream.errors.ChunkNotFound` (``KeyError``) and a
    :class:`~kvstream.errors.PeerError`.
    """


def poll(ready: Callable[[], bool], deadline: float, check: Callable[[], None]) -> bool:
    """Poll ``ready()`` with growing sleeps (``POLL_MIN_S`` to ``POLL_MAX_S``) until it is true (True) or the
    ``time.monotonic()`` ``deadline`` passes (False). ``check()`` runs every round and may raise (a dead peer).
    """
    delay = POLL_MIN_S
    while not ready():
        check()
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(2 * delay, POLL_MAX_S)
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for tests and single-host launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_store(host: str, port: int, *, is_server: bool, timeout_s: float = 60.0):
    """A ``torch.distributed.TCPStore`` at ``host:port``: the server in one process, a client elsewhere.

    Under ``torchrun`` connect as a client to ``MASTER_ADDR:MASTER_PORT`` (torchrun's agent hosts the
    store); :func:`store_from_env` does that.

    Raises
    ------
    PeerError
        If the server cannot be reached within ``timeout_s``.
    """
    import torch.distributed as dist

    try:
        return dist.TCPStore(host, int(port), None, bool(is_server), timeout=datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    except (RuntimeError, OSError) as e:
        raise PeerError(f"Cannot reach the rendezvous store at {host}:{port}: {e}") from e


def store_from_env(timeout_s: float = 60.0):
    """The rendezvous store of a ``torchrun`` launch (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``).

    Rank 0 hosts the store unless torchrun's agent already does (``TORCHELASTIC_USE_AGENT_STORE=True``).

    Raises
    ------
    ConfigError
        If ``MASTER_ADDR``/``MASTER_PORT`` are not set.
    """
    try:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError) as e:
        raise ConfigError(f"store_from_env needs MASTER_ADDR and MASTER_PORT (as torchrun sets them): {e}") from None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    is_server = not agent and int(os.environ.get("RANK", "0")) == 0
    return rendezvous_store(host, port, is_server=is_server, timeout_s=timeout_s)


def pair_namespace(namespace: str, rank: int, peer: int) -> str:
    """The store prefix of the pair ``{rank, peer}`` (the same on both sides)."""
    lo, hi = sorted((int(rank), int(peer)))
    return f"{namespace}/{lo}-{hi}"


def check_pair(rank: int, peer: int) -> None:
    """Raise :class:`ConfigError` unless ``rank`` and ``peer`` are distinct non-negative ints."""
    for name, v in (("rank", rank), ("peer", peer)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{name} must be a non-negative int, got {v!r}")
    if rank == peer:
        raise ConfigError(f"rank and peer must differ, both are {rank}")


class KeyWaiter:
    """Blocking waits for the next key of a sequence, on a connection of its own (no polling latency).

    The receiver threads wait for ``hdr/...`` keys with ``store.wait`` (the server pushes the answer when
    the key is set) on a :meth:`clone` of the store, so a long wait never blocks the heartbeats and acks
    that share the transport's own connection. An **empty** value marks the end of the sequence: the
    sender writes one when it closes, and :meth:`wake` writes one to stop our own waiting thread.
    Stores without ``clone`` (torch older than 2.5) fall back to polling.
    """

    #: Each blocking wait lasts at most this long, then starts again (a TCPStore wait needs a timeout).
    WAIT = datetime.timedelta(hours=1)

    def __init__(self, store):
        self._store = store
        self._conn = store.clone() if hasattr(store, "clone") else None
        self.waiting_on: str | None = None

    def get(self, key: str, stop: threading.Event) -> bytes | None:
        """The value of ``key`` once it is set; ``None`` if ``stop`` is set first."""
        import torch.distributed as dist

        self.waiting_on = key
        while not stop.is_set():
            if self._conn is None:
                if not poll(lambda: self._store.check([key]) or stop.is_set(), time.monotonic() + 1.0, lambda: None):
                    continue
                return None if stop.is_set() else self._store.get(key)
            try:
                self._conn.wait([key], self.WAIT)
            except dist.DistNetworkError:
                raise
            except dist.DistStoreError:  # the hourly timeout of an idle wait: wait again
                continue
            return None if stop.is_set() else self._conn.get(key)
        return None

    def wake(self, thread: threading.Thread) -> None:
        """Unblock ``thread`` waiting in :meth:`get` (whose ``stop`` event is already set) by writing the key it
        waits on; retried while it moves on to the next key. Best effort: the store may be gone."""
        for _ in range(10):
            key = self.waiting_on
            if key is None or not thread.is_alive():
                return
            try:
                self._store.set(key, b"")
            except Exception:  # noqa: BLE001 - the store died: the waiting thread fails on its own
                return
            thread.join(timeout=0.2)


class Liveness:
    """Heartbeats through the store and the peer's state: alive, closed, or dead with a reason.

    A background thread bumps ``hb/<rank>`` every ``heartbeat_s`` seconds and watches ``hb/<peer>``; a
    counter that has not moved for ``dead_after_s`` marks the peer dead; before its first heartbeat the
    peer has ``startup_s`` (it may still be starting up). ``on_change`` is called (from
    that thread) when the state changes so that waiters can wake up.
    """

    def __init__(self, store, rank: int, peer: int, *, heartbeat_s: float, dead_after_s: float,
                 startup_s: float, on_change: Callable[[], None]):
        if heartbeat_s <= 0 or dead_after_s <= heartbeat_s:
            raise ConfigError(f"need 0 < heartbeat_s < dead_after_s, got heartbeat_s={heartbeat_s}, "
                              f"dead_after_s={dead_after_s}")
        self._store, self.rank, self.peer = store, rank, peer
        self.heartbeat_s, self.dead_after_s, self.startup_s = heartbeat_s, dead_after_s, startup_s
        self._on_change = on_change
        self.error: PeerError | None = None
        self._stop = threading.Event()
        self._last_count = -1
        self._last_seen = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"kvstream-heartbeat-{rank}", daemon=True)
        self._thread.start()

    def fail(self, error: PeerError) -> None:
        """Record the first failure and wake the waiters."""
        if self.error is None:
            self.error = error
        self._on_change()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._store.add(f"hb/{self.rank}", 1)
                count = self._store.add(f"hb/{self.peer}", 0)
            except Exception as e:  # noqa: BLE001 - the store server died with its process
                if not self._stop.is_set():
                    self.fail(PeerError(f"Lost the rendezvous store while watching peer rank {self.peer}: {e}"))
                return
            now = time.monotonic()
            if count != self._last_count:
                self._last_count, self._last_seen = count, now
            elif now - self._last_seen > (self.dead_after_s if count > 0 else max(self.dead_after_s, self.startup_s)):
                self.fail(PeerError(f"Peer rank {self.peer} sent no heartbeat for {now - self._last_seen:.1f} s "
                                    f"(limit {self.dead_after_s} s): dead or hung" if count > 0 else
                                    f"Peer rank {self.peer} never sent a heartbeat in {now - self._last_seen:.1f} s"))
                return
            self._stop.wait(self.heartbeat_s)

    def stop(self) -> None:
        """Stop the heartbeat thread (it exits within one interval)."""
        self._stop.set()
        self._thread.join(timeout=self.heartbeat_s + 1.0)


class Acks:
    """The receiver's count of chunks it has taken in, read by the sender to complete its flush handles.

    The receiver bumps the store counter ``key`` once per chunk, in sequence order, after the chunk is
    visible to its ``contains``/``keys``/``fetch``; chunk ``seq`` has landed once the count is ``>= seq``.
    The last value read is cached, so :meth:`reached` costs a store round trip only while behind.
    """

    #: Fewest seconds between two store reads: many handles asking ``done()`` at once cost one round trip.
    MIN_QUERY_INTERVAL_S = 50e-6

    def __init__(self, store, key: str):
        self._store, self._key = store, key
        self.count = 0
        self._queried = 0.0

    def bump(self, n: int = 1) -> None:
        """Receiver side: ``n`` more chunks have landed."""
        self._store.add(self._key, n)

    def reached(self, seq: int, *, query: bool = True) -> bool:
        """Whether chunk ``seq`` has landed (reads the store unless ``query`` is False, it is known, or the
        last read is younger than :data:`MIN_QUERY_INTERVAL_S`).

        Raises
        ------
        PeerError
            If the store cannot be read (its server died with the peer's process).
        """
        if self.count < seq and query and time.monotonic() - self._queried >= self.MIN_QUERY_INTERVAL_S:
            self._queried = time.monotonic()
            try:
                count = int(self._store.add(self._key, 0))
            except Exception as e:  # noqa: BLE001 - torch's store errors (DistNetworkError, RuntimeError)
                raise PeerError(f"Cannot read the acknowledgements ({self._key}) from the rendezvous store: {e}") from e
            self.count = max(self.count, count)
        return self.count >= seq

    def wait(self, seq: int, deadline: float, check: Callable[[], None]) -> bool:
        """Poll until chunk ``seq`` landed (True) or ``deadline`` passed (False); ``check`` may raise."""
        return poll(lambda: self.reached(seq), deadline, check)


class AckedHandle(Handle):
    """A flush in flight: done when the local send finished (``sent``) and the peer acknowledged ``seq``.

    ``sent`` is a handle for the local part; ``transport`` provides ``acks`` (:class:`Acks`), ``timeout_s``,
    ``peer``, ``closed``, ``_raise_peer`` (raises :class:`PeerError` once the peer failed) and ``_fail(error)`` (marks
    the link failed). Every wait polls the peer's liveness: a peer that dies or hangs during the send or
    before its acknowledgement ends the wait with ``PeerError`` within the heartbeat deadline
    (``dead_after_s``), whatever the underlying send's own timeout.
    """

    def __init__(self, transport: Any, sent: Handle, seq: int, what: str):
        self._t, self._sent, self._seq, self._what = transport, sent, seq, what

    def done(self) -> bool:
        """Whether the send failed, or finished and was acknowledged (one store read at most)."""
        if not self._sent.done():
            return False
        try:
            self._sent.wait(0)
        except BaseException:  # noqa: BLE001 - a failed send is done; wait() raises it
            return True
        return self._t.acks.reached(self._seq, query=not self._t.closed) or self._t.peer_error is not None

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the send and the acknowledgement; ``PeerError`` as soon as the peer failed.

        ``TimeoutError`` after ``timeout``; without one the wait is bounded by the transport's ``timeout_s``,
        and a send still running then fails the link (``PeerError``).
        """
        limit = self._t.timeout_s if timeout is None else float(timeout)
        deadline = time.monotonic() + limit
        if not poll(self._sent.done, deadline, self._t._raise_peer):
            if timeout is None:
                self._t._fail(PeerError(f"{self._what}: still sending after {limit} s: peer rank "
                                        f"{self._t.peer} is dead or hung"))
                self._t._raise_peer()
            raise TimeoutError(f"{self._what} still sending after {limit} s")
        self._sent.wait(0)  # done: raises the send's error, if any
        if not self._t.acks.reached(self._seq, query=not self._t.closed):
            if not self._t.acks.wait(self._seq, deadline, self._t._raise_peer):
                raise TimeoutError(f"{self._what} not acknowledged by the peer within {limit} s")


def connect_pair(make: Callable[[int], Transport]) -> tuple[Any, Any]:
    """Build endpoints 0 and 1 concurrently (each constructor blocks until the other connects).

    Raises
    ------
    PeerError
        The first construction error, after closing the endpoint that did connect.
    """
    made: list[Any] = [None, None]
    errors: list[BaseException] = []

    def build(r: int) -> None:
        """Create this side's endpoint of the pair."""
        try:
            made[r] = make(r)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=build, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for m in made:
            if m is not None:
                m.close()
        raise errors[0]
    return made[0], made[1]


class LoopbackTransport(Transport):
    """One transport over two connected point-to-point endpoints: ``flush`` goes out through ``sender``,
    everything else reads ``receiver``. What the contract test and single-process demos use.
    """

    def __init__(self, sender: Transport, receiver: Transport):
        super().__init__()
        self.sender, self.receiver = sender, receiver
        self.name = f"{sender.name}-loopback"

    def flush(self, key: str, chunk: torch.Tensor, region: Region | None = None, meta: dict | None = None) -> Handle:
        """``sender.flush``."""
        self._check_open()
        return self.sender.flush(key, chunk, region=region, meta=meta)

    def fetch(self, key: str, out: torch.Tensor) -> Handle:
        """``receiver.fetch``."""
        self._check_open()
        return self.receiver.fetch(key, out)

    def describe(self, key: str) -> ChunkHeader:
        """``receiver.describe``."""
        self._check_open()
        return self.receiver.describe(key)

    def contains(self, key: str) -> bool:
        """``receiver.contains``."""
        self._check_open()
        return self.receiver.contains(key)

    def delete(self, key: str) -> bool:
        """``receiver.delete``."""
        self._check_open()
        return self.receiver.delete(key)

    def keys(self, prefix: str = "") -> list[str]:
        """``receiver.keys``."""
        self._check_open()
        return self.receiver.keys(prefix)

    def close(self) -> None:
        """Close both endpoints. Idempotent."""
        if self._closed:
            return
        super().close()
        self.sender.close()
        self.receiver.close()


__all__ = ["POLL_MIN_S", "POLL_MAX_S", "ChunkTimeout", "poll", "free_port", "rendezvous_store", "store_from_env",
           "pair_namespace", "check_pair", "KeyWaiter", "Liveness", "Acks", "AckedHandle", "connect_pair",
           "LoopbackTransport"]
