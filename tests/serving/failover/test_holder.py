"""The replica holder on its own (no processes): a dead primary's late chunks are not filed."""

from __future__ import annotations

import threading

import torch

from kvstream.chunk import NO_CHECKSUM, chunk_header
from kvstream.serving.failover.holder import ReplicaStore
from kvstream.serving.failover.replicator import RELEASE


class _Endpoint:
    """A receiving endpoint that has nothing to close."""

    def close(self) -> None:
        pass


def _link(holder: ReplicaStore, primary: int):
    """Accept ``primary`` through a fake endpoint; returns the link's ``on_chunk``."""
    got, made = [], threading.Event()

    def make(on_chunk):
        got.append(on_chunk)
        made.set()
        return _Endpoint()

    holder.accept(primary, make)
    assert made.wait(5.0)
    return got[0]


def _chunk(value: float):
    t = torch.full((2, 3), value)
    return chunk_header(t, None, {"step": 1}, NO_CHECKSUM), t.view(torch.uint8).reshape(-1)


def test_a_forgotten_primarys_late_chunk_is_dropped_and_a_release_frees_the_session():
    holder = ReplicaStore(pinned=False)
    send = _link(holder, primary=7)
    header, payload = _chunk(1.0)
    send("ft/p0/s1/g0/seg0/l0", header, payload)
    assert holder.held_bytes == 24
    send(f"ft/p0/s1/g0/{RELEASE}", header, payload)
    assert holder.held_bytes == 0
    send("ft/p0/s1/g1/seg0/l0", header, payload)
    holder.forget({7})  # the primary died; a chunk it had in flight lands afterwards
    send("ft/p0/s1/g1/seg0/l1", header, payload)
    assert sorted(holder.store.keys("ft/")) == ["ft/p0/s1/g1/seg0/l0"]  # kept for the restore, nothing added
    again = _link(holder, primary=7)  # the same primary accepted again is heard again
    again("ft/p0/s1/g1/seg0/l1", header, payload)
    assert holder.held_bytes == 48
    holder.close()


def test_a_new_phase_keeps_its_own_early_chunks_and_the_newest_held_step_is_known():
    """A primary may start a phase before its holder applied the phase's plan: dropping the last phase keeps
    what this phase already sent, and the newest step held is found from the kept outputs (``rS@N``)."""
    holder = ReplicaStore(pinned=False)
    send = _link(holder, primary=3)
    header, payload = _chunk(2.0)
    send("ft/p1/s0/g0/seg0/l0", header, payload)
    send("ft/p1/s0/g0/out/000004", header, payload)
    send("ft/p2/s0/g0/seg0/l0", header, payload)
    for step in (1, 2, 6):
        send(f"ft/p2/s0/g0/out/{step:06d}", header, payload)
    assert holder.newest_step("ft/p2/") == 6 and holder.newest_step("ft/p1/") == 4
    assert holder.newest_step("ft/p3/") is None
    holder.drop("ft/", keep="ft/p2/")
    assert sorted(holder.store.keys("ft/")) == ["ft/p2/s0/g0/out/000002", "ft/p2/s0/g0/out/000006",
                                                 "ft/p2/s0/g0/seg0/l0"]
    holder.close()
