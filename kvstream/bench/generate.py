"""Generate: Hugging Face ``generate`` on the Llama-3-8B shape with and without kvstream, in one run.

The model is ``kvstream.models.build_model(llama3_8b_config(--layers), device='cuda', dtype=bf16)`` (seeded
random weights: the timing depends on the shapes, not the values), built once and shared with ``levels``.
Batch ``--batch`` 16, prompts of ``--prompt`` 2000 real-text tokens, ``--new-tokens`` 128 greedy tokens
(``min_new_tokens`` too, so no row stops early). Providers, each run ``--reps`` times in alternating order
after a short warm-up:

* ``dynamic`` — transformers' ``DynamicCache``, no streaming (the reference);
* ``dynamic-again`` — the same ``DynamicCache`` as a second provider, only when asked for: the A/A control,
  whose comparison with ``dynamic`` is the machine's noise floor in the same run (``stream_overhead``'s detail
  ``control``);
* ``stream-host`` — ``StreamingCache`` streaming every layer's KV to a ``HostTransport`` (pinned host)
  while generate runs, until ``cache.wait()`` returns (every chunk landed, manifest written);
* ``offload`` — ``StreamingCache(offload=True)`` (no transport): only the layers in flight on the GPU;
* ``hf-offload`` — transformers' own ``DynamicCache(offloading=True)`` (the peer);
* ``stream-disk`` — ``StreamingCache`` to a ``DiskTransport`` (one repetition; the paper's Fig. 25);
* ``static`` — transformers' ``StaticCache`` (HF's fast path: on a GPU ``generate`` compiles the decode step
  of a static cache itself, ``mode="reduce-overhead"``), the reference of
* ``stream-static`` — ``StreamingStaticCache`` streaming to a ``HostTransport``, the same way;
* ``static-eager``, ``stream-static-eager`` — the same two with ``generate(disable_compile=True)``.

Bytes: KV per token is ``L*2*H*D*2`` = 128 KiB per row at 32 layers, so a run streams
``B*(P+N)*128 KiB`` = 4.46 GB at B16, P2000, N128 (81 ms of PCIe at 55 GB/s against seconds of generate).
Offload must bring each layer's whole history back every step: ~4.3 GB per step, ~80 ms at 52 GB/s, which
no overlap can hide behind a ~30 ms decode step: the ``pcie_floor_ratio`` in the summary detail.

Timing is the host clock around ``generate`` (+ ``cache.wait()``), synchronized. A generate streamer
probe records the time and ``torch.cuda.memory_allocated()`` at each token: prefill time (to the first
token), per-token time, and KV resident on the GPU at step boundaries above the pre-generate baseline
(reported in layers of KV as well). Output tokens of every provider are compared with ``dynamic``'s. The CPU
seconds of the whole process over the same span (``time.process_time``) are kept beside the wall time:
``stream_overhead``'s detail compares them too (``cpu_comparison``, ``cpu_control``), the host's own work
without the time other tenants take from it.

Rows (``<out>/generate.csv``): ``generate.e2e`` (x = ``B16/P2000/N128``; metrics total_time s, cpu_time s,
prefill_time ms, per_token_time ms, kv_resident GB, peak_memory GB), ``generate.fig2`` (the paper's Fig. 2:
prompt time and per-token time vs prompt length, ``dynamic``), ``generate.ceiling`` (pinned H2D memcpy).
Summary keys: ``stream_overhead``, ``static_stream_overhead``, ``offload_vs_dynamic``,
``hf_offload_vs_dynamic`` (planner inputs Y, t, m in ``stream_overhead``'s detail), each with
``--summary-suffix`` appended (``_b1`` for the B1 run).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from . import ceilings, harness, inputs, timing
from ..integrations.hf.keywords import cache_kwargs
from .generate_summary import median_of, summarize
from .harness import Run
from .records import GB, MiB
from .timing import Stat

PROVIDERS = ("dynamic", "dynamic-again", "stream-host", "offload", "hf-offload", "stream-disk", "static",
             "stream-static", "static-eager", "stream-static-eager")
#: What ``--providers`` runs unless told (the A/A control only when asked for).
DEFAULT_PROVIDERS = tuple(p for p in PROVIDERS if p != "dynamic-again")
#: Providers warmed up with a full-length run (the others — PCIe-bound offloads, the one disk run — with 2 tokens).
WARM_FULL = ("dynamic", "dynamic-again", "stream-host", "static", "stream-static", "static-eager", "stream-static-eager")


def add_args(p: argparse.ArgumentParser) -> None:
    """The topic's own options."""
    harness.workload_args(p, batch=16, prompt=2000, new_tokens=128, reps=5,
                          helps={"new_tokens": "generated tokens",
                                 "reps": "alternating repetitions per provider, stream-disk: 1"})
    p.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS), help="providers to run (dynamic is always run)")
    p.add_argument("--fig2-prompts", default="512,1024,2048,4096", help="prompt lengths of Fig. 2 ('' to skip)")
    p.add_argument("--fig2-new-tokens", type=int, default=16, help="tokens generated per Fig. 2 point")
    p.add_argument("--disk-fsync", action="store_true", help="stream-disk with DiskTransport(fsync=True)")
    p.add_argument("--summary-suffix", default="", help="appended to every summary key (e.g. _b1)")


