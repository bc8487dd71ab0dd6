"""Tune the pack/unpack kernels: every variant checked bit-exactly, then timed against its ceilings.

Run on the GPU machine (about 1-2 minutes of GPU time, 40 GB of GPU memory at the defaults)::

    PYTHONPATH=$PWD python3 -m kvstream.bench.kernels_tune        # the table on stdout
    PYTHONPATH=$PWD python3 -m kvstream.bench.kernels_tune --csv bench/results/kernels_tune.csv

and on a CPU-only machine, as a smoke test of the script itself (tiny shapes under the Triton interpreter,
correctness only, no timing)::

    PYTHONPATH=$PWD python3 -m kvstream.bench.kernels_tune --quick

Sections (Llama-3-8B's KV: 32 layers, 8 KV heads, head_dim 128, bf16; issue 3's targets):

* ``pack`` / ``unpack`` — a prefill region of ``--tokens`` tokens at batch 16 from a StaticCache-like cache
  with 256 spare positions (so the region is strided). Variants: rows per program (``block_rows``) x
  ``num_warps``. Ceilings in the same run: ``d2d-copy`` (a contiguous device-to-device copy of the chunk's
  bytes: target >= 0.90 of it) and ``torch`` (the reference's strided ``copy_`` per layer: target >= 1.9x).
  Bandwidth counts bytes read + written (2 x chunk bytes).
* ``decode`` — the newest token of every layer (B16: 2 MiB) into pinned host memory (zero-copy) and into
  device memory; ceilings ``memcpy-d2h`` (cudaMemcpyAsync of the same 2 MiB to pinned host: the PCIe floor)
  and ``torch`` (one strided copy per layer and K/V to pinned host). ``graph`` replays the best zero-copy
  variant from a CUDA graph (no launch overhead); ``host-us`` is wall time per call in a loop of 200 calls
  (launch overhead included). Target: <= 15 us landed in pinned host memory.
* ``paged`` — 2048 random 16-token blocks of a vLLM-layout cache (``[2, num_blocks, 16, 8, 128]`` per layer)
  gathered and scattered back.

``vs_ceiling`` is over ``d2d-copy`` (pack, unpack, paged) or ``memcpy-d2h`` (decode); ``vs_torch`` over the
reference. At the defaults the largest section holds about 35 GB of GPU memory; for ``--tokens 8192`` pass
``--batch 8``. The decode target meets a floor: 2 MiB over PCIe at the ~55 GB/s of pinned D2H memcpy
measured on the H100 machine (bench/NOTES.md) is about 38 us, so ``memcpy-d2h`` shows what any B16 decode step can reach.

Timing: ``triton.testing.do_bench`` (median, 20th/80th percentiles, L2 flushed between repetitions).
Every variant's output is compared with ``torch.equal`` to the reference before it is timed; a mismatch
stops the script (exit 1). The best variant per section is printed last: set the kernel files' constants
(``MAX_TILE_BYTES``, ``MIN_PROGRAMS_PER_SM``, ``NUM_WARPS``) from it.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from typing import Callable

import torch

#: Spare positions per layer beyond the region: the region is a strided view, as in a StaticCache.
PAD_TOKENS = 256
#: Random 16-token blocks gathered by the paged section (4.3 GB chunk at Llama-3-8B shapes).
PAGED_IDS = 2048


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="1024,4096", help="prefill region sizes (comma-separated)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--block-rows", default="16,32,64,128", help="rows per program tried for pack/unpack/paged")
    p.add_argument("--warps", default="4,8", help="num_warps tried for pack/unpack/paged")
    p.add_argument("--decode-block-rows", default="1,2,4,8,16,32")
    p.add_argument("--decode-warps", default="1,2,4")
    p.add_argument("--sections", default="pack,unpack,decode,paged")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    p.add_argument("--quick", action="store_true", help="tiny shapes, correctness only (CPU: Triton interpreter)")
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


class Table:
    """Rows of results; prints a markdown table."""

    COLUMNS = ("section", "size", "provider", "block_rows", "warps", "p50", "p20", "p80", "unit", "GB/s",
               "vs_ceiling", "vs_torch", "exact")

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, **row) -> dict:
        """Append one row; columns not given are left empty (``""``). Returns the stored row."""
        row = {c: row.get(c, "") for c in self.COLUMNS}
        self.rows.append(row)
        return row

    def markdown(self) -> str:
        """The rows as a markdown table, floats to 4 significant digits."""

        def _fmt(v):
            return f"{v:.4g}" if isinstance(v, float) else str(v)

        lines = ["| " + " | ".join(self.COLUMNS) + " |", "|" + "---|" * len(self.COLUMNS)]
        lines += ["| " + " | ".join(_fmt(r[c]) for c in self.COLUMNS) + " |" for r in self.rows]
        return "\n".join(lines)

    def write_csv(self, path: str) -> None:
        """Write the rows to ``path`` as CSV with a header row (overwrites the file; ``OSError`` if it cannot)."""
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.COLUMNS)
            w.writeheader()
            w.writerows(self.rows)


class Timer:
    """``do_bench`` medians on CUDA; nothing (``None``) in ``--quick`` mode."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float, float] | None:
        if self.quick:
            fn()
            return None
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return p50, p20, p80


