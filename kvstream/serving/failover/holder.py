"""Replica holders: the chunks a process keeps for other stages, filed as they land, freed with their session.

A holder — the next stage in the ring, or with ``--replica host`` the standby of the stage — receives each
primary's chunks over a :class:`~kvstream.transports.remote.RemoteHostTransport` whose ``on_chunk`` files
them in a :class:`~kvstream.transports.host.HostTransport` (pinned when CUDA is in use, so a restore onto
the GPU runs at PCIe speed) *before* the chunk is acknowledged: an acknowledged step is in the holder's
memory. A ``<session>/release`` marker frees that session (its request finished). For a restore the holder
recovers each session's manifest from what it holds (:func:`~kvstream.streaming.recover.recover_manifest`:
the whole segments, in order) and either replays it itself (the standby that takes the stage over) or
sends manifest and chunks to the replacement over a new link (:meth:`ReplicaStore.send`).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

from ...chunk import ChunkHeader
from ...errors import KVStreamError
from ...handles import AllHandle, Handle
from ...streaming.recover import recover_manifest
from ...streaming.session import Manifest, SessionKeys
from ...transports.host import HostTransport
from .replicator import OUTBOX_BYTES, OUTPUT, RELEASE


class ReplicaStore:
    """The replicas one process holds (see the module docstring).

    Parameters
    ----------
    pinned : bool
        Keep chunks in page-locked memory (CUDA runs).
    on_step : callable, optional
        ``on_step(step)`` after a decode-step chunk landed (the failure injection of ``rS@N``).
    on_change : callable, optional
        ``on_change(released)`` after every chunk filed (``False``) or session freed (``True``): where the
        holder publishes what it holds.
    """

    def __init__(self, *, pinned: bool, on_step: Callable[[int], None] | None = None,
                 on_change: Callable[[bool], None] | None = None):
        self.store = HostTransport(OUTBOX_BYTES, pinned=pinned)
        self.on_step = on_step
        self.on_change = on_change
        self.peak_bytes = 0
        self.links: dict[int, Any] = {}  # primary incarnation -> receiving endpoint
        self._gone: set[int] = set()  # forgotten primaries: what their links still deliver is dropped
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        """Payload bytes held now."""
        return self.store.used_bytes

    def receive(self, key: str, header: ChunkHeader, payload: torch.Tensor, primary: int | None = None) -> bool:
        """A :class:`~kvstream.transports.remote.RemoteHostTransport` ``on_chunk``: file the chunk (or apply a
        release marker) from ``primary``'s link. Returns ``True``: the link keeps nothing.

        What the link of a forgotten primary still delivers is dropped: a dead primary's last chunks in flight
        may land after its replacement adopted, and perhaps released, the session; filed then, they would
        never be freed."""
        with self._lock:
            if primary in self._gone:
                return True
            if key.endswith("/" + RELEASE):
                self._drop(key[: -len(RELEASE)])
            else:
                self._file(key, header, payload)
        if key.endswith("/" + RELEASE):
            if self.on_change is not None:
                self.on_change(True)
            return True
        if self.on_change is not None:
            self.on_change(False)
        step = (header.meta or {}).get("step")
        if self.on_step is not None and isinstance(step, int):
            self.on_step(step)
        return True

    def _drop(self, prefix: str, keep: str | None = None) -> None:
        """Free every chunk under ``prefix``, except those under ``keep`` (call under the lock)."""
        for key in self.store.keys(prefix):
            if keep is None or not key.startswith(keep):
                self.store.delete(key)

    def _file(self, key: str, header: ChunkHeader, payload: torch.Tensor) -> None:
        """Store one chunk (call under the lock)."""
        self.store.flush(key, payload.view(header.dtype).view(header.shape), meta=header.meta)
        if f"/{OUTPUT}/" in key:  # a step's output: the two newest of a session are kept
            older = sorted(k for k in self.store.keys(key.rsplit("/", 1)[0] + "/") if k < key)
            for k in older[:-1]:
                self.store.delete(k)
        self.peak_bytes = max(self.peak_bytes, self.store.used_bytes)

    def accept(self, primary: int, make: Callable[[Callable], Any]) -> None:
        """Start receiving from ``primary``: ``make(on_chunk)`` builds the endpoint (on a thread of its own: it
        waits for the primary to connect). A previous link from the same primary is closed."""
        old = self.links.pop(primary, None)
        if old is not None:
            _close(old)
        with self._lock:
            self._gone.discard(primary)

        def _on_chunk(key: str, header: ChunkHeader, payload: torch.Tensor) -> bool:
            return self.receive(key, header, payload, primary)

        def _build() -> None:
            try:
                self.links[primary] = make(_on_chunk)
            except KVStreamError:
                pass  # the primary died before connecting: the controller sees it

        threading.Thread(target=_build, name=f"kvstream-holder-accept-{primary}", daemon=True).start()

    def forget(self, primaries: set[int]) -> None:
        """Close the links of primaries that are gone (their chunks stay; what the links still deliver is
        dropped)."""
        with self._lock:
            self._gone.update(primaries)
        for p in [p for p in self.links if p in primaries]:
            _close(self.links.pop(p))

    def sessions(self, prefix: str) -> list[str]:
        """Names of the sessions held under ``prefix``."""
        return sorted({k.rsplit("/seg", 1)[0] for k in self.store.keys(prefix) if "/seg" in k})

    def manifest(self, session: str, *, num_layers: int, kv_layers: list[int]) -> Manifest:
        """The whole segments held of ``session``."""
        return recover_manifest(self.store, session, num_layers=num_layers, kv_layers=kv_layers)

    def send(self, names: list[str], transport: Any, *, num_layers: int, kv_layers: list[int]) -> Handle:
        """Send ``names``' kept step outputs, manifests (``<session>/manifest``) and chunks, in that order,
        through ``transport`` (to a replacement that restores them); one handle for all."""
        handles = []
        for name in names:
            m = self.manifest(name, num_layers=num_layers, kv_layers=kv_layers)
            for key in self.store.keys(f"{name}/{OUTPUT}/"):  # first: they are there once the manifest is
                handles.append(transport.flush(key, self.store.view(key), meta=self.store.describe(key).meta))
            handles.append(transport.flush(SessionKeys(name).manifest, m.to_bytes()))
            for key in m.keys():
                handles.append(transport.flush(key, self.store.view(key), meta=self.store.describe(key).meta))
        return AllHandle(handles)

    def drop(self, prefix: str, *, keep: str | None = None) -> None:
        """Free every chunk under ``prefix``, except those under ``keep``."""
        with self._lock:
            self._drop(prefix, keep)
        if self.on_change is not None:
            self.on_change(True)

    def newest_step(self, prefix: str) -> int | None:
        """The newest step whose output is held under ``prefix`` (``None`` when none is)."""
        with self._lock:
            steps = [int(k.rsplit("/", 1)[1]) for k in self.store.keys(prefix) if f"/{OUTPUT}/" in k]
        return max(steps, default=None)

    def close(self) -> None:
        """Close every link and free everything."""
        for link in list(self.links.values()):
            _close(link)
        self.links.clear()
        self.store.close()


def _close(link: Any) -> None:
    try:
        link.close()
    except KVStreamError:
        pass


__all__ = ["ReplicaStore"]
