"""Packed chunks GPU to GPU through NCCL (nccl4py): DéjàVuLib's ``NCCLCacheManager`` as a transport.

DéjàVu's prompt workers hand KV to token workers with ``ncclSend``/``ncclRecv`` (msr-fiddle/dejavu,
``cache_utils.cc``: ``NCCLCacheManager::flush/fetch``). :class:`NcclTransport` does it through nccl4py
(``nccl.core``, NVIDIA's bindings on cuda-core): the payload never touches the host, and the send is
enqueued on the caller's current CUDA stream.

One endpoint per direction
--------------------------
An endpoint either sends (``role="send"``: ``flush``) or receives (``role="recv"``: ``fetch``,
``describe``, ``contains``, ``keys``, ``delete``). NCCL matches point-to-point operations between two
ranks in issue order, and two ranks that both issue a large ``ncclSend`` before their ``ncclRecv``
deadlock (NCCL's documentation: exchanges must be grouped). Sends and receives issued independently by
``flush`` and ``fetch`` calls cannot be grouped, so each direction gets its own two-rank communicator:
all sends of one endpoint are matched, in order, by all receives of the other. Two transports make a
duplex link.

Headers and receive-ahead
-------------------------
The receiver must know a chunk's shape before it posts the receive, and ``StreamingCache.load`` fetches
in another order than the chunks were flushed (the manifest, flushed last, first). So the sender numbers
its chunks and publishes each chunk's :class:`~kvstream.layout.ChunkHeader` (with the key) through the
rendezvous store *before* enqueueing the send; a publisher thread coalesces headers into one store write
(``hdr/<n>``: a run of frames, see :func:`encode_frame`) and keeps one batch in flight: it publishes the next only
once the receiver acknowledged the last, so batches grow to the receiver's pace and back-to-back flushes
cost a fraction of a store round trip each. The receiver thread waits for header batches in order (a
blocking ``store.wait`` on its own connection: no polling latency), posts the receives of a batch in one
NCCL launch (``nccl.group()``) on its own stream, then acknowledges the batch (``ack``, a counter; a
flush's handle completes once its chunk is acknowledged and its send done):

* into the caller's ``out`` when a :meth:`NcclTransport.fetch` for that key is already waiting
  (zero copy: the chunk is delivered, not kept);
* otherwise into a new buffer on the receiving GPU (receive-ahead), which a later ``fetch`` copies from
  on the caller's stream (device to device).

Two communicators: bounded setup, cheap data path
-------------------------------------------------
The setup communicator is non-blocking (``NCCLConfig(blocking=False)``), so its creation is polled against
``timeout_s``. But NCCL launches every operation of a non-blocking communicator from a thread it starts for
it (``group.cc``, ``groupLaunchNonBlocking``) and reports ``ncclInProgress`` meanwhile: ~0.2 ms of host time
a call, measured on 2x H200 (32 chunks of a handoff: 6.8 ms where blocking nccl4py takes 0.5-3.5 ms). So with
``blocking_data=True`` (the default) the sends and receives go through a second, *blocking* communicator
(its own unique id, ``uid_data``, through the same store), whose enqueue costs microseconds. Its creation
and a warm-up send/receive of one element (NCCL connects a peer's channels on the first operation) run on a
helper thread waited for with the same deadline, so setup stays bounded. ``blocking_data=False`` keeps one
non-blocking communicator for everything, where :func:`settle` spins on ``ncclInProgress`` (tens of µs)
after every call.

Failure (after DéjàVu's fault tolerance: heartbeats, then abort)
----------------------------------------------------------------
Heartbeats go through the store (:class:`~kvstream.transports.remote.Liveness`); a watchdog thread checks
every operation in flight. A peer that stops heartbeating (``dead_after_s``), a store that vanishes, or an
operation still running after ``timeout_s`` leads to ``abort()`` of both communicators (``ncclCommAbort``
ends stuck kernels and may be called from another thread: NCCL's fault-tolerance documentation) and a
:class:`~kvstream.errors.PeerError` from every waiting and later call. Host waits on operations poll their
CUDA event against a deadline (no unbounded ``synchronize()`` on a kernel that may hang).

Host cost per chunk (the sender's ``flush``, the receiver's header parsing) is kept to a few µs: the
next send cannot be enqueued before ``flush`` returns, and a 32 MiB chunk takes ~105 µs on NVLink. A header's
encoding depends only on ``(dtype, shape, region, meta)``, so each endpoint caches it (the sender the bytes,
the receiver the decoded :class:`~kvstream.layout.ChunkHeader`) and a frame adds the key and sequence number
in a fixed binary prefix: no JSON per chunk in the steady state.

Checksums: chunks carry ``checksum="none"``: hashing would need the host copy that this transport exists
to avoid (as :class:`~kvstream.transports.host.HostTransport` argues for host memory).
"""