def _check(name: str, got: torch.Tensor, want: torch.Tensor) -> str:
    if not torch.equal(got, want):
        print(f"MISMATCH in {name}: the variant's output differs from the reference", file=sys.stderr)
        sys.exit(1)
    return "yes"


def _hf_cache(layers, batch, heads, seq, head_dim, dtype, device, pad):
    """Per-layer K/V views ``[:, :, :seq]`` of ``[B, H, seq + pad, D]`` buffers, filled with random values."""
    keys, values = [], []
    for _ in range(layers):
        for out in (keys, values):
            buf = torch.empty(batch, heads, seq + pad, head_dim, dtype=dtype, device=device)
            buf.normal_()
            out.append(buf[:, :, :seq])
    return keys, values


def _timed(table, timer, section, size, provider, fn, moved_bytes, ceilings, unit="ms", **extra):
    t = timer(fn)
    row = dict(section=section, size=size, provider=provider, **extra)
    if t is not None:
        scale = 1e3 if unit == "us" else 1.0
        row.update(p50=t[0] * scale, p20=t[1] * scale, p80=t[2] * scale, unit=unit)
        gbps = moved_bytes / (t[0] * 1e-3) / 1e9
        row["GB/s"] = gbps
        if "ceiling" in ceilings:
            row["vs_ceiling"] = gbps / ceilings["ceiling"]
        if "torch" in ceilings:
            row["vs_torch"] = gbps / ceilings["torch"]
    return table.add(**row)


