"""Load or recompute: what a stored prefix costs to load, what it costs to recompute, and the plan between them.

A stored prefix helps only when loading it is faster than recomputing it: an H200 prefills an
8192-token Llama-3-8B prompt in ~258 ms, and 0.94 GB of its KV took 543-614 ms to read from a disk at
~1.9 GB/s (bench/NOTES.md, prefix topic). So every reuse is planned from measured figures:

* :class:`TierCost` — a store tier's read cost onto a device: ``fetch`` (tier to host memory, e.g. a
  disk read; none for host memory) and ``copy`` (host to device, which a layer-wise load overlaps with
  the prefill). Stores calibrate it once and cache it (:class:`Calibration`); ``store.tier_cost = ...``
  overrides it (tests, a known disk).
* :class:`PrefillTime` — the model's prefill time on a device, ``a + b*new + c*new*(past + new/2)``
  seconds (a fixed cost, the per-token layers, attention over every earlier token), fitted to
  measurements (:meth:`PrefillTime.fit`; the HF integration measures and caches it per model and device).
* :func:`plan_reuse` — picks, among "recompute everything", "load the stored prefix" and the
  compute/load split of "Cake: compute or load KV cache? why not both" (arXiv 2410.03065: recompute the
  first ``x`` stored tokens while the tier loads the rest, both at once), the one predicted fastest.

The figures are cached as small JSON files (:func:`cache_dir`: ``$KVSTREAM_CACHE_DIR`` or
``~/.cache/kvstream``; a file store's disk figure beside the store), written atomically and best-effort
(a read-only directory only means measuring again).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from ..cuda import host_empty

#: Environment variable naming the directory of kvstream's cached measurements.
CACHE_ENV = "KVSTREAM_CACHE_DIR"
#: Relative change of an observed figure that replaces a cached calibration.
DRIFT = 0.25
#: Weight of the newest observation in the running estimate of a tier's bandwidth.
EWMA_WEIGHT = 0.3
#: Bytes the host-to-device calibration copies (large enough to reach the copy engine's rate).
COPY_PROBE_BYTES = 32 << 20


def cache_dir() -> Path:
    """Where kvstream caches measurements: ``$KVSTREAM_CACHE_DIR``, else ``~/.cache/kvstream``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kvstream")


def read_json(path: Path) -> dict:
    """The JSON document in ``path``, or ``{}`` if it is missing or unreadable (a cache, never an error)."""
    try:
        with open(path) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def update_json(path: Path, key: str, value: Any) -> bool:
    """Set ``doc[key] = value`` in the JSON file ``path`` (temp file + rename); ``False`` if it cannot be written."""
    doc = read_json(path)
    doc[key] = value
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        os.makedirs(path.parent, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False


@dataclass(frozen=True)
class TierCost:
    """The measured cost of loading KV from one store tier onto one device.

    Parameters
    ----------
    fetch_Bps : float or None
        Bytes per second from the tier into host memory (a disk read); ``None`` when the tier *is* host
        memory (:class:`~kvstream.stores.radix.RadixStore`).
    copy_Bps : float
        Bytes per second from host memory onto the device (pinned ``cudaMemcpyAsync``; a memcpy on the CPU).
    latency_s : float
        Fixed seconds per load before the first byte (opens, headers).
    """

    fetch_Bps: float | None
    copy_Bps: float
    latency_s: float = 0.0

    def fetch_s(self, nbytes: float) -> float:
        """Seconds to bring ``nbytes`` into host memory (0 for a host-memory tier)."""
        if self.fetch_Bps is None or nbytes <= 0:
            return 0.0
        return self.latency_s + nbytes / self.fetch_Bps

    def copy_s(self, nbytes: float) -> float:
        """Seconds to copy ``nbytes`` from host memory to the device."""
        return max(0.0, nbytes) / self.copy_Bps


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
            prefill: PrefillTime, *, layers: int, layerwise: bool) -> float:
    """Predicted seconds to the first token when ``front_tokens`` are recomputed while the tier loads
    ``[front_tokens, stored_tokens)``, then the rest of the prompt is prefilled.

    The front recompute and the tier's fetch run at once; the host-to-device copy follows the fetch
    (or runs beside the front recompute once the fetch is done), and a layer-wise load pipelines what
    is left of it with the suffix prefill layer by layer.
    """
    n, m, x = prompt_tokens, stored_tokens, front_tokens
    nbytes = (m - x) * bytes_per_token
    front = prefill(x, 0)
    fetch, copy = tier.fetch_s(nbytes), tier.copy_s(nbytes)
    copy_left = max(0.0, copy - max(0.0, front - fetch))
    suffix = prefill(n - m, m)
    tail = _overlap(copy_left, suffix, layers) if layerwise else copy_left + suffix
    return max(front, fetch) + tail


