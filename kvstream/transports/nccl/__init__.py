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

The package, by job: :mod:`.comm` (nccl4py, communicator setup, bounded waits), :mod:`.endpoint` (what
both roles share: store, heartbeats, communicators, watchdog, failure), :mod:`.sender` (flush and header
publishing), :mod:`.receiver` (the receive loop, receive-ahead and zero-copy fetches); this module's
:class:`NcclTransport` is the :class:`~kvstream.transports.base.Transport` over one of the two roles.

Checksums: chunks carry ``checksum="none"``: hashing would need the host copy that this transport exists
to avoid (as :class:`~kvstream.transports.host.HostTransport` argues for host memory).
"""

from __future__ import annotations

from typing import Any

import torch

from ...chunk import ChunkHeader
from ...errors import ConfigError, PeerError, TransportError
from ...layout import Region
from ...handles import Handle
from ..base import Transport
from ..peer import Acks, LoopbackTransport, check_pair, connect_pair
from .comm import bounded, init_comm, settle, wait_event
from .endpoint import Endpoint, LinkOptions
from .receiver import Receiver
from .sender import Sender


class NcclTransport(Transport):
    """One direction of a GPU-to-GPU link: packed chunks through a private two-rank NCCL communicator.

    Parameters
    ----------
    store : torch.distributed.Store
        Rendezvous store both processes reach (:func:`~kvstream.transports.peer.rendezvous_store`,
        :func:`~kvstream.transports.peer.store_from_env`); one client object per endpoint.
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
        Liveness through the store (see :class:`~kvstream.transports.peer.Liveness`).
    blocking_data : bool
        Send and receive through a second, blocking communicator (default True: an enqueue costs µs instead
        of ~0.2 ms on a non-blocking one, see :mod:`~kvstream.transports.nccl.comm`); False: one non-blocking
        communicator carries setup and data.
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
        options = LinkOptions(device=self.device, namespace=namespace, timeout_s=self.timeout_s,
                              heartbeat_s=heartbeat_s, dead_after_s=dead_after_s, blocking_data=blocking_data,
                              comm=comm, data_comm=data_comm)
        self._endpoint: Endpoint = (Sender(store, rank, peer, options) if role == "send" else
                                    Receiver(store, rank, peer, options, self.fetch_timeout_s))
        self.blocking_data = self._endpoint.blocking_data

    # -- construction helpers ------------------------------------------------------------------------
    @classmethod
    def loopback(cls, devices: tuple[int, int] = (0, 1), **kwargs: Any) -> LoopbackTransport:
        """A :class:`~kvstream.transports.peer.LoopbackTransport` from ``cuda:devices[0]`` (send) to
        ``cuda:devices[1]`` (recv) in this process, over a private in-process store. Needs two GPUs (NCCL
        refuses two ranks on one GPU).
        """
        import torch.distributed as dist

        store = dist.HashStore()
        roles = ("send", "recv")
        a, b = connect_pair(lambda r: cls(store, r, 1 - r, role=roles[r], device=torch.device("cuda", devices[r]),
                                          **kwargs))
        return LoopbackTransport(a, b)

    def _end(self, role: str, what: str) -> Any:
        """The endpoint, which carries ``role``; ``TransportError`` if it carries the other one or is closed."""
        self._check_open()
        if self._endpoint.role != role:
            raise TransportError(f"{what} on an NcclTransport endpoint with role={self.role!r}; "
                                 f"each endpoint carries one direction (make one per direction)")
        return self._endpoint

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
        return self._end("send", "flush").flush(key, chunk, region, meta)

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
        return self._end("recv", "fetch").fetch_many([(key, out)])

    def fetch_many(self, items) -> Handle:
        """Fetch several ``(key, out)`` pairs; those not yet arrived are all registered before waiting, so
        each of them is received straight into its ``out``. Raises as :meth:`fetch`."""
        return self._end("recv", "fetch").fetch_many(items)

    def describe(self, key: str, timeout: float | None = None) -> ChunkHeader:
        """The header of ``key``'s chunk as flushed, waiting up to ``timeout`` (default ``fetch_timeout_s``) for it.

        Raises ``ChunkTimeout`` if it does not arrive, ``PeerError`` if the peer fails.
        """
        return self._end("recv", "describe").describe(key, timeout)

    def contains(self, key: str) -> bool:
        """Whether ``key``'s chunk has arrived and is kept (not delivered into a fetch's ``out``)."""
        return self._end("recv", "contains").contains(key)

    def delete(self, key: str) -> bool:
        """Drop ``key``'s chunk (its GPU buffer returns to the caching allocator)."""
        return self._end("recv", "delete").delete(key)

    def keys(self, prefix: str = "") -> list[str]:
        """Keys of every chunk that arrived (kept or delivered) starting with ``prefix``, sorted."""
        return self._end("recv", "keys").keys(prefix)

    # -- state, close --------------------------------------------------------------------------------
    @property
    def error(self) -> PeerError | None:
        """Why the link failed (peer dead, hung, NCCL error), or ``None``; the same as :attr:`peer_error`."""
        return self._endpoint.error

    @property
    def peer_error(self) -> PeerError | None:
        """Why the link failed (peer dead, hung, NCCL error), or ``None``."""
        return self._endpoint.error

    @property
    def acks(self) -> Acks:
        """The count of chunks the receiver took in (the receiver bumps it, the sender reads it)."""
        return self._endpoint.acks

    def close(self) -> None:
        """Finish (send side: publish the last headers and wait for sends in flight), tell the peer, stop
        the threads and release the communicators. Idempotent."""
        self._endpoint.close()
        super().close()


__all__ = ["NcclTransport", "bounded", "init_comm", "settle", "wait_event"]
