"""A stage serving steps in a failover run: compute what it lacks, replay what it has, replicate as it goes.

Every step carries its microbatch's step number (``StepHeader.step``: 0 its prefill, ``k`` its ``k``-th decode
step). A stage that already computed step ``k`` (a survivor during a replay after a recovery) does not
compute it again: it passes on the output it kept (:class:`OutputLog`: the last ``window + 3`` outputs of
every microbatch), or no payload when it has none left and the next stage does not need one. A stage that
has not computed ``k`` computes it — a replacement catching up from its restored step, or any stage on the
first pass — after waiting, at most ``window`` steps ahead, for its replica to catch up (backpressure that
bounds the replay), while the replicator streams the step's KV out. Nothing whose KV was acknowledged is
computed again: each computed step is checked against the acknowledged floor the plan gives, and any
that is counted in ``recomputed_tokens``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from ...errors import KVStreamError
from ..pipeline.links import DECODE, KIND_NAMES, PREFILL, RELEASE, STOP


class ReplayGap(KVStreamError):
    """A stage must compute a step but received no input for it (its predecessor's log did not reach back)."""


class OutputLog:
    """The last ``steps`` outputs of every microbatch on a stage (hidden states, or the last stage's tokens)."""

    def __init__(self, steps: int):
        self.steps = int(steps)
        self._log: dict[int, deque] = {}

    def put(self, slot: int, step: int, out: torch.Tensor) -> None:
        """Keep ``out``, the output of ``slot``'s ``step``."""
        self._log.setdefault(slot, deque(maxlen=self.steps)).append((step, out))

    def get(self, slot: int, step: int) -> torch.Tensor | None:
        """The kept output of ``slot``'s ``step``, or ``None``."""
        for k, out in self._log.get(slot, ()):
            if k == step:
                return out
        return None

    def oldest(self, slot: int) -> int | None:
        """The oldest step of ``slot`` whose output is kept (``None``: none is)."""
        log = self._log.get(slot)
        return log[0][0] if log else None

    def drop(self, slot: int) -> None:
        """Forget ``slot``'s outputs."""
        self._log.pop(slot, None)

    def clear(self) -> None:
        """Forget everything."""
        self._log.clear()


def serve(w: Any) -> None:
    """Serve steps on worker ``w``'s stage until the next plan interrupts (:class:`~.epoch.Reconfigure`)."""
    stage, links = w.rt.stage, w.links
    while True:
        h, mask, keep, x = links.recv_prev(torch.int64 if stage.first else stage.dtype,
                                           None if stage.first else stage.hidden_size)
        if h.kind in (RELEASE, STOP):
            if h.kind == RELEASE and h.slot in w.computed:
                w.drop_slot(h.slot)
            if not stage.last:
                links.send_next(h)
            continue
        out = step(w, h, x, mask, keep)
        h.t_step_us = max(h.t_step_us, w.rt.t_step_us())
        if stage.last:
            links.send_ring(h.slot, h.seq, h.t_step_us, out if out is not None else torch.zeros(0, dtype=torch.int64))
        else:
            h.payload = int(out is not None)
            links.send_next(h, mask, keep if h.kind == DECODE else None, out)


def step(w: Any, h, x: torch.Tensor | None, mask: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor | None:
    """One step of ``h.slot``'s microbatch on ``w``'s stage: computed, or replayed from the log."""
    group, k = h.group, h.step
    done = w.computed.get(h.slot)
    if done is not None and done[0] != group:  # a finished microbatch's slot, taken by a new one
        w.drop_slot(h.slot)
        done = None
    last = -1 if done is None else done[1]
    if k <= last:
        return w.log.get(h.slot, k)
    if x is None or k != last + 1:
        raise ReplayGap(f"stage {w.stage}: step {k} of microbatch {group} has no input (it has step {last})")
    rep = w.replicator
    rep.enabled = bool(h.replicate)
    kind = KIND_NAMES[h.kind]
    if h.replicate and k > w.cfg.window:
        rep.wait_acked(group, k - w.cfg.window - 1, w.cfg.deadline_s)
    if h.kind == PREFILL:
        w.prefills += 1
        w._die_in_prefill = next((s for s in w.kills if s.when == "prefill" and not s.holder and s.step == w.prefills),
                                 None)
        if w._die_in_prefill is not None:
            w.kills.remove(w._die_in_prefill)
    elif keep is not None:
        rep.select(group, keep)
    rep.begin(group, kind, k, h.tokens, h.rows)
    out = w.rt.step(h, x.to(w.device) if x.device != w.device else x, mask, keep)
    rep.end(w.rt.slots[h.slot].kv.cache.kv_layers(), out)
    phase = str(w.phase)
    if k <= w.floors.get(group, -1):
        w.doc["recomputed_tokens"][phase] = w.doc["recomputed_tokens"].get(phase, 0) + h.rows * h.tokens
    w.doc["steps"][phase] = w.doc["steps"].get(phase, 0) + 1
    w.computed[h.slot] = (group, k)
    w.log.put(h.slot, k, out)
    if h.kind == DECODE:
        w.check_kill("decode", k)
    return out


__all__ = ["ReplayGap", "OutputLog", "serve", "step"]
