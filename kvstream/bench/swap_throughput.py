"""Pipeline throughput with microbatch swapping against without, under a KV budget that binds: D stages, one GPU each.

DéjàVu (Strati et al., ICML 2024, §4.2, Fig. 13): a pipeline stage that keeps only two microbatches' KV on
the GPU (the one computing, the next one prefetched) and swaps the others to host memory can run
microbatches up to D/2 larger (or D/2 times as many in flight) within the same memory; up to 1.8x
throughput. Here the pipeline engine (:mod:`kvstream.serving.pipeline`, one process per stage, gloo or
NCCL between them, as ``kvstream pipeline`` launches it) runs the Llama-3-8B shape with ``--layers``
layers (default 32) on ``--stages`` D stages (default 4), the same requests twice per repetition:

* ``no-swap`` — ``M`` microbatches (default D) of ``--batch`` b rows, swapping off. The per-stage KV budget
  holds exactly what this side keeps resident, so it cannot grow: the baseline is KV-capacity-bound. The
  budget is a **cap that emulates a smaller GPU** (an H200 has room for far more KV): it is what makes the
  comparison the one DéjàVu makes;
* ``swap`` — the same budget with swapping on. Variant ``larger`` (default; the issue's): ``M``
  microbatches of ``b * M / 2`` rows, two of them resident per stage. Variant ``inflight``: the budget
  holds ``M / 2`` microbatches of b (the baseline admits that many), the swap side keeps all ``M`` in flight.

``--reps`` (default 5) alternating repetitions (swap, no-swap, no-swap, swap, ...). Rows
(``<out>/swap_throughput.csv``): ``swap_throughput.throughput`` (tokens/s per side; p50/p20/p80 over the
repetitions) and ``swap_throughput.stall`` (per stage: compute stall on swap-in over stage step time, and
the stage's busy fraction of the makespan). Summary key ``swap_throughput_gain``: tokens/s with swapping
over without (medians), target >= 1.8; the detail holds every repetition (median, min, max), the budget
and what it holds, and the stall fraction per stage. ``<out>/swap_throughput.png``: both.

``--quick``: D = 2 gloo processes on the CPU, the tiny model, M = 4, one repetition, outputs checked against
single-process ``generate``; no claims (``pass`` null).

    PYTHONPATH=$PWD python3 -m kvstream.bench.swap_throughput            # four GPUs, about 5-7 minutes
    PYTHONPATH=$PWD python3 -m kvstream.bench.swap_throughput --quick --out /tmp/swap-quick
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Sequence

from . import harness, timing
from .harness import Run
from .plot import pyplot, save_panels
from .records import MiB
from .timing import Stat

SIDES = ("swap", "no-swap")
MARGIN = 1.01  # the budget's headroom over the bytes it must hold (rounding to MiB)


def add_args(p: argparse.ArgumentParser) -> None:
    """The topic's own options."""
    p.add_argument("--stages", type=int, default=4, help="pipeline depth D, one GPU per stage (default 4)")
    p.add_argument("--microbatches", type=int, default=None, help="microbatches in flight M (default D)")
    harness.workload_args(p, batch=4, prompt_tokens=512, new_tokens=64, reps=5,
                          helps={"batch": "rows per microbatch of the no-swap side, b",
                                 "reps": "alternating repetitions, >= 5 for a claim"})
    p.add_argument("--variant", choices=("larger", "inflight"), default="larger",
                   help="larger: swap runs microbatches M/2 larger; inflight: swap keeps M in flight, no-swap M/2")
    p.add_argument("--requests", type=int, default=None, help="requests per run (default: two rounds of M microbatches "
                                                               "of the swap side)")
    p.add_argument("--pcie-gbps", type=float, default=None, help="B_pcie of the stages' ratio, GB/s (default: measured)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help="compare every request with single-process generate (default: on with --quick only)")
    p.add_argument("--timeout", type=float, default=300.0, help="longest wait for a peer, s (default 300)")
    p.set_defaults(layers=32)


def plan(run: Run) -> dict:
    """The two sides' :class:`~kvstream.serving.pipeline.run.RunConfig` and the budget that binds.

    Returns ``{"swap": cfg, "no-swap": cfg, "budget": {...}}``; the budget's detail says what it holds.
    """
    from kvstream.serving.pipeline.run import RunConfig, admission, model_config, validate, workload

    a, quick = run.args, run.quick
    d = 2 if quick else a.stages
    m = 4 if quick else (a.microbatches or d)
    b = 1 if quick else a.batch
    if m < 4 or m % 2:
        raise SystemExit(f"kvstream.bench.swap_throughput: M = {m} microbatches; swapping needs an even M >= 4 "
                         "(two resident per stage, M / 2 larger)")
    larger = a.variant == "larger"
    swap_batch = b * m // 2 if larger else b
    requests = a.requests or 2 * m * swap_batch
    if requests % swap_batch:
        raise SystemExit(f"--requests {requests} is not a multiple of the swap side's microbatch ({swap_batch} rows)")
    cuda = run.is_cuda
    base = dict(device=run.device.type, stages=d, microbatches=m, requests=requests, rate=math.inf,
                prompt_tokens=16 if quick else a.prompt_tokens, output_tokens=f"fixed:{6 if quick else a.new_tokens}",
                model="tiny" if quick else "llama3-8b", layers=4 if quick else a.layers,
                dtype="bfloat16" if cuda else "float32", check=bool(quick if a.check is None else a.check),
                warmup=cuda, timeout=a.timeout, pcie_gbps=a.pcie_gbps)
    probe = RunConfig(**dict(base, batch=b))
    rule = admission(probe, model_config(probe), 1.0)
    small = workload(probe)[0]
    big = workload(RunConfig(**dict(base, batch=swap_batch)))[0]
    if larger:  # two of the swap side's microbatches resident (DéjàVu's two slots)
        need = rule.peak_bytes(big) + rule.need_bytes(big)
        held = f"2 microbatches of {swap_batch} rows = {m} of {b} rows (the no-swap side's M)"
    else:  # M / 2 microbatches of b: the no-swap side admits only that many
        need = (m // 2 - 1) * rule.peak_bytes(small) + rule.need_bytes(small)
        held = f"{m // 2} microbatches of {b} rows (half of M)"
    mb = need * MARGIN / MiB
    cfgs = {"swap": RunConfig(**dict(base, batch=swap_batch, swap="on", kv_budget_mb=mb)),
            "no-swap": RunConfig(**dict(base, batch=b, swap="off", kv_budget_mb=mb))}
    for cfg in cfgs.values():
        validate(cfg)
    fits = max(k for k in range(1, 4 * m) if (k - 1) * rule.peak_bytes(small) + rule.need_bytes(small) <= mb * MiB)
    budget = {"kv_budget_mib_per_stage": mb, "holds": held, "no_swap_fits_microbatches": fits,
              "swap_microbatch_rows": swap_batch, "no_swap_microbatch_rows": b, "microbatches": m, "stages": d,
              "requests": requests, "microbatch_kv_mib_per_stage": {"swap": rule.peak_bytes(big) / MiB,
                                                                    "no-swap": rule.peak_bytes(small) / MiB},
              "emulates": "a smaller GPU, with only this much KV room per stage: a cap far below what the device "
                          "holds, so that the no-swap baseline is KV-capacity-bound"}
    return {**cfgs, "budget": budget}


def run_once(cfg, results: Path) -> dict:
    """One pipeline run of ``cfg`` (one process per stage); returns stage 0's summary document.

    Raises
    ------
    SystemExit
        If a request did not complete or (checked) differs from single-process ``generate``.
    """
    from kvstream.serving.pipeline.cli import launch

    results.mkdir(parents=True, exist_ok=True)
    doc = launch(cfg, results)
    if doc["completed"] != doc["requests"] or (cfg.check and doc["identical"] != doc["requests"]):
        raise SystemExit(f"kvstream.bench.swap_throughput: swap {cfg.swap}: {doc['completed']}/{doc['requests']} "
                         f"completed, {doc['identical']} identical to generate (checked: {cfg.check})")
    return doc


def stage_figures(doc: dict) -> list[dict]:
    """Per stage: stall on swap-in over step time, busy share of the makespan, swap bytes, the ratio's median."""
    span = doc["summary"]["makespan_s"]
    out = []
    for st in doc["stages"]:
        step = st["compute_s"] + st["stall_s"]
        out.append({"stage": st["stage"], "stall_fraction": st["stall_s"] / step if step > 0 else 0.0,
                    "busy_fraction": step / span if span > 0 else 0.0, "swap_in_mib": st["swap_in_bytes"] / MiB,
                    "peak_kv_mib": st["peak_kv_bytes"] / MiB, "ratio_p50": st["ratio_p50"]})
    return out


def _median_stages(runs: list[list[dict]]) -> list[dict]:
    """Stage by stage, the median of each figure over repetitions."""
    keys = ("stall_fraction", "busy_fraction", "swap_in_mib", "peak_kv_mib")
    return [dict({k: Stat.of([r[s][k] for r in runs]).p50 for k in keys}, stage=runs[0][s]["stage"],
                 ratio_p50=runs[0][s]["ratio_p50"]) for s in range(len(runs[0]))]


def _plot(tps: dict, stalls: dict, path: Path) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for side in SIDES:
        ax1.plot(range(1, len(tps[side]) + 1), tps[side], marker="o", label=side)
    ax1.set(xlabel="repetition", ylabel="tokens/s", title="throughput, same requests, same KV budget")
    width = 0.4
    for i, side in enumerate(SIDES):
        st = stalls[side]
        ax2.bar([s["stage"] + (i - 0.5) * width for s in st], [s["stall_fraction"] for s in st], width, label=side)
    ax2.set(xlabel="stage", ylabel="stall on swap-in / step time", title="stall fraction per stage (median)")
    save_panels(fig, plt, (ax1, ax2), path,
                "Microbatch swapping under a capped KV budget (the cap emulates a smaller GPU)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the topic. Returns the exit code."""
    run = Run.from_argv("swap_throughput", argv, add_args, __doc__)
    d = 2 if run.quick else run.args.stages
    if run.is_cuda:
        import torch

        if torch.cuda.device_count() < d:
            raise SystemExit(f"kvstream.bench.swap_throughput needs {d} GPUs (or --quick for the CPU smoke run)")
    elif not run.quick:
        raise SystemExit("kvstream.bench.swap_throughput measures GPUs; --quick runs the CPU smoke run")
    p = plan(run)
    reps = 1 if run.quick else run.args.reps
    tps: dict = {s: [] for s in SIDES}
    spans: dict = {s: [] for s in SIDES}
    stages: dict = {s: [] for s in SIDES}
    tmp = Path(tempfile.mkdtemp(prefix="kvstream-swap-throughput-"))
    for rep, side in timing.alternating(list(SIDES), reps):
        cfg = p[side]
        doc = run_once(cfg, tmp / f"{side}-{rep}")
        s = doc["summary"]
        tps[side].append(s["throughput_tokens_per_s"])
        spans[side].append(s["makespan_s"])
        stages[side].append(stage_figures(doc))
        timing.progress(f"rep {rep} {side}: {s['throughput_tokens_per_s']:.1f} tokens/s, makespan {s['makespan_s']:.3f} s, "
                        f"stall {[round(x['stall_fraction'], 3) for x in stages[side][-1]]}")
    x = f"D{d}-{run.args.variant}"
    for side in SIDES:
        run.add("swap_throughput.throughput", side, x, "throughput", "tokens/s", Stat.of(tps[side]))
        per_stage = _median_stages(stages[side])
        for st in per_stage:
            run.add("swap_throughput.stall", f"{side}/stage{st['stage']}", x, "stall_fraction", "1", st["stall_fraction"])
            run.add("swap_throughput.stall", f"{side}/stage{st['stage']}", x, "busy_fraction", "1", st["busy_fraction"])
        stages[side] = per_stage
    cmp = timing.compare(spans["swap"], spans["no-swap"])  # same requests: makespan is tokens/s inverted
    med = {s: Stat.of(tps[s]).p50 for s in SIDES}
    png = run.out_dir / "swap_throughput.png"
    _plot(tps, stages, png)
    detail = {"variant": run.args.variant, "budget": p["budget"], "tokens_per_s": {s: timing.spread(tps[s]) for s in SIDES},
              "tokens_per_s_each": tps, "makespan": cmp, "stall_fraction_per_stage": stages["swap"],
              "no_swap_per_stage": stages["no-swap"], "checked": p["swap"].check, "png": str(png),
              "model": f"{p['swap'].model}, {p['swap'].layers} layers, {p['swap'].dtype}",
              "prompt_tokens": p["swap"].prompt_tokens, "output_tokens": p["swap"].output_tokens,
              "cap": "the per-stage KV budget is a cap that emulates a smaller GPU (see budget.emulates)"}
    run.summary("swap_throughput_gain", value=med["swap"], unit="tokens/s", ceiling=med["no-swap"],
                ceiling_of="the same pipeline without swapping: same KV budget per stage, same requests, same run",
                target=">= 1.8", target_of="ratio", provider=f"swap ({run.args.variant})",
                conditions={"reps >= 5": reps >= 5}, noisy=cmp["noisy"], detail=detail)
    print(f"\nswap_throughput_gain: {med['swap'] / med['no-swap']:.3f} (tokens/s {med['swap']:.1f} / {med['no-swap']:.1f}); "
          f"budget {p['budget']['kv_budget_mib_per_stage']:.2f} MiB per stage (a cap emulating a smaller GPU); {png}")
    return run.finish()


if __name__ == "__main__":
    harness.module_main(main)
