"""Timing: quantile statistics, device and host timers, alternating repetitions, progress lines.

After Triton's ``triton.testing.do_bench`` and Liger-Kernel's benchmark scripts: device work is timed with
CUDA events through ``do_bench`` (median and the 20th/80th percentiles, after warm-up, with the L2 cache
flushed between repetitions); work that involves the host (transports, generate) is timed with a host
clock between ``torch.cuda.synchronize()`` calls. End-to-end comparisons run their sides in alternating
order (:func:`alternating`), so that drift on a shared machine falls on both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

_T0 = time.perf_counter()


def progress(msg: str) -> None:
    """Print a progress line with the seconds since the suite started (flushed at once)."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    """Wait for all work on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Stat:
    """Median and 20th/80th percentiles of a measurement, in one unit."""

    p50: float
    p20: float
    p80: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stat":
        """Quantiles of ``samples`` (at least one)."""
        t = torch.tensor(list(samples), dtype=torch.float64)
        if t.numel() == 0:
            raise ValueError("Stat.of needs at least one sample")
        q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
        return cls(*q)

    @classmethod
    def exact(cls, value: float) -> "Stat":
        """A single derived figure (all three quantiles equal)."""
        return cls(value, value, value)

    def rate(self, amount: float) -> "Stat":
        """``amount`` per unit of this (time) stat; the quantiles swap so that ``p20 <= p50 <= p80`` holds."""
        return Stat(amount / self.p50, amount / self.p80, amount / self.p20)

    def scale(self, factor: float) -> "Stat":
        """Every quantile times ``factor``."""
        return Stat(self.p50 * factor, self.p20 * factor, self.p80 * factor)


def time_host(fn: Callable[[], Any], *, device: torch.device, reps: int, warmup: int = 1,
              setup: Callable[[], Any] | None = None) -> Stat:
    """Wall-clock milliseconds of ``fn()``, synchronizing ``device`` before and after each call.

    For work that involves the host (transports, ``generate``), where the host's share is part of the cost.
    ``setup()`` (untimed) runs before every call, warm-up included (e.g. dropping the page cache).
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    sync(device)
    samples = []
    for _ in range(max(1, reps)):
        if setup is not None:
            setup()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return Stat.of(samples)


def time_device(fn: Callable[[], Any], *, device: torch.device, quick: bool = False, warmup_ms: float = 25,
                rep_ms: float = 200) -> Stat:
    """Milliseconds of stream-ordered device work ``fn()``.

    On a CUDA device: ``triton.testing.do_bench`` (CUDA events around each call, the L2 cache flushed in
    between, median and 20th/80th percentiles after ``warmup_ms`` of warm-up). On the CPU: :func:`time_host`.
    """
    if device.type != "cuda":
        return time_host(fn, device=device, reps=2 if quick else 10, warmup=1)
    import triton.testing

    if quick:
        warmup_ms, rep_ms = 5, 20
    q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Stat(*q)


def alternating(providers: Sequence[str], reps: int) -> Iterator[tuple[int, str]]:
    """``(rep, provider)`` for ``reps`` rounds over ``providers``, every other round reversed (A B, B A, ...).

    Examples
    --------
    >>> list(alternating(["a", "b"], 2))
    [(0, 'a'), (0, 'b'), (1, 'b'), (1, 'a')]
    """
    for rep in range(reps):
        for provider in (providers if rep % 2 == 0 else providers[::-1]):
            yield rep, provider


def time_alternating(fns: dict[str, Callable[[], Any]], *, device: torch.device, reps: int, warmup: int = 1,
                     setups: dict[str, Callable[[], Any]] | None = None) -> dict[str, list[float]]:
    """Wall-clock milliseconds of every ``fns[name]()``, ``reps`` rounds in :func:`alternating` order.

    Each call is preceded by its untimed ``setups[name]()`` (dropping the page cache, say) and bracketed by
    synchronizations of ``device``; ``warmup`` untimed calls of each come first. Returns the samples by name,
    for :meth:`Stat.of` and :func:`spread`.
    """
    setups = setups or {}
    for name, fn in fns.items():
        for _ in range(warmup):
            if name in setups:
                setups[name]()
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _, name in alternating(list(fns), max(1, reps)):
        if name in setups:
            setups[name]()
        sync(device)
        t0 = time.perf_counter()
        fns[name]()
        sync(device)
        samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def spread(samples: Sequence[float]) -> dict[str, float]:
    """``{"median", "min", "max", "n"}`` of ``samples`` (at least one), for a summary's detail."""
    s = sorted(samples)
    return {"median": Stat.of(s).p50, "min": s[0], "max": s[-1], "n": len(s)}


def compare(ours: Sequence[float], base: Sequence[float]) -> dict[str, Any]:
    """An end-to-end comparison of two sides measured in alternating repetitions (lower is better).

    Returns both sides' median, min and max, the ``effect`` (median over median, minus 1) and ``noisy``:
    True when either side's spread (max - min, relative to its median) exceeds the size of the effect, so
    the difference cannot be told from the machine's noise (bench/NOTES.md: such a comparison is not
    counted as met). ``pairs`` is the median, min and max of the per-repetition effects ``ours[i] / base[i] - 1``
    (the i-th repetitions of an :func:`alternating` run are neighbours in time, so slow drift of the machine
    cancels in each pair).
    """
    a, b = spread(ours), spread(base)
    effect = a["median"] / b["median"] - 1
    rel = max((a["max"] - a["min"]) / a["median"], (b["max"] - b["min"]) / b["median"])
    n = min(len(ours), len(base))
    return {"ours": a, "base": b, "effect": effect, "relative_spread": rel, "noisy": bool(rel > abs(effect)),
            "reps": n, "pairs": spread([o / b_ - 1 for o, b_ in zip(ours[:n], base[:n])])}
