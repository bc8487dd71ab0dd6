"""Hook: the host time the generate hook adds to one decode step, measured through the real ``update`` calls.

A decode step of Llama-3-8B's KV shape (``--layers`` 32, 8 KV heads, head_dim 128, bf16) is 32 ``update``
calls with ``[B, 8, 1, 128]`` new keys and values (transposed views, as the attention layers hand them
over). Each measured step runs the same updates on two caches, one after the other in alternating order,
with the device synchronized before each (outside the timer) and ``time.perf_counter_ns`` around the 32
calls: ``DynamicCache`` and ``StreamingCache`` → ``HostTransport(preallocate=True)`` (level 3: the pack
launch and the flush are enqueued inside the last ``update``), ``StaticCache`` and ``StreamingStaticCache``.
The streaming caches send a chunk every ``--steps-per-chunk`` steps (the library's default, 16:
:mod:`kvstream.integrations.hf.tail`), so one step in that many pays the chunk: the added host time per
step is the difference of each pair summed over windows of that many consecutive steps and divided by it
(every window holds one chunk), the median over windows, at ``--batches`` 1 and 16, after a
``--prompt``-token prefill and a warm-up of ``--warmup`` steps (pinned arena, pointer tables and Triton
kernels warm). The detail also keeps the median step without a chunk and the median step with one.

Rows (``<out>/hook.csv``): ``hook.step``, x = batch, providers ``dynamic``, ``stream``, ``static``,
``stream-static``, metric host_time (µs). Summary keys: ``hook_step_host_us`` (the worse of B1 and B16) and
``static_hook_step_host_us``.
"""

from __future__ import annotations

import argparse
import time
from typing import Sequence

import torch

from . import harness, inputs, timing
from .harness import Run
from .timing import Stat


def add_args(p: argparse.ArgumentParser) -> None:
    """The topic's own options."""
    p.add_argument("--batches", default="1,16", help="batch sizes (comma-separated)")
    p.add_argument("--prompt", type=int, default=512, help="prefill tokens before the measured steps")
    p.add_argument("--steps", type=int, default=800, help="measured decode steps (50 windows of 16: the median of 12 read ±60 us on the shared H200 host)")
    p.add_argument("--warmup", type=int, default=20, help="unmeasured decode steps first")
    p.add_argument("--steps-per-chunk", type=int, default=None,
                   help="decode steps per streamed chunk (default: the library's, STEPS_PER_CHUNK)")


def _geometry(run: Run) -> dict:
    from kvstream.integrations.hf.tail import STEPS_PER_CHUNK

    a = run.args
    per_chunk = a.steps_per_chunk or STEPS_PER_CHUNK
    if run.quick:
        return dict(layers=2, heads=2, head_dim=16, batches=[1, 2], prompt=8, steps=2 * min(per_chunk, 4), warmup=2,
                    per_chunk=min(per_chunk, 4))
    return dict(layers=a.layers, heads=8, head_dim=128, batches=[int(b) for b in a.batches.split(",")],
                prompt=a.prompt, steps=a.steps, warmup=a.warmup, per_chunk=per_chunk)


def per_step(diffs: list[float], window: int) -> list[float]:
    """Host µs added per step, amortized: ``diffs`` (one per step) summed over consecutive windows of
    ``window`` steps (a trailing partial window is dropped), each divided by ``window``; one figure per
    window (the mean of all steps when there is no whole window)."""
    sums = [sum(diffs[i:i + window]) / window for i in range(0, len(diffs) - window + 1, window)]
    return sums or [sum(diffs) / max(len(diffs), 1)]


def _caches(run: Run, g: dict, batch: int, transport) -> dict:
    from transformers import DynamicCache, StaticCache

    from kvstream.integrations.hf import StreamingCache, StreamingStaticCache
    from kvstream.models import llama3_8b_config

    cfg = llama3_8b_config(g["layers"])
    cfg.num_key_value_heads, cfg.head_dim = g["heads"], g["head_dim"]
    cfg.num_attention_heads = g["heads"]
    n = g["prompt"] + g["warmup"] + g["steps"] + 1
    k = g["per_chunk"]
    return {"dynamic": DynamicCache(config=cfg),
            "stream": StreamingCache(config=cfg, transport=transport, session=f"hook-d{batch}", steps_per_chunk=k),
            "static": StaticCache(config=cfg, max_cache_len=n),
            "stream-static": StreamingStaticCache(cfg, n, transport, session=f"hook-s{batch}", steps_per_chunk=k)}


