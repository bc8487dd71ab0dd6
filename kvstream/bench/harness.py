"""The shared benchmark harness: timing, ceilings, random inputs, CSV rows, the markdown table, summary.json.

Every topic script builds a :class:`Run` from its command line, measures, and records:

* **one long CSV row per measurement** (:data:`COLUMNS`), appended to ``<out>/<topic>.csv``;
* a **markdown table** of the run's rows on stdout;
* **headline figures** merged into ``<out>/summary.json`` through :func:`record_summary` (one object, one
  entry per key, each with its value, the ceiling or peer it is compared with, the ratio, the target and
  pass/fail, plus device and date). Other topics (``kvstream/bench/prefix.py``, ``kvstream/bench/nccl_handoff.py``)
  call :func:`record_summary` (or :meth:`Run.summary`) the same way::

      from kvstream.bench.harness import Run
      run = Run.from_argv("prefix", argv)
      ...
      run.summary("prefix_ttft_speedup", value=7.2, unit="x", ceiling=None, ceiling_of="full prefill",
                  target=">= 5", target_of="value")
      run.finish()

Timing (after Triton's ``triton.testing.do_bench`` and Liger-Kernel's benchmark scripts): device work is
timed with CUDA events through ``do_bench`` (median and the 20th/80th percentiles, after warm-up, with
the L2 cache flushed between repetitions); work that involves the host (transports, generate) is timed
with a host clock between ``torch.cuda.synchronize()`` calls. ``--quick`` runs tiny shapes with a few
repetitions on whatever device there is (the CPU in CI) and makes **no timing claims**: its summary
entries carry ``"quick": true`` and ``"pass": null``, and it writes to a temporary directory unless
``--out`` is given, never to ``bench/results``.

Ceilings are measured in the same run as what is compared with them (the machines are shared and
figures move from run to run): :func:`ceiling_d2d` (device-to-device copy, bytes read + written per
second), :func:`ceiling_memcpy` (pinned ``cudaMemcpyAsync`` device-to-host / host-to-device) and
:func:`ceiling_disk` (raw ``O_DIRECT`` writes and reads of 16 MiB blocks, like ``dd``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import math
import mmap
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

#: Columns of every CSV row, in order.
COLUMNS: tuple[str, ...] = ("bench", "provider", "x", "metric", "unit", "p50", "p20", "p80", "device", "torch",
                            "triton", "transformers", "git_sha", "date")

#: summary.json keys and what they hold (the issue's targets; other helpers' keys included).
SUMMARY_KEYS: dict[str, str] = {
    "pack_vs_copy": "pack/unpack bytes read+written per s over a device-to-device copy of the same bytes",
    "pack_vs_torch": "pack/unpack over the torch reference (strided copy)",
    "decode_step_us": "newest token of all layers packed and landed in pinned host memory, microseconds",
    "d2h_vs_memcpy": "packed chunks device -> pinned host over cudaMemcpyAsync of the same bytes",
    "h2d_vs_memcpy": "packed chunks pinned host -> device over cudaMemcpyAsync of the same bytes",
    "disk_write_vs_raw": "DiskTransport writes over raw O_DIRECT writes of the same bytes and block size",
    "disk_read_vs_raw": "DiskTransport reads over raw O_DIRECT reads of the same bytes and block size",
    "stream_overhead": "HF generate streaming all KV to host: extra time over no streaming (fraction)",
    "offload_vs_dynamic": "StreamingCache(offload=True) over DynamicCache, same run",
    "hf_offload_vs_dynamic": "HF's DynamicCache(offloading=True) over DynamicCache, same run (the peer)",
    "levels": "DéjàVuLib levels 0-3 (paper Fig. 7): buffered over naive, all over buffered",
    "prefix_ttft_speedup": "time to first token with a stored 90% prefix over full prefill (kvstream/bench/prefix.py)",
    "file_store_read_vs_raw": "chunk file store reads over raw disk reads (kvstream/bench/prefix.py)",
    "file_store_write_vs_raw": "chunk file store writes over raw disk writes (kvstream/bench/prefix.py)",
    "nccl_handoff_vs_raw": "KV handoff over raw nccl4py send/recv of the same bytes (kvstream/bench/nccl_handoff.py)",
}

#: Block size of the raw disk ceiling: 16 MiB, as in DEVICE.md's ``dd`` measurement.
RAW_DISK_BLOCK_BYTES = 16 << 20
#: Alignment O_DIRECT needs for offsets, sizes and buffers (a page covers every common logical block).
DIRECT_ALIGN_BYTES = 4096

GB = 1e9
MiB = 1 << 20
GiB = 1 << 30

_T0 = time.perf_counter()


# ----------------------------------------------------------------------------------------------------
# Paths and environment
# ----------------------------------------------------------------------------------------------------

def bench_dir() -> Path:
    """The ``kvstream/bench/`` package directory holding this file."""
    return Path(__file__).resolve().parent


def repo_root() -> Path | None:
    """The source checkout this package runs from: the directory holding ``pyproject.toml`` above
    ``kvstream/``; ``None`` for an installed package."""
    root = bench_dir().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def default_results_dir() -> Path:
    """Where a full (non-quick) run writes: ``<repo root>/bench/results`` from a source checkout, else
    ``./bench/results``."""
    return (repo_root() or Path.cwd()) / "bench" / "results"


def progress(msg: str) -> None:
    """Print a progress line with the seconds since the suite started (flushed at once)."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def use_interpreter_without_gpu() -> None:
    """Run Triton kernels under the interpreter when there is no CUDA GPU.

    ``TRITON_INTERPRET`` is read when kernels are decorated, so this must run before ``kvstream.kernels``
    (or anything that imports triton) is imported; the topic scripts import kvstream lazily for that reason.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - a missing distribution is reported as such
        return "absent"


def _git_sha() -> str:
    env = os.environ.get("KVSTREAM_GIT_SHA")
    if env:
        return env
    root = repo_root()
    if root is None:
        return "unknown"
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "-uno"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    """Human name of ``device`` ("NVIDIA H100 80GB HBM3", or "cpu (x86_64)")."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine() or 'unknown'})"


