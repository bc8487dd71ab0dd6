"""A stage's KV replication: every microbatch's KV streamed out as it is produced, acknowledged by its holder.

Each microbatch on a stage is one *session* (:mod:`kvstream.streaming.session` keys and segments) named
``ft/p<phase>/s<stage>/g<group>``: the prompt's KV one chunk per layer, sent from the cache hook right after
that layer's update (while the later layers compute); each decode step's newest token of all the stage's
layers in one chunk; a row selection when requests leave; and after each step its output (``<session>/out/
<step>``: the hidden states passed on, or the last stage's token ids), the step's last chunk. A :class:`~kvstream.streaming.streamer.KVStreamer`
at level 3 packs each chunk on the compute stream and copies it to pinned host memory on a side stream,
gated on a CUDA event (the compute stream never waits), into a local *outbox*
(:class:`~kvstream.transports.host.HostTransport`). One thread forwards the outbox, in order, to the
destination — a :class:`~kvstream.transports.remote.RemoteHostTransport` into the holder's host memory, or a
:class:`~kvstream.transports.disk.DiskTransport` — and collects its acknowledgements: a step is *replicated*
once the last of its chunks was acknowledged. The acked step of every microbatch is published in the store
under ``ack/<stage>`` (JSON ``{"phase": p, "acked": {group: step}}``), where the controller reads it.

A lost destination (its holder died) makes the stage *unprotected*: chunks are dropped until a new
destination is set, after which every microbatch is rebuilt there (:meth:`Replicator.rebuild`: its whole KV as
one prompt-like segment of a fresh run).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...errors import KVStreamError
from ...handles import Handle
from ...layout import Region, kv_fingerprint
from ...streaming.session import Manifest, SessionRecorder
from ...streaming.streamer import KVStreamer
from ...transports.host import HostTransport

#: Bytes the outbox may hold at once (payload accounting; pinned memory is taken only as chunks need it).
OUTBOX_BYTES = 1 << 36
#: Fewest seconds between two publications of the acked steps.
PUBLISH_S = 0.02
#: Key suffix of the marker that frees a session at its holder.
RELEASE = "release"
#: Key part of a step's output chunks (:func:`output_key`).
OUTPUT = "out"


def phase_prefix(phase: int) -> str:
    """The key prefix of every replica session of ``phase``."""
    return f"ft/p{phase}/"


def session_name(phase: int, stage: int, group: int) -> str:
    """The replica session of microbatch ``group`` on ``stage`` in ``phase``."""
    return f"{phase_prefix(phase)}s{stage}/g{group}"


def output_key(session: str, step: int) -> str:
    """Key of the output of ``session``'s ``step`` (outside the session's segment keys)."""
    return f"{session}/{OUTPUT}/{step:06d}"


@dataclass
class _Session:
    """One microbatch's replica: its record, chunk meta, and the last step queued and acknowledged."""

    name: str
    recorder: SessionRecorder
    meta: dict
    acked: int = -1
    queued: int = -1


@dataclass
class _Job:
    """One outbox chunk on its way (or a release, or a new destination)."""

    key: str = ""
    handle: Handle | None = None
    session: _Session | None = None
    step: int | None = None  # the step this chunk completes
    release: str | None = None  # free this session at the destination
    connect: Callable[[], Any] | None = None  # build and use a new destination


