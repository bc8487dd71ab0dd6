"""Kernels: pack/unpack of prefill-sized regions against a device-to-device copy and the torch reference,
and the decode step (the newest token of every layer landed in pinned host memory).

Shapes (issue 3): Llama-3-8B's KV (``--layers`` 32, 8 KV heads, head_dim 128, bf16), batch 16, regions of
1-8k tokens taken from per-layer caches with room for 256 more tokens (so the region is strided, as in a
preallocated cache). Bytes moved by a pack or an unpack: the packed chunk read once and written once,
``2 * L*2*B*H*T*D*2`` (4 GiB at T=1024; 32 GiB at T=8192). The decode step moves ``L*2*B*H*D*2`` bytes
(2 MiB at B=16) over PCIe.

Rows (``<out>/kernels.csv``):

* ``kernels.pack`` / ``kernels.unpack``, x = tokens: providers ``kvstream`` (Triton, one launch for all
  layers), ``torch-reference`` (``kernels/reference.py``); time (ms) and bandwidth (GB/s, read + written);
* ``kernels.ceiling``: ``d2d-copy`` of the same bytes (capped at 2 GiB: a copy that large is at its
  plateau), the ceiling of ``pack_vs_copy``;
* ``kernels.decode_step``, x = batch: ``memcpy`` (the same bytes, contiguous, pinned D2H: the PCIe floor),
  ``kvstream-zero-copy`` (pack_newest writing straight into pinned host memory), ``kvstream-pack+memcpy``,
  ``kvstream-zero-copy-graph`` (the same captured in a CUDA graph: no launch overhead), ``kvstream-streamer``
  (``KVStreamer.scatter_newest`` to a ``HostTransport`` until landed, host clock), ``torch-per-layer``
  (one strided copy per layer and K/V, the way a framework would do it); time in µs.

Every kvstream output is checked bit-exactly (``torch.equal``) against the source before it is timed.
Summary keys: ``pack_vs_copy``, ``pack_vs_torch``, ``decode_step_us``.
"""

from __future__ import annotations

import argparse
from typing import Callable, Sequence

import torch

from . import ceilings, harness, inputs, timing
from .harness import Run
from .records import GiB
from .timing import Stat

#: Extra token positions per layer beyond the region, so the region is strided (a preallocated cache).
PAD_TOKENS = 256


def add_args(p: argparse.ArgumentParser) -> None:
    """The topic's own options."""
    p.add_argument("--tokens", default="1024,2048,4096,8192", help="region sizes in tokens (comma-separated)")
    p.add_argument("--batch", type=int, default=16, help="batch rows of the pack/unpack cache")
    p.add_argument("--decode-batches", default="1,4,16", help="batch sizes of the decode step")
    p.add_argument("--decode-seq", type=int, default=2048, help="positions per layer before the decode step")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _geometry(run: Run) -> dict:
    """Layers, KV heads, head_dim, dtype and the swept sizes (tiny in --quick)."""
    a = run.args
    if run.quick:
        return dict(layers=2, heads=2, head_dim=16, dtype=torch.bfloat16, batch=2, tokens=[8, 24],
                    decode_batches=[1, 2], decode_seq=16, pad=3)
    return dict(layers=a.layers, heads=8, head_dim=128, dtype=torch.bfloat16, batch=a.batch, tokens=_ints(a.tokens),
                decode_batches=_ints(a.decode_batches), decode_seq=a.decode_seq, pad=PAD_TOKENS)


