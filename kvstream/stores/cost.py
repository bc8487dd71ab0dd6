"""Load or recompute: what a stored prefix costs to load, what it costs to recompute, and the plan between them.

A stored prefix helps only when loading it is faster than recomputing it: an H200 prefills an
8192-token Llama-3-8B prompt in ~258 ms, and 0.94 GB of its KV took 543-614 ms to read from a disk at
~1.9 GB/s (bench/NOTES.md, prefix topic). So every reuse is planned from measured figures:

* :class:`TierCost` — a store tier's read cost onto a device: ``fetch`` (tier to host memory: the file
  opens and header reads on the caller's thread, then the verified reads; none for host memory) and
  ``copy`` (host to device, which a layer-wise load overlaps with the prefill, slowed by ``contention``
  while the model computes beside it). Stores calibrate it once and cache it
  (:class:`~kvstream.stores.calibration.Calibration`); ``store.tier_cost = ...`` overrides it (tests, a
  known disk). A measured figure carries a ``safety``: how much slower than it a load may turn out.
* :class:`PrefillTime` — the model's prefill time on a device, ``a + b*new + c*new*(past + new/2)``
  seconds (a fixed cost, the per-token layers, attention over every earlier token), fitted to
  measurements (:meth:`PrefillTime.fit`; the HF integration measures and caches it per model and device).
* :func:`plan_reuse` — picks, among "recompute everything", "load the stored prefix" and the
  compute/load split of "Cake: compute or load KV cache? why not both" (arXiv 2410.03065: recompute the
  first ``x`` stored tokens while the tier loads the rest, both at once), the one predicted fastest, and
  loads only when that wins by :data:`MARGIN` even with the load ``safety`` slower than predicted.
* :func:`reuse_bound` — before any lookup: the fastest any stored prefix of a prompt could make it (every
  token but the last stored); when even that cannot win, the store is not looked up at all.

Every prediction is of the whole time to the first token: the host seconds already spent (the lookup,
``spent_s``) are part of it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Sequence

import torch

from .calibration import (CACHE_ENV, DRIFT, EWMA_WEIGHT, Calibration, HostCost, cache_dir, device_copy_Bps,
                          read_json, update_json)

#: Relative win over recomputing a plan that loads must predict (the noise of a time to first token).
MARGIN = 0.05
#: How much slower than its measured figure a load may turn out (the ``safety`` of a calibrated
#: :class:`TierCost`): on the 2026-12-01 H200 run a split's load took 30-70 % longer than its
#: calibrated figure, part of it the lookup that is now measured into the plan (bench/NOTES.md).
LOAD_SAFETY = 0.4
#: Slow-down of host-to-device copies that run beside the model's compute (a split's front, the suffix
#: prefill of a layer-wise load): both draw on the device's memory and the host thread that issues them.
COPY_CONTENTION = 0.2


@dataclass(frozen=True)
class TierCost:
    """The measured cost of loading KV from one store tier onto one device.

    Parameters
    ----------
    fetch_Bps : float or None
        Bytes per second from the tier into host memory, verified (a disk read and its per-slice
        checksums); ``None`` when the tier *is* host memory (:class:`~kvstream.stores.radix.RadixStore`).
    copy_Bps : float
        Bytes per second from host memory onto the device (pinned ``cudaMemcpyAsync``; a memcpy on the CPU).
    latency_s : float
        Seconds per file before its first byte (open and header read, on the caller's thread): once per
        load, or once per file of ``file_tokens`` tokens.
    file_tokens : int
        Tokens per file of a tier of files (0: one latency per load).
    contention : float
        Relative slow-down of the copies that run beside the model's compute.
    safety : float
        How much slower than these figures a load may turn out (0: the figures are exact, as given).
    """

    fetch_Bps: float | None
    copy_Bps: float
    latency_s: float = 0.0
    file_tokens: int = 0
    contention: float = 0.0
    safety: float = 0.0

    def opens_s(self, tokens: int | None = None) -> float:
        """Seconds of the file opens and header reads of a load of ``tokens`` (0 for a host-memory tier)."""
        if self.fetch_Bps is None or (tokens is not None and tokens <= 0):
            return 0.0
        files = math.ceil(tokens / self.file_tokens) if tokens is not None and self.file_tokens > 0 else 1
        return files * self.latency_s

    def fetch_s(self, nbytes: float, tokens: int | None = None) -> float:
        """Seconds to bring ``nbytes`` (``tokens`` tokens) into host memory, opens included (0 for host memory)."""
        if self.fetch_Bps is None or nbytes <= 0:
            return 0.0
        return self.opens_s(tokens) + nbytes / self.fetch_Bps

    def copy_s(self, nbytes: float, *, beside_compute: bool = False) -> float:
        """Seconds to copy ``nbytes`` from host memory to the device (slower beside the model's compute)."""
        return max(0.0, nbytes) / self.copy_Bps * (1 + self.contention if beside_compute else 1)

    def slower(self, factor: float) -> "TierCost":
        """The same tier ``factor`` times slower (every rate divided, the latency multiplied)."""
        return replace(self, fetch_Bps=None if self.fetch_Bps is None else self.fetch_Bps / factor,
                       copy_Bps=self.copy_Bps / factor, latency_s=self.latency_s * factor, safety=0.0)

    def worst(self) -> "TierCost":
        """The tier as slow as its ``safety`` allows."""
        return self.slower(1 + self.safety) if self.safety > 0 else self


@dataclass(frozen=True)
class PrefillTime:
    """Prefill seconds of ``new`` tokens after ``past`` cached ones: ``a_s + b_s*new + c_s*new*(past + new/2)``.

    ``a_s`` is the fixed cost of a forward (and of ``generate``'s first step), ``b_s`` the per-token cost
    of the layers (projections, MLP), ``c_s`` attention: each new token attends to every earlier one.
    """

    a_s: float
    b_s: float
    c_s: float = 0.0

    def __call__(self, new_tokens: int, past_tokens: int = 0) -> float:
        if new_tokens <= 0:
            return 0.0
        return self.a_s + self.b_s * new_tokens + self.c_s * new_tokens * (past_tokens + new_tokens / 2)

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, int, float]]) -> "PrefillTime":
        """Least-squares fit to ``(new_tokens, past_tokens, seconds)`` samples, with no negative coefficient.

        A coefficient the data drive below zero is dropped (fixed at 0) and the rest refitted.

        Raises
        ------
        ValueError
            With no samples.
        """
        if not samples:
            raise ValueError("PrefillTime.fit needs at least one sample")
        rows = [(1.0, float(n), float(n) * (p + n / 2)) for n, p, _ in samples]
        y = torch.tensor([float(s) for *_, s in samples], dtype=torch.float64)
        active = [0, 1, 2]
        while True:
            x = torch.tensor([[r[i] for i in active] for r in rows], dtype=torch.float64)
            scale = x.abs().amax(dim=0).clamp_min(1e-30)
            coef = torch.linalg.lstsq(x / scale, y.unsqueeze(1)).solution.squeeze(1) / scale
            negative = [active[i] for i in range(len(active)) if coef[i] < 0]
            if not negative or len(active) == 1:
                break
            active.remove(negative[-1])
        full = [0.0, 0.0, 0.0]
        for i, c in zip(active, coef.tolist()):
            full[i] = max(0.0, c)
        return cls(*full)

    def to_dict(self) -> dict:
        """JSON-able coefficients."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> "PrefillTime":
        """Inverse of :meth:`to_dict`. Raises ``KeyError``/``TypeError``/``ValueError`` on a bad document."""
        return cls(float(doc["a_s"]), float(doc["b_s"]), float(doc.get("c_s", 0.0)))


@dataclass
class ReusePlan:
    """What :func:`plan_reuse` chose for one prompt, and how long it took (``cache.reuse_plan``).

    Attributes
    ----------
    choice : str
        ``"load"`` (load the stored prefix, prefill the rest), ``"split"`` (recompute the first
        ``front_tokens`` while the tier loads the rest of the prefix, then prefill the rest),
        ``"recompute"`` (ignore the stored prefix: predicted slower), ``"none"`` (nothing stored), or
        ``"load (unplanned)"`` (no prefill figure was available: the stored prefix was loaded).
    prompt_tokens, stored_tokens : int
        Tokens of the prompt, and of its stored prefix that the lookup found (at most ``T - 1``).
    front_tokens : int
        Tokens at the front recomputed while the tier loads (``x``; 0 unless ``"split"``).
    loaded_tokens, recomputed_tokens : int
        Tokens whose KV came from the store, and tokens the model computed (they sum to the prompt).
        After the load, what was read intact (a corrupt chunk shortens ``loaded_tokens``).
    predicted_s, recompute_s : float or None
        Predicted time to the first token of this plan, and of recomputing the whole prompt.
    tier : str
        The store tier the prefix came from.
    reason : str
        Why, in words.
    lookup_s : float
        Host seconds the lookup took (part of ``predicted_s``; 0 when the store was not looked up).
    """

    choice: str
    prompt_tokens: int
    stored_tokens: int
    front_tokens: int = 0
    loaded_tokens: int = 0
    recomputed_tokens: int = 0
    predicted_s: float | None = None
    recompute_s: float | None = None
    tier: str = ""
    reason: str = ""
    lookup_s: float = 0.0
    _clock: Any = field(default=None, repr=False, compare=False)

    @property
    def actual_s(self) -> float | None:
        """Measured seconds from ``from_prefix`` until the first forward reached its last layer, or ``None``
        before that (reading it waits for the GPU to get there)."""
        return None if self._clock is None else self._clock.elapsed_s()

    def as_dict(self) -> dict:
        """The plan as a JSON-able dict (with ``actual_s``)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}  # no deep copy of the clock
        d["actual_s"] = self.actual_s
        return d


