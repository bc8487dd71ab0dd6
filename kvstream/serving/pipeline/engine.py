"""One stage's runtime: a microbatch step on the stage, and the loop of every stage after the first.

A stage keeps, per microbatch slot, the state ``generate`` keeps per batch: the 2-D attention mask
(``None`` without padding, as ``generate`` drops an all-ones mask), the position ids, and the KV cache
(a :class:`~kvstream.serving.pipeline.stages.StageCache` managed by the stage's
:class:`~kvstream.serving.pipeline.swap.SwapManager`). A prefill step starts a slot; a decode step first
keeps only the rows still generating (a request that finished left), then extends the mask by one column
and the positions by one, exactly as ``generate``'s ``_update_model_kwargs_for_generation`` does.

Stages after the first run :func:`follow`: receive a step, run it, pass it on (the last stage samples the
next tokens and sends them back to stage 0 over the ring). Stage 0's loop is
:mod:`kvstream.serving.pipeline.scheduler`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .links import DECODE, JOIN, KIND_NAMES, PREFILL, RELEASE, STOP, Header, Links
from .stages import StageModel, greedy, positions_from_mask
from .swap import SlotKV, SwapManager


@dataclass
class SlotState:
    """One microbatch on one stage: mask ``[B, S]`` int64 or ``None``, positions ``[B, T]`` int64, KV."""

    mask: torch.Tensor | None
    positions: torch.Tensor
    kv: SlotKV


class StageRuntime:
    """A stage and its microbatches.

    Parameters
    ----------
    stage : StageModel
        The stage's modules.
    swap : SwapManager
        Residency and accounting of the stage's KV.
    eos_token_id : int, list of int or None
        Suppressed when sampling (``generate(min_new_tokens=N)``).
    """

    def __init__(self, stage: StageModel, swap: SwapManager, eos_token_id: Any = None):
        self.stage, self.swap, self.eos = stage, swap, eos_token_id
        self.device = stage.device
        self.slots: dict[int, SlotState] = {}

    def step(self, h: Header, x: torch.Tensor, mask: torch.Tensor | None = None,
             keep: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step of microbatch ``h.slot`` on this stage.

        Parameters
        ----------
        h : Header
            The step (``PREFILL`` or ``DECODE``).
        x : torch.Tensor
            Token ids ``[rows, T]`` int64 (stage 0) or hidden states ``[rows, T, hidden]`` (later stages),
            on the stage's device.
        mask : torch.Tensor, optional
            Prefill: the padded prompt's mask ``[rows, T]`` int64 (``None``: no padding).
        keep : torch.Tensor, optional
            Decode: indices of the rows kept from the previous step (int64, CPU); ``None`` keeps all.

        Returns
        -------
        torch.Tensor
            Hidden states ``[rows, T, hidden]``, or on the last stage the next tokens ``[rows]`` int64.
        """
        with torch.inference_mode():
            return self._step(h, x, mask, keep)

    def _step(self, h: Header, x: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor:
        kind = KIND_NAMES[h.kind]
        if h.kind == PREFILL:
            kv = self.swap.new_slot(h.slot, self.stage.new_cache, h.cap_tokens)
            dev_mask = None if mask is None else mask.to(self.device)
            pos = positions_from_mask(dev_mask if dev_mask is not None else
                                      torch.ones(h.rows, h.tokens, dtype=torch.long, device=self.device))
            st = self.slots[h.slot] = SlotState(dev_mask, pos, kv)
            self.swap.begin(h.seq, h.slot, kind, h.rows, h.tokens)
        else:
            st = self.slots[h.slot]
            self.swap.begin(h.seq, h.slot, kind, h.rows, 1)
            if keep is not None:
                st.kv.select_rows(keep)
                idx = keep.to(self.device)
                st.positions = st.positions[idx]
                st.mask = None if st.mask is None else st.mask[idx]
            st.positions = st.positions[:, -1:] + 1
            if st.mask is not None:
                st.mask = torch.cat([st.mask, st.mask.new_ones(st.mask.shape[0], 1)], dim=-1)
        out = self.stage.forward(x, st.mask, st.positions, st.kv.cache)
        if self.stage.last:
            out = greedy(out, self.eos)
        self.swap.end()
        return out

    def join(self, h: Header, mask: torch.Tensor | None, receive: Callable[[Header, int], tuple]) -> None:
        """A microbatch prefilled elsewhere joins slot ``h.slot`` (:mod:`.disagg`): its mask and positions as
        after a prefill of ``h.tokens`` tokens, its KV layer by layer from ``receive(h, layer) -> (keys, values)``
        (``[rows, kv_heads, h.tokens, head_dim]`` on the stage's device)."""
        with torch.inference_mode():
            kv = self.swap.new_slot(h.slot, self.stage.new_cache, h.cap_tokens)
            dev_mask = None if mask is None else mask.to(self.device)
            pos = positions_from_mask(dev_mask if dev_mask is not None else
                                      torch.ones(h.rows, h.tokens, dtype=torch.long, device=self.device))
            self.slots[h.slot] = SlotState(dev_mask, pos, kv)
            self.swap.begin(h.seq, h.slot, "join", h.rows, h.tokens)
            for l in self.stage.layers:
                k, v = receive(h, l)
                layer = kv.cache.layers[l]
                self.swap.account(k.numel() * k.element_size() + v.numel() * v.element_size())
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
            self.swap.end()

    def release(self, slot: int) -> None:
        """Forget a finished microbatch and free its KV."""
        self.slots.pop(slot, None)
        self.swap.release(slot)

    def t_step_us(self) -> int:
        """This stage's latest resolved compute time of a step, microseconds."""
        return int(self.swap.last_compute_s * 1e6)


def follow(rt: StageRuntime, links: Links, receive: Callable[[Header, int], tuple] | None = None) -> None:
    """The loop of a stage after the first: until ``STOP``, receive a step, run it, pass it on.

    The last stage sends the sampled tokens back to stage 0 (the ring) instead of passing hidden states.
    ``RELEASE`` frees a finished microbatch on every stage; ``STOP`` ends every stage's loop in order;
    ``JOIN`` installs a microbatch prefilled elsewhere, its KV from ``receive`` (:meth:`StageRuntime.join`).
    """
    stage = rt.stage
    while True:
        h, mask, keep, hidden = links.recv_prev(stage.dtype, stage.hidden_size)
        if h.kind == JOIN:
            rt.join(h, mask, receive)
            if not stage.last:
                links.send_next(h, mask)
            continue
        if h.kind in (RELEASE, STOP):
            if h.kind == RELEASE:
                rt.release(h.slot)
            if not stage.last:
                links.send_next(h)
            if h.kind == STOP:
                return
            continue
        out = rt.step(h, hidden, mask, keep)
        h.t_step_us = max(h.t_step_us, rt.t_step_us())
        if stage.last:
            links.send_ring(h.slot, h.seq, h.t_step_us, out)
        else:
            links.send_next(h, mask, keep if h.kind == DECODE else None, out)


__all__ = ["SlotState", "StageRuntime", "follow"]
