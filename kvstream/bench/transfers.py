"""Transfers: packed chunks device → pinned host and back through ``HostTransport`` and ``KVStreamer``,
against ``cudaMemcpyAsync`` of the same bytes in the same run.

Chunks are one layer's prefill KV, ``[1, 2, B, H, T, D]`` bf16 (64 KiB per token at B16, H8, D128: 4 MiB at
T=64 up to 256 MiB at T=4096); each measurement moves ``n`` such chunks back to back (``n`` = layers, up to
``--total-gib``). Bytes moved: ``n * chunk_bytes`` each way over PCIe; the ceiling is the measured pinned
memcpy (54.7 GB/s D2H, 52.5 GB/s H2D measured on the H100 machine; bench/NOTES.md).

Rows (``<out>/transfers.csv``), x = chunk size in MiB, time (ms) and bandwidth (GB/s) on the host clock
between synchronizations, for every provider alike:

* ``transfers.d2h``: ``memcpy`` (torch ``copy_(non_blocking=True)`` into pinned memory, the ceiling),
  ``HostTransport`` (``flush`` of contiguous device chunks, then ``wait``), ``KVStreamer`` (``scatter``
  of each layer's token range from a strided cache: pack + flush, until landed), ``KVStreamer-direct``
  (``scatter(direct=True)``: the region's rows copied straight into the transport, no pack), alternating
  with ``KVStreamer``;
* ``transfers.h2d``: ``memcpy``, ``HostTransport`` (``fetch`` into device chunks), ``KVStreamer``
  (``gather``: fetch + unpack into the strided cache).

Each provider's result is checked bit-exactly. Summary keys: ``d2h_vs_memcpy``, ``h2d_vs_memcpy``
(``HostTransport`` over ``memcpy``, worst case over chunks of at least 16 MiB; every case in detail) and
``streamer_d2h_small_vs_memcpy`` (``KVStreamer`` over ``memcpy`` at the smallest chunks, the faster of
its two ways, both in the detail).
"""

from __future__ import annotations

import argparse
from typing import Sequence

import torch

from . import ceilings, harness, inputs, timing
from .harness import Run
from .records import GiB, MiB
from .timing import Stat

#: Chunks at least this large are "prefill-sized" and count for the summary (smaller ones are in detail).
SUMMARY_MIN_CHUNK_BYTES = 16 * MiB
PAD_TOKENS = 256


def add_args(p: argparse.ArgumentParser) -> None:
    """The topic's own options."""
    p.add_argument("--chunk-tokens", default="64,256,1024,4096", help="tokens per chunk (comma-separated)")
    p.add_argument("--batch", type=int, default=16, help="batch rows")
    p.add_argument("--total-gib", type=float, default=1.0, help="bytes moved per measurement, at most, GiB")


def _geometry(run: Run) -> dict:
    a = run.args
    if run.quick:
        return dict(layers=2, heads=2, head_dim=16, dtype=torch.bfloat16, batch=2, tokens=[4, 32], total=1 << 20, pad=3)
    return dict(layers=a.layers, heads=8, head_dim=128, dtype=torch.bfloat16, batch=a.batch,
                tokens=[int(t) for t in a.chunk_tokens.split(",")], total=int(a.total_gib * GiB), pad=PAD_TOKENS)


def _wait_all(handles) -> None:
    for h in handles:
        h.wait()