def _geometry(run: Run) -> dict:
    a = run.args
    if run.quick:
        return dict(batch=2, prompt=24, new=4, reps=1, fig2=[8, 16], fig2_new=3)
    return dict(batch=a.batch, prompt=a.prompt, new=a.new_tokens, reps=a.reps,
                fig2=[int(v) for v in a.fig2_prompts.split(",") if v.strip()], fig2_new=a.fig2_new_tokens)


# ----------------------------------------------------------------------------------------------------
# One generate call, measured
# ----------------------------------------------------------------------------------------------------

def _probe_class():
    from transformers.generation.streamers import BaseStreamer

    class Probe(BaseStreamer):
        """A generate streamer that records the host time and GPU memory in use at every token."""

        def __init__(self, device: torch.device):
            self.device = device
            self.times: list[float] = []
            self.memory: list[int] = []

        def put(self, value) -> None:
            """``BaseStreamer`` hook, once per generated step: record the time and the GPU memory allocated."""
            self.times.append(time.perf_counter())
            self.memory.append(torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0)

        def end(self) -> None:
            """``BaseStreamer`` hook at the end of generate: nothing to do."""

    return Probe


@dataclass
class GenResult:
    """What one measured generate call gave."""

    total_s: float
    prefill_s: float
    per_token_s: float
    kv_resident_bytes: int
    peak_bytes: int
    tokens: torch.Tensor
    stats: dict = field(default_factory=dict)
    cpu_s: float = 0.0  # CPU seconds of the whole process (every thread) over the same span as total_s


def generate_once(model: torch.nn.Module, input_ids: torch.Tensor, make_cache: Callable[[], Any], new_tokens: int,
                  device: torch.device, **generate_kwargs: Any) -> GenResult:
    """Run ``model.generate`` greedily for exactly ``new_tokens`` tokens with the cache ``make_cache()`` gives
    (and ``generate_kwargs``, such as ``disable_compile=True``).

    The cache's ``wait()`` (every streamed chunk landed) is inside the timed region. The cache is dropped
    before returning, so the next call starts from the same memory baseline.
    """
    gc.collect()
    timing.sync(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    cache = make_cache()
    probe = _probe_class()(device)
    c0 = time.process_time()
    t0 = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **cache_kwargs(cache),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         streamer=probe, **generate_kwargs)
    if hasattr(cache, "wait"):
        cache.wait()
    timing.sync(device)
    t1 = time.perf_counter()
    c1 = time.process_time()
    times = probe.times[1:] or [t1]  # put #0 is the prompt, #1 the first token (end of prefill)
    prefill = times[0] - t0
    per_token = (times[-1] - times[0]) / max(1, len(times) - 1)
    resident = max(probe.memory[1:] or [base]) - base
    peak = (torch.cuda.max_memory_allocated(device) - base) if cuda else 0
    stats = dict(cache.stats) if hasattr(cache, "stats") and isinstance(getattr(cache, "stats"), dict) else {}
    tokens = out[:, input_ids.shape[1]:].cpu()
    del out, cache
    gc.collect()
    return GenResult(t1 - t0, prefill, per_token, int(resident), int(peak), tokens, stats, c1 - c0)


