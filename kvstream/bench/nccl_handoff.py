"""KV handoff GPU to GPU: NcclTransport against raw nccl4py send/recv of the same bytes, in the same run.

What moves: a prompt's KV as DéjàVu's prompt worker streams it, one packed chunk per layer
``[1, 2, B, 8, T, 128]`` bf16 (the Llama-3-8B shape; ``--layers`` chunks, ``--batch`` B), for prompts of
``--tokens`` T (512, 2048, 8192: 64 MiB, 256 MiB and 1 GiB at 32 layers and B=1). Two processes, one GPU
each (this process sends from cuda:0, a child receives on cuda:1), as in ``kvstream disagg``.

Providers (rows ``nccl_handoff.handoff``, x = prompt tokens; time and GB/s of the whole handoff, from the
sender's first send to the receiver's last byte, wall clock of the one host):

* ``raw`` — nccl4py on a blocking two-rank communicator: one ``send`` per chunk, the receiver one
  ``recv`` per chunk into preallocated tensors, in order. The ceiling.
* ``raw-grouped`` — the same inside ``nccl.group()`` on both sides (one launch): shown for reference.
* ``NcclTransport`` — ``flush`` per chunk on the sender; the receiver calls ``fetch_many`` as the handoff
  starts, so chunks are received straight into its tensors (zero copy).
* ``NcclTransport(after-arrival)`` — the receiver waits until the last chunk arrived, then fetches
  (received ahead into the transport's buffers, then device-to-device copies): ``StreamingCache.load``'s
  pattern, where the manifest comes last.

Rows ``nccl_handoff.flush_calls`` (transport providers): host time of the sender's ``flush`` calls alone
(first call to last return). The chunk count (``--layers``) is the same at every prompt length, so a cost
per chunk looks fixed across sizes: compare ``--layers 16`` and ``--layers 64`` to tell them apart.

Chunk sizes instead of prompt lengths: ``--chunk-mib 4,8,16,32`` makes one handoff per chunk size (T chosen
so that one chunk ``[1, 2, B, 8, T, 128]`` bf16 holds that many MiB), of ``--layers`` chunks each, or of
``--total-mib / chunk`` chunks with ``--total-mib`` (``--chunk-mib 4,8,16,32 --total-mib 1024``: 1 GiB in 256,
128, 64 and 32 chunks). Rows then have x = ``<chunk>MiBx<chunks>``.

Every provider's bytes are checked bit-exactly on the receiver after its first timed repetition.
Summary key ``nccl_handoff_vs_raw``: NcclTransport GB/s over raw GB/s at the size where the ratio is worst
(target >= 0.90 at every size); the detail has every size and provider, the ratio per size
(``ratio_per_size``) and the ratio at the largest handoff (``ratio_largest``).

``--quick`` (no GPU needed): the same protocol on the CPU with RemoteHostTransport over gloo against raw
gloo send/recv, tiny sizes, no timing claims.

Run on a machine with two GPUs (nccl4py and an NCCL runtime installed)::

    PYTHONPATH=$PWD python3 -m kvstream.bench.nccl_handoff
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Sequence

import torch

from . import harness, inputs, records, timing
from .harness import Run
from .records import MiB
from .timing import Stat

NAMESPACE = "bench/nccl_handoff"
PROVIDERS = ("raw", "raw-grouped", "transport", "transport-after-arrival")
LABELS = {"raw": "raw", "raw-grouped": "raw-grouped", "transport": "NcclTransport",
          "transport-after-arrival": "NcclTransport(after-arrival)"}


def add_args(p: argparse.ArgumentParser) -> None:
    """The topic's own options."""
    p.add_argument("--tokens", default="512,2048,8192", help="prompt lengths T, comma-separated")
    p.add_argument("--chunk-mib", default=None,
                   help="chunk sizes in MiB, comma-separated, instead of --tokens (--quick: KiB)")
    p.add_argument("--total-mib", type=int, default=None,
                   help="with --chunk-mib: each handoff moves this many MiB (total / chunk chunks) instead of --layers chunks")
    p.add_argument("--batch", type=int, default=1, help="batch rows B per chunk (default 1)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per size and provider")
    p.add_argument("--role", choices=("send", "recv"), default="send", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)


