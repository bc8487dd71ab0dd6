"""``kvstream failover``: serve a load on a pipeline of stage processes, kill some, recover, check, report.

``kvstream failover --device cpu --stages 2 --requests 4 --kill 1@8`` starts the stage processes (and the
standbys or replica holders) over gloo, serves the load with every stage's KV replicated
(``--replica ring|host|disk``), kills stage 1 with ``SIGKILL`` in decode step 8, detects it (heartbeats,
``--heartbeat-s`` / ``--deadline-s``, DéjàVu's 1 s / 3 s by default), replaces it, restores the KV of every
in-flight microbatch from the replica and resumes each at its acked step + 1. In the same session it runs
a failure-free reference and the baseline (the same failure, the hit microbatches recomputed from their
prompts), prints detection time, restore time and bytes and the latency of the hit requests, and ends with
``recomputed tokens: N`` and ``R/R requests identical to an uninterrupted run`` (single-process
``generate``; float32 on the CPU, token-exact).

Exit codes: 0 when every request is identical and no acknowledged token was recomputed, 1 otherwise, 2 for
a user error (one line).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

import torch

from ...errors import ConfigError
from ..launch import OneLineParser, guarded
from ..pipeline.run import workload
from .config import REPLICAS, FailoverConfig, KillSpec, validate
from .run import FailoverSession, checks, per_phase


def parser(prog: str = "kvstream failover") -> argparse.ArgumentParser:
    """The options of ``kvstream failover``."""
    p = OneLineParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--stages", type=int, default=2, help="pipeline depth D (default 2)")
    p.add_argument("--microbatches", type=int, default=None, help="microbatches in flight (default D, at least 2)")
    p.add_argument("--batch", type=int, default=1, help="requests per microbatch (default 1)")
    p.add_argument("--requests", type=int, default=4, help="requests R (default 4)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (default 16 cpu, 1024 cuda)")
    p.add_argument("--output-tokens", default=None, help="output lengths, fixed:N or uniform:A:B (default fixed:16 cpu)")
    p.add_argument("--model", default=None, help="tiny, llama3-8b or a checkpoint directory")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the embedded model")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--kill", action="append", default=[], metavar="STAGE@STEP",
                   help="failure to inject: S@N (decode step N), S@pN (N-th prompt), S@recover, rS@N (replica "
                        "holder, --replica host); :stop for SIGSTOP instead of SIGKILL; repeatable")
    p.add_argument("--replica", choices=REPLICAS, default="ring",
                   help="ring: the next stage's host memory; host: a standby process per stage; disk (default ring)")
    p.add_argument("--replica-dir", default=None, help="directory of --replica disk (default: a temp directory)")
    p.add_argument("--replacement", choices=("standby", "restart"), default="standby",
                   help="a standby with weights loaded, or a process started after the failure (default standby)")
    p.add_argument("--heartbeat-s", type=float, default=1.0, help="heartbeat period, s (default 1)")
    p.add_argument("--deadline-s", type=float, default=3.0, help="silence after which a process is dead, s (default 3)")
    p.add_argument("--exit-watch", action=argparse.BooleanOptionalAction, default=False,
                   help="also notice a child's exit at once (default off: heartbeats only)")
    p.add_argument("--window", type=int, default=4, help="decode steps a stage may run ahead of its replica")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the recompute-from-prompt baseline and a failure-free reference (default on)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1)")
    p.add_argument("--timeout", type=float, default=120.0, help="bound on one recovery attempt, s (default 120)")
    p.add_argument("--json", action="store_true", help="print the whole record as JSON before the last lines")
    return p


def config_from_args(args: argparse.Namespace) -> FailoverConfig:
    """Resolve the device-dependent defaults."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    if args.stages < 1 or args.requests < 1 or args.batch < 1:
        raise ConfigError("--stages, --requests and --batch must be >= 1")
    return FailoverConfig(device=device, stages=args.stages, microbatches=args.microbatches or max(2, args.stages),
                          batch=args.batch, requests=args.requests, rate=math.inf,
                          prompt_tokens=args.prompt_tokens or (1024 if cuda else 16),
                          output_tokens=args.output_tokens or ("fixed:128" if cuda else "fixed:16"),
                          model=args.model or ("llama3-8b" if cuda else "tiny"), layers=args.layers,
                          dtype=args.dtype or ("bfloat16" if cuda else "float32"), warmup=False,
                          timeout=args.timeout, threads=args.threads, replica=args.replica,
                          replica_dir=args.replica_dir, replacement=args.replacement, heartbeat_s=args.heartbeat_s,
                          deadline_s=args.deadline_s, exit_watch=args.exit_watch, window=args.window,
                          recovery_timeout_s=args.timeout, kills=list(args.kill),
                          standbys=2 if args.baseline else 1)  # the baseline's failure gets a ready standby too


def run_session(cfg: FailoverConfig, *, baseline: bool = True) -> dict:
    """The failover phase (and, with ``baseline``, a failure-free reference and the recompute baseline) in
    one session of processes; returns the record :func:`summarize` reads."""
    groups = workload(cfg)
    out: dict = {"config": cfg.to_json()}
    with FailoverSession(cfg) as session:
        if baseline:
            out["reference"] = session.run_phase(groups, name="reference")
        out["failover"] = session.run_phase(groups, kills=cfg.kills, mode="restore", name="failover")
        if baseline:
            out["baseline"] = session.run_phase(groups, kills=cfg.kills, mode="recompute", name="baseline")
    docs = session.docs
    for name in ("reference", "failover", "baseline"):
        if name in out:
            out[name]["recomputed_tokens"] = per_phase(docs, out[name]["phase"], "recomputed_tokens")
    out["workers"] = {str(k): v for k, v in docs.items()}
    out["checks"] = checks(cfg, groups, out["failover"]["outputs"])
    if baseline:
        out["baseline_checks"] = checks(cfg, groups, out["baseline"]["outputs"])
    return out


