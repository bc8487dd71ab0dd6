"""Host chunks to another process or host through torch.distributed's gloo: DéjàVuLib's MPI/Boost role.

DéjàVu ships host-resident KV between machines with MPI or Boost.Asio (msr-fiddle/dejavu,
``cache_utils.h``: ``MPICacheManager``, ``BoostCacheManager``). :class:`RemoteHostTransport` does the same
with torch.distributed: one endpoint per pair of processes, full duplex. ``flush`` on one side ships the
chunk to the peer; the peer's ``fetch`` reads it.

Wire protocol (one direction; the other is symmetric)
-----------------------------------------------------
* Control goes through the rendezvous store (a ``TCPStore``, under a prefix per pair: see
  :mod:`kvstream.transports.peer`): the sender numbers its chunks ``1, 2, ...`` and, for chunk ``n``, sets
  ``hdr/<sender>/<n>`` to one frame (:func:`kvstream.chunk.encode_frame`: ``n``, the key, and the chunk's
  unpadded :class:`~kvstream.chunk.ChunkHeader` with dtype, shape, xxh3 checksum, region and the user's
  ``meta``). No pickle anywhere.
* The payload goes through gloo ``send``/``recv`` with tag ``n``, so several chunks can be in flight and
  a payload always meets the header that describes it.
* A receiver thread waits for the next header (:class:`~kvstream.transports.peer.KeyWaiter`: no
  polling), receives the payload into host memory, keeps it by key and acknowledges it (``ack/<receiver>``,
  a counter). ``fetch(key)`` waits for *that* key, so fetch order may differ from flush order
  (``StreamingCache.load`` fetches the manifest, flushed last, first); a flush's handle completes once the
  peer acknowledged the chunk.

Liveness
--------
Heartbeats through the store (:class:`~kvstream.transports.peer.Liveness`) find a peer that is dead or
hung. A killed peer is noticed sooner: gloo reports "connection closed by peer" at once, and the store
fails at once when its server was in the dead process. Either way every waiting ``fetch`` and later call
raises :class:`~kvstream.errors.PeerError` with the reason; chunks that arrived before stay readable. A
peer that called :meth:`~RemoteHostTransport.close` writes an empty header after its last one, so waiting
for a key it never sent ends at once.

Every wait on the peer polls its liveness: a flush handle's ``wait()``, ``fetch``, ``describe`` and
``close`` end with :class:`~kvstream.errors.PeerError` within ``dead_after_s`` of the peer's last heartbeat,
also when its connection stays open (a hung process, a host gone from the network) and gloo's own send
would wait its full timeout.

Limits: each pair needs its own ``namespace`` per connection (store keys are not reused). A send to a
peer that hangs mid-transfer keeps the (daemon) sending thread busy up to the gloo timeout (``timeout_s``);
nobody waits for it, and later flushes fail at once.
"""

from __future__ import annotations

import datetime
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import torch

from ..errors import ConfigError, CorruptChunkError, PeerError, TransportError
from ..chunk import ChunkHeader, byte_view, chunk_header, decode_frames, encode_frame, payload_checksum, tensor_bytes
from ..layout import Region, check_packed
from ..handles import CompletedHandle, FutureHandle, Handle
from .base import Transport
# rendezvous_store and store_from_env are re-exported: scripts pair them with this transport
# (``from kvstream.transports.remote import RemoteHostTransport, rendezvous_store``).
from .peer import (AckedHandle, Acks, ChunkTimeout, KeyWaiter, Liveness, LoopbackTransport, check_pair, connect_pair,
                   pair_namespace, poll, rendezvous_store, store_from_env)


