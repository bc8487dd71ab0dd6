"""``kvstream disagg``: start prompt and token workers, run a load, check every output, report.

The launcher hosts the rendezvous store (a ``TCPStore`` on 127.0.0.1), starts ``--workers`` processes of
``kvstream serve`` with ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``, ``TORCHELASTIC_USE_AGENT_STORE=True``), waits for them, and reads their
``rank<r>.json``:

* ``--mode disagg`` (default): ranks ``0..P-1`` prefill and stream KV layer by layer to the token ranks,
  which decode (DéjàVu's prompt/token disaggregation). With ``--check`` (default) every token worker
  also runs single-process ``generate`` on each microbatch; the exit code is 0 only if every request's
  tokens are identical (greedy) and every request completed.
* ``--mode colocated``: every worker prefills and decodes its own microbatches (the baseline).

A worker that fails (a killed peer, a bad option) makes the launcher stop the others and exit non-zero
with that worker's error. The report gives throughput and normalized latency (:mod:`.loadgen`), and
``<results>/summary.json`` holds it with the measured planner inputs (``planner_inputs``:
``kvstream plan --results <results>/summary.json --machines D``).

Examples
--------
CPU, the tiny model, one prompt and one token worker over gloo::

    kvstream disagg --device cpu --requests 3

Two GPUs, the Llama-3-8B shape over NCCL (fewer layers with ``--layers``)::

    kvstream disagg --device cuda --requests 16 --rate 1 --layers 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from .launch import guarded, stop_workers
from .loadgen import Completion, report, summarize
from .worker import add_workload_args, resolve_defaults



def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvstream disagg", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("disagg", "colocated"), default="disagg",
                   help="disagg: prompt + token workers; colocated: every worker does both (the baseline)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2: 1 prompt + 1 token)")
    p.add_argument("--results", default=None, help="directory for the workers' JSON and summary.json (default: temp)")
    p.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    add_workload_args(p)
    return p


def worker_argv(args: argparse.Namespace, results: str) -> list[str]:
    """The ``kvstream serve`` arguments that reproduce ``args`` in a worker."""
    out = ["--role", "both" if args.mode == "colocated" else "auto", "--results", results]
    for name in ("device", "model", "layers", "dtype", "seed", "transport", "level", "prompt_workers", "requests",
                 "rate", "prompt_tokens", "prompt_lengths", "output_tokens", "microbatch", "load_seed", "threads",
                 "timeout"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    out.append("--check" if args.check else "--no-check")
    return out


def launch(args: argparse.Namespace, results: Path) -> list[dict]:
    """Start the workers, wait for them and return their result documents (by rank).

    Raises
    ------
    ConfigError
        Too few workers or GPUs.
    RuntimeError
        A worker failed or the run exceeded its time limit (the message has the worker's error output).
    """
    from ..transports.peer import rendezvous_store

    if args.workers < 2:
        raise ConfigError(f"--workers must be >= 2, got {args.workers}")
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < args.workers:
            raise ConfigError(f"--workers {args.workers} on cuda needs as many GPUs; {torch.cuda.device_count()} visible")
    server = rendezvous_store("127.0.0.1", 0, is_server=True, timeout_s=args.timeout)
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(server.port), WORLD_SIZE=str(args.workers),
                TORCHELASTIC_USE_AGENT_STORE="True", PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        base["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "kvstream.cli", "serve", *worker_argv(args, str(results))]
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(args.workers)]
    procs = [subprocess.Popen(cmd, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=logs[r],
                              stderr=subprocess.STDOUT, text=True) for r in range(args.workers)]
    deadline = time.monotonic() + 4 * args.timeout
    try:
        failed = None
        while any(p.poll() is None for p in procs):
            failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            if failed is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        failed = failed if failed is not None else next((r for r, p in enumerate(procs) if p.returncode), None)
        if failed is not None or any(p.poll() is None for p in procs):
            stop_workers(procs)
            rank = failed if failed is not None else next(r for r, p in enumerate(procs) if p.returncode != 0)
            logs[rank].seek(0)
            tail = logs[rank].read()[-3000:]
            what = f"exited with {procs[rank].returncode}" if failed is not None else "timed out"
            raise RuntimeError(f"worker rank {rank} {what}:\n{tail}")
    finally:
        stop_workers(procs)
        for f in logs:
            f.close()
    return [json.loads((results / f"rank{r}.json").read_text()) for r in range(args.workers)]


def planner_inputs(docs: list[dict]) -> dict:
    """The planner's measured inputs from a disaggregated run: ``Y`` (plain prefill), ``t`` (decode step),
    ``N`` (mean output tokens) and ``m`` (prefill + KV streaming over plain prefill)."""
    prompt = [d for d in docs if d["role"] == "prompt"]
    token = [d for d in docs if d["role"] == "token"]
    if not prompt or not token:
        return {}

    def mean(xs):
        """Arithmetic mean of the values (NaN for none)."""
        xs = list(xs)
        return sum(xs) / len(xs) if xs else float("nan")

    y = mean(d["warmup"]["plain_prefill_s"] for d in prompt)
    streamed = mean(p + w for d in prompt for p, w in zip(d["timings"]["prefill_s"], d["timings"]["stream_wait_s"]))
    completions = [c for d in token for c in d.get("completions", [])]
    return {"prompt_time_s": y, "token_time_s": mean(s for d in token for s in d["timings"]["decode_step_s"]),
            "tokens": round(mean(c["output_tokens"] for c in completions)), "overhead": max(1.0, streamed / y),
            "batch": docs[0]["args"]["microbatch"], "prompt_tokens": round(mean(c["prompt_tokens"] for c in completions))}


def run(args: argparse.Namespace) -> tuple[int, dict]:
    """Launch, collect, check. Returns ``(exit code, summary document)``."""
    resolve_defaults(args)
    results = Path(args.results) if args.results else Path(tempfile.mkdtemp(prefix="kvstream-disagg-"))
    results.mkdir(parents=True, exist_ok=True)
    docs = launch(args, results)
    completions = [Completion(**c) for d in docs for c in d.get("completions", [])]
    checks = [c for d in docs for c in d.get("checks", [])]
    summary = summarize(completions)
    missing = sorted(set(range(args.requests)) - {c.id for c in completions})
    mismatched = sorted(c["request"] for c in checks if not c["identical"])
    doc = {"mode": args.mode, "workers": args.workers, "device": args.device, "model": args.model,
           "rate_req_per_s": args.rate if math.isfinite(args.rate) else "inf", "summary": summary,
           "checked": len(checks), "mismatched": mismatched, "missing": missing,
           "planner_inputs": planner_inputs(docs)}
    (results / "summary.json").write_text(json.dumps(doc, indent=1))
    ok = not missing and not mismatched and (args.mode == "colocated" or not args.check or len(checks) == args.requests)
    return (0 if ok else 1), doc


def main(argv: Sequence[str] | None = None) -> int:
    """``kvstream disagg``. Returns 0 when every request completed with identical tokens, 1 otherwise, 2 for
    bad arguments.

    With ``--stages D`` (and ``--prompt-stages P``, default D) it runs on pipelines instead: a prompt
    pipeline streams each layer's KV to the token pipeline's stage owning it
    (:mod:`kvstream.serving.pipeline.disagg`; the options of ``kvstream pipeline``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--stages" or a.startswith("--stages=") for a in argv):
        from .pipeline.cli import main as pipeline_main

        return pipeline_main(argv, disaggregate=True)
    args = _parser().parse_args(argv)
    failed, result = guarded("kvstream disagg", lambda: run(args), failures=RuntimeError)
    if failed is not None:
        return failed
    code, doc = result
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        report(doc["summary"], title=f"kvstream disagg ({args.mode}, {args.workers} workers, {args.device}, "
                                     f"{args.model})")
        if args.mode == "disagg" and args.check:
            verdict = "identical" if code == 0 else f"MISMATCH in requests {doc['mismatched']}, missing {doc['missing']}"
            print(f"outputs vs single-process generate: {doc['checked']} requests checked, {verdict}")
    return code


__all__ = ["main", "run", "launch", "worker_argv", "planner_inputs"]
