"""One worker process of a failover run: a stage, a replica holder, or a standby, as each epoch's plan says.

A worker starts with the whole model built (a standby's weights are loaded before any failure), heartbeats
through the store and watches the controller's heartbeat (it exits when the controller is gone). For
every plan (:mod:`.epoch`) it aborts its links and takes its role:

* **a surviving stage** keeps its device KV and weights; it drops the microbatches the plan no longer
  lists (or restarts), reports the step each of its microbatches reached, and, when its replica holder
  changed, rebuilds its replicas at the new one;
* **a replacement** adopts the stage: it prunes its model to the stage, restores every in-flight
  microbatch from the replica (:mod:`.restore`), continues those sessions where the holder keeps them, and
  reports the steps they reached;
* **a holder** (the next stage in the ring, or the stage's standby with ``--replica host``) receives its
  primary's chunks (:mod:`.holder`), and sends them to a replacement that restores over a link.

Stages then serve steps (:mod:`.serve`) until the next plan; the final plan says stop, and every worker
writes its log to the store (``doc/<inc>``).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import torch

from ...errors import KVStreamError
from ...transports.disk import DiskTransport
from ...transports.peer import Liveness, rendezvous_store
from ...transports.remote import RemoteHostTransport
from ..pipeline.engine import StageRuntime
from ..pipeline.run import DTYPES, build_model, device_for, stage_token_bytes
from ..pipeline.links import Env, LinkClosed
from ..pipeline.stages import StageModel
from ..pipeline.swap import SwapManager
from .config import FailoverConfig, KillSpec
from .epoch import PlanWatcher, Reconfigure, form_links, interruptible, state_key, wall
from .holder import ReplicaStore
from .replicator import Replicator, phase_prefix, session_name
from .restore import GroupInfo, restore_groups
from .serve import OutputLog, serve

#: The controller's incarnation number (heartbeats ``hb/0``).
CONTROLLER = 0


class Worker:
    """One worker process (see the module docstring).

    Parameters
    ----------
    cfg : FailoverConfig
        The run.
    inc : int
        This process's incarnation number (unique in the run, never reused).
    first_epoch : int
        The first plan it takes part in.
    host, port : str, int
        The controller's store.
    """

    def __init__(self, cfg: FailoverConfig, inc: int, first_epoch: int, host: str, port: int):
        self.cfg, self.inc = cfg, inc
        self.addr = (host, port)
        self.store = self.connect()
        self.device = device_for(cfg, Env(0, 1, 0)) if cfg.device == "cpu" else self._cuda()
        self.model = build_model(cfg, self.device)
        # heartbeats start once the model is built (the controller allows the startup its own time)
        self.live = Liveness(self.connect(), inc, CONTROLLER, heartbeat_s=cfg.heartbeat_s, dead_after_s=cfg.deadline_s,
                             startup_s=cfg.recovery_timeout_s, on_change=self._controller_lost)
        self.eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        self.plans = PlanWatcher(self.connect(), first_epoch)
        self.epoch, self.phase = first_epoch - 1, -1
        self.stage: int | None = None
        self.rt: StageRuntime | None = None
        self.replicator: Replicator | None = None
        self.dest_holder: Any = None  # the holder this stage replicates to (an incarnation or "disk")
        self.holding: dict[int, int] = {}  # stage -> primary incarnation whose replica this process holds
        self.holder = ReplicaStore(pinned=self.device.type == "cuda", on_step=self._held_step, on_change=self._held)
        self._held_store, self._held_at, self._held_lock = self.connect(), 0.0, threading.Lock()
        self.links = None
        self.log = OutputLog(cfg.log_steps)
        self.computed: dict[int, tuple[int, int]] = {}  # slot -> (group, last step computed)
        self.floors: dict[int, int] = {}
        self.kills: list[KillSpec] = []
        self.prefills = 0
        self.doc: dict = {"inc": inc, "pid": os.getpid(), "roles": [], "restores": [], "recomputed_tokens": {},
                          "steps": {}}
        self.store.set(f"proc/{inc}/ready", json.dumps({"pid": os.getpid(), "t": wall()}))

    # -- plumbing ------------------------------------------------------------------------------------
    def connect(self):
        """A new client connection to the controller's store."""
        return rendezvous_store(*self.addr, is_server=False, timeout_s=self.cfg.recovery_timeout_s)

    def _cuda(self) -> torch.device:
        dev = torch.device("cuda", self.inc % max(1, torch.cuda.device_count()) if torch.cuda.device_count() > 1 else 0)
        torch.cuda.set_device(dev)
        return dev

    def _controller_lost(self) -> None:
        if self.live.error is not None:
            os._exit(75)  # nobody left to serve: never hang past the deadline

    def interrupt(self) -> None:
        """Raise :class:`Reconfigure` when a newer plan is out (called while waiting)."""
        if self.plans.newer_than(self.epoch):
            raise Reconfigure()

    def die(self, spec: KillSpec) -> None:
        """Inject ``spec``'s failure into this process (it is recorded first: the controller times detection)."""
        self.store.set(f"kill/{self.inc}", json.dumps({"spec": spec.text, "t": wall()}))
        os.kill(os.getpid(), signal.SIGSTOP if spec.signal == "stop" else signal.SIGKILL)
        time.sleep(3600)  # a stopped process resumes only to be killed

    def check_kill(self, when: str, step: int = 0, holder: bool = False) -> None:
        """Fire the first kill spec that matches (``when``: decode, prefill, recover)."""
        for spec in self.kills:
            if spec.when == when and spec.holder == holder and (when == "recover" or step >= spec.step):
                self.kills.remove(spec)
                self.die(spec)

    def _held_step(self, step: int) -> None:
        self.check_kill("decode", step, holder=True)

    def _held(self, released: bool) -> None:
        """Publish the replica bytes this process holds (``held/<inc>``; at most every 50 ms but after a release)."""
        with self._held_lock:
            if not released and time.monotonic() - self._held_at < 0.05:
                return
            self._held_at = time.monotonic()
            doc = {"phase": self.phase, "bytes": self.holder.held_bytes, "peak": self.holder.peak_bytes}
            try:
                self._held_store.set(f"held/{self.inc}", json.dumps(doc))
            except Exception:  # noqa: BLE001 - the store went with the controller
                pass

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> None:
        """Apply plans and serve until the stop plan."""
        while True:
            plan = self.plans.wait_after(self.epoch)
            if plan.get("stop"):
                self.finish()
                return
            try:
                self.apply(plan)
                if self.links is not None:
                    serve(self)
            except Reconfigure:
                continue
            except (KVStreamError, RuntimeError, TimeoutError) as e:  # a link broke: the next plan follows
                if not isinstance(e, LinkClosed):
                    self.doc.setdefault("errors", []).append(f"epoch {self.epoch}: {type(e).__name__}: {e}"[:300])
                self._abort_links()

    def _abort_links(self) -> None:
        if self.links is not None:
            self.links.abort()
            self.links = None

    def apply(self, plan: dict) -> None:
        """Take this process's role in ``plan`` (see the module docstring); report; form the stages' groups."""
        self._abort_links()
        self.epoch = plan["epoch"]
        self.kills = [KillSpec.parse(k, self.cfg.stages) for k in plan["kills"].get(str(self.inc), [])]
        if plan["phase"] != self.phase:
            self._new_phase(plan)
        held = self.holder.newest_step(phase_prefix(self.phase))
        if held is not None:  # this phase's chunks may have come before its plan: rS@N counts them too
            self._held_step(held)
        stages = plan["stages"]
        stage = stages.index(self.inc) if self.inc in stages else None
        if stage is not None and self.stage == stage:
            self.check_kill("recover")  # a survivor that dies during the recovery, before it reports
        self.floors = {int(k): v for k, v in plan["floors"].get(str(stage), {}).items()} if stage is not None else {}
        report: dict = {"stage": stage, "groups": {}}
        infos = [GroupInfo.from_doc(g) for g in plan["groups"]]
        if stage is not None:
            report.update(self._as_stage(plan, stage, infos))
        self._hold(plan, stages)
        self.interrupt()
        self.store.set(state_key(self.epoch, self.inc), json.dumps(report))
        if stage is not None:
            self.links = form_links(self.connect(), plan, stage + 1, device=self.device, max_rows=self.cfg.batch,
                                    timeout_s=self.cfg.recovery_timeout_s, interrupt=self.interrupt)

    def _new_phase(self, plan: dict) -> None:
        """A phase starts with nothing in flight: forget every microbatch and replica of the last one."""
        self.phase = plan["phase"]
        self.prefills = 0  # S@pN counts the phase's prompts
        if self.rt is not None:
            for slot in list(self.rt.slots):
                self.rt.release(slot)
        self.computed.clear()
        self.log.clear()
        if self.replicator is not None:
            for group in list(self.replicator.sessions):
                self.replicator.release(group)
            self.replicator.phase = self.phase
        self.holder.drop("ft/", keep=phase_prefix(self.phase))  # a primary may have started this phase already
        self.holder.peak_bytes = self.holder.held_bytes
        self._held(True)

    # -- as a stage ----------------------------------------------------------------------------------
    def _become(self, stage: int) -> None:
        cfg = self.cfg
        self.stage = stage
        self.needs_restore = True
        self.doc["roles"].append({"epoch": self.epoch, "stage": stage})
        sm = StageModel(self.model, stage, cfg.stages)
        self.model = None  # pruned into the stage
        self.replicator = Replicator(stage=stage, layers=sm.layers, config=sm.config, dtype=DTYPES[cfg.dtype],
                                     device=self.device, store=self.connect(), phase=self.phase)

        def _on_layer(slot: int, layer_idx: int, layer: Any) -> None:
            self.replicator.on_layer(slot, layer_idx, layer)
            if self._die_in_prefill is not None:
                spec, self._die_in_prefill = self._die_in_prefill, None
                self.die(spec)

        swap = SwapManager(self.device, budget_bytes=None, swap=False,
                           token_bytes=stage_token_bytes(sm.config, cfg.dtype, cfg.stages)[stage],
                           bandwidth_bytes_per_s=1e12, on_layer=_on_layer)
        self.rt = StageRuntime(sm, swap, self.eos)

    _die_in_prefill: KillSpec | None = None
    needs_restore = False

    def _as_stage(self, plan: dict, stage: int, infos: list[GroupInfo]) -> dict:
        adopting = self.stage != stage
        if adopting:
            self._become(stage)
        live = {i.slot: i for i in infos}
        reset = set(plan["reset"])
        for slot in list(self.rt.slots):
            if slot not in live or slot in reset or self.computed.get(slot, (None,))[0] != live[slot].group:
                self.drop_slot(slot)
        out: dict = {}
        restored = {}
        if self.needs_restore:
            restored, stats = self._restore(plan, stage, [i for i in infos if i.slot not in reset])
            self.needs_restore = False
            out["restore"] = stats
            if stats["from"] is not None:
                self.doc["restores"].append({"epoch": self.epoch, **stats})
        for slot, r in restored.items():
            self.computed[slot] = (live[slot].group, r.step)
            for k, earlier in r.earlier:  # oldest first: the replay may need them when the next stage is behind
                self.log.put(slot, k, earlier.to(self.device))
            self.log.put(slot, r.step, r.output.to(self.device))
        holder = plan["holders"][stage]
        rebuild = stage in plan["rebuild"]
        if holder != self.dest_holder:
            self.dest_holder = holder
            if holder is None:
                self.replicator.connect(lambda: None)
            else:
                self.replicator.connect(self._dest_factory(holder))
        for slot, r in restored.items():
            if not rebuild:
                self.replicator.adopt(live[slot].group, r.manifest, r.step)
        if rebuild:
            for slot, (group, step) in self.computed.items():
                self.replicator.rebuild(group, self.rt.slots[slot].kv.cache.kv_layers(), step,
                                          self.log.get(slot, step))
        out["groups"] = {str(slot): step for slot, (_, step) in self.computed.items()}
        out["log"] = {str(slot): self.log.oldest(slot) for slot in self.computed}
        return out

    def _dest_factory(self, holder):
        if holder == "disk":
            root = self.cfg.replica_dir
            return lambda: DiskTransport(root)
        epoch, cfg = self.epoch, self.cfg
        return lambda: RemoteHostTransport(self.connect(), self.inc, int(holder), namespace=_rep_namespace(epoch, self.inc, holder),
                                           timeout_s=cfg.recovery_timeout_s, heartbeat_s=cfg.heartbeat_s,
                                           dead_after_s=cfg.deadline_s)

    def _restore(self, plan: dict, stage: int, infos: list[GroupInfo]) -> tuple[dict, dict]:
        """Restore ``infos`` from where the plan says stage ``stage``'s replica is."""
        src = (plan["restore"].get(str(stage)) or {}).get("from")
        t0 = wall()
        if src is None:
            return {}, {"from": None, "bytes": 0, "seconds": 0.0, "groups": 0}
        linked = src not in ("disk", "local")
        if src == "disk":
            source = DiskTransport(self.cfg.replica_dir)
        elif src == "local":
            source = self.holder.store
        else:
            epoch, cfg = self.epoch, self.cfg
            source = interruptible(lambda: RemoteHostTransport(
                self.connect(), self.inc, int(src), namespace=f"ft/restore/e{epoch}", timeout_s=cfg.recovery_timeout_s,
                heartbeat_s=cfg.heartbeat_s, dead_after_s=cfg.deadline_s), self.interrupt)
        try:
            restored, stats = restore_groups(self.rt, source, infos, lambda g: session_name(self.phase, stage, g),
                                             linked=linked, interrupt=self.interrupt,
                                             after_first=lambda: self.check_kill("recover"),
                                             earlier_outputs=self.log.steps - 1)
        finally:
            if linked:
                source.close()
        if src == "local":
            self.holder.drop(f"ft/p{self.phase}/s{stage}/")
        return restored, {"from": src, "groups": len(restored), "t0": t0, "t1": wall(), **stats}

    def drop_slot(self, slot: int) -> None:
        """Forget a microbatch on this stage: its KV, its replica, its logged outputs."""
        group = self.computed.pop(slot, (None,))[0]
        self.rt.release(slot)
        self.log.drop(slot)
        if group is not None and self.replicator is not None:
            self.replicator.release(group)

    # -- as a holder ---------------------------------------------------------------------------------
    def _hold(self, plan: dict, stages: list) -> None:
        """Receive from every primary whose replica the plan gives this process; send restores it asks for."""
        holders = plan["holders"]
        mine = {q: stages[q] for q, h in enumerate(holders) if h == self.inc}
        for q, primary in mine.items():
            if self.holding.get(q) != primary:
                cfg, epoch = self.cfg, self.epoch
                self.holder.accept(primary, lambda on_chunk, p=primary: RemoteHostTransport(
                    self.connect(), self.inc, p, namespace=_rep_namespace(epoch, p, self.inc), timeout_s=cfg.recovery_timeout_s,
                    heartbeat_s=cfg.heartbeat_s, dead_after_s=cfg.deadline_s, on_chunk=on_chunk))
        self.holder.forget({p for q, p in self.holding.items() if mine.get(q) != p})
        self.holding = mine
        for q, how in plan["restore"].items():
            if how and how.get("from") == self.inc:
                self._send_restore(plan, int(q))

    def _send_restore(self, plan: dict, q: int) -> None:
        """Send stage ``q``'s replica sessions of the plan's microbatches to its replacement (on a thread)."""
        target, epoch, phase = plan["stages"][q], self.epoch, self.phase
        names = [session_name(phase, q, g["group"]) for g in plan["groups"]]
        layers = plan["layers"][q]
        num_layers = plan["num_layers"]

        def _send() -> None:
            link = None
            try:
                link = RemoteHostTransport(self.connect(), self.inc, target, namespace=f"ft/restore/e{epoch}",
                                           timeout_s=self.cfg.recovery_timeout_s, heartbeat_s=self.cfg.heartbeat_s,
                                           dead_after_s=self.cfg.deadline_s)
                self.holder.send(names, link, num_layers=num_layers, kv_layers=list(range(*layers))).wait()
            except (KVStreamError, TimeoutError):
                pass  # the replacement died: the next plan tells what to do
            finally:
                if link is not None:
                    try:
                        link.close()
                    except KVStreamError:
                        pass

        threading.Thread(target=_send, name=f"kvstream-restore-send-{q}", daemon=True).start()

    # -- the end -------------------------------------------------------------------------------------
    def finish(self) -> None:
        """Write this process's log to the store and stop its threads."""
        self._abort_links()
        doc = dict(self.doc, stage=self.stage, holder_peak_bytes=self.holder.peak_bytes,
                   holder_end_bytes=self.holder.held_bytes)
        if self.replicator is not None:
            for group in list(self.replicator.sessions):  # a release still on its way when the run stopped
                self.replicator.release(group)
            doc["replication"] = dict(self.replicator.stats, unprotected=self.replicator.lost)
            self.replicator.close()
        self.store.set(f"doc/{self.inc}", json.dumps(doc))
        self.holder.close()
        self.plans.stop()
        self.live.stop()


def _rep_namespace(epoch: int, primary: int, holder: int) -> str:
    """Store prefix of the replication link from ``primary`` to ``holder`` made in ``epoch`` (two processes can
    hold each other's replicas: one link per direction)."""
    return f"ft/rep/e{epoch}/{primary}-to-{holder}"


def worker_main(cfg: FailoverConfig, inc: int, first_epoch: int, host: str, port: int) -> int:
    """The body of a worker process (``python -m kvstream.serving.failover --worker ...``)."""
    torch.set_num_threads(max(1, cfg.threads))
    Worker(cfg, inc, first_epoch, host, port).run()
    return 0


__all__ = ["CONTROLLER", "Worker", "worker_main"]
