"""``kvstream pipeline`` (launch the stages, run the load, check, report) and the stage entry point.

``kvstream pipeline --device cpu --stages 2 --microbatches 4 --requests 8`` starts one process per stage
with ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), shows progress while they run, prints the load and per-stage tables and ends with
``R/R requests identical to single-process generate``. With one stage it runs in this process.
``python -m kvstream.serving.pipeline`` is one stage (under ``torchrun``: stage 0 prints the report)::

    torchrun --nproc-per-node 2 -m kvstream.serving.pipeline --device cpu --requests 8

Exit codes: 0 when every request completed with ``generate``'s tokens (or unchecked), 1 otherwise or when
a stage failed, 2 for a user error (one line, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from ...errors import ConfigError, KVStreamError
from ..launch import OneLineParser, guarded, stop_workers
from ..loadgen import add_load_args
from .disagg import run_disagg_stage
from .links import Env, env_from_os
from .report import plot, print_report, verdict
from .run import RunConfig, run_stage, validate


def parser(prog: str = "kvstream pipeline") -> argparse.ArgumentParser:
    """The options of ``kvstream pipeline`` (and of one stage)."""
    p = OneLineParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--stages", type=int, default=2, help="pipeline depth D: one process per stage (default 2)")
    p.add_argument("--microbatches", type=int, default=None, help="microbatches in flight M (default D, at least 2)")
    p.add_argument("--prompt-stages", type=int, default=None,
                   help="disaggregate: a prompt pipeline of this depth prefills, the D stages decode (kvstream disagg "
                        "--stages D; default there: D)")
    p.add_argument("--batch", type=int, default=1, help="requests per microbatch (default 1)")
    add_load_args(p, requests=8, prompt_default="32 cpu, 1024 cuda", output_default="uniform:4:12 cpu, fixed:128 cuda")
    p.add_argument("--model", default=None, help="tiny, llama3-8b or a checkpoint directory (default tiny cpu, llama3-8b cuda)")
    p.add_argument("--arch", default="llama", help="architecture of --model tiny: llama, qwen2, mistral, gpt2, opt, bloom")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the embedded model")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weights and KV (default float32 cpu, bfloat16 cuda)")
    p.add_argument("--seed", type=int, default=0, help="model weight seed")
    p.add_argument("--swap", nargs="?", const="on", choices=("on", "auto"), default=None,
                   help="swap microbatches beyond the budget to host memory; 'auto': only when predicted to hide")
    p.add_argument("--kv-budget-mb", type=float, default=None, help="device KV budget per stage (MiB)")
    p.add_argument("--pcie-gbps", type=float, default=None, help="B_pcie for the ratio, GB/s (default: measured)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare every request with single-process generate (default on)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="one untimed microbatch first (default on for cuda)")
    p.add_argument("--plot", default=None, help="write a PNG of per-step stall against the ratio here")
    p.add_argument("--results", default=None, help="directory for summary.json (default: a temp directory)")
    p.add_argument("--json", action="store_true", help="print summary.json instead of the tables")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per stage on cpu (default 1)")
    p.add_argument("--timeout", type=float, default=300.0, help="longest wait for a peer, s (default 300)")
    p.add_argument("--config-json", default=None, help=argparse.SUPPRESS)  # the launcher's resolved config
    p.add_argument("--progress-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Resolve the device-dependent defaults into a :class:`RunConfig`."""
    if args.config_json:
        doc = json.loads(args.config_json)
        doc["rate"] = float(doc["rate"])
        return RunConfig(**doc)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    prompt = args.prompt_tokens if args.prompt_tokens is not None or args.prompt_lengths else (1024 if cuda else 32)
    return RunConfig(device=device, stages=args.stages, microbatches=args.microbatches or max(2, args.stages),
                     batch=args.batch, requests=args.requests, rate=args.rate, prompt_tokens=prompt,
                     prompt_lengths=args.prompt_lengths,
                     output_tokens=args.output_tokens or ("fixed:128" if cuda else "uniform:4:12"),
                     load_seed=args.load_seed, model=args.model or ("llama3-8b" if cuda else "tiny"), arch=args.arch,
                     layers=args.layers, dtype=args.dtype or ("bfloat16" if cuda else "float32"), seed=args.seed,
                     swap=args.swap or "off", kv_budget_mb=args.kv_budget_mb, pcie_gbps=args.pcie_gbps,
                     check=args.check, warmup=cuda if args.warmup is None else args.warmup, timeout=args.timeout,
                     threads=args.threads, prompt_stages=args.prompt_stages or 0)


def _progress_writer(path: str):
    def _write(done: int, tokens: int) -> None:
        tmp = f"{path}.tmp"
        Path(tmp).write_text(json.dumps({"done": done, "tokens": tokens}))
        os.replace(tmp, path)

    return _write


