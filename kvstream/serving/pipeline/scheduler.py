"""Stage 0's loop: microbatches round-robin through the pipeline, requests joining and leaving.

Requests come from :mod:`kvstream.serving.loadgen` (Poisson arrivals) grouped into microbatches of
``batch`` requests (:func:`~kvstream.serving.loadgen.microbatches`: DéjàVu's fixed microbatches; a group is
ready when its last request arrived). Up to ``M`` microbatch *slots* are in flight:

* a free slot takes the next ready group (if :class:`Admission` allows) and prefills it: the padded
  prompt, left-padded like ``generate``'s batched input;
* stage 0 runs the slots round-robin: the next slot after the last one run whose previous step came
  back (its tokens arrived over the ring); with ``D`` stages and ``M >= D`` slots every stage is busy;
* when a step's tokens arrive, a request that has all its tokens **leaves** its microbatch: the next
  step keeps only the other rows (``keep``), on every stage. A microbatch whose rows all left frees its
  slot (``RELEASE`` down the pipeline) and a waiting group **joins** there at that boundary.

Every request generates exactly its ``max_new_tokens`` (EOS suppressed, as ``generate(min_new_tokens=N)``),
so its tokens can be compared with single-process ``generate`` of the same padded microbatch.

Admission with a KV budget (per stage, DéjàVu's memory model): without swapping a group joins only if the
peak KV of every active group (prompt + all its tokens) fits; with ``--swap`` up to ``M`` groups join and
the stages swap; with ``--swap auto`` a group beyond what fits joins only while the swap-in is predicted to
hide, ``K / (B_pcie * t_step) <= 1`` with ``t_step`` the slowest stage's last measured step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ...errors import ConfigError
from ..loadgen import Completion, Request
from ..worker import pad_left
from .engine import StageRuntime
from .links import DECODE, PREFILL, RELEASE, STOP, Header, Links


@dataclass
class Admission:
    """Whether a microbatch may join (see the module docstring).

    Parameters
    ----------
    mode : {"off", "on", "auto"}
        Swapping: never, always (as needed), or when predicted to hide.
    budget_bytes : int, optional
        KV bytes per stage (``None``: no bound, every group joins).
    token_bytes : int
        KV bytes of one token of one row on the largest stage.
    layers : int
        Layers of the largest stage (one layer's old copy lives during an update).
    bandwidth_bytes_per_s : float
        ``B_pcie`` of the prediction.
    """

    mode: str
    budget_bytes: int | None
    token_bytes: int
    layers: int
    bandwidth_bytes_per_s: float

    def peak_bytes(self, group: Sequence[Request]) -> int:
        """The group's KV on the largest stage at its longest (padded prompt + the most tokens any row makes)."""
        width = max(r.prompt_tokens for r in group)
        return len(group) * (width + max(r.max_new_tokens for r in group)) * self.token_bytes

    def need_bytes(self, group: Sequence[Request]) -> int:
        """What the group needs alone: its peak and one layer's old copy during an update."""
        peak = self.peak_bytes(group)
        return peak + peak // max(1, self.layers)

    def allows(self, group: Sequence[Request], active: Sequence[Sequence[Request]], t_step_s: float) -> bool:
        """Whether ``group`` may join the ``active`` groups."""
        if self.budget_bytes is None or self.mode == "on":
            return True
        fits = sum(self.peak_bytes(g) for g in active) + self.need_bytes(group) <= self.budget_bytes
        if fits or self.mode == "off":
            return fits
        return t_step_s > 0 and self.peak_bytes(group) / (self.bandwidth_bytes_per_s * t_step_s) <= 1.0


@dataclass
class Microbatch:
    """A microbatch at stage 0: its requests, the rows still generating, their tokens so far."""

    requests: list[Request]
    ids: torch.Tensor
    mask: torch.Tensor | None
    active: list[int]
    tokens: dict[int, list[int]] = field(default_factory=dict)
    next_ids: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    in_flight: bool = False
    start_s: float = 0.0
    first_s: float | None = None

    @property
    def width(self) -> int:
        """Padded prompt length."""
        return self.ids.shape[1]

    @property
    def cap_tokens(self) -> int:
        """Prompt width plus the most tokens a row generates."""
        return self.width + max(r.max_new_tokens for r in self.requests)


class Scheduler:
    """Stage 0: admission, round-robin, the ring, completions (see the module docstring).

    Parameters
    ----------
    rt : StageRuntime or None
        Stage 0's runtime (``None``: a scheduler that computes nothing itself, as the failover controller,
        which overrides :meth:`_run` and :meth:`_finished`).
    links : Links
        Its links (unused with one stage).
    slots : int
        ``M``, microbatches in flight.
    admission : Admission
        Who may join.
    progress : callable, optional
        ``progress(done_requests, generated_tokens)`` after every completion.
    clock : callable, optional
        Seconds since the run's start, shared with other processes (:mod:`.disagg`); default: this
        process's clock from :meth:`run`.
    """

    def __init__(self, rt: StageRuntime | None, links: Links, *, slots: int, admission: Admission,
                 progress: Callable[[int, int], None] | None = None, clock: Callable[[], float] | None = None):
        if slots < 1:
            raise ConfigError(f"--microbatches must be >= 1, got {slots}")
        self.rt, self.links, self.admission = rt, links, admission
        self.single = rt is not None and rt.stage.last
        self.slots: list[Microbatch | None] = [None] * slots
        self.progress = progress
        self.completions: list[Completion] = []
        self.outputs: dict[int, list[int]] = {}
        self.t_step_s = 0.0
        self._last = -1
        self._seq = 0
        self._t0 = time.perf_counter()
        self._record = True
        self._clock = clock

    def clock(self) -> float:
        """Seconds since the run's start."""
        return self._clock() if self._clock is not None else time.perf_counter() - self._t0

    # one microbatch -----------------------------------------------------------------------------------
    def _open(self, slot: int, group: list[Request]) -> None:
        ids, mask = pad_left(group, torch.device("cpu"))
        self.slots[slot] = Microbatch(group, ids, None if bool((mask == 1).all()) else mask,
                                      active=list(range(len(group))), tokens={r.id: [] for r in group})

    def _launch(self, slot: int) -> None:
        self._seq += 1
        self._run(slot, *self._next_step(slot, self._seq if self._record else -self._seq))

    def _next_step(self, slot: int, seq: int) -> tuple[Header, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The next step of ``slot``'s microbatch: ``(header, token ids [rows, T], prompt mask, kept rows)``."""
        mb = self.slots[slot]
        if mb.next_ids is None:
            mb.start_s = self.clock()
            h = Header(PREFILL, slot=slot, seq=seq, rows=len(mb.requests), tokens=mb.width,
                       has_mask=int(mb.mask is not None), cap_tokens=mb.cap_tokens)
            return h, mb.ids, mb.mask, None
        keep = mb.keep
        h = Header(DECODE, slot=slot, seq=seq, rows=len(mb.active), tokens=1, keep=-1 if keep is None else keep.numel())
        return h, mb.next_ids, None, keep

    def _run(self, slot: int, h: Header, x: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None) -> None:
        """Run the step on stage 0 and pass it on (one stage: its tokens are back at once)."""
        out = self.rt.step(h, x.to(self.rt.device), mask, keep)
        self._last = slot
        if self.single:
            self._arrived(slot, self.rt.t_step_us(), out)
            return
        h.t_step_us = self.rt.t_step_us()
        self.links.send_next(h, mask, keep, out)
        self.slots[slot].in_flight = True

    def _arrived(self, slot: int, t_step_us: int, tokens: torch.Tensor) -> None:
        """A step's tokens came back: append them; rows that are done leave; an empty microbatch frees its slot."""
        mb = self.slots[slot]
        mb.in_flight = False
        self.t_step_s = t_step_us / 1e6
        if mb.first_s is None:
            mb.first_s = self.clock()
        self._append(slot, tokens.to("cpu").tolist())

    def _append(self, slot: int, toks: list[int]) -> None:
        mb = self.slots[slot]
        now = self.clock()
        still = []
        for pos, i in enumerate(mb.active):
            req = mb.requests[i]
            mb.tokens[req.id].append(int(toks[pos]))
            if len(mb.tokens[req.id]) < req.max_new_tokens:
                still.append((pos, i))
            elif self._record:
                self.outputs[req.id] = mb.tokens[req.id]
                self.completions.append(Completion(id=req.id, arrival_s=req.arrival_s, start_s=mb.start_s,
                                                   first_token_s=mb.first_s, finish_s=now,
                                                   prompt_tokens=req.prompt_tokens, output_tokens=req.max_new_tokens))
                if self.progress is not None:
                    self.progress(len(self.completions), sum(c.output_tokens for c in self.completions))
        if not still:
            self.slots[slot] = None
            self._finished(slot)
            return
        mb.keep = None if len(still) == len(mb.active) else torch.tensor([p for p, _ in still], dtype=torch.int64)
        mb.next_ids = torch.tensor([[toks[p]] for p, _ in still], dtype=torch.int64)
        mb.active = [i for _, i in still]

    def _finished(self, slot: int) -> None:
        """Every row of ``slot``'s microbatch is done: free it on every stage."""
        self.rt.release(slot)
        if not self.single:
            self.links.send_next(Header(RELEASE, slot=slot))

    # the loop -----------------------------------------------------------------------------------------
    def _pick(self) -> int | None:
        n = len(self.slots)
        for k in range(1, n + 1):
            s = (self._last + k) % n
            if self.slots[s] is not None and not self.slots[s].in_flight:
                return s
        return None

    def _admit(self, pending: deque) -> None:
        while pending and None in self.slots and self._ready(pending[0]):
            active = [mb.requests for mb in self.slots if mb is not None]
            if not self.admission.allows(pending[0], active, self.t_step_s):
                if not active:
                    raise ConfigError(f"a microbatch of {len(pending[0])} requests needs "
                                      f"{self.admission.need_bytes(pending[0])} bytes of KV per stage, over the "
                                      f"budget of {self.admission.budget_bytes} bytes")
                return
            self._start(self.slots.index(None), list(pending.popleft()))

    def _ready(self, group: Sequence[Request]) -> bool:
        """Whether the next group may start now: its last request arrived."""
        return group[-1].arrival_s <= self.clock()

    def _start(self, slot: int, group: list[Request]) -> None:
        """Put the next group in a free slot (here: to be prefilled)."""
        self._open(slot, group)

    def run(self, groups: Sequence[Sequence[Request]], *, record: bool = True) -> None:
        """Serve ``groups`` (microbatches, in arrival order) to completion; arrivals are relative to now.

        ``record=False`` runs a warm-up: nothing lands in :attr:`completions`, and the steps carry negative
        sequence numbers so that the stages leave them out of their logs.
        """
        self._record = record
        self._t0 = time.perf_counter()
        pending = deque(groups)
        while pending or any(mb is not None for mb in self.slots):
            self._admit(pending)
            slot = self._pick()
            if slot is not None:
                self._launch(slot)
            elif any(mb is not None and mb.in_flight for mb in self.slots):
                self._receive()
            elif pending:
                self._idle(pending)

    def _receive(self) -> None:
        """Wait for the next step's tokens over the ring."""
        slot, _, t_us, tokens = self.links.recv_ring()
        self._arrived(slot, t_us, tokens)

    def _idle(self, pending: deque) -> None:
        """Nothing to run: wait a little for the next arrival."""
        time.sleep(min(0.01, max(0.0, pending[0][-1].arrival_s - self.clock())))

    def stop(self) -> None:
        """End every stage's loop."""
        if not self.single:
            self.links.send_next(Header(STOP))


__all__ = ["Admission", "Microbatch", "Scheduler"]