def plan_reuse(prompt_tokens: int, stored_tokens: int, bytes_per_token: float, tier: TierCost,
               prefill: PrefillTime, *, layers: int, granularity: int = 1, split: bool = True,
               layerwise: bool = True, tier_name: str = "") -> ReusePlan:
    """The fastest predicted way to the first token of a prompt whose first ``stored_tokens`` are stored.

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

    Returns
    -------
    ReusePlan
        Not yet run (``actual_s`` is ``None``).
    """
    n, m = int(prompt_tokens), int(stored_tokens)
    recompute = prefill(n, 0)
    if m <= 0:
        return ReusePlan("none", n, 0, recomputed_tokens=n, predicted_s=recompute, recompute_s=recompute,
                         tier=tier_name, reason="nothing stored")
    g = max(1, int(granularity))
    step = g * max(1, math.ceil(m / g / 256))  # at most ~256 split points
    fronts = list(range(0, m, step)) if split else [0]
    best_x, best = 0, math.inf
    for x in fronts:
        t = predict(n, m, x, bytes_per_token, tier, prefill, layers=layers, layerwise=layerwise)
        if t < best:
            best_x, best = x, t
    if best >= recompute:
        return ReusePlan("recompute", n, m, recomputed_tokens=n, predicted_s=recompute, recompute_s=recompute,
                         tier=tier_name, reason=f"loading is predicted slower ({best * 1e3:.1f} ms) than recomputing "
                                               f"({recompute * 1e3:.1f} ms)")
    choice = "split" if best_x else "load"
    return ReusePlan(choice, n, m, front_tokens=best_x, loaded_tokens=m - best_x, recomputed_tokens=n - m + best_x,
                     predicted_s=best, recompute_s=recompute, tier=tier_name,
                     reason=f"predicted {best * 1e3:.1f} ms against {recompute * 1e3:.1f} ms recomputing")


class Calibration:
    """A tier's fetch figure, cached in a JSON file under one key and refreshed when observed loads drift.

    Parameters
    ----------
    path : Path
        The JSON file (shared by every key: hosts, options).
    key : str
        This tier's entry.
    """

    def __init__(self, path: Path, key: str):
        self.path, self.key = Path(path), key
        self._value: dict | None = None
        self._ewma: float | None = None
        self._lock = threading.Lock()

    def get(self) -> dict | None:
        """The cached figure (``{"fetch_Bps": ..., "latency_s": ...}``), or ``None`` if never measured."""
        with self._lock:
            if self._value is None:
                value = read_json(self.path).get(self.key)
                if isinstance(value, dict) and isinstance(value.get("fetch_Bps"), (int, float)) \
                        and value["fetch_Bps"] > 0:
                    self._value = value
            return self._value

    def set(self, fetch_Bps: float, latency_s: float, how: str) -> dict:
        """Cache a new figure (``how``: "probe" or "observed"); returns it."""
        value = {"fetch_Bps": float(fetch_Bps), "latency_s": float(latency_s), "how": how, "at": time.time()}
        with self._lock:
            self._value = value
            self._ewma = None
        update_json(self.path, self.key, value)
        return value

    def observe(self, nbytes: int, seconds: float) -> bool:
        """Record a load of ``nbytes`` in ``seconds``; ``True`` if the running estimate drifted past
        :data:`DRIFT` and replaced the cached figure."""
        if nbytes <= 0 or seconds <= 0:
            return False
        current = self.get()
        with self._lock:
            bps = nbytes / seconds
            self._ewma = bps if self._ewma is None else EWMA_WEIGHT * bps + (1 - EWMA_WEIGHT) * self._ewma
            ewma = self._ewma
        if current is None or abs(ewma - current["fetch_Bps"]) <= DRIFT * current["fetch_Bps"]:
            return False
        self.set(ewma, current.get("latency_s", 0.0), "observed")
        return True


_COPY_BPS: dict[str, float] = {}
_COPY_LOCK = threading.Lock()


def device_copy_Bps(device: torch.device) -> float:
    """Host-to-device copy bandwidth of ``device`` in bytes/s: measured once (pinned memory onto a GPU, a
    memcpy on the CPU), cached in the process and in :func:`cache_dir` ``/devices.json`` by device name."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    with _COPY_LOCK:
        if name in _COPY_BPS:
            return _COPY_BPS[name]
        path = cache_dir() / "devices.json"
        entry = read_json(path).get(name)
        cached = entry.get("copy_Bps") if isinstance(entry, dict) else None
        if isinstance(cached, (int, float)) and cached > 0:
            _COPY_BPS[name] = float(cached)
            return _COPY_BPS[name]
        src = host_empty(COPY_PROBE_BYTES, pin=device.type == "cuda")
        src.fill_(1)
        dst = torch.empty(COPY_PROBE_BYTES, dtype=torch.uint8, device=device)
        best = math.inf
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        _COPY_BPS[name] = COPY_PROBE_BYTES / max(best, 1e-9)
        update_json(path, name, {"copy_Bps": _COPY_BPS[name], "at": time.time()})
        return _COPY_BPS[name]


__all__ = ["CACHE_ENV", "DRIFT", "cache_dir", "read_json", "update_json", "TierCost", "PrefillTime", "ReusePlan",
           "predict", "plan_reuse", "Calibration", "device_copy_Bps"]