class Session:
    """The model, inputs and transports of the generate topic; caches per provider."""

    def __init__(self, run: Run, g: dict):
        from kvstream.layout import KVLayout
        from kvstream.models import batch_of_prompts

        self.run = run
        self.g = g
        self.model = inputs.shared_model(run)
        self.config = self.model.config
        self.layout = KVLayout.from_config(self.config, dtype=next(self.model.parameters()).dtype)
        self.input_ids = batch_of_prompts(g["batch"], g["prompt"], device=run.device)
        self.kv_bytes = self.layout.bytes_per_token(g["batch"]) * (g["prompt"] + g["new"])
        self._host = None
        self._disk = None
        self._disk_root = None
        self._n = 0
        self.errors: dict[str, str] = {}  # provider -> why it could not run

    def host_transport(self):
        """One HostTransport sized for a run's KV (sessions are deleted after each run)."""
        if self._host is None:
            from kvstream.transports.host import HostTransport

            self._host = HostTransport(capacity_bytes=int(self.kv_bytes * 1.25) + 64 * MiB, preallocate=True)
        return self._host

    def disk_transport(self):
        """One DiskTransport under ``--disk-dir`` (removed by :meth:`close`)."""
        if self._disk is None:
            from kvstream.transports.disk import DiskTransport

            self._disk_root = self.run.disk_dir()
            self._disk = DiskTransport(self._disk_root, fsync=bool(getattr(self.run.args, "disk_fsync", False)))
        return self._disk

    def factory(self, provider: str, level: int | None = None) -> tuple[Callable[[], Any], Callable[[], None]]:
        """``(make_cache, cleanup)`` for ``provider``; cleanup deletes the session's chunks."""
        from transformers import DynamicCache

        from kvstream.integrations.hf import StreamingCache

        self._n += 1
        session = f"gen{self._n:04d}"
        provider = provider.removesuffix("-eager")  # the same cache; measure() passes disable_compile=True
        cfg = self.config

        def _no_cleanup() -> None:
            return None

        if provider in ("dynamic", "dynamic-again"):  # dynamic-again: the A/A control (the machine's noise floor)
            return (lambda: DynamicCache(config=cfg)), _no_cleanup
        if provider == "static":
            from transformers import StaticCache

            n = self.g["prompt"] + self.g["new"]
            return (lambda: StaticCache(config=cfg, max_cache_len=n)), _no_cleanup
        if provider == "stream-static":
            from kvstream.integrations.hf import StreamingStaticCache

            t, n = self.host_transport(), self.g["prompt"] + self.g["new"]

            def _cleanup_static() -> None:
                for k in t.keys(session + "/"):
                    t.delete(k)

            return (lambda: StreamingStaticCache(cfg, n, t, session=session, level=level)), _cleanup_static
        if provider == "hf-offload":
            return (lambda: DynamicCache(config=cfg, offloading=True)), _no_cleanup
        if provider == "offload":
            return (lambda: StreamingCache(config=cfg, transport=None, session=session, offload=True)), _no_cleanup
        if provider in ("stream-host", "stream-disk"):
            t = self.host_transport() if provider == "stream-host" else self.disk_transport()

            def _cleanup() -> None:
                for k in t.keys(session + "/"):
                    t.delete(k)

            return (lambda: StreamingCache(config=cfg, transport=t, session=session, level=level)), _cleanup
        raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")

    def measure(self, provider: str, new_tokens: int, input_ids: torch.Tensor | None = None,
                level: int | None = None) -> GenResult:
        """One measured generate with ``provider``'s cache; the session's chunks are deleted afterwards."""
        make, cleanup = self.factory(provider, level)
        kw = {"disable_compile": True} if provider.endswith("-eager") else {}
        try:
            return generate_once(self.model, self.input_ids if input_ids is None else input_ids, make, new_tokens,
                                 self.run.device, **kw)
        finally:
            cleanup()

    @staticmethod
    def compiled_graphs() -> int:
        """Graphs ``torch.compile`` made in this process so far (what ``generate`` compiled by itself)."""
        import torch._dynamo

        return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    def close(self) -> None:
        """Close the transports and remove the disk directory."""
        for t in (self._host, self._disk):
            if t is not None:
                t.close()
        if self._disk_root is not None:
            shutil.rmtree(self._disk_root, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# The topic
# ----------------------------------------------------------------------------------------------------

def _record(run: Run, bench: str, provider: str, x: str, results: list[GenResult], layout, batch: int,
            seq: int) -> None:
    layer_bytes = layout.bytes_per_token(batch) * seq / layout.num_layers
    run.add(bench, provider, x, "total_time", "s", Stat.of([r.total_s for r in results]))
    run.add(bench, provider, x, "cpu_time", "s", Stat.of([r.cpu_s for r in results]))
    run.add(bench, provider, x, "prefill_time", "ms", Stat.of([r.prefill_s * 1e3 for r in results]))
    run.add(bench, provider, x, "per_token_time", "ms", Stat.of([r.per_token_s * 1e3 for r in results]))
    run.add(bench, provider, x, "kv_resident", "GB", Stat.of([r.kv_resident_bytes / GB for r in results]))
    run.add(bench, provider, x, "kv_layers_resident", "layers", Stat.of([r.kv_resident_bytes / layer_bytes for r in results]))
    run.add(bench, provider, x, "peak_memory", "GB", Stat.of([r.peak_bytes / GB for r in results]))


def run_main(run: Run, s: Session, providers: list[str]) -> dict[str, list[GenResult]]:
    """Warm-up, then ``reps`` alternating rounds over ``providers`` (stream-disk once)."""
    g = s.g
    results: dict[str, list[GenResult]] = {p: [] for p in providers}
    timing.progress(f"generate: warm-up ({', '.join(providers)}; full length where it fills an allocator cache)")
    for p in providers:
        try:
            # A full-length warm-up leaves the CUDA and pinned allocators holding every block a timed run needs
            # (127 decode chunks of 2 MiB would otherwise be cudaHostAlloc'd inside the first timed run).
            s.measure(p, g["new"] if p in WARM_FULL else 2)
        except Exception as e:  # noqa: BLE001 - a provider that cannot run here is reported, not fatal
            if p == "dynamic":
                raise
            timing.progress(f"generate: {p} cannot run: {type(e).__name__}: {e}")
            s.errors[p] = f"{type(e).__name__}: {e}"
            results.pop(p)
    order = [p for p in providers if p in results and p != "stream-disk"]
    for rep, p in timing.alternating(order, g["reps"]):
        r = s.measure(p, g["new"])
        results[p].append(r)
        timing.progress(f"generate: {p} rep {rep + 1}: {r.total_s:.3f} s (prefill {r.prefill_s * 1e3:.0f} ms, "
                        f"{r.per_token_s * 1e3:.2f} ms/token, KV resident {r.kv_resident_bytes / GB:.2f} GB)")
    if "stream-disk" in results:
        r = s.measure("stream-disk", g["new"])
        results["stream-disk"].append(r)
        timing.progress(f"generate: stream-disk: {r.total_s:.3f} s")
    x = f"B{g['batch']}/P{g['prompt']}/N{g['new']}"
    for p, rs in results.items():
        _record(run, "generate.e2e", p, x, rs, s.layout, g["batch"], g["prompt"] + g["new"])
    return results


def run_fig2(run: Run, s: Session) -> dict[int, dict]:
    """The paper's Fig. 2: prompt (prefill) time vs per-token time at several prompt lengths, DynamicCache."""
    from kvstream.models import batch_of_prompts

    g = s.g
    points: dict[int, dict] = {}
    for prompt in g["fig2"]:
        ids = batch_of_prompts(g["batch"], prompt, device=run.device)
        r = s.measure("dynamic", g["fig2_new"], input_ids=ids)
        points[prompt] = {"prompt_ms": r.prefill_s * 1e3, "per_token_ms": r.per_token_s * 1e3}
        run.add("generate.fig2", "dynamic", prompt, "prompt_time", "ms", r.prefill_s * 1e3)
        run.add("generate.fig2", "dynamic", prompt, "per_token_time", "ms", r.per_token_s * 1e3)
        run.add("generate.fig2", "dynamic", prompt, "prompt_over_token", "x", r.prefill_s / max(r.per_token_s, 1e-12))
        timing.progress(f"generate: Fig. 2, prompt {prompt}: prefill {r.prefill_s * 1e3:.1f} ms, "
                        f"{r.per_token_s * 1e3:.2f} ms/token")
    return points


def main(argv: Sequence[str] | None = None) -> int:
    """Run the generate topic; returns the exit code."""
    run = Run.from_argv("generate", argv, add_args, __doc__)
    g = _geometry(run)
    providers = ["dynamic"] + [p for p in run.args.providers.split(",") if p in PROVIDERS and p != "dynamic"]
    h2d = ceilings.ceiling_memcpy(run, 64 * MiB if not run.quick else 1 * MiB, 16 if not run.quick else 2,
                                  direction="h2d", bench="generate.ceiling", x="64MiBx16" if not run.quick else "1MiBx2").p50
    s = Session(run, g)
    try:
        timing.progress(f"generate: {s.layout.num_layers} layers, B{g['batch']}, prompt {g['prompt']}, "
                        f"{g['new']} new tokens, KV {s.kv_bytes / GB:.2f} GB")
        results = run_main(run, s, providers)
        fig2 = run_fig2(run, s) if g["fig2"] else {}
        summarize(run, s, results, fig2, h2d)
    finally:
        s.close()
    return run.finish()


if __name__ == "__main__":
    harness.module_main(main)