def bench_region(args, table, timer, device, unpack: bool) -> None:
    """The ``pack`` (or ``unpack``) section: every ``block_rows`` x ``num_warps`` variant on a prefill region.

    Parameters
    ----------
    args : argparse.Namespace
        From ``main``: ``layers``, ``batch``, ``token_list``, ``block_rows``, ``warps``, ``pad``.
    table : Table
        Receives one row per provider and variant.
    timer : Timer
        ``do_bench`` on CUDA, a single untimed call in ``--quick`` mode.
    device : torch.device
        Where the per-layer bf16 caches ``[batch, 8, tokens + pad, 128]`` are allocated.
    unpack : bool
        ``True`` times chunk -> cache (and checks the spare positions stay untouched), ``False`` cache -> chunk.

    A variant whose output is not ``torch.equal`` to the reference's ends the process (``SystemExit(1)``).
    """
    from kvstream.kernels import reference as ref
    from kvstream.kernels import tokens
    from kvstream.layout import Region

    L, H, D, dt = args.layers, 8, 128, torch.bfloat16
    section = "unpack" if unpack else "pack"
    for T in args.token_list:
        print(f"[kernels_tune] {section}: {L} layers, B{args.batch}, {T} tokens", file=sys.stderr, flush=True)
        keys, values = _hf_cache(L, args.batch, H, T, D, dt, device, args.pad)
        region = Region(layers=(0, L), tokens=(0, T))
        expected = ref.pack_tokens(keys, values, region)
        moved = 2 * expected.numel() * expected.element_size()
        size = f"T={T}"
        ceilings = {}
        src = torch.empty_like(expected).normal_()
        d2d = _timed(table, timer, section, size, "d2d-copy", lambda: expected.copy_(src), moved, {})
        if d2d.get("GB/s"):
            ceilings["ceiling"] = d2d["GB/s"]
        if unpack:
            chunk = src  # random: differs from the cache, so a skipped row shows
            torch_fn = lambda: ref.unpack_tokens(chunk, keys, values, region)  # noqa: E731
        else:
            out = torch.empty_like(expected)
            torch_fn = lambda: ref.pack_tokens(keys, values, region, out)  # noqa: E731
        expected = ref.pack_tokens(keys, values, region)  # the cache's bytes (d2d overwrote the first copy)
        tr = _timed(table, timer, section, size, "torch", torch_fn, moved, dict(ceilings))
        if tr.get("GB/s"):
            ceilings["torch"] = tr["GB/s"]
        for block_rows in args.block_rows:
            for warps in args.warps:
                kw = dict(block_rows=block_rows, num_warps=warps)
                if unpack:
                    ref.unpack_tokens(expected, keys, values, region)  # back to known contents
                    tokens.unpack_tokens(chunk, keys, values, region, **kw)
                    exact = _check(f"unpack {size} {kw}", ref.pack_tokens(keys, values, region), chunk)
                    fn = lambda kw=kw: tokens.unpack_tokens(chunk, keys, values, region, **kw)  # noqa: E731
                else:
                    out.fill_(float("nan"))
                    tokens.pack_tokens(keys, values, region, out, **kw)
                    exact = _check(f"pack {size} {kw}", out, expected)
                    fn = lambda kw=kw: tokens.pack_tokens(keys, values, region, out, **kw)  # noqa: E731
                _timed(table, timer, section, size, "kvstream", fn, moved, ceilings, block_rows=block_rows,
                       warps=warps, exact=exact)
        if unpack:
            pad_before = [k.as_strided((k.shape[0], k.shape[1], args.pad, D), k.stride(), k.shape[2] * D).clone()
                          for k in keys[:2]]
            tokens.unpack_tokens(chunk, keys, values, region)
            for k, before in zip(keys[:2], pad_before):  # the spare positions behind each view are untouched
                _check("unpack spare positions", k.as_strided(before.shape, k.stride(), k.shape[2] * D), before)
        del keys, values, expected, src
        _free(device)


