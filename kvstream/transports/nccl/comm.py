"""NCCL itself, for :class:`~kvstream.transports.nccl.NcclTransport`: loading nccl4py, building a two-rank
communicator with bounded setup, and waiting on NCCL without ever blocking unboundedly.

Two communicators: bounded setup, cheap data path
-------------------------------------------------
A non-blocking communicator (``NCCLConfig(blocking=False)``) has its creation polled against a deadline
(:func:`init_comm`, :func:`settle`). But NCCL launches every operation of a non-blocking communicator from a
thread it starts for it (``group.cc``, ``groupLaunchNonBlocking``) and reports ``ncclInProgress``
meanwhile: ~0.2 ms of host time a call on 2x H200 (bench/NOTES.md, "NCCL handoff"), where a blocking
communicator enqueues in microseconds. So the data goes through a second, *blocking* communicator whose
creation runs on a helper thread waited for until the same deadline (:func:`bounded`). Host waits on an
operation poll its CUDA event (:func:`wait_event`), never ``synchronize()`` it: that would not return
while an NCCL kernel hangs. :func:`abort_all` ends stuck kernels (``ncclCommAbort`` may be called from
any thread: NCCL's fault-tolerance documentation).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from ...errors import ConfigError, PeerError
from ..peer import poll

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


def load_nccl():
    """``nccl.core`` (nccl4py). Raises ``ConfigError`` if it is not installed."""
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
    nccl = load_nccl()
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
        text = load_nccl().get_error_string(result)
        last = comm.get_last_error()
        return f"{text} ({last})" if last else text
    except Exception:  # noqa: BLE001 - best effort description
        return f"ncclResult {result}"



def abort_all(comms) -> None:
    """``abort()`` each distinct communicator of ``comms`` once, best effort (safe from any thread)."""
    seen: list[Any] = []
    for comm in comms:
        if comm is None or any(comm is c for c in seen):
            continue
        seen.append(comm)
        try:
            comm.abort()
        except Exception:  # noqa: BLE001 - abort is best effort by NCCL's own definition
            pass


def raw_stream(stream) -> int | None:
    """The raw ``cudaStream_t`` of a torch stream for nccl4py (None: the legacy default stream)."""
    return None if stream is None else int(stream.cuda_stream)


__all__ = ["NCCL_SUCCESS", "NCCL_IN_PROGRESS", "WATCHDOG_S", "SPIN_S", "WAIT_SPIN_S", "HEADER_CACHE", "load_nccl",
           "init_comm", "bounded", "settle", "wait_event", "abort_all", "raw_stream"]