def _shape(args, tokens: int) -> tuple[int, ...]:
    heads, head_dim = (2, 16) if args.quick else (8, 128)
    return (1, 2, args.batch, heads, tokens, head_dim)


def _layers(args) -> int:
    return min(args.layers, 4) if args.quick else args.layers


def _sizes(args) -> list[tuple[str, int, int]]:
    """Every handoff as ``(label, tokens T, chunks)``: from ``--tokens`` (``--layers`` chunks; label
    ``<T>tok``) or from ``--chunk-mib`` (label ``<MiB>MiBx<chunks>``; in ``--quick`` the sizes are KiB,
    label ``<KiB>KiBx<chunks>``)."""
    if not args.chunk_mib:
        tokens = [64, 256] if args.quick else [int(t) for t in args.tokens.split(",")]
        return [(f"{t}tok", t, _layers(args)) for t in tokens]
    unit = 1024 if args.quick else MiB
    shape = _shape(args, 1)
    per_token = 4 if args.quick else 2  # bytes of an element: float32 (--quick) or bfloat16
    for n in shape:
        per_token *= n
    out = []
    for mib in (float(c) for c in args.chunk_mib.split(",")):
        tokens = int(mib * unit) // per_token
        if tokens < 1 or tokens * per_token != int(mib * unit):
            raise SystemExit(f"--chunk-mib {mib:g}: not a whole number of tokens of {per_token} bytes")
        chunks = _layers(args) if not args.total_mib else max(1, int(args.total_mib // mib))
        out.append((f"{mib:g}{'KiB' if args.quick else 'MiB'}x{chunks}", tokens, chunks))
    return out


def _data(args, device: torch.device, tokens: int, chunks: int, seed: int) -> list[torch.Tensor]:
    """The chunks of one handoff: seeded, the same on both sides (each side generates them itself)."""
    dtype = torch.float32 if args.quick else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(_shape(args, tokens), generator=g, device=device).to(dtype) for _ in range(chunks)]


class _Side:
    """One process of the pair: store, the transport endpoint and the raw link."""

    def __init__(self, args, rank: int, port: int):
        from kvstream.transports.peer import rendezvous_store

        self.args, self.rank, self.peer = args, rank, 1 - rank
        self.nccl = not args.quick
        self.device = torch.device("cuda", rank) if self.nccl else torch.device("cpu")
        if self.nccl:
            torch.cuda.set_device(self.device)
        self.store = rendezvous_store("127.0.0.1", port, is_server=False, timeout_s=120)
        role = "send" if rank == 0 else "recv"
        client = rendezvous_store("127.0.0.1", port, is_server=False, timeout_s=120)
        if self.nccl:
            from kvstream.transports.nccl import NcclTransport

            self.transport = NcclTransport(client, rank, self.peer, role=role, device=self.device,
                                           namespace=NAMESPACE, timeout_s=120)
            self.raw = self._raw_nccl()
        else:
            from kvstream.transports.remote import RemoteHostTransport

            self.transport = RemoteHostTransport(client, rank, self.peer, namespace=NAMESPACE, timeout_s=120)
            self.raw = self._raw_gloo(port)
        self.barriers = 0

    def _raw_nccl(self):
        import nccl.core as nccl

        if self.rank == 0:
            uid = nccl.get_unique_id()
            self.store.set("raw/uid", bytes(uid))
        else:
            self.store.wait(["raw/uid"])
            uid = nccl.UniqueId.from_bytes(self.store.get("raw/uid"))
        return nccl.Communicator.init(2, self.rank, uid)

    def _raw_gloo(self, port: int):
        import datetime

        import torch.distributed as dist
        from kvstream.transports.peer import rendezvous_store

        client = rendezvous_store("127.0.0.1", port, is_server=False, timeout_s=120)
        return dist.ProcessGroupGloo(dist.PrefixStore("raw", client), self.rank, 2, datetime.timedelta(seconds=120))

    def barrier(self) -> int:
        """Both sides reach the same point; returns the barrier's number."""
        self.barriers += 1
        key = f"barrier/{self.barriers}"
        self.store.add(key, 1)
        deadline = time.monotonic() + 120
        while int(self.store.add(key, 0)) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{key}: the peer did not arrive")
            time.sleep(20e-6)
        return self.barriers

    def sync(self) -> None:
        """Block the host until this side's GPU work is done (``torch.cuda.synchronize``); no-op without NCCL."""
        if self.nccl:
            torch.cuda.synchronize(self.device)

    # -- raw ------------------------------------------------------------------------------------------
    def raw_ops(self, tensors: list[torch.Tensor], grouped: bool) -> None:
        """Send (rank 0) or receive (rank 1) every tensor in order, raw."""
        if not self.nccl:
            op = self.raw.send if self.rank == 0 else self.raw.recv
            works = [op([t.view(-1)], self.peer, i) for i, t in enumerate(tensors)]
            for w in works:
                w.wait()
            return
        import nccl.core as nccl

        stream = torch.cuda.current_stream(self.device).cuda_stream
        call = self.raw.send if self.rank == 0 else self.raw.recv
        if grouped:
            with nccl.group():
                for t in tensors:
                    call(t.view(torch.uint8).view(-1), self.peer, stream=stream)
        else:
            for t in tensors:
                call(t.view(torch.uint8).view(-1), self.peer, stream=stream)
        self.sync()

    def close(self) -> None:
        """Close the kvstream transport and, with NCCL, destroy the raw communicator."""
        self.transport.close()
        if self.nccl:
            self.raw.destroy()


def _receiver(args) -> int:
    """The child: receive every handoff, stamp its end time in the store, check the bytes."""
    side = _Side(args, 1, args.port)
    try:
        for label, tokens, chunks in _sizes(args):
            want = _data(args, side.device, tokens, chunks, seed=tokens * 1000 + chunks)
            outs = [torch.empty_like(t) for t in want]
            for provider in PROVIDERS:
                for rep in range(args.reps + 1):  # repetition 0 warms up (connections, allocator)
                    for o in outs:
                        o.fill_(0)
                    side.sync()
                    n = side.barrier()
                    keys = [f"h{n}/layer{l:04d}" for l in range(len(outs))]
                    if provider.startswith("raw"):
                        side.raw_ops(outs, grouped=provider == "raw-grouped")
                    elif provider == "transport":
                        side.transport.fetch_many(list(zip(keys, outs))).wait()
                    else:
                        side.transport.describe(keys[-1])
                        side.transport.fetch_many(list(zip(keys, outs))).wait()
                    side.sync()
                    side.store.set(f"end/{n}", repr(time.time()))
                    if not provider.startswith("raw"):
                        for k in keys:
                            side.transport.delete(k)
                    if rep == 1:
                        ok = all(torch.equal(a, b) for a, b in zip(outs, want))
                        side.store.set(f"ok/{label}/{provider}", "1" if ok else "0")
        side.barrier()
    finally:
        side.close()
    return 0


def _sender(run: Run, port: int) -> dict:
    """This process: send every handoff, read the receiver's end stamps, record rows."""
    args = run.args
    side = _Side(args, 0, port)
    results: dict = {}
    try:
        for label, tokens, chunks in _sizes(args):
            data = _data(args, side.device, tokens, chunks, seed=tokens * 1000 + chunks)
            x = tokens if not args.chunk_mib else label
            nbytes = inputs.tensor_nbytes(data)
            for provider in PROVIDERS:
                samples, flush_ms = [], []
                for rep in range(args.reps + 1):
                    side.sync()
                    n = side.barrier()
                    start = time.time()
                    if provider.startswith("raw"):
                        side.raw_ops(data, grouped=provider == "raw-grouped")
                    else:
                        handles = [side.transport.flush(f"h{n}/layer{l:04d}", t) for l, t in enumerate(data)]
                        if rep > 0:  # host time of the flush calls alone: per-chunk launch cost shows here
                            flush_ms.append((time.time() - start) * 1e3)
                        for h in handles:
                            h.wait()
                    side.store.wait([f"end/{n}"])
                    end = float(side.store.get(f"end/{n}").decode())
                    if rep > 0:
                        samples.append((end - start) * 1e3)
                side.store.wait([f"ok/{label}/{provider}"])
                ok = side.store.get(f"ok/{label}/{provider}") == b"1"
                if not ok:
                    raise AssertionError(f"{provider} at {label} delivered different bytes")
                ms = Stat.of(samples)
                name = LABELS[provider] if side.nccl else LABELS[provider].replace("NcclTransport", "RemoteHostTransport")
                bw = run.add_time_and_bandwidth("nccl_handoff.handoff", name, x, ms, nbytes)
                results[(label, provider)] = {"ms": ms.p50, "GBps": bw.p50, "bytes": nbytes, "identical": ok,
                                              "chunks": chunks, "chunk_bytes": nbytes // chunks}
                note = ""
                if flush_ms:
                    fl = run.add("nccl_handoff.flush_calls", name, x, "time", "ms", Stat.of(flush_ms))
                    results[(label, provider)]["flush_calls_ms"] = fl.p50
                    note = f" (flush calls {fl.p50:.3f} ms: {fl.p50 * 1e3 / len(data):.0f} us a chunk)"
                timing.progress(f"{label}, {provider}: {ms.p50:.3f} ms, {bw.p50:.1f} GB/s{note}")
        side.barrier()
    finally:
        side.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the topic (or, with ``--role recv``, the receiving child). Returns the exit code."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--role", default="send")
    if probe.parse_known_args(list(argv) if argv is not None else None)[0].role == "recv":
        p = harness.common_parser("nccl_handoff")
        add_args(p)
        return _receiver(p.parse_known_args(list(argv) if argv is not None else None)[0])
    run = Run.from_argv("nccl_handoff", argv, add_args, __doc__)
    if not run.quick and torch.cuda.device_count() < 2:
        raise SystemExit("kvstream.bench.nccl_handoff needs two GPUs (or --quick for the CPU smoke run)")
    from kvstream.transports.peer import rendezvous_store

    server = rendezvous_store("127.0.0.1", 0, is_server=True, timeout_s=120)
    child_argv = ["--role", "recv", "--port", str(server.port), "--layers", str(run.args.layers), "--tokens",
                  run.args.tokens, "--batch", str(run.args.batch), "--reps", str(run.args.reps)]
    child_argv += ["--chunk-mib", run.args.chunk_mib] if run.args.chunk_mib else []
    child_argv += ["--total-mib", str(run.args.total_mib)] if run.args.total_mib else []
    child_argv += ["--quick"] if run.quick else []
    src = str(records.bench_dir().parent.parent)  # the directory holding the kvstream package
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-m", f"{__package__}.nccl_handoff", *child_argv], cwd=src, env=env)
    try:
        results = _sender(run, server.port)
        if child.wait(timeout=120) != 0:
            raise SystemExit(f"kvstream.bench.nccl_handoff: the receiving process exited with {child.returncode}")
    finally:
        if child.poll() is None:
            child.kill()
    sizes = [label for label, _, _ in _sizes(run.args)]
    ratio = {s: results[(s, "transport")]["GBps"] / results[(s, "raw")]["GBps"] for s in sizes}
    worst = min(sizes, key=ratio.get)
    largest = max(sizes, key=lambda s: (results[(s, "raw")]["bytes"], results[(s, "raw")]["chunk_bytes"]))
    raw, ours = results[(worst, "raw")]["GBps"], results[(worst, "transport")]["GBps"]
    detail = {f"{s}/{p}": v for (s, p), v in results.items()}
    detail["ratio_per_size"] = ratio
    detail["worst_size"], detail["largest_size"], detail["ratio_largest"] = worst, largest, ratio[largest]
    detail["ratio_after_arrival"] = results[(worst, "transport-after-arrival")]["GBps"] / raw
    detail["ratio_vs_grouped"] = ours / results[(worst, "raw-grouped")]["GBps"]
    detail["handoff_bytes"] = results[(worst, "raw")]["bytes"]
    chunks = results[(worst, "raw")]["chunks"]
    run.summary("nccl_handoff_vs_raw", value=ours, unit="GB/s", ceiling=raw,
                ceiling_of=f"raw nccl4py send/recv, one per chunk, same bytes, same run; worst size of {len(sizes)}: "
                           f"{detail['handoff_bytes'] / MiB:.0f} MiB in {chunks} chunks" if not run.quick
                else "raw gloo send/recv (--quick)",
                target=">= 0.90", target_of="ratio",
                provider="NcclTransport" if not run.quick else "RemoteHostTransport", detail=detail)
    return run.finish()


if __name__ == "__main__":
    harness.module_main(main)
