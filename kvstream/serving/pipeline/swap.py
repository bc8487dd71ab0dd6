"""Microbatch swapping on one pipeline stage: which microbatches' KV stay on the device, the rest in host memory.

DéjàVu (Strati et al., ICML 2024, §4.2; msr-fiddle/dejavu ``ParallelGptDVFT.cc``) keeps two KV slots per
stage on the GPU, the microbatch being computed and the next one, and every microbatch's KV in pinned
host memory. Here a stage keeps **as many microbatches as its budget holds**, in the order it will compute
them (its *window*), and swaps only the rest:

* before microbatch ``i`` computes, the window is planned from ``i`` on: ``i`` after this step (its new
  tokens, plus one layer's old copy while ``DynamicLayer.update`` concatenates), then the following
  microbatches while they fit. Residents outside the window are evicted, missing ones swapped in;
* a swap-in copies a microbatch's whole KV from its host mirrors (:class:`~kvstream.integrations.hf.offload.HostMirror`)
  **layer by layer** on a side stream, one event per layer; layer ``l`` of that microbatch waits only for
  its own event (:meth:`SlotKV.before_update`, called by the cache before the layer's update);
* after a step only the tokens the host does not have yet cross to the host (one token per decode
  step in steady state, the prompt once), on a second side stream after the compute that made them;
* after the step the window is planned again for the microbatch expected next (the cyclic successor),
  so its prefetch overlaps the wait for the next microbatch and its compute.

Memory accounting: :attr:`SwapManager.resident_bytes` counts every KV tensor the stage's caches hold on
the device (from the tensors: ``numel() * element_size()``), including the old copy of a layer during its
update; :attr:`SwapManager.peak_bytes` is its maximum. It never exceeds the budget: a plan that cannot
hold the microbatch being computed raises :class:`~kvstream.errors.CapacityError`.

Swapping pays when the swap-in hides: ``K <= B_pcie * t_step`` (K: one microbatch's KV on the stage,
t_step: its compute time there). Every step logs ``ratio = K / (B_pcie * t_step)`` and the time compute
waited on swap-in events (on CUDA from timing events around each wait, on the CPU from the host clock;
on the CPU copies are synchronous and events inert, so the same code runs with CPU tensors).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ...cuda import Event, Stream, host_empty, memcpy_async, side_stream
from ...errors import CapacityError
from ...integrations.hf.offload import HostMirror
from .stages import StageCache, kv_bytes


def copy_in(mirror: HostMirror, device: torch.device, stream: Stream | None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Start copying one layer's history from ``mirror`` to new device tensors ``[B, H, n, D]`` on ``stream``.

    Returns ``(keys, values, done)`` where ``done.wait()`` makes the compute stream (CUDA) or the host wait
    until the copy landed; ``done`` is ``None`` when the copy already finished (the CPU). Tests replace this
    function with a delayed one to check that no layer computes before its swap-in landed.
    """
    return mirror.prefetch(device, 0, stream)


def copy_out(mirror: HostMirror, keys: torch.Tensor, values: torch.Tensor, n_new: int, stream: Stream | None) -> None:
    """Append the newest ``n_new`` tokens of device ``keys``/``values`` ``[B, H, n, D]`` to ``mirror``, on
    ``stream`` after the compute that made them (synchronously on the CPU)."""
    mirror.append_after_compute(keys, values, n_new, stream)