def _overlap(a: float, b: float, layers: int) -> float:
    """Two layer-by-layer streams of work, ``a`` and ``b`` seconds, pipelined over ``layers`` layers."""
    return max(a, b) + min(a, b) / max(1, layers)


def predict(prompt_tokens: int, stored_tokens: int, front_tokens: int, bytes_per_token: float, tier: TierCost,
            prefill: PrefillTime, *, layers: int, layerwise: bool, spent_s: float = 0.0) -> float:
    """Predicted seconds to the first token when ``front_tokens`` are recomputed while the tier loads
    ``[front_tokens, stored_tokens)``, then the rest of the prompt is prefilled.

    The file opens come first, on the caller's thread; then the front recompute and the tier's verified
    reads run at once; the host-to-device copy follows the reads (beside the front's compute while that
    still runs), and a layer-wise load pipelines what is left of it with the suffix prefill layer by
    layer. ``spent_s``: host seconds already spent before the plan (the lookup), added as they are.
    """
    n, m, x = prompt_tokens, stored_tokens, front_tokens
    tokens = m - x
    nbytes = tokens * bytes_per_token
    opens = tier.opens_s(tokens) if nbytes > 0 else 0.0
    front = prefill(x, 0)
    fetch = tier.fetch_s(nbytes, tokens) - opens
    beside = tier.copy_s(nbytes, beside_compute=True)  # copying while the model computes
    done = min(1.0, max(0.0, front - fetch) / beside) if x > 0 and beside > 0 else 0.0  # share copied beside the front
    suffix = prefill(n - m, m)
    if layerwise:  # the rest of the copy runs beside the suffix prefill, layer by layer
        tail = _overlap((1 - done) * beside, suffix, layers)
    else:
        tail = (1 - done) * tier.copy_s(nbytes) + suffix
    return spent_s + opens + max(front, fetch) + tail


