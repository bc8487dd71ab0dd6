"""Disaggregated serving (1 prompt GPU + 1 token GPU, KV over NCCL) against both GPUs each doing prefill and
decode, under the same Poisson load: throughput and normalized latency against the arrival rate.

DéjàVu's claim (paper §5.2, Fig. 10-11): splitting prefill and decode removes the interference of long
prompts with decoding and the pipeline bubbles they cause; up to 2x throughput at the same latency for
OPT-66B/BLOOM-176B pipelines. Here the split is the smallest one, two GPUs, with Hugging Face ``generate``
running static microbatches (no continuous batching) on each worker, so the figure says what
disaggregation alone gives at this scale; the planner (``kvstream plan``) explains the split from the
measured prefill time, decode step time and streaming overhead, which this run records.

For each rate in ``--rates`` (requests/s) and each mode, ``kvstream disagg`` runs ``--requests`` requests
(prompt ``--prompt-tokens``, output ``--output-tokens``, ``--microbatch`` per microbatch) on the
Llama-3-8B shape with ``--layers`` layers (default 8 here), outputs unchecked (``kvstream disagg --device cuda`` checks
them; here the comparison would cost time on the token GPU). Rows (``<out>/disagg.csv``): ``disagg.load``
x = rate, providers ``disaggregated`` / ``colocated``, metrics throughput (req/s, tokens/s), normalized
latency (mean, p90; s/token) and time to first token (s). ``<out>/disagg.png``: the two curves.
Summary key ``disagg_vs_colocated``: peak throughput of disaggregated over colocated (reported), with the
planner's split for the measured inputs in its detail.

``--quick``: the tiny model on the CPU over gloo, two rates, a few requests (no timing claims).

    PYTHONPATH=$PWD python3 -m kvstream.bench.disagg                  # two GPUs, ~5 minutes
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

from . import harness, timing
from .harness import Run

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
    return argv + ["--mode", mode, "--rate", str(rate), "--no-check", "--timeout", str(a.timeout),
                   "--results", str(results), "--json"]


def _plot(points: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Prompt/token disaggregation (1 + 1 GPU, NCCL) vs colocated (2 GPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the topic. Returns the exit code."""
    from kvstream.serving import disagg
    from kvstream.serving.planner import PlanInputs, plan

    run = Run.from_argv("disagg", argv, add_args, __doc__)
    if not run.quick:
        import torch

        if torch.cuda.device_count() < 2:
            raise SystemExit("kvstream.bench.disagg needs two GPUs (or --quick for the CPU smoke run)")
    rates = [25.0, 50.0] if run.quick else [float(r) for r in run.args.rates.split(",")]
    points: dict = {}
    planner: dict = {}
    for rate in rates:
        for mode in MODES:
            results = run.out_dir / "disagg-runs" / f"{mode}-rate{rate:g}"
            argv_ = _disagg_args(run, mode, rate, results)
            timing.progress(f"kvstream disagg {' '.join(argv_)}")
            args = disagg._parser().parse_args(argv_)
            code, doc = disagg.run(args)
            if code != 0 or doc["missing"]:
                raise SystemExit(f"kvstream.bench.disagg: {mode} at rate {rate:g} failed (code {code}, missing {doc['missing']})")
            s = doc["summary"]
            points[mode, rate] = s
            x = "inf" if math.isinf(rate) else rate
            run.add("disagg.load", LABELS[mode], x, "throughput", "req/s", s["throughput_req_per_s"])
            run.add("disagg.load", LABELS[mode], x, "throughput", "tokens/s", s["throughput_tokens_per_s"])
            run.add("disagg.load", LABELS[mode], x, "normalized_latency_mean", "s/token",
                    s["normalized_latency_s_per_token"]["mean"])
            run.add("disagg.load", LABELS[mode], x, "normalized_latency_p90", "s/token",
                    s["normalized_latency_s_per_token"]["p90"])
            run.add("disagg.load", LABELS[mode], x, "ttft_mean", "s", s["ttft_s"])
            if mode == "disagg" and doc["planner_inputs"]:
                planner = doc["planner_inputs"]
            timing.progress(f"{mode} at {rate:g} req/s: {s['throughput_req_per_s']:.3f} req/s, "
                            f"{s['normalized_latency_s_per_token']['mean']:.4f} s/token")
    png = run.out_dir / "disagg.png"
    _plot(points, png)
    peak = {m: max(points[m, r]["throughput_req_per_s"] for r in rates) for m in MODES}
    detail = {"points": {f"{m}@{r:g}": points[m, r] for (m, r) in points}, "planner_inputs": planner,
              "png": str(png)}
    if planner:
        split = plan(PlanInputs(prompt_time_s=planner["prompt_time_s"], token_time_s=planner["token_time_s"],
                                tokens=max(2, int(planner["tokens"])), machines=2, overhead=planner["overhead"]))
        detail["planner_split_for_2"] = split.as_dict()
    run.summary("disagg_vs_colocated", value=peak["disagg"], unit="req/s", ceiling=peak["colocated"],
                ceiling_of="colocated: both GPUs prefill and decode, same Poisson load, same run",
                target="reported", target_of="ratio", provider="disaggregated", detail=detail)
    print(f"\ncurves: {png}")
    return run.finish()


if __name__ == "__main__":
    harness.module_main(main)