def bench_decode(args, table, timer, device) -> None:
    """The ``decode`` section: the newest token of every layer into pinned host memory and into device memory.

    Caches are bf16 ``[batch, 8, 2 * decode_seq, 128]`` per layer on ``device``; the landed chunk is checked
    against the reference's (``SystemExit(1)`` on a mismatch). On CUDA the best zero-copy variant is also
    replayed from a CUDA graph and timed by wall clock per call (``host-us``). Arguments as in ``bench_region``.
    """
    from kvstream.kernels import reference as ref
    from kvstream.kernels import tokens

    L, B, H, D, dt = args.layers, args.batch, 8, 128, torch.bfloat16
    seq = args.decode_seq
    print(f"[kernels_tune] decode: {L} layers, B{B}, newest of {seq} positions", file=sys.stderr, flush=True)
    keys, values = _hf_cache(L, B, H, seq, D, dt, device, seq)  # StaticCache with max_cache_len = 2 * seq
    expected = ref.pack_newest(keys, values).cpu()
    pin = device.type == "cuda"
    host = torch.empty(expected.shape, dtype=dt, pin_memory=pin)
    dev = torch.empty(expected.shape, dtype=dt, device=device)
    moved = expected.numel() * expected.element_size()  # bytes landed in host memory
    size = f"B={B}"
    contiguous = torch.empty_like(dev).normal_()
    mc = _timed(table, timer, "decode", size, "memcpy-d2h", lambda: host.copy_(contiguous, non_blocking=True),
                moved, {}, unit="us")
    tr = _timed(table, timer, "decode", size, "torch", lambda: ref.pack_newest(keys, values, out=host), moved, {},
                unit="us")
    ceilings = {"ceiling": mc["GB/s"], "torch": tr["GB/s"]} if mc.get("GB/s") else {}
    best = None
    for block_rows in args.decode_block_rows:
        for warps in args.decode_warps:
            kw = dict(block_rows=block_rows, num_warps=warps)
            host.fill_(float("nan"))
            tokens.pack_newest(keys, values, out=host, **kw)
            _sync(device)
            exact = _check(f"decode zero-copy {kw}", host, expected)
            row = _timed(table, timer, "decode", size, "kvstream-zero-copy",
                         lambda kw=kw: tokens.pack_newest(keys, values, out=host, **kw), moved, ceilings, unit="us",
                         block_rows=block_rows, warps=warps, exact=exact)
            if row.get("p50") != "" and (best is None or row["p50"] < best[0]):
                best = (row["p50"], kw)
            dev.fill_(float("nan"))
            tokens.pack_newest(keys, values, out=dev, **kw)
            exact = _check(f"decode device {kw}", dev.cpu(), expected)

            def _pack_then_copy(kw=kw):
                tokens.pack_newest(keys, values, out=dev, **kw)
                host.copy_(dev, non_blocking=True)

            _timed(table, timer, "decode", size, "kvstream-pack+memcpy", _pack_then_copy, moved, ceilings, unit="us",
                   block_rows=block_rows, warps=warps, exact=exact)
    if best is not None and device.type == "cuda":
        kw = best[1]
        fn = lambda: tokens.pack_newest(keys, values, out=host, **kw)  # noqa: E731
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        host.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        exact = _check("decode graph", host, expected)
        _timed(table, timer, "decode", size, "kvstream-zero-copy-graph", graph.replay, moved, ceilings, unit="us",
               block_rows=kw["block_rows"], warps=kw["num_warps"], exact=exact)
        n = 200
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        table.add(section="decode", size=size, provider="kvstream-zero-copy host-us (wall per call)",
                  block_rows=kw["block_rows"], warps=kw["num_warps"], p50=(time.perf_counter() - t0) / n * 1e6,
                  unit="us")
    del keys, values
    _free(device)