def environment(device: torch.device) -> dict[str, str]:
    """The per-row context columns: device, versions, git sha and the run's start date (UTC, ISO 8601)."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "git_sha": _git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def sync(device: torch.device) -> None:
    """Wait for all work on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    """Drop unreferenced tensors and return cached CUDA and pinned host memory to the driver (between topics)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        try:
            from kvstream.cuda.memory import default_allocator

            default_allocator().trim()
        except ImportError:
            pass


# ----------------------------------------------------------------------------------------------------
# Statistics and timing
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------

def random_tensor(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor of random values (never zeros: they hide unwritten outputs and can run faster)."""
    if dtype.is_floating_point:
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return torch.randn(tuple(shape), device=device).to(dtype)
        return torch.randn(tuple(shape), dtype=dtype, device=device)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), tuple(shape), dtype=dtype, device=device)


def random_hf_cache(num_layers: int, batch: int, kv_heads: int, seq: int, head_dim: int, dtype: torch.dtype,
                    device: torch.device | str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer key and value tensors ``[batch, kv_heads, seq, head_dim]`` (HF layout), random."""
    keys = [random_tensor((batch, kv_heads, seq, head_dim), dtype, device) for _ in range(num_layers)]
    values = [random_tensor((batch, kv_heads, seq, head_dim), dtype, device) for _ in range(num_layers)]
    return keys, values


def pinned_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An empty host tensor in pinned memory (kvstream's allocator when it is there, torch's otherwise).

    Plain host memory without a GPU.
    """
    try:
        from kvstream.cuda.memory import pinned_like
    except ImportError:
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=torch.cuda.is_available())
    return pinned_like(tuple(shape), dtype)


