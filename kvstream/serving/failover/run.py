"""A failover session: the processes started once, then *phases* (workloads) run through them, then the check.

A phase is one workload with its own failures to inject, its recovery mode (``restore`` from the replicas,
or ``recompute``: the baseline) and replication on or off; it starts with a plan of its own (so the
processes can change roles between phases) and ends when its last request finished. ``kvstream failover``
runs the failover phase, the baseline phase and a failure-free reference in one session; the GPU benchmark
alternates phases with replication on and off.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from ..pipeline.run import check
from .cluster import Cluster, Failed
from .config import FailoverConfig, KillSpec
from .controller import MAX_ATTEMPTS, Controller
from .epoch import wall


class FailoverSession:
    """The processes of a failover run and the phases run through them.

    Parameters
    ----------
    cfg : FailoverConfig
        The run.

    Examples
    --------
    >>> with FailoverSession(cfg) as session:                                           # doctest: +SKIP
    ...     doc = session.run_phase(workload(cfg), kills=["1@8"])
    ...     assert doc["recomputed_tokens"] == 0
    """

    def __init__(self, cfg: FailoverConfig):
        self.cfg = cfg
        self.cluster = Cluster(cfg)
        self.links = None
        self.docs: dict[int, dict] = {}
        self._pending: list = []  # found dead after the last phase's end: replaced when the next one starts

    def __enter__(self) -> "FailoverSession":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Start every process and wait until each built its model.

        Raises
        ------
        PeerError, Failed
            A process did not start.
        """
        incs = self.cluster.start()
        self.cluster.wait_ready(incs, self.cfg.recovery_timeout_s)

    def run_phase(self, groups: Sequence[Sequence], *, kills: Sequence[str] = (), mode: str = "restore",
                  replicate: bool = True, name: str = "", progress: Callable[[int, int], None] | None = None) -> dict:
        """Serve ``groups`` (microbatches of requests) with the failures ``kills`` injected.

        Returns
        -------
        dict
            The controller's record (:meth:`Controller.doc`) plus ``name``, ``mode``, ``replicate``,
            ``kills``, ``phase`` and ``seconds``.
        """
        cluster = self.cluster
        cluster.phase += 1
        specs = [KillSpec.parse(k, self.cfg.stages) for k in kills]
        if self.links is not None:
            self.links.abort()
        dead, self._pending = self._pending, []
        for _ in range(MAX_ATTEMPTS):
            if dead:
                cluster.replace_all([d[0] for d in dead])
            plan = cluster.publish(groups=[], restore={}, rebuild=[], reset=[], floors={},
                                   kills=cluster.kills_for(specs), dead=[d[0] for d in dead])
            try:
                cluster.collect(plan, self.cfg.recovery_timeout_s, everyone=True)
                self.links = cluster.form(plan, torch.device("cpu"), self.cfg.batch)
                break
            except Failed as f:
                dead = f.dead
        else:
            raise RuntimeError(f"failover: phase {cluster.phase} could not start")
        ctrl = Controller(cluster, self.links, self.cfg, specs=specs, mode=mode, replicate=replicate, progress=progress)
        t0 = time.perf_counter()
        ctrl.run(groups)
        self._pending = ctrl.settle()
        self.links = ctrl.links
        seconds = time.perf_counter() - t0
        doc = ctrl.doc()
        doc.update(name=name, mode=mode, replicate=replicate, kills=list(kills), phase=cluster.phase, seconds=seconds,
                   unfired=[s.text for s in ctrl.specs], end_t=wall(), replicas=cluster.held(self.cfg.deadline_s + 2.0))
        return doc

    def close(self) -> dict[int, dict]:
        """Stop every process; returns their logs ``{inc: doc}`` (also kept in :attr:`docs`)."""
        if self.links is not None:
            self.links.abort()
            self.links = None
        self.docs = self.cluster.close()
        return self.docs


def per_phase(docs: dict[int, dict], phase: int, key: str) -> int:
    """Sum of a per-phase counter (``recomputed_tokens``, ``steps``) over every process's log."""
    return sum(int(d.get(key, {}).get(str(phase), 0)) for d in docs.values())


def checks(cfg: FailoverConfig, groups: Sequence[Sequence], outputs: dict, model=None) -> list[dict]:
    """Every request's tokens against single-process ``generate`` of its padded microbatch (on the CPU in
    float32 for a CPU run; on the run's device otherwise)."""
    outs = {int(k): v for k, v in outputs.items()}
    return check(cfg, list(groups), outs, torch.device("cuda" if cfg.device == "cuda" else "cpu"), model)


__all__ = ["FailoverSession", "per_phase", "checks"]
