"""Disk: ``DiskTransport`` against raw writes and reads of the same bytes, file count and block size on the
same disk, in the same run.

Chunks are one layer's prefill KV, ``[1, 2, B, H, T, D]`` bf16 (64 MiB at B16, H8, T1024, D128), ``--chunks``
of them (1 GiB by default), in pinned host memory (so the disk alone is measured; a ``from-cuda`` row adds
the device copies). The raw ceiling is the disk's best: the same number of files of the same size, ``O_DIRECT``,
at queue depths 1 (one stream, like ``dd``), 4 (the transport's ``io_threads``) and 16, each in 16 MiB blocks and
in one call per file as the transport does (:func:`kvstream.bench.ceilings.ceiling_disk`); one stream of blocks
alone proved weaker than the disk (the transport beat it 1.2-2x), which made it no ceiling.

Timing, host clock, every provider alike: writes run until every file is durable (the transport's handles,
then an fsync of every file it wrote — a no-op for ``fsync=True``); reads start with every file dropped from
the page cache (fsync + ``POSIX_FADV_DONTNEED``), so they hit the disk.

Rows (``<out>/disk.csv``), x = chunk MiB, time (s) and bandwidth (GB/s):

* ``disk.write`` / ``disk.read``: ``raw-odirect-qd<q>`` and ``raw-odirect-qd<q>-whole`` (or ``raw-buffered-…``
  without O_DIRECT),
  ``DiskTransport`` (defaults), ``DiskTransport(direct,fsync)`` (O_DIRECT and fsync, where O_DIRECT works),
  ``DiskTransport(from-cuda)`` / ``(to-cuda)`` (device chunks, the better configuration; GPU only).

Summary keys: ``disk_write_vs_raw``, ``disk_read_vs_raw`` (the better host-chunk configuration over the best
raw depth).
The filesystem type is printed and kept in the summary detail.
"""

from __future__ import annotations

import argparse
import shutil
from typing import Sequence

import torch

from . import ceilings, harness, inputs, timing
from .harness import Run
from .records import MiB


def add_args(p: argparse.ArgumentParser) -> None:
    """The topic's own options."""
    p.add_argument("--chunk-tokens", type=int, default=1024, help="tokens per chunk (64 KiB each at B16)")
    p.add_argument("--chunks", type=int, default=16, help="chunks per measurement")
    harness.workload_args(p, batch=16, reps=2, helps={"reps": "repetitions of each write/read pass"})


def _geometry(run: Run) -> dict:
    a = run.args
    if run.quick:  # 32 KiB chunks: still a multiple of 4096 for O_DIRECT
        return dict(shape=(1, 2, 1, 2, 64, 64), chunks=3, reps=1)
    return dict(shape=(1, 2, a.batch, 8, a.chunk_tokens, 128), chunks=a.chunks, reps=a.reps)


def _measure(run: Run, transport, chunks: list[torch.Tensor], outs: list[torch.Tensor], label_w: str, label_r: str,
             x: float, reps: int) -> tuple[float, float]:
    """Write ``chunks`` under ``k{i}`` until durable, then read them cold into ``outs``. Returns (write, read) GB/s."""
    total = inputs.tensor_nbytes(chunks)

    def _write_all() -> None:
        for h in [transport.flush(f"k{i}", c) for i, c in enumerate(chunks)]:
            h.wait()
        ceilings.evict_tree(transport.root)

    def _read_all() -> None:
        for h in [transport.fetch(f"k{i}", o) for i, o in enumerate(outs)]:
            h.wait()

    w = run.add_time_and_bandwidth("disk.write", label_w, x, run.time_host(_write_all, reps=reps, warmup=0), total,
                                   time_unit="s")
    for o in outs:
        o.fill_(float("nan"))
    r = run.add_time_and_bandwidth("disk.read", label_r, x,
                                   run.time_host(_read_all, reps=reps, warmup=0,
                                                 setup=lambda: ceilings.evict_tree(transport.root)), total, time_unit="s")
    for i, (o, c) in enumerate(zip(outs, chunks)):
        if not torch.equal(o.cpu(), c.cpu()):
            raise RuntimeError(f"{label_r}: chunk k{i} read back differs from what was written")
    return w.p50, r.p50