def bench_pack_unpack(run: Run, g: dict) -> dict:
    """pack/unpack vs d2d copy vs torch reference at every region size; returns per-case figures.

    The kvstream rows force the Triton kernels (``backend="triton"``; on the CPU under the interpreter), the
    reference rows the torch twins (``backend="torch"``).
    """
    from kvstream.kernels import pack_tokens, unpack_tokens
    from kvstream.layout import Region

    cases: dict[str, dict] = {}
    for tokens in g["tokens"]:
        timing.progress(f"kernels: pack/unpack, {g['layers']} layers, B{g['batch']}, {tokens} tokens")
        keys, values = inputs.random_hf_cache(g["layers"], g["batch"], g["heads"], tokens + g["pad"], g["head_dim"],
                                              g["dtype"], run.device)
        region = Region(layers=range(g["layers"]), tokens=(0, tokens))
        out = torch.empty(region.resolve(g["batch"], g["heads"]).packed_shape(g["head_dim"]), dtype=g["dtype"],
                          device=run.device)
        moved = 2 * inputs.tensor_nbytes(out)
        copy_bw = ceilings.ceiling_d2d(run, min(inputs.tensor_nbytes(out), 2 * GiB), bench="kernels.ceiling", x=tokens)

        out.fill_(float("nan"))
        pack_tokens(keys, values, region, out=out, backend="triton")
        inputs.check_region(out, keys, values, region.layers, 0, tokens, "pack_tokens")
        figures = {"d2d_GBps": copy_bw.p50, "bytes_moved": moved}
        figures["pack_GBps"] = run.add_time_and_bandwidth(
            "kernels.pack", "kvstream", tokens,
            run.time(lambda: pack_tokens(keys, values, region, out=out, backend="triton")), moved).p50
        figures["pack_torch_GBps"] = run.add_time_and_bandwidth(
            "kernels.pack", "torch-reference", tokens,
            run.time(lambda: pack_tokens(keys, values, region, out=out, backend="torch")), moved).p50

        for l in region.layers:  # poison the region, unpack, check, then time (same bytes rewritten)
            keys[l][:, :, :tokens].fill_(float("nan"))
            values[l][:, :, :tokens].fill_(float("nan"))
        unpack_tokens(out, keys, values, region, backend="triton")
        inputs.check_region(out, keys, values, region.layers, 0, tokens, "unpack_tokens")
        figures["unpack_GBps"] = run.add_time_and_bandwidth(
            "kernels.unpack", "kvstream", tokens,
            run.time(lambda: unpack_tokens(out, keys, values, region, backend="triton")), moved).p50
        figures["unpack_torch_GBps"] = run.add_time_and_bandwidth(
            "kernels.unpack", "torch-reference", tokens,
            run.time(lambda: unpack_tokens(out, keys, values, region, backend="torch")), moved).p50
        cases[str(tokens)] = figures
        del keys, values, out
        inputs.free_memory()
    return cases


def _summarize_pack(run: Run, cases: dict) -> None:
    """pack_vs_copy and pack_vs_torch: the worst (op, size) case is the value; every case in detail."""
    worst_copy = None
    worst_torch = None
    for tokens, f in cases.items():
        for op in ("pack", "unpack"):
            r = f[f"{op}_GBps"] / f["d2d_GBps"]
            if worst_copy is None or r < worst_copy[0]:
                worst_copy = (r, f[f"{op}_GBps"], f["d2d_GBps"], f"{op}@{tokens}")
            rt = f[f"{op}_GBps"] / f[f"{op}_torch_GBps"]
            if worst_torch is None or rt < worst_torch[0]:
                worst_torch = (rt, f[f"{op}_GBps"], f[f"{op}_torch_GBps"], f"{op}@{tokens}")
    if worst_copy is not None and worst_torch is not None:
        run.summary("pack_vs_copy", value=worst_copy[1], unit="GB/s", ceiling=worst_copy[2],
                    ceiling_of="device-to-device copy of the same bytes, same run (read+written)",
                    target=">= 0.90", target_of="ratio", provider=f"kvstream, worst case {worst_copy[3]} tokens",
                    detail=cases)
        run.summary("pack_vs_torch", value=worst_torch[1], unit="GB/s", ceiling=worst_torch[2],
                    ceiling_of="torch reference (strided copy), same run", target=">= 1.9", target_of="ratio",
                    provider=f"kvstream, worst case {worst_torch[3]} tokens", detail=cases)


def _graph_of(fn: Callable[[], object]):
    """``fn`` captured in a CUDA graph (after one eager call), or ``None`` with the reason printed."""
    try:
        fn()
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph
    except Exception as e:  # noqa: BLE001 - a capture failure is a finding, printed, not fatal
        timing.progress(f"kernels: CUDA graph capture of the decode step failed: {type(e).__name__}: {e}")
        return None