from __future__ import annotations

import json
import queue
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ChunkNotFound, ConfigError, CorruptChunkError, LayoutError, PeerError, TransportError
from ..chunk import HEADER_BYTES, NO_CHECKSUM, ChunkHeader, byte_view, chunk_header, decode_frames, encode_frame
from ..layout import Region, check_packed
from .base import AllHandle, CompletedHandle, Handle, Transport
from .peer import (POLL_MIN_S, AckedHandle, Acks, ChunkTimeout, KeyWaiter, Liveness, LoopbackTransport,
                   check_pair, connect_pair, pair_namespace, poll)

#: ncclResult_t values read from ``comm.get_async_error()``.
NCCL_SUCCESS = 0
NCCL_IN_PROGRESS = 7
#: How often the watchdog looks at operations in flight (seconds).
WATCHDOG_S = 0.05
#: How long :func:`settle` spins on ``get_async_error`` (yielding the GIL) before it sleeps between polls (s).
SPIN_S = 0.005
#: How long a wait on an operation's CUDA event spins on ``query()`` before it sleeps between polls (s):
#: a 1 GiB handoff over NVLink takes a few ms, and a sleeping poll adds up to ``POLL_MAX_S`` to each wait.
WAIT_SPIN_S = 0.05
#: Most distinct headers an endpoint keeps encoded (sender) or decoded (receiver); the cache is emptied when
#: full. A handoff repeats a few shapes (one per layer group and prompt length), so a few hundred suffice.
HEADER_CACHE = 256
def _nccl():
    try:
        import nccl.core as nccl
    except ImportError as e:  # pragma: no cover - nccl4py is a dependency
        raise ConfigError(f"NcclTransport needs nccl4py (pip install nccl4py and an nvidia-nccl wheel): {e}") from e
    return nccl


def init_comm(store, me: int, device: torch.device, timeout_s: float, check=lambda: None, *,
              blocking: bool = False, uid_key: str = "uid"):
    """Create one side of a two-rank NCCL communicator; the unique id travels through ``store``.

    Rank ``me == 0`` draws ``nccl.get_unique_id()`` and sets ``uid_key`` to its bytes; rank 1 reads them
    (``UniqueId.from_bytes``). A non-blocking communicator (the default) has its setup polled against
    ``timeout_s``; a blocking one (``blocking=True``) is created on a helper thread waited for until the
    same deadline (:func:`bounded`).

    Raises
    ------
    PeerError
        If the peer does not publish or join within ``timeout_s`` (the half-built communicator is aborted).
    """
    nccl = _nccl()
    deadline = time.monotonic() + timeout_s
    if me == 0:
        uid = nccl.get_unique_id()
        store.set(uid_key, bytes(uid))
    else:
        if not poll(lambda: store.check([uid_key]), deadline, check):
            raise PeerError(f"No NCCL unique id from the peer within {timeout_s} s (store key {uid_key!r})")
        uid = nccl.UniqueId.from_bytes(store.get(uid_key))

    def create():
        """``Communicator.init`` with ``device`` current on the calling thread."""
        with torch.cuda.device(device):
            return nccl.Communicator.init(2, me, uid, config=nccl.NCCLConfig(blocking=blocking))

    if blocking:
        return bounded(create, deadline, check, "blocking communicator setup", on_late=lambda c: c.abort())
    comm = create()
    try:
        settle(comm, deadline, check, "communicator setup")
    except BaseException:
        comm.abort()
        raise
    return comm


