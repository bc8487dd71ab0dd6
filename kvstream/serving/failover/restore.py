"""A replacement stage's restore: every in-flight microbatch's KV back from its replica, through the streamer.

For each microbatch the plan lists (slot, group, padded prompt width, prompt mask, the original rows alive
after each recent step) the replacement reads the replica session's manifest — recovered from the chunks
where they lie (a :class:`~kvstream.DiskTransport`, its own :class:`~.holder.ReplicaStore`), or sent by the
holder over a link — and replays it with :func:`~kvstream.streaming.replay.replay` through a
:class:`~kvstream.streaming.streamer.KVStreamer` (fetch into staging on the stage's device, unpack with the
kernels; on a GPU layer by layer on a side stream, one event per layer). The KV covers ``width + r``
positions: the prompt and decode steps ``1..r``, so the microbatch stands at step ``r``; its attention mask
and position ids are rebuilt for exactly that step (:func:`slot_inputs`), and it joins its slot as if it
had computed those steps (:meth:`~kvstream.serving.pipeline.engine.StageRuntime.join`). The replica is cut after the newest step
whose output landed (a step's last chunk): that output is what the replacement passes on for the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from ...integrations.hf.resume import read_manifest
from ...streaming.recover import recover_manifest
from ...streaming.replay import replay
from ...streaming.segments import Prefill, Step
from ...streaming.session import Manifest
from ...streaming.streamer import KVStreamer
from ..pipeline.engine import StageRuntime
from ..pipeline.links import JOIN, Header
from .replicator import OUTPUT


@dataclass
class GroupInfo:
    """What the controller tells a replacement about one in-flight microbatch (the plan's ``groups``)."""

    slot: int
    group: int
    width: int
    cap_tokens: int
    mask: list | None  # the padded prompt's mask [rows0][width], None without padding
    rows: dict  # step (str) -> original row indices alive in the KV after that step

    @classmethod
    def from_doc(cls, doc: dict) -> "GroupInfo":
        """From the plan's JSON."""
        return cls(int(doc["slot"]), int(doc["group"]), int(doc["width"]), int(doc["cap_tokens"]), doc.get("mask"),
                   dict(doc["rows"]))


def slot_inputs(info: GroupInfo, step: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The attention mask ``[rows, width + step]`` (``None`` without padding) and position ids ``[rows, 1]`` a
    microbatch has after ``step`` (0: the prefill), as the engine's decode steps build them."""
    rows = torch.tensor(info.rows[str(step)], dtype=torch.long)
    if info.mask is None:
        last = torch.full((rows.numel(), 1), info.width - 1, dtype=torch.long)
        mask = None
    else:
        prompt = torch.tensor(info.mask, dtype=torch.long)[rows]
        last = prompt.sum(-1, keepdim=True) - 1
        mask = torch.cat([prompt, prompt.new_ones(prompt.shape[0], step)], dim=-1).to(device)
    return mask, (last + step).to(device)


@dataclass
class Restored:
    """One restored microbatch: the step its KV reached, the manifest it came from, that step's output, and the
    outputs of the steps before it that the replica still holds."""

    step: int
    manifest: Manifest
    output: torch.Tensor  # the step's output (hidden states passed on, or the last stage's token ids), CPU
    earlier: list = field(default_factory=list)  # [(step, output)] of earlier steps, oldest first, CPU


def _with_output(source: Any, manifest: Manifest, name: str, width: int, earlier: int = 0
                 ) -> tuple[Manifest | None, int, Any, list]:
    """``manifest`` cut after the newest step whose output ``source`` holds (a step is replicated once its
    output landed: KV past it is not trusted), that step, its output, and the outputs of up to ``earlier``
    steps before it that ``source`` still holds (``[(step, output)]``, oldest first); ``(None, -1, None, [])``
    if none is."""
    outputs = {int(k.rsplit("/", 1)[1]): k for k in source.keys(f"{name}/{OUTPUT}/")}
    pos, ends = 0, {}  # step -> segments up to and including it
    for i, seg in enumerate(manifest.segments):
        if isinstance(seg, (Prefill, Step)):
            pos = seg.start + seg.tokens
            ends[pos - width] = i + 1
    usable = sorted(k for k in outputs if k in ends)
    if not usable:
        return None, -1, None, []
    step = usable[-1]
    cut = replace(manifest, segments=list(manifest.segments[:ends[step]]), seq_length=width + step)
    before = [(k, source.fetch_new(outputs[k], "cpu")) for k in usable[:-1][-earlier:]] if earlier > 0 else []
    return cut, step, source.fetch_new(outputs[step], "cpu"), before


def restore_groups(rt: StageRuntime, source: Any, infos: list[GroupInfo], name_of: Callable[[int], str], *,
                   linked: bool, interrupt: Callable[[], None], after_first: Callable[[], None] | None = None,
                   earlier_outputs: int = 0) -> tuple[dict[int, Restored], dict]:
    """Restore every microbatch of ``infos`` onto ``rt``'s stage from ``source``.

    Parameters
    ----------
    rt : StageRuntime
        The replacement's stage (slots are created here).
    source : Transport
        Where the replica sessions are: a store to recover manifests from, or (``linked``) a link over which
        the holder sends ``<session>/manifest`` and the chunks.
    name_of : callable
        ``group -> session name``.
    interrupt : callable
        Called between microbatches; raises to abandon the restore (another failure).
    after_first : callable, optional
        Called once the first microbatch is restored (the failure injection of ``S@recover``).
    earlier_outputs : int
        Also bring back the outputs of up to this many steps before each restored step that the replica still
        holds (:attr:`Restored.earlier`). When the next stage was replaced too and its replica is behind by two
        steps or more, this replacement must pass those steps' outputs on; with the restored step's output
        alone the microbatch could not be replayed and restarted from its prompt.

    Returns
    -------
    (restored, stats)
        ``{slot: Restored}`` of the microbatches whose KV came back whole to a step the plan knows the rows
        of (the others are left out: the controller restarts them), and ``{"bytes", "seconds"}`` read.
    """
    layers = list(rt.stage.layers)
    streamer = KVStreamer(source, level=3, device=rt.device)
    t0 = time.perf_counter()
    out: dict[int, Restored] = {}
    for info in infos:
        interrupt()
        name = name_of(info.group)
        if linked:
            manifest = read_manifest(source, name)
        else:
            manifest = recover_manifest(source, name, num_layers=int(rt.stage.config.num_hidden_layers), kv_layers=layers)
        manifest, step, out_t, before = _with_output(source, manifest, name, info.width, earlier_outputs)
        if manifest is None or str(step) not in info.rows:
            continue
        load = replay(manifest, streamer, device=rt.device)
        mask, positions = slot_inputs(info, step, rt.device)
        h = Header(JOIN, slot=info.slot, rows=positions.shape[0], tokens=manifest.seq_length, cap_tokens=info.cap_tokens,
                   group=info.group)
        rt.join(h, None, lambda _h, l: load.take(l - layers[0]))
        st = rt.slots[info.slot]
        st.mask, st.positions = mask, positions
        out[info.slot] = Restored(step, manifest, out_t, before)
        if after_first is not None and len(out) == 1:
            after_first()
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    return out, {"bytes": streamer.stats.bytes_in, "seconds": time.perf_counter() - t0}


__all__ = ["GroupInfo", "slot_inputs", "Restored", "restore_groups"]