def launch(cfg: RunConfig, results: Path, on_progress=None) -> dict:
    """Start one process per stage, wait for them (calling ``on_progress(done, tokens)``), return stage 0's
    summary document.

    Raises
    ------
    ConfigError
        A stage rejected the configuration (its one-line message).
    RuntimeError
        A stage failed or the run passed its time limit (with the stage's last output).
    """
    from ...transports.peer import free_port

    progress = results / "progress.json"
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(cfg.processes),
                PYTHONUNBUFFERED="1")
    if cfg.device == "cpu":
        base["OMP_NUM_THREADS"] = str(cfg.threads)
    cmd = [sys.executable, "-m", "kvstream.serving.pipeline", "--config-json", json.dumps(cfg.to_json()),
           "--results", str(results), "--progress-file", str(progress), "--quiet"]
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(cfg.processes)]
    procs = [subprocess.Popen(cmd, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=logs[r],
                              stderr=subprocess.STDOUT, text=True) for r in range(cfg.processes)]
    deadline = time.monotonic() + 4 * cfg.timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            if on_progress is not None and progress.exists():
                try:
                    on_progress(**json.loads(progress.read_text()))
                except (ValueError, OSError):
                    pass
            time.sleep(0.1)
        failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed or any(p.poll() is None for p in procs):
            stop_workers(procs)
            rank = failed[0] if failed else next(r for r, p in enumerate(procs) if p.returncode != 0)
            logs[rank].seek(0)
            lines = [line for line in logs[rank].read().splitlines() if line.strip()]
            if procs[rank].returncode == 2 and lines:
                raise ConfigError(lines[-1].split(": ", 1)[-1])
            what = f"exited with {procs[rank].returncode}" if failed else "timed out"
            raise RuntimeError(f"stage {rank} {what}: " + "\n".join(lines[-30:]))
    finally:
        stop_workers(procs)
        for f in logs:
            f.close()
    return json.loads((results / "summary.json").read_text())


def _run_with_progress(cfg: RunConfig, results: Path) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tokens]} tokens"),
               TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(f"{cfg.processes} stage(s) serving", total=cfg.requests, tokens=0)

        def _update(done: int, tokens: int) -> None:
            bar.update(task, completed=done, tokens=tokens)

        if cfg.processes == 1:
            return run_stage(cfg, Env(0, 1, 0), progress=_update, results=str(results))
        return launch(cfg, results, on_progress=_update)


def _finish(doc: dict, args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print_report(doc)
    if args.plot:
        print(f"plot: {plot(doc, args.plot)}")
    print(verdict(doc))
    ok = doc["completed"] == doc["requests"] and (not doc["config"]["check"] or doc["identical"] == doc["requests"])
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None, *, disaggregate: bool = False) -> int:
    """``kvstream pipeline``: launch, run, check, report. Returns the exit code (module docstring).

    ``disaggregate`` (``kvstream disagg --stages D``): a prompt pipeline of ``--prompt-stages`` (default D)
    stages prefills and streams KV layer by layer to the D token stages (:mod:`.disagg`).
    """
    prog = "kvstream disagg" if disaggregate else "kvstream pipeline"
    args = parser(prog).parse_args(argv)

    def _body() -> dict:
        if disaggregate and args.prompt_stages is None:
            args.prompt_stages = args.stages
        cfg = config_from_args(args)
        validate(cfg)
        results = Path(args.results) if args.results else Path(tempfile.mkdtemp(prefix="kvstream-pipeline-"))
        results.mkdir(parents=True, exist_ok=True)
        return _run_with_progress(cfg, results)

    code, doc = guarded(prog, _body)
    return code if code is not None else _finish(doc, args)


def stage_main(argv: Sequence[str] | None = None) -> int:
    """One stage (``python -m kvstream.serving.pipeline``, e.g. under ``torchrun``); stage 0 reports."""
    args = parser("python -m kvstream.serving.pipeline").parse_args(argv)

    def _body() -> dict | None:
        cfg = config_from_args(args)
        env = env_from_os()
        if env.world != cfg.processes:
            if args.config_json or cfg.prompt_stages:
                raise ConfigError(f"WORLD_SIZE {env.world} differs from the {cfg.processes} stages configured")
            cfg.stages = env.world  # under torchrun the job's size is the pipeline's depth
            cfg.microbatches = args.microbatches or max(2, env.world)
        if env.rank == 0 and not args.config_json:
            validate(cfg)
        progress = _progress_writer(args.progress_file) if args.progress_file else None
        run = run_disagg_stage if cfg.prompt_stages else run_stage
        return run(cfg, env, progress=progress, results=args.results)

    code, doc = guarded(f"stage {os.environ.get('RANK', 0)}", _body, failures=KVStreamError, failed_code=3)
    if code is not None:
        return code
    if doc is None or args.quiet:
        return 0
    return _finish(doc, args)


__all__ = ["parser", "config_from_args", "launch", "main", "stage_main"]
