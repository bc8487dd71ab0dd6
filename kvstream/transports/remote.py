"""Host chunks to another process or host through torch.distributed's gloo: DéjàVuLib's MPI/Boost role.

DéjàVu ships host-resident KV between machines with MPI or Boost.Asio (msr-fiddle/dejavu,
``cache_utils.h``: ``MPICacheManager``, ``BoostCacheManager``). :class:`RemoteHostTransport` does the same
with torch.distributed: one endpoint per pair of processes, full duplex. ``flush`` on one side ships the
chunk to the peer; the peer's ``fetch`` reads it.

Wire protocol (one direction; the other is symmetric)
-----------------------------------------------------
* Control goes through the rendezvous store (a ``TCPStore``, under a prefix per pair): the sender numbers
  its chunks ``1, 2, ...`` and, for chunk ``n``, sets ``hdr/<sender>/<n>`` to a
  :class:`~kvstream.layout.ChunkHeader` (dtype, shape, xxh3 checksum, region; the key and the user's
  ``meta`` inside its ``meta``). No pickle anywhere.
* The payload goes through gloo ``send``/``recv`` with tag ``n``, so several chunks can be in flight and
  a payload always meets the header that describes it.
* A receiver thread waits for the next header (a blocking ``store.wait`` on a connection of its own:
  the server answers the moment the key is set, no polling), receives the payload into host memory,
  keeps it by key and acknowledges it (``ack/<receiver>``, a counter). ``fetch(key)`` waits for *that*
  key, so fetch order may differ from flush order (``StreamingCache.load`` fetches the manifest, flushed
  last, first); a flush's handle completes once the peer acknowledged the chunk.

Liveness (after DéjàVu's controller: heartbeats every second, a rank is dead after 3 s of silence)
----------------------------------------------------------------------------------------------------
Each endpoint bumps ``hb/<rank>`` in the store every ``heartbeat_s``; a peer whose counter has not moved
for ``dead_after_s`` is dead or hung. A killed peer is noticed sooner: gloo reports "connection closed by
peer" at once, and the store fails at once when its server was in the dead process. Either way every
waiting ``fetch`` and later call raises :class:`~kvstream.errors.PeerError` with the reason; chunks that
arrived before stay readable. A peer that called :meth:`close` writes an empty header after its last
one, so waiting for a key it never sent ends at once.

Limits: each pair needs its own ``namespace`` per connection (store keys are not reused). A send to a
peer that hangs mid-transfer blocks the sending thread up to the gloo timeout (``timeout_s``).
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

from ..errors import ChunkNotFound, ConfigError, CorruptChunkError, PeerError, TransportError
from ..chunk import ChunkHeader, byte_view, chunk_header, payload_checksum, tensor_bytes
from ..layout import Region, check_packed
from .base import CompletedHandle, FutureHandle, Handle, Transport

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


def wrap_header(header: ChunkHeader, key: str, seq: int) -> bytes:
    """The wire form of a chunk's header: ``header`` with the key, sequence number and user meta in ``meta``."""
    wire = ChunkHeader(dtype=header.dtype, shape=header.shape, nbytes=header.nbytes, checksum=header.checksum,
                       region=header.region, meta={"key": key, "seq": seq, "meta": header.meta})
    return wire.to_bytes()


def unwrap_header(raw: bytes, source: str) -> tuple[str, int, ChunkHeader]:
    """Inverse of :func:`wrap_header`: ``(key, seq, header as flushed)``.

    Raises
    ------
    CorruptChunkError
        If the bytes are not a header or lack the key and sequence number.
    """
    wire = ChunkHeader.from_bytes(raw, source=source)
    try:
        key, seq, meta = str(wire.meta["key"]), int(wire.meta["seq"]), wire.meta.get("meta")
    except (TypeError, KeyError, ValueError):
        raise CorruptChunkError(f"{source}: header without key/seq: {wire.meta!r}") from None
    return key, seq, ChunkHeader(dtype=wire.dtype, shape=wire.shape, nbytes=wire.nbytes, checksum=wire.checksum,
                                 region=wire.region, meta=meta)


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
        last read is younger than :data:`MIN_QUERY_INTERVAL_S`)."""
        if self.count < seq and query and time.monotonic() - self._queried >= self.MIN_QUERY_INTERVAL_S:
            self._queried = time.monotonic()
            self.count = max(self.count, int(self._store.add(self._key, 0)))
        return self.count >= seq

    def wait(self, seq: int, deadline: float, check: Callable[[], None]) -> bool:
        """Poll until chunk ``seq`` landed (True) or ``deadline`` passed (False); ``check`` may raise."""
        return poll(lambda: self.reached(seq), deadline, check)


class AckedHandle(Handle):
    """A flush in flight: done when the local send finished (``sent``) and the peer acknowledged ``seq``.

    ``sent`` is a handle for the local part; ``transport`` provides ``acks`` (:class:`Acks`), ``timeout_s``,
    ``closed`` and ``_raise_peer`` (raises :class:`PeerError` once the peer failed).
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
        """Wait for the send and the acknowledgement; ``TimeoutError`` after ``timeout``, ``PeerError`` if the peer failed."""
        limit = self._t.timeout_s if timeout is None else float(timeout)
        deadline = time.monotonic() + limit
        self._sent.wait(timeout)
        if not self._t.acks.reached(self._seq, query=not self._t.closed):
            if not self._t.acks.wait(self._seq, deadline, self._t._raise_peer):
                raise TimeoutError(f"{self._what} not acknowledged by the peer within {limit} s")


