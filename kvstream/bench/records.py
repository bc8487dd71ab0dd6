"""Records: CSV rows, ``summary.json``, markdown tables, and the context every row carries.

* **one long CSV row per measurement** (:data:`COLUMNS`), appended to ``<out>/<topic>.csv``
  (:func:`append_csv`), printed as a markdown table (:func:`rows_table`);
* **headline figures** merged into ``<out>/summary.json`` by :func:`record_summary` (one object, one entry per
  key, each with its value, the ceiling or peer it is compared with, the ratio, the target and pass/fail,
  plus device and date), shown by :func:`summary_table`;
* the **context columns** (:func:`environment`): device, torch/triton/transformers versions, git sha, date.

A full run writes under :func:`default_results_dir`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

#: Decimal gigabyte (bandwidths are GB/s) and the binary sizes the shapes are given in.
GB = 1e9
MiB = 1 << 20
GiB = 1 << 30

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
    "offload_budget": "StreamingCache(offload=True, gpu_budget_bytes=50 % of the layers) over DynamicCache, against "
                      "the PCIe floor's prediction (kvstream/bench/offload.py)",
    "levels": "DéjàVuLib levels 0-3 (paper Fig. 7): buffered over naive, all over buffered",
    "resume_host_vs_memcpy": "StreamingCache.load of a session from HostTransport onto the GPU over pinned memcpy",
    "prefix_ttft_speedup": "time to first token with a stored 90% prefix over full prefill (kvstream/bench/prefix.py)",
    "file_store_read_vs_raw": "chunk file store reads over parallel raw reads of the same files at the transport's "
                              "queue depth (kvstream/bench/prefix.py)",
    "file_store_write_vs_raw": "chunk file store writes over raw disk writes (kvstream/bench/prefix.py)",
    "hook_step_host_us": "host time StreamingCache's hook adds per decode step over DynamicCache's updates, B1 and B16",
    "static_hook_step_host_us": "the same for StreamingStaticCache over StaticCache",
    "streamer_d2h_small_vs_memcpy": "KVStreamer D2H of 4 MiB chunks over cudaMemcpyAsync of the same bytes, same run",
    "file_store_ttft_vs_prefill": "full prefill over the planned file-store TTFT, cold (kvstream/bench/prefix_ttft.py)",
    "tiered_ttft_speedup": "TieredStore TTFT speedup (prefix in the host tier) against the RadixStore figure",
    "reuse_plan_error": "|predicted - measured| / measured TTFT of the planned reuse, median over 1k-16k prompts",
    "nccl_handoff_vs_raw": "KV handoff over raw nccl4py send/recv of the same bytes (kvstream/bench/nccl_handoff.py)",
    "ft_latency_inflation": "latency of requests hit by one failure at 50 % of their tokens over failure-free (failover.py)",
    "ft_baseline_inflation": "the same with the hit requests recomputed from their prompts (DejaVu's baseline)",
    "ft_restore_vs_reprefill": "re-prefilling an 8k-token request over restoring its KV from a host replica",
    "ft_recomputed_tokens": "tokens whose KV had been acknowledged and were computed again after a failure",
    "ft_detect_s": "kill to detection at the benchmark's heartbeat deadline, seconds",
    "replication_overhead": "1 - failure-free tokens/s with KV replication on over off",
    "swap_throughput_gain": "pipeline tokens/s with microbatch swapping over without, same capped per-stage KV budget "
                            "(the cap emulates a smaller GPU), same requests (kvstream/bench/swap_throughput.py)",
}


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


def append_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Append ``rows`` (dicts with every key of :data:`COLUMNS`) to the CSV at ``path``, with a header if new.

    A file whose header is not :data:`COLUMNS` (an older format) is moved aside to ``<name>.csv.old`` first.
    Floats are written with 6 significant digits. Returns ``path``.
    """
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
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})
    return path


def rows_table(rows: Sequence[dict[str, Any]]) -> str:
    """Measurement rows as a markdown table (bench, provider, x, metric, quantiles, unit)."""
    lines = ["| bench | provider | x | metric | p50 | p20 | p80 | unit |", "|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['bench']} | {r['provider']} | {r['x']} | {r['metric']} | {r['p50']:.4g} | "
                     f"{r['p20']:.4g} | {r['p80']:.4g} | {r['unit']} |")
    return "\n".join(lines)


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
                   detail: dict | None = None, env: dict[str, str] | None = None, quick: bool = False,
                   noisy: bool = False) -> dict:
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
    noisy : bool
        The comparison's spread exceeds its effect (:func:`kvstream.bench.timing.compare`): recorded as
        ``"noisy": true`` and never counted as met (``pass`` is ``False`` unless the run is quick).

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
    if noisy and passed:
        passed = False
    if quick:
        passed = None
    env = env or {}
    entry = {
        "value": value, "unit": unit, "ceiling": ceiling, "ceiling_of": ceiling_of, "ratio": ratio,
        "target": target, "target_of": target_of, "pass": passed, "noisy": bool(noisy),
        "conditions": conditions or {},
        "provider": provider, "detail": _jsonable(detail or {}), "quick": bool(quick),
        "device": env.get("device"), "date": env.get("date"), "git_sha": env.get("git_sha"),
        "torch": env.get("torch"), "triton": env.get("triton"), "transformers": env.get("transformers"),
    }

    def _update(doc: dict) -> None:
        doc[key] = entry
        doc["device"] = env.get("device")
        doc["date"] = env.get("date")

    _locked_update(Path(out_dir) / "summary.json", _update)
    return entry


def quantile_summary(values: dict[Any, float]) -> dict[str, float]:
    """min / median / max of a dict of figures (for summary ``detail``)."""
    vs = sorted(values.values())
    if not vs:
        return {}
    return {"min": vs[0], "median": vs[len(vs) // 2], "max": vs[-1]}


def summary_table(path: Path) -> str:
    """``summary.json`` as a markdown table (key, value, ceiling/peer, ratio, target, pass)."""
    if not path.exists():
        return f"(no {path})"
    doc = json.loads(path.read_text())

    def _fmt(v):
        return "—" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    lines = ["| key | value | unit | ceiling / peer | ratio | target | pass |", "|---|---:|---|---|---:|---|---|"]
    for key, e in doc.items():
        if not isinstance(e, dict):
            continue
        lines.append(f"| {key} | {_fmt(e.get('value'))} | {e.get('unit')} | {_fmt(e.get('ceiling'))} ({e.get('ceiling_of')}) "
                     f"| {_fmt(e.get('ratio'))} | {e.get('target')} ({e.get('target_of')}) | {_fmt(e.get('pass'))} |")
    return "\n".join(lines)