class _SendThread:
    """One daemon thread running sends in submission order (what a one-worker executor does, minus the
    join at interpreter exit: a send stuck on a dead peer must not hold the process up)."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)``; the future resolves with its result or error."""
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def stop(self) -> None:
        """Let the thread exit after the queued sends (without waiting for it)."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to the future's waiter
                    future.set_exception(e)

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
    on_chunk : callable, optional
        ``on_chunk(key, header, payload) -> bool``, called on the receiver thread with every chunk that
        arrived intact (``payload``: uint8 CPU ``[nbytes]``), *before* it is acknowledged: a flush's handle on
        the peer completes only after it returned. Returning ``True`` takes the chunk over (it is not kept
        here: ``fetch`` will not see it). What a replica holder uses to file chunks as they land
        (:mod:`kvstream.serving.failover`). An exception fails the link like a receive error.

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
    local_reads = True  # a CUDA chunk is copied to the host synchronously, before flush returns

    def __init__(self, store, rank: int, peer: int, *, group=None, group_peer: int | None = None,
                 namespace: str = "kvstream/remote", timeout_s: float = 60.0, fetch_timeout_s: float | None = None,
                 heartbeat_s: float = 0.5, dead_after_s: float = 5.0, verify: bool = True,
                 on_chunk: Callable[[str, ChunkHeader, torch.Tensor], bool] | None = None):
        super().__init__()
        import torch.distributed as dist

        check_pair(rank, peer)
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
        self.rank, self.peer, self.timeout_s, self.verify = rank, peer, float(timeout_s), bool(verify)
        self._on_chunk = on_chunk
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
        self._sender = _SendThread(f"kvstream-remote-send-{rank}")
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
        """Finish pending sends, tell the peer we are done, stop the threads. Idempotent.

        Pending sends and their acknowledgements are waited for up to ``timeout_s``, and not at all once the
        peer failed (a dead peer ends the wait within ``dead_after_s``).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        last = self._sender.submit(lambda: None)  # runs after every send queued before it
        self._sender.stop()
        poll(lambda: last.done() or self._live.error is not None, time.monotonic() + self.timeout_s, lambda: None)
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

    def _fail(self, error: PeerError) -> None:
        """Mark the link failed (every waiter and later call raises ``error``)."""
        self._live.fail(error)

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
            self._store.set(f"hdr/{self.rank}/{seq}", encode_frame(key, seq, header.to_bytes(pad=False)))
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
        key, header = self._read_frame(name, seq, raw)
        buf = torch.empty(header.nbytes, dtype=torch.uint8)
        if header.nbytes:
            self._group.recv([buf], self._group_peer, seq).wait()
        self._store.delete_key(name)
        bad = None
        if self.verify and payload_checksum(tensor_bytes(buf)) != header.checksum:
            bad = CorruptChunkError(f"Chunk {key!r} from peer rank {self.peer} failed its checksum "
                                    f"({header.checksum}, {header.nbytes} bytes)")
        if bad is None and self._on_chunk is not None and self._on_chunk(key, header, buf):
            self._my_acks.bump()
            return
        with self._cond:
            if bad is None:
                self._chunks[key] = (header, buf)
                self._bad.pop(key, None)
            else:
                self._chunks.pop(key, None)
                self._bad[key] = bad
            self._cond.notify_all()
        self._my_acks.bump()

    def _read_frame(self, name: str, seq: int, raw: bytes) -> tuple[str, ChunkHeader]:
        """The key and header that store key ``name`` announces for chunk ``seq`` (one frame).

        Raises
        ------
        CorruptChunkError
            If ``raw`` is not exactly one frame (:func:`~kvstream.chunk.decode_frames`), its header does not
            decode, or it carries another sequence number; the message names the header and the peer.
        """
        source = f"header {seq} from rank {self.peer}"
        frames = decode_frames(raw, source=source)
        if len(frames) != 1:
            raise CorruptChunkError(f"{source}: {len(frames)} frames under {name}, expected one")
        key, got_seq, header_bytes = frames[0]
        if got_seq != seq:
            raise CorruptChunkError(f"header {name} carries sequence number {got_seq}")
        return key, ChunkHeader.from_bytes(header_bytes, source=source, padded=False)

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


__all__ = ["RemoteHostTransport", "ChunkTimeout", "LoopbackTransport", "rendezvous_store", "store_from_env"]