def bench_decode_step(run: Run, g: dict) -> dict:
    """The newest token of every layer landed in pinned host memory, per batch size; µs per provider."""
    from kvstream.kernels import pack_newest
    from kvstream.streaming.streamer import KVStreamer
    from kvstream.transports.host import HostTransport

    results: dict[str, dict] = {}
    L, H, D, dt = g["layers"], g["heads"], g["head_dim"], g["dtype"]
    for batch in g["decode_batches"]:
        timing.progress(f"kernels: decode step, {L} layers, B{batch}, seq {g['decode_seq']}")
        keys, values = inputs.random_hf_cache(L, batch, H, g["decode_seq"], D, dt, run.device)
        shape = (L, 2, batch, H, 1, D)
        host = inputs.pinned_empty(shape, dt)
        dev = torch.empty(shape, dtype=dt, device=run.device)
        step_bytes = inputs.tensor_nbytes(host)
        x = batch
        figures: dict[str, float] = {"bytes": step_bytes}

        def _us(provider: str, ms: Stat) -> None:
            run.add_time_and_bandwidth("kernels.decode_step", provider, x, ms, step_bytes, time_unit="us")
            figures[provider] = ms.p50 * 1e3

        contiguous = inputs.random_tensor(shape, dt, run.device)
        _us("memcpy", run.time(lambda: host.copy_(contiguous, non_blocking=True)))

        host.fill_(float("nan"))
        pack_newest(keys, values, out=host, backend="triton")
        timing.sync(run.device)
        inputs.check_region(host, keys, values, range(L), g["decode_seq"] - 1, g["decode_seq"], "pack_newest (zero-copy)")
        _us("kvstream-zero-copy", run.time(lambda: pack_newest(keys, values, out=host, backend="triton")))

        def _pack_then_copy() -> None:
            pack_newest(keys, values, out=dev, backend="triton")
            host.copy_(dev, non_blocking=True)

        host.fill_(float("nan"))
        _pack_then_copy()
        timing.sync(run.device)
        inputs.check_region(host, keys, values, range(L), g["decode_seq"] - 1, g["decode_seq"], "pack_newest + memcpy")
        _us("kvstream-pack+memcpy", run.time(_pack_then_copy))

        if run.is_cuda:
            graph = _graph_of(lambda: pack_newest(keys, values, out=host, backend="triton"))
            if graph is not None:
                host.fill_(float("nan"))
                graph.replay()
                timing.sync(run.device)
                inputs.check_region(host, keys, values, range(L), g["decode_seq"] - 1, g["decode_seq"], "pack_newest (graph)")
                _us("kvstream-zero-copy-graph", run.time(graph.replay))
                del graph

        transport = HostTransport(capacity_bytes=4 * step_bytes + (1 << 20))
        streamer = KVStreamer(transport, device=run.device)
        _us("kvstream-streamer", run.time_host(lambda: streamer.scatter_newest("step", keys, values).wait(), reps=200,
                                               warmup=5))
        inputs.check_region(transport.fetch_new("step", "cpu"), keys, values, range(L), g["decode_seq"] - 1,
                            g["decode_seq"], "KVStreamer.scatter_newest")
        streamer.close()
        transport.close()

        def _per_layer() -> None:
            for l in range(L):
                host[l, 0].copy_(keys[l][:, :, -1:], non_blocking=True)
                host[l, 1].copy_(values[l][:, :, -1:], non_blocking=True)

        _us("torch-per-layer", run.time(_per_layer))
        results[str(batch)] = figures
        del keys, values, host, dev, contiguous
        inputs.free_memory()
    return results


def _summarize_decode(run: Run, g: dict, results: dict) -> None:
    """decode_step_us at the largest batch measured (16 in a full run)."""
    if not results:
        return
    batch = str(max(g["decode_batches"]))
    f = results[batch]
    ours = {k: v for k, v in f.items() if k.startswith("kvstream")}
    best = min(ours, key=ours.get)
    run.summary("decode_step_us", value=ours[best], unit="us", ceiling=f["memcpy"],
                ceiling_of=f"cudaMemcpyAsync D2H of the same {f['bytes']} bytes, contiguous, pinned (the PCIe floor)",
                target="<= 1.05", target_of="ratio", provider=f"{best}, B{batch}, {g['layers']} layers",
                detail={"us_by_batch_and_provider": results})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the kernels topic; returns the exit code."""
    run = Run.from_argv("kernels", argv, add_args, __doc__)
    g = _geometry(run)
    cases = bench_pack_unpack(run, g)
    _summarize_pack(run, cases)
    results = bench_decode_step(run, g)
    _summarize_decode(run, g, results)
    return run.finish()


if __name__ == "__main__":
    harness.module_main(main)
