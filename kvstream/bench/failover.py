"""Failover by KV replication (``kvstream failover``'s engine): latency with a failure, restore against
re-prefill, detection, recomputed tokens and the cost of replicating.

One session of real processes over gloo (``--stages`` stage processes and two standbys with their weights
loaded, one for each failure phase; deaths are found by heartbeats only; on one GPU they all share it, so stages do not overlap as on separate GPUs), the Llama-3-8B shape
with ``--layers`` layers (default 32, the whole model: a failure costs a fixed ~1 s of detection and
recovery, so the inflation depends on how long a request takes and is only meaningful at the real depth;
four processes of 16 GB of weights share the GPU), ``--batch`` rows per microbatch, ``--prompt-tokens`` prompts and ``--new-tokens``
generated tokens per request:

* ``ft_latency_inflation`` — end-to-end latency of the requests hit by one failure (stage 1 SIGKILLed at
  decode step ``new_tokens / 2``; the standby adopts its rank and restores every in-flight microbatch from
  the ring replica) over their latency in a failure-free phase of the same session (target <= 1.15).
* ``ft_baseline_inflation`` — the same failure, the hit microbatches recomputed from their prompts
  (restart and regeneration, DéjàVu's baseline), over the failure-free latency (reported).
* ``ft_recomputed_tokens`` — tokens whose KV had been acknowledged and were computed again (target 0).
* ``ft_detect_s`` — kill to detection at the deadline used here (``--heartbeat-s`` / ``--deadline-s``,
  default 0.2 s / 0.6 s; the CLI's default is 1 s / 3 s) (target <= 1 s).
* ``replication_overhead`` — 1 - failure-free tokens/s with replication on over off, medians of
  ``--reps`` (>= 5) alternating pairs of shorter phases (``--overhead-tokens``) (target <= 0.02).
* ``ft_restore_vs_reprefill`` — in this process, one stage's layers: time to bring back the KV of an
  ``--context`` token request (prompt and generated tokens) from a pinned host-memory replica
  (``StreamingCache.load`` through the streamer, every layer landed) against re-prefilling those tokens
  (one forward, what vLLM and Dynamo do); median of 3 after a warm-up (target >= 5x).

``--quick``: the tiny model on the CPU, short phases, fast heartbeats, no claims (``pass`` null).

    PYTHONPATH=$PWD python -m kvstream.bench.failover            # one H200, about 3 minutes
    PYTHONPATH=$PWD python -m kvstream.bench.failover --quick --out /tmp/ft-quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Sequence

import torch

from . import harness, timing
from .harness import Run


def add_args(p: argparse.ArgumentParser) -> None:
    """The topic's own options (``--layers`` is the harness's: 32, the whole Llama-3-8B shape)."""
    p.add_argument("--stages", type=int, default=2, help="pipeline depth (default 2)")
    harness.workload_args(p, batch=2, prompt_tokens=1024, new_tokens=512, reps=5,
                          helps={"batch": "rows per microbatch", "new_tokens": "tokens per request",
                                 "reps": "alternating on/off pairs for the overhead"})
    p.add_argument("--requests", type=int, default=4, help="requests (default 4: two microbatches)")
    p.add_argument("--overhead-tokens", type=int, default=64, help="tokens per request in the overhead phases")
    p.add_argument("--context", type=int, default=8192, help="tokens of the restore-vs-re-prefill request")
    p.add_argument("--heartbeat-s", type=float, default=0.2, help="heartbeat period (default 0.2 s)")
    p.add_argument("--deadline-s", type=float, default=0.6, help="silence that counts as death (default 0.6 s)")


def _cfg(run: Run):
    from kvstream.serving.failover.config import FailoverConfig

    a = run.args
    if run.quick:
        return FailoverConfig(device="cpu", stages=2, microbatches=2, batch=1, requests=4, prompt_tokens=12,
                              output_tokens="fixed:16", model="tiny", dtype="float32", heartbeat_s=0.25, deadline_s=1.5,
                              recovery_timeout_s=60.0, kills=["1@8"], exit_watch=False, standbys=2)
    cuda = run.is_cuda
    return FailoverConfig(device="cuda" if cuda else "cpu", stages=a.stages, microbatches=max(2, a.stages), batch=a.batch,
                          requests=a.requests, prompt_tokens=a.prompt_tokens, output_tokens=f"fixed:{a.new_tokens}",
                          model="llama3-8b", layers=a.layers, dtype="bfloat16" if cuda else "float32",
                          heartbeat_s=a.heartbeat_s, deadline_s=a.deadline_s, recovery_timeout_s=120.0,
                          kills=[f"1@{max(1, a.new_tokens // 2)}"], exit_watch=False, standbys=2)


def _hit_latency(doc: dict, hit: set[int]) -> float | None:
    lat = [c["finish_s"] - c["arrival_s"] for c in doc["completions"] if c["id"] in hit]
    return max(lat) if lat else None


def _tokens_per_s(doc: dict) -> float:
    return sum(c["output_tokens"] for c in doc["completions"]) / doc["seconds"]


def pipeline_figures(run: Run) -> dict:
    """The session: failure-free reference, failover, baseline, then alternating overhead phases."""
    from dataclasses import replace

    from kvstream.serving.failover.config import validate
    from kvstream.serving.failover.run import FailoverSession, checks, per_phase
    from kvstream.serving.pipeline.run import workload

    cfg = _cfg(run)
    validate(cfg)
    groups = workload(cfg)
    short = workload(replace(cfg, output_tokens="fixed:8" if run.quick else f"fixed:{run.args.overhead_tokens}"))
    reps = 1 if run.quick else max(5, run.args.reps)
    on, off = [], []
    with FailoverSession(cfg) as session:
        timing.progress("failover: failure-free reference")
        ref = session.run_phase(groups, name="reference")
        timing.progress(f"failover: {cfg.kills[0]} restored from the ring replica")
        fo = session.run_phase(groups, kills=cfg.kills, name="failover")
        timing.progress(f"failover: {cfg.kills[0]} recomputed from the prompt (baseline)")
        bl = session.run_phase(groups, kills=cfg.kills, mode="recompute", name="baseline")
        for i, provider in timing.alternating(["on", "off"], reps):
            doc = session.run_phase(short, replicate=provider == "on", name=f"overhead-{provider}-{i}")
            (on if provider == "on" else off).append(_tokens_per_s(doc))
    docs = session.docs
    hit = set(fo["hit"])
    identical = sum(c["identical"] for c in checks(cfg, groups, fo["outputs"]))
    detect = [e["detect_t"] - e["kill_t"] for e in fo["events"] if e.get("kill_t") is not None]
    resume = [e["next_token_t"] - e["detect_t"] for e in fo["events"] if e.get("next_token_t")]
    return {"cfg": cfg, "reference_s": _hit_latency(ref, hit), "failover_s": _hit_latency(fo, hit),
            "baseline_s": _hit_latency(bl, set(bl["hit"]) or hit),
            "recomputed": per_phase(docs, fo["phase"], "recomputed_tokens"), "identical": identical,
            "requests": len(fo["completions"]), "detect_s": max(detect) if detect else None,
            "detect_to_next_token_s": max(resume) if resume else None, "events": fo["events"], "hit": sorted(hit),
            "tps_on": on, "tps_off": off, "replica_end_bytes": (fo.get("replicas") or {}).get("end_bytes")}


def restore_vs_reprefill(run: Run) -> dict:
    """One stage's layers, ``--context`` tokens: load from a pinned host replica vs one prefill forward."""
    import kvstream
    from kvstream.integrations.hf.keywords import cache_kwargs
    from kvstream.models import build_model, llama3_8b_config, tiny_config

    quick = run.quick
    config = tiny_config("llama", num_layers=2) if quick else llama3_8b_config(max(1, run.args.layers // run.args.stages))
    dtype = torch.float32 if quick or not run.is_cuda else torch.bfloat16
    context = 64 if quick else run.args.context
    model = build_model(config, seed=0, device=run.device, dtype=dtype)
    ids = torch.randint(0, int(config.vocab_size), (1, context), generator=torch.Generator().manual_seed(0)).to(run.device)
    layout_bytes = 2 * int(config.num_hidden_layers) * int(config.num_key_value_heads) * \
        (int(config.hidden_size) // int(config.num_attention_heads)) * context * dtype.itemsize
    host = kvstream.HostTransport(capacity_bytes=layout_bytes + (256 << 20), pinned=run.is_cuda)
    cache = kvstream.StreamingCache(config=config, transport=host, session="replica")
    with torch.inference_mode():
        model(ids, **cache_kwargs(cache))
    cache.wait()

    def _reprefill() -> float:
        timing.sync(run.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(ids, **cache_kwargs(kvstream.StreamingCache(config=config)))
        timing.sync(run.device)
        return time.perf_counter() - t0

    def _restore() -> float:
        timing.sync(run.device)
        t0 = time.perf_counter()
        loaded = kvstream.StreamingCache.load(host, "replica", config=config, device=run.device, stream=False)
        loaded.wait_loaded()
        timing.sync(run.device)
        took = time.perf_counter() - t0
        if not all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                   for a, b in zip(cache.layers, loaded.layers)):
            raise RuntimeError("failover bench: the restored KV differs from the replica's source")
        return took

    _reprefill(), _restore()  # warm-up
    samples = {"restore": [], "reprefill": []}
    for _, provider in timing.alternating(["restore", "reprefill"], 1 if quick else 3):
        samples[provider].append(_restore() if provider == "restore" else _reprefill())
    host.close()
    return {"context": context, "layers": int(config.num_hidden_layers), "bytes": layout_bytes,
            "restore_s": statistics.median(samples["restore"]), "reprefill_s": statistics.median(samples["reprefill"]),
            "samples": samples}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the failover topic; returns the exit code."""
    run = Run.from_argv("failover", argv, add_args, __doc__)
    f = pipeline_figures(run)
    cfg = f["cfg"]
    x = f"D{cfg.stages} B{cfg.batch} P{cfg.prompt_tokens} {cfg.output_tokens} L{cfg.layers or 'tiny'}"
    shared = "stage processes share one GPU" if run.is_cuda else "CPU processes"
    where = {"setup": x, "kill": cfg.kills[0], "replica": cfg.replica, "replacement": cfg.replacement,
             "heartbeat_s": cfg.heartbeat_s, "deadline_s": cfg.deadline_s, "note": shared, "hit": f["hit"],
             "identical": f["identical"], "requests": f["requests"], "events": f["events"]}
    for name in ("reference_s", "failover_s", "baseline_s"):
        run.add("failover.latency", name[:-2], x, "hit_latency", "s", f[name] or float("nan"))
    run.summary("ft_latency_inflation", value=f["failover_s"], unit="s", ceiling=f["reference_s"],
                ceiling_of="the same requests' latency in a failure-free phase of the same session", target="<= 1.15",
                provider="standby restores from the ring replica, resumes at acked step + 1",
                detail={**where, "detect_to_next_token_s": f["detect_to_next_token_s"]})
    run.summary("ft_baseline_inflation", value=f["baseline_s"], unit="s", ceiling=f["reference_s"],
                ceiling_of="failure-free latency, same session", target="reported",
                provider="standby, hit microbatches recomputed from their prompts", detail=where)
    run.summary("ft_recomputed_tokens", value=f["recomputed"], unit="tokens", ceiling=None,
                ceiling_of="acknowledged tokens computed again", target="<= 0", target_of="value", detail=where,
                conditions={"all_identical": f["identical"] == f["requests"]})
    run.summary("ft_detect_s", value=f["detect_s"], unit="s", ceiling=cfg.deadline_s,
                ceiling_of="the heartbeat deadline used", target="<= 1", target_of="value", detail=where)
    on, off = statistics.median(f["tps_on"]), statistics.median(f["tps_off"])
    run.add("failover.overhead", "replication on", x, "throughput", "tok/s", on)
    run.add("failover.overhead", "replication off", x, "throughput", "tok/s", off)
    run.summary("replication_overhead", value=1.0 - on / off, unit="fraction", ceiling=None,
                ceiling_of="1 - failure-free tokens/s with replication on over off", target="<= 0.02",
                target_of="value", detail={**where, "tokens_per_s_on": f["tps_on"], "tokens_per_s_off": f["tps_off"]})
    r = restore_vs_reprefill(run)
    run.add("failover.restore", "restore", r["context"], "time", "s", r["restore_s"])
    run.add("failover.restore", "reprefill", r["context"], "time", "s", r["reprefill_s"])
    run.summary("ft_restore_vs_reprefill", value=r["reprefill_s"], unit="s", ceiling=r["restore_s"],
                ceiling_of="StreamingCache.load of the same KV from a pinned HostTransport (every layer landed)",
                target=">= 5", provider="one stage's layers, in-process", detail=r)
    return run.finish()


if __name__ == "__main__":
    harness.module_main(main)