def main(argv: Sequence[str] | None = None) -> int:
    """Run the disk topic; returns the exit code."""
    from kvstream.transports.disk import DiskTransport

    run = Run.from_argv("disk", argv, add_args, __doc__)
    g = _geometry(run)
    root = run.disk_dir()
    try:
        fs = ceilings.fs_type(root)
        direct = ceilings.supports_direct_io(root)
        chunks = [inputs.random_tensor(g["shape"], torch.bfloat16, "cpu") for _ in range(g["chunks"])]
        pinned = [inputs.pinned_empty(g["shape"], torch.bfloat16) for _ in chunks]
        for p, c in zip(pinned, chunks):
            p.copy_(c)
        del chunks
        chunk_bytes = inputs.tensor_nbytes(pinned[0])
        x = round(chunk_bytes / MiB, 4)
        timing.progress(f"disk: {len(pinned)} chunks of {x} MiB under {root} ({fs}, O_DIRECT {'yes' if direct else 'no'})")
        raw_dir = root / "raw"
        raw_dir.mkdir()
        raw_w, raw_r, raw_label = ceilings.ceiling_disk(run, raw_dir, chunk_bytes, len(pinned), bench="disk", x=x,
                                                        reps=g["reps"])
        outs = [inputs.pinned_empty(g["shape"], torch.bfloat16) for _ in pinned]
        configs = {"DiskTransport": {}}
        if direct:
            configs["DiskTransport(direct,fsync)"] = {"direct": True, "fsync": True}
        figures: dict[str, dict] = {}
        for label, kw in configs.items():
            t = DiskTransport(root / label.replace("(", "-").replace(")", "").replace(",", "-"), **kw)
            w, r = _measure(run, t, pinned, outs, label, label, x, g["reps"])
            figures[label] = {"write_GBps": w, "read_GBps": r, "options": kw}
            t.close()
        best_w = max(figures, key=lambda k: figures[k]["write_GBps"])
        best_r = max(figures, key=lambda k: figures[k]["read_GBps"])
        if run.is_cuda:  # the streaming path: device chunks through pinned staging to disk and back
            kw = figures[best_w]["options"]
            t = DiskTransport(root / "from-cuda", **kw)
            dev = [p.to(run.device) for p in pinned]
            dev_out = [torch.empty_like(d) for d in dev]
            w, r = _measure(run, t, dev, dev_out, "DiskTransport(from-cuda)", "DiskTransport(to-cuda)", x, g["reps"])
            figures["DiskTransport(cuda)"] = {"write_GBps": w, "read_GBps": r, "options": kw}
            t.close()
            del dev, dev_out
        detail = {"filesystem": fs, "o_direct": direct, "raw": raw_label, "root": str(root), "chunk_bytes": chunk_bytes,
                  "chunks": len(pinned), "raw_write_GBps": raw_w.p50, "raw_read_GBps": raw_r.p50, "providers": figures}
        run.summary("disk_write_vs_raw", value=figures[best_w]["write_GBps"], unit="GB/s", ceiling=raw_w.p50,
                    ceiling_of=f"{raw_label} writes, same files and bytes, same disk ({fs}), same run",
                    target=">= 0.90", target_of="ratio", provider=best_w, detail=detail)
        run.summary("disk_read_vs_raw", value=figures[best_r]["read_GBps"], unit="GB/s", ceiling=raw_r.p50,
                    ceiling_of=f"{raw_label} reads, same files and bytes, same disk ({fs}), same run",
                    target=">= 0.90", target_of="ratio", provider=best_r, detail=detail)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return run.finish()


if __name__ == "__main__":
    harness.module_main(main)
