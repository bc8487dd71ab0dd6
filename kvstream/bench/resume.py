"""Resume: ``StreamingCache.load`` of a stored session from a ``HostTransport`` onto the GPU, against pinned
``cudaMemcpyAsync`` of the same bytes in the same run.

The session is what ``generate`` streams for one request batch: a prefill of ``P`` tokens (one chunk per
layer, ``[1, 2, B, H, P, D]``) and ``N`` decode steps (one chunk of every layer each, ``[L, 2, B, H, 1, D]``),
Llama-3-8B shape by default (32 layers, 8 KV heads, head_dim 128, bf16: 128 KiB per token and row). The
cache that streams it is fed random KV through its own ``update`` (no model is needed to make a session).
Bytes moved by a load: ``L * 2 * B * H * (P + N) * D * 2`` over PCIe, host to device; the floor is those
bytes over the pinned H2D memcpy bandwidth measured in the same run (copies of one prefill chunk's size).

Timed (>= 5 alternating repetitions, after a warm-up load): from the ``load`` call until every layer's event
has fired, and until layer 0's event (what a continuing ``generate`` waits for first). Every load is
checked bit-exactly against the cache that streamed it. Summary key ``resume_host_vs_memcpy`` (target
>= 0.90 of memcpy).
"""

from __future__ import annotations

import argparse
import time
from typing import Sequence

import torch

from . import ceilings, harness, inputs, timing
from .harness import Run
from .records import GB, MiB


def add_args(p: argparse.ArgumentParser) -> None:
    """The topic's own options."""
    harness.workload_args(p, batch=16, prompt_tokens=2000, new_tokens=128, reps=5,
                          helps={"prompt_tokens": "prefill tokens", "new_tokens": "decode steps"})


def _geometry(run: Run) -> dict:
    a = run.args
    if run.quick:
        return dict(layers=2, heads=2, head_dim=16, batch=2, prompt=20, steps=3, reps=1)
    return dict(layers=a.layers, heads=8, head_dim=128, batch=a.batch, prompt=a.prompt_tokens, steps=a.new_tokens,
                reps=max(5, a.reps))


def _stream_session(g: dict, transport, device: torch.device, session: str):
    """A StreamingCache fed random KV layer by layer: one prefill forward, then decode steps. Returns it."""
    import kvstream

    cache = kvstream.StreamingCache(transport=transport, session=session)
    gen = torch.Generator(device=device).manual_seed(0)

    def _forward(tokens: int) -> None:
        for l in range(g["layers"]):
            shape = (g["batch"], g["heads"], tokens, g["head_dim"])
            k = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16)
            v = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16)
            cache.update(k, v, l)

    _forward(g["prompt"])
    for _ in range(g["steps"]):
        _forward(1)
    cache.wait()
    return cache


def _check(live, loaded) -> None:
    loaded.wait_loaded()
    for l, (a, b) in enumerate(zip(live.layers, loaded.layers)):
        if not (torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)):
            raise RuntimeError(f"StreamingCache.load: layer {l} differs from the cache that streamed it")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the resume topic; returns the exit code."""
    import kvstream

    run = Run.from_argv("resume", argv, add_args, __doc__)
    g = _geometry(run)
    token_bytes = g["layers"] * 2 * g["batch"] * g["heads"] * g["head_dim"] * 2
    total = token_bytes * (g["prompt"] + g["steps"])
    chunk_bytes = token_bytes // g["layers"] * g["prompt"]  # one prefill chunk
    x = f"B{g['batch']} P{g['prompt']} N{g['steps']} L{g['layers']}"
    timing.progress(f"resume: session of {total / GB:.2f} GB ({x}) in a HostTransport")
    transport = kvstream.HostTransport(capacity_bytes=int(total * 1.05) + (64 << 20), preallocate=run.is_cuda)
    live = _stream_session(g, transport, run.device, "resume")

    def _load():
        return kvstream.StreamingCache.load(transport, "resume", device=run.device, stream=False)

    # warm-up: the first load also warms the staging allocations and the kernels
    _check(live, _load())
    samples: dict[str, list[float]] = {"StreamingCache.load": [], "memcpy": [], "first_layer": []}
    n_chunks = max(1, -(-total // chunk_bytes))
    for _, provider in timing.alternating(["StreamingCache.load", "memcpy"], g["reps"]):
        if provider == "memcpy":
            stat = ceilings.ceiling_memcpy(run, chunk_bytes, n_chunks, direction="h2d", bench="resume.h2d", x=x)
            samples["memcpy"].append(stat.p50)  # GB/s
            inputs.free_memory()
            continue
        timing.sync(run.device)
        t0 = time.perf_counter()
        cache = _load()
        pending = cache.pending_load
        first = pending.events[0] if pending is not None and pending.events else None
        if first is not None:
            first.synchronize()
        t_first = time.perf_counter() - t0
        timing.sync(run.device)
        t_all = time.perf_counter() - t0
        samples["StreamingCache.load"].append(total / GB / t_all)
        samples["first_layer"].append(t_first * 1e3)
        _check(live, cache)
        del cache
    load_stat = timing.Stat.of(samples["StreamingCache.load"])
    memcpy_stat = timing.Stat.of(samples["memcpy"])
    first_stat = timing.Stat.of(samples["first_layer"])
    run.add("resume.h2d", "StreamingCache.load", x, "bandwidth", "GB/s", load_stat)
    run.add("resume.h2d", "StreamingCache.load", x, "first_layer", "ms", first_stat)
    spread = {k: {"median": timing.Stat.of(v).p50, "min": min(v), "max": max(v), "samples": v}
              for k, v in samples.items() if v}
    noisy = bool(spread) and (max(samples["memcpy"]) - min(samples["memcpy"])) > abs(memcpy_stat.p50 - load_stat.p50)
    run.summary("resume_host_vs_memcpy", value=load_stat.p50, unit="GB/s", ceiling=memcpy_stat.p50,
                ceiling_of="pinned cudaMemcpyAsync H2D of the same bytes in prefill-chunk copies, same run",
                target=">= 0.90", target_of="ratio", provider="StreamingCache.load from HostTransport (layer-wise)",
                detail={"session": x, "bytes": total, "chunk_MiB": chunk_bytes / MiB, "alternating_reps": g["reps"],
                        "spread": spread, "noisy": noisy, "first_layer_ms": first_stat.p50,
                        "stats_bytes_in_per_load": total})
    transport.close()
    return run.finish()


if __name__ == "__main__":
    harness.module_main(main)