class Replicator:
    """The replication of one stage process's microbatches (see the module docstring).

    Parameters
    ----------
    stage : int
        The stage; ``layers`` its layers (global ids).
    config : transformers.PretrainedConfig
        The model's config (the chunks carry its :func:`~kvstream.layout.kv_fingerprint`).
    dtype : torch.dtype
        The KV dtype.
    device : torch.device
        Where the stage's KV lives.
    store : torch.distributed.Store
        A connection of its own for the ``ack/<stage>`` publications.
    phase : int
        The current phase (part of the session names).
    """

    def __init__(self, *, stage: int, layers: range, config: Any, dtype: torch.dtype, device: torch.device, store,
                 phase: int):
        self.stage, self.layers, self.phase = stage, layers, phase
        self.model = kv_fingerprint(config, dtype)
        self.device = device
        self.outbox = HostTransport(OUTBOX_BYTES, pinned=device.type == "cuda")
        self.streamer = KVStreamer(self.outbox, level=3, device=device)
        self.store = store
        self.sessions: dict[int, _Session] = {}
        self.dest = None
        self.lost: str | None = None  # why the destination was lost, while unprotected
        self.enabled = True
        self.stats = {"chunks": 0, "bytes": 0, "dropped": 0, "rebuilds": 0, "acked_steps": 0, "losses": 0}
        self._now: tuple | None = None  # (session, kind, step, tokens, rows) of the step in progress
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._published = 0.0
        self._dirty = False
        self._thread = threading.Thread(target=self._forward_loop, name=f"kvstream-replicate-{stage}", daemon=True)
        self._thread.start()

    # -- destinations --------------------------------------------------------------------------------
    def connect(self, make: Callable[[], Any]) -> None:
        """Replicate to the transport ``make()`` builds from now on (built on the forwarding thread: a
        point-to-point transport waits there for its peer). Chunks queued before go to the old destination."""
        self._jobs.put(_Job(connect=make))

    # -- the step's chunks (compute thread) ----------------------------------------------------------
    def begin(self, group: int, kind: str, step: int, tokens: int, rows: int) -> None:
        """A step of ``group`` starts (``kind`` ``"prefill"`` or ``"decode"``); a prefill opens a new session."""
        if not self.enabled:
            self._now = None
            return
        if kind == "prefill":
            self.release(group)
            name = session_name(self.phase, self.stage, group)
            s = self.sessions[group] = _Session(name, SessionRecorder(name), self._meta(name, uuid.uuid4().hex))
            s.recorder.begin("layers", 0, tokens, rows)
        s = self.sessions.get(group)
        self._now = None if s is None else (s, kind, step, tokens, rows)

    def on_layer(self, slot: int, layer_idx: int, layer: Any) -> None:
        """The cache hook after ``layer_idx``'s update: a prefill streams that layer's whole KV now."""
        if self._now is None or self._now[1] != "prefill":
            return
        s, _, step, tokens, _ = self._now
        key = s.recorder.prefill_key(len(s.recorder.segments) - 1, layer_idx)
        h = self.streamer.scatter(key, [layer.keys], [layer.values], Region(layers=(0, 1), tokens=(0, tokens)),
                                  meta={**s.meta, "layer": layer_idx})
        self._queue(key, h, s, None)

    def end(self, kv_layers: list, out: torch.Tensor) -> None:
        """After the forward: a decode step streams the newest token of every stage layer in one chunk; then
        the step's output (``out``: hidden states, or the last stage's token ids) follows as the step's last
        chunk, so a step counts as replicated only once its KV and its output are at the holder (a
        replacement can pass on the output of a step it restored instead of computing it again)."""
        now, self._now = self._now, None
        if now is None:
            return
        s, kind, step, _, rows = now
        if kind == "decode":
            s.recorder.begin("all", 0, 1, rows)  # only the key numbering matters here: holders recover the rest
            key = s.recorder.end_step(list(self.layers))
            h = self.streamer.scatter_newest(key, [l.keys for l in kv_layers], [l.values for l in kv_layers],
                                             num_tokens=1, meta=s.meta)
            self._queue(key, h, s, None)
        key = output_key(s.name, step)
        self._queue(key, self.outbox.flush(key, out.contiguous(), meta={**s.meta, "step": step}), s, step)

    def select(self, group: int, keep: torch.Tensor) -> None:
        """Rows of ``group`` leave before its next step (``keep``: int64 row indices, CPU)."""
        s = self.sessions.get(group)
        if s is None or not self.enabled:
            return
        idx = keep.to("cpu", torch.int64).contiguous()
        key = s.recorder.rows("select", idx.numel())
        self._queue(key, self.streamer.flush(key, idx, meta=s.meta), s, None)

    def release(self, group: int) -> None:
        """``group`` finished (or restarts): free its replica at the destination."""
        s = self.sessions.pop(group, None)
        if s is not None:
            self._jobs.put(_Job(release=s.name))

    def rebuild(self, group: int, kv_layers: list, step: int, out: torch.Tensor | None) -> None:
        """Replicate ``group``'s whole KV (``kv_layers``: the stage's cache layers after ``step``) as a fresh
        session: one chunk per layer of every position, then ``out`` (the step's kept output; without one the
        replica holds KV the holder cannot pass on, and the step never counts as replicated)."""
        self.release(group)
        name = session_name(self.phase, self.stage, group)
        s = self.sessions[group] = _Session(name, SessionRecorder(name), self._meta(name, uuid.uuid4().hex))
        keys = kv_layers[0].keys
        s.recorder.begin("layers", 0, keys.shape[2], keys.shape[0])
        for l, layer in zip(self.layers, kv_layers):
            key = s.recorder.prefill_key(0, l)
            h = self.streamer.scatter(key, [layer.keys], [layer.values], Region(layers=(0, 1), tokens=(0, keys.shape[2])),
                                      meta={**s.meta, "layer": l})
            self._queue(key, h, s, None)
        if out is not None:
            key = output_key(name, step)
            self._queue(key, self.outbox.flush(key, out.contiguous(), meta={**s.meta, "step": step}), s, step)
        self.stats["rebuilds"] += 1

    def adopt(self, group: int, manifest: Manifest, step: int) -> None:
        """Continue a restored microbatch's session where its holder keeps it (its run, its numbering)."""
        s = _Session(manifest.session, SessionRecorder(manifest.session, manifest.segments),
                     self._meta(manifest.session, manifest.run or uuid.uuid4().hex), acked=step, queued=step)
        self.sessions[group] = s

    def _meta(self, name: str, run: str) -> dict:
        return {"session": name, "run": run, "model": self.model}

    def _queue(self, key: str, handle: Handle, s: _Session, step: int | None) -> None:
        if step is not None:
            s.queued = step
        self._jobs.put(_Job(key=key, handle=handle, session=s, step=step))

    # -- acknowledgements ----------------------------------------------------------------------------
    def acked(self, group: int) -> int:
        """The last replicated step of ``group`` (-1: none)."""
        s = self.sessions.get(group)
        return -1 if s is None else s.acked

    def wait_acked(self, group: int, step: int, timeout_s: float) -> None:
        """Block until ``group``'s replica reached ``step`` (backpressure), the stage is unprotected, or
        ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.acked(group) < step and self.dest is not None and self.enabled:
                left = deadline - time.monotonic()
                if left <= 0 or group not in self.sessions:
                    return
                self._cond.wait(min(left, 0.05))

    def acked_steps(self) -> dict[int, int]:
        """``{group: last replicated step}`` of every microbatch."""
        return {g: s.acked for g, s in list(self.sessions.items())}

    def idle(self) -> bool:
        """Whether every queued chunk has been acknowledged (or dropped)."""
        return all(s.acked >= s.queued for s in list(self.sessions.values())) and self._jobs.empty()

    def close(self) -> None:
        """Stop the forwarding thread (chunks not acknowledged yet are dropped) and the destination."""
        self._jobs.put(None)
        self._thread.join(timeout=5.0)
        if self.dest is not None:
            try:
                self.dest.close()
            except KVStreamError:
                pass

    # -- the forwarding thread -----------------------------------------------------------------------
    def _forward_loop(self) -> None:
        inflight: deque = deque()
        while True:
            try:
                job = self._jobs.get(timeout=0.005 if inflight else 0.05)
            except queue.Empty:
                job = False
            if job is None:
                return
            if job:
                self._forward(job, inflight)
            self._reap(inflight)
            self._publish()

    def _forward(self, job: _Job, inflight: deque) -> None:
        if job.connect is not None:
            self._reap(inflight, block=True)
            old, self.dest = self.dest, None
            try:
                self.dest = job.connect()
                self.lost = None
            except KVStreamError as e:
                self.lost = f"cannot reach the new replica holder: {e}"
            if old is not None:
                try:
                    old.close()
                except KVStreamError:
                    pass
            return
        if job.release is not None:
            # Flushes still in flight land first: a store lists the session's keys to delete them, and a
            # chunk written after that listing would outlive its release.
            self._reap(inflight, block=True)
            self._release_at_dest(job.release)
            return
        while not job.handle.done():  # the outbox copy (a CUDA event on the GPU); poll: never hold the GIL
            time.sleep(50e-6)
        if self.dest is None:
            self.outbox.delete(job.key)
            self.stats["dropped"] += 1
            return
        chunk, header = self.outbox.view(job.key), self.outbox.describe(job.key)
        try:
            handle = self.dest.flush(job.key, chunk, meta=header.meta)
        except KVStreamError as e:
            self._lose(e, inflight)
            self.outbox.delete(job.key)
            return
        self.stats["chunks"] += 1
        self.stats["bytes"] += header.nbytes
        inflight.append((job, handle))

    def _reap(self, inflight: deque, block: bool = False) -> None:
        while inflight and (block or inflight[0][1].done()):
            job, handle = inflight.popleft()
            try:
                handle.wait()
            except (KVStreamError, TimeoutError) as e:
                self.outbox.delete(job.key)
                self._lose(e, inflight)
                return
            self.outbox.delete(job.key)
            if job.step is not None:
                with self._cond:
                    job.session.acked = max(job.session.acked, job.step)
                    self.stats["acked_steps"] += 1
                    self._dirty = True
                    self._cond.notify_all()

    def _lose(self, error: BaseException, inflight: deque) -> None:
        """The destination failed: run unprotected until a new one is set."""
        with self._cond:
            self.lost = f"{type(error).__name__}: {error}"
            self.stats["losses"] += 1
            dest, self.dest = self.dest, None
            self._cond.notify_all()
        for job, _ in inflight:
            self.outbox.delete(job.key)
        inflight.clear()
        if dest is not None:
            try:
                dest.close()
            except KVStreamError:
                pass

    def _release_at_dest(self, name: str) -> None:
        dest = self.dest
        if dest is None:
            return
        try:
            if isinstance(dest, HostTransport) or not hasattr(dest, "peer"):  # a store we can delete in
                for key in dest.keys(f"{name}/"):
                    dest.delete(key)
            else:  # a point-to-point link: the holder frees the session when the marker lands
                dest.flush(f"{name}/{RELEASE}", torch.zeros(1, dtype=torch.uint8))
        except KVStreamError as e:
            self._lose(e, deque())

    def _publish(self) -> None:
        if not self._dirty or time.monotonic() - self._published < PUBLISH_S:
            return
        self._dirty = False
        self._published = time.monotonic()
        try:
            self.store.set(f"ack/{self.stage}", json.dumps({"phase": self.phase, "acked": self.acked_steps()}))
        except Exception:  # noqa: BLE001 - the store went with the controller: the process exits on its own
            pass


__all__ = ["OUTBOX_BYTES", "RELEASE", "OUTPUT", "session_name", "output_key", "Replicator"]