def bounded(fn, deadline: float, check, what: str, on_late=None):
    """Run ``fn()`` (a call that may block the host, e.g. on a blocking communicator) on a helper thread and
    return its result, waiting at most until the ``time.monotonic()`` ``deadline``; ``check()`` runs between
    polls and may raise.

    A call still running at the deadline is left behind (a daemon thread: Python cannot interrupt it; an
    ``abort()`` of its communicator ends it) and, if it ever returns, ``on_late(result)`` disposes of its result.

    Raises
    ------
    PeerError
        If ``fn`` is still running at ``deadline``, or it raised (its exception is the cause).
    """
    box: dict[str, Any] = {}
    lock = threading.Lock()
    done = threading.Event()

    def run() -> None:
        """Call ``fn`` on the helper thread and hand its result or error to the waiting one."""
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e
        else:
            with lock:
                box["result"] = result
                late = box.get("abandoned", False)
            if late and on_late is not None:
                try:
                    on_late(result)
                except Exception:  # noqa: BLE001 - best effort on a setup that already failed
                    pass
        done.set()

    threading.Thread(target=run, name=f"kvstream-nccl-{what.replace(' ', '-')}", daemon=True).start()
    try:
        finished = poll(done.is_set, deadline, check)
    except BaseException:
        finished = False
        raise
    finally:
        if not finished:
            with lock:
                box["abandoned"] = True
                result = box.pop("result", None)
            if result is not None and on_late is not None:
                on_late(result)
    if not finished:
        raise PeerError(f"NCCL {what} still running at its deadline: the peer is dead or hung")
    if "error" in box:
        error = box["error"]
        if isinstance(error, PeerError):
            raise error
        raise PeerError(f"NCCL {what} failed: {error}") from error
    return box["result"]


def settle(comm, deadline: float, check, what: str) -> None:
    """Poll ``comm.get_async_error()`` until the non-blocking communicator is idle (``ncclSuccess``).

    Raises
    ------
    PeerError
        On an NCCL error, or if it is still in progress at ``deadline``.
    """
    first = int(comm.get_async_error())
    if first == NCCL_SUCCESS:  # a blocking communicator, or a launch already taken: one call, no closure
        return
    state = {"r": first}

    def idle() -> bool:
        """Whether the communicator has left NCCL's "in progress" state (its last status kept)."""
        state["r"] = int(comm.get_async_error())
        return state["r"] != NCCL_IN_PROGRESS

    # A launch on a non-blocking communicator runs on a thread NCCL starts for it (group.cc,
    # groupLaunchNonBlocking) and takes tens of microseconds: spin for it, yielding the GIL, instead of
    # sleeping (poll's first sleep alone, 50 µs asked, is ~100 µs; the doubling after it made ~0.3 ms a chunk).
    spin_until = min(deadline, time.monotonic() + SPIN_S)
    while state["r"] == NCCL_IN_PROGRESS and not idle() and time.monotonic() < spin_until:
        check()
        time.sleep(0)
    if state["r"] == NCCL_IN_PROGRESS and not poll(idle, deadline, check):
        raise PeerError(f"NCCL {what} still in progress at its deadline: the peer is dead or hung")
    if state["r"] != NCCL_SUCCESS:
        raise PeerError(f"NCCL {what} failed: {_error_text(comm, state['r'])}")


def wait_event(event, deadline: float, check) -> bool:
    """Wait for a CUDA ``event`` (``None``: nothing to wait for) until the ``time.monotonic()`` ``deadline``;
    False if it has not fired by then. Spins on ``event.query()`` for ``WAIT_SPIN_S`` (yielding the GIL), then
    polls with growing sleeps; never ``event.synchronize()``, which would not return while an NCCL kernel hangs.
    ``check()`` runs between polls and may raise (a failed link).
    """
    if event is None:
        return True
    spin_until = min(deadline, time.monotonic() + WAIT_SPIN_S)
    while not event.query():
        check()
        if time.monotonic() >= spin_until:
            return poll(event.query, deadline, check)
        time.sleep(0)
    return True


