"""The B1 generate gap, third look: every decode step's host time (the generate streamer's put() times) of
DynamicCache, StreamingCache without a transport, StreamingCache streaming only the prefill (decode steps pending
to the end), and StreamingCache -> HostTransport, alternating; where the gap sits (prefill, every step, spikes,
growth with the position) and the torch allocator's cudaMalloc/cudaFree counts per run.
Also the A/A control (a second DynamicCache, ``dynamic-again``) and ``stream-copy`` (a HostTransport that
refuses in-place chunks: the decode chunks packed on the device and copied on the side stream).
``KVS_GRAD_MODE=no_grad`` runs generate as a user does (its own ``no_grad`` only) instead of inside
``torch.inference_mode()``, as the generate bench does; with it, a provider named ``<provider>@inference`` runs
inside ``inference_mode`` alone (``dynamic,stream-host,dynamic@inference,stream-host@inference`` alternates both
modes in one run).
``PYTHONPATH=$PWD python3 bench/probes/generate_b1_steps.py [reps] [new_tokens] [providers,...]``."""
import contextlib, gc, os, statistics, sys, time, torch
from transformers import DynamicCache
from kvstream.bench.generate import _probe_class
from kvstream.integrations.hf import StreamingCache, cache_kwargs
from kvstream.models import build_model, llama3_8b_config
from kvstream.transports.host import HostTransport

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 4
T = int(sys.argv[2]) if len(sys.argv) > 2 else 256
cfg = llama3_8b_config(32)
m = build_model(cfg, device="cuda", dtype=torch.bfloat16).eval()
ids = torch.randint(0, cfg.vocab_size, (1, 512), device="cuda")
kv = 32 * 2 * 8 * 128 * 2 * (512 + T)
t = HostTransport(capacity_bytes=int(kv * 1.25) + (64 << 20), preallocate=True)


class CopyingHostTransport(HostTransport):
    """The same transport with the in-place (zero-copy) chunks turned off: decode chunks are packed on the device
    and copied on the side stream, as before 443caa0."""

    @property
    def zero_copy(self) -> bool:
        return False


tc = CopyingHostTransport(capacity_bytes=int(kv * 1.25) + (64 << 20), preallocate=True)
dev = torch.device("cuda")
makers = {"dynamic": lambda i: DynamicCache(config=cfg),
          "dynamic-again": lambda i: DynamicCache(config=cfg),  # the A/A control
          "stream-none": lambda i: StreamingCache(config=cfg, transport=None, session=f"n{i}"),
          "stream-prefill": lambda i: StreamingCache(config=cfg, transport=t, session=f"p{i}", steps_per_chunk=1 << 20),
          "stream-host": lambda i: StreamingCache(config=cfg, transport=t, session=f"h{i}"),
          "stream-copy": lambda i: StreamingCache(config=cfg, transport=tc, session=f"c{i}")}
if len(sys.argv) > 3:  # a subset, in this order: e.g. dynamic,dynamic-again,stream-host
    makers = {k: makers[k.split("@")[0]] for k in sys.argv[3].split(",")}
rows = {k: [] for k in makers}


def once(kind, i):
    gc.collect(); torch.cuda.synchronize()
    a0 = torch.cuda.memory_stats(dev)
    cache = makers[kind](i)
    probe = _probe_class()(dev)
    t0 = time.perf_counter()
    with torch.inference_mode() if kind.endswith("@inference") else contextlib.nullcontext():
        model_out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=T,
                               min_new_tokens=T, do_sample=False, pad_token_id=0, streamer=probe)
    if hasattr(cache, "wait"):
        cache.wait()
    torch.cuda.synchronize(); t1 = time.perf_counter()
    a1 = torch.cuda.memory_stats(dev)
    times = probe.times[1:]
    steps = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    mallocs = a1.get("num_device_alloc", 0) - a0.get("num_device_alloc", 0)
    frees = a1.get("num_device_free", 0) - a0.get("num_device_free", 0)
    del model_out, cache
    for tr in (t, tc):
        for k in tr.keys():
            tr.delete(k)
    return dict(total=t1 - t0, prefill=(times[0] - t0) * 1e3, steps=steps, mallocs=mallocs, frees=frees)


mode = torch.inference_mode() if os.environ.get("KVS_GRAD_MODE", "inference") == "inference" else contextlib.nullcontext()
print("grad mode:", os.environ.get("KVS_GRAD_MODE", "inference"))
with mode:
    for kind in makers:
        once(kind, -1)  # warm-up, 1 each
    order = list(makers)
    for i in range(reps):
        for kind in (order if i % 2 == 0 else order[::-1]):
            r = once(kind, i)
            rows[kind].append(r)
            s = sorted(r["steps"])
            q = len(s) // 4
            print(f"rep {i} {kind:15s} total {r['total']:.3f} s  prefill {r['prefill']:6.1f} ms  step p50 {statistics.median(s):6.2f} "
                  f"p90 {s[9 * len(s) // 10]:6.2f} max {s[-1]:7.2f} ms  first quarter {statistics.mean(r['steps'][:q]):6.2f} "
                  f"last quarter {statistics.mean(r['steps'][-q:]):6.2f}  at chunk steps {statistics.mean(r['steps'][15::16]):6.2f}  "
                  f"cudaMalloc {r['mallocs']} cudaFree {r['frees']}", flush=True)
    print("--- medians over reps")
    for kind, rs in rows.items():
        print(f"{kind:15s} total {statistics.median(r['total'] for r in rs):.3f} s  step p50 "
              f"{statistics.median(statistics.median(r['steps']) for r in rs):.2f} ms  mean "
              f"{statistics.median(statistics.mean(r['steps']) for r in rs):.2f} ms")
    worst = max(rows.get("stream-host") or rows[order[-1]], key=lambda r: r["total"])
    print("slowest stream-host (or last provider's) run, steps over 2x its median (index: ms):",
          [(j, round(x, 1)) for j, x in enumerate(worst["steps"]) if x > 2 * statistics.median(worst["steps"])][:40])