def tensor_nbytes(tensors: Iterable[torch.Tensor] | torch.Tensor) -> int:
    """Bytes of a tensor or of several, from ``numel() * element_size()``."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_region(chunk: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], layers: range,
                 t0: int, t1: int, what: str) -> None:
    """Raise ``RuntimeError`` unless ``chunk[i, 0]``/``chunk[i, 1]`` equal ``keys``/``values[l][:, :, t0:t1]`` bit for bit."""
    for i, l in enumerate(layers):
        for kv, src in ((0, keys[l]), (1, values[l])):
            part = chunk[i, kv]
            ref = src[:, :, t0:t1]
            if part.device != ref.device:
                ref = ref.to(part.device)
            if not torch.equal(part, ref):
                raise RuntimeError(f"{what}: layer {l} {'KV'[kv]} differs from its source; not timing a wrong result")


# ----------------------------------------------------------------------------------------------------
# summary.json
# ----------------------------------------------------------------------------------------------------

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b,
}


def check_target(target: str, figure: float | None) -> bool | None:
    """Whether ``figure`` meets ``target`` (``">= 0.90"``, ``"<= 15"``); ``None`` for ``"reported"`` or no figure.

    Raises
    ------
    ValueError
        If ``target`` is neither ``"reported"`` nor ``"<op> <number>"`` with op in ``>=, <=, >, <``.
    """
    text = target.strip()
    if text.startswith("reported"):
        return None
    op = next((o for o in (">=", "<=", ">", "<") if text.startswith(o)), None)
    if op is None:
        raise ValueError(f"Unparsable target {target!r}: expected 'reported' or '<op> <number>' with op in >=, <=, >, <")
    bound = float(text[len(op):])
    if figure is None or (isinstance(figure, float) and math.isnan(figure)):
        return None
    return _OPS[op](float(figure), bound)


def _jsonable(obj: Any) -> Any:
    """``obj`` with dict keys as strings and anything JSON cannot hold as its ``str`` (NaN kept)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _locked_update(path: Path, update: Callable[[dict], None]) -> dict:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent, os.O_RDONLY)  # lock the directory: no lock file left behind
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc: dict = {}
        if path.exists():
            try:
                doc = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it, it is written by the suite") from None
        update(doc)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        os.close(lock)  # closing the descriptor releases the lock
    return doc


def record_summary(out_dir: str | Path, key: str, *, value: float | None, unit: str, ceiling: float | None,
                   ceiling_of: str, target: str, target_of: str = "ratio", ratio: float | None = None,
                   conditions: dict[str, bool] | None = None, provider: str | None = None,
                   detail: dict | None = None, env: dict[str, str] | None = None, quick: bool = False) -> dict:
    """Merge one entry into ``<out_dir>/summary.json`` (created if absent; other keys are kept).

    Parameters
    ----------
    out_dir : path
        Results directory (``bench/results`` for a full run).
    key : str
        Entry name, normally one of :data:`SUMMARY_KEYS`.
    value : float or None
        The figure measured (``None`` when it could not be measured; ``detail`` should say why).
    unit : str
        Unit of ``value`` (``"x"`` for a ratio, ``"us"``, ``"fraction"``).
    ceiling : float or None
        The ceiling or peer figure ``value`` is compared with, in ``unit`` (or the peer's own unit for a ratio).
    ceiling_of : str
        What the ceiling or peer is ("device-to-device copy, same bytes, same run").
    target : str
        ``">= 0.90"``, ``"<= 15"`` or ``"reported"``.
    target_of : {"ratio", "value"}
        Which figure the target applies to.
    ratio : float, optional
        ``value / ceiling`` unless given.
    conditions : dict of str to bool, optional
        Further conditions that must all hold to pass (e.g. ``{"kv_layers_resident<=2": True}``); with a
        ``"reported"`` target they alone decide ``pass``.
    detail : dict, optional
        Every figure behind the entry (per size, per provider), JSON-able.
    env : dict, optional
        :func:`environment` of the run (device, date, versions, git sha).
    quick : bool
        A ``--quick`` run: ``pass`` is ``None`` (no timing claims).

    Returns
    -------
    dict
        The entry as written.

    Raises
    ------
    ValueError
        For ``target_of`` other than ``"ratio"``/``"value"`` or an unparsable target.
    """
    if target_of not in ("ratio", "value"):
        raise ValueError(f"target_of must be 'ratio' or 'value', got {target_of!r}")
    if ratio is None and value is not None and ceiling not in (None, 0):
        ratio = float(value) / float(ceiling)
    passed = check_target(target, ratio if target_of == "ratio" else value)
    if conditions and value is not None:  # a "reported" target with conditions passes on the conditions alone
        passed = (True if passed is None else passed) and all(conditions.values())
    if quick:
        passed = None
    env = env or {}
    entry = {
        "value": value, "unit": unit, "ceiling": ceiling, "ceiling_of": ceiling_of, "ratio": ratio,
        "target": target, "target_of": target_of, "pass": passed, "conditions": conditions or {},
        "provider": provider, "detail": _jsonable(detail or {}), "quick": bool(quick),
        "device": env.get("device"), "date": env.get("date"), "git_sha": env.get("git_sha"),
        "torch": env.get("torch"), "triton": env.get("triton"), "transformers": env.get("transformers"),
    }

    def update(doc: dict) -> None:
        doc[key] = entry
        doc["device"] = env.get("device")
        doc["date"] = env.get("date")

    _locked_update(Path(out_dir) / "summary.json", update)
    return entry


