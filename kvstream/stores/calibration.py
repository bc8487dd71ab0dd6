"""Measured figures the cost plan (:mod:`kvstream.stores.cost`) runs on, and where they are cached.

* :class:`Calibration` — a store tier's fetch rate, cached in a JSON file and replaced when observed
  loads drift from it;
* :func:`device_copy_Bps` — a device's host-to-device copy rate, measured once per device name;
* :class:`HostCost` — a running estimate of a store's host seconds per lookup (the hashing and file
  checks every plan pays before it can decide), so a plan can be made before the lookup runs.

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
from pathlib import Path
from typing import Any

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


class HostCost:
    """A running estimate (EWMA) of a store's host seconds per lookup: ``fixed_s + per_token_s * tokens``.

    Observed by :func:`~kvstream.integrations.hf.reuse.fill_from_prefix` around every lookup it runs; read
    before the next one to decide whether the lookup is worth running at all. Until the first
    observation the estimate is 0 (a lookup is never skipped for its own cost before it was measured).
    """

    def __init__(self) -> None:
        self._per_token: float | None = None
        self._lock = threading.Lock()

    def observe(self, tokens: int, seconds: float) -> None:
        """Record a lookup of ``tokens`` prompt tokens that took ``seconds`` on the host."""
        if tokens <= 0 or seconds < 0:
            return
        rate = seconds / tokens
        with self._lock:
            self._per_token = rate if self._per_token is None else EWMA_WEIGHT * rate + (1 - EWMA_WEIGHT) * self._per_token

    def estimate(self, tokens: int) -> float:
        """Predicted host seconds of a lookup of ``tokens`` prompt tokens (0 before any observation)."""
        with self._lock:
            return 0.0 if self._per_token is None else self._per_token * max(0, tokens)


__all__ = ["CACHE_ENV", "DRIFT", "EWMA_WEIGHT", "COPY_PROBE_BYTES", "cache_dir", "read_json", "update_json",
           "Calibration", "device_copy_Bps", "HostCost"]
