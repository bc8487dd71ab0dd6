"""Disaggregated serving (prompt GPUs + token GPUs, KV over NCCL) against the same GPUs each doing prefill and
decode, under the same Poisson load: throughput and normalized latency against the arrival rate.

DéjàVu's claim (paper §5.2, Fig. 10-11): splitting prefill and decode removes the interference of long
prompts with decoding and the pipeline bubbles they cause; up to 2x throughput at the same latency for
OPT-66B/BLOOM-176B pipelines. Here the split is the smallest one, two GPUs, with Hugging Face ``generate``
running static microbatches (no continuous batching) on each worker, so the figure says what
disaggregation alone gives at this scale; the planner (``kvstream plan``) explains the split from the
measured prefill time, decode step time and streaming overhead, which this run records.

Two engines (``--engine``), on ``--gpus`` N GPUs (default 2):

* ``workers`` (default): ``kvstream disagg`` with N workers, N/2 of them prompt workers, against N colocated
  workers (each prefills and decodes its own microbatches);
* ``pipeline``: a prompt pipeline of N/2 stages streaming each layer's KV to a token pipeline of N/2 stages
  (``kvstream disagg --stages N/2``, :mod:`kvstream.serving.pipeline.disagg`) against one colocated pipeline
  of N stages (``kvstream pipeline --stages N``) on the same GPUs.

For each rate in ``--rates`` (requests/s) and each mode, the engine runs ``--requests`` requests
(prompt ``--prompt-tokens``, output ``--output-tokens``, ``--microbatch`` per microbatch) on the
Llama-3-8B shape with ``--layers`` layers (default 8 here), outputs unchecked (``kvstream disagg --device cuda`` checks
them; here the comparison would cost time on the token GPU). Rows (``<out>/disagg.csv``): ``disagg.load``
x = rate, providers ``disaggregated`` / ``colocated``, metrics throughput (req/s, tokens/s), normalized
latency (mean, p90; s/token) and time to first token (s). ``<out>/disagg.png``: the two curves.
Summary key ``disagg_vs_colocated``: at the highest rate the colocated setup sustains (its mean normalized
latency within ``--sustain-factor`` x its figure at the lowest rate), colocated s/token over disaggregated
s/token; target >= 1.3 with at least 4 rates. The detail keeps the curves, the peak throughputs and their
ratio (this key's value before issue 11) and, for the workers engine, the planner's split for the measured inputs.

``--quick``: the tiny model on the CPU over gloo (N = 2 processes), two rates, a few requests (no timing claims).

    PYTHONPATH=$PWD python3 -m kvstream.bench.disagg                  # two GPUs, ~5 minutes
    PYTHONPATH=$PWD python3 -m kvstream.bench.disagg --engine pipeline --gpus 4 --rates 1,2,4,8
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

from . import harness, timing
from .harness import Run
from .plot import pyplot, save_panels

MODES = ("disagg", "colocated")
LABELS = {"disagg": "disaggregated", "colocated": "colocated"}


def add_args(p: argparse.ArgumentParser) -> None:
    """The topic's own options."""
    p.add_argument("--rates", default="2,4,8,16", help="Poisson arrival rates, requests/s, comma-separated")
    p.add_argument("--requests", type=int, default=32, help="requests per run (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length (default 1024)")
    p.add_argument("--output-tokens", default="fixed:64", help="output lengths (default fixed:64)")
    p.add_argument("--microbatch", type=int, default=4, help="requests per microbatch (default 4)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-run bound on waits, s")
    p.add_argument("--engine", choices=("workers", "pipeline"), default="workers",
                   help="workers: kvstream disagg's workers; pipeline: prompt + token pipelines vs one pipeline")
    p.add_argument("--gpus", type=int, default=2, help="GPUs N, the same for both modes (even; default 2)")
    p.add_argument("--sustain-factor", type=float, default=2.0,
                   help="a rate is sustained while the colocated s/token stays within this factor of the lowest rate's")
    p.set_defaults(layers=8)  # 8 of Llama-3-8B's 32 layers keep the eight runs within ~5 minutes