def _latency(doc: dict, ids: set[int]) -> float | None:
    lat = [c["finish_s"] - c["arrival_s"] for c in doc["completions"] if c["id"] in ids]
    return max(lat) if lat else None


def summarize(rec: dict) -> dict:
    """The figures of a :func:`run_session` record: detection, restore, latencies, recomputed tokens, checks."""
    fo = rec["failover"]
    events = fo["events"]
    detect = [e["detect_t"] - e["kill_t"] for e in events if e.get("kill_t") is not None]
    restores = [r for e in events for r in (e.get("restores") or {}).values() if r.get("from") is not None]
    hit = set(fo["hit"])
    out = {"failures": len(events), "detect_s": max(detect) if detect else None,
           "restore_s": sum(r["seconds"] for r in restores), "restore_bytes": sum(r["bytes"] for r in restores),
           "restored_microbatches": sum(r["groups"] for r in restores), "hit": sorted(hit),
           "hit_latency_s": _latency(fo, hit), "recomputed_tokens": fo["recomputed_tokens"],
           "identical": sum(c["identical"] for c in rec["checks"]), "requests": len(rec["checks"]),
           "completed": len(fo["completions"]), "unfired": fo.get("unfired", []),
           "replica_end_bytes": (fo.get("replicas") or {}).get("end_bytes")}
    out["unprotected"] = [{"stage": w.get("stage"), "dropped": w["replication"]["dropped"],
                           "rebuilds": w["replication"]["rebuilds"]}
                          for w in rec.get("workers", {}).values() if (w.get("replication") or {}).get("losses")]
    if "reference" in rec:
        out["reference_latency_s"] = _latency(rec["reference"], hit)
    if "baseline" in rec:
        bl = rec["baseline"]
        out["baseline_latency_s"] = _latency(bl, set(bl["hit"]) or hit)
        out["baseline_identical"] = sum(c["identical"] for c in rec["baseline_checks"])
    return out


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s"


def report(rec: dict, s: dict) -> list[str]:
    """The lines ``kvstream failover`` prints (the last two: recomputed tokens, identical requests)."""
    cfg = rec["config"]
    lines = [f"failover: {cfg['stages']} stages, {s['requests']} requests, replica {cfg['replica']}, "
             f"replacement {cfg['replacement']}, heartbeat {cfg['heartbeat_s']} s / deadline {cfg['deadline_s']} s"]
    for e in rec["failover"]["events"]:
        took = None if e.get("kill_t") is None else e["detect_t"] - e["kill_t"]
        lines.append(f"failure: {e['role']} (process {e['inc']}, {e.get('spec') or 'not injected'}) detected by "
                     f"{e['how']} in {_s(took)}")
    lines.append(f"restore: {s['restored_microbatches']} microbatch(es), {s['restore_bytes']} bytes in {_s(s['restore_s'])}")
    ref = s.get("reference_latency_s")
    lat = s["hit_latency_s"]
    ratio = f" (x{lat / ref:.2f} of failure-free {_s(ref)})" if lat and ref else ""
    lines.append(f"hit requests {s['hit']}: latency {_s(lat)}{ratio}")
    if "baseline_latency_s" in s:
        bl = s["baseline_latency_s"]
        ratio = f" (x{bl / ref:.2f})" if bl and ref else ""
        lines.append(f"baseline (restart, recompute from the prompt): latency {_s(bl)}{ratio}, "
                     f"{s['baseline_identical']}/{s['requests']} identical")
    for u in s["unprotected"]:
        lines.append(f"stage {u['stage']}'s replica holder died: {u['dropped']} chunk(s) not replicated while "
                     f"unprotected, {u['rebuilds']} replica(s) rebuilt at the new holder")
    if s["replica_end_bytes"] is not None:
        lines.append(f"replica bytes held after the last request: {s['replica_end_bytes']}")
    if s["unfired"]:
        lines.append(f"failures that never fired: {', '.join(s['unfired'])}")
    lines.append(f"recomputed tokens: {s['recomputed_tokens']}")
    lines.append(f"{s['identical']}/{s['requests']} requests identical to an uninterrupted run")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``kvstream failover``; returns the exit code (module docstring)."""
    prog = "kvstream failover"
    args = parser(prog).parse_args(argv)

    def _body() -> dict:
        cfg = config_from_args(args)
        validate(cfg)
        return run_session(cfg, baseline=args.baseline)

    code, rec = guarded(prog, _body)
    if code is not None:
        return code
    s = summarize(rec)
    if args.json:
        print(json.dumps({"summary": s, "record": rec}, indent=1, default=str))
    print("\n".join(report(rec, s)))
    return 0 if s["identical"] == s["requests"] and s["recomputed_tokens"] == 0 else 1


__all__ = ["parser", "config_from_args", "run_session", "summarize", "report", "main", "KillSpec"]
