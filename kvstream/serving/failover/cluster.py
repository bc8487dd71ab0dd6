"""The controller's view of the processes: who serves which stage, who holds whose replica, who is alive.

:class:`Cluster` hosts the job's store (a ``TCPStore``), starts the worker processes (:mod:`.worker`), watches
them — a :class:`~kvstream.transports.peer.Liveness` per process on the heartbeat channel (``hb/<inc>``:
dead after ``deadline_s`` of silence, DéjàVu's 3 x 1 s by default), and with ``exit_watch`` the exit of a
child process, seen at once — fences every process it declares dead (``SIGKILL``: a stopped process that
wakes up can do no harm), picks replacements and writes each epoch's plan (:mod:`.epoch`).

Why not torchrun's elastic agent: on any failure it restarts every worker of the job, so survivors would
lose their device KV and weights (and the replicas would have to live outside the workers). Here only the
failed stage is replaced — by a standby that adopts its rank or a restarted process — and the others keep
everything; the communicators are re-formed per epoch instead of the job.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from ...errors import PeerError
from ...streaming.placement import split_layers
from ...transports.peer import Liveness, free_port, rendezvous_store
from ..launch import stop_workers
from ..pipeline.run import model_config
from .config import FailoverConfig, KillSpec
from .epoch import form_links, plan_key, state_key, wall
from .worker import CONTROLLER


class Failed(Exception):
    """Processes died while an epoch was being set up; ``dead`` lists them (``(inc, how, t)``)."""

    def __init__(self, dead: list):
        super().__init__(f"processes {[d[0] for d in dead]} died")
        self.dead = dead


@dataclass
class Proc:
    """One worker process: its incarnation, its child process, its log file, what it is for."""

    inc: int
    popen: subprocess.Popen
    log: Any
    started: float
    ready: bool = False
    alive: bool = True
    holder_of: int | None = None  # --replica host: the stage whose standby and replica holder it is
    killed_by: str | None = None


@dataclass
class Roles:
    """Who does what in the current epoch."""

    stages: list = field(default_factory=list)  # stage -> incarnation
    holders: dict = field(default_factory=dict)  # stage -> holder incarnation (--replica host)
    idle: list = field(default_factory=list)  # idle standbys (ring, disk)


class Cluster:
    """The processes of a failover run and their epochs (see the module docstring).

    Parameters
    ----------
    cfg : FailoverConfig
        The run (``replica_dir`` is made here when ``--replica disk`` gives none).
    """

    def __init__(self, cfg: FailoverConfig):
        self.cfg = cfg
        if cfg.replica == "disk" and not cfg.replica_dir:
            cfg.replica_dir = tempfile.mkdtemp(prefix="kvstream-replicas-")
        self.port = free_port()
        self.store = rendezvous_store("127.0.0.1", self.port, is_server=True, timeout_s=cfg.recovery_timeout_s)
        config = model_config(cfg)
        self.num_layers = int(config.num_hidden_layers)
        self.layers = [[r.start, r.stop] for r in split_layers(self.num_layers, cfg.stages)]
        self.procs: dict[int, Proc] = {}
        self.roles = Roles()
        self.epoch = 0
        self.phase = 0
        self._next_inc = CONTROLLER + 1
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._monitors: dict[int, Liveness] = {}
        self.failures: list[dict] = []

    # -- processes -----------------------------------------------------------------------------------
    def spawn(self, first_epoch: int, holder_of: int | None = None) -> int:
        """Start a worker that takes part from ``first_epoch`` on; returns its incarnation."""
        inc, self._next_inc = self._next_inc, self._next_inc + 1
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.cfg.device == "cpu":
            env["OMP_NUM_THREADS"] = str(self.cfg.threads)
        log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "kvstream.serving.failover", "--worker", str(inc), str(first_epoch),
               f"127.0.0.1:{self.port}", json.dumps(self.cfg.to_json())]
        popen = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        self.procs[inc] = Proc(inc, popen, log, wall(), holder_of=holder_of)
        self._monitors[inc] = Liveness(rendezvous_store("127.0.0.1", self.port, is_server=False), CONTROLLER, inc,
                                       heartbeat_s=self.cfg.heartbeat_s, dead_after_s=self.cfg.deadline_s,
                                       startup_s=self.cfg.recovery_timeout_s,
                                       on_change=lambda i=inc: self._events.put(i))
        return inc

    def _poll_ready(self) -> None:
        for p in self.procs.values():
            if p.alive and not p.ready and self.store.check([f"proc/{p.inc}/ready"]):
                p.ready = True

    def wait_ready(self, incs: list[int], timeout_s: float) -> None:
        """Block until every process of ``incs`` finished starting up.

        Raises
        ------
        Failed
            One died first; ``PeerError`` after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            dead = self.poll_dead()
            if dead:
                raise Failed(dead)
            self._poll_ready()
            if all(self.procs[i].ready for i in incs):
                return
            if time.monotonic() > deadline:
                raise PeerError(f"workers {[i for i in incs if not self.procs[i].ready]} did not start in {timeout_s} s")
            time.sleep(0.02)

    def poll_dead(self) -> list[tuple[int, str, float]]:
        """Processes found dead since the last call, fenced (``SIGKILL``): ``[(inc, how, when)]``, ``how`` being
        ``exit`` (the child exited: ``exit_watch``) or ``heartbeat`` (silent for ``deadline_s``)."""
        found: dict[int, str] = {}
        while True:
            try:
                inc = self._events.get_nowait()
            except queue.Empty:
                break
            if self._monitors.get(inc) is not None and self._monitors[inc].error is not None:
                found.setdefault(inc, "heartbeat")
        if self.cfg.exit_watch:
            for p in self.procs.values():
                if p.alive and p.popen.poll() is not None:
                    found.setdefault(p.inc, "exit")
        out = []
        for inc, how in found.items():
            p = self.procs[inc]
            if not p.alive:
                continue
            t = wall()
            p.alive = False
            self._fence(p)
            out.append((inc, how, t))
        return out

    def _fence(self, p: Proc) -> None:
        """Make sure a process declared dead is dead (it may only be stopped)."""
        if p.popen.poll() is None:
            os.kill(p.popen.pid, signal.SIGKILL)
            p.popen.wait(timeout=10)
        mon = self._monitors.pop(p.inc, None)
        if mon is not None:
            mon.stop()
        raw = self.store.get(f"kill/{p.inc}") if self.store.check([f"kill/{p.inc}"]) else None
        p.killed_by = json.loads(raw)["spec"] if raw else None

    def kill_time(self, inc: int) -> float | None:
        """When the failure injected into ``inc`` fired (its own record), or ``None``."""
        if not self.store.check([f"kill/{inc}"]):
            return None
        return float(json.loads(self.store.get(f"kill/{inc}"))["t"])

    def log_tail(self, inc: int, lines: int = 30) -> str:
        """The last lines a worker printed."""
        f = self.procs[inc].log
        f.seek(0)
        return "\n".join(f.read().splitlines()[-lines:])

    # -- roles ---------------------------------------------------------------------------------------
    def start(self) -> list[int]:
        """Spawn the stages and the standbys (with ``--replica host``, one per stage, holding its replica)."""
        cfg = self.cfg
        self.roles.stages = [self.spawn(1) for _ in range(cfg.stages)]
        if cfg.replica == "host":
            self.roles.holders = {s: self.spawn(1, holder_of=s) for s in range(cfg.stages)}
        elif cfg.replacement == "standby":
            self.roles.idle = [self.spawn(1) for _ in range(cfg.standbys)]
        return list(self.procs)

    def role_of(self, inc: int) -> str:
        """``stage S``, ``holder S`` or ``standby``."""
        if inc in self.roles.stages:
            return f"stage {self.roles.stages.index(inc)}"
        for s, h in self.roles.holders.items():
            if h == inc:
                return f"holder {s}"
        return "standby"

    def replace_all(self, dead: list[int]) -> dict[int, Any]:
        """Give the roles of the dead processes to others; returns ``{stage: restore source}`` of the replaced
        stages (an incarnation that sends the replica over a link, ``"local"`` for a standby that holds it,
        ``"disk"``, or ``None`` when the replica went with its holder).

        A stage goes to its standby (``--replica host``), an idle ready standby, or a process started now
        (``--replacement restart``, or none ready); a dead holder or standby is replaced by a new one, which
        serves once it has started.
        """
        cfg, roles = self.cfg, self.roles
        old = list(roles.stages)
        old_holders = dict(roles.holders)
        sources: dict[int, Any] = {}
        for inc in dead:
            for s, h in list(roles.holders.items()):
                if h == inc:
                    roles.holders[s] = self.spawn(self.epoch + 1, holder_of=s)
            if inc in roles.idle:
                roles.idle.remove(inc)
        for inc in dead:
            if inc not in roles.stages:
                continue
            s = roles.stages.index(inc)
            h = old_holders.get(s)
            holder_ok = h is not None and self.procs[h].alive and self.procs[h].ready
            if cfg.replica == "host" and cfg.replacement == "standby" and holder_ok:
                roles.stages[s], sources[s] = h, "local"
                roles.holders[s] = self.spawn(self.epoch + 1, holder_of=s)
                continue
            ready = [i for i in roles.idle if self.procs[i].alive and self.procs[i].ready]
            if cfg.replacement == "standby" and ready:
                roles.stages[s] = ready[0]
                roles.idle.remove(ready[0])
            else:
                roles.stages[s] = self.spawn(self.epoch + 1)
            if cfg.replica == "disk":
                sources[s] = "disk"
            elif cfg.replica == "host":
                sources[s] = h if holder_ok else None
        if cfg.replica == "ring":
            n = len(old)
            for s in [old.index(i) for i in dead if i in old]:
                h = old[(s + 1) % n]
                sources[s] = h if roles.stages[(s + 1) % n] == h and self.procs[h].alive else None
        if cfg.replica != "host" and cfg.replacement == "standby":
            while len([i for i in roles.idle if self.procs[i].alive]) < cfg.standbys:
                roles.idle.append(self.spawn(self.epoch + 1))
        return sources

    # -- plans ---------------------------------------------------------------------------------------
    def holders(self) -> list:
        """Whom each stage replicates to now: an incarnation, ``"disk"``, or ``None`` (unprotected)."""
        cfg, stages = self.cfg, self.roles.stages
        if cfg.replica == "ring":
            return [stages[(s + 1) % len(stages)] for s in range(len(stages))]
        if cfg.replica == "disk":
            return ["disk"] * len(stages)
        return [h if h is not None and self.procs[h].ready and self.procs[h].alive else None
                for h in (self.roles.holders.get(s) for s in range(len(stages)))]

    def publish(self, *, groups: list, restore: dict, rebuild: list, reset: list, floors: dict, kills: dict,
                dead: list, stop: bool = False) -> dict:
        """Write the next epoch's plan; returns it."""
        self.epoch += 1
        plan = {"epoch": self.epoch, "phase": self.phase, "stop": stop, "stages": list(self.roles.stages),
                "holders": self.holders(), "replica": self.cfg.replica, "restore": restore, "rebuild": rebuild,
                "groups": groups, "reset": reset, "floors": floors, "kills": kills, "dead": dead,
                "layers": self.layers, "num_layers": self.num_layers}
        self.store.set(plan_key(self.epoch), json.dumps(plan))
        return plan

    def collect(self, plan: dict, timeout_s: float, *, everyone: bool = False) -> dict[int, dict]:
        """Every stage's report on ``plan`` (``{inc: report}``), waiting at most ``timeout_s``; with
        ``everyone``, also every started holder's and standby's (a phase's first plan: a primary must not
        stream the phase's chunks to a holder that is still in the last phase).

        Raises
        ------
        Failed
            A process died meanwhile (a second failure during recovery), or one did not report in time
            (it is then fenced as dead).
        """
        want = list(plan["stages"])  # otherwise holders and standbys apply plans on their own
        if everyone:
            want += [p.inc for p in self.procs.values() if p.alive and p.ready and p.inc not in want]
        deadline = time.monotonic() + timeout_s
        while True:
            dead = self.poll_dead()
            if dead:
                raise Failed(dead)
            missing = [i for i in want if self.procs[i].alive and not self.store.check([state_key(plan["epoch"], i)])]
            if not missing:
                return {i: json.loads(self.store.get(state_key(plan["epoch"], i))) for i in want if self.procs[i].alive}
            if time.monotonic() > deadline:
                late = [(i, "timeout", wall()) for i in missing]
                for i in missing:
                    self.procs[i].alive = False
                    self._fence(self.procs[i])
                raise Failed(late)
            time.sleep(0.002)

    def form(self, plan: dict, device, max_rows: int):
        """The controller's end (rank 0) of the epoch's groups; a death meanwhile raises :class:`Failed`."""
        def _interrupt() -> None:
            dead = self.poll_dead()
            if dead:
                raise Failed(dead)

        store = rendezvous_store("127.0.0.1", self.port, is_server=False)  # its own: an abandoned rendezvous blocks it
        return form_links(store, plan, 0, device=device, max_rows=max_rows, timeout_s=self.cfg.recovery_timeout_s,
                          interrupt=_interrupt)

    def kills_for(self, specs: list[KillSpec]) -> dict:
        """``{inc: [spec text]}``: each pending spec goes to the process now serving its target."""
        out: dict = {}
        for spec in specs:
            target = self.roles.holders.get(spec.stage) if spec.holder else self.roles.stages[spec.stage]
            if target is not None:
                out.setdefault(str(target), []).append(spec.text)
        return out

    def acked(self) -> dict[int, dict[int, int]]:
        """``{stage: {group: acked step}}`` of the current phase, as the replicators published it."""
        out = {}
        for s in range(len(self.roles.stages)):
            key = f"ack/{s}"
            if self.store.check([key]):
                doc = json.loads(self.store.get(key))
                if doc.get("phase") == self.phase:
                    out[s] = {int(g): int(a) for g, a in doc["acked"].items()}
        return out

    def held(self, timeout_s: float) -> dict:
        """The replica bytes the processes hold once the phase's releases landed: waits up to ``timeout_s`` for
        every holder to report none; ``{"end_bytes": total now, "peak_bytes": largest holder's peak}``."""
        deadline = time.monotonic() + timeout_s
        while True:
            docs = [json.loads(self.store.get(f"held/{p.inc}")) for p in self.procs.values()
                    if p.alive and self.store.check([f"held/{p.inc}"])]
            docs = [d for d in docs if d["phase"] == self.phase]
            end = sum(d["bytes"] for d in docs)
            if end == 0 or time.monotonic() > deadline:
                return {"end_bytes": end, "peak_bytes": max((d["peak"] for d in docs), default=0)}
            time.sleep(0.02)

    def close(self, timeout_s: float = 30.0) -> dict[int, dict]:
        """Tell every worker to stop, collect their logs (``{inc: doc}``), end the processes."""
        self.publish(groups=[], restore={}, rebuild=[], reset=[], floors={}, kills={}, dead=[], stop=True)
        alive = [p for p in self.procs.values() if p.alive]
        deadline = time.monotonic() + timeout_s
        while any(p.popen.poll() is None for p in alive) and time.monotonic() < deadline:
            time.sleep(0.02)
        docs = {}
        for p in alive:
            if self.store.check([f"doc/{p.inc}"]):
                docs[p.inc] = json.loads(self.store.get(f"doc/{p.inc}"))
        for mon in self._monitors.values():
            mon.stop()
        stop_workers([p.popen for p in self.procs.values()])
        for p in self.procs.values():
            p.log.close()
        return docs


__all__ = ["Failed", "Proc", "Roles", "Cluster"]