def bench_batch(run: Run, g: dict, batch: int) -> dict:
    """Host µs per step of the four caches at ``batch``; returns the per-pair median differences."""
    from kvstream.transports.host import HostTransport

    L, H, D, dt, dev = g["layers"], g["heads"], g["head_dim"], torch.bfloat16, run.device
    per_token = L * 2 * batch * H * D * 2
    total = per_token * (g["prompt"] + g["warmup"] + g["steps"]) * 2  # both streaming caches
    transport = HostTransport(capacity_bytes=int(total * 1.1) + (16 << 20), preallocate=True)
    caches = _caches(run, g, batch, transport)
    prompt = [inputs.random_tensor((batch, H, g["prompt"], D), dt, dev) for _ in range(2)]
    with torch.inference_mode():
        for c in caches.values():
            for l in range(L):
                c.update(prompt[0], prompt[1], l)
        new = [inputs.random_tensor((batch, 1, H, D), dt, dev).transpose(1, 2) for _ in range(2 * L)]
        times: dict[str, list[float]] = {p: [] for p in caches}
        order = list(caches)
        for step in range(g["warmup"] + g["steps"]):
            for p in (order if step % 2 == 0 else order[::-1]):
                c = caches[p]
                timing.sync(dev)
                t0 = time.perf_counter_ns()
                for l in range(L):
                    c.update(new[2 * l], new[2 * l + 1], l)
                t1 = time.perf_counter_ns()
                if step >= g["warmup"]:
                    times[p].append((t1 - t0) / 1e3)
        for p in ("stream", "stream-static"):
            caches[p].wait()
    for p, ts in times.items():
        run.add("hook.step", p, batch, "host_time", "us", Stat.of(ts))
    w = g["per_chunk"]
    added = {"step_bytes": per_token, "steps_per_chunk": w, **{f"{p}_us": Stat.of(ts).p50 for p, ts in times.items()}}
    for field, mine, base in (("hook", "stream", "dynamic"), ("static", "stream-static", "static")):
        diffs = [a - b for a, b in zip(times[mine], times[base])]
        amortized = per_step(diffs, w)
        added[field] = Stat.of(amortized).p50
        added[f"{field}_spread"] = {"min": min(amortized), "max": max(amortized), "windows": len(amortized)}
        cut = sorted(diffs)
        # a window's one chunk step is its largest difference, as a rule: the median of the rest, and of those
        added[f"{field}_step_without_chunk_us"] = Stat.of(cut[:len(cut) - len(cut) // w] or cut).p50
        added[f"{field}_step_with_chunk_us"] = Stat.of(cut[len(cut) - len(cut) // w:] or cut).p50
    timing.progress(f"hook: B{batch}: StreamingCache adds {added['hook']:.1f} us per step, "
                    f"StreamingStaticCache {added['static']:.1f} us")
    transport.close()
    del caches, prompt, new
    inputs.free_memory()
    return added


def main(argv: Sequence[str] | None = None) -> int:
    """Run the hook topic; returns the exit code."""
    run = Run.from_argv("hook", argv, add_args, __doc__)
    g = _geometry(run)
    res = {str(b): bench_batch(run, g, b) for b in g["batches"]}
    for key, field, target in (("hook_step_host_us", "hook", "<= 60"), ("static_hook_step_host_us", "static", "<= 20")):
        worst = max(res, key=lambda b: res[b][field])
        base = "DynamicCache" if field == "hook" else "StaticCache"
        run.summary(key, value=res[worst][field], unit="us", ceiling=res[worst][f"{'dynamic' if field == 'hook' else 'static'}_us"],
                    ceiling_of=f"{base}'s own {g['layers']} updates per step, same run (us)", target=target,
                    target_of="value", provider=f"worst of B{', B'.join(res)}: B{worst}, {g['layers']} layers",
                    detail={"by_batch": res, "steps": g["steps"], "prompt": g["prompt"]})
    return run.finish()


if __name__ == "__main__":
    harness.module_main(main)
