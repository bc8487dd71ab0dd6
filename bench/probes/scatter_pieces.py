"""Host time of each piece of ``KVStreamer.scatter`` of one-layer regions (the ``streamer_d2h_small_vs_memcpy``
path), on the CPU or a GPU: shared by ``scatter_host_cpu.py`` and ``profile_scatter.py``.

Each piece runs ``n`` times back to back (the 32 layers of the bench: a new region, key and chunk each time);
the median over ``reps`` such batches of the per-call mean is printed, with the minimum. On a GPU the device
is synchronized between batches (outside the timed part), so copies queue as in the bench.
"""
from __future__ import annotations

import statistics
import time

import torch

from kvstream import kernels
from kvstream.chunk import NO_CHECKSUM, chunk_header, with_head_dims
from kvstream.handles import CompletedHandle
from kvstream.layout import Region, check_hf_layers
from kvstream.streaming.streamer import KVStreamer
from kvstream.transports.host import HostTransport

HOOK_META = {"session": "probe", "run": "0123456789abcdef", "model": "kv:0123456789abcdef"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call_us(fn, n: int, reps: int, device: torch.device, after=None) -> tuple[float, float]:
    """Median and min over ``reps`` batches of the mean host us of ``fn(i)`` for ``i`` in ``range(n)``."""
    xs = []
    for r in range(reps + 2):  # two warm-up batches
        _sync(device)
        t0 = time.perf_counter_ns()
        for i in range(n):
            fn(i)
        dt = (time.perf_counter_ns() - t0) / 1e3 / n
        if after is not None:
            after()
        if r >= 2:
            xs.append(dt)
    _sync(device)
    return statistics.median(xs), min(xs)


def geometry(big: bool) -> dict:
    """The bench's chunk (B16 H8 T64 D128 bf16 of a 128-token cache: 4 MiB) or a small one whose copies cost
    nothing on a CPU (B2 H2 T4 D16), so that only the per-call host work is timed."""
    if big:
        return dict(layers=32, batch=16, heads=8, seq=128, tokens=64, head_dim=128, dtype=torch.bfloat16)
    return dict(layers=32, batch=2, heads=2, seq=16, tokens=4, head_dim=16, dtype=torch.bfloat16)


def pieces(device: torch.device, big: bool = False, n: int = 32, reps: int = 15) -> list[tuple[str, float, float]]:
    """Time the pieces; returns ``(name, median us, min us)`` rows."""
    g = geometry(big)
    L = g["layers"]
    shape = (g["batch"], g["heads"], g["seq"], g["head_dim"])
    keys = [torch.randn(shape, device=device).to(g["dtype"]) for _ in range(L)]
    values = [torch.randn_like(k) for k in keys]
    regions = [Region(layers=(l, l + 1), tokens=(0, g["tokens"])) for l in range(L)]
    resolved = [check_hf_layers(keys, values, r) for r in regions]
    chunk_bytes = keys[0][:, :, :g["tokens"]].numel() * keys[0].element_size() * 2
    cap = 12 * L * chunk_bytes + (1 << 20)  # every piece that flushes keeps its own L keys
    transport = HostTransport(capacity_bytes=cap)
    streamer = KVStreamer(transport, device=device)
    chunks = [kernels.pack_tokens(keys, values, r) for r in regions]
    hook_metas = [{**HOOK_META, "layer": l} for l in range(L)]
    t = g["tokens"]
    rows = []

    def add(name, fn, after=None):
        med, lo = per_call_us(fn, n, reps, device, after)
        rows.append((name, med, lo))

    add("scatter (whole call, not waited)", lambda i: streamer.scatter(f"s{i}", keys, values, regions[i]),
        after=streamer.wait)
    add("scatter, hook meta (whole call)", lambda i: streamer.scatter(f"m{i}", keys, values, regions[i],
                                                                      meta={**HOOK_META, "layer": i}),
        after=streamer.wait)
    def gpu_path(i):  # what scatter runs for a CUDA one-layer region, on any device (the stack checked again
        region = check_hf_layers(keys, values, regions[i])  # before pack_resolved: 317a849)
        return streamer.flush(f"g{i}", kernels._stack_one_layer(keys, values, region), region=region)

    add("check + stack pack + flush (GPU path's Python)", gpu_path)
    add("  check_hf_layers (region as given)", lambda i: check_hf_layers(keys, values, regions[i]))
    add("  check_hf_layers (region resolved)", lambda i: check_hf_layers(keys, values, resolved[i]))
    add("  Region.resolve", lambda i: regions[i].resolve(g["batch"], g["heads"]))
    add("  with_head_dims", lambda i: with_head_dims(None, g["head_dim"], g["head_dim"]))
    add("  kernels.pack_tokens (dispatch + pack)", lambda i: kernels.pack_tokens(keys, values, regions[i]))
    add("  torch.stack of the two views", lambda i: torch.stack((keys[i][:, :, 0:t], values[i][:, :, 0:t])))
    out = torch.empty((1, 2, g["batch"], g["heads"], t, g["head_dim"]), dtype=g["dtype"], device=device)
    add("  torch.stack(out=) of the two views", lambda i: torch.stack((keys[i][:, :, 0:t], values[i][:, :, 0:t]),
                                                                      out=out[0]))
    add("  torch.empty + 2 copy_", lambda i: _two_copies(keys[i], values[i], t, out.shape))
    add("  transport.flush (meta None)", lambda i: transport.flush(f"f{i}", chunks[i]))
    add("  transport.flush (region, meta None)", lambda i: transport.flush(f"r{i}", chunks[i], region=resolved[i]))
    add("  transport.flush (region, hook meta)", lambda i: transport.flush(f"h{i}", chunks[i], region=resolved[i],
                                                                          meta=hook_metas[i]))
    add("  transport.flush (hook meta, new dict)", lambda i: transport.flush(f"d{i}", chunks[i], region=resolved[i],
                                                                            meta={**HOOK_META, "layer": i}))
    miss = [Region(layers=(0, 1), tokens=(0, g["tokens"] + 1 + j)).resolve(g["batch"], g["heads"])
            for j in range(n * (reps + 2))]
    count = iter(range(1 << 30))
    add("  chunk_header, new region (a header cache miss)",
        lambda i: chunk_header(chunks[i], miss[next(count)], hook_metas[i], NO_CHECKSUM))
    count = iter(range(1 << 30))
    add("  transport.flush, new region (header miss)",
        lambda i: transport.flush(f"n{i}", chunks[i], region=miss[next(count)], meta={**HOOK_META, "layer": i}))
    add("  transport._header (cache hit)", lambda i: transport._header(chunks[i].dtype, chunks[i].shape,
                                                                                 resolved[i], hook_metas[i], chunks[i]))
    add("  transport._alloc", lambda i: transport._alloc(chunk_bytes))
    add("  transport.check_key", lambda i: transport._check_key(f"s{i}"))
    add("  streamer.inflight.track", lambda i: streamer.inflight.track(_DONE), after=streamer.wait)
    if device.type == "cuda":
        from kvstream.cuda import Event, current_stream_handle

        ev = Event(device)
        add("  Event(device)", lambda i: Event(device))
        add("  Event.record", lambda i: ev.record())
        add("  current_stream_handle", lambda i: current_stream_handle(device))
        add("  side.wait_event", lambda i: streamer.side.wait_event(ev))
        add("  with side: (enter + exit)", lambda i: _enter_exit(streamer.side))
        from kvstream.cuda import host_empty, memcpy_async

        add("  host_empty (pinned, cached block)", lambda i: host_empty(chunk_bytes, pin=True))
        dst = host_empty(chunk_bytes, pin=True)
        add("  memcpy_async (D2H, 4 MiB queued)" if big else "  memcpy_async (D2H)",
            lambda i: memcpy_async(dst, chunks[i]))
    streamer.close()
    transport.close()
    return rows


def _two_copies(k, v, t, shape):
    out = torch.empty(shape, dtype=k.dtype, device=k.device)
    out[0, 0].copy_(k[:, :, 0:t])
    out[0, 1].copy_(v[:, :, 0:t])
    return out


def _enter_exit(stream):
    with stream:
        pass


_DONE = CompletedHandle()


def print_rows(rows, title: str) -> None:
    print(f"--- {title}")
    for name, med, lo in rows:
        print(f"{name:44s} {med:8.1f} us  (min {lo:7.1f})")
