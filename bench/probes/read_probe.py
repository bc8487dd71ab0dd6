"""Probe of issue 12's `file_store_read_vs_raw`: why does ChunkFileStore's cold read ratio vary between runs?

Builds the bench's default ChunkFileStore (kvstream/bench/prefix.py: 8 layers of the Llama-3-8B shape, bf16,
8192-token prompt, 90% = 7372 stored -> 28 files of 256 tokens = 7168 tokens, 1 MiB per layer slice) on
--disk-dir, buffered and (where the filesystem has it) O_DIRECT, then times, in alternating rounds, each
call cold (ceilings.evict_tree of the tree, the bench's method) and bracketed by device synchronizations:

  raw-qd16            ceilings.raw_parallel_read of the buffered store's files (the bench's ceiling)
  raw-qd8 / raw-qd32  the same at other queue depths;  raw-qd16-dfiles: the O_DIRECT store's files
  S                   fetch_prefix onto the device, as the bench's read_all  (S = buf | dir)
  S-gc                same, gc.collect() in the untimed setup (a reference cycle held the last load's
                      pinned staging until the cyclic GC; then the next load cudaHostAlloc's a new block)
  S-noverify          transport._verify = False: no per-slice xxh3 (cause a)
  S-host              lookup + prefetch + release: reads into pinned host staging, verified, no H2D and no
                      unchunk (cause b)
  S-qd8 / S-qd32      a store on the same files with queue_depth 8 / 32 (cause c)
  S-hothdr            the 4 KiB header of every file read (buffered) after the eviction, untimed: the
                      store's serial header reads on the submitting thread cost nothing (cause e)
  S-traced            as S, with each slice read, slice verify and header read timed (extras in the JSON:
                      effective queue depth, header-read latency, time before the first read, tail after
                      the last read)
  h2d-unchunk         the tail of ChunkReads.packed alone: pinned staging -> device copy + unchunk
Every store sample also records pinned allocations (cudaHostAlloc) made inside the timed call.
Cause (d) (cold method): every side uses the same evict_tree; S-gc / raw-qd16-dfiles cover the rest.

Run: PYTHONPATH=$PWD python .gpu/read_probe.py --out $OUT/read_probe.json   (GPU; < 200 s)
     PYTHONPATH=$PWD python .gpu/read_probe.py --device cpu --small --out /tmp/read_probe.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file of every sample")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="small files (a CPU smoke run)")
    p.add_argument("--disk-dir", default=os.environ.get("KVSTREAM_BENCH_DISK", "/tmp/kvs-disk"))
    p.add_argument("--reps", type=int, default=7, help="alternating rounds (fewer if the budget runs out)")
    p.add_argument("--budget-s", type=float, default=130.0, help="stop starting rounds after this (s)")
    a = p.parse_args()

    from kvstream.bench import ceilings
    from kvstream.chunk import HEADER_BYTES
    from kvstream.cuda import host_empty, memory
    from kvstream.stores import ChunkFileStore
    from kvstream.stores import chunk_read
    from kvstream.transports import disk as disk_mod
    from kvstream.transports import slices as slices_mod
    from kvstream.transports.slices import DEFAULT_QUEUE_DEPTH

    device = torch.device(a.device)
    if a.small:
        layers, heads, head_dim, total, chunk = 4, 2, 64, 1024, 64
    else:
        layers, heads, head_dim, total, chunk = 8, 8, 128, 8192, 256
    stored = int(total * 0.9)
    dtype = torch.bfloat16
    per_token = layers * 2 * heads * head_dim * dtype.itemsize
    n_files = stored // chunk
    file_tokens = n_files * chunk
    file_bytes = HEADER_BYTES + chunk * per_token
    store_bytes = n_files * file_bytes
    piece = per_token * chunk // layers
    depth = DEFAULT_QUEUE_DEPTH

    base = Path(a.disk_dir)
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=".kvstream-readprobe-", dir=base))
    fs = ceilings.fs_type(root)
    direct_ok = ceilings.supports_direct_io(root)
    say(f"device {device}, disk {root} ({fs}, O_DIRECT {'yes' if direct_ok else 'no'}), {n_files} files of "
        f"{file_bytes} B = {store_bytes / 1e6:.1f} MB, slices of {piece} B, queue depth {depth}, "
        f"{os.cpu_count()} CPUs, library has the staging-cycle fix: {hasattr(chunk_read, '_LastResolved')}")

    # -- pinned allocations inside a timed call ---------------------------------------------------------
    alloc = memory.default_allocator()
    allocs: list[float] = []
    orig_alloc = alloc._alloc

    def counting_alloc(cls):
        t = time.perf_counter()
        try:
            return orig_alloc(cls)
        finally:
            allocs.append((time.perf_counter() - t) * 1e3)

    alloc._alloc = counting_alloc

    result: dict = {"geometry": {"layers": layers, "kv_heads": heads, "head_dim": head_dim, "dtype": str(dtype),
                                 "prompt_tokens": total, "stored_tokens": stored, "chunk_tokens": chunk,
                                 "files": n_files, "file_bytes": file_bytes, "store_bytes": store_bytes,
                                 "piece_bytes": piece, "queue_depth": depth},
                    "env": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                            "torch": torch.__version__, "python": sys.version.split()[0], "fs": fs,
                            "o_direct": direct_ok, "cpus": os.cpu_count(), "disk_dir": str(root),
                            "git_sha": os.environ.get("KVSTREAM_GIT_SHA", "unknown"),
                            "library_has_cycle_fix": hasattr(chunk_read, "_LastResolved"),
                            "gc_threshold": gc.get_threshold()},
                    "samples_ms": {}, "extras": {}, "summary": {}}
    stores: dict[str, ChunkFileStore] = {}
    try:
        # -- the stores, written as the bench writes them -------------------------------------------------
        ids = torch.randint(0, 32000, (1, total), device=device)
        keys = [torch.randn((1, heads, stored, head_dim), dtype=dtype, device=device) for _ in range(layers)]
        values = [torch.randn((1, heads, stored, head_dim), dtype=dtype, device=device) for _ in range(layers)]
        configs = {"buf": {}}
        if direct_ok:
            configs["dir"] = {"direct": True}
        for label, kw in configs.items():
            s = ChunkFileStore(root / label, chunk_tokens=chunk, namespace="bench-prefix", **kw)
            s.update_kv(ids[0, :stored], keys, values, overwrite=True)
            ceilings.evict_tree(s.root)
            with s.fetch_prefix(ids, device=device) as m:
                for i in range(layers):
                    if not (torch.equal(m.keys[i], keys[i][:, :, :file_tokens])
                            and torch.equal(m.values[i], values[i][:, :, :file_tokens])):
                        raise RuntimeError(f"{label}: layer {i} read back differs")
            stores[label] = s
            for q in (8, 32):
                stores[f"{label}-qd{q}"] = ChunkFileStore(root / label, chunk_tokens=chunk, namespace="bench-prefix",
                                                          queue_depth=q, **kw)
        del keys, values
        say("stores written and checked")
        files = {label: sorted(p for p in stores[label].root.rglob("*.kvc") if ".tmp" not in p.parts)
                 for label in configs}
        assert all(len(f) == n_files for f in files.values()), {k: len(v) for k, v in files.items()}
        raw_direct = direct_ok and file_bytes % ceilings.DIRECT_ALIGN_BYTES == 0

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        # -- the variants ------------------------------------------------------------------------------------
        def read_all(s) -> None:
            with s.fetch_prefix(ids, device=device) as m:
                if m.matched_tokens != file_tokens:
                    raise RuntimeError(f"matched {m.matched_tokens} tokens, expected {file_tokens}")

        def read_host(s) -> None:
            with s.lookup(ids) as m:
                if m.matched_tokens != file_tokens:
                    raise RuntimeError(f"matched {m.matched_tokens} tokens, expected {file_tokens}")
                m.prefetch()

        def read_noverify(s) -> None:
            s._transport._verify = False
            try:
                read_all(s)
            finally:
                s._transport._verify = True

        def hot_headers(label: str) -> None:
            ceilings.evict_tree(stores[label].root)
            for path in files[label]:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.pread(fd, HEADER_BYTES, 0)
                finally:
                    os.close(fd)

        trace: dict[str, list] = {"reads": [], "slices": [], "headers": []}
        tlock = threading.Lock()
        orig_read_block, orig_read_one, orig_read_header = slices_mod.read_block, slices_mod._read_one, disk_mod.read_header

        def t_read_block(*args):
            t = time.perf_counter()
            try:
                return orig_read_block(*args)
            finally:
                with tlock:
                    trace["reads"].append((t, time.perf_counter()))

        def t_read_one(*args):
            t = time.perf_counter()
            try:
                return orig_read_one(*args)
            finally:
                with tlock:
                    trace["slices"].append((t, time.perf_counter()))

        def t_read_header(*args):
            t = time.perf_counter()
            try:
                return orig_read_header(*args)
            finally:
                with tlock:
                    trace["headers"].append((t, time.perf_counter()))

        def read_traced(s) -> None:
            for v in trace.values():
                v.clear()
            slices_mod.read_block, slices_mod._read_one, disk_mod.read_header = t_read_block, t_read_one, t_read_header
            try:
                t0 = time.perf_counter()
                read_all(s)
                sync()
                t1 = time.perf_counter()
            finally:
                slices_mod.read_block, slices_mod._read_one, disk_mod.read_header = (orig_read_block, orig_read_one,
                                                                                     orig_read_header)
            reads, sl, hd = trace["reads"], trace["slices"], trace["headers"]
            first, last = min(r[0] for r in reads), max(r[1] for r in reads)
            busy = sum(e - b for b, e in reads)
            verify = sum(e - b for b, e in sl) - busy
            hdr = sorted((e - b) * 1e3 for b, e in hd)
            last_hdr = max(e for _, e in hd)
            return {"slice_reads": len(reads), "mean_in_flight": busy / (last - first),
                    "before_first_read_ms": (first - t0) * 1e3, "tail_after_last_read_ms": (t1 - last) * 1e3,
                    "reads_span_ms": (last - first) * 1e3, "verify_ms_total": verify * 1e3,
                    "header_reads": len(hd), "header_ms_median": statistics.median(hdr), "header_ms_max": hdr[-1],
                    "header_ms_total": sum(hdr), "last_header_done_ms": (last_hdr - t0) * 1e3}

        staging = host_empty((n_files, layers, 2, 1, heads, chunk, head_dim), dtype)

        def h2d_unchunk() -> None:
            if device.type == "cuda":
                buf = torch.empty(staging.shape, dtype=staging.dtype, device=device)
                buf.copy_(staging, non_blocking=True)
                chunk_read.unchunk(buf, file_tokens)
            else:
                chunk_read.unchunk(staging, file_tokens)

        def evict(label):
            return lambda: ceilings.evict_tree(stores[label].root)

        def evict_gc(label):
            return lambda: (ceilings.evict_tree(stores[label].root), gc.collect())

        variants: dict[str, tuple] = {}  # name -> (fn, setup, records extras)
        raw_src = "buf"
        for q in (depth, 8, 32):
            variants[f"raw-qd{q}"] = (lambda q=q: ceilings.raw_parallel_read(files[raw_src], piece_bytes=piece,
                                                                             queue_depth=q, direct=raw_direct),
                                      evict(raw_src), False)
        if "dir" in configs:
            variants[f"raw-qd{depth}-dfiles"] = (lambda: ceilings.raw_parallel_read(files["dir"], piece_bytes=piece,
                                                                                    queue_depth=depth, direct=raw_direct),
                                                 evict("dir"), False)
        for label in configs:
            s = stores[label]
            variants[label] = (lambda s=s: read_all(s), evict(label), True)
            variants[f"{label}-gc"] = (lambda s=s: read_all(s), evict_gc(label), True)
            variants[f"{label}-noverify"] = (lambda s=s: read_noverify(s), evict(label), True)
            variants[f"{label}-host"] = (lambda s=s: read_host(s), evict(label), True)
            for q in (8, 32):
                variants[f"{label}-qd{q}"] = (lambda s=stores[f"{label}-qd{q}"]: read_all(s), evict(label), True)
            variants[f"{label}-hothdr"] = (lambda s=s: read_all(s), lambda label=label: hot_headers(label), True)
            variants[f"{label}-traced"] = (lambda s=s: read_traced(s), evict(label), True)
        variants["h2d-unchunk"] = (h2d_unchunk, None, False)

        samples: dict[str, list[float]] = {n: [] for n in variants}
        extras: dict[str, list[dict]] = {n: [] for n in variants if variants[n][2]}
        say(f"{len(variants)} variants; warm-up")
        for name, (fn, setup, _) in variants.items():
            if setup:
                setup()
            fn()
        names = list(variants)
        round_s = None
        for rep in range(max(2, a.reps)):
            elapsed = time.perf_counter() - T0
            if rep >= 2 and round_s is not None and elapsed + round_s > a.budget_s:
                say(f"budget: stopping after {rep} rounds")
                break
            t_round = time.perf_counter()
            order = names if rep % 2 == 0 else names[::-1]
            for name in order:
                fn, setup, has_extra = variants[name]
                if setup:
                    setup()
                sync()
                cached0, n_alloc0 = alloc.cached_bytes, len(allocs)
                t = time.perf_counter()
                out = fn()
                sync()
                ms = (time.perf_counter() - t) * 1e3
                samples[name].append(ms)
                if has_extra:
                    ex = {"ms": ms, "pinned_allocs": len(allocs) - n_alloc0,
                          "pinned_alloc_ms": sum(allocs[n_alloc0:]), "cached_pinned_bytes_before": cached0}
                    if isinstance(out, dict):
                        ex.update(out)
                    extras[name].append(ex)
            round_s = time.perf_counter() - t_round
            say(f"round {rep + 1} done in {round_s:.1f} s")

        # -- report --------------------------------------------------------------------------------------
        raw_med = statistics.median(samples[f"raw-qd{depth}"])
        say(f"{'variant':22s} {'GB/s med':>8s} {'min':>6s} {'max':>6s}   {'ms med':>8s}  vs raw-qd{depth}  n")
        for name, ms in samples.items():
            gbps = sorted(store_bytes / 1e9 / (m / 1e3) for m in ms)
            med = statistics.median(ms)
            line = (f"{name:22s} {store_bytes / 1e9 / (med / 1e3):8.3f} {gbps[0]:6.3f} {gbps[-1]:6.3f}   {med:8.1f}"
                    f"  {raw_med / med:8.3f}  {len(ms)}")
            if name in extras and extras[name]:
                ex = extras[name]
                line += f"  pinned allocs {sum(e['pinned_allocs'] for e in ex)} ({sum(e['pinned_alloc_ms'] for e in ex):.0f} ms)"
                if "mean_in_flight" in ex[0]:
                    line += (f"  in-flight {statistics.median(e['mean_in_flight'] for e in ex):.1f}"
                             f"  hdr med/max {statistics.median(e['header_ms_median'] for e in ex):.2f}/"
                             f"{max(e['header_ms_max'] for e in ex):.2f} ms"
                             f"  first read +{statistics.median(e['before_first_read_ms'] for e in ex):.1f} ms"
                             f"  tail {statistics.median(e['tail_after_last_read_ms'] for e in ex):.1f} ms"
                             f"  verify {statistics.median(e['verify_ms_total'] for e in ex):.1f} ms cpu")
            print(line, flush=True)
            result["summary"][name] = {"GBps_median": store_bytes / 1e9 / (med / 1e3), "GBps_min": gbps[0],
                                       "GBps_max": gbps[-1], "ms_median": med, "ratio_to_raw": raw_med / med,
                                       "n": len(ms)}
        result["samples_ms"], result["extras"] = samples, extras
    finally:
        alloc._alloc = orig_alloc
        for s in stores.values():
            s.close()
        shutil.rmtree(root, ignore_errors=True)
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