def bench_paged(args, table, timer, device) -> None:
    """The ``paged`` section: ``paged_ids`` random 16-token blocks gathered from and scattered back to a vLLM cache.

    Each layer's cache is a bf16 ``[2, paged_blocks, 16, 8, 128]`` tensor on ``device`` (K and V halves); block
    ids are int64 on ``device``, drawn with a fixed seed. ``SystemExit(1)`` on a mismatch with the reference.
    Arguments as in ``bench_region``.
    """
    from kvstream.kernels import paged
    from kvstream.kernels import reference as ref

    L, H, D, dt, bs = args.layers, 8, 128, torch.bfloat16, 16
    num_blocks, n_ids = args.paged_blocks, args.paged_ids
    print(f"[kernels_tune] paged: {L} layers, {n_ids} of {num_blocks} blocks of {bs}", file=sys.stderr, flush=True)
    kc, vc = [], []
    for _ in range(L):
        kv = torch.empty(2, num_blocks, bs, H, D, dtype=dt, device=device).normal_()
        kc.append(kv[0])
        vc.append(kv[1])
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(num_blocks, generator=g)[:n_ids].to(device)
    expected = ref.pack_blocks(kc, vc, ids)
    moved = 2 * expected.numel() * expected.element_size()
    size = f"ids={n_ids}"
    src = torch.empty_like(expected).normal_()
    d2d = _timed(table, timer, "paged", size, "d2d-copy", lambda: expected.copy_(src), moved, {})
    expected = ref.pack_blocks(kc, vc, ids)
    out = torch.empty_like(expected)
    tr = _timed(table, timer, "paged", size, "torch", lambda: ref.pack_blocks(kc, vc, ids, out=out), moved,
                {"ceiling": d2d["GB/s"]} if d2d.get("GB/s") else {})
    ceilings = {"ceiling": d2d["GB/s"], "torch": tr["GB/s"]} if d2d.get("GB/s") else {}
    for block_rows in args.block_rows:
        for warps in args.warps:
            kw = dict(block_rows=block_rows, num_warps=warps)
            out.fill_(float("nan"))
            paged.pack_blocks(kc, vc, ids, out=out, **kw)
            exact = _check(f"pack_blocks {kw}", out, expected)
            _timed(table, timer, "paged", size, "kvstream-pack", lambda kw=kw: paged.pack_blocks(kc, vc, ids, out=out, **kw),
                   moved, ceilings, block_rows=block_rows, warps=warps, exact=exact)
            paged.unpack_blocks(src, kc, vc, ids, **kw)
            exact = _check(f"unpack_blocks {kw}", ref.pack_blocks(kc, vc, ids), src)
            paged.unpack_blocks(expected, kc, vc, ids, **kw)
            _timed(table, timer, "paged", size, "kvstream-unpack",
                   lambda kw=kw: paged.unpack_blocks(expected, kc, vc, ids, **kw), moved, ceilings,
                   block_rows=block_rows, warps=warps, exact=exact)
    del kc, vc, expected, src, out
    _free(device)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _best(table: Table) -> list[str]:
    lines = []
    keyed: dict[tuple, dict] = {}
    for r in table.rows:
        if r["block_rows"] == "" or r["p50"] == "" or "host-us" in r["provider"] or "graph" in r["provider"]:
            continue
        key = (r["section"], r["size"], r["provider"])
        if key not in keyed or r["p50"] < keyed[key]["p50"]:
            keyed[key] = r
    for (section, size, provider), r in keyed.items():
        ratio = "".join(f", {k} {r[k]:.3g}" for k in ("vs_ceiling", "vs_torch") if r[k] != "")
        lines.append(f"best {section} {size} {provider}: block_rows={r['block_rows']} num_warps={r['warps']} "
                     f"{r['p50']:.4g} {r['unit']}{ratio}")
    return lines


def main(argv=None) -> int:
    """Run the sections named by ``--sections``, print the table and the best variants; return the exit status.

    Returns 2 without a CUDA GPU unless ``--quick`` (which then sets ``TRITON_INTERPRET=1``), 0 on success;
    a variant that differs from the reference exits with 1.
    """
    args = _args(argv)
    if args.quick and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda" and not args.quick:
        print("kernels_tune needs a CUDA GPU (use --quick for a CPU smoke test)", file=sys.stderr)
        return 2
    args.token_list = _ints(args.tokens)
    args.block_rows, args.warps = _ints(args.block_rows), _ints(args.warps)
    args.decode_block_rows, args.decode_warps = _ints(args.decode_block_rows), _ints(args.decode_warps)
    args.pad, args.decode_seq, args.paged_blocks, args.paged_ids = PAD_TOKENS, 2048, 4096, PAGED_IDS
    if args.quick:
        args.layers, args.batch, args.token_list = 2, 2, [5, 9]
        args.block_rows, args.warps = args.block_rows[:2], args.warps[:1]
        args.decode_block_rows, args.decode_warps = args.decode_block_rows[:2], args.decode_warps[:1]
        args.pad, args.decode_seq, args.paged_blocks, args.paged_ids = 3, 6, 8, 5
    table, timer = Table(), Timer(args.quick)
    torch.manual_seed(0)
    sections = args.sections.split(",")
    start = time.perf_counter()
    if "pack" in sections:
        bench_region(args, table, timer, device, unpack=False)
    if "unpack" in sections:
        bench_region(args, table, timer, device, unpack=True)
    if "decode" in sections:
        bench_decode(args, table, timer, device)
    if "paged" in sections:
        bench_paged(args, table, timer, device)
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter, no timing)"
    print(f"\n## kernels_tune on {name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, {time.perf_counter() - start:.0f} s\n")
    print(table.markdown())
    print()
    print("\n".join(_best(table)))
    if args.csv:
        table.write_csv(args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