# ----------------------------------------------------------------------------------------------------
# The run: arguments, rows, CSV, table
# ----------------------------------------------------------------------------------------------------

def common_parser(topic: str, description: str | None = None) -> argparse.ArgumentParser:
    """The options every topic takes: ``--quick``, ``--out``, ``--device``, ``--layers``, ``--disk-dir``."""
    p = argparse.ArgumentParser(prog=f"kvstream.bench.{topic}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, few repetitions, any device; no timing claims; writes to a temp dir unless --out")
    p.add_argument("--out", default=None, help="results directory (default: bench/results, or a temp dir with --quick)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is a GPU)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the Llama-3-8B shape (default 32)")
    p.add_argument("--disk-dir", default=os.environ.get("KVSTREAM_BENCH_DISK"),
                   help="directory on the disk to measure (default: $KVSTREAM_BENCH_DISK, else the out dir)")
    return p


class Run:
    """One topic's measurements: options, context columns, rows; writes the CSV, table and summary entries.

    Parameters
    ----------
    topic : str
        File stem of the CSV (``kernels`` -> ``<out>/kernels.csv``).
    args : argparse.Namespace
        From :func:`common_parser` (plus the topic's own options).
    """

    def __init__(self, topic: str, args: argparse.Namespace):
        use_interpreter_without_gpu()
        self.topic = topic
        self.args = args
        self.quick = bool(args.quick)
        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"kvstream.bench.{topic}: --device {dev} but torch sees no CUDA GPU")
        if args.out:
            self.out_dir = Path(args.out)
        elif self.quick:
            self.out_dir = Path(tempfile.mkdtemp(prefix="kvstream-bench-"))
        else:
            self.out_dir = default_results_dir()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.env = environment(self.device)
        self.rows: list[dict[str, Any]] = []
        self._written = 0

    @classmethod
    def from_argv(cls, topic: str, argv: Sequence[str] | None, add_args: Callable[[argparse.ArgumentParser], None] | None = None,
                  description: str | None = None) -> "Run":
        """Parse ``argv`` with :func:`common_parser` plus ``add_args``' options and build the run."""
        p = common_parser(topic, description)
        if add_args is not None:
            add_args(p)
        args, unknown = p.parse_known_args(list(argv) if argv is not None else None)
        if unknown:  # run_all hands every topic the options meant for any of them
            print(f"kvstream.bench.{topic}: ignoring options it does not take: {unknown}", flush=True)
        return cls(topic, args)

    # -- recording -----------------------------------------------------------------------------------
    @property
    def is_cuda(self) -> bool:
        """Whether the run measures a CUDA device."""
        return self.device.type == "cuda"

    def add(self, bench: str, provider: str, x: Any, metric: str, unit: str, stat: Stat | float) -> Stat:
        """Record one measurement row; returns it as a :class:`Stat`."""
        if not isinstance(stat, Stat):
            stat = Stat.exact(float(stat))
        row = {"bench": bench, "provider": provider, "x": x, "metric": metric, "unit": unit,
               "p50": stat.p50, "p20": stat.p20, "p80": stat.p80, **self.env}
        self.rows.append(row)
        self.write_csv()  # at once: a run cut short (a device time limit) keeps what it measured
        return stat

    def add_time_and_bandwidth(self, bench: str, provider: str, x: Any, ms: Stat, nbytes: int,
                               time_unit: str = "ms", metric: str = "time") -> Stat:
        """Record the time (``ms`` in milliseconds, shown in ``time_unit``, as ``metric``) and ``nbytes`` per
        second in GB/s (as ``bandwidth``).

        Returns the bandwidth in GB/s.
        """
        scale = {"ms": 1.0, "us": 1e3, "s": 1e-3}[time_unit]
        self.add(bench, provider, x, metric, time_unit, ms.scale(scale))
        return self.add(bench, provider, x, "bandwidth", "GB/s", ms.rate(nbytes / GB * 1e3))

    def summary(self, key: str, **kw: Any) -> dict:
        """:func:`record_summary` into this run's out dir with its environment and quick flag."""
        return record_summary(self.out_dir, key, env=self.env, quick=self.quick, **kw)

    def time(self, fn: Callable[[], Any], **kw: Any) -> Stat:
        """:func:`time_device` on this run's device (quick settings in ``--quick``)."""
        return time_device(fn, device=self.device, quick=self.quick, **kw)

    def time_host(self, fn: Callable[[], Any], reps: int, warmup: int = 1,
                  setup: Callable[[], Any] | None = None) -> Stat:
        """:func:`time_host` on this run's device; one repetition in ``--quick``."""
        return time_host(fn, device=self.device, reps=1 if self.quick else reps, warmup=warmup, setup=setup)

    # -- output --------------------------------------------------------------------------------------
    def write_csv(self) -> Path:
        """Append the rows recorded since the last call to ``<out>/<topic>.csv`` (header if new). Returns the path."""
        path = self.out_dir / f"{self.topic}.csv"
        new_rows = self.rows[self._written:]
        if path.exists() and path.stat().st_size:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != COLUMNS:  # an older format: keep it aside, start a fresh file
                os.replace(path, path.with_suffix(".csv.old"))
        fresh = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if fresh:
                w.writeheader()
            for r in new_rows:
                w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})
        self._written = len(self.rows)
        return path

    def table(self) -> str:
        """The run's rows as a markdown table."""
        lines = ["| bench | provider | x | metric | p50 | p20 | p80 | unit |", "|---|---|---|---|---:|---:|---:|---|"]
        for r in self.rows:
            lines.append(f"| {r['bench']} | {r['provider']} | {r['x']} | {r['metric']} | {r['p50']:.4g} | "
                         f"{r['p20']:.4g} | {r['p80']:.4g} | {r['unit']} |")
        return "\n".join(lines)

    def finish(self) -> int:
        """Write the CSV, print the table and where the results are. Returns 0 (the exit code)."""
        path = self.write_csv()
        print()
        print(f"### kvstream.bench.{self.topic} on {self.env['device']} ({self.env['date']}, {self.env['git_sha']})"
              + ("  [--quick: no timing claims]" if self.quick else ""))
        print(self.table())
        print(f"\nrows appended to {path}; summary in {self.out_dir / 'summary.json'}", flush=True)
        return 0

    def disk_dir(self) -> Path:
        """A fresh directory on the disk to measure (``--disk-dir``, else under the out dir); caller removes it."""
        base = Path(self.args.disk_dir) if getattr(self.args, "disk_dir", None) else self.out_dir
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".kvstream-disk-", dir=base))