def _error_text(comm, result: int) -> str:
    try:
        text = _nccl().get_error_string(result)
        last = comm.get_last_error()
        return f"{text} ({last})" if last else text
    except Exception:  # noqa: BLE001 - best effort description
        return f"ncclResult {result}"


@dataclass
class _Arrived:
    """A chunk whose receive was posted: header, the buffer (None once delivered into a fetch's out), event."""

    header: ChunkHeader
    buf: torch.Tensor | None
    event: Any


class _OpHandle(Handle):
    """A stream-ordered NCCL operation: done when its CUDA event fired; a failed transport raises PeerError."""

    def __init__(self, transport: "NcclTransport", event: Any, what: str, then=None):
        self._t, self._event, self._what, self._then = transport, event, what, then

    @property
    def event(self) -> Any:
        """The CUDA event after the operation (``None`` when it ran synchronously)."""
        return self._event

    def done(self) -> bool:
        """Whether the operation completed (or the transport failed)."""
        return self._t.error is not None or self._event is None or self._event.query()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the event fired; ``TimeoutError`` after ``timeout``; ``PeerError`` if the transport failed.

        The event is polled (:func:`wait_event`), never synchronized. Without ``timeout`` the wait is bounded
        by the transport's ``timeout_s``: an operation still running then fails the link (``PeerError``, both
        communicators aborted), as the watchdog would.
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


