"""The controller: the scheduler of a failover run and its recovery.

It is the pipeline's :class:`~kvstream.serving.pipeline.scheduler.Scheduler` (admission, round-robin
microbatches, requests leaving) without a stage of its own: token ids go to stage 0 (rank 1) and the last
stage's tokens come back to it (rank 0), so it keeps every generated token whatever fails. Per microbatch it
also keeps the inputs of its last ``window + 3`` steps and which original rows each step had.

When :class:`~.cluster.Cluster` finds a process dead (heartbeats, child exit) it recovers
(:meth:`Controller.reconfigure`): the communicators are aborted, a plan with the replacement is published,
every process reports the step each of its microbatches reached (survivors: what they computed; the
replacement: what it restored), and each microbatch resumes at ``min(reached) + 1``: stages that already
have a step pass their kept output on, only the stages that lack it compute it, so no acknowledged KV is
computed again. A microbatch that cannot be replayed (its replica was lost with its holder, or a log does
not reach back far enough) restarts from its prompt on every stage; so does every hit microbatch in the
``recompute`` mode (the baseline: a restarted stage and regeneration from the prompt). Either way the
controller's tokens make every output equal an uninterrupted run's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ...errors import PeerError
from ..pipeline.links import DECODE, PREFILL, RELEASE
from ..pipeline.scheduler import Admission, Microbatch, Scheduler
from .cluster import Cluster, Failed
from .config import FailoverConfig, KillSpec
from .epoch import Reconfigure, StepHeader, wall

#: Recovery attempts (each a plan) before a run gives up.
MAX_ATTEMPTS = 12
#: Seconds between two reads of the published acked steps.
ACK_POLL_S = 0.1


@dataclass
class FtMicrobatch(Microbatch):
    """A microbatch at the controller: :class:`~kvstream.serving.pipeline.scheduler.Microbatch` plus its step
    bookkeeping (``history``: step -> input ids and kept rows; ``rows``: step -> original rows after it)."""

    group: int = -1
    next_step: int = 0
    launched: int = -1
    done_step: int = -1
    history: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)


class Controller(Scheduler):
    """Scheduler and recovery of one phase of a failover run (see the module docstring).

    Parameters
    ----------
    cluster : Cluster
        The processes.
    links : Links
        The controller's end of the current epoch's groups.
    cfg : FailoverConfig
        The run.
    specs : list of KillSpec
        Failures still to inject in this phase.
    mode : {"restore", "recompute"}
        How a failed stage's microbatches come back.
    replicate : bool
        Replicate this phase's microbatches.
    """

    def __init__(self, cluster: Cluster, links, cfg: FailoverConfig, *, specs: list[KillSpec], mode: str = "restore",
                 replicate: bool = True, progress=None):
        super().__init__(None, links, slots=cfg.microbatches, admission=Admission("on", None, 0, 1, 1.0),
                         progress=progress)
        self.cluster, self.cfg, self.mode, self.replicate = cluster, cfg, mode, replicate
        self.specs = list(specs)
        self.links.interrupt = self._interrupt
        self.events: list[dict] = []
        self.hit: set[int] = set()
        self.acked: dict = {}
        self.lag: list[int] = []
        self._groups: dict[int, int] = {}
        self._dead: list = []
        self._acked_at = 0.0
        self._last_holders = cluster.holders()

    # -- microbatches --------------------------------------------------------------------------------
    def run(self, groups, *, record: bool = True) -> None:
        """Serve ``groups`` to completion (recovering from failures on the way)."""
        self._groups = {g[0].id: i for i, g in enumerate(groups)}
        super().run(groups, record=record)

    def _open(self, slot: int, group: list) -> None:
        super()._open(slot, group)
        mb = self.slots[slot]
        self.slots[slot] = FtMicrobatch(**{f: getattr(mb, f) for f in mb.__dataclass_fields__},
                                        group=self._groups[group[0].id], rows={0: list(range(len(group)))})

    def _next_step(self, slot: int, seq: int):
        mb: FtMicrobatch = self.slots[slot]
        k = mb.launched = mb.next_step
        rep = int(self.replicate)
        if k == 0:
            if mb.start_s == 0.0:
                mb.start_s = self.clock()
            h = StepHeader(PREFILL, slot=slot, seq=seq, rows=len(mb.requests), tokens=mb.width,
                           has_mask=int(mb.mask is not None), cap_tokens=mb.cap_tokens, group=mb.group, step=0,
                           replicate=rep)
            return h, mb.ids, mb.mask, None
        ids, keep = mb.history[k]
        h = StepHeader(DECODE, slot=slot, seq=seq, rows=ids.shape[0], tokens=1, keep=-1 if keep is None else keep.numel(),
                       group=mb.group, step=k, replicate=rep)
        return h, ids, None, keep

    def _run(self, slot: int, h, x: torch.Tensor, mask, keep) -> None:
        self._last = slot
        self.links.send_next(h, mask, keep, x)
        self.slots[slot].in_flight = True

    def _finished(self, slot: int) -> None:
        self.links.send_next(StepHeader(RELEASE, slot=slot))

    def _arrived(self, slot: int, t_step_us: int, tokens: torch.Tensor) -> None:
        mb: FtMicrobatch = self.slots[slot]
        k = mb.launched
        if k <= mb.done_step:  # a replayed step: its tokens are known
            mb.in_flight = False
            mb.next_step = k + 1
            return
        for e in self.events:
            if e.get("next_token_t") is None and e.get("resumed_t") is not None and slot in e["slots"]:
                e["next_token_t"] = wall()
        super()._arrived(slot, t_step_us, tokens)
        if self.slots[slot] is mb:
            mb.done_step, mb.next_step = k, k + 1
            mb.history[k + 1] = (mb.next_ids, mb.keep)
            mb.rows[k + 1] = [int(i) for i in mb.active]
            for old in [s for s in mb.history if s <= k + 1 - self.cfg.log_steps]:
                mb.history.pop(old)
                mb.rows.pop(old, None)

    def _restart(self, mb: FtMicrobatch) -> None:
        """Start ``mb`` again from its prompt (its tokens so far are dropped: they come again, the same)."""
        mb.tokens = {r.id: [] for r in mb.requests}
        mb.active = list(range(len(mb.requests)))
        mb.next_ids = mb.keep = None
        mb.next_step, mb.done_step, mb.launched = 0, -1, -1
        mb.history, mb.rows = {}, {0: list(range(len(mb.requests)))}

    # -- failures ------------------------------------------------------------------------------------
    def _interrupt(self) -> None:
        self._dead += self.cluster.poll_dead()
        if self._dead or self.cluster.holders() != self._last_holders:
            raise Reconfigure()

    def _pick(self):
        self._dead += self.cluster.poll_dead()
        if self._dead or self.cluster.holders() != self._last_holders:
            self.reconfigure()
        if time.monotonic() - self._acked_at > ACK_POLL_S:
            self._acked_at = time.monotonic()
            self.acked = self.cluster.acked()
            for s, by_group in self.acked.items():
                for mb in self.slots:
                    if mb is not None and mb.group in by_group:
                        self.lag.append(mb.done_step - by_group[mb.group])
        return super()._pick()

    def _receive(self) -> None:
        try:
            super()._receive()
        except Reconfigure:
            self.reconfigure()
        except (RuntimeError, PeerError, TimeoutError):  # a peer's socket closed: its death is being detected
            deadline = time.monotonic() + 2 * self.cfg.deadline_s + 1.0
            while not self._dead and time.monotonic() < deadline:
                self._dead += self.cluster.poll_dead()
                time.sleep(0.005)
            self.reconfigure()

    def reconfigure(self) -> None:
        """Recover from the processes found dead (or take a replica holder that became ready)."""
        dead, self._dead = self._dead, []
        self.links.abort()
        live = {s: mb for s, mb in enumerate(self.slots) if mb is not None}
        for mb in live.values():
            mb.in_flight = False
        acked = self.cluster.acked()
        reset: set[int] = set()
        restore: dict = {}
        restored: dict = {}  # inc -> its restore's figures, from whichever attempt it ran in (each runs once)
        stage_died = False
        for attempt in range(MAX_ATTEMPTS):
            more, stage_died = self._assign(dead, stage_died)
            restore = {s: ({"from": None} if isinstance(r.get("from"), int) and not self.cluster.procs[r["from"]].alive
                           else r) for s, r in {**restore, **more}.items()}
            if stage_died:
                self.hit |= {r.id for mb in live.values() for r in mb.requests}
                if self.mode == "recompute":
                    reset = set(live)
            holders = self.cluster.holders()
            rebuild = [s for s, h in enumerate(holders) if h is not None and h != self._last_holders[s]]
            plan = self.cluster.publish(groups=[self._group_doc(s, mb) for s, mb in live.items()], restore=restore,
                                        rebuild=rebuild, reset=sorted(reset), floors=self._floors(live, acked),
                                        kills=self.cluster.kills_for(self.specs), dead=[d[0] for d in dead])
            dead = []
            try:
                reports = self.cluster.collect(plan, self.cfg.recovery_timeout_s)
                restored.update({inc: rep["restore"] for inc, rep in reports.items() if rep.get("restore")})
                restore = {s: r for s, r in restore.items()
                           if not reports.get(plan["stages"][int(s)], {}).get("restore")}
                bad = self._unreplayable(plan, reports, live) - reset
                if bad:
                    reset |= bad
                    continue
                links = self.cluster.form(plan, torch.device("cpu"), self.cfg.batch)
            except Failed as f:
                dead = f.dead
                continue
            break
        else:
            raise RuntimeError(f"failover: no working configuration after {MAX_ATTEMPTS} attempts")
        links.interrupt = self._interrupt
        self.links, self._last_holders = links, holders
        self._resume(plan, reports, live, reset, restored)

    def settle(self) -> list:
        """After the last request: wait (at most one deadline) until every process whose injected failure fired
        was found dead, and record them; returns them (``(inc, how, t)``: the next phase replaces them)."""
        deadline = time.monotonic() + self.cfg.deadline_s + 2 * self.cfg.heartbeat_s
        while time.monotonic() < deadline and any(
                p.alive and self.cluster.kill_time(p.inc) is not None for p in self.cluster.procs.values()):
            self._dead += self.cluster.poll_dead()
            time.sleep(0.02)
        dead, self._dead = self._dead + self.cluster.poll_dead(), []
        self._note_failures(dead)
        return dead

    def _note_failures(self, dead: list) -> None:
        """Record the failures ``dead`` (``(inc, how, t)``) as events."""
        for inc, how, t in dead:
            p = self.cluster.procs[inc]
            self._fired(p.killed_by)
            self.events.append({"inc": inc, "role": self.cluster.role_of(inc), "how": how, "spec": p.killed_by,
                                "kill_t": self.cluster.kill_time(inc), "detect_t": t, "epoch": self.cluster.epoch + 1,
                                "slots": [s for s, mb in enumerate(self.slots) if mb is not None]})

    def _assign(self, dead: list, stage_died: bool) -> tuple[dict, bool]:
        """Record the failures and replace the dead (:meth:`Cluster.replace_all`); returns the restore sources
        of the replaced stages and whether a stage died."""
        self._note_failures(dead)
        sources = self.cluster.replace_all([d[0] for d in dead])
        restore = {str(s): {"from": None if self.mode == "recompute" else src} for s, src in sources.items()}
        return restore, stage_died or bool(sources)

    def _fired(self, text: str | None) -> None:
        self.specs = [s for s in self.specs if s.text != text]

    def _group_doc(self, slot: int, mb: FtMicrobatch) -> dict:
        return {"slot": slot, "group": mb.group, "width": mb.width, "cap_tokens": mb.cap_tokens,
                "mask": None if mb.mask is None else mb.mask.tolist(), "rows": {str(k): v for k, v in mb.rows.items()}}

    def _floors(self, live: dict, acked: dict) -> dict:
        """Per stage, the acknowledged step of each live microbatch (by group): computing a step up to it again
        counts as recomputed."""
        groups = {mb.group for mb in live.values()}
        return {str(s): {str(g): a for g, a in by_group.items() if g in groups} for s, by_group in acked.items()}

    def _reached(self, plan: dict, reports: dict) -> list[dict]:
        """Per stage, ``{slot: (step reached, oldest step whose output it kept)}``."""
        out = []
        for inc in plan["stages"]:
            rep = reports[inc]
            out.append({int(s): (c, rep["log"].get(s)) for s, c in rep["groups"].items()})
        return out

    def _unreplayable(self, plan: dict, reports: dict, live: dict) -> set[int]:
        """Live slots that cannot resume by replay: a stage must compute a step whose input nobody kept."""
        reached = self._reached(plan, reports)
        bad = set()
        for slot, mb in live.items():
            have = [r.get(slot, (-1, None)) for r in reached]
            top = mb.done_step + 1
            for s, (c, _) in enumerate(have):
                need = range(c + 1, top + 1)
                if not need:
                    continue
                if s == 0:
                    ok = all(k == 0 or k in mb.history for k in need)
                else:
                    c_prev, oldest = have[s - 1]
                    oldest = c_prev + 1 if oldest is None else oldest
                    ok = all(k > c_prev or k >= oldest for k in need)
                if not ok:
                    bad.add(slot)
        return bad

    def _resume(self, plan: dict, reports: dict, live: dict, reset: set[int], restored: dict) -> None:
        reached = self._reached(plan, reports)
        for slot, mb in live.items():
            if slot in reset:
                self._restart(mb)
                continue
            low = min(r.get(slot, (-1, None))[0] for r in reached)
            mb.next_step = min(low + 1, mb.done_step + 1)
        # the restores of every attempt: one that ran in an attempt cut short by another failure is not run again
        restores = {inc: r for inc, r in restored.items() if inc in reports}
        now = wall()
        for e in self.events:
            if e.get("resumed_t") is None:
                e.update(resumed_t=now, reset=sorted(reset), restores=restores, replay_from=
                         {slot: mb.next_step for slot, mb in live.items()})

    # -- the record ----------------------------------------------------------------------------------
    def doc(self) -> dict:
        """What the phase did: completions, outputs, failures, hit requests, acked lag."""
        lag = sorted(self.lag)
        return {"completions": [c.as_dict() for c in self.completions], "outputs": self.outputs,
                "events": self.events, "hit": sorted(self.hit),
                "acked_lag_steps": {"p50": lag[len(lag) // 2] if lag else None, "max": lag[-1] if lag else None}}


__all__ = ["MAX_ATTEMPTS", "FtMicrobatch", "Controller"]
