"""Epochs: one configuration of the pipeline each — its plan, its communicators, its step header.

The controller numbers configurations ``1, 2, ...`` and publishes each as a JSON *plan* under
``ep/<n>/plan`` in the job's store (which process serves which stage, who holds whose replica, what to
restore from where, the in-flight microbatches, the failures to inject). Every process watches for the
next plan (:class:`PlanWatcher`, a blocking store wait on a connection of its own): a newer plan interrupts
whatever it is doing (:class:`Reconfigure`), its links are aborted, and it applies the newer plan. The
controller and the stage processes of an epoch then form two fresh gloo groups under ``ep/<n>/pg``
(:func:`form_links`; controller rank 0, stage ``s`` rank ``s + 1``: the pipeline runs ``0 -> 1 -> ... -> D``
and the last stage's tokens go back to rank 0), so nothing of a failed configuration — a half-sent step, a
communicator waiting on a dead peer — reaches the next one.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...errors import PeerError
from ...transports.peer import KeyWaiter
from ..pipeline.links import Env, Header, Links


class Reconfigure(Exception):
    """A newer plan was published: abandon the current one."""


@dataclass
class StepHeader(Header):
    """:class:`~kvstream.serving.pipeline.links.Header` plus the failover fields: ``step`` (the microbatch's
    step: 0 its prefill, ``k`` its ``k``-th decode step), ``payload`` (0: a replayed step whose output the
    sender no longer has, and the receiver does not need) and ``replicate`` (0: do not replicate it)."""

    step: int = 0
    payload: int = 1
    replicate: int = 1


def plan_key(epoch: int) -> str:
    """Store key of an epoch's plan."""
    return f"ep/{epoch}/plan"


def state_key(epoch: int, inc: int) -> str:
    """Store key of a process's report on an epoch."""
    return f"ep/{epoch}/state/{inc}"


class PlanWatcher:
    """Waits for plans ``first, first + 1, ...`` on its own store connection and remembers the newest.

    Parameters
    ----------
    store : torch.distributed.Store
        The job's store (cloned here).
    first : int
        The first epoch this process takes part in.
    """

    def __init__(self, store, first: int):
        self.newest = first - 1
        self._plans: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._waiter = KeyWaiter(store)
        self._next = first
        self._thread = threading.Thread(target=self._run, name="kvstream-plans", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                raw = self._waiter.get(plan_key(self._next), self._stop)
            except Exception:  # noqa: BLE001 - the store died with the controller: the heartbeat ends us
                return
            if raw is None:
                return
            with self._cond:
                self._plans[self._next] = json.loads(raw)
                self.newest = self._next
                self._cond.notify_all()
            self._next += 1

    def newer_than(self, epoch: int) -> bool:
        """Whether a plan after ``epoch`` was published."""
        return self.newest > epoch

    def wait_after(self, epoch: int) -> dict:
        """The newest plan after ``epoch`` (blocks until there is one)."""
        with self._cond:
            while self.newest <= epoch:
                self._cond.wait(1.0)
            return self._plans[self.newest]

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()


def form_links(store, plan: dict, rank: int, *, device: torch.device, max_rows: int, timeout_s: float,
               interrupt: Callable[[], None]) -> Links:
    """Form the epoch's two gloo groups (``data``, ``control``) of the controller and the stages, and wrap
    them in :class:`~kvstream.serving.pipeline.links.Links` (interruptible receives, aborts). ``store`` must be
    a connection of its own: a rendezvous abandoned by an interrupt keeps it blocked until ``timeout_s``.

    The groups are built on a helper thread (their constructor waits for every rank) while this thread
    polls ``interrupt``, so a rank that never comes (it died meanwhile) ends the wait with the next plan.

    Raises
    ------
    Reconfigure
        From ``interrupt``.
    PeerError
        A rank did not join within ``timeout_s``.
    """
    import torch.distributed as dist

    world = len(plan["stages"]) + 1

    def _build() -> tuple:
        try:
            prefix = dist.PrefixStore(f"ep/{plan['epoch']}/pg", store)
            timeout = datetime.timedelta(seconds=timeout_s)
            return (dist.ProcessGroupGloo(dist.PrefixStore("data", prefix), rank, world, timeout),
                    dist.ProcessGroupGloo(dist.PrefixStore("control", prefix), rank, world, timeout))
        except Exception as e:  # noqa: BLE001 - any error of forming the groups, in one line
            raise PeerError(f"epoch {plan['epoch']}: the stages' groups did not form: {e}") from e

    groups = interruptible(_build, interrupt)
    return Links(Env(rank, world, rank), device, timeout_s, max_rows, groups=groups, interrupt=interrupt,
                 header=StepHeader)


def interruptible(fn: Callable[[], Any], interrupt: Callable[[], None], poll_s: float = 0.005) -> Any:
    """``fn()`` run on a helper thread while this one calls ``interrupt()`` every ``poll_s``: what waits for a
    peer (a rendezvous) ends with the next plan even if the peer never comes (the helper thread is then
    left to its own timeout). Returns ``fn``'s result; raises what ``fn`` or ``interrupt`` raises."""
    box: dict = {}

    def _run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    thread = threading.Thread(target=_run, name="kvstream-interruptible", daemon=True)
    thread.start()
    while thread.is_alive():
        interrupt()
        thread.join(poll_s)
    if "error" in box:
        raise box["error"]
    return box["value"]


def wall() -> float:
    """Seconds since the epoch on this host's clock (failure times cross processes)."""
    return time.time()


__all__ = ["Reconfigure", "StepHeader", "plan_key", "state_key", "PlanWatcher", "form_links", "interruptible", "wall"]