def bench_size(run: Run, g: dict, tokens: int) -> dict:
    """One chunk size: memcpy, HostTransport and KVStreamer both ways. Returns GB/s per provider and direction."""
    from kvstream.layout import Region
    from kvstream.streaming.streamer import KVStreamer
    from kvstream.transports.host import HostTransport

    shape = (1, 2, g["batch"], g["heads"], tokens, g["head_dim"])
    chunk_bytes = inputs.tensor_nbytes(torch.empty(shape, dtype=g["dtype"], device="meta"))
    n = max(1, min(g["layers"], g["total"] // chunk_bytes))
    x = round(chunk_bytes / MiB, 4)
    total = n * chunk_bytes
    timing.progress(f"transfers: {n} chunks of {x} MiB ({tokens} tokens, B{g['batch']})")
    f: dict[str, float] = {"chunk_bytes": chunk_bytes, "chunks": n}
    f["d2h_memcpy"] = ceilings.ceiling_memcpy(run, chunk_bytes, n, direction="d2h", bench="transfers.d2h", x=x).p50
    f["h2d_memcpy"] = ceilings.ceiling_memcpy(run, chunk_bytes, n, direction="h2d", bench="transfers.h2d", x=x).p50
    inputs.free_memory()

    transport = HostTransport(capacity_bytes=3 * total + (1 << 20))  # the pack and the direct keys, and one layer of re-flushes in flight
    chunks = [inputs.random_tensor(shape, g["dtype"], run.device) for _ in range(n)]
    f["d2h_HostTransport"] = run.add_time_and_bandwidth(
        "transfers.d2h", "HostTransport", x,
        run.time_host(lambda: _wait_all([transport.flush(f"c{i}", c) for i, c in enumerate(chunks)]), reps=5), total).p50
    if not torch.equal(transport.fetch_new(f"c{n - 1}", "cpu"), chunks[-1].cpu()):
        raise RuntimeError("HostTransport.flush: stored chunk differs from its source")
    outs = [torch.full_like(c, float("nan")) for c in chunks]
    f["h2d_HostTransport"] = run.add_time_and_bandwidth(
        "transfers.h2d", "HostTransport", x,
        run.time_host(lambda: _wait_all([transport.fetch(f"c{i}", o) for i, o in enumerate(outs)]), reps=5), total).p50
    if not all(torch.equal(o, c) for o, c in zip(outs, chunks)):
        raise RuntimeError("HostTransport.fetch: fetched chunk differs from what was flushed")
    for i in range(n):
        transport.delete(f"c{i}")
    del chunks, outs

    keys, values = inputs.random_hf_cache(n, g["batch"], g["heads"], tokens + g["pad"], g["head_dim"], g["dtype"],
                                          run.device)
    regions = [Region(layers=(l, l + 1), tokens=(0, tokens)) for l in range(n)]
    streamer = KVStreamer(transport, device=run.device)

    def scatter_all(prefix: str = "s", direct: bool = False) -> None:
        """Scatter every layer's region under ``<prefix><layer>`` (``direct``: as rows, no pack) until landed."""
        for l, r in enumerate(regions):
            streamer.scatter(f"{prefix}{l}", keys, values, r, direct=direct)
        streamer.wait()

    # the pack and the direct rows alternate, so that the machine's drift lands on both
    samples = timing.time_alternating({"KVStreamer": scatter_all, "KVStreamer-direct": lambda: scatter_all("r", True)},
                                      device=run.device, reps=1 if run.quick else 5)
    for name, ms in samples.items():
        f[f"d2h_{name}"] = run.add_time_and_bandwidth("transfers.d2h", name, x, Stat.of(ms), total).p50
    for prefix, what in (("s", "KVStreamer.scatter"), ("r", "KVStreamer.scatter(direct=True)")):
        inputs.check_region(transport.fetch_new(f"{prefix}{n - 1}", "cpu"), keys[n - 1:], values[n - 1:], range(1), 0,
                            tokens, what)
    for l in range(n):
        transport.delete(f"r{l}")
    expected = [(k[:, :, :tokens].clone(), v[:, :, :tokens].clone()) for k, v in zip(keys[:1], values[:1])]
    keys[0][:, :, :tokens].fill_(float("nan"))
    values[0][:, :, :tokens].fill_(float("nan"))

    def gather_all() -> None:
        """Gather every layer's chunk back into its region, each waited for."""
        for l, r in enumerate(regions):
            streamer.gather(f"s{l}", keys, values, r).wait()

    f["h2d_KVStreamer"] = run.add_time_and_bandwidth("transfers.h2d", "KVStreamer", x,
                                                     run.time_host(gather_all, reps=5), total).p50
    if not (torch.equal(keys[0][:, :, :tokens], expected[0][0]) and torch.equal(values[0][:, :, :tokens], expected[0][1])):
        raise RuntimeError("KVStreamer.gather: unpacked region differs from what was scattered")
    streamer.close()
    transport.close()
    del keys, values, expected
    inputs.free_memory()
    return f


def _summarize(run: Run, cases: dict) -> None:
    """d2h_vs_memcpy / h2d_vs_memcpy: worst HostTransport/memcpy ratio over prefill-sized chunks."""
    big = {k: f for k, f in cases.items() if f["chunk_bytes"] >= SUMMARY_MIN_CHUNK_BYTES} or cases
    for d in ("d2h", "h2d"):
        worst = min(big, key=lambda k: big[k][f"{d}_HostTransport"] / big[k][f"{d}_memcpy"])
        f = big[worst]
        run.summary(f"{d}_vs_memcpy", value=f[f"{d}_HostTransport"], unit="GB/s", ceiling=f[f"{d}_memcpy"],
                    ceiling_of=f"cudaMemcpyAsync {d.upper()} of the same bytes, pinned, same run",
                    target=">= 0.95", target_of="ratio",
                    provider=f"HostTransport, worst case {worst} MiB chunks x {f['chunks']}",
                    detail={"by_chunk_MiB": cases,
                            "KVStreamer_over_memcpy": {k: c[f"{d}_KVStreamer"] / c[f"{d}_memcpy"] for k, c in cases.items()}})


def _summarize_small(run: Run, cases: dict) -> None:
    """streamer_d2h_small_vs_memcpy: KVStreamer over memcpy at the smallest chunks measured (4 MiB by default),
    the faster of its two ways (the pack, ``scatter(direct=True)``'s rows), both in the detail."""
    small = min(cases, key=lambda k: cases[k]["chunk_bytes"])
    f = cases[small]
    best = max(("KVStreamer", "KVStreamer-direct"), key=lambda p: f[f"d2h_{p}"])
    how = "scatter(direct=True)" if best.endswith("direct") else "scatter"
    run.summary("streamer_d2h_small_vs_memcpy", value=f[f"d2h_{best}"], unit="GB/s", ceiling=f["d2h_memcpy"],
                ceiling_of=f"cudaMemcpyAsync D2H of the same {f['chunks']} x {small} MiB, pinned, same run",
                target=">= 0.90", target_of="ratio", provider=f"KVStreamer.{how}, {small} MiB chunks x {f['chunks']}",
                detail={"by_chunk_MiB": {k: {"KVStreamer": c["d2h_KVStreamer"], "KVStreamer-direct": c["d2h_KVStreamer-direct"],
                                             "memcpy": c["d2h_memcpy"]} for k, c in cases.items()}})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the transfers topic; returns the exit code."""
    run = Run.from_argv("transfers", argv, add_args, __doc__)
    g = _geometry(run)
    cases = {}
    for tokens in g["tokens"]:
        f = bench_size(run, g, tokens)
        cases[str(round(f["chunk_bytes"] / MiB, 4))] = f
    _summarize(run, cases)
    _summarize_small(run, cases)
    return run.finish()


if __name__ == "__main__":
    harness.module_main(main)
