"""The stages' wire: process groups from torchrun's environment and point-to-point step messages.

Every stage is one process of a ``torch.distributed`` job (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``, as ``torchrun`` sets them; stage = rank). Two process groups:

* **data** (NCCL on CUDA, gloo on the CPU): hidden states ``[B, T, hidden]`` from stage ``s`` to ``s + 1``;
* **control** (always gloo, its own communicator even on the CPU, so that a control receive posted
  early never matches a data message of the same pair; CPU tensors): a fixed-size int64 header per step (:class:`Header`), the
  prompt's attention mask and the kept rows with it, and the *ring* from the last stage back to stage 0:
  the sampled tokens of a microbatch step.

Data flows one way on every data pair (``s -> s + 1``), so NCCL sends never wait on a reverse send of the
same pair; the ring goes over gloo. Sends are ``isend`` (nothing blocks on a busy receiver; handles are
kept until they complete); receives block, bounded by the groups' timeout. With ``WORLD_SIZE = 1`` no
group is made and no link is used: the one stage is first and last.

Gloo completes a send or a receive only inside its ``wait()`` (``is_completed()`` stays false until then),
so sends in flight are waited for once more than :data:`MAX_PENDING` are outstanding (the oldest first).

Links can also run over groups made elsewhere (``groups=``: two gloo groups, as the failover engine makes
one pair per configuration, :mod:`kvstream.serving.failover`): CUDA tensors then cross through host memory,
and with ``interrupt`` every receive runs on a thread of its own while the caller waits, calling
``interrupt()`` (which raises to abandon the wait). An abandoned gloo receive cannot be cancelled (and
``abort()`` does not wake it), so :meth:`Links.abort` sends :data:`CLOSE` downstream — the next rank's
pending receive ends with :class:`LinkClosed` — before it aborts both communicators; a receive from a
rank that died ends when its connection closes.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, fields
from datetime import timedelta

import torch

from ...errors import ConfigError, PeerError

#: Step kinds (``JOIN``: a microbatch prefilled elsewhere joins with its KV, :mod:`.disagg`; ``CLOSE``: the
#: sender left this configuration, nothing more comes).
PREFILL, DECODE, RELEASE, STOP, JOIN, CLOSE = 1, 2, 3, 4, 5, 6
KIND_NAMES = {PREFILL: "prefill", DECODE: "decode", RELEASE: "release", STOP: "stop", JOIN: "join", CLOSE: "close"}
#: Sends in flight before the oldest is waited for (gloo reports a send complete only in ``wait()``).
MAX_PENDING = 64


#: Sends (and their groups) of configurations that were left: gloo needs them alive until the peer took them.
_ABANDONED: list = []


class LinkClosed(PeerError):
    """The previous rank left this configuration (it sent :data:`CLOSE`): nothing more comes on these links."""


@dataclass
class Header:
    """One step's header (int64 on the wire, :data:`HEADER_LEN` values).

    ``kind`` (:data:`PREFILL`, ...), ``slot`` (microbatch slot), ``seq`` (step number at stage 0),
    ``rows`` (batch rows of this step, after ``keep``), ``tokens`` (new tokens per row: the padded prompt
    width or 1), ``has_mask`` (prefill: a ``[rows, tokens]`` mask follows), ``keep`` (decode: the number
    of kept-row indices that follow, or -1 for all rows), ``cap_tokens`` (prefill: prompt width plus the
    most tokens a row generates: host mirrors are sized once), ``t_step_us`` (the largest recent compute
    time of a step over the stages passed, microseconds: stage 0's admission in ``--swap auto``),
    ``group`` (the microbatch's index in the workload) and ``start_us`` (when its prefill started, µs
    after the run's start: disaggregation's time to first token).
    """

    kind: int
    slot: int = 0
    seq: int = 0
    rows: int = 0
    tokens: int = 0
    has_mask: int = 0
    keep: int = -1
    cap_tokens: int = 0
    t_step_us: int = 0
    group: int = -1
    start_us: int = 0

    def to_tensor(self) -> torch.Tensor:
        """The header as an int64 CPU tensor ``[HEADER_LEN]``."""
        return torch.tensor([getattr(self, f.name) for f in fields(self)], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Header":
        """Inverse of :meth:`to_tensor`."""
        return cls(*[int(v) for v in t.tolist()])


HEADER_LEN = len(fields(Header))
#: Ring message prefix: slot, seq, t_step_us, rows; the rows' tokens follow (slot -1: :data:`CLOSE`).
RING_LEN = 4


class _Receiver:
    """A thread that runs receives one after the other, so that the caller can wait for each while calling an
    ``interrupt`` (a gloo receive completes only inside its blocking ``wait()``)."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kvstream-links-recv", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            buf, src, group, done, box = job
            try:
                group.recv([buf], src, 0).wait()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                box.append(e)
            done.set()

    def recv(self, buf: torch.Tensor, src: int, group, interrupt, timeout_s: float) -> None:
        """Receive into ``buf``; raises what ``interrupt()`` raises, the receive's error, or TimeoutError."""
        done, box = threading.Event(), []
        self._jobs.put((buf, src, group, done, box))
        deadline = time.monotonic() + timeout_s
        while not done.wait(0.002):
            interrupt()
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing from rank {src} within {timeout_s} s")
        if box:
            raise box[0]

    def stop(self) -> None:
        """Let the thread end after the receive it may be blocked in."""
        self._jobs.put(None)


@dataclass(frozen=True)
class Env:
    """This process's place in the job (from torchrun's variables)."""

    rank: int
    world: int
    local_rank: int


def env_from_os() -> Env:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (default: a single process).

    Raises
    ------
    ConfigError
        If the variables are malformed, or ``WORLD_SIZE > 1`` without ``MASTER_ADDR``/``MASTER_PORT``.
    """
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {e}") from None
    if world > 1 and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        raise ConfigError("a pipeline of several stages needs MASTER_ADDR and MASTER_PORT (as torchrun sets them)")
    if not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} outside WORLD_SIZE {world}")
    return Env(rank, world, local)


class Links:
    """One stage's links: from the previous stage, to the next one, and the ring (last -> first).

    Parameters
    ----------
    env : Env
        This process's rank and world size.
    device : torch.device
        The stage's device (CUDA: the data group is NCCL).
    timeout_s : float
        Bound on every receive (the groups' timeout).
    max_rows : int
        Most rows of a microbatch: ring messages have this fixed size (gloo matches sizes exactly).
    ranks : range, optional
        The ranks of this pipeline (default all): prompt and token pipelines of :mod:`.disagg` share one job.
    groups : (ProcessGroup, ProcessGroup), optional
        Gloo groups ``(data, control)`` of ``env.world`` ranks made by the caller (who also destroys them):
        no process group is initialized here, CUDA tensors go through host memory.
    interrupt : callable, optional
        Called while a receive waits; raises to abandon it (a reconfiguration).
    header : type
        The step header class (:class:`Header` or a dataclass subclass with more int fields; one with a
        ``payload`` field sends hidden states only when it is 1).

    Raises
    ------
    ConfigError
        If the process group cannot be formed (the error from torch.distributed, in one line).
    """

    def __init__(self, env: Env, device: torch.device, timeout_s: float, max_rows: int, ranks: range | None = None,
                 *, groups: tuple | None = None, interrupt=None, header: type = Header):
        import torch.distributed as dist

        self.env, self.device, self.max_rows = env, device, int(max_rows)
        self.timeout_s = float(timeout_s)
        self.ranks = ranks if ranks is not None else range(env.world)
        self.prev = env.rank - 1 if env.rank > self.ranks.start else None
        self.next = env.rank + 1 if env.rank < self.ranks.stop - 1 else None
        self._pending: list[tuple] = []
        self.data = self.control = None
        self.header, self.interrupt = header, interrupt
        self._header_len = len(fields(header))
        self._owned = groups is None
        self._staged = groups is not None and device.type == "cuda"
        self._receiver = _Receiver() if interrupt is not None and env.world > 1 else None
        if env.world == 1:
            return
        if groups is not None:
            self.data, self.control = groups
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, rank=env.rank, world_size=env.world, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"cannot form the stages' process group ({backend}): {e}") from None
        self.data = dist.group.WORLD
        self.control = dist.new_group(backend="gloo")  # its own communicator: never matched with data messages

    # sending ------------------------------------------------------------------------------------------
    def _isend(self, t: torch.Tensor, dst: int, group) -> None:
        import torch.distributed as dist

        if self._staged and t.is_cuda:
            t = t.to("cpu")
        # groups made here go through torch.distributed (global ranks) as before; groups made elsewhere are
        # not registered with it, and are addressed directly (their own ranks)
        work = dist.isend(t, dst, group=group) if self._owned else group.send([t], dst, 0)
        self._pending.append((work, t))
        self._pending = [(w, x) for w, x in self._pending if not w.is_completed()]
        while len(self._pending) > MAX_PENDING:
            self._pending.pop(0)[0].wait()

    def _recv(self, t: torch.Tensor, src: int, group) -> torch.Tensor:
        """Receive into ``t`` (through host memory when staged; on the receiver thread with ``interrupt``)."""
        buf = torch.empty_like(t, device="cpu") if self._staged and t.is_cuda else t
        import torch.distributed as dist

        if self._receiver is not None:
            self._receiver.recv(buf, src, group, self.interrupt, self.timeout_s)
        elif self._owned:
            dist.recv(buf, src, group=group)
        else:
            group.recv([buf], src, 0).wait()
        if buf is not t:
            t.copy_(buf)
        return t

    def send_next(self, header: Header, mask: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                  hidden: torch.Tensor | None = None) -> None:
        """Send a step (header; then the prompt mask, the kept rows and the hidden states, as present)."""
        self._isend(header.to_tensor(), self.next, self.control)
        if mask is not None:
            self._isend(mask.to("cpu", torch.int64).contiguous(), self.next, self.control)
        if keep is not None:
            self._isend(keep.to("cpu", torch.int64).contiguous(), self.next, self.control)
        if hidden is not None:
            self._isend(hidden.contiguous(), self.next, self.data)

    def send_ring(self, slot: int, seq: int, t_step_us: int, tokens: torch.Tensor) -> None:
        """Send a step's sampled tokens ``[rows]`` back to stage 0."""
        msg = torch.zeros(RING_LEN + self.max_rows, dtype=torch.int64)
        msg[:RING_LEN] = torch.tensor([slot, seq, t_step_us, tokens.numel()])
        msg[RING_LEN:RING_LEN + tokens.numel()] = tokens.to("cpu", torch.int64)
        self._isend(msg, self.ranks.start, self.control)

    # receiving ----------------------------------------------------------------------------------------
    def recv_prev(self, dtype: torch.dtype, hidden_size: int | None
                  ) -> tuple[Header, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Receive a step from the previous stage: ``(header, mask, keep, hidden)`` (absent parts ``None``;
        ``hidden`` on the stage's device: ``[rows, tokens, hidden_size]``, or ``[rows, tokens]`` token ids
        when ``hidden_size`` is ``None``)."""
        h = self.header.from_tensor(self._recv(torch.empty(self._header_len, dtype=torch.int64), self.prev,
                                               self.control))
        if h.kind == CLOSE:
            raise LinkClosed(f"rank {self.prev} left this configuration")
        if h.kind in (RELEASE, STOP):
            return h, None, None, None
        mask = keep = None
        if h.kind in (PREFILL, JOIN) and h.has_mask:
            mask = self._recv(torch.empty(h.rows, h.tokens, dtype=torch.int64), self.prev, self.control)
        if h.kind == DECODE and h.keep >= 0:
            keep = self._recv(torch.empty(h.keep, dtype=torch.int64), self.prev, self.control)
        if h.kind == JOIN or not getattr(h, "payload", 1):
            return h, mask, keep, None
        shape = (h.rows, h.tokens) if hidden_size is None else (h.rows, h.tokens, hidden_size)
        hidden = self._recv(torch.empty(shape, dtype=dtype, device=self.device), self.prev, self.data)
        return h, mask, keep, hidden

    def recv_ring(self) -> tuple[int, int, int, torch.Tensor]:
        """Receive one step's tokens at stage 0: ``(slot, seq, t_step_us, tokens [rows] int64)``."""
        raw = self._recv(torch.empty(RING_LEN + self.max_rows, dtype=torch.int64), self.ranks.stop - 1, self.control)
        slot, seq, t_us, rows = (int(v) for v in raw[:RING_LEN].tolist())
        if slot == -1:
            raise LinkClosed(f"rank {self.ranks.stop - 1} left this configuration")
        return slot, seq, t_us, raw[RING_LEN:RING_LEN + rows].clone()

    def send_tensor(self, t: torch.Tensor, dst: int) -> None:
        """Send one tensor to any rank of the job over the data group (:mod:`.disagg`: KV to a token stage)."""
        self._isend(t.contiguous(), dst, self.data)

    def recv_tensor(self, shape, dtype: torch.dtype, src: int) -> torch.Tensor:
        """Receive one tensor sent with :meth:`send_tensor`, on the stage's device."""
        return self._recv(torch.empty(shape, dtype=dtype, device=self.device), src, self.data)

    def gather(self, doc: dict, dst: int = 0) -> list[dict] | None:
        """Every rank's ``doc`` at rank ``dst`` (``None`` elsewhere)."""
        if self.env.world == 1:
            return [doc]
        import torch.distributed as dist

        out = [None] * self.env.world if self.env.rank == dst else None
        dist.gather_object(doc, out, dst=dst, group=self.control)
        return out

    def broadcast(self, value, src: int = 0):
        """``value`` of rank ``src`` on every rank (a picklable object)."""
        if self.env.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=src, group=self.control)
        return box[0]

    def abort(self) -> None:
        """Leave this configuration (groups made elsewhere): send :data:`CLOSE` downstream (the next rank, or
        the ring's first from the last) without waiting for it (a gloo send completes only once the peer
        posts its receive, which a peer that left never does), then abort both communicators."""
        self._pending = []
        if self.env.world == 1:
            return
        close = None
        if self.next is not None:
            close = (self.header(CLOSE).to_tensor(), self.next)
        elif self.env.rank != self.ranks.start:
            close = (torch.zeros(RING_LEN + self.max_rows, dtype=torch.int64), self.ranks.start)
            close[0][0] = -1
        if close is not None:
            try:  # kept referenced: a gloo operation must outlive its Work
                _ABANDONED.append((self.control.send([close[0]], close[1], 0), close[0], self.control, self.data))
            except RuntimeError:
                pass  # the next rank is gone already
        for group in (self.data, self.control):
            if group is not None and hasattr(group, "abort"):
                group.abort()
        if self._receiver is not None:
            self._receiver.stop()

    def close(self) -> None:
        """Wait for the sends in flight, then leave the process group (one this object made)."""
        for work, _ in self._pending:
            work.wait()
        self._pending = []
        if self.env.world > 1 and self._owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier(group=self.control)
                dist.destroy_process_group()


__all__ = ["Header", "HEADER_LEN", "RING_LEN", "MAX_PENDING", "PREFILL", "DECODE", "RELEASE", "STOP", "JOIN", "CLOSE",
           "KIND_NAMES", "LinkClosed", "Env", "env_from_os", "Links"]