def _disagg_args(run: Run, mode: str, rate: float, results: Path) -> list[str]:
    a = run.args
    if run.quick:
        argv = ["--device", "cpu", "--model", "tiny", "--requests", "4", "--prompt-tokens", "32",
                "--output-tokens", "fixed:4", "--microbatch", "2"]
    else:
        argv = ["--device", "cuda", "--model", "llama3-8b", "--layers", str(a.layers), "--requests", str(a.requests),
                "--prompt-tokens", str(a.prompt_tokens), "--output-tokens", a.output_tokens,
                "--microbatch", str(a.microbatch)]
    n = 2 if run.quick else a.gpus
    return argv + ["--mode", mode, "--workers", str(n), "--prompt-workers", str(n // 2), "--rate", str(rate),
                   "--no-check", "--timeout", str(a.timeout), "--results", str(results), "--json"]


def _pipeline_cfg(run: Run, mode: str, rate: float):
    """The pipeline engine's run of ``mode``: N/2 prompt + N/2 token stages, or one pipeline of N stages."""
    from kvstream.serving.pipeline.run import RunConfig, validate

    a, quick = run.args, run.quick
    n = 2 if quick else a.gpus
    half = max(1, n // 2)
    shape = (dict(model="tiny", requests=4, prompt_tokens=32, output_tokens="fixed:4", batch=2, layers=4) if quick else
             dict(model="llama3-8b", requests=a.requests, prompt_tokens=a.prompt_tokens, output_tokens=a.output_tokens,
                  batch=a.microbatch, layers=a.layers))
    split = dict(stages=half, prompt_stages=half) if mode == "disagg" else dict(stages=n)
    cfg = RunConfig(device=run.device.type, rate=rate, dtype="bfloat16" if run.is_cuda else "float32", check=False,
                    warmup=run.is_cuda, timeout=a.timeout, **shape, **split)
    cfg.microbatches = max(2, cfg.stages)
    validate(cfg)
    return cfg


def _run_point(run: Run, mode: str, rate: float, results: Path) -> tuple[dict, dict]:
    """One mode at one rate on the chosen engine: ``(load summary, planner inputs or {})``."""
    if run.args.engine == "pipeline":
        from .swap_throughput import run_once

        cfg = _pipeline_cfg(run, mode, rate)
        timing.progress(f"pipeline {mode}: {cfg.prompt_stages} prompt + {cfg.stages} stages at {rate:g} req/s")
        return run_once(cfg, results)["summary"], {}
    from kvstream.serving import disagg

    argv_ = _disagg_args(run, mode, rate, results)
    timing.progress(f"kvstream disagg {' '.join(argv_)}")
    code, doc = disagg.run(disagg._parser().parse_args(argv_))
    if code != 0 or doc["missing"]:
        raise SystemExit(f"kvstream.bench.disagg: {mode} at rate {rate:g} failed (code {code}, missing {doc['missing']})")
    return doc["summary"], doc["planner_inputs"] or {}


def sustained_rate(latency: dict[float, float], factor: float) -> float:
    """The highest rate whose normalized latency stays within ``factor`` x the lowest rate's (``latency``:
    rate -> mean s/token of the colocated setup); the lowest rate itself when none above it does."""
    rates = sorted(latency)
    limit = factor * latency[rates[0]]
    return max(r for r in rates if latency[r] <= limit or r == rates[0])


def _plot(points: dict, path: Path, title: str) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in MODES:
        xs = sorted(r for (m, r) in points if m == mode)
        if not xs:
            continue
        ax1.plot(xs, [points[mode, r]["throughput_req_per_s"] for r in xs], marker="o", label=LABELS[mode])
        ax2.plot(xs, [points[mode, r]["normalized_latency_s_per_token"]["mean"] for r in xs], marker="o",
                 label=LABELS[mode])
    ax1.set(xlabel="arrival rate (requests/s)", ylabel="throughput (requests/s)", title="throughput")
    ax2.set(xlabel="arrival rate (requests/s)", ylabel="normalized latency (s/token)", title="normalized latency")
    save_panels(fig, plt, (ax1, ax2), path, title)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the topic. Returns the exit code."""
    from kvstream.serving.planner import PlanInputs, plan

    run = Run.from_argv("disagg", argv, add_args, __doc__)
    n = 2 if run.quick else run.args.gpus
    if n < 2 or n % 2:
        raise SystemExit(f"kvstream.bench.disagg: --gpus must be even and >= 2, got {n}")
    if not run.quick:
        import torch

        if torch.cuda.device_count() < n:
            raise SystemExit(f"kvstream.bench.disagg needs {n} GPUs (or --quick for the CPU smoke run)")
    rates = [25.0, 50.0] if run.quick else [float(r) for r in run.args.rates.split(",")]
    points: dict = {}
    planner: dict = {}
    for rate in rates:
        for mode in MODES:
            results = run.out_dir / "disagg-runs" / f"{mode}-rate{rate:g}"
            s, inputs = _run_point(run, mode, rate, results)
            points[mode, rate] = s
            x = "inf" if math.isinf(rate) else rate
            run.add("disagg.load", LABELS[mode], x, "throughput", "req/s", s["throughput_req_per_s"])
            run.add("disagg.load", LABELS[mode], x, "throughput", "tokens/s", s["throughput_tokens_per_s"])
            run.add("disagg.load", LABELS[mode], x, "normalized_latency_mean", "s/token",
                    s["normalized_latency_s_per_token"]["mean"])
            run.add("disagg.load", LABELS[mode], x, "normalized_latency_p90", "s/token",
                    s["normalized_latency_s_per_token"]["p90"])
            run.add("disagg.load", LABELS[mode], x, "ttft_mean", "s", s["ttft_s"])
            if mode == "disagg" and inputs:
                planner = inputs
            timing.progress(f"{mode} at {rate:g} req/s: {s['throughput_req_per_s']:.3f} req/s, "
                            f"{s['normalized_latency_s_per_token']['mean']:.4f} s/token")
    png = run.out_dir / "disagg.png"
    what = "pipelines" if run.args.engine == "pipeline" else "workers"
    _plot(points, png, f"Prompt/token disaggregation ({n // 2} + {n // 2} GPUs, {what}) vs colocated ({n} GPUs)")
    peak = {m: max(points[m, r]["throughput_req_per_s"] for r in rates) for m in MODES}
    lat = {m: {r: points[m, r]["normalized_latency_s_per_token"]["mean"] for r in rates} for m in MODES}
    r_star = sustained_rate(lat["colocated"], run.args.sustain_factor)
    detail = {"points": {f"{m}@{r:g}": points[m, r] for (m, r) in points}, "planner_inputs": planner,
              "png": str(png), "engine": run.args.engine, "gpus": n, "sustained_rate_req_per_s": r_star,
              "sustained_means": f"colocated mean s/token <= {run.args.sustain_factor:g} x its value at "
                                 f"{min(rates):g} req/s (the lowest rate)",
              "normalized_latency_vs_rate": {LABELS[m]: {f"{r:g}": lat[m][r] for r in rates} for m in MODES},
              "peak_throughput_req_per_s": {LABELS[m]: peak[m] for m in MODES},
              "peak_throughput_ratio": peak["disagg"] / peak["colocated"]}
    if planner:
        split = plan(PlanInputs(prompt_time_s=planner["prompt_time_s"], token_time_s=planner["token_time_s"],
                                tokens=max(2, int(planner["tokens"])), machines=n, overhead=planner["overhead"]))
        detail[f"planner_split_for_{n}"] = split.as_dict()
    run.summary("disagg_vs_colocated", value=lat["disagg"][r_star], unit="s/token", ceiling=lat["colocated"][r_star],
                ratio=lat["colocated"][r_star] / lat["disagg"][r_star],
                ceiling_of=f"colocated ({n} GPUs each prefill and decode), mean normalized latency at {r_star:g} req/s, the "
                           "highest rate it sustains; ratio = colocated / disaggregated; same Poisson load, same run",
                target=">= 1.3", target_of="ratio", conditions={"rates >= 4": len(rates) >= 4},
                provider=f"disaggregated ({run.args.engine})", detail=detail)
    print(f"\ncurves: {png}")
    return run.finish()


if __name__ == "__main__":
    harness.module_main(main)