class NcclTransport(Transport):
    """One direction of a GPU-to-GPU link: packed chunks through a private two-rank NCCL communicator.

    Parameters
    ----------
    store : torch.distributed.Store
        Rendezvous store both processes reach (:func:`~kvstream.transports.remote.rendezvous_store`,
        :func:`~kvstream.transports.remote.store_from_env`); one client object per endpoint.
    rank, peer : int
        This process's and the peer's ids (global ranks), naming the pair in the store.
    role : {"send", "recv"}
        Whether this endpoint flushes or fetches.
    device : torch.device or str, optional
        The CUDA device of this endpoint (default: the current one). Chunks flushed from another device
        or the CPU are copied to it first; ``fetch`` accepts ``out`` on any device.
    namespace : str
        Store prefix, unique per connection (the reverse direction needs another one).
    timeout_s : float
        Bound on setup and on every operation in flight (then abort).
    fetch_timeout_s : float, optional
        How long :meth:`fetch`/:meth:`describe` wait for a key to arrive (default ``timeout_s``).
    heartbeat_s, dead_after_s : float
        Liveness through the store (see :class:`~kvstream.transports.remote.Liveness`).
    blocking_data : bool
        Send and receive through a second, blocking communicator (default True: an enqueue costs µs instead
        of ~0.2 ms on a non-blocking one); False: one non-blocking communicator for setup and data, as before.
    comm : optional
        An already initialized two-rank communicator with nccl4py's ``send``/``recv``/``abort``/
        ``get_async_error``; this side is rank 0 if ``rank < peer``. For tests and custom setups.
    data_comm : optional
        With ``comm``: a second such communicator that carries the data (it is warmed up with a one-element
        send/receive). Without it, ``comm`` carries everything.

    Raises
    ------
    ConfigError
        Bad ranks or role, no CUDA device (without ``comm``), nccl4py missing.
    PeerError
        The peer did not connect within ``timeout_s`` (either communicator, or the warm-up).

    Examples
    --------
    >>> store = rendezvous_store(host, port, is_server=(rank == 0))                 # doctest: +SKIP
    >>> out_link = NcclTransport(store, rank=0, peer=1, role="send")                # prompt worker
    >>> in_link = NcclTransport(store, rank=1, peer=0, role="recv")                 # token worker
    """

    name = "nccl"

    def __init__(self, store, rank: int, peer: int, *, role: str, device: torch.device | str | int | None = None,
                 namespace: str = "kvstream/nccl", timeout_s: float = 60.0, fetch_timeout_s: float | None = None,
                 heartbeat_s: float = 0.5, dead_after_s: float = 5.0, blocking_data: bool = True,
                 comm: Any = None, data_comm: Any = None):
        super().__init__()
        import torch.distributed as dist

        check_pair(rank, peer)
        if role not in ("send", "recv"):
            raise ConfigError(f"role must be 'send' or 'recv', got {role!r}")
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
        if device is None:
            if not torch.cuda.is_available():
                raise ConfigError("NcclTransport needs a CUDA device (none is available)")
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if comm is None and self.device.type != "cuda":
            raise ConfigError(f"NcclTransport needs a CUDA device, got {self.device}")
        self.rank, self.peer, self.role, self.timeout_s = rank, peer, role, float(timeout_s)
        self.fetch_timeout_s = self.timeout_s if fetch_timeout_s is None else float(fetch_timeout_s)
        self._cuda = self.device.type == "cuda"
        src, dst = (rank, peer) if role == "send" else (peer, rank)
        self._store = dist.PrefixStore(f"{pair_namespace(namespace, rank, peer)}/{src}to{dst}", store)
        self._cond = threading.Condition(self._lock)
        self._nccl_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.error: PeerError | None = None
        self._aborted = False
        self._stop = threading.Event()
        self._arrived: dict[str, _Arrived] = {}
        self._pending: dict[str, _Waiting] = {}
        self._inflight: list[tuple[Any, float, str]] = []
        self._peer_closed = False
        self._send_seq = 0
        self._header_bytes: dict[tuple, bytes] = {}  # sender: (dtype, shape, region, meta JSON) -> header bytes
        self._headers_seen: dict[bytes, ChunkHeader] = {}  # receiver: header bytes -> header (meta None only)
        self.acks = self._my_acks = Acks(self._store, "ack")  # one direction: the receiver bumps, the sender reads
        self._live = Liveness(self._store, rank, peer, heartbeat_s=heartbeat_s, dead_after_s=dead_after_s,
                              startup_s=self.timeout_s, on_change=self._on_liveness)
        self._recv_stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        self.blocking_data = bool(blocking_data) if comm is None else data_comm is not None
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
        self._waiter = KeyWaiter(self._store)
        self._threads: list[threading.Thread] = []
        if role == "send":
            self._headers: queue.Queue = queue.Queue()
            self._start(self._publish_loop, "publish")
        else:
            self._start(self._receive_loop, "recv")
        if self._cuda:
            self._start(self._watchdog_loop, "watchdog")

    def _warm_up(self) -> None:
        """One one-element send (or receive) on the data communicator, waited for, so that NCCL connects the
        peer's channels now and not in the first flush. Bounded by ``timeout_s`` (on a helper thread: the first
        operation of a blocking communicator blocks the host until the peer joins it)."""
        deadline = time.monotonic() + self.timeout_s
        buf = torch.zeros(1, dtype=torch.uint8, device=self.device)
        stream = self._recv_stream

        def post():
            """The warm-up operation, enqueued on the receive stream with this endpoint's device current."""
            with torch.cuda.device(self.device) if self._cuda else _nullcontext():
                op = self._data_comm.send if self.role == "send" else self._data_comm.recv
                op(buf, self._peer_index, stream=_handle(stream))
            return self._record(stream, None)

        event = bounded(post, deadline, self._raise_error, "warm-up")
        settle(self._data_comm, deadline, self._raise_error, "warm-up")
        if not wait_event(event, deadline, self._raise_error):
            raise PeerError(f"NCCL warm-up with peer rank {self.peer} still running after {self.timeout_s} s: "
                            f"the peer is dead or hung")

    def _start(self, target, what: str) -> None:
        t = threading.Thread(target=target, name=f"kvstream-nccl-{what}-{self.rank}", daemon=True)
        t.start()
        self._threads.append(t)

    # -- construction helpers ------------------------------------------------------------------------
    @classmethod
    def loopback(cls, devices: tuple[int, int] = (0, 1), **kwargs: Any) -> LoopbackTransport:
        """A :class:`LoopbackTransport` from ``cuda:devices[0]`` (send) to ``cuda:devices[1]`` (recv) in this
        process, over a private in-process store. Needs two GPUs (NCCL refuses two ranks on one GPU).
        """
        import torch.distributed as dist

        store = dist.HashStore()
        roles = ("send", "recv")
        a, b = connect_pair(lambda r: cls(store, r, 1 - r, role=roles[r], device=torch.device("cuda", devices[r]),
                                          **kwargs))
        return LoopbackTransport(a, b)

    # -- sending -------------------------------------------------------------------------------------
    def flush(self, key: str, chunk: torch.Tensor, region: Region | None = None, meta: dict | None = None) -> Handle:
        """Send ``chunk`` to the peer, enqueued on the current CUDA stream; no host copy.

        The handle completes when the send finished and the peer acknowledged the chunk (it is in the peer's
        ``keys()``).

        Raises
        ------
        TransportError
            This endpoint receives (``role="recv"``), or it is closed.
        LayoutError
            Bad key, non-contiguous chunk, unsupported dtype or meta.
        PeerError
            The peer is dead, hung or closed.
        """
        self._check_role("send", "flush")
        self._check_key(key)
        self._check_chunk(chunk)
        self._raise_error()
        if self._peer_closed:
            raise PeerError(f"flush {key!r}: peer rank {self.peer} has closed its endpoint")
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
                self._nccl("send", lambda: self._data_comm.send(flat, self._peer_index, stream=_handle(stream)))
            event = self._record(stream, what)
        return AckedHandle(self, _OpHandle(self, event, what), seq, f"flush of {key!r}")

    def _encode_header(self, chunk: torch.Tensor, region: Region | None, meta: dict | None) -> bytes:
        """``chunk``'s header bytes without padding (:func:`~kvstream.transports.host.chunk_header`: raises its
        ``LayoutError``), cached by ``(dtype, shape, region, JSON of meta)``, which determine them. Only headers
        that encoded are cached, so a bad region or meta raises on every flush."""
        try:
            cache_key = (chunk.dtype, chunk.shape, region, None if meta is None else json.dumps(meta))
            header = self._header_bytes.get(cache_key)
        except (TypeError, ValueError):  # unhashable region, meta not JSON-able: chunk_header says which
            cache_key, header = None, None
        if header is None:
            header = chunk_header(chunk, region, meta, NO_CHECKSUM).to_bytes().rstrip(b"\x00")  # JSON ends in '}'
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

    # -- receiving -----------------------------------------------------------------------------------
    def fetch(self, key: str, out: torch.Tensor) -> Handle:
        """Fill ``out`` with the chunk the peer flushed under ``key``.

        If the chunk has arrived, the device-to-device copy into ``out`` is enqueued on the current stream
        (the handle's ``event`` follows it). If not, ``fetch`` registers ``out`` and blocks until the chunk's
        header arrives (at most ``fetch_timeout_s``): the receive then goes straight into ``out`` (zero copy;
        the chunk is delivered and not kept) and the returned handle follows it.

        Raises
        ------
        TransportError
            This endpoint sends (``role="send"``), it is closed, or a fetch of ``key`` is already waiting.
        LayoutError
            ``out`` does not match the chunk.
        ChunkTimeout
            The chunk did not arrive within ``fetch_timeout_s`` (a ``ChunkNotFound``), or the peer closed
            without sending it.
        ChunkNotFound
            The chunk was already delivered into an earlier fetch's ``out``.
        PeerError
            The peer is dead or hung.
        """
        return self.fetch_many([(key, out)])

    def fetch_many(self, items) -> Handle:
        """Fetch several ``(key, out)`` pairs; those not yet arrived are all registered before waiting, so
        each of them is received straight into its ``out``. Raises as :meth:`fetch`."""
        self._check_role("recv", "fetch")
        for key, out in items:
            self._check_key(key)
            self._check_chunk(out, "out")
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
                if not entry.posted.wait(max(0.0, deadline - time.monotonic())):
                    if self._withdraw([entry]):
                        raise ChunkTimeout(f"{key!r} did not arrive from peer rank {self.peer} within "
                                           f"{self.fetch_timeout_s} s")
                    entry.posted.wait()
                if entry.error is not None:
                    raise entry.error
                handles.append(entry.op)
        except BaseException:
            self._withdraw(waiting)
            raise
        return handles[0] if len(handles) == 1 else AllHandle(handles)

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
            stream.wait_event(entry.event)
            with torch.cuda.stream(stream):
                out.copy_(src)
            if out.device == self.device:
                entry.buf.record_stream(stream)  # the allocator keeps it until the copy ran
                return _OpHandle(self, self._record(stream, None), f"copy of {key!r}")
            # a peer copy to another GPU: finish it before the buffer can be deleted (a rare path)
            handle = _OpHandle(self, self._record(stream, None), f"copy of {key!r}")
            handle.wait()
            return handle
        _OpHandle(self, entry.event, f"receive of {key!r}").wait()  # bounded: the receive may hang
        out.copy_(src)
        return CompletedHandle()

    def describe(self, key: str, timeout: float | None = None) -> ChunkHeader:
        """The header of ``key``'s chunk as flushed, waiting up to ``timeout`` (default ``fetch_timeout_s``) for it.

        Raises ``ChunkTimeout`` if it does not arrive, ``PeerError`` if the peer fails.
        """
        self._check_role("recv", "describe")
        self._check_key(key)
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
        self._check_role("recv", "contains")
        with self._lock:
            entry = self._arrived.get(key)
            return entry is not None and entry.buf is not None

    def delete(self, key: str) -> bool:
        """Drop ``key``'s chunk (its GPU buffer returns to the caching allocator)."""
        self._check_role("recv", "delete")
        with self._lock:
            return self._arrived.pop(key, None) is not None

    def keys(self, prefix: str = "") -> list[str]:
        """Keys of every chunk that arrived (kept or delivered) starting with ``prefix``, sorted."""
        self._check_role("recv", "keys")
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
                self._my_acks.bump(len(frames))
                self._store.delete_key(name)
                batch_no += 1
        except Exception as e:  # noqa: BLE001 - every waiter gets it as a PeerError
            if not self._stop.is_set():
                self._fail(e if isinstance(e, PeerError) else PeerError(f"Receiving from peer rank {self.peer} failed: {e}"))

    def _decode_header(self, raw: bytes) -> ChunkHeader:
        """The header of a frame (``raw``: without its padding), decoded once per distinct header without
        ``meta``; one with ``meta`` is decoded every time (its ``meta`` dict is the fetching caller's to keep).

        Raises ``CorruptChunkError`` (:meth:`ChunkHeader.from_bytes <kvstream.layout.ChunkHeader.from_bytes>`).
        """
        header = self._headers_seen.get(raw)
        if header is None:
            header = ChunkHeader.from_bytes(raw.ljust(HEADER_BYTES, b"\x00"), source=f"chunk header from rank {self.peer}")
            if header.meta is None:
                if len(self._headers_seen) >= HEADER_CACHE:
                    self._headers_seen.clear()
                self._headers_seen[raw] = header
        return header

    def _receive_batch(self, frames: list[tuple[str, int, bytes]]) -> None:
        """Post the receives of one header batch (:func:`decode_frames`) in one NCCL launch (a group), in header
        order; then publish the chunks and hand each waiting fetch its handle."""
        stream = self._recv_stream
        decoded = [(key, self._decode_header(raw)) for key, _, raw in frames]
        with self._cond:
            if self._closed:
                return
            pendings = [self._pending.pop(key, None) for key, _ in decoded]
        posts: list[tuple[str, ChunkHeader, _Waiting | None, torch.Tensor | None, torch.Tensor]] = []
        waited: set[int] = set()  # ids of ready events the stream already waits for (fetch_many shares one)
        with torch.cuda.stream(stream) if stream is not None else _nullcontext():  # receive-ahead buffers on it
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
                            stream.wait_event(ready)
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
                pending.post(_OpHandle(self, event, f"receive of {key!r}"))
                continue
            try:  # out on another device or the CPU, or a late fetch: copy once the receive landed
                check_packed(pending.out, entry.header.shape, entry.header.dtype, name=f"out for {key!r}")
            except LayoutError as e:
                pending.post(None, e)
                continue
            pending.post(_OpHandle(self, event, f"receive of {key!r}",
                                   then=lambda k=key, e=entry, p=pending: self._copy_out(k, e, p.out).wait()))

    def _recv_all(self, bufs: list[torch.Tensor], stream) -> None:
        """``comm.recv`` into each of ``bufs`` in order; several at once inside one ``nccl.group()`` (one launch)."""
        with _nccl().group() if self._cuda and len(bufs) > 1 else _nullcontext():
            for buf in bufs:
                self._data_comm.recv(buf, self._peer_index, stream=_handle(stream))

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
                with torch.cuda.device(self.device) if self._cuda else _nullcontext():
                    call()
                settle(self._data_comm, time.monotonic() + self.timeout_s, self._raise_error, what)
            except PeerError as e:
                self._fail(e)
                raise
            except Exception as e:  # noqa: BLE001 - NCCL errors surface as PeerError
                error = PeerError(f"NCCL {what} to/from peer rank {self.peer} failed: {e}")
                self._fail(error)
                raise error from e

    def _record(self, stream, what: str | None):
        """A CUDA event recorded on ``stream`` (None on the CPU); tracked by the watchdog when ``what`` is given."""
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
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
            pending, self._pending = list(self._pending.values()), {}
            self._cond.notify_all()
        for p in pending:
            p.post(None, PeerError(f"fetch {p.key!r}: {self.error}"))
        self._abort()

    def _abort(self) -> None:
        """``abort()`` the data communicator, then the setup one (each once; safe from any thread)."""
        with self._lock:
            comms = [c for c in (getattr(self, "_data_comm", None), getattr(self, "_comm", None)) if c is not None]
            if self._aborted or not comms:
                return
            self._aborted = True
        for comm in comms if len(comms) == 1 or comms[0] is not comms[1] else comms[:1]:
            try:
                comm.abort()
            except Exception:  # noqa: BLE001 - abort is best effort by NCCL's own definition
                pass

    def _raise_peer(self) -> None:
        if self.error is not None:
            raise PeerError(str(self.error)) from self.error

    def _raise_error(self) -> None:
        self._raise_peer()
        self._check_open()

    @property
    def peer_error(self) -> PeerError | None:
        """Why the link failed (peer dead, hung, NCCL error), or ``None``."""
        return self.error

    def _check_role(self, role: str, what: str) -> None:
        self._check_open()
        if self.role != role:
            raise TransportError(f"{what} on an NcclTransport endpoint with role={self.role!r}; "
                                 f"each endpoint carries one direction (make one per direction)")

    def close(self) -> None:
        """Finish (send side: publish the last headers and wait for sends in flight), tell the peer, stop
        the threads and release the communicator. Idempotent."""
        with self._lock:
            if self._closed:
                return
        if self.role == "send" and self.error is None:
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
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            p.post(None, TransportError(f"fetch {p.key!r}: the NcclTransport was closed"))
        self._stop.set()
        self._live.stop()
        if self.role == "recv":
            self._waiter.wake(self._threads[0])
        for t in self._threads:
            t.join(timeout=1.0)
        with self._cond:
            self._arrived.clear()
            self._cond.notify_all()
        # abort, not destroy: ncclCommDestroy is an intra-node collective and would hang on a peer that
        # already left; every operation of ours has completed by now.
        self._abort()


def _handle(stream) -> int | None:
    """The raw ``cudaStream_t`` of a torch stream for nccl4py (None: the legacy default stream)."""
    return None if stream is None else int(stream.cuda_stream)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


__all__ = ["NcclTransport", "bounded", "decode_frames", "encode_frame", "init_comm", "settle", "wait_event"]
