"""Prefix reuse: time to first token with a stored 90% prefix over full prefill, and the stores' throughput
against the raw disk and pinned memcpy of the same bytes, in the same run.

Model: the Llama-3-8B shape, bf16, ``--layers`` decoder layers (:func:`kvstream.bench.inputs.shared_model`); prompt:
``--prompt-tokens`` (8192) tokens of the shipped text. The first ``--stored-fraction`` (90%) of the
prompt is prefilled once and stored in a :class:`~kvstream.RadixStore` (pinned host memory) and a
:class:`~kvstream.ChunkFileStore` (``--chunk-tokens`` per file, on ``--disk-dir``; the file store keeps
whole chunks only, so it matches the largest multiple of the chunk size).

Rows (``<out>/prefix.csv``), host clock between synchronizations, every provider alike; every timing
comparison runs its sides in alternating order (:func:`kvstream.bench.timing.time_alternating`), ``--reps``
(5) rounds after a warm-up, and its summary detail keeps median, min and max:

* ``prefix.ttft`` (x = prompt tokens, ms) and ``prefix.plan`` (the planned reuse over prompt lengths):
  see :mod:`kvstream.bench.prefix_ttft`;
* ``prefix.store.write`` / ``prefix.store.read`` (x = chunk MiB): ``ChunkFileStore`` (buffered I/O) and
  ``ChunkFileStore(direct)`` (O_DIRECT, where the filesystem has it) update of the stored prefix from the
  GPU cache until durable (fsync of every file), and lookup + load of it onto the GPU from a cold page
  cache (per-layer reads at the transport's queue depth, :meth:`~kvstream.transports.disk.DiskTransport.fetch_slices`);
  time, GB/s and tokens/s. Reads alternate with ``raw-odirect-qd<depth>``: the same chunk files read
  whole, in pieces of one layer's bytes, as many reads in flight as the transport keeps
  (:func:`kvstream.bench.ceilings.raw_parallel_read`); writes and the single-stream reads compare with
  ``raw-odirect`` (or ``raw-buffered``) files of the same size, in 16 MiB blocks and whole (:func:`~kvstream.bench.ceilings.ceiling_disk`);
* ``prefix.radix.update`` / ``prefix.radix.load``: ``RadixStore`` update from the GPU and load to the GPU,
  against pinned ``memcpy`` of the same bytes.

Summary keys: ``file_store_read_vs_raw`` (the better configuration's read GB/s over the parallel raw reads
of the same files; target >= 0.90) and ``file_store_write_vs_raw`` (Vineyard reached about 100% of its
SSD), and from :mod:`~kvstream.bench.prefix_ttft`: ``prefix_ttft_speedup``, ``file_store_ttft_vs_prefill``,
``tiered_ttft_speedup`` and ``reuse_plan_error``. The file store's TTFT uses the configuration that read
fastest.
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Sequence

import torch

from . import ceilings, harness, inputs, prefix_ttft, timing
from .harness import Run
from .records import GB, MiB


def add_args(p: argparse.ArgumentParser) -> None:
    """The topic's own options."""
    p.add_argument("--prompt-tokens", type=int, default=8192, help="prompt length in tokens (default 8192)")
    p.add_argument("--stored-fraction", type=float, default=0.9, help="share of the prompt already stored (0.9)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per file-store chunk (LMCache: 256)")
    p.add_argument("--reps", type=int, default=5, help="repetitions of each timed step")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the prefix topic; returns the exit code."""
    from kvstream.chunk import HEADER_BYTES
    from kvstream.models import batch_of_prompts
    from kvstream.stores import ChunkFileStore, RadixStore
    from kvstream.stores.cost import CACHE_ENV
    from kvstream.transports.slices import DEFAULT_QUEUE_DEPTH

    run = Run.from_argv("prefix", argv, add_args, __doc__)
    a = run.args
    if run.quick:  # measured copy rates of a quick run stay with its results
        os.environ.setdefault(CACHE_ENV, str(run.out_dir / ".kvstream-cache"))
    total, chunk, reps = (256, 16, 1) if run.quick else (a.prompt_tokens, a.chunk_tokens, a.reps)
    stored = int(total * a.stored_fraction)
    device = run.device
    model = inputs.shared_model(run)
    ids = batch_of_prompts(1, total, device=device)
    keys, values = prefix_ttft.prefill_kv(model, ids[:, :stored])
    per_token = inputs.tensor_nbytes(keys + values) // stored
    timing.progress(f"prefix: {total}-token prompt, {stored} stored ({per_token / MiB:.3f} MiB of KV per token)")
    root = run.disk_dir()
    try:
        radix = RadixStore(capacity_bytes=2 * stored * per_token)

        # -- the stores' own throughput ----------------------------------------------------------------
        radix_bytes = stored * per_token
        ms = run.time_host(lambda: (RadixStore(capacity_bytes=2 * radix_bytes).update_kv(ids[0, :stored], keys, values)),
                           reps=reps)
        run.add_time_and_bandwidth("prefix.radix.update", "RadixStore(from-cuda)" if run.is_cuda else "RadixStore",
                                   stored, ms, radix_bytes)
        radix.update_kv(ids[0, :stored], keys, values)

        def radix_load() -> None:
            """One load of the stored prefix (every layer's KV, ``stored`` tokens) from the radix store to ``device``."""
            with radix.fetch_prefix(ids, device=device):
                pass

        ms = run.time_host(radix_load, reps=reps)
        run.add_time_and_bandwidth("prefix.radix.load", "RadixStore(to-cuda)" if run.is_cuda else "RadixStore",
                                   stored, ms, radix_bytes)
        if run.is_cuda:
            layer_bytes = radix_bytes // len(keys)
            ceilings.ceiling_memcpy(run, layer_bytes, len(keys), direction="d2h", bench="prefix.radix.update", x=stored)
            ceilings.ceiling_memcpy(run, layer_bytes, len(keys), direction="h2d", bench="prefix.radix.load", x=stored)

        n_files = stored // chunk
        file_tokens = n_files * chunk
        file_bytes = HEADER_BYTES + chunk * per_token
        store_bytes = n_files * file_bytes
        x = round(file_bytes / MiB, 3)
        configs = {"ChunkFileStore": {}}
        if ceilings.supports_direct_io(root):
            configs["ChunkFileStore(direct)"] = {"direct": True}
        figures: dict[str, dict] = {}
        for label, kw in configs.items():
            store = ChunkFileStore(root / label.replace("(", "-").replace(")", ""), chunk_tokens=chunk,
                                   namespace="bench-prefix", **kw)

            def write_all(store=store) -> None:
                """Write the ``stored`` tokens' KV as ``chunk``-token files (overwriting), then make them durable and
                drop them from the page cache, as the raw writes do."""
                store.update_kv(ids[0, :stored], keys, values, overwrite=True)
                ceilings.evict_tree(store.root)  # durable, as the raw writes (fsync), and out of the page cache

            w_ms = run.time_host(write_all, reps=reps, warmup=1)
            w = run.add_time_and_bandwidth("prefix.store.write", label, x, w_ms, store_bytes, time_unit="s")
            run.add("prefix.store.write", label, x, "throughput", "tokens/s", w_ms.rate(file_tokens * 1e3))
            with store.fetch_prefix(ids, device=device) as m:  # what is read back is what was written
                for i in range(len(keys)):
                    if not (torch.equal(m.keys[i], keys[i][:, :, :file_tokens])
                            and torch.equal(m.values[i], values[i][:, :, :file_tokens])):
                        raise RuntimeError(f"{label}: layer {i} read back differs from what was written")
            figures[label] = {"write_GBps": w.p50, "options": kw, "store": store,
                              "write_tokens_per_s": file_tokens / (w_ms.p50 / 1e3)}

        # -- reads, cold, against the disk's best at the transport's queue depth (alternating) ------------
        def read_all(store, label) -> None:
            """One cold read of the whole stored prefix through ``store`` to ``device``. Raises ``RuntimeError`` if
            the match is not every stored file's tokens."""
            with store.fetch_prefix(ids, device=device) as m:
                if m.matched_tokens != file_tokens:
                    raise RuntimeError(f"{label} matched {m.matched_tokens} tokens, expected {file_tokens}")

        depth = DEFAULT_QUEUE_DEPTH
        raw_files = {label: sorted(p for p in d["store"].root.rglob("*.kvc") if ".tmp" not in p.parts)
                     for label, d in figures.items()}
        raw_source = next(iter(raw_files))
        raw_direct = ceilings.supports_direct_io(root) and file_bytes % ceilings.DIRECT_ALIGN_BYTES == 0
        raw_label = f"raw-{'odirect' if raw_direct else 'buffered'}-qd{depth}"
        fns = {label: (lambda d=d, label=label: read_all(d["store"], label)) for label, d in figures.items()}
        fns[raw_label] = lambda: ceilings.raw_parallel_read(raw_files[raw_source], piece_bytes=per_token * chunk // len(keys),
                                                            queue_depth=depth, direct=raw_direct)
        setups = {label: (lambda d=d: ceilings.evict_tree(d["store"].root)) for label, d in figures.items()}
        setups[raw_label] = lambda: ceilings.evict_tree(figures[raw_source]["store"].root)
        samples = timing.time_alternating(fns, device=device, reps=reps, setups=setups)
        for label, ms in samples.items():
            stat = timing.Stat.of(ms)
            bw = run.add_time_and_bandwidth("prefix.store.read", label, x, stat, store_bytes, time_unit="s")
            run.add("prefix.store.read", label, x, "throughput", "tokens/s", stat.rate(file_tokens * 1e3))
            if label in figures:
                figures[label].update(read_GBps=bw.p50, read_tokens_per_s=file_tokens / (stat.p50 / 1e3),
                                      read_ms=timing.spread(ms))
        raw_par = store_bytes / GB / (timing.Stat.of(samples[raw_label]).p50 / 1e3)
        best_w = max(figures, key=lambda k: figures[k]["write_GBps"])
        best_r = max(figures, key=lambda k: figures[k]["read_GBps"])
        files = figures[best_r]["store"]

        raw_dir = root / "raw"
        raw_dir.mkdir()
        raw_file_bytes = -(-file_bytes // ceilings.DIRECT_ALIGN_BYTES) * ceilings.DIRECT_ALIGN_BYTES
        raw_w, raw_r, raw1_label = ceilings.ceiling_disk(run, raw_dir, raw_file_bytes, n_files, bench="prefix.store",
                                                         x=x, reps=reps)

        fs = ceilings.fs_type(root)
        providers = {k: {f: v for f, v in d.items() if f != "store"} for k, d in figures.items()}
        disk_detail = {"filesystem": fs, "raw": raw_label, "queue_depth": depth, "chunk_tokens": chunk,
                       "file_bytes": file_bytes, "files": n_files, "raw_parallel_read_GBps": raw_par,
                       "raw_parallel_read_ms": timing.spread(samples[raw_label]), "raw_single_stream": raw1_label,
                       "raw_write_GBps": raw_w.p50, "raw_read_GBps": raw_r.p50,
                       "raw_write_tokens_per_s": file_tokens * raw_w.p50 * 1e9 / store_bytes,
                       "raw_read_tokens_per_s": file_tokens * raw_r.p50 * 1e9 / store_bytes, "providers": providers}
        run.summary("file_store_read_vs_raw", value=figures[best_r]["read_GBps"], unit="GB/s", ceiling=raw_par,
                    ceiling_of=f"{raw_label}: the same chunk files read whole in pieces of one layer's bytes, {depth} "
                               f"reads in flight, same disk ({fs}), cold, alternating with the store's reads; the "
                               "store's reads land on the GPU", target=">= 0.90", target_of="ratio",
                    provider=best_r, detail=disk_detail)
        run.summary("file_store_write_vs_raw", value=figures[best_w]["write_GBps"], unit="GB/s", ceiling=raw_w.p50,
                    ceiling_of=f"{raw1_label} writes (fsync) of as many files of the same size, same disk ({fs}), "
                               "same run; the store's writes start from the GPU", target=">= 0.90", target_of="ratio",
                    provider=best_w, detail=disk_detail)

        # -- time to first token ---------------------------------------------------------------------------
        prefill = prefix_ttft.measure(run, model)
        prefix_ttft.run_ttft(run, model, ids, keys, values, radix=radix, files=files, files_label=best_r,
                             stored=stored, file_tokens=file_tokens, reps=reps, prefill=prefill)
        del keys, values
        prefix_ttft.run_plan_error(run, model, root / "plans", chunk=chunk, options=figures[best_r]["options"],
                                   fraction=a.stored_fraction, reps=reps, prefill=prefill)
        radix.close()
        for d in figures.values():
            d["store"].close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return run.finish()


if __name__ == "__main__":
    harness.module_main(main)
