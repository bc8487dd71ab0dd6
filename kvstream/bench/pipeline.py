"""The pipeline engine on one GPU: does the swap-in hide, what capacity mode costs, and the engine's overhead.

Three measurements, D = 1 (one stage), the Llama-3-8B shape with ``--layers`` layers (default 8: the ratio
``K / (B_pcie * t_step)`` does not depend on the layer count, since K and t_step both scale with it):

* ``swap_stall_fraction`` — ``M = 4`` microbatches of ``--batch`` rows, a KV budget of two microbatches
  (DéjàVu's two slots: one computes, the next is prefetched), for each prompt length in ``--contexts``:
  compute stall on swap-in events over decode step time, against the measured ratio. Target: <= 5 % at
  the longest context whose ratio is <= 0.8 (the model says the prefetch hides there); the curve of stall
  against context crosses where the ratio crosses 1 (``swap_overlap.png``).
* ``capacity_mode`` — ``4 x`` the budget's worth of sessions (the budget holds 2 microbatches; 9-10 of them) at
  ``--capacity-context``: per-token latency of a session (``M`` x the decode step, from CUDA events)
  against the PCIe prediction ``M x max(t_compute, K / B_pcie)``, ``t_compute`` from a resident run of
  the same ``M`` microbatches (no budget) and ``B_pcie`` measured (pinned host->device ``cudaMemcpyAsync``). Target: within 15 %.
* ``pipeline_overhead`` — no swap, ``M = 4``: the engine's makespan against plain ``generate`` of the same
  microbatches one after another, ``--reps`` alternating repetitions after a warm-up; median, min, max.
  Reported (the ceiling is plain generate).

Writes ``<out>/pipeline.csv`` (one row per measurement), merges the three keys into ``<out>/summary.json``
(:func:`kvstream.bench.records.record_summary`) and draws ``<out>/swap_overlap.png``; ``<out>`` is
bench/results by default.
``--quick``: the tiny model on the CPU, small shapes, no claims (``pass`` null); it must run end to end.

    PYTHONPATH=$PWD python -m kvstream.bench.pipeline                 # one GPU, about 2 minutes
    PYTHONPATH=$PWD python -m kvstream.bench.pipeline --quick --out /tmp/pipeline-quick
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from kvstream.serving.pipeline.links import Env
from kvstream.serving.pipeline.run import RunConfig, build_model, run_stage, stage_token_bytes, workload
from kvstream.serving.pipeline.swap import measure_bandwidth
from kvstream.serving.worker import generate, pad_left

from . import records

FIELDS = ("bench", "provider", "x", "metric", "unit", "value", "device", "torch", "transformers", "git_sha", "date")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvstream.bench.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model on the CPU, small shapes, no claims")
    p.add_argument("--layers", type=int, default=8, help="layers of the Llama-3-8B shape (default 8)")
    p.add_argument("--batch", type=int, default=4, help="rows per microbatch (default 4)")
    p.add_argument("--contexts", default="512,1024,2048,4096,8192", help="prompt lengths of the stall curve")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens per request (default 16)")
    p.add_argument("--capacity-context", type=int, default=4096, help="prompt length of capacity mode")
    p.add_argument("--reps", type=int, default=5, help="alternating repetitions of the overhead comparison")
    p.add_argument("--pcie-gbps", type=float, default=None, help="B_pcie, GB/s (default: measured)")
    p.add_argument("--out", default=None, help="output directory (default bench/results; --quick: temp)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is a GPU, the CPU with --quick)")
    p.add_argument("--disk-dir", default=None, help="ignored (run_all passes it)")
    return p


class Bench:
    """The run's settings, model, CSV rows and summary."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.quick = args, args.quick
        # --quick: the CPU unless a device is asked for (run_all's GPU smoke run passes --device cuda)
        self.device = torch.device(args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda"))
        cuda = self.device.type == "cuda"
        self.base = dict(device=self.device.type, stages=1, model="tiny" if self.quick else "llama3-8b",
                         layers=4 if self.quick else args.layers, dtype="bfloat16" if cuda and not self.quick else "float32",
                         batch=2 if self.quick else args.batch, check=False, warmup=cuda, rate=math.inf)
        self.new_tokens = 6 if self.quick else args.new_tokens
        self.model = build_model(RunConfig(**self.base), self.device)
        self.bandwidth = args.pcie_gbps * 1e9 if args.pcie_gbps else measure_bandwidth(self.device)
        self.rows: list[dict] = []
        self.summary: dict = {}
        self.stamp = {"device": torch.cuda.get_device_name(self.device) if cuda else "cpu",
                      "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                      "git_sha": records.environment(self.device)["git_sha"], "date": datetime.date.today().isoformat()}

    def cfg(self, **kw) -> RunConfig:
        """A one-stage run of the bench's model."""
        return RunConfig(**dict(self.base, output_tokens=f"fixed:{self.new_tokens}", **kw))

    def run(self, cfg: RunConfig) -> dict:
        """Run the engine in this process on the shared model."""
        gc.collect()
        return run_stage(cfg, Env(0, 1, 0), model=self.model)

    def microbatch_bytes(self, context: int) -> int:
        """One microbatch's KV at its longest (prompt + every new token), bytes."""
        per = stage_token_bytes(self.model.config, self.base["dtype"], 1)[0]
        return self.base["batch"] * (context + self.new_tokens) * per

    def row(self, bench: str, provider: str, x, metric: str, unit: str, value: float) -> None:
        """One CSV row."""
        self.rows.append(dict(bench=bench, provider=provider, x=x, metric=metric, unit=unit, value=value, **self.stamp))

    def key(self, name: str, value: float, unit: str, target: str | None, passed: bool | None, detail: dict) -> None:
        """One summary entry (``pass`` is null in --quick mode)."""
        self.summary[name] = dict(value=value, unit=unit, target=target, **{"pass": None if self.quick else passed},
                                  quick=self.quick, device=self.stamp["device"], date=self.stamp["date"], detail=detail)


def _decode(doc: dict) -> list[dict]:
    return [s for s in doc["stages"][0]["steps"] if s["kind"] == "decode" and s["compute_s"] > 0]


def stall_curve(b: Bench) -> list[dict]:
    """``swap_stall_fraction``: stall over step time and the ratio, per context; returns the points."""
    contexts = [16, 32, 64] if b.quick else [int(c) for c in b.args.contexts.split(",")]
    points = []
    for ctx in contexts:
        budget_mb = 2 * b.microbatch_bytes(ctx) * (1 + 1 / b.base["layers"]) / (1 << 20) * 1.01
        doc = b.run(b.cfg(microbatches=4, requests=4 * b.base["batch"], prompt_tokens=ctx, swap="on",
                          kv_budget_mb=budget_mb, pcie_gbps=b.bandwidth / 1e9))
        steps = _decode(doc)
        stall, compute = sum(s["stall_s"] for s in steps), sum(s["compute_s"] for s in steps)
        pt = dict(context=ctx, stall_fraction=stall / (stall + compute), ratio=statistics.median(s["ratio"] for s in steps),
                  step_ms=1e3 * (stall + compute) / len(steps), kv_mib=b.microbatch_bytes(ctx) / (1 << 20),
                  swap_in_mib=doc["stages"][0]["swap_in_bytes"] / (1 << 20))
        points.append(pt)
        for metric, unit in (("stall_fraction", "1"), ("ratio", "1"), ("step_ms", "ms")):
            b.row("swap_stall_fraction", "swap", ctx, metric, unit, pt[metric])
    hidden = [p for p in points if p["ratio"] <= 0.8]
    head = max(hidden, key=lambda p: p["context"]) if hidden else None
    b.key("swap_stall_fraction", head["stall_fraction"] if head else float("nan"), "fraction of step time",
          "<= 0.05 where K <= 0.8 * B_pcie * t_step", None if head is None else head["stall_fraction"] <= 0.05,
          {"points": points, "bandwidth_gb_s": b.bandwidth / 1e9, "crossing_context": _crossing(points)})
    return points


def _crossing(points: list[dict]) -> float | None:
    """The context where the measured ratio crosses 1 (linear in log context), or ``None``."""
    for a, c in zip(points, points[1:]):
        if (a["ratio"] - 1) * (c["ratio"] - 1) <= 0 and a["ratio"] != c["ratio"]:
            f = (1 - a["ratio"]) / (c["ratio"] - a["ratio"])
            return math.exp(math.log(a["context"]) + f * (math.log(c["context"]) - math.log(a["context"])))
    return None


def capacity_mode(b: Bench) -> None:
    """``capacity_mode``: sessions worth 4x the budget (of 2 microbatches), per-token latency against the PCIe model."""
    ctx = 32 if b.quick else b.args.capacity_context
    budget_mb = 2 * b.microbatch_bytes(ctx) * (1 + 1 / b.base["layers"]) / (1 << 20) * 1.01
    m = math.ceil(4 * budget_mb * (1 << 20) / b.microbatch_bytes(ctx))  # sessions worth 4x the budget
    # t_compute: the same m microbatches, all resident (no budget), so that a step is timed in the same
    # schedule as the swapped one (a one-microbatch run times steps that wait on the host: 41 ms against the
    # swapped run's 6.3 ms on 2026-12-01, bench/NOTES.md)
    resident = b.run(b.cfg(microbatches=m, requests=m * b.base["batch"], prompt_tokens=ctx))
    t_compute = statistics.median(s["compute_s"] for s in _decode(resident))
    doc = b.run(b.cfg(microbatches=m, requests=m * b.base["batch"], prompt_tokens=ctx, swap="on",
                      kv_budget_mb=budget_mb, pcie_gbps=b.bandwidth / 1e9))
    steps = _decode(doc)
    step = statistics.median(s["compute_s"] + s["stall_s"] for s in steps)
    k = statistics.median(s["kv_bytes"] for s in steps)
    predicted = max(t_compute, k / b.bandwidth)
    measured, pred = m * step, m * predicted
    sessions_kv = m * b.microbatch_bytes(ctx)
    for provider, value in (("measured", measured), ("pcie_model", pred)):
        b.row("capacity_mode", provider, ctx, "per_token_latency", "s", value)
    b.key("capacity_mode", measured / pred, "measured / predicted per-token latency", "within 15 %",
          abs(measured / pred - 1) <= 0.15,
          {"context": ctx, "microbatches": m, "sessions_kv_over_budget": sessions_kv / (budget_mb * (1 << 20)),
           "per_token_latency_s": measured, "predicted_s": pred, "t_compute_s": t_compute,
           "swapped_compute_s": statistics.median(s["compute_s"] for s in steps),
           "transfer_s": k / b.bandwidth, "peak_kv_mib": doc["stages"][0]["peak_kv_bytes"] / (1 << 20),
           "budget_mib": budget_mb, "makespan_s": doc["summary"]["makespan_s"]})


def overhead(b: Bench) -> None:
    """``pipeline_overhead``: the engine (D = 1, no swap) against plain generate, alternating repetitions."""
    ctx = 32 if b.quick else 1024
    cfg = b.cfg(microbatches=4, requests=4 * b.base["batch"], prompt_tokens=ctx)
    groups = workload(cfg)

    def _plain() -> float:
        sync = torch.cuda.synchronize if b.device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for g in groups:
            ids, mask = pad_left(g, b.device)
            generate(b.model, ids, mask, b.new_tokens)
        sync()
        return time.perf_counter() - t

    _plain()  # warm-up (the engine warms up inside each run on CUDA)
    reps = 2 if b.quick else b.args.reps
    engine, ref = [], []
    for _ in range(reps):
        engine.append(b.run(cfg)["summary"]["makespan_s"])
        ref.append(_plain())
    ratio = statistics.median(engine) / statistics.median(ref)
    for provider, xs in (("pipeline", engine), ("generate", ref)):
        for metric, v in (("median", statistics.median(xs)), ("min", min(xs)), ("max", max(xs))):
            b.row("pipeline_overhead", provider, ctx, f"makespan_{metric}", "s", v)
    spread = max(max(engine) - min(engine), max(ref) - min(ref))
    b.key("pipeline_overhead", ratio, "engine makespan / generate (median)", None, None,
          {"engine_s": engine, "generate_s": ref, "noisy": spread > abs(statistics.median(engine) - statistics.median(ref)),
           "context": ctx, "microbatches": 4})


def plot_overlap(points: list[dict], path: Path) -> None:
    """``swap_overlap.png``: stall fraction and the ratio against context, with the predicted crossing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [p["context"] for p in points]
    ax.plot(xs, [p["stall_fraction"] for p in points], "o-", label="compute stall / step time (measured)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens per row)")
    ax.set_ylabel("stall fraction")
    ax2 = ax.twinx()
    ax2.plot(xs, [p["ratio"] for p in points], "s--", color="tab:orange", label="K / (B_pcie * t_step)")
    ax2.axhline(1.0, color="gray", linewidth=1)
    ax2.set_ylabel("ratio")
    cross = _crossing(points)
    if cross:
        ax.axvline(cross, color="tab:red", linestyle=":", label=f"model: hides below ~{cross:.0f} tokens")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [l.get_label() for l in lines], fontsize=8, loc="upper left")
    ax.set_title("microbatch swapping: does the swap-in hide?")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the three measurements; write CSV, summary and PNG; print the summary. Returns 0."""
    args = _parser().parse_args(argv)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="pipeline-quick-")) if args.quick
                                           else records.default_results_dir())
    out.mkdir(parents=True, exist_ok=True)
    b = Bench(args)
    points = stall_curve(b)
    capacity_mode(b)
    overhead(b)
    with open(out / "pipeline.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(b.rows)
    env = records.environment(b.device)
    for name, e in b.summary.items():  # the bench judges its own targets: they are conditions, not a number
        records.record_summary(out, name, value=e["value"], unit=e["unit"], ceiling=None, ceiling_of="see detail",
                               target="reported", target_of="value", detail=dict(e["detail"], target=e["target"]),
                               conditions=None if e["pass"] is None else {e["target"]: bool(e["pass"])}, env=env,
                               quick=b.quick)
    plot_overlap(points, out / "swap_overlap.png")
    for name, entry in b.summary.items():
        print(f"{name}: {entry['value']:.4g} {entry['unit']} (target {entry['target']}, pass {entry['pass']})")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