# ----------------------------------------------------------------------------------------------------
# Ceilings
# ----------------------------------------------------------------------------------------------------

def ceiling_d2d(run: Run, nbytes: int, *, bench: str, x: Any) -> Stat:
    """Device-to-device copy of ``nbytes`` (one contiguous buffer into another), recorded as provider ``d2d-copy``.

    Returns the bandwidth in GB/s counting bytes read plus bytes written (``2 * nbytes``), the convention
    of DEVICE.md's 2926 GB/s.
    """
    src = random_tensor((nbytes // 2,), torch.bfloat16, run.device)
    dst = torch.empty_like(src)
    ms = run.time(lambda: dst.copy_(src))
    bw = run.add_time_and_bandwidth(bench, "d2d-copy", x, ms, 2 * tensor_nbytes(src))
    del src, dst
    return bw


def ceiling_memcpy(run: Run, chunk_bytes: int, num_chunks: int, *, direction: str, bench: str, x: Any) -> Stat:
    """``num_chunks`` pinned ``cudaMemcpyAsync`` copies of ``chunk_bytes`` each (torch ``copy_(non_blocking=True)``).

    Parameters
    ----------
    direction : {"d2h", "h2d"}
        Device to pinned host, or pinned host to device.

    Returns the bandwidth in GB/s of the bytes moved (``chunk_bytes * num_chunks``), timed on the host clock
    between synchronizations like the transports it is compared with; recorded as provider ``memcpy``.
    """
    if direction not in ("d2h", "h2d"):
        raise ValueError(f"direction must be 'd2h' or 'h2d', got {direction!r}")
    n = chunk_bytes // 2
    dev = [random_tensor((n,), torch.bfloat16, run.device) for _ in range(num_chunks)]
    host = [pinned_empty((n,), torch.bfloat16) for _ in range(num_chunks)]
    for h, d in zip(host, dev):  # random host bytes too (the h2d source)
        h.copy_(d)
    pairs = list(zip(host, dev)) if direction == "d2h" else list(zip(dev, host))

    def copy_all() -> None:
        for d, s in pairs:
            d.copy_(s, non_blocking=True)

    ms = run.time_host(copy_all, reps=5)
    return run.add_time_and_bandwidth(bench, "memcpy", x, ms, chunk_bytes * num_chunks)


def fs_type(path: str | Path) -> str:
    """Filesystem type of the mount holding ``path`` ("ext4", "xfs", "overlay", "tmpfs"; "unknown")."""
    p = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (p == parts[1] or p.startswith(parts[1].rstrip("/") + "/")) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def supports_direct_io(directory: str | Path) -> bool:
    """Whether files in ``directory`` can be opened with ``O_DIRECT`` (tmpfs and some overlays cannot)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = Path(directory) / ".odirect-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        os.close(fd)
        return True
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned anonymous memory of ``nbytes`` filled with random bytes (for O_DIRECT I/O)."""
    buf = mmap.mmap(-1, nbytes)
    buf[:] = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).numpy().tobytes()
    return buf


def raw_write(path: str | Path, nbytes: int, buf: mmap.mmap, *, direct: bool, block_bytes: int = RAW_DISK_BLOCK_BYTES) -> None:
    """Write ``nbytes`` from ``buf`` to ``path`` in ``block_bytes`` writes (``O_DIRECT`` if ``direct``), then fsync."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(buf)
        left = nbytes
        while left:
            n = min(block_bytes, left, len(buf))
            written = os.write(fd, view[:n])
            if written <= 0:
                raise OSError(f"short write to {path}: {written} of {n} bytes")
            left -= written
        os.fsync(fd)
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_read(path: str | Path, buf: mmap.mmap, *, direct: bool, block_bytes: int = RAW_DISK_BLOCK_BYTES) -> int:
    """Read ``path`` to its end in ``block_bytes`` reads into ``buf`` (``O_DIRECT`` if ``direct``). Returns bytes read."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    total = 0
    try:
        view = memoryview(buf)[:min(block_bytes, len(buf))]
        while True:
            n = os.readv(fd, [view])
            if n <= 0:
                break
            total += n
    finally:
        os.close(fd)
    return total


def evict_tree(root: str | Path) -> None:
    """fsync every file under ``root`` and drop it from the page cache (so reads hit the disk)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def ceiling_disk(run: Run, directory: str | Path, file_bytes: int, num_files: int, *, bench: str, x: Any,
                 reps: int = 2) -> tuple[Stat, Stat, str]:
    """Raw disk write and read of ``num_files`` files of ``file_bytes`` each in ``directory``, 16 MiB blocks.

    ``O_DIRECT`` where the filesystem allows it (provider ``raw-odirect``, like ``dd oflag=direct``), else
    buffered I/O with fsync and page-cache eviction (provider ``raw-buffered``). Writes include the fsync.

    Returns
    -------
    (write GB/s, read GB/s, provider)

    Raises
    ------
    ValueError
        If ``file_bytes`` is not a multiple of 4096 (O_DIRECT needs aligned sizes).
    """
    if file_bytes % DIRECT_ALIGN_BYTES:
        raise ValueError(f"file_bytes must be a multiple of {DIRECT_ALIGN_BYTES}, got {file_bytes}")
    directory = Path(directory)
    direct = supports_direct_io(directory)
    provider = "raw-odirect" if direct else "raw-buffered"
    buf = aligned_buffer(min(RAW_DISK_BLOCK_BYTES, file_bytes))
    paths = [directory / f"raw{i:04d}.bin" for i in range(num_files)]

    def write_all() -> None:
        for p in paths:
            raw_write(p, file_bytes, buf, direct=direct)

    def read_all() -> None:
        for p in paths:
            if raw_read(p, buf, direct=direct) != file_bytes:
                raise OSError(f"raw read of {p} returned a wrong size")

    total = file_bytes * num_files
    w = run.add_time_and_bandwidth(f"{bench}.write", provider, x, run.time_host(write_all, reps=reps, warmup=0),
                                   total, time_unit="s")
    r = run.add_time_and_bandwidth(f"{bench}.read", provider, x, run.time_host(read_all, reps=reps, warmup=0),
                                   total, time_unit="s")
    for p in paths:
        p.unlink(missing_ok=True)
    buf.close()
    return w, r, provider


# ----------------------------------------------------------------------------------------------------
# The model shared by the generate and levels topics
# ----------------------------------------------------------------------------------------------------

_MODELS: dict[tuple, torch.nn.Module] = {}


def shared_model(run: Run) -> torch.nn.Module:
    """The benchmark model, built once per process and reused across topics.

    Full runs: the Llama-3-8B shape with ``--layers`` decoder layers, bf16, built directly on the GPU
    (``kvstream.models.build_model``; 16 GB of weights at 32 layers). ``--quick``: a tiny Llama, float32.
    """
    from kvstream.models import build_model, llama3_8b_config, tiny_config

    key = (run.quick, run.args.layers, str(run.device))
    if key not in _MODELS:
        _MODELS.clear()
        free_memory()
        if run.quick:
            cfg, dtype = tiny_config("llama", num_layers=min(run.args.layers, 2)), torch.float32
        else:
            cfg = llama3_8b_config(num_layers=run.args.layers)
            dtype = torch.bfloat16 if run.is_cuda else torch.float32
        progress(f"building {'tiny llama' if run.quick else 'Llama-3-8B-shaped'} model, {cfg.num_hidden_layers} layers, "
                 f"{dtype} on {run.device}")
        _MODELS[key] = build_model(cfg, device=run.device, dtype=dtype)
        sync(run.device)
        progress("model built")
    return _MODELS[key]


def release_models() -> None:
    """Drop the shared model (end of the suite)."""
    _MODELS.clear()
    free_memory()


def quantile_summary(values: dict[Any, float]) -> dict[str, float]:
    """min / median / max of a dict of figures (for summary ``detail``)."""
    vs = sorted(values.values())
    if not vs:
        return {}
    return {"min": vs[0], "median": vs[len(vs) // 2], "max": vs[-1]}


def module_main(main: Callable[[Sequence[str] | None], int]) -> None:
    """``sys.exit(main(sys.argv[1:]))``: the ``if __name__ == "__main__"`` body of each topic."""
    sys.exit(main(sys.argv[1:]))


__all__ = [
    "COLUMNS", "SUMMARY_KEYS", "RAW_DISK_BLOCK_BYTES", "GB", "MiB", "GiB", "Stat", "Run", "bench_dir", "repo_root",
    "default_results_dir", "progress", "environment", "device_name", "sync", "free_memory", "time_host", "time_device",
    "random_tensor", "random_hf_cache", "check_region", "pinned_empty", "tensor_nbytes", "check_target", "record_summary",
    "common_parser", "ceiling_d2d", "ceiling_memcpy", "ceiling_disk", "fs_type", "supports_direct_io", "aligned_buffer",
    "raw_write", "raw_read", "evict_tree", "shared_model", "release_models", "quantile_summary", "module_main",
    "use_interpreter_without_gpu",
]