def _best_front(n: int, m: int, bytes_per_token: float, tier: TierCost, prefill: PrefillTime, *, layers: int,
                granularity: int, split: bool, layerwise: bool, spent_s: float, limit: float) -> tuple[int, float]:
    """The front ``x`` of the fastest predicted plan whose worst case (the load ``tier.safety`` slower) is
    within ``limit`` seconds; ``(0, inf)`` if none is."""
    g = max(1, int(granularity))
    worst = tier.worst()

    def _at(x: int) -> tuple[float, float]:
        t = predict(n, m, x, bytes_per_token, tier, prefill, layers=layers, layerwise=layerwise, spent_s=spent_s)
        w = t if worst is tier else predict(n, m, x, bytes_per_token, worst, prefill, layers=layers,
                                              layerwise=layerwise, spent_s=spent_s)
        return (t, w) if w <= limit else (math.inf, w)

    # ~24 points, then zoom in around the best, 16 points a level, down to the granularity or m / 512 tokens
    # (closer splits differ by under 0.2 % of the prediction); ~70 predictions instead of one per token, since
    # the plan is made on the request's critical path (~0.4 ms on an H200 host at 8k tokens, bench/NOTES.md)
    finest = g * max(1, m // 512 // g)
    step = g * max(1, math.ceil(m / g / 24))
    points = {x: _at(x) for x in (range(0, m, step) if split else [0])}
    best_x = min(points, key=lambda x: points[x])  # the fastest that keeps the guarantee, else the least bad worst
    while split and step > finest:
        lo, hi = max(0, best_x - step), min(m, best_x + step)
        step = max(finest, g * max(1, math.ceil((hi - lo) / g / 16)))
        for x in range(lo - lo % g, hi, step):
            points.setdefault(x, _at(x))
        best_x = min(points, key=lambda x: points[x])
    return best_x, points[best_x][0]


def plan_reuse(prompt_tokens: int, stored_tokens: int, bytes_per_token: float, tier: TierCost,
               prefill: PrefillTime, *, layers: int, granularity: int = 1, split: bool = True,
               layerwise: bool = True, tier_name: str = "", spent_s: float = 0.0,
               margin: float = MARGIN) -> ReusePlan:
    """The fastest predicted way to the first token of a prompt whose first ``stored_tokens`` are stored.

    A plan that loads is chosen only if it is predicted to beat recomputing by ``margin`` (relative), and
    if even with the load ``tier.safety`` slower than predicted it would not be slower than recomputing;
    the split point is the fastest one that keeps that guarantee.

    Parameters
    ----------
    prompt_tokens, stored_tokens : int
        ``T`` and the tokens the lookup matched (``<= T - 1``).
    bytes_per_token : float
        Bytes of KV per token over all layers.
    tier : TierCost
        The read cost of the tier holding the prefix.
    prefill : PrefillTime
        The model's prefill time on the device.
    layers : int
        Layers of the model (a layer-wise load pipelines over them).
    granularity : int
        A split point must be a multiple of it (a file store's chunk size).
    split : bool
        Whether the compute/load split is possible (the caller can run the model on the front).
    layerwise : bool
        Whether the load lands layer by layer, overlapping the suffix prefill.
    spent_s : float
        Host seconds already spent on this prompt (the lookup): part of every prediction, recomputing too.
    margin : float
        Relative win a loading plan must predict.

    Returns
    -------
    ReusePlan
        Not yet run (``actual_s`` is ``None``); ``predicted_s`` includes ``spent_s``, ``recompute_s`` does not.
    """
    n, m = int(prompt_tokens), int(stored_tokens)
    recompute = prefill(n)
    if m <= 0:
        return ReusePlan("none", n, 0, recomputed_tokens=n, predicted_s=spent_s + recompute, recompute_s=recompute,
                         tier=tier_name, reason="nothing stored", lookup_s=spent_s)
    best_x, best = _best_front(n, m, bytes_per_token, tier, prefill, layers=layers, granularity=granularity,
                               split=split, layerwise=layerwise, spent_s=spent_s, limit=spent_s + recompute)
    if best > (1 - margin) * (spent_s + recompute):
        why = (f"loading is predicted slower ({best * 1e3:.1f} ms) than recomputing" if math.isfinite(best) else
               f"a load {tier.safety:.0%} slower than predicted would be slower than recomputing")
        return ReusePlan("recompute", n, m, recomputed_tokens=n, predicted_s=spent_s + recompute,
                         recompute_s=recompute, tier=tier_name, lookup_s=spent_s,
                         reason=f"{why} ({(spent_s + recompute) * 1e3:.1f} ms, {spent_s * 1e3:.2f} ms of it the lookup)")
    choice = "split" if best_x else "load"
    return ReusePlan(choice, n, m, front_tokens=best_x, loaded_tokens=m - best_x, recomputed_tokens=n - m + best_x,
                     predicted_s=best, recompute_s=recompute, tier=tier_name, lookup_s=spent_s,
                     reason=f"predicted {best * 1e3:.1f} ms against {(spent_s + recompute) * 1e3:.1f} ms recomputing "
                            f"({spent_s * 1e3:.2f} ms of each the lookup)")


@functools.lru_cache(maxsize=4096)  # a pure function of hashable figures: a repeated prompt length costs a lookup
def reuse_bound(prompt_tokens: int, bytes_per_token: float, tier: TierCost, prefill: PrefillTime, *, layers: int,
                split: bool = True, layerwise: bool = True, lookup_s: float = 0.0,
                margin: float = MARGIN) -> float | None:
    """Before any lookup: the fastest predicted time to the first token any stored prefix could give, or ``None``
    when even the best case cannot beat recomputing (so the store need not be looked up at all).

    The best case stores every token but the last (``T - 1``), split at any token, at the tier's figures;
    ``lookup_s`` is the lookup's estimated host time (:class:`~kvstream.stores.calibration.HostCost`). The
    test is :func:`plan_reuse`'s (the margin and the tier's safety), so a tier this refuses could not have
    been chosen after its lookup either.
    """
    n = int(prompt_tokens)
    if n < 2:
        return None
    recompute = prefill(n)
    _, best = _best_front(n, n - 1, bytes_per_token, tier, prefill, layers=layers, granularity=1, split=split,
                          layerwise=layerwise, spent_s=lookup_s, limit=recompute)
    return best if best <= (1 - margin) * recompute else None


__all__ = ["CACHE_ENV", "DRIFT", "EWMA_WEIGHT", "MARGIN", "LOAD_SAFETY", "COPY_CONTENTION", "cache_dir", "read_json",
           "update_json", "TierCost", "PrefillTime", "ReusePlan", "predict", "plan_reuse", "reuse_bound",
           "Calibration", "HostCost", "device_copy_Bps"]