def measure_bandwidth(device: torch.device, nbytes: int = 64 << 20, reps: int = 3) -> float:
    """Host-to-device copy bandwidth in bytes/s: pinned host memory to ``device`` with ``cudaMemcpyAsync``
    (best of ``reps``, timed with events); on the CPU a plain memory copy. The ``B_pcie`` of the ratio."""
    src = host_empty(nbytes, torch.uint8, pin=device.type == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(reps + 1):  # the first one warms up
        if device.type == "cuda":
            start, end = Event(device, timing=True), Event(device, timing=True)
            start.record()
            memcpy_async(dst, src)
            end.record()
            end.synchronize()
            took = start.elapsed_ms(end) / 1e3
        else:
            t = time.perf_counter()
            dst.copy_(src)
            took = time.perf_counter() - t
        best = min(best, took)
    return nbytes / max(best, 1e-9)


@dataclass
class StepRecord:
    """What one microbatch step did on one stage (times in seconds, sizes in bytes)."""

    seq: int
    slot: int
    kind: str
    rows: int
    tokens: int = 0
    kv_bytes: int = 0
    compute_s: float = 0.0
    stall_s: float = 0.0
    swap_in_bytes: int = 0
    swap_out_bytes: int = 0
    resident_bytes: int = 0
    ratio: float = 0.0
    _events: list = field(default_factory=list, repr=False)  # CUDA: (start, end, [(before, after) per wait])

    def as_dict(self) -> dict:
        """JSON-ready form (without the events)."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class SlotKV:
    """One microbatch's KV on one stage: its :class:`StageCache` and, once it was swapped out, host mirrors.

    The cache calls :meth:`before_update`/:meth:`after_update` around every layer's update (its hooks).
    """

    def __init__(self, manager: "SwapManager", slot: int, cache_factory, cap_tokens: int):
        self.manager, self.slot, self.cap_tokens = manager, int(slot), int(cap_tokens)
        self.cache: StageCache = cache_factory(self)
        self.mirrors: dict[int, HostMirror] = {}
        self.host_tokens = 0
        self.resident = True
        self.pending: dict[int, Any] = {}
        self._last_in: Any = None  # the latest swap-in copy's completion

    # sizes --------------------------------------------------------------------------------------------
    def tokens(self) -> int:
        """Tokens cached (the same in every layer of the stage)."""
        if self.resident:
            return self.cache.layers[self.cache.stage_layers.start].get_seq_length()
        return self.host_tokens

    def rows(self) -> int:
        """Batch rows of the microbatch (0 before its prefill)."""
        keys = self.cache.layers[self.cache.stage_layers.start].keys
        if self.resident and keys is not None and keys.dim() == 4:
            return keys.shape[0]
        mirror = next(iter(self.mirrors.values()), None)
        return mirror.k.shape[0] if mirror is not None else 0

    def device_bytes(self) -> int:
        """Bytes of this microbatch's KV now on the device."""
        return sum(kv_bytes(l) for l in self.cache.kv_layers())

    def size_bytes(self) -> int:
        """Bytes this microbatch's KV takes on the device when resident (now, before its next step)."""
        if self.resident:
            return self.device_bytes()
        return sum(2 * m.k[:, :, :m.n].numel() * m.k.element_size() for m in self.mirrors.values())

    # cache hooks --------------------------------------------------------------------------------------
    def before_update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Wait for this layer's swap-in (if one is pending), then count the bytes the update allocates."""
        done = self.pending.pop(layer_idx, None)
        if done is not None:
            self.manager.wait_swap_in(done)
        new = key_states.numel() * key_states.element_size() + value_states.numel() * value_states.element_size()
        self.manager.account(kv_bytes(self.cache.layers[layer_idx]) + new)

    def after_update(self, layer_idx: int, old_bytes: int) -> None:
        """The layer's old tensors are gone: uncount them; then tell the manager's ``on_layer`` (if any)."""
        self.manager.account(-old_bytes)
        if self.manager.on_layer is not None:
            self.manager.on_layer(self.slot, layer_idx, self.cache.layers[layer_idx])

    # moves --------------------------------------------------------------------------------------------
    def evict(self) -> None:
        """Write the tokens the host lacks to the mirrors, then drop the device tensors."""
        m = self.manager
        n = self.tokens()
        if n > self.host_tokens:
            for l, layer in zip(self.cache.stage_layers, self.cache.kv_layers()):
                mirror = self.mirrors.get(l)
                if mirror is None:
                    mirror = self.mirrors[l] = HostMirror(layer.keys, capacity=max(self.cap_tokens, n),
                                                          values_like=layer.values)
                copy_out(mirror, layer.keys, layer.values, n - self.host_tokens, m.out_stream)
                m.record.swap_out_bytes += kv_bytes(layer) * (n - self.host_tokens) // n
            self.host_tokens = n
        for layer in self.cache.kv_layers():
            m.account(-kv_bytes(layer))
            layer.keys, layer.values = m.empty, m.empty
        self.pending.clear()
        self.resident = False

    def swap_in(self) -> None:
        """Start copying the whole KV from the mirrors to the device, layer by layer, one event each."""
        m = self.manager
        for l, layer in zip(self.cache.stage_layers, self.cache.kv_layers()):
            k, v, done = copy_in(self.mirrors[l], m.device, m.in_stream)
            m.account(k.numel() * k.element_size() + v.numel() * v.element_size())
            m.record.swap_in_bytes += k.numel() * k.element_size() + v.numel() * v.element_size()
            layer.keys, layer.values = k, v
            if done is not None:
                self.pending[l] = self._last_in = done
        self.resident = True

    def _settle_host(self) -> None:
        """Block until no copy reads or writes the mirrors any more (before they are replaced or freed:
        a freed pinned block is reused by the next allocation of its size)."""
        if self._last_in is not None:
            (self._last_in.synchronize if isinstance(self._last_in, Event) else self._last_in.wait)()
            self._last_in = None
        for mirror in self.mirrors.values():
            if mirror.ready is not None:
                mirror.ready.synchronize()

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch ``rows`` (int64 ``[n]``, CPU) on the device and in the mirrors."""
        for done in self.pending.values():
            self.manager.wait_swap_in(done)
        self.pending.clear()
        self._settle_host()
        if self.resident:
            for layer in self.cache.kv_layers():
                if kv_bytes(layer):
                    old = kv_bytes(layer)
                    k, v = layer.keys[rows.to(layer.keys.device)], layer.values[rows.to(layer.keys.device)]
                    self.manager.account(2 * k.numel() * k.element_size())
                    layer.keys, layer.values = k, v
                    self.manager.account(-old)
        for mirror in self.mirrors.values():
            mirror.apply(lambda t: t.index_select(0, rows))

    def drop(self) -> None:
        """Free everything (the microbatch finished)."""
        self._settle_host()
        if self.resident:
            for layer in self.cache.kv_layers():
                self.manager.account(-kv_bytes(layer))
                layer.keys, layer.values = self.manager.empty, self.manager.empty
        self.mirrors.clear()
        self.pending.clear()


class SwapManager:
    """The KV of every microbatch on one stage: residency, swapping, accounting and the per-step log.

    Parameters
    ----------
    device : torch.device
        The stage's device.
    budget_bytes : int, optional
        Device bytes the stage's KV may take (``None``: unbounded).
    swap : bool
        Whether microbatches beyond the budget are swapped to host memory (else the budget is only checked).
    token_bytes : int
        KV bytes of one token of one row on this stage (all its layers, K and V): sizes a prefill's growth.
    bandwidth_bytes_per_s : float
        ``B_pcie`` of the logged ratio.
    on_layer : callable, optional
        ``on_layer(slot, layer_idx, cache_layer)`` after every layer's update, on the compute thread, while
        later layers are still to run (the failover replication streams a prompt's KV layer by layer from it).
    """

    def __init__(self, device: torch.device, *, budget_bytes: int | None, swap: bool, token_bytes: int,
                 bandwidth_bytes_per_s: float, on_layer: Any = None):
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes
        self.swap = bool(swap)
        self.token_bytes = int(token_bytes)
        self.bandwidth = float(bandwidth_bytes_per_s)
        self.on_layer = on_layer
        self.slots: dict[int, SlotKV] = {}
        self.resident_bytes = 0
        self.peak_bytes = 0
        self.empty = torch.empty(0, device=self.device)
        cuda = self.device.type == "cuda"
        self.in_stream = side_stream(self.device, "kvstream-swap-in") if cuda else None
        self.out_stream = side_stream(self.device, "kvstream-swap-out") if cuda else None
        self.records: list[StepRecord] = []
        self.record = StepRecord(seq=-1, slot=-1, kind="setup", rows=0)
        self.last_compute_s = 0.0
        self._t0 = 0.0

    # accounting ---------------------------------------------------------------------------------------
    def account(self, delta_bytes: int) -> None:
        """Add ``delta_bytes`` to the resident count (negative: freed); track the peak.

        Raises
        ------
        CapacityError
            If the count passes the budget (a plan that should have prevented it did not).
        """
        self.resident_bytes += int(delta_bytes)
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)
        if self.budget_bytes is not None and self.resident_bytes > self.budget_bytes:
            raise CapacityError(f"stage KV reached {self.resident_bytes} bytes, over its budget of "
                                f"{self.budget_bytes} bytes")

    def wait_swap_in(self, done: Any) -> None:
        """Make compute wait for one swap-in copy and add the wait to this step's stall."""
        if isinstance(done, Event) and done.is_cuda:
            before = Event(self.device, timing=True).record()
            done.wait()
            after = Event(self.device, timing=True).record()
            self.record._events.append((before, after))
            return
        t = time.perf_counter()
        done.wait()
        self.record.stall_s += time.perf_counter() - t

    # slots --------------------------------------------------------------------------------------------
    def new_slot(self, slot: int, cache_factory, cap_tokens: int) -> SlotKV:
        """Register a new microbatch in ``slot`` (replacing a finished one)."""
        if slot in self.slots:
            self.release(slot)
        kv = self.slots[slot] = SlotKV(self, slot, cache_factory, cap_tokens)
        return kv

    def release(self, slot: int) -> None:
        """Free a finished microbatch's KV."""
        kv = self.slots.pop(slot, None)
        if kv is not None:
            kv.drop()

    def _cyclic(self, first: int) -> list[int]:
        ids = sorted(self.slots)
        i = ids.index(first)
        return ids[i:] + ids[:i]

    def next_after(self, slot: int) -> int:
        """The microbatch expected after ``slot``: its cyclic successor among this stage's microbatches."""
        ids = sorted(self.slots)
        later = [s for s in ids if s > slot]
        return later[0] if later else ids[0]

    def _plan(self, first: int, new_tokens: int, rows: int) -> list[int]:
        """The window from ``first``, whose step adds ``new_tokens`` tokens to ``rows`` rows (see the module
        docstring). Raises CapacityError if ``first`` alone does not fit."""
        kv = self.slots[first]
        size = kv.size_bytes()
        need = size + new_tokens * self.token_bytes * rows + size // max(1, len(kv.cache.stage_layers))
        order = self._cyclic(first)
        if self.budget_bytes is None:
            return order
        if need > self.budget_bytes:
            raise CapacityError(f"the microbatch in slot {first} needs {need} bytes of KV on this stage "
                                f"({kv.tokens()} + {new_tokens} tokens), over the budget of {self.budget_bytes} bytes")
        if not self.swap:
            return order
        window, total = [first], need
        for j in order[1:]:
            b = self.slots[j].size_bytes()
            if total + b > self.budget_bytes:
                break
            window.append(j)
            total += b
        return window

    def _apply(self, window: list[int]) -> None:
        for j, kv in self.slots.items():
            if kv.resident and j not in window:
                kv.evict()
        for j in window:
            if not self.slots[j].resident:
                self.slots[j].swap_in()

    # the step -----------------------------------------------------------------------------------------
    def begin(self, seq: int, slot: int, kind: str, rows: int, new_tokens: int) -> None:
        """Before a step of ``slot``: plan and apply its window; start the step's record and clock."""
        self.record = StepRecord(seq=seq, slot=slot, kind=kind, rows=rows)
        self._apply(self._plan(slot, new_tokens, rows))
        if self.device.type == "cuda":
            self.record._events.insert(0, Event(self.device, timing=True).record())
        else:
            self._t0 = time.perf_counter()

    def end(self) -> StepRecord:
        """After the step: close the record, then plan for the microbatch expected next (evict, prefetch)."""
        rec = self.record
        kv = self.slots[rec.slot]
        rec.tokens, rec.kv_bytes = kv.tokens(), kv.size_bytes()
        if self.device.type == "cuda":
            rec._events.insert(1, Event(self.device, timing=True).record())
        else:
            rec.compute_s = max(0.0, time.perf_counter() - self._t0 - rec.stall_s)
            self._finish(rec)
        if self.swap and self.budget_bytes is not None:
            nxt = self.next_after(rec.slot)
            self._apply(self._plan(nxt, 1, self.slots[nxt].rows()))
        rec.resident_bytes = self.resident_bytes
        self.records.append(rec)
        self.resolve()
        return rec

    def _finish(self, rec: StepRecord) -> None:
        rec.ratio = rec.kv_bytes / (self.bandwidth * rec.compute_s) if rec.compute_s > 0 else float("inf")
        self.last_compute_s = rec.compute_s

    def resolve(self, block: bool = False) -> None:
        """Turn finished CUDA timing events into the records' compute and stall times (``block``: wait)."""
        for rec in self.records:
            if len(rec._events) < 2:
                continue
            start, end, waits = rec._events[0], rec._events[1], rec._events[2:]
            if not block and not end.query():
                break
            end.synchronize()
            rec.stall_s = sum(a.elapsed_ms(b) for a, b in waits) / 1e3
            rec.compute_s = max(0.0, start.elapsed_ms(end) / 1e3 - rec.stall_s)
            rec._events = []
            self._finish(rec)

    def summary(self) -> dict:
        """Totals of the stage: peak and budget, swap bytes, compute and stall time, the ratio's spread."""
        self.resolve(block=True)
        records = [r for r in self.records if r.seq >= 0]  # warm-up steps carry negative numbers
        ratios = sorted(r.ratio for r in records if r.kind == "decode" and r.compute_s > 0)
        return {"peak_kv_bytes": self.peak_bytes, "budget_bytes": self.budget_bytes, "swap": self.swap,
                "swap_in_bytes": sum(r.swap_in_bytes for r in records),
                "swap_out_bytes": sum(r.swap_out_bytes for r in records),
                "compute_s": sum(r.compute_s for r in records), "stall_s": sum(r.stall_s for r in records),
                "bandwidth_bytes_per_s": self.bandwidth,
                "ratio_p50": ratios[len(ratios) // 2] if ratios else None, "ratio_max": ratios[-1] if ratios else None,
                "steps": [r.as_dict() for r in records]}


__all__ = ["SwapManager", "SlotKV", "StepRecord", "copy_in", "copy_out", "measure_bandwidth"]