class RemoteHostTransport(Transport):
    """Chunks to and from one peer process over torch.distributed (gloo), kept in host memory on arrival.

    Parameters
    ----------
    store : torch.distributed.Store
        The rendezvous store both processes reach (:func:`rendezvous_store`, :func:`store_from_env`).
        Give each endpoint its own client connection (one ``TCPStore`` object per endpoint).
    rank, peer : int
        This process's and the peer's ids (global ranks); they name the pair in the store.
    group : torch.distributed.ProcessGroup, optional
        An existing gloo group to send payloads through (then ``group_peer`` is the peer's rank in it,
        default ``peer``). Default: a private two-rank ``ProcessGroupGloo`` over ``store``.
    namespace : str
        Store prefix; unique per connection.
    timeout_s : float
        Bound on the connection setup, on one payload send/receive and its acknowledgement.
    fetch_timeout_s : float, optional
        How long :meth:`fetch`/:meth:`describe` wait for a key to arrive (default ``timeout_s``).
    heartbeat_s, dead_after_s : float
        Heartbeat interval and silence after which the peer counts as dead (see the module docstring).
    verify : bool
        Check every arriving payload against its xxh3 checksum (``CorruptChunkError`` on mismatch).

    Raises
    ------
    ConfigError
        For bad ranks or intervals.
    PeerError
        If the peer does not connect within ``timeout_s``.

    Examples
    --------
    >>> store = rendezvous_store("10.0.0.1", 29500, is_server=(rank == 0))        # doctest: +SKIP
    >>> t = RemoteHostTransport(store, rank=rank, peer=1 - rank)                  # doctest: +SKIP
    >>> t.flush("req-1/seg000000/layer0000", chunk).wait()                        # on rank 0
    >>> t.fetch_new("req-1/seg000000/layer0000")                                  # on rank 1
    """

    name = "remote"

    def __init__(self, store, rank: int, peer: int, *, group=None, group_peer: int | None = None,
                 namespace: str = "kvstream/remote", timeout_s: float = 60.0, fetch_timeout_s: float | None = None,
                 heartbeat_s: float = 0.5, dead_after_s: float = 5.0, verify: bool = True):
        super().__init__()
        import torch.distributed as dist

        check_pair(rank, peer)
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
        self.rank, self.peer, self.timeout_s, self.verify = rank, peer, float(timeout_s), bool(verify)
        self.fetch_timeout_s = self.timeout_s if fetch_timeout_s is None else float(fetch_timeout_s)
        self._store = dist.PrefixStore(pair_namespace(namespace, rank, peer), store)
        self._cond = threading.Condition(self._lock)
        self._chunks: dict[str, tuple[ChunkHeader, torch.Tensor]] = {}
        self._bad: dict[str, TransportError] = {}
        self._peer_closed = False
        self._send_seq = 0
        self._stop = threading.Event()
        if group is None:
            me = 0 if rank < peer else 1
            try:
                group = dist.ProcessGroupGloo(dist.PrefixStore("gloo", self._store), me, 2,
                                              datetime.timedelta(seconds=timeout_s))
            except RuntimeError as e:
                raise PeerError(f"Peer rank {peer} did not connect to rank {rank} within {timeout_s} s: {e}") from e
            group_peer = 1 - me
        self._group = group
        self._group_peer = peer if group_peer is None else int(group_peer)
        self._sender = ThreadPoolExecutor(1, thread_name_prefix=f"kvstream-remote-send-{rank}")
        self.acks = Acks(self._store, f"ack/{peer}")  # chunks the peer took in from us
        self._my_acks = Acks(self._store, f"ack/{rank}")  # chunks we took in from the peer
        self._live = Liveness(self._store, rank, peer, heartbeat_s=heartbeat_s, dead_after_s=dead_after_s,
                              startup_s=self.timeout_s, on_change=self._wake)
        self._waiter = KeyWaiter(self._store)
        self._receiver = threading.Thread(target=self._receive_loop, name=f"kvstream-remote-recv-{rank}", daemon=True)
        self._receiver.start()

    # -- construction helpers ------------------------------------------------------------------------
    @classmethod
    def pair(cls, **kwargs: Any) -> tuple["RemoteHostTransport", "RemoteHostTransport"]:
        """Two connected endpoints (ranks 0 and 1) in this process, over a private in-process store.

        For tests and single-process use; keyword arguments go to both constructors. (An in-process
        ``HashStore`` rather than a ``TCPStore``: creating a TCPStore server and clients sometimes stalls
        for 5 s in their connection handshake.)
        """
        import torch.distributed as dist

        store = dist.HashStore()
        return connect_pair(lambda r: cls(store, r, 1 - r, **kwargs))

    @classmethod
    def loopback(cls, **kwargs: Any) -> "LoopbackTransport":
        """One :class:`Transport` over a connected pair: flush goes out through one endpoint, fetch reads the other."""
        return LoopbackTransport(*cls.pair(**kwargs))

    # -- the contract --------------------------------------------------------------------------------
    def flush(self, key: str, chunk: torch.Tensor, region: Region | None = None, meta: dict | None = None) -> Handle:
        """Ship ``chunk`` to the peer under ``key``; the handle completes when the peer has the bytes.

        A CUDA chunk is copied to the host first (on the current stream, synchronously); a CPU chunk is sent
        from its own memory, so leave it unchanged until the handle is done.

        Raises
        ------
        LayoutError
            Bad key, non-contiguous chunk, unsupported dtype or meta.
        PeerError
            The peer is dead or closed (also from ``handle.wait()`` if it dies during the send).
        """
        self._check_open()
        self._check_key(key)
        self._check_chunk(chunk)
        self._raise_peer_state("flush", key)
        if self._peer_closed:
            raise PeerError(f"flush {key!r}: peer rank {self.peer} has closed its endpoint")
        host = chunk.to("cpu") if chunk.device.type != "cpu" else chunk
        header = chunk_header(host, region, meta, checksum="pending")
        with self._lock:  # sequence order == submission order: the receiver takes headers in sequence
            self._send_seq += 1
            seq = self._send_seq
            sent = FutureHandle(self._sender.submit(self._send, key, seq, host, header))
        return AckedHandle(self, sent, seq, f"flush of {key!r}")

    def fetch(self, key: str, out: torch.Tensor, timeout: float | None = None) -> Handle:
        """Copy the chunk the peer flushed under ``key`` into ``out``, waiting up to ``timeout`` for it to arrive.

        Parameters
        ----------
        out : torch.Tensor
            Contiguous, the stored shape and dtype, CPU or CUDA.
        timeout : float, optional
            Seconds to wait for the key (default ``fetch_timeout_s``).

        Raises
        ------
        ChunkTimeout
            The key did not arrive in time (a ``ChunkNotFound`` and a ``PeerError``).
        PeerError
            The peer died or closed before sending ``key``.
        LayoutError
            ``out`` does not match the stored chunk.
        CorruptChunkError
            The payload failed its checksum.
        """
        self._check_chunk(out, "out")
        header, buf = self._wait_for(key, timeout)
        check_packed(out, header.shape, header.dtype, name=f"out for {key!r}")
        out.copy_(buf.view(header.dtype).view(header.shape))
        return CompletedHandle()

    def describe(self, key: str, timeout: float | None = None) -> ChunkHeader:
        """The header of the chunk under ``key`` as flushed, waiting up to ``timeout`` for it (see :meth:`fetch`)."""
        return self._wait_for(key, timeout)[0]

    def contains(self, key: str) -> bool:
        """Whether the chunk under ``key`` has arrived (no waiting)."""
        self._check_open()
        with self._lock:
            return key in self._chunks

    def delete(self, key: str) -> bool:
        """Drop the arrived chunk under ``key`` (frees its host memory)."""
        self._check_open()
        with self._lock:
            self._bad.pop(key, None)
            return self._chunks.pop(key, None) is not None

    def keys(self, prefix: str = "") -> list[str]:
        """Keys of every arrived chunk starting with ``prefix``, sorted."""
        self._check_open()
        with self._lock:
            return sorted(k for k in self._chunks if k.startswith(prefix))

    def close(self) -> None:
        """Finish pending sends, tell the peer we are done, stop the threads. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._sender.shutdown(wait=True)
        if self._live.error is None and not self._peer_closed:  # flushes in flight: wait for their acks
            try:
                self.acks.wait(self._send_seq, time.monotonic() + self.timeout_s, self._raise_peer)
            except PeerError:
                pass
        try:  # an empty header after the last one: the peer's receiver stops waiting
            self._store.set(f"hdr/{self.rank}/{self._send_seq + 1}", b"")
        except Exception:  # noqa: BLE001 - best effort: the store may have died with the peer
            pass
        self._stop.set()
        self._live.stop()
        self._waiter.wake(self._receiver)
        self._receiver.join(timeout=1.0)
        with self._cond:
            self._chunks.clear()
            self._cond.notify_all()

    @property
    def peer_error(self) -> PeerError | None:
        """Why the peer is considered dead, or ``None`` while it is alive."""
        return self._live.error

    # -- internals -----------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _raise_peer(self) -> None:
        if self._live.error is not None:
            raise PeerError(str(self._live.error)) from self._live.error

    def _raise_peer_state(self, what: str, key: str) -> None:
        if self._live.error is not None:
            raise PeerError(f"{what} {key!r}: {self._live.error}") from self._live.error

    def _send(self, key: str, seq: int, host: torch.Tensor, header: ChunkHeader) -> None:
        checksum = payload_checksum(tensor_bytes(host))
        header = ChunkHeader(dtype=header.dtype, shape=header.shape, nbytes=header.nbytes, checksum=checksum,
                             region=header.region, meta=header.meta)
        try:
            self._store.set(f"hdr/{self.rank}/{seq}", wrap_header(header, key, seq))
            if header.nbytes:
                self._group.send([byte_view(host)], self._group_peer, seq).wait()
        except Exception as e:  # noqa: BLE001 - gloo/store errors mean the peer is gone
            error = PeerError(f"Sending {key!r} ({header.nbytes} bytes) to peer rank {self.peer} failed: {e}")
            self._live.fail(error)
            raise error from e

    def _receive_loop(self) -> None:
        seq = 1
        try:
            while True:
                name = f"hdr/{self.peer}/{seq}"
                raw = self._waiter.get(name, self._stop)
                if raw is None:
                    return
                if not raw:  # the peer closed after its last chunk
                    with self._cond:
                        self._peer_closed = True
                        self._cond.notify_all()
                    return
                self._receive_one(name, seq, raw)
                seq += 1
        except Exception as e:  # noqa: BLE001 - reported to every waiter as a PeerError
            if not self._stop.is_set():
                self._live.fail(PeerError(f"Receiving from peer rank {self.peer} failed: {e}"))

    def _receive_one(self, name: str, seq: int, raw: bytes) -> None:
        key, got_seq, header = unwrap_header(raw, source=f"header {seq} from rank {self.peer}")
        if got_seq != seq:
            raise CorruptChunkError(f"header {name} carries sequence number {got_seq}")
        buf = torch.empty(header.nbytes, dtype=torch.uint8)
        if header.nbytes:
            self._group.recv([buf], self._group_peer, seq).wait()
        self._store.delete_key(name)
        bad = None
        if self.verify and payload_checksum(tensor_bytes(buf)) != header.checksum:
            bad = CorruptChunkError(f"Chunk {key!r} from peer rank {self.peer} failed its checksum "
                                    f"({header.checksum}, {header.nbytes} bytes)")
        with self._cond:
            if bad is None:
                self._chunks[key] = (header, buf)
                self._bad.pop(key, None)
            else:
                self._chunks.pop(key, None)
                self._bad[key] = bad
            self._cond.notify_all()
        self._my_acks.bump()

    def _wait_for(self, key: str, timeout: float | None) -> tuple[ChunkHeader, torch.Tensor]:
        self._check_open()
        self._check_key(key)
        timeout = self.fetch_timeout_s if timeout is None else float(timeout)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise TransportError(f"{type(self).__name__} is closed")
                if key in self._chunks:
                    return self._chunks[key]
                if key in self._bad:
                    raise self._bad[key]
                self._raise_peer_state("fetch", key)
                if self._peer_closed:
                    raise ChunkTimeout(f"Peer rank {self.peer} closed without sending {key!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChunkTimeout(f"{key!r} did not arrive from peer rank {self.peer} within {timeout} s "
                                       f"(peer alive: heartbeats still coming)")
                self._cond.wait(min(left, 0.1))


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


__all__ = ["RemoteHostTransport", "LoopbackTransport", "ChunkTimeout", "Liveness", "Acks", "AckedHandle", "poll", "KeyWaiter", "rendezvous_store",
           "store_from_env", "free_port", "pair_namespace", "check_pair", "wrap_header", "unwrap_header",
           "connect_pair"]
